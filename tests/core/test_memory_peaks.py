"""Measured peaks: the head-aware presets hold less than the window, and the pre-flight estimate is the
measurement (issue 20).

Every preset runs what the AR Sampler node runs (two prompts, the AR_STATE captured) under the allocation
tracker (headforcing_core.bench_memory) on the 1.3B model's head layout — 30 layers × 12 heads — made
narrow (16-wide heads, Wan's feed-forward ratio, a short text) so that, as at 832×480, the KV cache
dominates and the rest keeps its proportions. Two sizes, float32 on the CPU. The *device* peak is the
peak before the AR_STATE is captured (on a GPU the state goes to host memory); the whole-run peak, state
included, is what a CPU device holds. The ratios are the issue's goals at 832×480 (docs/benchmarks.md §7
has the 1.3B and 14B figures and the command).
"""

import pytest
import torch
import torch.nn.functional as F

import headforcing_core.cache as cache_module
import headforcing_core.memory as memory_module
from headforcing_core import random_backbone
from headforcing_core.bench import MODEL_SHAPES
from headforcing_core.bench_memory import measure_run
from headforcing_core.policies import HeadLabels, make_policy
from headforcing_core.prompts import PromptSegment

NARROW_1P3B, NARROW_14B = MODEL_SHAPES["1.3b-narrow"], MODEL_SHAPES["14b-narrow"]
PRESETS = ("self_forcing_window", "sink_window", "longlive", "pyramid_forcing", "head_forcing")
GOALS = {"head_forcing": 0.6, "pyramid_forcing": 1.0, "sink_window": 0.8, "longlive": 0.65}
SIZES = {"64 tokens": (16, 16, 12), "96 tokens": (16, 24, 9)}  # latent height, width, frames


def prompts(dim=4096, tokens=20):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(1, tokens, dim, generator=g) * 0.5 for _ in range(2)]


def within_bounds(report: dict, key: str = "device") -> None:
    """The estimate within −5 % / +15 % of the measurement."""
    ratio = report["device_estimate_over_measured"] if key == "device" else report["estimate_over_measured"]
    assert 0.95 <= ratio <= 1.15, (key, ratio, report["phases"], report["device_estimate"] if key == "device"
                                   else report["estimate"])


@pytest.fixture(scope="module")
def narrow_1p3b():
    return random_backbone(NARROW_1P3B, seed=0)


@pytest.fixture(scope="module", params=list(SIZES))
def measured(request, narrow_1p3b):
    h, w, frames = SIZES[request.param]
    return {p: measure_run(narrow_1p3b, p, prompts(), latent_frames=frames, latent_height=h, latent_width=w)
            for p in PRESETS}


def test_the_estimate_is_the_measured_peak_for_every_preset(measured):
    for preset, report in measured.items():
        within_bounds(report, "device")
        within_bounds(report, "whole run")


def test_head_aware_presets_hold_less_than_the_window(measured):
    window = measured["self_forcing_window"]["device_peak_bytes"]
    ratios = {p: measured[p]["device_peak_bytes"] / window for p in GOALS}
    assert all(ratios[p] <= goal for p, goal in GOALS.items()), ratios


def test_one_layer_of_history_is_gathered_at_a_time(measured):
    """The largest allocation of a model call is the KV arena; nothing else comes near one layer's share of it."""
    for preset in ("pyramid_forcing", "head_forcing", "sink_window"):
        report = measured[preset]
        kv = report["kv_bytes"]
        during = [a for a in report["largest_at_peak"] if a["phase"] in ("plan", "model_calls")]
        assert all(a["bytes"] < kv / 4 for a in during), (preset, during[:3], kv)


def test_commit_slices_keep_the_estimate(monkeypatch, narrow_1p3b):
    """Pooling a frame into episodes a slice of heads at a time (as a 14B model's commit does) is estimated too."""
    monkeypatch.setattr(cache_module, "COMMIT_SLICE_BYTES", 40_000)
    monkeypatch.setattr(memory_module, "COMMIT_SLICE_BYTES", 40_000)
    report = measure_run(narrow_1p3b, "head_forcing", prompts(), latent_frames=12, latent_height=16, latent_width=16)
    within_bounds(report)


