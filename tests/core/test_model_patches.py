"""nodes/model_patches.py: which ComfyUI model patches the sampler applies, and the report of the others.

The module is pure Python and is loaded from its file (``nodes/__init__.py`` imports ComfyUI).
The first tests use the plain structures ComfyUI 0.3.75's ModelPatcher builds (see the
comments: the method that makes each one); the last one builds a REAL ModelPatcher from the
local ComfyUI in a subprocess and applies the patches with ComfyUI's own methods.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFY = ROOT / ".host" / "ComfyUI"


def _load():
    name = "hf_nodes_model_patches"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "nodes" / "model_patches.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


mp = _load()


def fn(*args, **kwargs):
    return None


def patcher(**kw):
    """A ModelPatcher's patch-carrying attributes, as ModelPatcher.__init__ leaves them."""
    base = dict(patches={}, object_patches={}, model_options={"transformer_options": {}}, wrappers={},
                callbacks={}, hook_patches={})
    base.update(kw)
    return SimpleNamespace(**base)


def test_a_plain_model_has_nothing_to_report():
    assert mp.unhonoured_patches(patcher()) == []
    assert mp.patch_report(patcher()) == []


def test_lora_weight_patches_are_applied_not_reported():
    # add_patches: {weight key: [(strength_patch, adapter, strength_model, offset, function)]}
    p = patcher(patches={"diffusion_model.blocks.0.self_attn.q.weight": [(1.0, object(), 1.0, None, None)],
                         "diffusion_model.blocks.0.ffn.0.weight": [(1.0, object(), 1.0, None, None)]})
    assert mp.unhonoured_patches(p) == []
    (line,) = mp.patch_report(p)
    assert "2 patched weights" in line and "applied" in line


def test_every_kind_of_dropped_patch_is_named():
    to = {
        "patches": {"attn1_patch": [fn], "attn1_output_patch": [fn], "double_block": []},   # set_model_attn1_patch …
        "patches_replace": {"attn1": {("middle", 0, 0): fn},                                # set_model_attn1_replace
                            "dit": {("double_block", 1): fn, ("double_block", 0): fn}},    # set_model_patch_replace
        "rope_options": {"scale_x": 1.0, "scale_y": 1.0, "scale_t": 2.0,                    # set_model_rope_options
                         "shift_x": 0.0, "shift_y": 0.0, "shift_t": 3.0},
        "wrappers": {"diffusion_model": {None: [fn]}},                                     # patcher_extension.add_wrapper
        "my_custom_entry": {"x": 1},
    }
    options = {"transformer_options": to,
               "sampler_post_cfg_function": [fn, fn],        # set_model_sampler_post_cfg_function
               "disable_cfg1_optimization": True,
               "sampler_cfg_function": fn,                   # set_model_sampler_cfg_function
               "model_function_wrapper": fn,                 # set_model_unet_function_wrapper
               "denoise_mask_function": fn}                  # set_model_denoise_mask_function
    p = patcher(model_options=options,
                wrappers={"outer_sample": {"easycache": [fn]}, "apply_model": {}},   # add_wrapper_with_key
                callbacks={"on_load_after": {None: [fn]}, "on_pre_run": {None: [fn]}},
                object_patches={"model_sampling": object(), "manual_cast_dtype": None, "diffusion_model.x": 1},
                hook_patches={"hook": {}})
    notes = mp.unhonoured_patches(p)
    text = "\n".join(notes)
    expected = ["transformer patch 'attn1_patch' (1)", "transformer patch 'attn1_output_patch' (1)",
                "'attn1' replacement patch for 1 block(s) (middle)", "'dit' replacement patch for 2 block(s) "
                "(double_block)", "RoPE options (scale_t=2, shift_t=3; ScaleROPE)",
                "transformer_options wrapper 'diffusion_model' (1)", "transformer_options['my_custom_entry']",
                "post-CFG function (sampler_post_cfg_function, 2)", "CFG function (sampler_cfg_function, 1)",
                "model function wrapper", "denoise mask function", "'outer_sample' wrapper (easycache)",
                "'on_pre_run' callback (1)", "hook weight patches (1 hooks", "model_sampling object patch",
                "compute dtype patch (ModelComputeDtype)", "object patch 'diffusion_model.x'"]
    for e in expected:
        assert e in text, (e, text)
    assert len(notes) == len(expected), text
    # an empty patch list, an empty wrapper table and the loading callbacks are not reported
    assert "'double_block' (" not in text and "'apply_model' wrapper" not in text and "on_load_after" not in text
    report = mp.patch_report(p)
    assert report[0] == f"model patches NOT applied by this sampler ({len(expected)}):"
    assert all(line.startswith("  - ") for line in report[1:])


def test_identity_rope_options_are_honoured():
    p = patcher(model_options={"transformer_options": {"rope_options": dict(mp.IDENTITY_ROPE)}})
    assert mp.unhonoured_patches(p) == []


def test_real_model_patcher_from_comfyui():
    if not (COMFY / "comfy" / "model_patcher.py").exists():
        if os.environ.get("HF_E2E_REQUIRED") == "1":
            pytest.fail(".host/ComfyUI is missing")
        pytest.skip(".host/ComfyUI is not built (python3 tools/host.py build)")
    script = f"""
import importlib.util, json, sys
sys.argv = ["x", "--cpu"]
sys.path.insert(0, {str(COMFY)!r})
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.model_patcher as cmp
from comfy.patcher_extension import CallbacksMP, WrappersMP
spec = importlib.util.spec_from_file_location("mp", {str(ROOT / "nodes" / "model_patches.py")!r})
mp = importlib.util.module_from_spec(spec); spec.loader.exec_module(mp)

f = lambda *a, **k: None
p = cmp.ModelPatcher(torch.nn.Linear(4, 4), torch.device("cpu"), torch.device("cpu"))
out = {{"plain": mp.patch_report(p)}}
q = p.clone()
q.add_patches({{"weight": (torch.zeros(4, 4),)}}, 1.0)       # a weight diff, as a LoRA file's adapters are
out["weights"] = mp.patch_report(q)
q.set_model_attn1_patch(f)                                   # e.g. TomePatchModel
q.set_model_attn1_replace(f, "middle", 0, 0)                 # e.g. SelfAttentionGuidance
q.set_model_patch_replace(f, "dit", "double_block", 1)       # block replacement
q.set_model_rope_options(1.0, 0.0, 1.0, 0.0, 2.0, 0.0)       # ScaleROPE
q.set_model_sampler_post_cfg_function(f)                     # CFGNorm, SkipLayerGuidanceDiT
q.set_model_unet_function_wrapper(f)
q.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, "easycache", f)   # EasyCache
q.add_callback(CallbacksMP.ON_PRE_RUN, f)
q.add_object_patch("model_sampling", object())               # ModelSamplingSD3
out["patched"] = mp.patch_report(q)
out["clone_of_plain_unchanged"] = mp.patch_report(p)
print("JSON" + json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=str(COMFY))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.split("JSON", 1)[1])
    assert out["plain"] == [] and out["clone_of_plain_unchanged"] == []
    assert len(out["weights"]) == 1 and "1 patched weights" in out["weights"][0]
    text = "\n".join(out["patched"])
    for e in ("1 patched weights", "NOT applied by this sampler (9)", "transformer patch 'attn1_patch'",
              "'attn1' replacement patch", "'dit' replacement patch", "RoPE options (scale_t=2",
              "post-CFG function", "model function wrapper", "'diffusion_model' wrapper (easycache)",
              "'on_pre_run' callback", "model_sampling object patch"):
        assert e in text, (e, text)
