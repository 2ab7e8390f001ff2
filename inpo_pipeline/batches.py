"""Stage two's data: which rows form micro-batch m on rank r, and reading them from the store.

The schedule is a pure function of (seed, epoch, micro-batch index, rank), so a resumed run
reads exactly the batches an uninterrupted one would, and the ranks of one step together cover
a global batch in which every row appears once per epoch. Prompt dropout is a per-(row, epoch)
hash too: no random state to save.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cache_schema import CacheStore, StoreError
from inpo_pipeline.objectives import DEFAULT_OBJECTIVE, INVERSION_INPUTS, OBJECTIVES
from inpo_pipeline.plan import forward_noise, row_keys
from inpo_pipeline.processes import Process, process_from_settings


@dataclass(frozen=True)
class BatchSchedule:
    """Micro-batches of `batch_size` rows per rank, drawn without replacement per epoch."""

    rows: np.ndarray  # the store's usable rows (finished and valid), sorted
    batch_size: int
    num_processes: int
    process_index: int
    seed: int
    prompt_dropout: float

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    @property
    def micro_batches_per_epoch(self) -> int:
        return len(self.rows) // self.global_batch

    _orders: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The rows in this epoch's seeded order (the latest epoch's order is kept)."""
        if epoch not in self._orders:
            self._orders.clear()
            self._orders[epoch] = self.rows[np.random.default_rng([self.seed, 13, epoch]).permutation(len(self.rows))]
        return self._orders[epoch]

    def micro_batch(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(store rows, prompt-dropped flags, epoch) of this rank's micro-batch `index`."""
        epoch, position = divmod(index, self.micro_batches_per_epoch)
        order = self.epoch_order(epoch)
        step_rows = order[position * self.global_batch : (position + 1) * self.global_batch]
        mine = step_rows[self.process_index :: self.num_processes]
        return mine, self.dropped(mine, epoch), epoch

    def dropped(self, rows: np.ndarray, epoch: int) -> np.ndarray:
        """Which rows train on the empty prompt this epoch (probability `prompt_dropout`)."""
        if self.prompt_dropout <= 0:
            return np.zeros(len(rows), dtype=bool)
        keys = row_keys(self.seed, rows.astype(np.int64), np.full(len(rows), epoch), salt=17)
        uniform = (keys >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        return uniform < self.prompt_dropout


def read_micro_batch(
    store: CacheStore, rows: np.ndarray, dropped: np.ndarray, objective: str = DEFAULT_OBJECTIVE,
    process: Process | None = None,
) -> dict[str, torch.Tensor]:
    """Everything one training micro-batch of `objective` needs, as float32 tensors.

    latents/targets/labels/text (and pooled, SDXL time_ids, FLUX guidance) hold the B chosen
    images, then, for pairwise objectives, the B rejected ones; reference errors are picked for
    the prompt each row trains with. InPO reads the inverted x_t and its target; the
    forward-noised objectives read x0, regenerate ε from the store's seed and form x_t and the
    target here through the store's process, exactly as stage one did when it cached their
    reference errors (DESIGN §1.7, §1.8). `labels` are what the denoiser is called with (integer
    t, or 1000·σ on flow stores).
    """
    spec = OBJECTIVES[objective]
    process = process or process_from_settings(store.settings)
    picked, column = np.arange(len(rows)), dropped.astype(np.int64)
    if spec.inputs == INVERSION_INPUTS:
        batch = store.read_rows(rows)
        images = [(batch.latent_chosen, batch.target_chosen, batch.reference_error_chosen, batch.time_ids_chosen),
                  (batch.latent_rejected, batch.target_rejected, batch.reference_error_rejected,
                   batch.time_ids_rejected)]
    else:
        batch = store.read_rows(rows, inputs="forward")
        assert batch.clean_chosen is not None and batch.clean_rejected is not None
        noise = torch.from_numpy(forward_noise(store.settings["seed"], batch.source_row, batch.draw,
                                               store.layout.latent_shape))
        clean = torch.from_numpy(np.stack([batch.clean_chosen, batch.clean_rejected], axis=1))
        latents = process.forward_latents(clean, noise, batch.timestep, batch.sigma).float().numpy()
        targets = process.forward_target(clean, noise, batch.timestep, batch.sigma).float().numpy()
        images = [(latents[:, 0], targets[:, 0], batch.forward_error_chosen, batch.time_ids_chosen),
                  (latents[:, 1], targets[:, 1], batch.forward_error_rejected, batch.time_ids_rejected)]
    if not spec.pairwise:
        images = images[:1]
    prompt = np.where(dropped, 0, batch.prompt_index)
    text, pooled = store.read_prompt_embeddings(prompt)
    copies = len(images)
    labels = process.labels(batch.timestep, batch.sigma)
    result: dict[str, Any] = {
        "rows": torch.from_numpy(rows.astype(np.int64)),
        "latents": torch.from_numpy(np.ascontiguousarray(np.concatenate([image[0] for image in images]))),
        "targets": torch.from_numpy(np.ascontiguousarray(np.concatenate([image[1] for image in images]))),
        "timesteps": labels.repeat(copies),
        "text": torch.from_numpy(np.concatenate([text] * copies)),
        "reference_error_chosen": torch.from_numpy(images[0][2][picked, column]),
        "dropped": torch.from_numpy(dropped),
    }
    if spec.pairwise:
        result["reference_error_rejected"] = torch.from_numpy(images[1][2][picked, column])
    if pooled is not None:
        result["pooled"] = torch.from_numpy(np.concatenate([pooled] * copies))
    if store.layout.size_conditioning:
        assert all(image[3] is not None for image in images)
        result["time_ids"] = torch.from_numpy(np.concatenate([image[3] for image in images]))
    guidance = store.settings.get("guidance_embedding")
    if guidance is not None:
        result["guidance"] = torch.full((copies * len(rows),), float(guidance))
    return result


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batches `start`, `start + 1`, … of a schedule; item i is a whole micro-batch.

    The store is opened lazily in each worker process (workers are spawned, not forked: zarr's
    I/O runs an event loop thread that a fork would copy in an unknown state).
    """

    def __init__(self, store_path: str, schedule: BatchSchedule, start: int, count: int,
                 objective: str = DEFAULT_OBJECTIVE, process: Process | None = None) -> None:
        self.store_path = store_path
        self.objective = objective
        self.process = process
        self.schedule = schedule
        self.start = start
        self.count = count
        self._store: CacheStore | None = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        if self._store is None:
            self._store = CacheStore.open(self.store_path)
        rows, dropped, _epoch = self.schedule.micro_batch(self.start + item)
        return read_micro_batch(self._store, rows, dropped, self.objective, self.process)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None
        return state


def micro_batch_loader(dataset: MicroBatches, num_workers: int) -> "_OneLineErrors":
    """In-order loader of whole micro-batches, with spawned workers prefetching ahead."""
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = {"multiprocessing_context": "spawn", "persistent_workers": False, "prefetch_factor": 4}
    return _OneLineErrors(torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False,
                                                      num_workers=num_workers, **extra))


class _OneLineErrors:
    """Iterates a DataLoader; a StoreError raised in a worker comes back as its own one line
    (PyTorch re-raises it with the worker's whole traceback in the message)."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        try:
            yield from self.loader
        except StoreError as error:
            lines = [line for line in str(error).splitlines() if line.strip()]
            raise StoreError(lines[-1].split("StoreError: ", 1)[-1] if lines else str(error)) from None
