"""Each preset keeps exactly what its rule says, at the RoPE times its mode says.

The cache is driven directly with synthetic K/V (a 2×2 token grid, tiny heads),
so these tests list, chunk by chunk, which frames each head type attends to.
"""

import pytest
import torch

from headforcing_core.cache import HeadwiseKVCache
from headforcing_core.plan import plan_chunk
from headforcing_core.policies import Episodic, HeadLabels, RetentionRule, make_policy

GRID = (2, 2)
HEAD_DIM = 8
F = 3


def build(policy, head_types, total=400, fpb=F):
    policy.validate(fpb)
    return HeadwiseKVCache((tuple(head_types),), policy.rule_map, batch=1, grid=GRID, head_dim=HEAD_DIM,
                           frames_per_block=fpb, total_frames=total, dtype=torch.float64,
                           device=torch.device("cpu"))


def frame_kv(frame, heads, key_fn=None):
    tokens = GRID[0] * GRID[1]
    if key_fn is None:
        k = torch.full((1, tokens, heads, HEAD_DIM), float(frame), dtype=torch.float64)
    else:
        k = key_fn(frame).to(torch.float64).expand(1, tokens, heads, HEAD_DIM).clone()
    return k, k.clone() + 0.5


def commit_chunk(cache, start, frames, key_fn=None):
    heads = cache.layers[0].num_heads
    parts = [frame_kv(start + j, heads, key_fn) for j in range(frames)]
    k = torch.cat([p[0] for p in parts], dim=1)
    v = torch.cat([p[1] for p in parts], dim=1)
    cache.commit(0, k, v, start, frames)


def attended(cache, policy, start, fpb=F):
    """{head type: (frames of each entry, rope time of each entry, query times)} for the chunk at `start`."""
    plan = plan_chunk(cache, policy.rope, policy.window, start, fpb)
    out = {}
    for g, gp in zip(cache.layers[0].groups, plan.layers[0]):
        out[g.head_type] = ([e.frames for e in gp.entries], gp.entry_times, gp.query_times)
    return out


def run_to(cache, start, key_fn=None, fpb=F):
    for s in range(0, start, fpb):
        commit_chunk(cache, s, fpb, key_fn)


# ------------------------------------------------------------------------------------------
# explicit listings (documentation by example)


def test_pyramid_forcing_listing_at_frame_30():
    pol = make_policy("pyramid_forcing", labels=HeadLabels("pyramid_forcing", (("anchor", "wave", "veil"),)))
    cache = build(pol, ["anchor", "wave", "veil"])
    run_to(cache, 30)
    got = attended(cache, pol, 30)

    frames, times, q = got["anchor"]  # sink 3 + every 6th evicted frame (newest 4) + recent 4
    assert frames == [(0,), (1,), (2,), (6,), (12,), (18,), (24,), (26,), (27,), (28,), (29,)]
    # window_clamp: the visible window is frames 12..32, shifted to 0..20; sinks at its start,
    # older entries clamped to just after the sinks, the query at the end
    assert times == [0, 1, 2, 3, 3, 6, 12, 14, 15, 16, 17]
    assert q == [18, 19, 20]

    frames, times, q = got["wave"]  # sink 1 + stored phases {0, 3} (newest 4: 15, 18, 21, 24) → phase 0
    assert frames == [(0,), (18,), (24,), (26,), (27,), (28,), (29,)]
    assert times == [0, 6, 12, 14, 15, 16, 17]

    frames, times, q = got["veil"]  # sink 3 + merged blocks of 4 evicted frames (newest 4) + recent 4
    assert frames == [(0,), (1,), (2,), (7, 8, 9, 10), (11, 12, 13, 14), (15, 16, 17, 18), (19, 20, 21, 22),
                      (26,), (27,), (28,), (29,)]
    assert times == [0, 1, 2, 3, 3, 4.5, 8.5, 14, 15, 16, 17]


def test_pyramid_wave_attends_the_other_phase_on_the_next_chunk():
    pol = make_policy("pyramid_forcing", labels=HeadLabels("pyramid_forcing", (("wave",),)))
    cache = build(pol, ["wave"])
    run_to(cache, 33)
    frames, _, _ = attended(cache, pol, 33)["wave"]
    # evicted 1..28; stored multiples of 3, newest 4: 18, 21, 24, 27; chunk 33 has phase 3
    assert frames == [(0,), (21,), (27,), (29,), (30,), (31,), (32,)]


