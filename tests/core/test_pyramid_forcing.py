"""`pyramid_forcing` reproduces Pyramid Forcing's public code (Python AdaptiveKVCache, default config).

The expected key sets come from ``pyramid_trace.py``, a closed-form restatement written from
the reference code (no code shared with the pack's tracker or plan). docs/pyramid_forcing.md
cites the file and function behind every rule.
"""

import pytest
import torch

from headforcing_core.errors import PolicyError
from headforcing_core.policies import Cyclic, HeadLabels, Merge, PyramidRule, Stride, make_policy
from headforcing_core.rope import rotate_entries, spatial_positions

from .pyramid_trace import trace
from .retention_harness import GRID, advance, build, commit, plan_at
from .test_bad_input import expect_error_before_sampling

TYPES = ("anchor", "wave", "veil")


def policy():
    return make_policy("pyramid_forcing", labels=HeadLabels("pyramid_forcing", (TYPES,)))


def observed(plan, head, s, j, pass_):
    """The plan's key set for query frame s+j as trace tuples: (kind, frame or block, rope time)."""
    out = []
    for src, idx, role, time in plan.listing(head, j, pass_):
        if src == "block":
            out.append(("block", idx, time))
        else:
            out.append((role, idx + s if src == "chunk" else idx, time))
    return sorted(out)


@pytest.mark.parametrize("frames_per_block,total", [(3, 60), (1, 30)])
def test_every_key_set_matches_the_reference_trace(frames_per_block, total):
    """Every (head type, chunk, query frame, pass): frames / blocks and the RoPE time of each."""
    pol = policy()
    cache = build(pol, TYPES, total=total, fpb=frames_per_block)
    checked = 0
    for s in range(0, total, frames_per_block):
        plan = plan_at(cache, pol, s, frames_per_block)
        for head in TYPES:
            for j in range(frames_per_block):
                for pass_ in ("noisy", "clean"):
                    want = [(k, x, float(t)) for k, x, t in trace(head, s, frames_per_block, s + j, pass_,
                                                                  frames_per_block)]
                    got = observed(plan, head, s, j if plan.classes > 1 else 0, pass_)
                    assert got == want, (head, s, j, pass_)
                    checked += 1
        commit(cache, s, frames_per_block)
    assert checked == 3 * total * 2


def run_pyramid(to, frames_per_block=3):
    pol = policy()
    cache = build(pol, TYPES, total=to + 12, fpb=frames_per_block)
    for s in range(0, to, frames_per_block):
        advance(cache, pol, s, frames_per_block)
    return pol, cache


# ------------------------------------------------------------------------------------------
# one test per difference the issue lists


def test_difference_1_key_sets_are_read_out_per_query_frame():
    pol, cache = run_pyramid(30)
    plan = plan_at(cache, pol, 30)
    assert plan.classes == 3  # one key set per query frame of the chunk
    cyclic = [[i for k, i, _ in observed(plan, "wave", 30, j, "noisy") if k == "middle"] for j in range(3)]
    assert cyclic == [[6, 12, 18, 24], [7, 13, 19, 25], [8, 14, 20, 26]]  # phases 0, 1, 2 of frames 30, 31, 32
    sink_times = [{t for k, _, t in observed(plan, "anchor", 30, j, "noisy") if k == "sink"} for j in range(3)]
    assert sink_times == [{9.0}, {10.0}, {11.0}]


def test_difference_2_recent_window_counts_the_current_chunk():
    pol, cache = run_pyramid(30)
    plan = plan_at(cache, pol, 30)
    for head in TYPES:
        recent = sorted(i for k, i, _ in observed(plan, head, 30, 0, "noisy") if k == "recent")
        # recent 4 = one history frame + the 3-frame chunk (Anchor also keeps frame 3, difference 7)
        assert recent == ([3] if head == "anchor" else []) + [29, 30, 31, 32], head


def test_difference_3_middles_take_every_committed_frame_on_the_clean_pass():
    pol, cache = run_pyramid(30)
    plan = plan_at(cache, pol, 30)
    mids = lambda pass_: [i for k, i, _ in observed(plan, "anchor", 30, 0, pass_) if k == "middle"]  # noqa: E731
    # the stride store was fed frames 0, 6, …, 24 (sinks and recent frames included) ...
    assert mids("noisy") == [6, 12, 18, 24]
    # ... and on the clean pass frame 30 enters before the readout, evicting the oldest (6); 30 itself is
    # newer than t - 3 and so not shown
    assert mids("clean") == [12, 18, 24]
    # an entry is shown only when older than the query's recent window: 24 is hidden from t = 27
    _, cache2 = run_pyramid(27)
    p = plan_at(cache2, pol, 27)
    assert [i for k, i, _ in observed(p, "anchor", 27, 0, "noisy") if k == "middle"] == [6, 12, 18]
    assert [i for k, i, _ in observed(p, "anchor", 27, 1, "noisy") if k == "middle"] == [6, 12, 18, 24]


