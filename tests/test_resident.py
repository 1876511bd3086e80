"""feeds.py: batches from the packed cache without a DataLoader are the DataLoader's batches, byte for byte."""
import contextlib
import threading

import pytest
import torch

import common
from helico import feeds, packed_cache
from helico.sampling import EpochSampler
from test_cache import copy_mini_root

SIZE = 32


@pytest.fixture(scope="module")
def mini(demo_root, tmp_path_factory):
    """(root, cache dir, samples) of a few demo patients, one PNG broken (recorded as a bad row)."""
    root = copy_mini_root(demo_root, tmp_path_factory.mktemp("mini") / "HelicoDataSet")
    samples = packed_cache.unique_samples(common.load_data(root).all_samples())
    (root / samples[5].path).write_bytes(b"not a png")
    cache = tmp_path_factory.mktemp("cache") / "c"
    packed_cache.build_cache(common.load_data(root), cache, SIZE, workers=2, progress=False)
    return root, cache, samples


def dataset(mini, skip_bad=True, part=slice(None)):
    root, cache, samples = mini
    return packed_cache.CachedPatchDataset(cache, samples[part], SIZE, root=root, skip_bad=skip_bad)


def loader_batches(ds, sampler, batch_size, drop_last, workers=0):
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                         num_workers=workers)
    return [(x.clone(), y.clone(), i.clone()) for x, y, i in loader]


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for (x, y, i), (wx, wy, wi) in zip(got, want):
        assert x.dtype == torch.uint8 and torch.equal(x.cpu(), wx)
        assert torch.equal(y.cpu(), wy) and torch.equal(i.cpu(), wi)


def both_paths(train, val, sampler, val_indices, batch_size=8, drop_last=True):
    """(resident, streamed) (train, val) pairs over the same datasets on the CPU."""
    resident_path = feeds.cache_batches(train, sampler, val, val_indices, batch_size, drop_last, "cpu", 0.5)
    streamed_path = feeds.cache_batches(train, sampler, val, val_indices, batch_size, drop_last, "cpu", 0.0)
    assert isinstance(resident_path[0], feeds.ResidentBatches) and "resident on cpu" in resident_path[2]
    assert isinstance(streamed_path[0], feeds.StreamedBatches) and "streamed" in streamed_path[2]
    return resident_path, streamed_path


@pytest.mark.parametrize("drop_last", [True, False])
def test_training_batches_equal_the_dataloaders_epoch_after_epoch(mini, drop_last):
    train, val = dataset(mini, part=slice(0, 40)), dataset(mini, part=slice(40, None))
    sampler = EpochSampler([s.label for s in train.samples], balanced=False, seed=3)
    for path in both_paths(train, val, sampler, range(len(val)), drop_last=drop_last):
        assert len(path[0]) == len(torch.utils.data.DataLoader(train, batch_size=8, sampler=sampler,
                                                               drop_last=drop_last))
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            want = loader_batches(train, sampler, 8, drop_last, workers=2)
            sampler.set_epoch(epoch)
            assert_same_batches(list(path[0]), want)


def test_resumed_epoch_skips_the_same_samples(mini):
    train, val = dataset(mini, part=slice(0, 40)), dataset(mini, part=slice(40, None))
    sampler = EpochSampler([s.label for s in train.samples], balanced=True, seed=0)
    sampler.set_epoch(1, skip=16)
    want = loader_batches(train, sampler, 8, True)
    for path in both_paths(train, val, sampler, range(len(val))):
        assert_same_batches(list(path[0]), want)


def test_validation_shard_batches_equal_a_subset_loader(mini):
    train, val = dataset(mini, part=slice(0, 30)), dataset(mini, part=slice(30, None))
    shard = list(range(len(val)))[1::2]  # rank 1 of 2
    want = loader_batches(torch.utils.data.Subset(val, shard), None, 8, False)
    for path in both_paths(train, val, list(range(len(train))), shard):
        assert_same_batches(list(path[1]), want)


