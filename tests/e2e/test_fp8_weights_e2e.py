"""fp8 weights in the real server (issue 21 part 3): UNETLoader's ``fp8_e4m3fn``, ``fp8_e4m3fn_fast`` and
``fp8_e5m2`` weight dtypes and a scaled-fp8 checkpoint, through the AR sampler.

One graph loads the tiny Wan's bf16 twin four ways (weight_dtype default and the three fp8 ones) and
its scaled-fp8 file once, samples each with the same seed, text and ``full`` policy, and saves the
latents and the sampler's report. Checked:

* the loaded size — ComfyUI's ``ModelPatcher.model_size()``, what the pre-flight counts and the report
  states — is the fp8 size :meth:`BackboneSpec.weights_bytes` restates (1 byte a parameter but the
  float32 patch embedding; scaled: fp8 Linear layers with a float32 scale each);
* the sampler computes in float32 with them (never in fp8), and its latents are what the core gives
  with the weights rounded to fp8 as ComfyUI stores them, run in float32 (to float32 rounding,
  ``rel < 1e-5``); ``fp8_e4m3fn_fast`` is ``fp8_e4m3fn`` on the CPU (no fp8 matrix multiplication
  there), bit for bit;
* against the bf16 twin the latents differ by fp8's rounding only: their relative L2 deviation is at
  most the weights' own relative L2 rounding error (e4m3: 3 mantissa bits, a relative step of 2⁻³ and
  a rounding error of at most 2⁻⁴ per weight in the normal range; e5m2: 2 bits, twice that), and e5m2
  deviates more than e4m3. Measured on the container (e4m3, e5m2, scaled e4m3): weights 1.94 % /
  3.43 % / 1.82 %, latents 1.03 % / 1.57 % / 0.82 %; and the server matches the core run of the stored
  weights to 0 (fp8 weight dtypes: the same float32 arithmetic) and 9e-8 (scaled: ComfyUI multiplies
  the scale into the input or the weight, whichever is smaller).
"""
from __future__ import annotations

import functools
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from headforcing_core import generate
from headforcing_core.backbone import BackboneSpec
from headforcing_core.noise import initial_noise
from headforcing_core.wan_model import WanBackbone
from tools import tiny_models as tiny

from .test_converter_e2e import renoise_generator, wan21_latent_format

BF16_TWIN = "hf_tiny_wan_bf16.safetensors"
SCALED = "hf_tiny_wan_fp8_scaled.safetensors"
FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
VARIANTS = {"default": (BF16_TWIN, "default"), **{w: (BF16_TWIN, w) for w in FP8}, "scaled": (SCALED, "default")}
WIDTH, HEIGHT, LENGTH, SEED, TEXT_SEED, TOKENS = 48, 32, 13, 5, 7, 40  # 4 latent frames: chunks of 3 + 1
SIGMA_TABLE_BYTES = 1000 * 4  # model_size() also counts the model_sampling's float32 sigma table