def test_difference_4_cyclic_keeps_one_bucket_of_four_per_phase():
    pol, cache = run_pyramid(60)
    tracker = cache.store("wave").tracker
    buckets = tracker.stores.cyclic
    assert sorted(buckets) == list(range(6))
    assert all(len(b) == 4 for b in buckets.values())
    assert buckets[0] == [36, 42, 48, 54] and buckets[5] == [41, 47, 53, 59]
    plan = plan_at(cache, pol, 60)
    for j in range(3):
        mids = [i for k, i, _ in observed(plan, "wave", 60, j, "noisy") if k == "middle"]
        assert mids == [f for f in buckets[(60 + j) % 6] if f < 60 + j - 3]


def test_difference_5_merge_blocks_are_aligned_pooled_means():
    pol, cache = run_pyramid(30)
    plan = plan_at(cache, pol, 30)
    blocks = [(i, t) for k, i, t in observed(plan, "veil", 30, 0, "noisy") if k == "block"]
    assert blocks == [(3, 13.0), (4, 17.0), (5, 21.0)]  # frames [4b, 4b+3] at time 4b+1; B6 ends at 27 ≥ t-3
    # block b's K is the mean of frames 4b..4b+3 pooled 2×2 (the harness's K of frame f is f everywhere)
    bp = cache.store("veil").blocks
    k = bp.k[:, :, bp.page_of[4]]
    assert k.shape[2] == 1  # a 2×2 grid pooled 2×2: one token at (0, 0)
    # stored rotated at the block's own time (17) and its token's position; un-rotated, the pooled mean
    k = rotate_entries(k.unsqueeze(2), 17.0, spatial_positions(2, 2, 2, "top_left"), inverse=True).squeeze(2)
    assert torch.allclose(k, torch.full_like(k, (16 + 17 + 18 + 19) / 4))
    v = bp.v[:, :, bp.page_of[4]]
    assert torch.allclose(v, torch.full_like(v, (16 + 17 + 18 + 19) / 4 + 0.5))


def test_difference_5_block_zero_is_never_shown():
    pol, cache = run_pyramid(12)
    plan = plan_at(cache, pol, 12)
    assert cache.store("veil").tracker.stores.blocks == [0, 1, 2]
    assert [i for k, i, _ in observed(plan, "veil", 12, 2, "noisy") if k == "block"] == [1]


def test_difference_6_window_clamp_rotates_sinks_and_anchors_at_the_sink_time():
    pol, cache = run_pyramid(24)
    plan = plan_at(cache, pol, 24)
    got = observed(plan, "anchor", 24, 1, "clean")  # t = 25: sink time max(0, 25 - clamp(25, 18, 21)) = 4
    assert got == sorted([("sink", 0, 4.0), ("sink", 1, 4.0), ("sink", 2, 4.0), ("recent", 3, 3.0),
                          ("recent", 23, 23.0), ("recent", 24, 24.0), ("recent", 25, 25.0), ("recent", 26, 26.0),
                          ("middle", 6, 4.0), ("middle", 12, 4.0), ("middle", 18, 4.0)])


def test_difference_7_sinks_come_from_chunk_zero_and_the_quirks_are_kept():
    # sinks are captured from the first chunk only: with 1-frame chunks an Anchor head has one sink
    pol = policy()
    cache = build(pol, TYPES, total=20, fpb=1)
    for s in range(10):
        advance(cache, pol, s, 1)
    plan = plan_at(cache, pol, 10, 1)
    assert [i for k, i, _ in observed(plan, "anchor", 10, 0, "noisy") if k == "sink"] == [0]
    # at chunk 0 the sinks are the chunk's own keys, all at the sink time 0 (frames 1 and 2 included)
    cache3 = build(pol, TYPES, total=20)
    plan0 = plan_at(cache3, pol, 0)
    assert [(s_, i, t) for s_, i, r, t in plan0.listing("anchor", 0)] == [("chunk", 0, 0.0), ("chunk", 1, 0.0),
                                                                          ("chunk", 2, 0.0)]
    commit(cache3, 0)
    # Anchor heads keep frame 3 in their recent store forever and drop frame 4 at chunk 6
    for s in range(3, 6, 3):
        advance(cache3, pol, s)
    p6 = plan_at(cache3, pol, 6)
    assert [i for k, i, _ in observed(p6, "anchor", 6, 0, "noisy") if k == "recent"] == [3, 5, 6, 7, 8]
    commit(cache3, 6)
    for s in range(9, 90, 3):
        advance(cache3, pol, s)
    p90 = plan_at(cache3, pol, 90)
    assert ("recent", 3, 3.0) in observed(p90, "anchor", 90, 0, "noisy")
    # frame 0 takes a stride slot until frame 24 evicts it (capacity 4), but is never shown (t' ≤ 0)
    _, c = run_pyramid(21)
    assert c.store("anchor").tracker.stores.stride == [0, 6, 12, 18]
    assert 0 not in [i for k, i, _ in observed(plan_at(c, pol, 21), "anchor", 21, 2, "noisy") if k == "middle"]


# ------------------------------------------------------------------------------------------
# worked examples (docs/pyramid_forcing.md)