def test_only_the_needed_patches_are_held(mini):
    root, cache, samples = mini
    train, val = dataset(mini, part=slice(0, 20)), dataset(mini, part=slice(20, 40))
    shard = [0, 3, 7]
    batches = feeds.cache_batches(train, list(range(20)), val, shard, 4, False, "cpu", 0.5)[0]
    assert batches.images.shape == (23, 3, SIZE, SIZE)  # 20 training + 3 validation patches, not the whole cache
    assert len(samples) > 40


def test_undecodable_patch_is_bad_label_when_skipping_else_the_loaders_error(mini):
    train, val = dataset(mini, part=slice(0, 16)), dataset(mini, part=slice(16, None))
    for path in both_paths(train, val, list(range(16)), [0]):
        labels = torch.cat([y for _, y, _ in path[0]])
        assert labels[5] == common.BAD and (torch.cat([labels[:5], labels[6:]]) != common.BAD).all()
    strict = dataset(mini, skip_bad=False, part=slice(0, 16))
    for path in both_paths(strict, val, list(range(16)), [0]):
        batches = iter(path[0])
        with pytest.raises(common.DataError, match=mini[2][5].path):  # the first batch holds it
            next(batches)


def test_streaming_stopped_early_leaves_no_reading_thread(mini):
    train, val = dataset(mini, part=slice(0, 40)), dataset(mini, part=slice(40, None))
    streamed = feeds.cache_batches(train, list(range(40)), val, [0], 4, True, "cpu", 0.0)[0]
    before = threading.active_count()
    batches = iter(streamed)
    next(batches)
    batches.close()
    assert threading.active_count() == before
    for _ in feeds.Prefetched(streamed, lambda x, y, i: (x, y), torch.Generator(), "cpu"):
        break  # train.py's stop: the streamed feed under the prefetcher ends its thread too
    assert threading.active_count() == before


def draw_batches(n=5):
    """(batches, prepare): prepare draws from the generator it is given, as augmentation does."""
    batches = [(torch.full((2, 1), float(k)), torch.tensor([k, k]), torch.tensor([2 * k, 2 * k + 1]))
               for k in range(n)]

    def prepare(gen):
        return lambda x, y, i: (x + torch.rand(x.shape, generator=gen), y)
    return batches, prepare


def test_prefetched_input_is_the_serial_loops_and_a_break_leaves_the_generator_as_the_serial_loop_would():
    batches, prepare = draw_batches()
    serial_gen = torch.Generator().manual_seed(7)
    serial = [prepare(serial_gen)(*b) for b in batches]
    gen = torch.Generator().manual_seed(7)
    fed = feeds.Prefetched(batches, prepare(gen), gen, "cpu")
    assert len(fed) == 5
    for got, want in zip(fed, serial):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    fed.close()  # nothing pending after a whole epoch: a no-op
    assert torch.equal(gen.get_state(), serial_gen.get_state())
    # a stop after 2 batches: the third was prepared (drawn) already; close() takes its draws back
    gen, after_two = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for b in batches[:2]:
        prepare(after_two)(*b)
    fed = feeds.Prefetched(batches, prepare(gen), gen, "cpu")
    for k, _ in enumerate(fed):
        if k == 1:
            assert not torch.equal(gen.get_state(), after_two.get_state())  # batch 3 drawn ahead
            break
    fed.close()
    assert torch.equal(gen.get_state(), after_two.get_state())
    again = [x for x, _ in feeds.Prefetched(batches[2:], prepare(gen), gen, "cpu")]  # the resumed epoch
    assert all(torch.equal(a, b[0]) for a, b in zip(again, serial[2:]))


