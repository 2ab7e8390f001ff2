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