def test_head_forcing_listing_at_frame_30():
    pol = make_policy("head_forcing", labels=HeadLabels("head_forcing", (("local", "anchor", "memory"),)))
    cache = build(pol, ["local", "anchor", "memory"])
    # keys change direction every 6 frames: one "scene" per 6 frames
    scene_key = lambda fr: torch.nn.functional.one_hot(torch.tensor(fr // 6 % HEAD_DIM), HEAD_DIM).double()
    run_to(cache, 30, scene_key)
    got = attended(cache, pol, 30)
    frames, times, q = got["local"]
    assert frames == [(28,), (29,)] and times == [0, 1] and q == [2, 3, 4]
    frames, times, q = got["anchor"]
    assert frames == [(0,), (1,), (2,), (28,), (29,)] and times == [0, 1, 2, 3, 4] and q == [5, 6, 7]
    frames, times, q = got["memory"]
    # evicted 3..23 folded into episodes by scene: 3-5 (scene 0), 6-11, 12-17, 18-23
    assert frames == [(0,), (1,), (2,), (3, 4, 5), (6, 7, 8, 9, 10, 11), (12, 13, 14, 15, 16, 17),
                      (18, 19, 20, 21, 22, 23), (24,), (25,), (26,), (27,), (28,), (29,)]
    assert times == list(range(13)) and q == [13, 14, 15]


def test_self_forcing_window_keeps_last_21_including_the_chunk():
    pol = make_policy("self_forcing_window")
    cache = build(pol, ["all", "all"])
    run_to(cache, 45)
    frames, times, q = attended(cache, pol, 45)["all"]
    assert frames == [(f,) for f in range(27, 45)]
    assert times == list(range(27, 45)) and q == [45, 46, 47]  # absolute positions


def test_sink_window_keeps_sink_and_recent():
    pol = make_policy("sink_window", sink=2, recent=5, rope="absolute")
    cache = build(pol, ["all"])
    run_to(cache, 24)
    frames, times, _ = attended(cache, pol, 24)["all"]
    assert frames == [(0,), (1,), (19,), (20,), (21,), (22,), (23,)]
    assert times == [0, 1, 19, 20, 21, 22, 23]


# ------------------------------------------------------------------------------------------
# the rules, checked against an independent restatement for every chunk


def expected_frames(head_type, start):
    hist = list(range(start))
    if head_type == "anchor":
        sink, recent = hist[:3], hist[3:][-4:]
        evicted = hist[3:][:-4] if len(hist) > 7 else []
        return [(f,) for f in sink] + [(f,) for f in [e for e in evicted if e % 6 == 0][-4:]] + [(f,) for f in recent]
    if head_type == "wave":
        sink, recent = hist[:1], hist[1:][-4:]
        evicted = hist[1:][:-4] if len(hist) > 5 else []
        stored = [e for e in evicted if e % 3 == 0][-4:]
        return [(f,) for f in sink] + [(f,) for f in stored if f % 6 == start % 6] + [(f,) for f in recent]
    if head_type == "veil":
        sink, recent = hist[:3], hist[3:][-4:]
        evicted = hist[3:][:-4] if len(hist) > 7 else []
        blocks = [tuple(evicted[i:i + 4]) for i in range(0, len(evicted) - len(evicted) % 4, 4)]
        return [(f,) for f in sink] + blocks[-4:] + [(f,) for f in recent]
    raise AssertionError(head_type)


def test_pyramid_rules_every_chunk_to_frame_120():
    pol = make_policy("pyramid_forcing", labels=HeadLabels("pyramid_forcing", (("anchor", "wave", "veil"),)))
    cache = build(pol, ["anchor", "wave", "veil"])
    for start in range(0, 120, F):
        got = attended(cache, pol, start)
        for t in ("anchor", "wave", "veil"):
            frames, times, q = got[t]
            assert frames == expected_frames(t, start), (t, start)
            # positions stay inside the 21-frame training window
            assert min(times + q) >= 0 and max(times + q) <= 20
        commit_chunk(cache, start, F)


def test_merged_block_is_the_mean_of_pooled_frames():
    pol = make_policy("pyramid_forcing", labels=HeadLabels("pyramid_forcing", (("veil",),)))
    cache = build(pol, ["veil"])
    run_to(cache, 15)  # evicted 3..10 → blocks (3..6), (7..10)
    plan = plan_chunk(cache, pol.rope, pol.window, 15, F)
    blocks = [e for e in plan.layers[0][0].entries if e.kind == "merged"]
    assert [b.frames for b in blocks] == [(3, 4, 5, 6), (7, 8, 9, 10)]
    assert blocks[0].k.shape[1] == 1  # 2×2 grid pooled 2×2 → one token
    assert torch.allclose(blocks[0].k, torch.full_like(blocks[0].k, 4.5))
    assert torch.allclose(blocks[1].v, torch.full_like(blocks[1].v, 9.0))


# ------------------------------------------------------------------------------------------
# episodic memory


def scene(frame, length=6):
    return torch.nn.functional.one_hot(torch.tensor(frame // length % HEAD_DIM), HEAD_DIM).double()


def memory_cache(cap=8, similarity=0.9, recent=6):
    rules = {"memory": RetentionRule(sink=3, recent=recent, middle=Episodic(cap, 2, similarity))}
    pol = make_policy("head_forcing", labels=HeadLabels("head_forcing", (("memory",),)), rules=rules)
    return pol, build(pol, ["memory"])


def test_prompt_switch_opens_a_new_episode():
    pol, cache = memory_cache()
    for s in range(0, 18, F):
        commit_chunk(cache, s, F, lambda fr: torch.ones(HEAD_DIM))  # one unchanging scene
    cache.on_prompt_switch(18)  # frames 18… are generated under the new prompt
    for s in range(18, 30, F):
        commit_chunk(cache, s, F, lambda fr: torch.ones(HEAD_DIM))
    frames = [e.frames for e in plan_chunk(cache, pol.rope, pol.window, 30, F).layers[0][0].entries if e.kind == "episode"]
    # evicted 3..23: the old prompt's frames stay in one episode, the new prompt's open another,
    # although the content never changed
    assert len(frames) == 2
    assert frames[0] == tuple(range(3, 18)) and frames[1] == tuple(range(18, 24))


def test_full_memory_merges_most_similar_neighbours():
    pol, cache = memory_cache(cap=3, similarity=0.99, recent=3)
    # scenes A A' B C with A' close to A: when a 4th episode opens, A and A' merge
    keys = {0: torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]), 1: torch.tensor([0.9, 0.3, 0, 0, 0, 0, 0, 0]),
            2: torch.tensor([0, 0, 1.0, 0, 0, 0, 0, 0]), 3: torch.tensor([0, 0, 0, 1.0, 0, 0, 0, 0])}
    key_fn = lambda fr: keys.get(min((fr - 3) // 3, 3), keys[0]) if fr >= 3 else torch.ones(8)
    run_to(cache, 21, key_fn)  # evicted 3..17: 3-5 A, 6-8 A', 9-11 B, 12-17 C
    eps = [e for e in plan_chunk(cache, pol.rope, pol.window, 21, F).layers[0][0].entries if e.kind == "episode"]
    assert [e.frames for e in eps] == [tuple(range(3, 9)), tuple(range(9, 12)), tuple(range(12, 18))]
    assert eps[0].time == pytest.approx(5.5)


def test_episode_is_running_mean_of_pooled_frames():
    pol, cache = memory_cache()
    run_to(cache, 15, lambda fr: torch.ones(HEAD_DIM) * (1 + fr))  # same direction: one episode
    eps = [e for e in plan_chunk(cache, pol.rope, pol.window, 15, F).layers[0][0].entries if e.kind == "episode"]
    assert len(eps) == 1 and eps[0].frames == (3, 4, 5, 6, 7, 8)
    assert torch.allclose(eps[0].k, torch.full_like(eps[0].k, 1 + 5.5))


# ------------------------------------------------------------------------------------------
# memory never grows with the video


@pytest.mark.parametrize("preset", ["self_forcing_window", "sink_window", "pyramid_forcing", "head_forcing"])
def test_bounded_policies_allocate_once(preset):
    types = {"pyramid_forcing": ["anchor", "wave", "veil"], "head_forcing": ["local", "anchor", "memory"]}
    head_types = types.get(preset, ["all"])
    labels = HeadLabels(preset, (tuple(head_types),)) if preset in types else None
    pol = make_policy(preset, labels=labels)
    cache = build(pol, head_types, total=10_000)
    before = cache.nbytes
    ptrs = [s.k.data_ptr() for layer in cache.layers for g in layer.groups for s in g.stores()]
    run_to(cache, 300)
    assert cache.nbytes == before
    assert ptrs == [s.k.data_ptr() for layer in cache.layers for g in layer.groups for s in g.stores()]