@pytest.mark.parametrize("preset, mode", [("longlive", None), ("longlive", "longlive_local_sink"),
                                          ("self_forcing_window", "block_causal"), ("head_forcing", None)])
def test_a_recache_switch_is_estimated(narrow_1p3b, preset, mode):
    """A recache re-runs frames under the new prompt: LongLive's in one call of up to 12 frames (the sink
    attended past its window), block_causal chunk by chunk with history gathered even for a pool read in
    place. Its phase is measured and the estimate holds; without it the estimate is below the measurement."""
    switch = PromptSegment(prompts()[1], 1, transition="recache", transition_frames=9, recache_mode=mode)
    report = measure_run(narrow_1p3b, preset, prompts(), latent_frames=30, latent_height=8, latent_width=16,
                         switch=switch)
    within_bounds(report)
    assert "recache" in report["phases"] and "recache" in report["device_estimate"]["phases"]
    if preset == "longlive":  # the widest call of the run: the recache's
        phases = report["device_estimate"]["phases"]
        assert phases["recache"] > max(v for k, v in phases.items() if k != "recache")
        assert report["phases"]["recache"]["peak_bytes"] == report["device_peak_bytes"]


@pytest.mark.parametrize("preset", ["self_forcing_window", "pyramid_forcing", "head_forcing", "head_forcing_split"])
def test_the_14b_layout_is_measured_and_estimated(preset):
    """Wan 2.1 14B's 40 layers × 40 heads (narrow), every head typed: the uniform fallback (every head memory,
    with the local heads' recent window) and Head Forcing's reported 25 / 15 / 60 % split."""
    model = random_backbone(NARROW_14B, seed=0)
    policy = preset
    if preset == "head_forcing_split":
        row = ("anchor",) * 10 + ("local",) * 6 + ("memory",) * 24
        policy = make_policy("head_forcing", labels=HeadLabels("head_forcing", (row,) * 40))
    report = measure_run(model, policy, prompts(), latent_frames=12, latent_height=8, latent_width=8)
    within_bounds(report)


class CastingLinear(torch.nn.Linear):
    """A Linear whose weights are stored in another dtype and cast to the input's at every call, freed after it:
    what ComfyUI's ops do with fp8 weights (comfy/ops.py ``cast_bias_weight``)."""

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def test_weights_cast_on_the_fly_are_measured_and_estimated():
    """Weights stored in bfloat16 and computed in float32 (fp8's case, in a dtype the CPU multiplies): every Linear
    casts its weight when it runs. The estimate adds the widest cast (the time projection's, here) and stays the
    measurement; the measured peak grows by what the estimate says."""
    reports = {}
    for stored in (torch.float32, torch.bfloat16):
        model = random_backbone(NARROW_14B, seed=0)
        for layer in model.modules():
            if type(layer) is torch.nn.Linear and stored != torch.float32:
                layer.__class__ = CastingLinear
                layer.to(stored)
        reports[stored] = measure_run(model, "head_forcing", prompts(), latent_frames=12, latent_height=8,
                                      latent_width=8, dtype=torch.float32)
        within_bounds(reports[stored])
    plain, cast = reports[torch.float32], reports[torch.bfloat16]

    def growth(phase: str, measured_phase: str) -> tuple[int, int]:
        return (cast["phases"][measured_phase]["peak_bytes"] - plain["phases"][measured_phase]["peak_bytes"],
                cast["device_estimate"]["phases"][phase] - plain["device_estimate"]["phases"][phase])

    weight = NARROW_14B.dim * 6 * NARROW_14B.dim * 4  # the time projection's weight in float32
    grown, estimated = growth("run", "model_calls")  # the time projection's cast over the call's own peak
    assert estimated > weight / 2 and 0.9 * estimated <= grown <= 1.1 * estimated, (grown, estimated)
    grown, estimated = growth("prompt", "prompt")  # the cross-attention's k / v cast while a prompt is encoded
    assert estimated > 0 and 0.8 * estimated <= grown <= 1.2 * estimated, (grown, estimated)
