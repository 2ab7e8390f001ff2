"""Training checkpoints in formats that cannot execute code: safetensors for tensors, JSON for the rest.

accelerate's `save_state`/`load_state` pickle the scheduler, the RNG states and the optimizer, and
unpickle them on resume: a crafted file in a run folder would run code when a user resumes. Here
every file is read by `safetensors` or `json` only, and no other file in the folder is opened.

A checkpoint folder holds:
  model.safetensors          the policy's state dict (what `inpo train` exports, loadable alone)
  optimizer.safetensors      every tensor of the optimizer's state, keyed "state.<param>.<name>"
  optimizer.json             its param groups and non-tensor state values
  scheduler.json             the lr scheduler's state dict
  scaler.json                fp16's gradient scaler (when there is one)
  rng-<rank>.safetensors     torch's CPU (and CUDA) generator states of each process
  rng-<rank>.json            Python's and numpy's generator states of each process
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inpo_pipeline.errors import UserError

MODEL_FILE = "model.safetensors"
REQUIRED_FILES = (MODEL_FILE, "optimizer.safetensors", "optimizer.json", "scheduler.json")


def save_training_state(folder: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any,
                        rank: int, main_process: bool) -> None:
    """Write this process's part of a checkpoint (the main process writes the shared files)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if main_process:
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()},
                  str(folder / MODEL_FILE))
        state = optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for index, values in state["state"].items():
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(index), {})[name] = value
        save_file(tensors, str(folder / "optimizer.safetensors"))
        (folder / "optimizer.json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))
        (folder / "scheduler.json").write_text(json.dumps(
            {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}))
        if scaler is not None:
            (folder / "scaler.json").write_text(json.dumps(scaler.state_dict()))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for device, value in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{device}"] = value
    save_file(rng, str(folder / f"rng-{rank}.safetensors"))
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    python_state = random.getstate()
    (folder / f"rng-{rank}.json").write_text(json.dumps({
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(gauss)],
        "python": [python_state[0], list(python_state[1]), python_state[2]],
    }))


def load_training_state(folder: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, scaler: Any,
                        rank: int) -> None:
    """Restore what `save_training_state` wrote; refuse a folder in any other format in one line."""
    from safetensors.torch import load_file

    missing = [name for name in (*REQUIRED_FILES, f"rng-{rank}.safetensors", f"rng-{rank}.json")
               if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{folder} is a checkpoint this inpo cannot load safely (no {missing[0]}; checkpoints of "
            "earlier versions were pickled and are never unpickled): start the run again without --resume"
        )
    try:
        model.load_state_dict(load_file(str(folder / MODEL_FILE)))
        tensors = load_file(str(folder / "optimizer.safetensors"))
        record = json.loads((folder / "optimizer.json").read_text())
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
        for index, values in record["scalars"].items():
            state.setdefault(int(index), {}).update(values)
        optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})
        scheduler_state = json.loads((folder / "scheduler.json").read_text())
        scheduler.load_state_dict({**scheduler_state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
        if scaler is not None and (folder / "scaler.json").is_file():
            scaler.load_state_dict(json.loads((folder / "scaler.json").read_text()))
        rng = load_file(str(folder / f"rng-{rank}.safetensors"))
        generators = json.loads((folder / f"rng-{rank}.json").read_text())
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise UserError(f"{folder} is damaged ({type(error).__name__}: {str(error).splitlines()[0]}); "
                        "resume from another checkpoint (remove this one) or start again") from error
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[f"cuda.{device}"] for device in range(torch.cuda.device_count()) if f"cuda.{device}" in rng]
        if states:
            torch.cuda.set_rng_state_all(states)
    kind, keys, position, has_gauss, gauss = generators["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = generators["python"]
    random.setstate((version, tuple(internal), gauss_next))
