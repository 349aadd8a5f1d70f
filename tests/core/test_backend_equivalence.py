"""Every attention backend computes the same video through the sampler, for every preset.

The backends see what the plan makes: leads, per-type lengths, per-query-frame sequences
(Pyramid Forcing), device-side episode lengths (Head Forcing's memory heads), the grouped
order's query gather and output scatter, and a prerotated pool read in place. ``padded``
equals the independent per-head reference (test_per_head_reference.py); here every other
backend equals ``padded``. The varlen backends run with the kernels' documented contract
standing in for the CUDA kernels (varlen_contract.py); the GPU tests run the real ones.
"""

import pytest
import torch

from headforcing_core import WanConfig, generate, random_backbone
from headforcing_core.policies import HeadLabels, make_policy

from . import varlen_contract
from .conftest import latent_noise, text_context

TWELVE = WanConfig(dim=12 * 16, num_heads=12, num_layers=2, ffn_dim=128)
LABELS = {
    "pyramid_forcing": (("anchor", "wave", "veil") * 4, ("wave",) * 5 + ("anchor",) * 5 + ("veil",) * 2),
    "head_forcing": (("local", "anchor", "memory") * 4, ("memory",) * 6 + ("local",) * 3 + ("anchor",) * 3),
}


def policy(preset):
    if preset == "head_forcing":  # episodes that open, join and merge within the run
        from headforcing_core.policies import Episodic, RetentionRule
        return make_policy(preset, labels=HeadLabels(preset, LABELS[preset]),
                           rules={"memory": RetentionRule(sink=3, recent=4, middle=Episodic(3, 2, 0.5))})
    if preset == "pyramid_forcing":
        return make_policy(preset, labels=HeadLabels(preset, LABELS[preset]))
    if preset == "self_forcing_window":
        return make_policy(preset, recent=9)
    if preset == "sink_window":
        return make_policy(preset, sink=2, recent=6)
    return make_policy(preset)


@pytest.fixture(scope="module")
def twelve_heads():
    return random_backbone(TWELVE, seed=0)


@pytest.mark.parametrize("preset", ["full", "self_forcing_window", "sink_window", "longlive", "pyramid_forcing",
                                    "head_forcing"])
def test_every_backend_generates_what_padded_does(monkeypatch, twelve_heads, preset):
    frames = {"pyramid_forcing": 27, "head_forcing": 21}.get(preset, 15)
    ctx, noise = text_context(batch=2), latent_noise(frames, h=4, w=4, batch=2)
    varlen_contract.install(monkeypatch)

    def run(backend):
        with torch.no_grad():
            return generate(twelve_heads, ctx, noise, policy=policy(preset), attention_backend=backend,
                            generator=torch.Generator().manual_seed(5))

    want = run("padded")
    for backend in ("grouped", "torch_varlen", "flash_varlen"):
        got = run(backend)
        err = float((got - want).norm() / want.norm())
        assert err < 1e-5, f"{backend}: relative error {err:.2e} against padded"


def test_torch_varlen_without_used_lengths_packs_and_agrees(monkeypatch, twelve_heads):
    """A torch whose varlen kernel lacks ``seqused_k`` gets the keys packed: the same video."""
    ctx, noise = text_context(), latent_noise(21, h=4, w=4)
    runs = {}
    for seqused in (True, False):
        with monkeypatch.context() as mp:
            varlen_contract.install(mp, seqused=seqused)
            with torch.no_grad():
                runs[seqused] = generate(twelve_heads, ctx, noise, policy=policy("head_forcing"),
                                         attention_backend="torch_varlen", generator=torch.Generator().manual_seed(5))
    assert float((runs[True] - runs[False]).norm() / runs[False].norm()) < 1e-6
