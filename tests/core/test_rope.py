import math

import torch

from headforcing_core.cache import HeadwiseKVCache
from headforcing_core.plan import plan_chunk
from headforcing_core.policies import HeadLabels, make_policy
from headforcing_core.positions import EntryTime, map_times
from headforcing_core.rope import Rotary, axis_pairs, spatial_positions

from .dense_reference import rope_apply, rope_table


def test_axis_split_of_128_wide_heads():
    assert axis_pairs(128) == (22, 21, 21)  # 44/42/42 channels


def test_matches_wans_complex_table_at_integer_positions():
    x = torch.randn(1, 2 * 3 * 4, 2, 128, dtype=torch.float64)
    ours = Rotary.for_entries(128, [0.0, 1.0], 3, 4).apply(x)
    theirs = rope_apply(x, 2, 3, 4, rope_table(128))
    assert torch.allclose(ours, theirs, atol=1e-12)


def test_scores_depend_only_on_relative_time():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 1, 128, generator=g, dtype=torch.float64)
    k = torch.randn(1, 6, 1, 128, generator=g, dtype=torch.float64)

    def scores(tq, tk):
        rq = Rotary.for_entries(128, [tq], 2, 3).apply(q)
        rk = Rotary.for_entries(128, [tk], 2, 3).apply(k)
        return torch.einsum("bsnd,btnd->bst", rq, rk)

    base = scores(20.0, 3.0)
    assert torch.allclose(scores(2020.0, 2003.0), base, atol=1e-9)
    assert torch.allclose(scores(17.5, 0.5), base, atol=1e-9)
    assert not torch.allclose(scores(20.0, 4.0), base, atol=1e-3)


def test_pooled_positions_are_window_centroids():
    pos = spatial_positions(3, 4, 2)
    assert pos.tolist() == [[0.5, 0.5], [0.5, 2.5], [2.0, 0.5], [2.0, 2.5]]


def test_keys_are_stored_unroped(tiny_model):
    from headforcing_core import ARSampler, WanRunner, make_policy
    from .conftest import latent_noise, text_context

    runner = WanRunner(tiny_model)
    s = ARSampler(runner, make_policy("full"))
    s.start(1, 8, 8, 6)
    s.set_prompt(text_context())
    raw = {}
    orig = s.cache.commit

    def spy(layer, k, v, start, frames):
        raw[(layer, start)] = k.clone()
        orig(layer, k, v, start, frames)

    s.cache.commit = spy
    s.sample(latent_noise(6), torch.Generator().manual_seed(0))
    stored = s.cache.layers[0].groups[0].recent.entries()
    # what is stored for frame 1 is the clean pass's key before any rotation
    tokens = 16
    assert torch.equal(stored[1].k, raw[(0, 0)][:, tokens:2 * tokens])
    rotated = Rotary.for_entries(128, [1.0], 4, 4).apply(stored[1].k)
    assert not torch.allclose(rotated, stored[1].k)


def _commit_random(cache, start, frames):
    for layer in range(len(cache.layers)):
        k = torch.randn(1, frames * 4, cache.layers[layer].num_heads, 8)
        cache.commit(layer, k, k, start, frames)


def test_positions_stay_in_the_training_window_for_ten_minutes():
    total = (16 * 600 - 1) // 4 + 1
    pyr = make_policy("pyramid_forcing", labels=HeadLabels("pyramid_forcing", (("anchor", "wave", "veil"),)))
    hf = make_policy("head_forcing", labels=HeadLabels("head_forcing", (("local", "anchor", "memory"),)))
    sw = make_policy("sink_window")
    for pol, types in ((pyr, ("anchor", "wave", "veil")), (hf, ("local", "anchor", "memory")), (sw, ("all",))):
        cache = HeadwiseKVCache((types,), pol.rule_map, batch=1, grid=(2, 2), head_dim=8, frames_per_block=3,
                                total_frames=total, dtype=torch.float32, device=torch.device("cpu"))
        lo, hi = math.inf, -math.inf
        for start in range(0, total, 3):
            plan = plan_chunk(cache, pol.rope, pol.window, start, 3)
            for gp in plan.layers[0]:
                times = gp.entry_times + gp.query_times
                lo, hi = min(lo, *times), max(hi, *times)
                # the query is always the newest position
                assert max(gp.entry_times, default=-1) < min(gp.query_times)
            _commit_random(cache, start, 3)
        assert lo >= 0 and hi <= 20, (pol.preset, lo, hi)


def test_modes_agree_while_everything_fits():
    entries = [EntryTime(float(i), sink=i < 3) for i in range(12)]
    for mode in ("absolute", "window_clamp", "compact"):
        assert map_times(mode, entries, 12, 3, 21) == ([float(i) for i in range(12)], [12.0, 13.0, 14.0])


def test_compact_spreads_when_too_many_entries():
    entries = [EntryTime(float(i)) for i in range(30)]
    times, q = map_times("compact", entries, 30, 3, 21)
    assert times[0] == 0 and times[-1] == 17 and q == [18, 19, 20]
    assert all(b > a for a, b in zip(times, times[1:]))
