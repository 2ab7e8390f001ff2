"""Console output: one Reporter per process, silent on every process but the main one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


class _RateColumn(TextColumn):
    """Items per second, with the item's unit."""

    def __init__(self, unit: str) -> None:
        super().__init__("")
        self.unit = unit

    def render(self, task: Any) -> Any:
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"? {self.unit}/s", style="cyan")


class Reporter:
    """Progress bars, tables and lines on stderr; does nothing when disabled."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True, highlight=False)

    def line(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, soft_wrap=True)

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[None]:
        if not self.enabled or not self.console.is_terminal:
            self.line(text)
            yield
            return
        with self.console.status(text):
            yield

    @contextlib.contextmanager
    def progress(self, name: str, total: int, unit: str = "it") -> Iterator[Callable[[int], None]]:
        """A bar with rate and ETA; yields `advance(n)`."""
        if not self.enabled or total == 0:
            yield lambda _n: None
            return
        if not self.console.is_terminal:
            # a log or a pipe: whole lines (a bar would be cut to the default width of 80)
            yield _plain_progress(self, name, total, unit)
            return
        columns = [
            TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), _RateColumn(unit),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        ]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task(name, total=total)
            yield lambda n: progress.advance(task, n)

    @contextlib.contextmanager
    def training_progress(self, total: int, start: int) -> Iterator[Callable[[Mapping[str, Any]], None]]:
        """A bar over optimizer steps showing loss, implicit accuracy, lr and pairs/s."""
        if not self.enabled:
            yield lambda _metrics: None
            return
        columns = [
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  acc {task.fields[accuracy]}  lr {task.fields[lr]}  "
                       "{task.fields[speed]} pairs/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        ]
        if not self.console.is_terminal:
            def plain(metrics: Mapping[str, Any]) -> None:
                speed = metrics.get("pairs_per_second")
                self.line(f"step {metrics['step']}/{total}: loss {metrics['loss']:.5f}, "
                          f"implicit accuracy {metrics['implicit_accuracy']:.3f}, lr {metrics['lr']:.3g}"
                          + (f", {speed:.1f} pairs/s" if speed else ""))

            yield plain
            return
        with Progress(*columns, console=self.console) as progress:
            task = progress.add_task("training", total=total, completed=start,
                                     loss="?", accuracy="?", lr="?", speed="?")

            def update(metrics: Mapping[str, Any]) -> None:
                speed = metrics.get("pairs_per_second")
                progress.update(task, completed=metrics["step"], loss=f"{metrics['loss']:.4f}",
                                accuracy=f"{metrics['implicit_accuracy']:.2f}", lr=f"{metrics['lr']:.2e}",
                                speed=f"{speed:.1f}" if speed else "?")

            yield update

    def table(self, title: str, rows: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        table = Table(title=title, show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        items = rows.items() if isinstance(rows, Mapping) else rows
        for key, value in items:
            table.add_row(str(key), str(value))
        self.console.print(table)


def _plain_progress(reporter: Reporter, name: str, total: int, unit: str) -> Callable[[int], None]:
    """`advance(n)` that prints one line per tenth of the work: done/total, rate, elapsed, eta."""
    import time

    started = time.perf_counter()
    state = {"done": 0, "printed": 0}

    def advance(count: int) -> None:
        state["done"] += count
        done = state["done"]
        if done < total and done * 10 // total == state["printed"] * 10 // total:
            return
        state["printed"] = done
        elapsed = time.perf_counter() - started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else float("nan")
        reporter.line(f"{name}: {done}/{total} {unit}, {rate:.2f} {unit}/s, {_clock(elapsed)} elapsed"
                      + (f", eta {_clock(eta)}" if done < total and eta == eta else ""))

    return advance


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} TiB"
