"""The allocation tracker sees what an op allocates, for as long as it lives, and nothing else."""

import torch

from headforcing_core.memtrack import AllocationTracker

MIB = 2**20


def test_a_planted_allocation_is_seen_and_its_free_too():
    with AllocationTracker() as t:
        planted = torch.empty(3 * MIB, dtype=torch.uint8)
        assert t.live == 3 * MIB and t.peak == 3 * MIB
        assert t.at_peak[0].nbytes == 3 * MIB and t.at_peak[0].op == "empty"
        del planted
        assert t.live == 0
        small = torch.zeros(MIB // 4, dtype=torch.uint8)
    assert t.peak == 3 * MIB  # the peak stays; the later, smaller allocation does not raise it
    assert t.live == MIB // 4 and small.numel() == MIB // 4


def test_views_in_place_ops_and_tensors_made_before_are_not_allocations():
    before = torch.ones(MIB // 4)  # 1 MiB of float32, made before the tracker: never counted
    with AllocationTracker() as t:
        view = before[10:].view(-1, 2)
        before.add_(1)
        out = torch.add(before, 1, out=torch.empty_like(before))  # counted once: the empty_like
        assert t.live == MIB
        del out
        y = before * 2  # a new storage
        assert t.live == MIB
    assert t.peak == MIB and view.shape[1] == 2 and y.numel() == MIB // 4


def test_phases_record_their_own_peak_and_the_bytes_held_when_they_start():
    with AllocationTracker() as t:
        held = torch.empty(MIB, dtype=torch.uint8)
        with t.phase("plan"):
            tmp = torch.empty(2 * MIB, dtype=torch.uint8)
            del tmp
        with t.phase("model_calls"):
            with t.phase("inner"):
                inner = torch.empty(MIB // 2, dtype=torch.uint8)
            del inner
    report = t.report()
    assert report["phases"]["plan"] == {"peak_bytes": 3 * MIB, "entered_with_bytes": MIB, "calls": 1}
    assert report["phases"]["model_calls"]["peak_bytes"] == MIB + MIB // 2
    assert report["phases"]["inner"]["peak_bytes"] == MIB + MIB // 2
    assert report["peak_bytes"] == 3 * MIB and held.numel() == MIB
    assert report["largest_at_peak"][0]["phase"] == "plan"


def test_only_the_asked_device_counts():
    with AllocationTracker(device="cuda") as t:
        torch.empty(MIB, dtype=torch.uint8)
    assert t.peak == 0
