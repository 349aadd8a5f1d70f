"""Krea Realtime's loop in the real ComfyUI server: a Krea-format checkpoint (``model.`` + Wan 2.1 names, tiny)
through Load Diffusion Model, the sampler's Krea preset with and without the VAE (the same latents as the core
run on the same weights), the pack's streaming VAE against ComfyUI's own decode, bad input refused before
sampling, and the shipped Krea workflow."""
from __future__ import annotations

import json
import uuid

import pytest

from .conftest import REPO, ComfyError, expected_frames, host
from .core_runs import run_core
from .workflow_twins import shipped_twins

KREA_FILE = "hf_tiny_krea_format.safetensors"
SAMPLER = "3"
KREA = "Krea Realtime 14B"


@pytest.fixture(scope="module")
def krea_model(comfy):
    """The tiny Wan (seed 0) written as Krea's loader reads a checkpoint: every key under ``model.``."""
    from safetensors.torch import save_file

    from tools import tiny_models as tiny
    sd = tiny.tiny_wan_state_dict(seed=0)
    save_file({f"model.{k}": v for k, v in sd.items()}, str(comfy.base_dir / "models" / "diffusion_models" / KREA_FILE))
    return KREA_FILE


def _prefix(tag: str) -> str:
    return f"e2e/{tag}_{uuid.uuid4().hex[:8]}"


def _krea_inputs(**kw) -> dict:
    inputs = {"model_preset": KREA, "vae": ["4", 0]}
    inputs.update(kw)
    return {k: v for k, v in inputs.items() if v is not None}


def test_a_krea_format_file_loads_through_unet_loader(comfy, krea_model):
    wf = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": krea_model, "weight_dtype": "default"}},
          "2": {"class_type": "HFTestModelInfo", "inputs": {"model": ["1", 0]}}}
    entry = comfy.run(wf, timeout=120)
    info = json.loads(comfy.ui_text(entry, "2")[0])
    assert info["model_config"] == "WAN21_T2V" and info["latent_format"] == "Wan21"
    assert info["num_blocks"] == 2 and info["dim"] == 256  # ComfyUI stripped the "model." prefix itself


def test_context_vae_streams_what_comfy_decodes(comfy):
    """The pack's block-by-block decode (the decoder's causal cache kept between blocks) equals ComfyUI's
    VAE.decode of the whole latent; its one-frame encode equals VAE.encode of that frame."""
    wf = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": comfy.models["wan"], "weight_dtype": "default"}},
          "2": {"class_type": "VAELoader", "inputs": {"vae_name": comfy.models["vae"]}},
          "3": {"class_type": "HFTestRandomLatent", "inputs": {"seed": 3, "width": 64, "height": 48, "length": 33,
                                                                   "batch_size": 1}},
          "4": {"class_type": "HFTestContextVAE", "inputs": {"model": ["1", 0], "vae": ["2", 0], "latent": ["3", 0],
                                                          "block": 3}}}
    entry = comfy.run(wf, timeout=300)
    info = json.loads(comfy.ui_text(entry, "4")[0])
    assert info["frames"] == info["comfy_frames"] == 33
    assert info["decode_max_abs"] <= 1e-5 * max(1.0, info["decode_scale"]), info
    assert info["encode_shape"] == [1, 16, 1, 6, 8]
    assert info["encode_max_abs"] <= 1e-4 * max(1.0, info["encode_scale"]), info


def test_krea_loop_with_the_vae(comfy, sampler_wf, krea_model):
    """4 blocks, so that the context's first latent is re-encoded (from block 2 on)."""
    prefix = _prefix("krea_vae")
    wf = sampler_wf(_krea_inputs(), unet_name=krea_model, width=64, height=48, length=45, seed=3, prefix=prefix)
    wf["20"] = {"class_type": "PreviewAny", "inputs": {"source": [SAMPLER, 1]}}
    entry = comfy.run(wf, timeout=600)
    report = "\n".join(comfy.ui_text(entry, "20"))
    assert "loop: Krea's (release_server.py GenerationSession): 4 blocks of 3" in report, report
    assert "context's first latent: reencode" in report and "APPROXIMATION" not in report
    assert "model calls" in report and "AR_STATE: none" in report
    from .video_check import read_video
    (video,) = comfy.outputs(entry, ".mp4")
    assert read_video(video)[0].shape[0] == expected_frames(12)


