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

from cache_schema import CacheStore
from inpo_pipeline.plan import row_keys


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


def read_micro_batch(store: CacheStore, rows: np.ndarray, dropped: np.ndarray) -> dict[str, torch.Tensor]:
    """Everything one training micro-batch needs, as float32 tensors (chosen first, then rejected).

    latents/targets/timesteps/text (and SDXL pooled/time_ids) have 2B entries: the B chosen images
    then the B rejected ones; reference errors are picked for the prompt each row trains with.
    """
    batch = store.read_rows(rows)
    prompt = np.where(dropped, 0, batch.prompt_index)
    text, pooled = store.read_prompt_embeddings(prompt)
    column = dropped.astype(np.int64)
    picked = np.arange(len(rows))
    result: dict[str, Any] = {
        "rows": torch.from_numpy(rows.astype(np.int64)),
        "latents": torch.from_numpy(np.concatenate([batch.latent_chosen, batch.latent_rejected])),
        "targets": torch.from_numpy(np.concatenate([batch.target_chosen, batch.target_rejected])),
        "timesteps": torch.from_numpy(np.concatenate([batch.timestep, batch.timestep]).astype(np.int64)),
        "text": torch.from_numpy(np.concatenate([text, text])),
        "reference_error_chosen": torch.from_numpy(batch.reference_error_chosen[picked, column]),
        "reference_error_rejected": torch.from_numpy(batch.reference_error_rejected[picked, column]),
        "dropped": torch.from_numpy(dropped),
    }
    if pooled is not None:
        assert batch.time_ids_chosen is not None and batch.time_ids_rejected is not None
        result["pooled"] = torch.from_numpy(np.concatenate([pooled, pooled]))
        result["time_ids"] = torch.from_numpy(np.concatenate([batch.time_ids_chosen, batch.time_ids_rejected]))
    return result


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batches `start`, `start + 1`, … of a schedule; item i is a whole micro-batch.

    The store is opened lazily in each worker process (workers are spawned, not forked: zarr's
    I/O runs an event loop thread that a fork would copy in an unknown state).
    """

    def __init__(self, store_path: str, schedule: BatchSchedule, start: int, count: int) -> None:
        self.store_path = store_path
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
        return read_micro_batch(self._store, rows, dropped)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None
        return state


def micro_batch_loader(dataset: MicroBatches, num_workers: int) -> torch.utils.data.DataLoader:
    """In-order loader of whole micro-batches, with spawned workers prefetching ahead."""
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = {"multiprocessing_context": "spawn", "persistent_workers": False, "prefetch_factor": 4}
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers, **extra)
