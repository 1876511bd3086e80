"""Batches from the packed cache without a DataLoader: the patches held on the device, or streamed from the memmap.

    from helico import feeds
    train_b, val_b, how = feeds.cache_batches(train_ds, sampler, val_ds, shard, batch_size, drop_last, device,
                                                  max_frac=0.5)
    for images, labels, idx in train_b: ...     # uint8 (B, 3, H, W), int64 labels and sample indices on `device`

Why: a DataLoader copies every batch into shared memory, pickles it to the main process and copies it again (pinned
memory, then the device); fifteen workers delivered less than one process gathering from the memmap.
Here the patches the run needs (training set + this rank's validation shard, never the HoldOut or other patients)
are loaded once, by the same memmap gather, into ONE uint8 tensor on the device when it takes at most `max_frac` of
the device's free memory (CUDA: mem_get_info plus PyTorch's cached-but-unused blocks; CPU: MemAvailable), and each
batch is one index_select there: no workers, no host copy per step (the epoch's order goes to the device once per
epoch). When it does not fit, StreamedBatches gathers each batch on a reading thread straight into pinned host
buffers (no pickling, no shared memory) while the main thread trains on the previous one; on CUDA the next batch's
copy runs on a stream of its own while the current step computes (SideStreamCopier).

Prefetched makes each training batch's model input one batch ahead of the step (on CUDA on a stream of its own),
with the augmentation generator rewound on a stop as if that batch had not been drawn.

Same batches as DataLoader(dataset, sampler=sampler, batch_size, drop_last) over packed_cache.CachedPatchDataset:
same order (whatever the sampler yields, epoch by epoch), same bytes, same labels (common.BAD for undecodable
patches, or the same one-line DataError without --skip-bad-images), same sample indices; so training gives bitwise
the same weights as the DataLoader path on the same seed.

DDP: every rank holds the WHOLE training set, because sampling.EpochSampler (like DistributedSampler) deals the
shuffled order out to the ranks anew each epoch, so any rank may need any patch; holding a fixed shard would change
the order and lose bitwise equality with the DataLoader path. Validation shards are fixed (rank::world), so each rank
holds only its own.
"""
from __future__ import annotations

import contextlib
import math
import os
import queue
import threading

import numpy as np
import torch

import common
from helico import packed_cache

DEFAULT_MAX_FRAC = 0.5  # share of free device memory the patches may take: the rest is the model's (activations...)
LOAD_ROWS = 256  # rows per host->device copy while loading (50 MB at 256 px)
STREAM_DEPTH = 4  # pinned batches in flight on the host path: one handed over, one being copied, two being gathered


def free_bytes(device: torch.device) -> int:
    """Free memory of the device: CUDA's own count plus what PyTorch's caching allocator holds unused (a checkpoint
    scored before, evaluate.py --compare/--cv, left it reserved: free to us, not to CUDA); on the CPU, MemAvailable."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def copied_event(device: torch.device):
    """An event recorded on `device`'s current stream, where `.to(device, non_blocking=True)` queued the copy; a bare
    `Event().record()` goes on the CURRENT device's stream, which is not `device` when nobody set it (evaluate.py
    --device cuda:1): it completes at once and the pinned buffer is refilled while its copy still reads it."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def source_tensor(dataset) -> torch.Tensor:
    """The whole cache file as a (count, 3, H, W) uint8 CPU tensor over the memmap (copy-on-write mapping: writable
    as far as torch knows, so no warning, yet never written)."""
    s = dataset.image_size
    mm = np.memmap(dataset.cache_dir / packed_cache.PATCHES, np.uint8, "c", shape=(dataset.count, 3, s, s))
    return torch.from_numpy(mm)


