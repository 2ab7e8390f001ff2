"""The process group, through accelerate, the same way for one process, 8 GPUs or CPU ranks."""

from __future__ import annotations

from typing import Any

import torch


def process_state() -> Any:
    """accelerate's PartialState; on a machine without CUDA it joins a gloo CPU group.

    (`accelerate launch --multi_gpu --num_processes P` starts P CPU ranks on such a machine;
    without `--multi_gpu` accelerate starts one process.)
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


class WorkerShare:
    """One uncoordinated worker's part of the work (`inpo invert --worker I --workers N`).

    The worker's own processes (one, or an `accelerate launch` group) form ranks I·P … I·P+P−1 of
    N·P: work is split by these global indices exactly as one group of N·P processes would split
    it, so any mix of workers and ranks fills the same store. Barriers wait for the worker's own
    processes only; the other workers are never waited for.
    """

    def __init__(self, state: Any, worker: int, workers: int) -> None:
        self.state = state
        self.worker = worker
        self.workers = workers

    @property
    def process_index(self) -> int:
        return self.worker * self.state.num_processes + self.state.process_index

    @property
    def num_processes(self) -> int:
        return self.workers * self.state.num_processes

    @property
    def uncoordinated(self) -> bool:
        return self.workers > 1

    def __getattr__(self, name: str) -> Any:
        # device, is_main_process (of the worker's own group), wait_for_everyone, local ranks
        return getattr(self.state, name)


def worker_share(worker: int | None, workers: int | None) -> Any:
    """The process state of this invocation, as a share of `workers` uncoordinated workers."""
    return WorkerShare(process_state(), worker or 0, workers or 1)