def test_prefetched_on_cuda_prepares_the_next_batch_on_its_own_stream_before_the_step_and_hands_it_over(monkeypatch):
    # imitates the CUDA branch: what is queued on which stream, in which order
    log = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append(f"{self.name} waits for {other.name}")

        def wait_event(self, event):
            log.append(f"{self.name} waits for {event}")

    side, compute, current = Stream("side"), Stream("compute"), []

    class Event:
        def record(self, stream):
            self.name = f"ready {len([e for e in log if e.startswith('prepare')]) - 1}"
            log.append(f"{self.name} on {stream.name}")

        def __repr__(self):
            return self.name

    @contextlib.contextmanager
    def on(stream):
        current.append(stream)
        yield
        current.pop()

    class Out:
        def __init__(self, k):
            self.k = k

        def record_stream(self, stream):
            log.append(f"batch {self.k} used on {stream.name}")

    def prepare(x, y, i):
        log.append(f"prepare {int(x[0, 0])} on {current[-1].name if current else 'compute'}")
        torch.rand(1, generator=gen)
        return (Out(int(x[0, 0])),)

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1] if current else compute)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    gen = torch.Generator()
    for (out,) in feeds.Prefetched(draw_batches(3)[0], prepare, gen, torch.device("cuda", 1)):
        log.append(f"step {out.k} on compute")
    assert log == ["side waits for compute",
                   "prepare 0 on side", "ready 0 on side",
                   "compute waits for ready 0", "batch 0 used on compute",
                   "prepare 1 on side", "ready 1 on side", "step 0 on compute",  # batch 1 made while step 0 runs
                   "compute waits for ready 1", "batch 1 used on compute",
                   "prepare 2 on side", "ready 2 on side", "step 1 on compute",
                   "compute waits for ready 2", "batch 2 used on compute", "step 2 on compute"]


def test_free_memory_on_the_cpu_is_the_hosts_available_memory():
    free = feeds.free_bytes(torch.device("cpu"))
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < free <= total


def test_copy_event_is_recorded_on_the_target_devices_stream_not_the_current_devices(monkeypatch):
    # evaluate.py --device cuda:1 never makes cuda:1 current: an event on cuda:0's stream would complete at once
    # and the reading thread would refill a pinned buffer whose copy to cuda:1 is still in flight.
    calls = []

    class FakeEvent:
        def record(self, stream=None):
            calls.append(("record", stream))

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {device}")
    event = feeds.copied_event(torch.device("cuda", 1))
    assert isinstance(event, FakeEvent) and calls == [("record", "stream of cuda:1")]


def test_free_cuda_memory_counts_pytorchs_cached_but_unused_blocks(monkeypatch):
    # a checkpoint scored before (evaluate.py --compare/--cv) leaves its memory reserved by PyTorch's allocator:
    # CUDA calls it used, yet the next checkpoint's patches may take it
    asked = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: asked.append(d) or (10 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: asked.append(d) or 30 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: asked.append(d) or 4 << 30)
    gpu = torch.device("cuda", 1)
    assert feeds.free_bytes(gpu) == (10 + 30 - 4) << 30
    assert asked == [gpu] * 3


def test_streamed_batches_queue_the_next_copy_before_handing_over_the_current_one(mini):
    # SideStreamCopier's calls, imitated on the CPU: batch k+1's copy is queued (on its own CUDA stream) before
    # batch k is handed to the step, so the copy overlaps the step; a slot is refilled only after its copy's event
    log, synced = [], []

    class Event:
        def synchronize(self):
            synced.append(1)

    class Copier:
        def start(self, tensors):
            log.append(("copy", int(tensors[2][0])))
            return tuple(t.clone() for t in tensors), Event()

        def hand_over(self, tensors, copied):
            log.append(("hand over", int(tensors[2][0])))

    ds = dataset(mini, part=slice(0, 40))
    got = []
    for images, labels, ids in feeds.StreamedBatches(ds, list(range(40)), 8, False, "cpu", depth=2, copier=Copier()):
        log.append(("step", int(ids[0])))
        got.append((images, labels, ids))
    assert_same_batches(got, loader_batches(ds, list(range(40)), 8, False))
    first = [0, 8, 16, 24, 32]
    assert log[:2] == [("copy", 0), ("copy", 8)] and log[-2:] == [("hand over", 32), ("step", 32)]
    for k, b in enumerate(first[:-2]):
        assert log[2 + 3 * k:5 + 3 * k] == [("hand over", b), ("step", b), ("copy", first[k + 2])]
    assert len(synced) == len(first) - 2  # depth 2: every slot after the first two is refilled after its copy
