"""Wan's 3-D RoPE, the chunk / entry rotations, and the re-encoding modes."""

import random

import pytest
import torch

from headforcing_core.policies import HeadLabels, make_policy
from headforcing_core.positions import key_times, map_times, sink_time
from headforcing_core.rope import (ChunkRotation, axis_pairs, rope_reference, rotate_entries, spatial_positions)

from .dense_reference import rope_apply, rope_table
from .retention_harness import build, commit, plan_at


def test_axis_split_of_128_wide_heads():
    assert axis_pairs(128) == (22, 21, 21)  # 44/42/42 channels


def _positions(frames, gh, gw):
    sp = spatial_positions(gh, gw)
    t = torch.arange(frames, dtype=torch.float64).repeat_interleave(sp.shape[0])
    return t, sp.repeat(frames, 1)


def test_matches_wans_complex_table_at_integer_positions():
    x = torch.randn(1, 2 * 3 * 4, 2, 128, dtype=torch.float64)
    ours = rope_reference(x, *_positions(2, 3, 4))
    theirs = rope_apply(x, 2, 3, 4, rope_table(128))
    assert torch.allclose(ours, theirs, atol=1e-12)


def test_chunk_rotation_and_entry_rotation_agree_with_the_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3 * 12, 2, 128, generator=g, dtype=torch.float64)
    t, sp = _positions(3, 3, 4)
    ref = rope_reference(x, t + 40, sp)
    rot = ChunkRotation(128, (3, 4), [(40.0, 41.0, 42.0), (0.0, 0.0, 0.0)], torch.float64, torch.device("cpu"))
    assert torch.allclose(rot.apply(x), ref, atol=1e-12)
    assert torch.allclose(rot.apply_all(x)[:, 1], rope_reference(x, torch.zeros_like(t), sp), atol=1e-12)
    # entries: [B, H, E, T, D] with one time per entry
    ent = x.view(1, 3, 12, 2, 128).permute(0, 3, 1, 2, 4)
    got = rotate_entries(ent, torch.tensor([40.0, 41.0, 42.0], dtype=torch.float64), spatial_positions(3, 4))
    assert torch.allclose(got.permute(0, 2, 3, 1, 4).reshape(1, 36, 2, 128), ref, atol=1e-12)


def test_scores_depend_only_on_relative_time():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 1, 128, generator=g, dtype=torch.float64)
    k = torch.randn(1, 6, 1, 128, generator=g, dtype=torch.float64)
    sp = spatial_positions(2, 3)

    def scores(tq, tk):
        rq = rope_reference(q, torch.full((6,), tq, dtype=torch.float64), sp)
        rk = rope_reference(k, torch.full((6,), tk, dtype=torch.float64), sp)
        return torch.einsum("bsnd,btnd->bst", rq, rk)

    base = scores(20.0, 3.0)
    assert torch.allclose(scores(2020.0, 2003.0), base, atol=1e-9)
    assert torch.allclose(scores(17.5, 0.5), base, atol=1e-9)
    assert not torch.allclose(scores(20.0, 4.0), base, atol=1e-3)


def test_pooled_positions():
    assert spatial_positions(3, 4, 2).tolist() == [[0.5, 0.5], [0.5, 2.5], [2.0, 0.5], [2.0, 2.5]]  # centroids
    # Pyramid Forcing's merged tokens sit at the top-left token of their window: (2·py, 2·px)
    assert spatial_positions(4, 4, 2, "top_left").tolist() == [[0, 0], [0, 2], [2, 0], [2, 2]]


