"""Head profiling nodes in a real ComfyUI 0.3.75 server with the tiny Wan:
profile → save → load → cache policy → AR sampler → video; classify; presets; clear errors."""
from __future__ import annotations

import uuid

import numpy as np
import pytest

from .conftest import ComfyError, expected_frames
from .video_check import read_video

PROFILE_NODES = ["HeadForcingProfileHeads", "HeadForcingClassifyHeads", "HeadForcingSaveHeadProfile",
                 "HeadForcingLoadHeadProfile"]
PRESET = "preset: pyramid_forcing_self_forcing_1p3b"
# node ids of the graphs below ("1" UNETLoader, "2" conditioning, "3" sampler, ... from the harness)
PROFILE, SAVE, COND2, SUMMARY, LOAD, CLASSIFY, POLICY, POLICY_SUMMARY, REPORT, MAP = (
    "10", "11", "12", "13", "14", "15", "16", "17", "18", "19")


def _name(tag: str) -> str:
    return f"e2e_{tag}_{uuid.uuid4().hex[:8]}"


def _profile_node(**kw) -> dict:
    inputs = {"model": ["1", 0], "conditioning": ["2", 0], "conditioning_2": [COND2, 0], "latent_frames": 21,
              "width": 32, "height": 32, "seed": 0, "query_samples": 16, "taxonomy": "head_forcing"}
    inputs.update(kw)
    return {"class_type": "HeadForcingProfileHeads", "inputs": inputs}


def _policy_node(preset: str, profile_ref: list) -> dict:
    return {"class_type": "HeadForcingCachePolicy", "inputs": {
        "preset": preset, "rope": "preset default", "sink_frames": -1, "recent_frames": -1, "memory_episodes": 8,
        "memory_similarity": 0.9, "width": 32, "height": 32, "length": 161, "head_profile": profile_ref}}


def _sampler_graph(sampler_wf, extra: dict, *, prefix: str, length: int = 61) -> dict:
    inputs = {"length_unit": "frames", "steps": "1000,750,500,250", "shift": 5.0, "frames_per_block": 3,
              "kv_policy": [POLICY, 0]}
    extra = dict(extra)
    extra[REPORT] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}}
    extra[POLICY_SUMMARY] = {"class_type": "PreviewAny", "inputs": {"source": [POLICY, 1]}}
    return sampler_wf(inputs, width=32, height=32, length=length, seed=5, prefix=prefix, text_tokens=64,
                      extra_nodes=extra)


def _image_colors(path) -> set[tuple[int, int, int]]:
    from PIL import Image
    arr = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return {tuple(int(c) for c in px) for px in np.unique(arr, axis=0)}


def _error_of(comfy, wf: dict, timeout: float = 300) -> str:
    with pytest.raises(ComfyError) as info:
        comfy.run(wf, timeout=timeout)
    return str(info.value)