class Batches:
    """DataLoader's batching of a sampler's order over a CachedPatchDataset; subclasses say where pixels come from."""

    def __init__(self, dataset, sampler, batch_size: int, drop_last: bool, device):
        self.dataset, self.sampler, self.batch_size, self.drop_last = dataset, sampler, batch_size, drop_last
        self.device = torch.device(device)
        labels = torch.tensor([s.label for s in dataset.samples], dtype=torch.long)
        self.labels = torch.where(torch.from_numpy(dataset.bad), common.BAD, labels)  # as CachedPatchDataset says

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self) -> torch.Tensor:
        """This epoch's sample indices, cut to whole batches when drop_last (the sampler draws its epoch here)."""
        order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        return order[:len(self) * self.batch_size]

    def check(self, idx: torch.Tensor) -> None:
        """Without --skip-bad-images, a batch holding an undecodable patch stops the run, as the DataLoader path does."""
        if not self.dataset.skip_bad and self.dataset.bad.size and self.dataset.bad[idx.numpy()].any():
            self.dataset.__getitems__(idx.tolist())  # raises CachedPatchDataset's own one-line DataError


class ResidentBatches(Batches):
    """Batches gathered on the device from `images`, which holds the dataset's samples at rows `position`."""

    def __init__(self, dataset, sampler, batch_size, drop_last, device, images: torch.Tensor, position: np.ndarray):
        super().__init__(dataset, sampler, batch_size, drop_last, device)
        self.images = images
        self.position = torch.from_numpy(position).to(self.device)
        self.device_labels = self.labels.to(self.device)

    def __iter__(self):
        order = self.order()
        on_device = order.to(self.device)  # one copy per epoch, not per step
        for k in range(0, len(order), self.batch_size):
            idx = order[k:k + self.batch_size]
            self.check(idx)
            i = on_device[k:k + self.batch_size]
            yield self.images.index_select(0, self.position[i]), self.device_labels[i], i


class SideStreamCopier:
    """CUDA: pinned host batches copied to the device on a stream of their own, so batch k+1's copy runs while step
    k computes (a copy queued on the compute stream waits for the step and the step for it). The compute stream
    waits for a batch's copy only when the batch is handed over, and the caching allocator is told the batch is
    used there (record_stream), so its memory is not reused while the step still reads it."""

    def __init__(self, device):
        self.device, self.stream = device, torch.cuda.Stream(device)

    def start(self, tensors):
        """Queue the copies; (device tensors, the event the reading thread waits on before refilling the slot)."""
        with torch.cuda.stream(self.stream):
            out = tuple(t.to(self.device, non_blocking=True) for t in tensors)
            return out, copied_event(self.device)  # recorded on self.stream: current on this device here

    def hand_over(self, tensors, copied):
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)
        for t in tensors:
            t.record_stream(compute)


