"""Stage two's data: which rows form micro-batch m on rank r, and reading them from the store.

The schedule is a pure function of (seed, epoch, micro-batch index, rank), so a resumed run
reads exactly the batches an uninterrupted one would, and the ranks of one step together cover
a global batch in which every row appears once per epoch. Prompt dropout is a per-(row, epoch)
hash too: no random state to save. The default order follows the store's blocks, so that the
loader reads a shuffle buffer's rows in one read per array (`BatchSchedule`, `MicroBatches`).
"""

from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cache_schema import CacheStore, StoreError, decode_storage
from inpo_pipeline.method.objectives import DEFAULT_OBJECTIVE, INVERSION_INPUTS, OBJECTIVES
from inpo_pipeline.method.plan import forward_noise, row_keys
from inpo_pipeline.method.processes import Process, process_from_settings


DATA_ORDERS = ("blocks", "rows")
DEFAULT_SHUFFLE_BUFFER = 1024  # rows shuffled together, over all ranks; each rank reads its 1/P at once


@dataclass(frozen=True)
class BatchSchedule:
    """Micro-batches of `batch_size` rows per rank, drawn without replacement per epoch.

    Two orders. "rows" permutes every usable row and gives rank r every P-th row of each global
    batch. "blocks" (the default) reads the way the store is laid out: the usable rows are cut
    into blocks of `block_rows` consecutive rows (boundaries rotated by a seeded offset each
    epoch, so rows do not always meet the same neighbours), the blocks are permuted, and every
    window of about `shuffle_buffer` rows of that sequence (a whole number of global batches) is
    shuffled into global batches — the same batches for any P at the same global batch. Rank r takes the r-th B rows of each batch
    in block order, so its rows cluster in the r-th part of the window (the tighter, the larger
    the global batch), and it reads them once. Rows are permuted when the store is created, so a block is a random sample.
    """

    rows: np.ndarray  # the store's usable rows (finished and valid), sorted
    batch_size: int
    num_processes: int
    process_index: int
    seed: int
    prompt_dropout: float
    order: str = "blocks"
    block_rows: int = 64
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER

    def __post_init__(self) -> None:
        if self.order not in DATA_ORDERS:
            raise ValueError(f"order must be one of {DATA_ORDERS}")
        if self.block_rows < 1 or self.shuffle_buffer < 1:
            raise ValueError("block_rows and shuffle_buffer must be at least 1")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    @property
    def micro_batches_per_epoch(self) -> int:
        return len(self.rows) // self.global_batch

    @property
    def micro_batches_per_group(self) -> int:
        """Consecutive micro-batches one read serves (a shuffle window's worth)."""
        return max(1, self.shuffle_buffer // self.global_batch)

    _orders: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def rank_order(self, epoch: int) -> np.ndarray:
        """This rank's rows of `epoch`, micro-batch by micro-batch: shape (micro-batches, B).
        The latest epoch's is kept."""
        if epoch not in self._orders:
            self._orders.clear()
            self._orders[epoch] = self._blocks(epoch) if self.order == "blocks" else self._rows(epoch)
        return self._orders[epoch]

    def _rows(self, epoch: int) -> np.ndarray:
        used = self.micro_batches_per_epoch * self.global_batch
        order = self.rows[np.random.default_rng([self.seed, 13, epoch]).permutation(len(self.rows))][:used]
        steps = order.reshape(self.micro_batches_per_epoch, self.global_batch)
        return np.ascontiguousarray(steps[:, self.process_index :: self.num_processes])

    def _blocks(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 19, epoch])
        count, size = len(self.rows), self.block_rows
        rotated = np.roll(self.rows, -int(rng.integers(size)))
        blocks = [rotated[start : start + size] for start in range(0, count, size)]
        sequence = np.concatenate([blocks[b] for b in rng.permutation(len(blocks))])
        sequence = sequence[: self.micro_batches_per_epoch * self.global_batch]
        group = self.micro_batches_per_group * self.global_batch
        first, last = self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size
        parts = []
        for window, start in enumerate(range(0, len(sequence), group)):
            rows = sequence[start : start + group]  # a multiple of the global batch
            # global batches: a shuffle of the window, the same for any number of ranks
            positions = np.random.default_rng([self.seed, 23, epoch, window]).permutation(len(rows))
            steps = np.sort(positions.reshape(-1, self.global_batch), axis=1)
            # rank r takes the r-th B of each batch in block order: its rows cluster in the r-th
            # part of the window, so a rank reads fewer of the window's blocks
            parts.append(rows[steps[:, first:last]])
        return np.concatenate(parts)

    def micro_batch(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(store rows, prompt-dropped flags, epoch) of this rank's micro-batch `index`."""
        epoch, position = divmod(index, self.micro_batches_per_epoch)
        mine = self.rank_order(epoch)[position]
        return mine, self.dropped(mine, epoch), epoch

    def group_of(self, index: int) -> range:
        """The micro-batches read together with micro-batch `index` (one shuffle buffer, in one epoch)."""
        epoch, position = divmod(index, self.micro_batches_per_epoch)
        first = epoch * self.micro_batches_per_epoch + position - position % self.micro_batches_per_group
        last = min(first + self.micro_batches_per_group, (epoch + 1) * self.micro_batches_per_epoch)
        return range(first, last)

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
    """Everything one training micro-batch of `objective` needs, read from the store."""
    group = read_micro_batch_group(store, [(rows, dropped)], objective, process)
    return {name: values[0] for name, values in group.items()}


def read_micro_batch_group(
    store: CacheStore, picks: list[tuple[np.ndarray, np.ndarray]], objective: str = DEFAULT_OBJECTIVE,
    process: Process | None = None,
) -> dict[str, Any]:
    """G micro-batches ((rows, dropped) each, B rows apiece) from one read of the store: entry [g]
    of each value is micro-batch g's tensor. In a loader worker every value is one tensor with the
    micro-batch as its leading axis (one tensor per key crosses to the trainer); in the trainer's
    own process the large ones (latents, targets, text, pooled) are lists of G tensors of their own
    (small arrays that the allocator reuses stay in the CPU's cache, where a group-sized array of
    hundreds of MB would not).

    latents/targets/labels (and SDXL time_ids, FLUX guidance) hold the B chosen images, then, for
    pairwise objectives, the B rejected ones; text (and pooled) hold the B prompts once, for the
    denoiser call to repeat on the device. Stored values stay in the storage dtype (latents and
    targets of InPO, text, pooled) — half the bytes through the loader, and exact: the denoiser
    call converts them to float32 on the device (`policy`); computed ones are float32. InPO's
    stored latents, targets and text are copied once, from the stored objects straight into
    these arrays (`CacheStore.gather_rows`). Reference errors are picked for the prompt each row
    trains with. The forward-noised objectives read x0, regenerate ε from the store's seed and
    form x_t and the target here through the store's process, exactly as stage one did when it
    cached their reference errors (DESIGN §1.7, §1.8). `labels` are what the denoiser is called
    with (integer t, or 1000·σ on flow stores).
    """
    spec = OBJECTIVES[objective]
    process = process or process_from_settings(store.settings)
    groups, size = len(picks), len(picks[0][0])
    if any(len(rows) != size for rows, _dropped in picks):
        raise ValueError("the micro-batches of one group must have the same size")
    rows = np.concatenate([rows for rows, _dropped in picks]).astype(np.int64)
    dropped = np.concatenate([dropped for _rows, dropped in picks]).astype(bool)
    inputs = _row_inputs(objective)
    store.require_rows(rows, inputs)
    layout = store.layout
    dtype = layout.storage_dtype
    copies = 2 if spec.pairwise else 1
    arrays = _GroupArrays(groups)

    def small(name: str) -> np.ndarray:
        shape, stored = store.row_spec(name)
        values = np.empty((len(rows), *shape), dtype=stored)  # small, or picked from below
        store.gather_rows(name, rows, values)
        return values

    # the position of chosen row k of micro-batch g among the group's images, and its rejected one
    chosen_at = (np.arange(groups)[:, None] * copies * size + np.arange(size)).reshape(-1)
    image_shape = (groups * copies * size, *layout.latent_shape)
    micro_batch_images = (copies * size, *layout.latent_shape)
    timestep = small("timestep")
    sigma = small("sigma") if layout.sigma else None
    if spec.inputs == INVERSION_INPUTS:
        stored = store.row_spec("latent_chosen")[1]
        latents, targets = arrays.empty(micro_batch_images, stored), arrays.empty(micro_batch_images, stored)
        for side, (latent, target) in enumerate((("latent_chosen", "target_chosen"),
                                                  ("latent_rejected", "target_rejected"))[:copies]):
            store.gather_rows(latent, rows, latents, chosen_at + side * size)
            store.gather_rows(target, rows, targets, chosen_at + side * size)
        errors = ("reference_error_chosen", "reference_error_rejected")
        latents_tensor, targets_tensor = arrays.tensors(latents, dtype), arrays.tensors(targets, dtype)
    else:
        clean = np.empty((len(rows), 2, *layout.latent_shape), dtype=store.row_spec("clean_chosen")[1])
        store.gather_rows("clean_chosen", rows, clean[:, 0])
        store.gather_rows("clean_rejected", rows, clean[:, 1])
        noise = torch.from_numpy(forward_noise(store.settings["seed"], small("source_row"), small("draw"),
                                               layout.latent_shape))
        clean_tensor = torch.from_numpy(decode_storage(clean, dtype))
        formed = [process.forward_latents(clean_tensor, noise, timestep, sigma).float(),
                  process.forward_target(clean_tensor, noise, timestep, sigma).float()]
        # (rows, 2, …) -> per micro-batch the B chosen images, then the B rejected ones
        latents_tensor, targets_tensor = (
            value.reshape(groups, size, 2, *layout.latent_shape)[:, :, :copies].transpose(1, 2)
            .reshape(groups, *micro_batch_images) for value in formed)
        latents_tensor, targets_tensor = arrays.adopt(latents_tensor), arrays.adopt(targets_tensor)
        errors = ("forward_error_chosen", "forward_error_rejected")
    text_shape, text_dtype = store.prompt_spec("embedding")
    text = arrays.empty((size, *text_shape), text_dtype)
    pooled = None
    if layout.pooled_dim is not None:
        pooled_shape, pooled_dtype = store.prompt_spec("pooled_embedding")
        pooled = arrays.empty((size, *pooled_shape), pooled_dtype)
    store.gather_prompt_embeddings(np.where(dropped, 0, small("prompt_index")), text, pooled)
    column = dropped.astype(np.int64)
    picked = np.arange(len(rows))

    def per_group(values: torch.Tensor) -> torch.Tensor:
        return values.reshape(groups, -1, *values.shape[1:])

    def both_images(values: torch.Tensor) -> torch.Tensor:
        return per_group(values).repeat(1, copies, *([1] * (values.dim() - 1)))

    result: dict[str, Any] = {
        "rows": per_group(torch.from_numpy(rows)),
        "latents": latents_tensor,
        "targets": targets_tensor,
        "timesteps": both_images(process.labels(timestep, sigma)),
        "text": arrays.tensors(text, dtype),
        "reference_error_chosen": per_group(torch.from_numpy(small(errors[0])[picked, column])),
        "dropped": per_group(torch.from_numpy(dropped)),
    }
    if spec.pairwise:
        result["reference_error_rejected"] = per_group(torch.from_numpy(small(errors[1])[picked, column]))
    if pooled is not None:
        result["pooled"] = arrays.tensors(pooled, dtype)
    if layout.size_conditioning:
        time_ids_shape, time_ids_dtype = store.row_spec("time_ids_chosen")
        time_ids = np.empty((groups * copies * size, *time_ids_shape), dtype=time_ids_dtype)
        for side, name in enumerate(("time_ids_chosen", "time_ids_rejected")[:copies]):
            store.gather_rows(name, rows, time_ids, chosen_at + side * size)
        result["time_ids"] = per_group(torch.from_numpy(time_ids))
    guidance = store.settings.get("guidance_embedding")
    if guidance is not None:
        result["guidance"] = torch.full((groups, copies * size), float(guidance))
    return result


class _ArrayPool:
    """Large arrays handed out again once nothing else refers to them (the tensors made from one
    keep it alive). Fresh memory costs a page fault per 4 KiB on first touch (≈ 1–1.5 GB/s on the
    development machine, against ≈ 7 GB/s for a copy into memory already touched), and a group's
    arrays are hundreds of MB that the allocator would give back to the system between groups.
    Arrays under `min_bytes` come from the allocator (which reuses small blocks itself); at most
    `limit_bytes` are held."""

    def __init__(self, limit_bytes: int, min_bytes: int = 2**18) -> None:
        self.limit_bytes, self.min_bytes = limit_bytes, min_bytes
        self.held: dict[tuple[tuple[int, ...], str], deque[np.ndarray]] = {}
        self.held_bytes = 0
        # what `_references_of_first` counts for an array nobody else holds, measured here rather
        # than assumed (how many references a call itself adds differs between Python versions)
        self.free_references = _references_of_first(deque([np.empty(1)]))

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if int(np.prod(shape)) * dtype.itemsize < self.min_bytes:
            return np.empty(shape, dtype=dtype)
        arrays = self.held.setdefault((shape, dtype.str), deque())
        for _ in range(len(arrays)):
            # oldest first: arrays are let go of in the order they were handed out
            free = _references_of_first(arrays) <= self.free_references
            arrays.rotate(-1)
            if free:
                return arrays[-1]
        array = np.empty(shape, dtype=dtype)
        if self.held_bytes + array.nbytes <= self.limit_bytes:
            arrays.append(array)
            self.held_bytes += array.nbytes
        return array


def _references_of_first(arrays: deque[np.ndarray]) -> int:
    array = arrays[0]
    return sys.getrefcount(array)


_POOL = _ArrayPool(limit_bytes=2 * 2**30)  # per process; about two groups of SD1.5-sized rows


class _GroupArrays:
    """The large arrays a group is gathered into (see `read_micro_batch_group`): G per-micro-batch
    arrays of their own, or one array with the micro-batch as leading axis — in a loader worker
    always the latter, in shared memory, so sending the group to the trainer copies nothing (a
    private array is copied into shared memory when a worker sends it), and from the worker's
    slots (`_SharedSlots`), so the memory is reused once the trainer hands it back. `empty`
    returns what `CacheStore.gather_rows` fills: the list of G arrays, or the one array seen as
    G·n rows."""

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.shared = torch.utils.data.get_worker_info() is not None
        self._whole: list[tuple[np.ndarray, torch.Tensor]] = []

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | list[np.ndarray]:
        dtype = np.dtype(dtype)
        if not self.shared and int(np.prod(shape)) * dtype.itemsize >= _POOL.min_bytes:
            return [_POOL.empty(shape, dtype) for _ in range(self.groups)]
        if self.shared:
            tensor = _worker_slots().take((self.groups, *shape), dtype)
        else:
            tensor = torch.from_numpy(np.empty((self.groups, *shape), dtype=dtype))
        rows = tensor.numpy().reshape(self.groups * shape[0], *shape[1:])
        self._whole.append((rows, tensor))
        return rows

    def adopt(self, values: torch.Tensor) -> torch.Tensor:
        """`values` as one contiguous tensor; in a worker, copied into one of its shared slots
        (a copy into memory already touched costs less than the fresh shared memory the worker
        would otherwise send it in)."""
        if not self.shared:
            return values.contiguous()
        slot = _worker_slots().take(tuple(values.shape), np.dtype(str(values.dtype).removeprefix("torch.")))
        return slot.copy_(values)

    def tensors(self, target: np.ndarray | list[np.ndarray], storage_dtype: str) -> torch.Tensor | list[torch.Tensor]:
        """`stored_tensor` of what `empty` returned: one tensor (micro-batch first), or one per part."""
        for rows, tensor in self._whole:
            if rows is target:
                return tensor.view(torch.bfloat16) if storage_dtype == "bfloat16" and tensor.dtype == torch.uint16 \
                    else tensor
        assert isinstance(target, list)
        return [stored_tensor(part, storage_dtype) for part in target]


_use_count = getattr(torch._C, "_storage_Use_Count", None)  # None: slots are never reused


class _SharedSlots:
    """A loader worker's shared-memory arrays, reused across groups instead of made anew, and
    what a group crosses to the trainer as (`encode`; the trainer's side is `_SlotReturns`).

    Fresh shared memory costs a page fault per 4 KiB on first touch, in the worker that fills it
    and again in the trainer that maps it (≈ 1–1.5 GB/s on the development machine: 0.2 s per
    250 MB SD1.5 group, more than reading it), and each shared array sent costs a file
    descriptor's hand-over (a connection and a handshake, ≈ 0.2 ms). So a group's large arrays
    are read into slots that the trainer maps once, when a slot is new, and afterwards names by
    number; small arrays travel inline in the message. A slot is taken here (its flag set) and
    handed back by the trainer once nothing there refers to it any more (its flag cleared, in
    memory both processes share). A worker never waits for a hand-back: with no free slot of the
    shape it needs it makes one (in place of a free slot of another shape once `MAX_SLOTS` are
    held), and with every slot in the trainer's hands a one-off array, sent as torch sends any."""

    MAX_SLOTS = 16  # a group takes at most 4 (latents, targets, text, pooled): 4 groups' worth

    def __init__(self) -> None:
        self.flags = torch.zeros(self.MAX_SLOTS, dtype=torch.uint8).share_memory_()
        self.slots: list[tuple[tuple[tuple[int, ...], str], torch.Tensor]] = []
        self.new: dict[int, torch.Tensor] = {}  # slots the trainer has not mapped yet
        self.flags_sent = False

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
        if _use_count is None:  # nothing is ever handed back: every group in fresh memory
            return _new_shared(shape, dtype)
        key = (tuple(shape), dtype.str)
        flags = self.flags.numpy()
        free = [index for index in range(len(self.slots)) if flags[index] == 0]
        matching = [index for index in free if self.slots[index][0] == key]
        if matching:
            index = matching[0]
        else:
            tensor = _new_shared(shape, dtype)
            if len(self.slots) < self.MAX_SLOTS:
                index = len(self.slots)
                self.slots.append((key, tensor))
            elif free:
                # a free slot of another shape (an epoch's shorter last group, say) makes room
                index = free[0]
                self.slots[index] = (key, tensor)
            else:
                return tensor  # every slot is still in the trainer's hands: a one-off array
            self.new[index] = tensor
        flags[index] = 1
        return self.slots[index][1]

    def encode(self, group: dict[str, Any]) -> dict[str, Any]:
        """The message a group crosses to the trainer as: each value in a slot as (slot, dtype,
        shape, stride, offset), each small one as a numpy array (pickled inline), one-off arrays
        as they are; the slots the trainer has not mapped, and on the first message the flags."""
        where = {tensor.untyped_storage().data_ptr(): index for index, (_key, tensor) in enumerate(self.slots)}
        flags = self.flags.numpy()
        values: dict[str, Any] = {}
        for name, value in group.items():
            slot = where.get(value.untyped_storage().data_ptr()) if value.numel() else None
            if slot is not None and flags[slot]:
                values[name] = ("slot", slot, value.dtype, tuple(value.shape), value.stride(), value.storage_offset())
            elif value.nbytes < _POOL.min_bytes and value.dtype != torch.bfloat16:
                values[name] = ("inline", value.numpy())
            else:
                values[name] = ("tensor", value)
        message = {"worker": torch.utils.data.get_worker_info().id, "values": values, "new_slots": self.new}
        self.new = {}
        if not self.flags_sent:
            message["flags"], self.flags_sent = self.flags, True
        return message


def _new_shared(shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    """An array in shared memory from the start (as torch's own collate makes one in a worker)."""
    like = torch.from_numpy(np.empty(0, dtype=dtype))
    return like.new(like.untyped_storage()._new_shared(int(np.prod(shape)) * dtype.itemsize)).view(*shape)


_SLOTS: _SharedSlots | None = None


def _worker_slots() -> _SharedSlots:
    global _SLOTS
    if _SLOTS is None:
        _SLOTS = _SharedSlots()
    return _SLOTS


class _SlotReturns:
    """The trainer's side of `_SharedSlots`: each worker's slots, mapped once and kept mapped; a
    message decoded into the group's tensors; a group's slots handed back to their worker once
    no tensor refers to them any more (the storage's use count, which every tensor, view and
    numpy array of it raises — autograd's saved tensors included — is back to the one that
    holding the storage object here accounts for). What the count cannot see: a caller keeping
    only `tensor.untyped_storage()` (the same object as the one held here), or sending a yielded
    tensor on to another process; nothing in inpo does either. Where the count does not behave as
    measured here (1 for a storage held by its object alone), no slot is ever handed back and the
    worker makes one-off arrays, as before slots."""

    def __init__(self) -> None:
        self.flags: dict[int, np.ndarray] = {}  # worker: its slots' flags
        self.mapped: dict[tuple[int, int], Any] = {}  # (worker, slot): its storage
        self.pending: list[tuple[np.ndarray, list[int], list[Any]]] = []
        probe = torch.empty(1).untyped_storage()
        self.reusable = _use_count is not None and _use_count(probe._cdata) == 1

    def decode(self, message: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "values" not in message:
            return message  # read in this process
        worker = message["worker"]
        if "flags" in message:
            self.flags[worker] = message["flags"].numpy()
        for slot, tensor in message["new_slots"].items():
            self.mapped[(worker, slot)] = tensor.untyped_storage()
        group: dict[str, torch.Tensor] = {}
        slots, storages = [], []
        for name, (kind, *value) in message["values"].items():
            if kind == "slot":
                slot, dtype, shape, stride, offset = value
                storage = self.mapped[(worker, slot)]
                group[name] = torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride)
                slots.append(slot)
                storages.append(storage)
            else:
                group[name] = torch.from_numpy(value[0]) if kind == "inline" else value[0]
        if slots:
            self.pending.append((self.flags[worker], slots, storages))
        return group

    def hand_back(self) -> None:
        if not self.reusable:
            return
        still = []
        for flags, slots, storages in self.pending:
            if all(_use_count(storage._cdata) == 1 for storage in storages):
                flags[slots] = 0
            else:
                still.append((flags, slots, storages))
        self.pending = still


def _row_inputs(objective: str) -> str:
    return "inversion" if OBJECTIVES[objective].inputs == INVERSION_INPUTS else "forward"


def denoiser_inputs(batch: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> dict[str, Any]:
    """A loader micro-batch as the denoiser takes it, on `device`: latents, targets, text and
    pooled in float32 (exact: they were stored in a narrower float), the prompts repeated for the
    rejected images; the other entries moved as they are."""
    copies = len(batch["latents"]) // len(batch["rows"])
    widened = {"latents": 1, "targets": 1, "text": copies, "pooled": copies}  # name: copies on the device
    inputs: dict[str, Any] = {name: None if value is None else value.to(device)
                              for name, value in batch.items() if name not in widened}
    for name, repeats in widened.items():
        if batch.get(name) is not None:
            value = batch[name].to(device).float()
            inputs[name] = value.repeat(repeats, *([1] * (value.dim() - 1))) if repeats > 1 else value
    return inputs


def stored_tensor(values: np.ndarray, storage_dtype: str) -> torch.Tensor:
    """A tensor of the values as stored (bfloat16 from its raw 16 bits); float32 arrays (the
    computed inputs of the forward objectives) pass through."""
    values = np.ascontiguousarray(values)
    if values.dtype == np.uint16 and storage_dtype == "bfloat16":
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batches `start`, … `start + count − 1` of a schedule, in read groups: item i is the
    list of consecutive micro-batches that one read of the store serves (see
    `BatchSchedule.group_of`); the loader hands them out one at a time.

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
        self.groups: list[range] = []
        index, stop = start, start + count
        while index < stop:
            group = schedule.group_of(index)
            self.groups.append(range(index, min(group.stop, stop)))
            index = self.groups[-1].stop
        self._store: CacheStore | None = None

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        """The group's micro-batches, one tensor per key with the micro-batch as leading axis (so
        one tensor per key crosses from a worker); `micro_batch_loader` hands them out one by one."""
        if self._store is None:
            self._store = CacheStore.open(self.store_path)
            self.process = self.process or process_from_settings(self._store.settings)  # once, not per group
        picks = [self.schedule.micro_batch(index)[:2] for index in self.groups[item]]
        group = read_micro_batch_group(self._store, picks, self.objective, self.process)
        return _worker_slots().encode(group) if torch.utils.data.get_worker_info() is not None else group

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None
        return state


def micro_batch_loader(dataset: MicroBatches, num_workers: int) -> "_MicroBatchStream":
    """In-order loader of micro-batches, with spawned workers reading read groups ahead. Each
    pass starts new workers (never persistent ones: a pass left early would take messages that
    name new slots with it, and the slots they hold)."""
    extra: dict[str, Any] = {}
    if num_workers > 0:
        # an item is a whole read group (a rank's share of a shuffle window): one ahead per worker
        extra = {"multiprocessing_context": "spawn", "persistent_workers": False, "prefetch_factor": 1}
    return _MicroBatchStream(torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, collate_fn=_as_is,
                                                      num_workers=num_workers, **extra))


def _as_is(item: Any) -> Any:
    """The DataLoader's collate step, which leaves a worker's message as it is (its default would
    turn the inline numpy arrays back into tensors, each sent through a shared-memory file)."""
    return item


class _MicroBatchStream:
    """Iterates a DataLoader of read groups and yields their micro-batches one by one: decodes
    the workers' messages, hands their slots back (`_SlotReturns`), and lets a StoreError raised
    in a worker come back as its own one line (PyTorch re-raises it with the worker's whole
    traceback in the message)."""

    def __init__(self, loader: torch.utils.data.DataLoader) -> None:
        self.loader = loader
        self.slots_mapped = 0  # how many worker slots the last pass mapped

    def __iter__(self) -> Any:
        returns = _SlotReturns()  # new workers, new slots
        try:
            for message in self.loader:
                group = returns.decode(message)
                del message
                for index in range(len(group["rows"])):
                    returns.hand_back()
                    yield {name: values[index] for name, values in group.items()}
                del group
                returns.hand_back()
            # the slots' memory goes with the workers (a held micro-batch keeps its own storage)
            self.slots_mapped = len(returns.mapped)
            del returns
        except StoreError as error:
            lines = [line for line in str(error).splitlines() if line.strip()]
            raise StoreError(lines[-1].split("StoreError: ", 1)[-1] if lines else str(error)) from None