def test_profiling_schema(comfy):
    info = comfy.object_info()
    missing = [n for n in PROFILE_NODES if n not in info]
    assert not missing, f"not registered: {missing}"
    prof = info["HeadForcingProfileHeads"]
    assert prof["output"] == ["HEAD_PROFILE", "IMAGE", "STRING"]
    assert list(prof["input"]["required"]) == ["model", "conditioning", "latent_frames", "width", "height", "seed",
                                               "query_samples", "taxonomy"]
    assert {"conditioning_2", "conditioning_3", "conditioning_4"} <= set(prof["input"]["optional"])
    for node in PROFILE_NODES:
        for section in ("required", "optional"):
            for name, spec in info[node]["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    load = info["HeadForcingLoadHeadProfile"]["input"]["required"]["profile_name"]
    assert PRESET in (load[1].get("options") or load[0])
    assert info["HeadForcingSaveHeadProfile"]["output_node"] is True
    policy = info["HeadForcingCachePolicy"]["input"]["optional"]
    assert policy["head_profile"][0] == "HEAD_PROFILE"


def test_profile_save_load_policy_sample(comfy, sampler_wf):
    from headforcing_core.profiling import load_profile

    name = _name("tiny_profile")
    # 1) profile the tiny model on two prompts and save it
    wf = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": comfy.models["wan"], "weight_dtype": "default"}},
        "2": {"class_type": "HFTestConditioning", "inputs": {"seed": 1, "length": 64}},
        COND2: {"class_type": "HFTestConditioning", "inputs": {"seed": 2, "length": 64}},
        PROFILE: _profile_node(),
        SAVE: {"class_type": "HeadForcingSaveHeadProfile", "inputs": {"head_profile": [PROFILE, 0],
                                                                       "filename": name}},
        SUMMARY: {"class_type": "PreviewAny", "inputs": {"source": [PROFILE, 2]}},
        MAP: {"class_type": "PreviewImage", "inputs": {"images": [PROFILE, 1]}},
    }
    run = comfy.run_ws(wf, timeout=600)
    entry = run.entry
    summary = comfy.ui_text(entry, SUMMARY)[0]
    assert "2 layers × 2 heads, dim 256" in summary and "head_forcing (primary): local 1, anchor 1, memory 2" in summary
    assert "calibration: 2 prompt(s), 21 latent frames" in summary, summary
    # progress over every model call of both prompts: 2 × 7 chunks × 5 calls
    prog = [m for m in run.of_type("progress") if m.get("node") == PROFILE]
    assert prog and prog[-1]["value"] == prog[-1]["max"] == 70, prog[-3:]
    path = comfy.base_dir / "models" / "headforcing" / (name + ".safetensors")
    assert path.is_file(), (path, comfy.ui_text(entry, SAVE))
    assert str(path) in comfy.ui_text(entry, SAVE)[0]
    saved = load_profile(path)
    assert saved.model["num_layers"] == 2 and saved.model["num_heads"] == 2 and saved.model["dim"] == 256
    assert saved.calibration["prompts"] == 2 and saved.calibration["tokens_per_frame"] == 4
    assert set(saved.labels_by_taxonomy) == {"head_forcing", "pyramid_forcing"}
    # the heat map: node preview and the IMAGE output, coloured by type
    images = comfy.outputs(entry, ".png")
    assert images, entry.get("outputs")
    colors = _image_colors(images[0])
    assert {(232, 126, 34), (52, 101, 164), (46, 160, 90)} <= colors  # local, anchor, memory

    # 2) the new file is in the dropdown; load it, feed the policy, sample
    load = comfy.object_info("HeadForcingLoadHeadProfile")["HeadForcingLoadHeadProfile"]
    options = load["input"]["required"]["profile_name"]
    assert name + ".safetensors" in (options[1].get("options") or options[0])
    prefix = _name("profiled_policy")
    wf = _sampler_graph(sampler_wf, {
        LOAD: {"class_type": "HeadForcingLoadHeadProfile", "inputs": {"profile_name": name + ".safetensors",
                                                                       "model": ["1", 0]}},
        POLICY: _policy_node("head_forcing", [LOAD, 0]),
    }, prefix=prefix)
    entry = comfy.run(wf, timeout=600)
    frames, w, h = read_video(comfy.outputs(entry, ".mp4")[0])
    assert (w, h, len(frames)) == (32, 32, expected_frames(16))
    policy_summary = comfy.ui_text(entry, POLICY_SUMMARY)[0]
    assert f"head labels from profile '{name}.safetensors'" in policy_summary, policy_summary
    assert "local 1, anchor 1, memory 2" in policy_summary
    assert "policy: head_forcing [compact RoPE]" in comfy.ui_text(entry, REPORT)[0]

    # 3) re-classify the loaded profile (no rollout) for the pyramid_forcing policy, and sample
    prefix = _name("classified_policy")
    wf = _sampler_graph(sampler_wf, {
        LOAD: {"class_type": "HeadForcingLoadHeadProfile", "inputs": {"profile_name": name + ".safetensors"}},
        CLASSIFY: {"class_type": "HeadForcingClassifyHeads", "inputs": {
            "head_profile": [LOAD, 0], "taxonomy": "pyramid_forcing", "period_threshold": 6.4,
            "sign_threshold": 0.8, "veil_middle_ratio": 2.0}},
        POLICY: _policy_node("pyramid_forcing", [CLASSIFY, 0]),
        SUMMARY: {"class_type": "PreviewAny", "inputs": {"source": [CLASSIFY, 2]}},
    }, prefix=prefix)
    entry = comfy.run(wf, timeout=600)
    assert len(read_video(comfy.outputs(entry, ".mp4")[0])[0]) == expected_frames(16)
    text = comfy.ui_text(entry, SUMMARY)[0]
    assert "pyramid_forcing (primary)" in text and "veil_middle_ratio 2" in text, text
    # a middle-frame ratio of 2 makes every (random, roughly uniform) head a veil head
    assert "pyramid_forcing (primary): anchor 0, wave 0, veil 4" in text, text
    assert "policy: pyramid_forcing [window_clamp RoPE]" in comfy.ui_text(entry, REPORT)[0]