@pytest.mark.parametrize("head,s,j,pass_,middles,sink_time", [
    ("anchor", 24, 1, "clean", [6, 12, 18], 4),
    ("anchor", 30, 0, "noisy", [6, 12, 18, 24], 9),
    ("anchor", 30, 0, "clean", [12, 18, 24], 9),
    ("anchor", 33, 0, "noisy", [12, 18, 24], 12),
    ("anchor", 33, 1, "noisy", [12, 18, 24, 30], 13),
    ("wave", 24, 1, "noisy", [1, 7, 13, 19], 4),
    ("wave", 24, 1, "clean", [7, 13, 19], 4),
    ("wave", 30, 2, "clean", [14, 20, 26], 11),
])
def test_worked_examples(head, s, j, pass_, middles, sink_time):
    pol, cache = run_pyramid(s)
    got = observed(plan_at(cache, pol, s), head, s, j, pass_)
    assert [i for k, i, _ in got if k == "middle"] == middles
    assert {t for k, _, t in got if k in ("sink", "middle")} == {float(sink_time)}


@pytest.mark.parametrize("s,j,pass_,blocks", [(30, 0, "noisy", [3, 4, 5]), (30, 1, "noisy", [3, 4, 5, 6]),
                                               (30, 0, "clean", [4, 5]), (9, 2, "clean", [1])])
def test_worked_examples_veil(s, j, pass_, blocks):
    pol, cache = run_pyramid(s)
    got = observed(plan_at(cache, pol, s), "veil", s, j, pass_)
    assert [i for k, i, _ in got if k == "block"] == blocks


def test_budget_per_query_frame_and_storage():
    from headforcing_core.retention import pyramid_steady_budget
    pol = policy()
    anchor = pyramid_steady_budget(pol.rule_map["anchor"], 3)
    wave = pyramid_steady_budget(pol.rule_map["wave"], 3)
    veil = pyramid_steady_budget(pol.rule_map["veil"], 3)
    assert 11 <= anchor.attended[0] <= 12 and anchor.attended[1] == 0
    assert wave.attended[0] == pytest.approx(0.8 * 9 + 0.2 * 8)  # 9 on noisy passes, 8 on the clean pass
    assert 7.5 <= veil.attended[0] + veil.attended[1] / 4 <= 8.0
    assert wave.peak == (9, 0) and anchor.peak == (12, 0)  # the largest key sets
    assert wave.stored == (25, 0)  # distinct frames held (sink, recent, six buckets of 4); the chunk: in the scratch
    assert pyramid_steady_budget(pol.rule_map["wave"], 3, in_place=True).stored == (25 + 3, 0)  # read in place
    assert veil.stored[1] == 4 + 1  # four completed blocks and the one being filled


# ------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("rule,match", [
    (PyramidRule(3, 3, Stride(6, 4)), "above one chunk"),
    (PyramidRule(3, 4, Stride(6, 0)), "capacity must be"),
    (PyramidRule(3, 4, Cyclic(0, 4)), "period must be"),
    (PyramidRule(3, 4, Cyclic(6, 0)), "bucket capacity must be"),
    (PyramidRule(3, 4, Merge(2, 0)), "capacity must be"),
    (PyramidRule(-1, 4, Merge(2, 4)), "sink frames"),
    (PyramidRule(3, 4, Merge(2, 4), stable_stride=True), "strided"),
    (PyramidRule(3, 4, Stride(0, 4)), "interval must be"),
    (PyramidRule(3, 4, Merge(0, 4)), "patch must be"),
])
def test_impossible_parameters_are_refused_before_sampling(tiny_model, rule, match):
    pol = make_policy("pyramid_forcing", labels=HeadLabels.uniform(2, 2, "anchor", "pyramid_forcing", "t"),
                      rules={"anchor": rule})
    expect_error_before_sampling(tiny_model, PolicyError, match, policy=pol)


def test_merge_patch_must_divide_the_token_grid(tiny_model):
    pol = make_policy("pyramid_forcing", labels=HeadLabels.uniform(2, 2, "veil", "pyramid_forcing", "t"),
                      rules={"veil": PyramidRule(3, 4, Merge(3, 4))})
    expect_error_before_sampling(tiny_model, PolicyError, "does not divide the 4×4 token grid", policy=pol)
    assert GRID == (2, 2)
    # the memory estimate (the Cache Policy node's summary, the pre-flight) refuses it too, before any model loads
    from headforcing_core.backbone import BackboneSpec
    from headforcing_core.memory import estimate_run
    spec = BackboneSpec.from_fingerprint({"dim": 1536, "num_heads": 12, "num_layers": 2, "patch_size": [1, 2, 2],
                                          "in_dim": 16, "out_dim": 16, "text_dim": 4096, "ffn_dim": 8960})
    with pytest.raises(PolicyError, match="does not divide the 30×52 token grid"):
        estimate_run(spec, make_policy("pyramid_forcing", rules={"veil": PyramidRule(3, 4, Merge(3, 4))}),
                     latent_frames=21, latent_height=60, latent_width=104)