def test_keys_are_stored_rotated_at_their_own_time(tiny_model):
    """A packed policy's pool holds the clean pass's keys rotated at their own frame and token positions
    (what Self Forcing keeps); un-rotated they are the raw keys the model made."""
    from headforcing_core import ARSampler, WanRunner
    from headforcing_core.chunk_attention import ChunkAttention
    from .conftest import latent_noise, text_context

    runner = WanRunner(tiny_model)
    s = ARSampler(runner, make_policy("sink_window", sink=1, recent=8))  # window_shift: gathered and re-timed
    s.start(1, 8, 8, 6)
    s.set_prompt(text_context())
    raw = {}
    call = ChunkAttention.__call__

    def spy(self, layer, q, k, v):
        if self.pass_ == "clean" and layer == 0:
            raw[self.plan.chunk_start] = k.clone()  # [B, S, H, D], before RoPE
        return call(self, layer, q, k, v)

    ChunkAttention.__call__ = spy
    try:
        s.sample(latent_noise(6), torch.Generator().manual_seed(0))
    finally:
        ChunkAttention.__call__ = call
    store = s.cache.store("all")
    tokens = 16
    page = store.frames.page_of[1]
    stored = store.frames.k[:, :2, page]  # layer 0's two heads, [B, 2, tokens, D]
    k1 = raw[0][:, tokens:2 * tokens]  # frame 1's raw keys [B, tokens, H, D]
    want = rope_reference(k1, torch.full((tokens,), 1.0), spatial_positions(4, 4)).transpose(1, 2)
    assert torch.allclose(stored, want, atol=1e-6)
    assert torch.allclose(s.cache.raw_frame("all", 1)[0][:, :2], k1.transpose(1, 2), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# re-encoding modes


def _flags(n_sinks, n, anchor=None):
    return dict(is_chunk=[False] * n, is_sink=[i < n_sinks for i in range(n)],
                is_anchor=anchor if anchor is not None else [i < n_sinks for i in range(n)])


def test_modes_agree_while_everything_fits():
    own = [float(i) for i in range(12)]
    for mode in ("absolute", "window_clamp", "window_shift", "compact"):
        kw = _flags(3, 12, [False] * 12) if mode == "window_clamp" else _flags(3, 12)
        assert key_times(mode, own, **kw, chunk_start=12, frames=3, query_frame=13, window=21, clamp_min=18,
                         clamp_max=21) == own


def test_window_clamp_is_pyramid_forcings_sink_time():
    # map_sink_time(window_clamp): max(0, t - clamp(t, 18, 21))
    assert [sink_time(t, 18, 21) for t in (0, 17, 18, 21, 22, 30, 100)] == [0, 0, 0, 0, 1, 9, 79]
    own = [0.0, 1.0, 2.0, 27.0, 6.0]  # sinks 0..2, a recent frame, a strided anchor
    got = key_times("window_clamp", own, is_chunk=[False] * 5, is_sink=[True, True, True, False, False],
                    is_anchor=[True, True, True, False, True], chunk_start=30, frames=3, query_frame=31, window=21,
                    clamp_min=18, clamp_max=21)
    assert got == [10.0, 10.0, 10.0, 27.0, 10.0]  # sinks and anchors 21 frames behind the query, recent absolute


def test_window_shift_renumbers_into_the_last_window():
    own = [0.0, 1.0, 5.0, 27.0, 28.0, 29.0]
    got = key_times("window_shift", own, **_flags(2, 6), chunk_start=30, frames=3, query_frame=30, window=21,
                    clamp_min=18, clamp_max=21)
    # visible window 12..32: sinks at its start, everything else no earlier than right after the sinks
    assert got == [12.0, 13.0, 14.0, 27.0, 28.0, 29.0]


def test_compact_renumbers_right_before_the_chunk_and_spreads_when_too_many():
    own = [float(i) * 2 for i in range(5)]
    got = key_times("compact", own, **_flags(0, 5), chunk_start=100, frames=3, query_frame=100, window=21,
                    clamp_min=18, clamp_max=21)
    assert got == [95.0, 96.0, 97.0, 98.0, 99.0]  # ranks 0..4, the chunk at 100
    own = [float(i) for i in range(30)]
    got = key_times("compact", own, **_flags(0, 30), chunk_start=30, frames=3, query_frame=30, window=21,
                    clamp_min=18, clamp_max=21)
    assert got[0] == 30 - 18 and got[-1] == 30 - 1  # spread over the 18 slots before the chunk
    assert all(b > a for a, b in zip(got, got[1:]))


@pytest.mark.parametrize("mode", ["absolute", "window_clamp", "window_shift", "compact"])
def test_host_and_device_implementations_agree(mode):
    rnd = random.Random(mode)
    for _ in range(200):
        n = rnd.randint(1, 30)
        own = sorted(rnd.uniform(0, 80) for _ in range(n))
        sinks = rnd.randint(0, min(3, n))
        chunk = [i >= n - rnd.randint(0, 3) for i in range(n)]
        anchor = [rnd.random() < 0.3 for _ in range(n)]
        kw = dict(is_chunk=chunk, is_sink=[i < sinks for i in range(n)], is_anchor=anchor)
        args = dict(chunk_start=rnd.randint(0, 90), frames=rnd.randint(1, 3), query_frame=rnd.randint(0, 95),
                    window=21, clamp_min=18, clamp_max=21)
        host = key_times(mode, own, **kw, **args)
        dev = map_times(mode, torch.tensor(own, dtype=torch.float64),
                        **{k: torch.tensor(v) for k, v in kw.items()}, valid=None, **args)
        assert dev.tolist() == pytest.approx(host, abs=1e-9)


def test_relative_positions_stay_in_the_training_window_for_ten_minutes():
    """Every key of head_forcing (compact) and sink_window (window_shift) sits within 20 frames of the
    query; Pyramid Forcing's sinks and anchors stay 21 behind once t > 21 (window_clamp) — only its
    recent frames and the first non-sink frame of Anchor heads keep their absolute time."""
    total = (16 * 600 - 1) // 4 + 1
    for preset, types in (("head_forcing", ("local", "anchor", "memory")), ("sink_window", ("all",)),
                          ("pyramid_forcing", ("anchor", "wave", "veil"))):
        labels = None if types == ("all",) else HeadLabels(preset, (types,))
        pol = make_policy(preset, labels=labels)
        cache = build(pol, types, total=total)
        worst = 0.0
        for start in range(0, total, 3):
            plan = plan_at(cache, pol, start)
            for t in types:
                for j in range(plan.classes):
                    q = start + j
                    for src, idx, role, time in plan.listing(t, j):
                        if time is None or (preset == "pyramid_forcing" and role == "recent"):
                            continue
                        worst = max(worst, q - time)
            commit(cache, start)
        limit = 21 if preset == "pyramid_forcing" else 20
        assert worst <= limit, (preset, worst)


def test_rotation_into_a_view_of_the_wrong_shape_is_refused():
    """``out=`` of another shape would be resized by PyTorch (a warning), leaving the caller's view unwritten."""
    from headforcing_core.rope import _factors, _rotate
    x = torch.randn(2, 5, 3, 8, dtype=torch.bfloat16)
    cos2, sin2 = _factors(torch.randn(5, 1, 4, dtype=torch.float64), torch.float32)
    out = torch.empty(2, 3, 5, 8, dtype=torch.bfloat16).transpose(1, 2)
    assert _rotate(x, cos2, sin2, out) is out
    with pytest.raises(ValueError, match="not"):
        _rotate(x, cos2, sin2, torch.empty(2, 5, 8, dtype=torch.bfloat16))
