"""Smoke tests of the real ComfyUI host: start-up, node registration, tiny models, video out."""
from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import REPO, ComfyError, decode_workflow, expected_frames, save_nodes
from .video_check import read_video, video_info

CORE_NODES = ["UNETLoader", "VAELoader", "VAEDecode", "CreateVideo", "SaveVideo", "KSampler",
              "EmptyHunyuanLatentVideo", "CLIPLoader", "CLIPTextEncode"]
TEST_NODES = ["HFTestConditioning", "HFTestRandomLatent", "HFTestModelInfo", "HFTestVAEInfo"]


def test_server_starts_and_registers_nodes(comfy):
    info = comfy.object_info()
    missing = [n for n in CORE_NODES + TEST_NODES if n not in info]
    assert not missing, f"not registered: {missing}"
    assert info["HFTestConditioning"]["output"] == ["CONDITIONING"]
    log = comfy.log_text()
    assert "ComfyUI version: 0.3.75" in log
    if (REPO / "__init__.py").exists():
        ours = [n for n in info if n.startswith("HeadForcing")]
        failed = [line for line in log.splitlines() if "Cannot import" in line and "headforcing" in line]
        assert not failed, "\n".join(failed) + "\n" + log[-4000:]
        assert ours, "the pack loaded but registered no HeadForcing* node"


def test_tiny_models_are_detected_as_wan21(comfy):
    wf = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": comfy.models["wan"], "weight_dtype": "default"}},
        "2": {"class_type": "HFTestModelInfo", "inputs": {"model": ["1", 0]}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": comfy.models["vae"]}},
        "4": {"class_type": "HFTestVAEInfo", "inputs": {"vae": ["3", 0]}},
    }
    entry = comfy.run(wf, timeout=300)
    model = json.loads(comfy.ui_text(entry, "2")[0])
    assert model["model_config"] == "WAN21_T2V", model
    assert model["base_model"] == "WAN21", model
    assert model["diffusion_model"] == "comfy.ldm.wan.model.WanModel", model
    assert model["latent_format"] == "Wan21", model
    assert (model["dim"], model["num_heads"], model["num_blocks"]) == (256, 2, 2), model
    assert model["unet_config"]["model_type"] == "t2v", model
    assert model["unet_config"]["ffn_dim"] == 512 and model["unet_config"]["in_dim"] == 16, model
    vae = json.loads(comfy.ui_text(entry, "4")[0])
    assert vae["first_stage_model"] == "comfy.ldm.wan.vae.WanVAE", vae
    assert (vae["latent_channels"], vae["dim"], vae["z_dim"]) == (16, 8, 16), vae
    assert vae["upscale_ratio_t_of_3"] == 9 and vae["spatial_upscale"] == [8, 8], vae


@pytest.mark.parametrize("source", ["EmptyHunyuanLatentVideo", "HFTestRandomLatent"])
def test_vae_decode_writes_mp4(comfy, source):
    width, height, length = 64, 48, 9  # 9 frames -> T = 3 latent frames -> 4*3-3 = 9 frames
    latent = {"class_type": source, "inputs": {"width": width, "height": height, "length": length,
                                               "batch_size": 1}}
    if source == "HFTestRandomLatent":
        latent["inputs"]["seed"] = 3
    entry = comfy.run(decode_workflow(latent, comfy.models["vae"], prefix=f"e2e/decode_{source}"), timeout=300)
    videos = comfy.outputs(entry, ".mp4")
    assert len(videos) == 1 and videos[0].exists(), entry.get("outputs")
    frames, w, h = read_video(videos[0])
    assert (w, h) == (width, height)
    assert len(frames) == expected_frames(3) == 9
    meta = video_info(videos[0])
    assert meta["codec"] == "h264" and abs(meta["fps"] - 16) < 1e-6, meta
    if source == "HFTestRandomLatent":
        assert frames.std() > 1.0, "a random latent should not decode to a flat video"
        assert not np.array_equal(frames[0], frames[-1])


def _ksampler_workflow(models, prefix, steps=2):
    wf = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": models["wan"], "weight_dtype": "default"}},
        "2": {"class_type": "HFTestConditioning", "inputs": {"seed": 1, "length": 64}},
        "3": {"class_type": "HFTestConditioning", "inputs": {"seed": 2, "length": 64}},
        "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 5,
                                                                   "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 7, "steps": steps, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": models["vae"]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
    }
    wf.update(save_nodes(["7", 0], prefix))
    return wf


def test_core_ksampler_runs_the_tiny_wan(comfy):
    """ComfyUI's own Wan forward runs the tiny model (finite output) and the video is saved;
    the websocket carries progress and latent previews (--preview-method auto)."""
    run = comfy.run_ws(_ksampler_workflow(comfy.models, "e2e/ksampler"), timeout=300)
    videos = comfy.outputs(run.entry, ".mp4")
    frames, w, h = read_video(videos[0])
    assert (len(frames), w, h) == (expected_frames(2), 64, 64)
    assert frames.std() > 0.5
    progress = run.of_type("progress")
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 2, progress
    assert run.of_type("progress_state"), "no progress_state messages"
    assert any(ev == 4 and meta and meta.get("node_id") == "5" for ev, meta, _ in run.previews), \
        f"no preview with metadata from the sampler: {[(e, m) for e, m, _ in run.previews]}"
    assert run.of_type("execution_success")


def test_errors_carry_the_node_text(comfy):
    bad_name = _ksampler_workflow(comfy.models, "e2e/bad")
    bad_name["1"]["inputs"]["unet_name"] = "does_not_exist.safetensors"
    with pytest.raises(ComfyError, match="unet_name"):
        comfy.queue(bad_name)
    # passes validation, fails while running: a 4-channel image latent into the Wan VAE
    wf = decode_workflow({"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
                         comfy.models["vae"], prefix="e2e/fail")
    with pytest.raises(ComfyError, match=r"node 3 \(VAEDecode\)"):
        comfy.run(wf, timeout=120)
    assert comfy.server.alive()
