"""HeadForcingCachePolicy in a real ComfyUI 0.3.75 server: its KV_POLICY drives the sampler for
every preset, its parameters reach the sampler, its summary reports the memory, bad
parameters fail in the policy node with a clear message."""
from __future__ import annotations

import re
import uuid

import pytest
import torch
from safetensors.torch import load_file

from .conftest import ComfyError, expected_frames
from .video_check import read_video

PRESETS = ["full", "self_forcing_window", "sink_window", "longlive", "pyramid_forcing", "head_forcing"]
POLICY, SAMPLER, REPORT, SUMMARY = "10", "3", "20", "21"


def _policy_node(preset: str, **kw) -> dict:
    inputs = {"preset": preset, "rope": "preset default", "sink_frames": -1, "recent_frames": -1,
              "memory_episodes": 8, "memory_similarity": 0.9, "width": 832, "height": 480, "length": 961}
    inputs.update(kw)
    return {"class_type": "HeadForcingCachePolicy", "inputs": inputs}


def _workflow(sampler_wf, policy_node: dict | None, *, prefix: str, length: int = 101, seed: int = 21,
              width: int = 32, height: int = 32, **sampler_inputs) -> dict:
    inputs = {"length_unit": "frames", "steps": "1000,750,500,250", "shift": 5.0, "frames_per_block": 3}
    inputs.update(sampler_inputs)
    extra = {REPORT: {"class_type": "PreviewAny", "inputs": {"source": [SAMPLER, 1]}}}
    if policy_node is not None:
        inputs["kv_policy"] = [POLICY, 0]
        extra[POLICY] = policy_node
        extra[SUMMARY] = {"class_type": "PreviewAny", "inputs": {"source": [POLICY, 1]}}
    return sampler_wf(inputs, width=width, height=height, length=length, seed=seed, prefix=prefix,
                      text_tokens=64, extra_nodes=extra)


def test_policy_schema(comfy):
    info = comfy.object_info("HeadForcingCachePolicy")["HeadForcingCachePolicy"]
    assert info["category"] == "sampling/head_forcing"
    assert info["output"] == ["KV_POLICY", "STRING"]
    assert info["output_name"] == ["kv_policy", "summary"]
    req = info["input"]["required"]
    assert list(req) == ["preset", "rope", "sink_frames", "recent_frames", "memory_episodes",
                         "memory_similarity", "width", "height", "length"]
    for name, spec in req.items():
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    options = req["preset"][1].get("options") or req["preset"][0]
    assert options == PRESETS and req["preset"][1]["default"] == "head_forcing"
    rope = req["rope"][1].get("options") or req["rope"][0]
    assert rope == ["preset default", "absolute", "window_clamp", "window_shift", "compact"]
    # the sampler accepts it
    sampler = comfy.object_info("HeadForcingARSampler")["HeadForcingARSampler"]["input"]
    assert sampler["optional"]["kv_policy"][0] == "KV_POLICY"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_drives_the_sampler(comfy, sampler_wf, preset):
    # 101 frames = 26 latent frames > the 21-frame window: the bounded policies evict
    prefix = f"e2e/policy_{preset}_{uuid.uuid4().hex[:6]}"
    entry = comfy.run(_workflow(sampler_wf, _policy_node(preset), prefix=prefix), timeout=600)
    videos = comfy.outputs(entry, ".mp4")
    assert len(videos) == 1, entry.get("outputs")
    frames, w, h = read_video(videos[0])
    assert (w, h) == (32, 32) and len(frames) == expected_frames(26) == 101

    report = comfy.ui_text(entry, REPORT)[0]
    assert f"policy: {preset} [" in report, report
    rope = {"full": "absolute", "self_forcing_window": "absolute", "sink_window": "window_shift",
            "longlive": "absolute", "pyramid_forcing": "window_clamp", "head_forcing": "compact"}[preset]
    assert f"[{rope} RoPE]" in report, report
    summary = comfy.ui_text(entry, SUMMARY)[0]
    assert summary.startswith(f"{preset} [{rope} RoPE]"), summary
    assert "Wan2.1-T2V-1.3B, 832x480, 961 frames (241 latent, 60.1 s" in summary, summary
    assert re.search(r"KV cache \d+\.\d\d GiB", summary), summary
    print(f"\n[{preset}] summary:\n{summary}\n[{preset}] report:\n{report}")


def test_policy_parameters_reach_the_sampler(comfy, sampler_wf):
    prefix = f"e2e/policy_params_{uuid.uuid4().hex[:6]}"
    node = _policy_node("sink_window", rope="compact", sink_frames=2, recent_frames=5)
    entry = comfy.run(_workflow(sampler_wf, node, prefix=prefix, length=61), timeout=600)
    report = comfy.ui_text(entry, REPORT)[0]
    assert "policy: sink_window [compact RoPE] — all: sink 2 + recent 5" in report, report


def test_memory_episodes_change_the_budget(comfy):
    def summary(episodes: int) -> str:
        wf = {POLICY: _policy_node("head_forcing", memory_episodes=episodes),
              SUMMARY: {"class_type": "PreviewAny", "inputs": {"source": [POLICY, 1]}}}
        return comfy.ui_text(comfy.run(wf, timeout=120), SUMMARY)[0]

    def kv(text: str) -> float:
        return float(re.search(r"KV cache (\d+\.\d+) GiB", text).group(1))

    small, large = summary(2), summary(32)
    assert "episodic memory (2 episodes" in small and "episodic memory (32 episodes" in large
    assert kv(small) < kv(large), (small, large)
    # the 1.3B preset labels are Pyramid Forcing's, mapped to head_forcing types (said so)
    assert "STAND-IN" in small


def test_connected_policy_equals_the_dropdown(comfy, sampler_wf):
    """The policy node with preset defaults and the sampler's dropdown give the same latents."""
    latents = []
    for use_node in (True, False):
        prefix = f"e2e/policy_same_{uuid.uuid4().hex[:6]}"
        wf = _workflow(sampler_wf, _policy_node("head_forcing") if use_node else None, prefix=prefix,
                       length=97, seed=5, policy="head_forcing")
        wf["30"] = {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER, 0], "filename_prefix": prefix}}
        entry = comfy.run(wf, timeout=600)
        (path,) = comfy.outputs(entry, ".latent")
        latents.append(load_file(str(path))["latent_tensor"])
    assert latents[0].shape == (1, 16, 25, 4, 4)
    assert torch.equal(latents[0], latents[1])


@pytest.mark.parametrize("kw, message", [
    (dict(preset="self_forcing_window", recent_frames=3),
     r"a window of 3 frames is below one chunk of 3 frames plus history; use at least 4"),
    (dict(preset="head_forcing", width=840), r"width 840 is not a positive multiple of 16"),
])
def test_bad_policy_parameters_fail_in_the_policy_node(comfy, sampler_wf, kw, message):
    prefix = f"e2e/policy_bad_{uuid.uuid4().hex[:6]}"
    with pytest.raises(ComfyError) as info:
        comfy.run(_workflow(sampler_wf, _policy_node(**kw), prefix=prefix, length=33), timeout=300)
    text = str(info.value)
    assert "HeadForcingCachePolicy" in text and re.search(message, text), text
    folder = comfy.output_dir / "e2e"
    assert not list(folder.glob(prefix.split("/")[1] + "*"))