class StreamedBatches(Batches):
    """Batches gathered from the memmap by a reading thread into pinned host buffers, copied to the device
    asynchronously: the host fallback when the patches do not fit on the device. Nothing is pickled; at most
    `depth` batches are in flight (host memory stays bounded however large the cache)."""

    def __init__(self, dataset, sampler, batch_size, drop_last, device, depth: int = STREAM_DEPTH, copier=None):
        super().__init__(dataset, sampler, batch_size, drop_last, device)
        if depth < 2:  # one slot is the batch handed over, one the next batch being copied
            raise ValueError(f"StreamedBatches needs depth >= 2, got {depth}")
        self.rows, self.depth, self.copier = torch.from_numpy(dataset.rows), depth, copier  # copier: tests only

    def __iter__(self):
        order, cuda, n = self.order(), self.device.type == "cuda", self.batch_size
        source, size = source_tensor(self.dataset), self.dataset.image_size
        # CUDA: reused pinned slots (images, labels, indices), so every copy to the device is truly asynchronous
        slots = [(torch.empty((n, 3, size, size), dtype=torch.uint8, pin_memory=True),
                  torch.empty(n, dtype=torch.long, pin_memory=True), torch.empty(n, dtype=torch.long, pin_memory=True))
                 for _ in range(self.depth)] if cuda else []
        free, ready, stop = queue.Queue(), queue.Queue(), threading.Event()
        for k in range(self.depth):
            free.put((k, None))

        def read():  # torch releases the GIL in index_select: this thread gathers while the main one trains
            try:
                for start in range(0, len(order), n):
                    k, copied = free.get()  # a slot the consumer is done with
                    if stop.is_set():
                        return
                    if copied is not None:
                        copied.synchronize()  # its copy to the device has finished: refill it
                    idx = order[start:start + n]
                    if cuda:
                        images, labels, ids = (t[:len(idx)] for t in slots[k])
                        ids.copy_(idx)
                    else:  # on the CPU the batch is the training input itself: fresh tensors each time
                        images, labels, ids = torch.empty((len(idx), 3, size, size), dtype=torch.uint8), \
                            torch.empty(len(idx), dtype=torch.long), idx
                    torch.index_select(source, 0, self.rows[idx], out=images)
                    torch.index_select(self.labels, 0, idx, out=labels)
                    ready.put((k, images, labels, ids, idx))
                ready.put(None)
            except BaseException as e:  # re-raised in the main thread
                ready.put(e)

        reader = threading.Thread(target=read, name="cache-stream", daemon=True)
        reader.start()
        copier = self.copier or (SideStreamCopier(self.device) if cuda else None)
        pending = None  # the next batch: its copy already queued, so it runs while the consumer's step computes
        try:
            while True:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                queued = None
                if item is not None:
                    k, images, labels, ids, idx = item
                    tensors, copied = copier.start((images, labels, ids)) if copier else ((images, labels, ids), None)
                    queued = (k, tensors, copied, idx)
                if pending is not None:
                    k, tensors, copied, idx = pending
                    self.check(idx)
                    if copier:
                        copier.hand_over(tensors, copied)
                    yield tensors
                    free.put((k, copied))  # asked for the next batch: this one's slot may be refilled
                if queued is None:
                    break
                pending = queued
        finally:
            stop.set()
            for _ in range(self.depth):
                free.put((0, None))  # unblock a reader waiting for a slot
            reader.join()