def test_krea_loop_without_a_vae_is_the_core_run(comfy, sampler_wf, krea_model, tmp_path):
    """No VAE: the approximation, said in the report; the LATENT is what the core's generate_krea makes from the
    same weights, conditioning, seed (Krea's noise draws) and settings."""
    prefix = _prefix("krea_latent")
    width, height, length, seed, text_seed = 48, 32, 45, 5, 7
    wf = sampler_wf(_krea_inputs(vae=None), unet_name=krea_model, width=width, height=height, length=length,
                    seed=seed, text_seed=text_seed, text_tokens=40, prefix=prefix)
    wf["20"] = {"class_type": "PreviewAny", "inputs": {"source": [SAMPLER, 1]}}
    wf["30"] = {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER, 0], "filename_prefix": prefix}}
    entry = comfy.run(wf, timeout=600)
    report = "\n".join(comfy.ui_text(entry, "20"))
    assert "context's first latent: latent — APPROXIMATION (no VAE)" in report, report
    (latent,) = comfy.outputs(entry, ".latent")
    res = run_core(tmp_path, _CORE_KREA, latent, width, height, length, seed, text_seed, 40)
    assert res["shape"] == [1, 16, 12, 4, 6] and res["max_abs_diff"] < 1e-4, res


_CORE_KREA = r'''
from headforcing_core.krea import KreaSettings, generate_krea
from headforcing_core.noise import krea_generator, krea_initial_noise
gen = krea_generator(seed)
noise = krea_initial_noise((1, 16, (length - 1) // 4 + 1, height // 8, width // 8), gen, torch.float32)
latents = generate_krea(model, context, noise, gen, KreaSettings(first_latent="latent"), dtype=torch.float32)
mine = lf.Wan21().process_out(latents.float())
json.dump({"shape": list(comfy_latent.shape), "max_abs_diff": float((mine - comfy_latent).abs().max())},
          open(out, "w"))
'''


@pytest.mark.parametrize("inputs, message", [
    (dict(context_frames=19), "trained on 21 latent frames"),
    (dict(vae=None, context_first_latent="reencode"), "connect the Wan 2.1 VAE"),
    (dict(kv_policy=["10", 0]), "a cache policy does not apply"),
], ids=["context-past-trained-positions", "reencode-without-vae", "kv-policy"])
def test_bad_input_is_refused_before_sampling(comfy, sampler_wf, krea_model, inputs, message):
    wf = sampler_wf(_krea_inputs(**inputs), unet_name=krea_model, width=64, height=48, length=45,
                    prefix=_prefix("krea_bad"))
    wf["10"] = {"class_type": "HeadForcingCachePolicy",
                "inputs": {"preset": "head_forcing", "rope": "preset default", "sink_frames": -1,
                           "recent_frames": -1, "memory_episodes": 8, "memory_similarity": 0.9, "width": 64,
                           "height": 48, "length": 45}}
    before = comfy.log_text()
    with pytest.raises(ComfyError, match=message):
        comfy.run(wf, timeout=120)
    assert "headforcing: interrupted" not in comfy.log_text()[len(before):]


def test_krea_workflow_twins_and_tiny_run(comfy, krea_model):
    ui, api = shipped_twins(REPO / "workflows", "headforcing_krea_realtime", comfy.object_info())
    sampler = next(n for n in api.values() if n["class_type"] == "HeadForcingARSampler")
    assert sampler["inputs"]["model_preset"] == KREA and isinstance(sampler["inputs"]["vae"], list)
    unet = next(n for n in api.values() if n["class_type"] == "UNETLoader")
    assert unet["inputs"]["weight_dtype"] == "fp8_e4m3fn"
    assert sum(n["class_type"] == "HeadForcingPromptSegment" for n in api.values()) == 4
    # the tiny pipeline: every segment 1 s (3 latent frames: 4 blocks, prompt changes between them)
    wf = host.patch_workflow(api, {"diffusion_models": krea_model, "vae": comfy.models["vae"]}, tiny=True,
                             overrides={"width": 64, "height": 48}, seed=None)
    for node in wf.values():
        if node["class_type"] == "HeadForcingPromptSegment":
            node["inputs"]["length"] = 1.0
        if node["class_type"] == "SaveVideo":
            node["inputs"]["filename_prefix"] = _prefix("krea_workflow")
    entry = comfy.run(wf, timeout=600)
    from .video_check import read_video
    (video,) = comfy.outputs(entry, ".mp4")
    assert read_video(video)[0].shape[0] == expected_frames(12)


def test_krea_checkpoint_through_the_self_forcing_loop(comfy, sampler_wf, krea_model):
    """The second Krea preset: Krea's steps (the last at timestep 0) through Self Forcing's loop, so that a
    head-aware cache policy applies; the report says which loop ran."""
    wf = sampler_wf({"model_preset": "Krea Realtime 14B, Self Forcing loop", "policy": "head_forcing"},
                    unet_name=krea_model, width=64, height=48, length=33, prefix=_prefix("krea_sf"))
    wf["20"] = {"class_type": "PreviewAny", "inputs": {"source": [SAMPLER, 1]}}
    entry = comfy.run(wf, timeout=600)
    report = "\n".join(comfy.ui_text(entry, "20"))
    assert "loop: Self Forcing's loop" in report and "steps 1000,750,500,250,0" in report, report
    assert "policy: head_forcing" in report or "head_forcing" in report
