"""ComfyUI model patches the Head Forcing sampler cannot apply are reported, not silently dropped.

Core ComfyUI 0.3.75 nodes patch the tiny model the way users do in Wan graphs — ModelSamplingSD3
(an object patch), ScaleROPE (``transformer_options["rope_options"]``), TomePatchModel (attn1
patches), Self-Attention Guidance (an attn1 replacement + a post-CFG function), CFGNorm (a
post-CFG function), EasyCache (sampling wrappers + a transformer option) — and the sampler's
``report`` (and the Continue node's) names each one. The report is truthful: the patched model samples exactly what the
unpatched one does. (LoRA weight patches, which the sampler does apply, are checked in
test_converter_e2e.py.)
"""
from __future__ import annotations

from safetensors.torch import load_file

SAMPLER = {"width": 64, "height": 64, "length": 9, "seed": 3, "policy": "full"}


def test_unapplied_model_patches_are_reported_and_change_nothing(comfy):
    chain = [
        ("ModelSamplingSD3", {"shift": 8.0}),
        ("ScaleROPE", {"scale_x": 1.0, "shift_x": 0.0, "scale_y": 1.0, "shift_y": 0.0, "scale_t": 2.0,
                       "shift_t": 0.0}),
        ("TomePatchModel", {"ratio": 0.3}),
        ("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0}),
        ("CFGNorm", {"strength": 1.0}),
        ("EasyCache", {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95, "verbose": False}),
    ]
    wf = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": comfy.models["wan"], "weight_dtype": "default"}},
        "2": {"class_type": "HFTestConditioning", "inputs": {"seed": 1, "length": 512}},
    }
    prev = "1"
    for i, (cls, inputs) in enumerate(chain):
        node = str(20 + i)
        wf[node] = {"class_type": cls, "inputs": {"model": [prev, 0], **inputs}}
        prev = node
    wf.update({
        "3": {"class_type": "HeadForcingARSampler",
              "inputs": {"model": [prev, 0], "conditioning": ["2", 0], **SAMPLER}},
        "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "e2e/patched"}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
        "13": {"class_type": "HeadForcingARSampler",
               "inputs": {"model": ["1", 0], "conditioning": ["2", 0], **SAMPLER}},
        "14": {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "e2e/unpatched"}},
        "15": {"class_type": "PreviewAny", "inputs": {"source": ["13", 1]}},
        # the Continue node runs the same MODEL and reports the same
        "6": {"class_type": "HeadForcingContinue",
              "inputs": {"model": [prev, 0], "ar_state": ["3", 2], "conditioning": ["2", 0], "length": 3.0,
                         "length_unit": "latent_frames", "transition": "cut", "transition_frames": 0, "seed": 3}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["6", 2]}},
    })
    entry = comfy.run(wf, timeout=600)

    report = comfy.ui_text(entry, "5")[0]
    print(f"\n[model patches] report of the patched model:\n{report}")
    for expected in (
            "model patches NOT applied by this sampler",
            "model_sampling object patch (ModelSamplingSD3",            # ModelSamplingSD3
            "RoPE options (scale_t=2; ScaleROPE)",                       # ScaleROPE
            "transformer patch 'attn1_patch' (1)",                       # TomePatchModel
            "transformer patch 'attn1_output_patch' (1)",
            "'attn1' replacement patch for 1 block(s) (middle)",         # SelfAttentionGuidance
            "post-CFG function (sampler_post_cfg_function, 2)",          # SelfAttentionGuidance + CFGNorm
            "transformer_options['easycache']",                          # EasyCache
            "'outer_sample' wrapper (easycache)", "'calc_cond_batch' wrapper (easycache)",
            "'diffusion_model' wrapper (easycache)"):
        assert expected in report, (expected, report)
    assert "patched weights" not in report, report
    continue_report = comfy.ui_text(entry, "7")[0]
    assert report[report.index("model patches NOT applied"):] in continue_report, continue_report
    plain_report = comfy.ui_text(entry, "15")[0]
    assert "model patches" not in plain_report, plain_report
    assert "model patch not applied: model_sampling object patch" in comfy.log_text()

    files = {p.name.split("_0")[0]: p for p in comfy.outputs(entry, ".latent")}
    assert set(files) == {"patched", "unpatched"}, files
    patched = load_file(str(files["patched"]))["latent_tensor"]
    unpatched = load_file(str(files["unpatched"]))["latent_tensor"]
    assert (patched == unpatched).all(), "a patch reported as not applied changed the samples"