class Prefetched:
    """Batches with their model input made one batch ahead: batch k+1's gather, Macenko, jitter, symmetry and ImageNet
    normalization (`prepare`) are queued before step k, on a CUDA stream of their own, so they run while step k
    computes; on the CPU the same calls happen in the same order, one after the other.

    `prepare(images, labels, idx)` returns the tensors the step takes; they are yielded in the batches' order, so
    every draw from `gen` (augmentation) happens in the order it would without prefetching. close() rewinds `gen` to
    before the batch prepared but never handed out, so a checkpoint written after a stop saves the generator as an
    unprefetched loop would have left it, and the resumed run draws that batch's augmentation again."""

    def __init__(self, batches, prepare, gen: torch.Generator, device):
        self.batches, self.prepare, self.gen, self.device = batches, prepare, gen, torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.ahead_state = None  # gen's state before the batch prepared ahead; None when none is pending

    def __len__(self):
        return len(self.batches)

    def side(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def start(self, it):
        """Batch k+1 taken and prepared on the side stream; (its tensors, the event they are ready at) or None."""
        state = self.gen.get_state()
        with self.side():
            batch = next(it, None)
            if batch is None:
                return None
            self.ahead_state = state
            with torch.no_grad():
                out = self.prepare(*batch)
            return out, (copied_event(self.device) if self.stream is not None else None)

    def __iter__(self):
        if self.stream is not None:  # the epoch's first batch may read what the compute stream wrote before
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        it = iter(self.batches)
        try:
            ahead = self.start(it)
            while ahead is not None:
                out, ready = ahead
                self.ahead_state = None
                if ready is not None:  # the step waits for its input; its memory is not reused while the step reads
                    compute = torch.cuda.current_stream(self.device)
                    compute.wait_event(ready)
                    for t in out:
                        t.record_stream(compute)
                ahead = self.start(it)  # queued before the consumer queues step k: runs while it computes
                yield out
        finally:
            getattr(it, "close", lambda: None)()  # a streamed feed's reading thread ends here, not at garbage collection

    def close(self):
        """After a break: the generator as if the batch prepared ahead had not been drawn (no-op otherwise)."""
        if self.ahead_state is not None:
            self.gen.set_state(self.ahead_state)
            self.ahead_state = None


def load_rows(dataset, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Rows `rows` (sorted) of the cache as one uint8 tensor on `device`, read once, LOAD_ROWS at a time."""
    source, size = source_tensor(dataset), dataset.image_size
    out = torch.empty((len(rows), 3, size, size), dtype=torch.uint8, device=device)
    index = torch.from_numpy(rows)
    if device.type != "cuda":
        for a in range(0, len(rows), LOAD_ROWS):
            torch.index_select(source, 0, index[a:a + LOAD_ROWS], out=out[a:a + LOAD_ROWS])
        return out
    staging = [torch.empty((LOAD_ROWS, 3, size, size), dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    done = [None, None]
    for n, a in enumerate(range(0, len(rows), LOAD_ROWS)):
        buf, b = staging[n % 2], min(a + LOAD_ROWS, len(rows))
        if done[n % 2] is not None:
            done[n % 2].synchronize()  # its previous copy has left: refill it while the other one copies
        torch.index_select(source, 0, index[a:b], out=buf[:b - a])
        out[a:b].copy_(buf[:b - a], non_blocking=True)
        done[n % 2] = copied_event(device)
    torch.cuda.synchronize(device)
    return out


def fits(rows: np.ndarray, image_size: int, device: torch.device, max_frac: float) -> tuple[bool, str]:
    """Whether these cache rows take at most max_frac of the device's free memory, and the line that says so."""
    need, free = len(rows) * 3 * image_size ** 2, free_bytes(device)
    if need > max_frac * free:
        return False, (f"patches streamed from the host cache by a reading thread: {need / 1e9:.3g} GB exceed "
                       f"--resident-max-frac {max_frac:g} x {free / 1e9:.1f} GB free on {device}")
    return True, (f"patches resident on {device}: {need / 1e9:.3g} GB in one uint8 tensor ({len(rows)} patches, "
                  f"<= {max_frac:g} x {free / 1e9:.1f} GB free)")


def scoring_batches(dataset, batch_size: int, device, max_frac: float = DEFAULT_MAX_FRAC):
    """(batches of every sample in order, the path line): evaluate.py's scoring pass, on the device when it fits."""
    device = torch.device(device)
    rows = np.unique(dataset.rows)
    resident, how = fits(rows, dataset.image_size, device, max_frac)
    order = list(range(len(dataset)))
    if not resident:
        return StreamedBatches(dataset, order, batch_size, False, device), how
    images = load_rows(dataset, rows, device)
    return ResidentBatches(dataset, order, batch_size, False, device, images, np.searchsorted(rows, dataset.rows)), how


def cache_batches(train_ds, sampler, val_ds, val_indices, batch_size: int, drop_last: bool, device,
                  max_frac: float = DEFAULT_MAX_FRAC):
    """(training batches, validation batches, one line saying which path and why).

    The training set and the validation samples `val_indices` go on the device together if their bytes are at most
    max_frac x the device's free memory; otherwise both stream from the host (max_frac 0 forces streaming)."""
    device = torch.device(device)
    val_indices = np.asarray(val_indices, dtype=np.int64)
    rows = np.unique(np.concatenate([train_ds.rows, val_ds.rows[val_indices]]))
    resident, how = fits(rows, train_ds.image_size, device, max_frac)
    if not resident:
        return (StreamedBatches(train_ds, sampler, batch_size, drop_last, device),
                StreamedBatches(val_ds, val_indices.tolist(), batch_size, False, device), how)
    images = load_rows(train_ds, rows, device)
    positions = [np.searchsorted(rows, ds.rows) for ds in (train_ds, val_ds)]  # only looked up where held
    return (ResidentBatches(train_ds, sampler, batch_size, drop_last, device, images, positions[0]),
            ResidentBatches(val_ds, val_indices.tolist(), batch_size, False, device, images, positions[1]), how)
