"""The Wan 2.1 14B layout (40 layers × 40 heads) through everything that reads a model's shape: every cache
policy preset (the Self Forcing loop), the labels a 14B model gets without a profile, Profile Heads (1,600
heads) and its pre-flight, the estimate, the heat map. Narrow heads (width 8) keep it fast on a CPU."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from headforcing_core import WanConfig, generate, random_backbone
from headforcing_core.backbone import BackboneSpec
from headforcing_core.errors import MemoryBudgetError
from headforcing_core.memory import GiB, estimate_run, preflight
from headforcing_core.policies import PRESETS, make_policy, resolve_labels
from headforcing_core.profiling import profile_heads
from headforcing_core.profiling.profile import estimate_profile
from headforcing_core.schedule import linspace_steps
from headforcing_core.wan_model import WAN21_1_3B, WAN21_14B

from .conftest import LAYOUT_14B, latent_noise, text_context
from .dense_reference import dense_generate

ROOT = Path(__file__).resolve().parents[2]
KREA_STEPS = linspace_steps(5)  # the Krea checkpoint's own step list, through the Self Forcing loop


pytestmark = pytest.mark.usefixtures("one_thread", "no_grad")


@pytest.fixture(scope="module")
def model():
    return random_backbone(LAYOUT_14B, seed=4)


def test_the_layout_is_named():
    assert BackboneSpec.from_config(LAYOUT_14B).layout == "Wan 2.1 14B"
    assert BackboneSpec.from_config(WAN21_14B).describe_layout() == "40 layers × 40 heads × 128 (Wan 2.1 14B)"
    assert BackboneSpec.from_config(WAN21_1_3B).layout == "Wan 2.1 1.3B"
    assert BackboneSpec.from_config(WanConfig(dim=256, num_heads=2, num_layers=2, ffn_dim=512)).layout is None


def test_full_policy_on_the_14b_layout_equals_the_dense_reference(model):
    ctx, noise = text_context(), latent_noise(6, h=4, w=4)
    ours = generate(model, ctx, noise, steps=KREA_STEPS, frames_per_block=3, policy="full",
                    generator=torch.Generator().manual_seed(2))
    ref = dense_generate(model, ctx, noise, KREA_STEPS, 5.0, 3, torch.Generator().manual_seed(2))
    assert float((ours - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "full"])
def test_every_policy_preset_runs_the_14b_layout(model, preset):
    """Past the 21-frame window (24 latent frames), so every bounded preset evicts."""
    out = generate(model, text_context(), latent_noise(24, h=4, w=4), steps=(1000, 500), frames_per_block=3,
                   policy=preset, generator=torch.Generator().manual_seed(1))
    assert out.shape == (1, 16, 24, 4, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("preset, kind", [("head_forcing", "memory"), ("pyramid_forcing", "anchor")])
def test_a_14b_model_without_a_profile_gets_a_documented_default(preset, kind):
    """Never the 1.3B label file: a uniform default, and a note that says so and what to do."""
    pol = resolve_labels(make_policy(preset), 40, 40)
    assert pol.labels.shape == (40, 40) and {t for t, n in pol.labels.counts().items() if n} == {kind}
    assert "uniform fallback" in pol.note and "40×40" in pol.note and "Profile Heads" in pol.note
    assert "Self Forcing labels" not in pol.note


def test_profile_heads_labels_1600_heads(model):
    prof = profile_heads(model, [text_context()], frames=12, latent_height=4, latent_width=4, seed=0,
                         query_samples=6, steps=(1000, 500))
    assert prof.labels.shape == (40, 40)
    counts = prof.labels.counts()
    assert sum(counts.values()) == 1600
    # Head Forcing's recipe by construction: 25 % anchor, 20 % of the rest local, the rest memory
    assert counts == {"anchor": 400, "local": 240, "memory": 960}
    assert prof.labels_for("pyramid_forcing").shape == (40, 40)
    assert "40 layers × 40 heads" in prof.describe()
    # the browser's head map gets all 1,600 heads with their statistics, in a payload of reasonable size
    import json
    payload = _load_nodes_module("messages").head_map_payload(prof)
    assert (payload["layers"], payload["heads"]) == (40, 40) and payload["stats"] is not None
    assert len(json.dumps(payload)) < 2_000_000


def test_profile_preflight_at_14b_size_says_what_fits():
    """Profiling a real 14B at 832x480 over the full 21-frame window needs its whole KV (≈ 25 GiB) next to
    the weights: on a 32 GB card the pre-flight refuses and names a window that fits."""
    spec = BackboneSpec.from_config(WAN21_14B)
    weights = 14_288_491_584  # fp8: one byte per parameter

    def est(t, h, w):
        e = estimate_profile(spec, frames=t, latent_height=h, latent_width=w, dtype=torch.bfloat16)
        return e.__class__(**{**e.__dict__, "weights_bytes": weights})

    full = est(21, 60, 104)
    assert full.kv_bytes > 24 * GiB
    with pytest.raises(MemoryBudgetError, match=r"latent_frames (\d+)") as info:
        preflight(est, latent_frames=21, latent_height=60, latent_width=104, free_bytes=32 * GiB, min_frames=6,
                  describe_length=lambda t: f"latent_frames {t}", what="the calibration video")
    fits = int(info.value.args[0].split("latent_frames ")[1].split()[0].rstrip(",."))
    assert 6 <= fits < 21 and est(fits, 60, 104).total_bytes <= 0.9 * 32 * GiB


def test_estimate_reads_the_14b_shape():
    spec = BackboneSpec.from_config(WAN21_14B)
    win = estimate_run(spec, "self_forcing_window", latent_frames=240, latent_height=60, latent_width=104)
    # K and V of 21 frames × 1560 tokens × 40 layers × 5120 channels, bf16
    assert win.kv_bytes == 21 * 1560 * 40 * 2 * 5120 * 2
    assert 24.9 * GiB < win.kv_bytes < 25.1 * GiB


def _load_nodes_module(name):
    """nodes/<name>.py as a module of a stand-in package (nodes/__init__.py imports ComfyUI)."""
    pkg = "hf_nodes_plain"
    if pkg not in sys.modules:
        spec = importlib.util.spec_from_loader(pkg, loader=None, is_package=True)
        mod = importlib.util.module_from_spec(spec)
        mod.__path__ = [str(ROOT / "nodes")]
        sys.modules[pkg] = mod
    full = f"{pkg}.{name}"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(full, ROOT / "nodes" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[full] = mod
        spec.loader.exec_module(mod)
    return sys.modules[full]


def test_heat_map_of_1600_heads():
    pytest.importorskip("PIL")
    heat_map = _load_nodes_module("heat_map")
    labels = resolve_labels(make_policy("head_forcing"), 40, 40).labels
    img = heat_map.render_heat_map(labels, "a 14B model")
    _, h, w, c = img.shape
    assert c == 3 and h >= 40 * 8 and w >= 40 * 8  # every head a visible cell


def test_fp8_weights_add_the_cast_of_one_linear_to_the_estimate():
    """ComfyUI casts fp8 weights to the compute dtype one Linear at a time (comfy/ops.py ``cast_bias_weight``);
    the estimate holds the cast weight at the stage of the call where it is widest. At 832×480 on 14B the
    attention call is the widest stage, so its q/k/v/o weight is what an fp8 run adds: 5120² + 5120 in bf16."""
    import dataclasses

    spec = BackboneSpec.from_config(WAN21_14B)
    fp8 = dataclasses.replace(spec, weights_dtype=torch.float8_e4m3fn)
    assert fp8 == spec  # the same shape, whatever the weights are stored in
    casts = fp8.weight_cast_bytes(torch.bfloat16)
    assert casts == {"embedding": (5120 * 30720 + 30720) * 2, "attention": (5120 * 5120 + 5120) * 2,
                     "ffn": (5120 * 13824 + 13824) * 2, "text": (4096 * 5120 + 5120) * 2}
    assert set(dataclasses.replace(spec, weights_dtype=torch.bfloat16).weight_cast_bytes(torch.bfloat16).values()) == {0}
    kw = dict(latent_frames=241, latent_height=60, latent_width=104, dtype=torch.bfloat16)
    for preset in ("self_forcing_window", "head_forcing"):
        grown = estimate_run(fp8, preset, **kw).run_bytes - estimate_run(spec, preset, **kw).run_bytes
        assert grown == casts["attention"], preset


def test_the_spec_knows_how_the_weights_are_stored(model):
    from headforcing_core.backbone import inspect_backbone

    assert inspect_backbone(model).weights_dtype == torch.float32
    assert inspect_backbone(random_backbone(LAYOUT_14B, seed=4, dtype=torch.bfloat16)).weights_dtype == torch.bfloat16
