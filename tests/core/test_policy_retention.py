"""Each of our presets keeps exactly what its rule says, at the RoPE times its mode says.

The cache is driven directly with synthetic K/V (a 2×2 token grid, tiny heads), so these
tests list, chunk by chunk, which frames each head type attends to. Pyramid Forcing's
preset has its own file (test_pyramid_forcing.py).
"""

import pytest
import torch

from headforcing_core.policies import Episodic, HeadLabels, RetentionRule, make_policy
from headforcing_core.rope import rotate_entries, spatial_positions

from .retention_harness import GRID, HEAD_DIM, build, listing, plan_at, run_to


def rel(times, start):
    return [t - start for t in times]


def test_head_forcing_listing_at_frame_30():
    pol = make_policy("head_forcing", labels=HeadLabels("head_forcing", (("local", "anchor", "memory"),)))
    cache = build(pol, ["local", "anchor", "memory"])
    # keys change direction every 6 frames: one "scene" per 6 frames
    scene_key = lambda fr: torch.nn.functional.one_hot(torch.tensor(fr // 6 % HEAD_DIM), HEAD_DIM).double()  # noqa
    run_to(cache, pol, 30, key_fn=scene_key)
    plan = plan_at(cache, pol, 30)
    assert plan.classes == 1  # nothing depends on the query frame: one key set per chunk
    src, times = listing(plan, "local")
    assert src == [("f", 28), ("f", 29), ("c", 0), ("c", 1), ("c", 2)] and rel(times, 30) == [-2, -1, 0, 1, 2]
    src, times = listing(plan, "anchor")
    assert src == [("f", 0), ("f", 1), ("f", 2), ("f", 28), ("f", 29), ("c", 0), ("c", 1), ("c", 2)]
    assert rel(times, 30) == [-5, -4, -3, -2, -1, 0, 1, 2]  # compact: renumbered right before the chunk
    src, _ = listing(plan, "memory")
    assert src == [("f", 0), ("f", 1), ("f", 2), ("e", 0)] + [("f", f) for f in range(24, 30)] + \
        [("c", 0), ("c", 1), ("c", 2)]
    # evicted 3..23 folded into episodes by scene: 3-5 (scene 0), 6-11, 12-17, 18-23
    (eps,) = cache.store("memory").episodes.episodes()
    assert eps == [(3, 4, 5), tuple(range(6, 12)), tuple(range(12, 18)), tuple(range(18, 24))]


def test_self_forcing_window_keeps_last_21_including_the_chunk():
    pol = make_policy("self_forcing_window")
    cache = build(pol, ["all", "all"])
    run_to(cache, pol, 45)
    src, times = listing(plan_at(cache, pol, 45), "all")
    assert src == [("f", f) for f in range(27, 45)] + [("c", 0), ("c", 1), ("c", 2)]
    assert times == list(range(27, 48))  # absolute positions


def test_sink_window_keeps_sink_and_recent():
    pol = make_policy("sink_window", sink=2, recent=5, rope="absolute")
    cache = build(pol, ["all"])
    run_to(cache, pol, 24)
    src, times = listing(plan_at(cache, pol, 24), "all")
    assert src == [("f", f) for f in (0, 1, 19, 20, 21, 22, 23)] + [("c", 0), ("c", 1), ("c", 2)]
    assert times == [0, 1, 19, 20, 21, 22, 23, 24, 25, 26]


def test_sink_window_default_window_shift_positions():
    pol = make_policy("sink_window")  # sink 3 + recent 9, window_shift
    cache = build(pol, ["all"])
    run_to(cache, pol, 30)
    src, times = listing(plan_at(cache, pol, 30), "all")
    assert src == [("f", f) for f in (0, 1, 2, *range(21, 30))] + [("c", 0), ("c", 1), ("c", 2)]
    # the visible window is frames 12..32: sinks at its start, the rest at their own time
    assert times == [12, 13, 14] + list(range(21, 33))


def test_longlive_preset_is_its_interactive_window():
    pol = make_policy("longlive")  # 3 sink frames + 12 frames incl. the chunk, absolute positions
    cache = build(pol, ["all"])
    run_to(cache, pol, 30)
    src, times = listing(plan_at(cache, pol, 30), "all")
    assert src == [("f", f) for f in (0, 1, 2, *range(24, 30))] + [("c", 0), ("c", 1), ("c", 2)]
    assert times == [0, 1, 2] + list(range(24, 33))


# ------------------------------------------------------------------------------------------
# episodic memory


def memory_cache(cap=8, similarity=0.9, recent=6, batch=1, layers=1):
    rules = {"memory": RetentionRule(sink=3, recent=recent, middle=Episodic(cap, 2, similarity))}
    pol = make_policy("head_forcing", labels=HeadLabels("head_forcing", (("memory",),) * layers), rules=rules)
    return pol, build(pol, ["memory"], batch=batch, layers=layers)


def episodes(cache, row=0):
    return cache.store("memory").episodes.episodes(row)[0]


def test_prompt_switch_opens_a_new_episode():
    pol, cache = memory_cache()
    run_to(cache, pol, 18, key_fn=lambda fr: torch.ones(HEAD_DIM))  # one unchanging scene
    cache.on_prompt_switch(18)  # frames 18… are generated under the new prompt
    run_to(cache, pol, 30, key_fn=lambda fr: torch.ones(HEAD_DIM), start=18)
    # evicted 3..23: the old prompt's frames stay in one episode, the new prompt's open another,
    # although the content never changed
    assert episodes(cache) == [tuple(range(3, 18)), tuple(range(18, 24))]


def test_full_memory_merges_most_similar_neighbours():
    pol, cache = memory_cache(cap=3, similarity=0.99, recent=3)
    # scenes A A' B C with A' close to A: when a 4th episode opens, A and A' merge
    keys = {0: torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]), 1: torch.tensor([0.9, 0.3, 0, 0, 0, 0, 0, 0]),
            2: torch.tensor([0, 0, 1.0, 0, 0, 0, 0, 0]), 3: torch.tensor([0, 0, 0, 1.0, 0, 0, 0, 0])}
    key_fn = lambda fr: keys.get(min((fr - 3) // 3, 3), keys[0]) if fr >= 3 else torch.ones(8)  # noqa: E731
    run_to(cache, pol, 21, key_fn=key_fn)  # evicted 3..17: 3-5 A, 6-8 A', 9-11 B, 12-17 C
    assert episodes(cache) == [tuple(range(3, 9)), tuple(range(9, 12)), tuple(range(12, 18))]
    times = cache.store("memory").episodes.times()[0, 0]
    valid = cache.store("memory").episodes.valid[0, 0]
    assert sorted(times[valid].tolist()) == [5.5, 10.0, 14.5]  # an episode sits at the mean of its frames


def test_episode_is_running_mean_of_pooled_frames():
    pol, cache = memory_cache()
    run_to(cache, pol, 15, key_fn=lambda fr: torch.ones(HEAD_DIM) * (1 + fr))  # same direction: one episode
    assert episodes(cache) == [(3, 4, 5, 6, 7, 8)]
    ep = cache.store("memory").episodes
    slot = int(torch.nonzero(ep.valid[0, 0])[0])
    # stored rotated at the pooled token's position (time 0): un-rotated, the running mean of raw keys
    k = rotate_entries(ep.k[:, :, slot:slot + 1], 0.0, spatial_positions(*GRID, ep.pool, "centroid"),
                       inverse=True)[0, 0, 0]
    assert torch.allclose(k, torch.full_like(k, 1 + 5.5))
    v = ep.v[0, 0, slot]
    assert torch.allclose(v, torch.full_like(v, 1 + 5.5 + 0.5))


def test_episodes_are_decided_per_batch_row_and_per_layer():
    """Row 0 sees one scene, row 1 a new scene every 3 frames: their memories differ; layers too."""
    pol, cache = memory_cache(cap=8, similarity=0.9, batch=2, layers=2)

    def key_fn(fr):
        k = torch.zeros(2, 2, 1, 1, HEAD_DIM, dtype=torch.float64)  # [layer, batch, token, head, dim]
        k[:, 0] = 1.0
        k[0, 1, ..., (fr // 3) % HEAD_DIM] = 1.0  # layer 0, row 1: scene changes
        k[1, 1] = 1.0  # layer 1, row 1: unchanging
        return k

    run_to(cache, pol, 30, key_fn=key_fn)
    mem = cache.store("memory").episodes
    row0, row1 = mem.episodes(0), mem.episodes(1)
    assert row0 == [[tuple(range(3, 24))], [tuple(range(3, 24))]]
    assert row1[1] == [tuple(range(3, 24))]
    assert len(row1[0]) == 7  # 3-5, 6-8, …, 21-23


# ------------------------------------------------------------------------------------------
# memory never grows with the video


@pytest.mark.parametrize("preset", ["self_forcing_window", "sink_window", "longlive", "pyramid_forcing",
                                    "head_forcing"])
def test_bounded_policies_allocate_once(preset):
    types = {"pyramid_forcing": ["anchor", "wave", "veil"], "head_forcing": ["local", "anchor", "memory"]}
    head_types = types.get(preset, ["all"])
    labels = HeadLabels(preset, (tuple(head_types),)) if preset in types else None
    pol = make_policy(preset, labels=labels)
    cache = build(pol, head_types, total=10_000)
    before = cache.nbytes

    def pointers():
        out = []
        for ts in cache.types:
            out += [ts.frames.k.data_ptr(), ts.frames.v.data_ptr()]
            for part in (ts.blocks, ts.episodes):
                if part is not None:
                    out += [part.k.data_ptr(), part.v.data_ptr()]
        return out

    ptrs = pointers()
    run_to(cache, pol, 300)
    assert cache.nbytes == before
    assert ptrs == pointers()
    assert all(len(ts.frames.page_of) <= ts.frames.capacity for ts in cache.types)
