"""Shared helpers of the head-profiling tests: a small Wan with planted attention heads.

Every planted head has constant (token-independent) queries and keys: the q/k Linear layers
are zeroed with a bias of 1, so after Wan's RMS norm the query/key of every token is the norm's
weight vector, which we set. Only temporal RoPE pairs carry energy, so a head's logit depends on
the relative time Δ = t_query − t_key alone (RoPE is a rotation by ω·t per pair):

* q = (a, 0), k = (0, ±b) on a slow pair (ω ≈ 0.053 rad/frame) gives ±(ab/√d)·sin(ωΔ), monotonic
  over the 21-frame window: ``+`` attends to the *oldest* key (frame 0: a sink head), ``−`` to the
  *newest* (the last frame of the current chunk: a local/recent head);
* q = k = (a, 0) on the fastest pair (ω = 1 rad/frame) gives (a²/√d)·cos(Δ): a periodic head with
  period 2π ≈ 6.28 frames;
* q = 0 gives uniform attention: a broad head.
"""
from __future__ import annotations

import torch

from headforcing_core import WanConfig, random_backbone

HEAD_DIM = 128
SLOW_PAIR = 7   # ω = 10000^(-14/44) ≈ 0.0534 rad/frame
FAST_PAIR = 0   # ω = 1 rad/frame

PLANTED = WanConfig(dim=512, num_heads=4, num_layers=2, ffn_dim=512)
# layer 0 has one of each kind; layer 1 a different mix (the Head Forcing recipe takes 25 % = 2
# anchors and 20 % of the remaining 6 = 1 local head, so 2 sink heads and 1 recent head in total)
LAYOUT = (("sink", "recent", "periodic", "broad"), ("periodic", "broad", "sink", "broad"))
EXPECTED = {
    "head_forcing": {"sink": "anchor", "recent": "local", "periodic": "memory", "broad": "memory"},
    "pyramid_forcing": {"sink": "veil", "recent": "veil", "periodic": "wave", "broad": "anchor"},
}


def head_vectors(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = torch.zeros(HEAD_DIM), torch.zeros(HEAD_DIM)
    if kind in ("sink", "recent"):
        q[2 * SLOW_PAIR] = 80.0
        k[2 * SLOW_PAIR + 1] = 80.0 if kind == "sink" else -80.0
    elif kind == "periodic":
        q[2 * FAST_PAIR] = 6.0
        k[2 * FAST_PAIR] = 6.0
    elif kind != "broad":
        raise ValueError(kind)
    return q, k


def planted_model(layout=LAYOUT, config: WanConfig = PLANTED, seed: int = 3):
    model = random_backbone(config, seed=seed)
    with torch.no_grad():
        for block, kinds in zip(model.blocks, layout):
            sa = block.self_attn
            qs, ks = zip(*(head_vectors(kind) for kind in kinds))
            for lin, norm, vec in ((sa.q, sa.norm_q, torch.cat(qs)), (sa.k, sa.norm_k, torch.cat(ks))):
                lin.weight.zero_()
                lin.bias.fill_(1.0)
                norm.weight.copy_(vec)
    return model


def expected_labels(taxonomy: str, layout=LAYOUT) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(EXPECTED[taxonomy][k] for k in row) for row in layout)


def contexts(n: int = 1, tokens: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, tokens, 4096, generator=g) * 0.5 for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# tests

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from headforcing_core.profiling import (HeadProfile, load_profile, profile_heads, pyramid_decisions,  # noqa: E402
                                        PyramidThresholds, save_profile)


@pytest.fixture(scope="module")
def planted_profile() -> HeadProfile:
    return profile_heads(planted_model(), contexts(2), frames=21, latent_height=8, latent_width=8, seed=0,
                         query_samples=24)


@pytest.mark.parametrize("taxonomy", ["head_forcing", "pyramid_forcing"])
def test_planted_heads_are_recovered(planted_profile, taxonomy):
    labels = planted_profile.labels_for(taxonomy)
    assert labels.taxonomy == taxonomy
    assert labels.types == expected_labels(taxonomy)


def test_planted_statistics_match_the_construction(planted_profile):
    s = planted_profile.summary()
    kinds = np.array(LAYOUT)
    sink, recent, periodic, broad = (kinds == k for k in ("sink", "recent", "periodic", "broad"))
    assert (s.sink_mass[sink] > 0.99).all()            # the oldest frame is frame 0, a sink frame
    assert (s.current_mass[recent] > 0.99).all()       # the newest frame is in the current chunk
    # broad heads: exactly uniform attention, centred logits exactly 0 → sign rate ½, no period
    assert np.allclose(s.sink_mass[broad], s.sink_uniform[broad])
    assert np.allclose(s.sign_rate_by_age[broad][:, 1:], 0.5)
    assert np.isnan(s.period[broad]).all()
    # periodic heads: period ≈ 2π frames, one sinusoid explains the logit-vs-age curve
    assert np.allclose(s.period[periodic], 2 * np.pi, atol=0.15)
    assert (s.period_strength[periodic] > 0.95).all()
    assert np.allclose(s.period_amplitude[periodic], 36 / np.sqrt(128), rtol=0.1)
    d = pyramid_decisions(s, PyramidThresholds())
    assert (d["sign_flips"][periodic] >= 4).all() and (d["sign_flips"][sink | recent] <= 1).all()
    assert (d["middle_ratio"][sink | recent] < 0.01).all()


def test_reclassification_needs_no_rollout(planted_profile, tmp_path):
    """Re-classify a profile read back from disk (no model anywhere) with other thresholds."""
    path = save_profile(planted_profile, tmp_path / "planted.safetensors")
    loaded = load_profile(path)
    # a period threshold below 2π: the periodic heads stop being waves and (broad) become anchors
    strict = loaded.classify("pyramid_forcing", period_threshold=6.0)
    assert strict.taxonomy == "pyramid_forcing"
    assert strict.thresholds["pyramid_forcing"]["period_threshold"] == 6.0
    want = tuple(tuple("anchor" if k == "periodic" else EXPECTED["pyramid_forcing"][k] for k in row) for row in LAYOUT)
    assert strict.labels.types == want
    # the Head Forcing recipe with 50 % anchors: sink heads first, then the heads with most sink mass
    wide = loaded.classify("head_forcing", anchor_fraction=0.5, local_fraction=0.0)
    assert wide.labels.counts() == {"local": 0, "anchor": 4, "memory": 4}
    assert all(wide.labels.types[li][hi] == "anchor" for li, row in enumerate(LAYOUT)
               for hi, k in enumerate(row) if k == "sink")
    # the stored profile is unchanged (profiles are immutable values)
    assert loaded.labels_for("pyramid_forcing").types == expected_labels("pyramid_forcing")


def test_planted_labels_drive_a_policy(planted_profile):
    from headforcing_core import generate, make_policy

    policy = make_policy("head_forcing", labels=planted_profile.labels)
    assert policy.labels.types == expected_labels("head_forcing")
    pyr = make_policy("pyramid_forcing", labels=planted_profile.labels_for("pyramid_forcing"))
    model = planted_model()
    noise = torch.randn(1, 16, 6, 8, 8, generator=torch.Generator().manual_seed(0))
    for pol in (policy, pyr):
        out = generate(model, contexts(1)[0], noise, policy=pol, generator=torch.Generator().manual_seed(1))
        assert out.shape == noise.shape and torch.isfinite(out).all()