def _graph() -> dict:
    wf = {"2": {"class_type": "HFTestConditioning", "inputs": {"seed": TEXT_SEED, "length": TOKENS}}}
    for i, (variant, (unet, weight_dtype)) in enumerate(VARIANTS.items()):
        n = 10 * (i + 1)
        wf.update({
            str(n): {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": weight_dtype}},
            str(n + 1): {"class_type": "HFTestModelInfo", "inputs": {"model": [str(n), 0]}},
            str(n + 2): {"class_type": "HeadForcingARSampler", "inputs": {
                "model": [str(n), 0], "conditioning": ["2", 0], "width": WIDTH, "height": HEIGHT, "length": LENGTH,
                "seed": SEED, "length_unit": "frames", "steps": "1000,750,500,250", "shift": 5.0,
                "frames_per_block": 3, "policy": "full"}},
            str(n + 3): {"class_type": "SaveLatent", "inputs": {"samples": [str(n + 2), 0],
                                                                "filename_prefix": f"e2e/fp8_{variant}-"}},
            str(n + 4): {"class_type": "PreviewAny", "inputs": {"source": [str(n + 2), 1]}},
        })
    return wf


@pytest.fixture(scope="module")
def runs(comfy):
    """{variant: {"info": HFTestModelInfo JSON, "report": sampler report, "latent": LATENT tensor}}."""
    folder = comfy.base_dir / "models" / "diffusion_models"
    tiny.write_tiny_wan(folder / BF16_TWIN, seed=0, dtype=torch.bfloat16)
    tiny.write_tiny_wan_scaled_fp8(folder / SCALED, seed=0, source_dtype=torch.bfloat16)
    entry = comfy.run(_graph(), timeout=600)
    out = {}
    for i, variant in enumerate(VARIANTS):
        n = 10 * (i + 1)
        files = [p for p in comfy.outputs(entry, ".latent") if p.name.startswith(f"fp8_{variant}-")]
        assert len(files) == 1, (variant, entry.get("outputs"))
        out[variant] = {"info": json.loads(comfy.ui_text(entry, str(n + 1))[0]),
                        "report": comfy.ui_text(entry, str(n + 4))[0],
                        "latent": load_file(str(files[0]))["latent_tensor"].float()}
    return out


@functools.cache  # read-only: load_state_dict copies
def _stored_weights(variant: str) -> dict[str, torch.Tensor]:
    """The tiny model's weights as ComfyUI stores them for ``variant``, in float32: the bf16 twin's values
    rounded to fp8 (every parameter but the float32 patch embedding), or the scaled file's weights
    multiplied back by their scales, its Linear biases rounded to fp8 (ComfyUI loads them into fp8
    parameters, unscaled) and its other tensors as they are."""
    twin = tiny.tiny_wan_state_dict(seed=0, dtype=torch.bfloat16)
    if variant == "default":
        return {k: v.float() for k, v in twin.items()}
    if variant in FP8:
        return {k: v.float() if k.startswith("patch_embedding.") else v.to(FP8[variant]).float()
                for k, v in twin.items()}
    scaled = tiny.scaled_fp8_state_dict(twin)
    out = {}
    for k, v in twin.items():
        if k.endswith(".weight") and v.ndim == 2:
            out[k] = scaled[k].float() * scaled[k[: -len("weight")] + "scale_weight"]
        elif k.endswith(".bias") and twin[k[: -len("bias")] + "weight"].ndim == 2:
            out[k] = v.to(torch.float8_e4m3fn).float()
        else:
            out[k] = v.float()
    return out


def _core_latent(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The core's run of those weights in float32, with the node's documented noise, text and re-noising."""
    model = WanBackbone(tiny.tiny_wan_config())
    model.load_state_dict(weights)
    model.eval()
    context = torch.randn((1, TOKENS, 4096), generator=torch.Generator().manual_seed(TEXT_SEED)) * 0.1
    noise = initial_noise((1, 16, (LENGTH - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8), SEED)
    latents = generate(model, context, noise, steps=(1000, 750, 500, 250), shift=5.0, frames_per_block=3,
                       policy="full", generator=renoise_generator(SEED), dtype=torch.float32)
    return wan21_latent_format().process_out(latents)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _weights_rel(variant: str) -> float:
    """The relative L2 rounding error of the weights themselves (all tensors together)."""
    twin = _stored_weights("default")
    got = _stored_weights(variant)
    num = sum(float(((got[k] - twin[k]) ** 2).sum()) for k in twin)
    return (num / sum(float((twin[k] ** 2).sum()) for k in twin)) ** 0.5


def test_fp8_weights_load_at_the_fp8_size_the_preflight_counts(runs):
    spec = BackboneSpec.from_config(tiny.tiny_wan_config())
    expected = {"default": None, **{w: spec.weights_bytes(d) for w, d in FP8.items()},
                "scaled": spec.weights_bytes(torch.float32, scaled_fp8=torch.float8_e4m3fn)}
    for variant, run in runs.items():
        info, report = run["info"], run["report"]
        if variant == "default":  # the bf16 twin on the CPU: ComfyUI loads it in float32
            assert info["model_dtype"] == "torch.float32", info
            expected[variant] = spec.weights_bytes(torch.float32)
        assert info["diffusion_model_bytes"] == expected[variant], (variant, info)
        assert info["model_size"] == expected[variant] + SIGMA_TABLE_BYTES, (variant, info)
        # the report states the weights figure the pre-flight counted (model_size), and their format
        weights = re.search(r"\+ weights ([\d.]+) MiB as loaded \(([^)]*)\)", report)
        assert weights, report
        assert float(weights.group(1)) == pytest.approx(info["model_size"] / 2**20, abs=0.05), report
        assert "on cpu in float32" in report, report  # computed in float32, never in fp8
        print(f"\n[fp8] {variant}: model_size {info['model_size']} B; {weights.group(0)}")
    for w in FP8:
        assert runs[w]["info"]["param_dtypes"] == sorted({"torch.float32", str(FP8[w])}), runs[w]["info"]
        assert f"({str(FP8[w]).replace('torch.', '')})" in runs[w]["report"]
    assert runs["scaled"]["info"]["scaled_fp8"] == "torch.float8_e4m3fn"
    assert "scaled float8_e4m3fn Linear layers, the rest float32" in runs["scaled"]["report"]
    # fp8 is about half of bf16 (the float32 patch embedding is the difference)
    assert 0.5 < spec.weights_bytes(torch.float8_e4m3fn) / spec.weights_bytes(torch.bfloat16) < 0.51


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_latents_are_the_core_run_of_the_weights_as_comfyui_stores_them(runs, variant):
    expected = _core_latent(_stored_weights(variant))
    got = runs[variant]["latent"]
    assert got.shape == expected.shape == (1, 16, 4, HEIGHT // 8, WIDTH // 8)
    rel = _rel(got, expected)
    print(f"\n[fp8] {variant}: server vs core with the stored weights, rel L2 {rel:.2e}")
    assert rel < 1e-5, rel


def test_fast_fp8_is_plain_fp8_on_the_cpu(runs):
    """fp8_e4m3fn_fast asks for fp8 matrix multiplication, which ComfyUI uses only on GPUs that have
    it (comfy.model_management.supports_fp8_compute); on the CPU it falls back to casting the weights."""
    assert torch.equal(runs["fp8_e4m3fn_fast"]["latent"], runs["fp8_e4m3fn"]["latent"])


def test_fp8_latents_match_the_bf16_twin_to_fp8_rounding(runs):
    twin = runs["default"]["latent"]
    dev = {}
    for variant in ("fp8_e4m3fn", "fp8_e5m2", "scaled"):
        dev[variant] = _rel(runs[variant]["latent"], twin)
        bound = _weights_rel(variant)
        print(f"\n[fp8] {variant}: latents vs bf16 twin rel L2 {dev[variant]:.4f}; bound (weights' own rounding) "
              f"{bound:.4f}")
        assert 0.1 * bound < dev[variant] <= bound, (variant, dev[variant], bound)
    assert dev["fp8_e5m2"] > dev["fp8_e4m3fn"]  # 2 mantissa bits round coarser than 3
