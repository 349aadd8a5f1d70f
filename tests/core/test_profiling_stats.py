"""Head-profiling statistics: the sampled-query collector, summaries, the period estimator, the rollout."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from headforcing_core import Hooks, Interrupted, ShapeError
from headforcing_core.profiling import (AttentionCollector, FrameStats, dominant_period, profile_heads,
                                        summarize)
from headforcing_core.profiling.stats import category_masks

from .conftest import text_context


def _naive(q, k, idx, key_frames_per_token, frames):
    """Per sampled query: per key frame mass / sign rate / mean centred logit (loops, float64)."""
    b, _, hg, d = q.shape
    out = {n: torch.zeros(hg, len(idx), frames, dtype=torch.float64) for n in ("mass", "pos", "logit")}
    for h in range(hg):
        for bi in range(b):
            for n, i in enumerate(idx):
                l = (k[bi, :, h].double() @ q[bi, i, h].double()) / d ** 0.5
                p = torch.softmax(l, 0)
                c = l - l.mean()
                for f in set(key_frames_per_token):
                    m = torch.tensor([kf == f for kf in key_frames_per_token])
                    out["mass"][h, n, f] += p[m].sum()
                    out["pos"][h, n, f] += ((c[m] > 0).double() + 0.5 * (c[m] == 0).double()).mean()
                    out["logit"][h, n, f] += c[m].mean()
    return out


@pytest.mark.parametrize("max_elements", [1 << 23, 1])  # 1: one head per pass
def test_collector_matches_a_naive_computation(max_elements):
    gen = torch.Generator().manual_seed(0)
    F, fpb, tpf, hg, d = 9, 3, 6, 4, 16
    chunk_start = 6
    q = torch.randn(2, fpb * tpf, hg, d, generator=gen)
    k = torch.randn(2, (chunk_start + fpb) * tpf, hg, d, generator=gen)  # history frames 0..5, then the chunk
    key_frames = [f for f in range(chunk_start) for _ in range(tpf)] + [chunk_start + i // tpf for i in range(fpb * tpf)]
    stats = FrameStats.zeros(2, 4, F, fpb)
    col = AttentionCollector(stats, tokens_per_frame=tpf, queries_per_frame=2, seed=5,
                             current_chunk=lambda: (chunk_start, fpb), max_elements=max_elements)
    col(1, q, k.transpose(1, 2), torch.tensor(key_frames))
    idx = col._idx.tolist()
    qframes = col._qframes.tolist()
    assert len(idx) == 6 and qframes == [6, 6, 7, 7, 8, 8]
    assert all(chunk_start + i // tpf == f for i, f in zip(idx, qframes))  # two tokens of every frame
    ref = _naive(q, k, idx, key_frames, F)
    for name, key in (("mass", "mass"), ("positive", "pos"), ("logit", "logit")):
        got = getattr(stats, name)[1]  # [hg, F, F]
        want = torch.zeros(hg, F, F, dtype=torch.float64)
        for n, qf in enumerate(qframes):
            want[:, qf] += ref[key][:, n]
        assert torch.allclose(got, want, atol=1e-5), name
    assert stats.mass[0].abs().sum() == 0  # another layer: untouched
    # count: 2 batch rows × 2 queries per query frame, for every key frame that exists (0..8)
    assert torch.equal(stats.count[1, 0, 6:], torch.full((3, F), 4.0, dtype=torch.float64))
    assert torch.allclose(stats.uniform[1, 0, 6:].sum(-1), torch.full((3,), 4.0, dtype=torch.float64))
    assert torch.allclose(stats.mass[1, 0, 6:].sum(-1), torch.full((3,), 4.0, dtype=torch.float64))


def test_collector_draws_the_same_queries_per_seed_and_chunk():
    stats = FrameStats.zeros(1, 1, 6, 3)
    chunk = [0]
    col = AttentionCollector(stats, tokens_per_frame=100, queries_per_frame=5, seed=1,
                             current_chunk=lambda: (chunk[0], 3))
    col._draw(3, 3)
    a = col._idx.clone()
    col._draw(3, 3)
    assert torch.equal(a, col._idx)
    col._draw(0, 3)
    assert not torch.equal(a - 300, col._idx)  # another chunk: another sample
    assert col._idx.unique().numel() == 15


def test_category_masks_partition_the_history():
    m = category_masks(21, 3, sink_frames=3, recent_frames=4)
    total = sum(v.astype(int) for v in m.values())
    assert total.max() == 1
    q = 12  # chunk 12..14: history 0..11; sink 0-2, recent 8-11, middle 3-7, current 12-14
    assert np.flatnonzero(m["sink"][q]).tolist() == [0, 1, 2]
    assert np.flatnonzero(m["middle"][q]).tolist() == [3, 4, 5, 6, 7]
    assert np.flatnonzero(m["recent"][q]).tolist() == [8, 9, 10, 11]
    assert np.flatnonzero(m["current"][q]).tolist() == [12, 13, 14]
    assert not any(v[:3].any() for v in m.values())  # the first chunk has no history: not counted


def test_summary_of_a_hand_built_sink_head():
    F, fpb = 12, 3
    st = FrameStats.zeros(1, 2, F, fpb)
    for q in range(F):
        cs = (q // fpb) * fpb
        keys = cs + fpb
        st.count[:, :, q, :keys] = 1
        st.uniform[:, :, q, :keys] = 1 / keys
        st.mass[0, 0, q, 0] = 1.0                  # head 0: everything on frame 0
        st.mass[0, 1, q, :keys] = 1 / keys         # head 1: uniform
        st.positive[:, :, q, :keys] = 0.5
    s = summarize(st, sink_frames=1, recent_frames=3)
    assert s.sink_mass[0, 0] == pytest.approx(1.0) and s.current_mass[0, 0] == 0
    assert s.sink_mass[0, 1] == pytest.approx(s.sink_uniform[0, 1])
    assert s.middle_mass[0, 1] == pytest.approx(s.middle_uniform[0, 1]) and s.middle_uniform[0, 1] > 0
    for h in range(2):  # the four categories add up to all the mass
        total = s.sink_mass[0, h] + s.recent_mass[0, h] + s.middle_mass[0, h] + s.current_mass[0, h]
        assert total == pytest.approx(1.0)
    assert s.mass_by_age[0, 0, 0] == 0 and np.isfinite(s.mass_by_age[0, 0]).all()
    assert s.mass_by_age.shape == (1, 2, F)


@pytest.mark.parametrize("period", [2.5, 4.0, 5.0, 2 * np.pi, 9.0])
def test_dominant_period_of_a_sinusoid(period):
    t = np.arange(20)
    p, strength, amp = dominant_period(1.5 * np.cos(2 * np.pi * t / period + 0.3) + 0.1 * t + 2.0)
    assert p == pytest.approx(period, rel=0.03)
    assert strength > 0.98 and amp == pytest.approx(1.5, rel=0.05)


def test_dominant_period_edge_cases():
    assert np.isnan(dominant_period(np.zeros(20))[0])
    assert np.isnan(dominant_period(np.arange(20.0))[0])     # a pure trend is removed: nothing left
    assert np.isnan(dominant_period(np.ones(3))[0])          # too short
    p, strength, _ = dominant_period(np.exp(-np.arange(20) / 3.0))  # monotonic decay: long "period"
    assert p > 10
    noise = np.random.default_rng(0).normal(size=20)
    assert dominant_period(noise)[1] < 0.6


# ---------------------------------------------------------------------------------------------
# the rollout on the tiny model


def test_profile_is_deterministic_and_bounded(tiny_model):
    kw = dict(frames=9, latent_height=8, latent_width=8, query_samples=6, taxonomy="head_forcing")
    a = profile_heads(tiny_model, [text_context(seed=1)], seed=4, **kw)
    b = profile_heads(tiny_model, [text_context(seed=1)], seed=4, **kw)
    c = profile_heads(tiny_model, [text_context(seed=1)], seed=5, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.stats.tensors().values(), b.stats.tensors().values()))
    assert not torch.equal(a.stats.mass, c.stats.mass)
    assert a.labels == b.labels
    assert a.stats.mass.shape == (2, 2, 9, 9)  # fixed size: layers × heads × frames × frames
    cal = a.calibration
    assert cal["queries_per_frame"] == 2 and cal["model_calls"] == 3 * 5 and cal["frames"] == 9
    # every observed query's mass sums to one over the key frames
    cnt = torch.diagonal(a.stats.count, dim1=-2, dim2=-1)
    assert torch.allclose(a.stats.mass.sum(-1), cnt)
    # 9 frames with sink 3 + recent 4 leave no middle frame: no pyramid labels, head_forcing only
    assert set(a.labels_by_taxonomy) == {"head_forcing"}


def test_profile_progress_and_interruption(tiny_model):
    seen = []
    ctx = [text_context(seed=1), text_context(seed=2)]
    profile_heads(tiny_model, ctx, frames=6, latent_height=4, latent_width=4, query_samples=3,
                  hooks=Hooks(progress=lambda d, t: seen.append((d, t))))
    assert seen[-1] == (20, 20) and [d for d, _ in seen] == list(range(1, 21))
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 7

    with pytest.raises(Interrupted):
        profile_heads(tiny_model, ctx, frames=6, latent_height=4, latent_width=4, hooks=Hooks(should_stop=stop))


def test_profile_refuses_bad_settings(tiny_model):
    ctx = [text_context()]
    with pytest.raises(ShapeError, match="between 6 .* and 21"):
        profile_heads(tiny_model, ctx, frames=24, latent_height=8, latent_width=8)
    with pytest.raises(ShapeError, match="between 6"):
        profile_heads(tiny_model, ctx, frames=5, latent_height=8, latent_width=8)
    with pytest.raises(ShapeError, match="text width"):
        profile_heads(tiny_model, [torch.zeros(1, 4, 512)], frames=6, latent_height=8, latent_width=8)
    with pytest.raises(ShapeError, match="divisible"):
        profile_heads(tiny_model, ctx, frames=6, latent_height=7, latent_width=8)
    with pytest.raises(ShapeError, match="at least one prompt"):
        profile_heads(tiny_model, [], frames=6, latent_height=8, latent_width=8)


def test_batch_rows_are_separate_prompts(tiny_model):
    two = torch.cat([text_context(seed=1), text_context(seed=2)])
    p = profile_heads(tiny_model, [two], frames=6, latent_height=4, latent_width=4, query_samples=3)
    q = profile_heads(tiny_model, [text_context(seed=1), text_context(seed=2)], frames=6, latent_height=4,
                      latent_width=4, query_samples=3)
    assert p.calibration["prompts"] == 2
    assert torch.equal(p.stats.mass, q.stats.mass)
