"""DataLoader workers for every script: how they start, how their errors reach the user, and how they stop.

    from helico import loaders
    loader = loaders.make_loader(dataset, batch_size=128, workers=4, sampler=sampler, persistent=True)
    try:
        for images, labels, idx in loader:   # a DataError in a worker is raised here as itself: one line
            ...
    finally:
        loaders.stop_workers()               # in main(): after errors, Ctrl-C, signals and normal ends alike

Why this is one module:
- Workers ignore SIGTERM, SIGUSR1 and SIGINT. SLURM signals every process of the job at preemption and a
  terminal's Ctrl-C reaches the whole foreground group; a worker killed by either would crash the main process
  before it writes last.pt. The main process alone decides when workers stop.
- The flip side: only SIGKILL ends such a worker, and Python's exit joins every child process. An error that
  left workers alive (their iterator kept by a traceback or a persistent loader) would hang for ever.
  stop_workers() closes every worker this process started, the way DataLoader does it when an iterator is
  deleted, then SIGKILLs what is left.
- An exception raised in a worker crosses to the main process as a formatted traceback (text). A DataError is
  carried as a value instead (WorkerFailure) and raised again in the main process with its own one-line message.
"""
from __future__ import annotations

import signal
import weakref

import torch

from common import DataError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # the main process handles these for its workers
_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()  # multi-process iterators of this process that may hold workers


def ignore_stop_signals(worker_id: int) -> None:
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class WorkerFailure:
    """A bad input met in a worker, carried back as a batch (a value, not a traceback)."""

    def __init__(self, message: str):
        self.message = message


class _Carrying(torch.utils.data.Dataset):
    """Wraps a dataset so that a DataError while fetching a batch becomes a WorkerFailure batch."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        return self.__getitems__([idx])[0]

    def __getitems__(self, indices):
        try:
            batch = getattr(self.dataset, "__getitems__", None)  # CachedPatchDataset gathers a batch at once
            return list(batch(indices)) if callable(batch) else [self.dataset[i] for i in indices]
        except DataError as e:
            return [WorkerFailure(str(e))]


def _collate(items):
    first = items[0] if items else None
    return first if isinstance(first, WorkerFailure) else torch.utils.data.default_collate(items)


class Loader(torch.utils.data.DataLoader):
    """A DataLoader whose worker errors are one-line DataErrors and whose workers stop_workers() can reach."""

    def __iter__(self):
        it = super().__iter__()
        if self.num_workers > 0:
            _ITERATORS.add(it)
        for batch in it:
            if isinstance(batch, WorkerFailure):
                raise DataError(batch.message)
            yield batch


def make_loader(dataset, *, batch_size: int, workers: int, sampler=None, shuffle: bool = False,
                drop_last: bool = False, pin_memory: bool = False, persistent: bool = False,
                prefetch_factor: int | None = None, seed: int | None = None) -> Loader:
    """The one way the scripts build a DataLoader (uint8 images, label, index items of common.PatchDataset or
    packed_cache.CachedPatchDataset). `seed` gives the loader its own RNG, so the global one stays resumable."""
    return Loader(_Carrying(dataset), batch_size=batch_size, sampler=sampler, shuffle=shuffle, num_workers=workers,
                  collate_fn=_collate, pin_memory=pin_memory, drop_last=drop_last,
                  persistent_workers=persistent and workers > 0, worker_init_fn=ignore_stop_signals,
                  prefetch_factor=(prefetch_factor or 2) if workers > 0 else None,
                  generator=torch.Generator().manual_seed(seed) if seed is not None else None)


def stop_workers() -> None:
    """End every DataLoader worker of this process now: DataLoader's own shutdown (tell, join with a timeout,
    unregister from its SIGCHLD watch), then SIGKILL for any that ignored it. Safe to call twice."""
    for it in list(_ITERATORS):
        workers = list(getattr(it, "_workers", []))
        try:
            it._shutdown_workers()  # private, but the only way to reach a persistent loader's workers early
        finally:
            for w in workers:
                if w.is_alive():
                    w.kill()
                    w.join(timeout=5)
        _ITERATORS.discard(it)