def test_preset_loads_with_attribution_and_guards_the_shape(comfy, sampler_wf):
    wf = {
        LOAD: {"class_type": "HeadForcingLoadHeadProfile", "inputs": {"profile_name": PRESET}},
        SUMMARY: {"class_type": "PreviewAny", "inputs": {"source": [LOAD, 2]}},
    }
    text = comfy.ui_text(comfy.run(wf, timeout=120), SUMMARY)[0]
    assert "30 layers × 12 heads, dim 1536" in text and "IF-LAB-PKU/Pyramid-Forcing" in text
    assert "pyramid_forcing (primary): anchor 172, wave 156, veil 32" in text, text
    # with the tiny model attached: refused, naming both shapes
    wf[LOAD]["inputs"]["model"] = ["1", 0]
    wf["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": comfy.models["wan"], "weight_dtype": "default"}}
    err = _error_of(comfy, wf)
    assert "30 layers × 12 heads, dim 1536" in err and "2 layers × 2 heads, dim 256" in err, err
    # a preset has no statistics: it cannot be re-classified
    err = _error_of(comfy, {
        LOAD: {"class_type": "HeadForcingLoadHeadProfile", "inputs": {"profile_name": PRESET}},
        CLASSIFY: {"class_type": "HeadForcingClassifyHeads", "inputs": {"head_profile": [LOAD, 0],
                                                                         "taxonomy": "pyramid_forcing"}},
        SUMMARY: {"class_type": "PreviewAny", "inputs": {"source": [CLASSIFY, 2]}},
    })
    assert "no statistics" in err, err
    # the 30×12 labels in a policy for the 2×2 tiny model: the sampler refuses with both shapes
    err = _error_of(comfy, _sampler_graph(sampler_wf, {
        LOAD: {"class_type": "HeadForcingLoadHeadProfile", "inputs": {"profile_name": PRESET}},
        POLICY: _policy_node("pyramid_forcing", [LOAD, 0]),
    }, prefix=_name("preset_wrong_model")))
    assert "30-layer × 12-head" in err and "2 layers × 2 heads" in err, err


@pytest.mark.parametrize("filename", ["../outside", "/tmp/abs_profile", "a/../../x"])
def test_save_refuses_names_leaving_the_folder(comfy, filename):
    wf = {
        LOAD: {"class_type": "HeadForcingLoadHeadProfile", "inputs": {"profile_name": PRESET}},
        SAVE: {"class_type": "HeadForcingSaveHeadProfile", "inputs": {"head_profile": [LOAD, 0],
                                                                       "filename": filename}},
    }
    err = _error_of(comfy, wf)
    assert "is not allowed" in err and "sub-folders separated by '/'" in err, err
    assert not (comfy.base_dir / "models" / "outside.safetensors").exists()
    assert comfy.server.alive()


def test_profiling_refuses_bad_sizes_before_work(comfy):
    wf = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": comfy.models["wan"], "weight_dtype": "default"}},
        "2": {"class_type": "HFTestConditioning", "inputs": {"seed": 1, "length": 16}},
        PROFILE: _profile_node(latent_frames=4, conditioning_2=None),
        SUMMARY: {"class_type": "PreviewAny", "inputs": {"source": [PROFILE, 2]}},
    }
    del wf[PROFILE]["inputs"]["conditioning_2"]
    err = _error_of(comfy, wf)
    assert "between 6" in err and "21" in err, err
    wf[PROFILE]["inputs"].update(latent_frames=21, width=40)
    err = _error_of(comfy, wf)
    assert "multiple of 16" in err, err
