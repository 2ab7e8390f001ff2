"""The command line as a new user meets it: every command's --help answers fast, without torch."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from inpo_pipeline.cli import app
from tests.conftest import cli_env


def _commands(group=app, prefix=()) -> list[tuple[str, ...]]:
    names = [prefix + (command.name or command.callback.__name__.replace("_", "-"),)
             for command in group.registered_commands]
    for sub in group.registered_groups:
        names += _commands(sub.typer_instance, prefix + (sub.name,))
    return names


COMMANDS = _commands()


def test_every_command_is_listed():
    assert {("invert",), ("train",), ("cache", "info"), ("cache", "verify"), ("sample",), ("eval",),
            ("demo",), ("world", "build"), ("example",)} <= set(COMMANDS)


@pytest.mark.parametrize("command", [(), *COMMANDS], ids=lambda c: " ".join(c) or "inpo")
def test_help_answers_in_under_a_second_without_importing_torch(command):
    probe = ("import sys, runpy; sys.argv = ['inpo', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('inpo_pipeline', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    seconds = []
    for _ in range(3):  # the best of three: a shared machine's noise is not the command's cost
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", probe, *command, "--help"], capture_output=True, text=True,
                                env=cli_env(), timeout=60)
        seconds.append(time.perf_counter() - started)
        assert result.returncode == 0, result.stderr
        assert "Usage" in result.stdout and result.stdout.rstrip().endswith("NO-TORCH"), result.stdout[-500:]
    assert min(seconds) < 1.0, seconds
