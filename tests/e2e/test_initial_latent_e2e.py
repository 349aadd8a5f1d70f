"""Image-to-video, video extension and the model presets of HeadForcingARSampler in a real ComfyUI 0.3.75
server with the tiny random Wan2.1 model and Wan VAE (issue 12, deliverables 2 and 3).

Covers: a PNG in the server's input folder through core LoadImage -> VAEEncode (tiny VAE) -> the sampler's
``initial_latent`` with a frame-wise preset writes a video of the right length, and the sampler's new frames
equal the core's ``generate(initial_latent=process_in(VAEEncode), first_chunk_steps=...)`` outside ComfyUI
(so the preset's values and KSampler's latent conversion are what ran); an MP4 through core LoadVideo ->
GetVideoComponents -> VAEEncode -> sampler -> LatentConcat writes initial + new frames; the model preset rule
and the report; the memory pre-flight counting the initial frames; the shipped workflows (image-to-video,
extend-a-video, LongLive story) run end to end; bad initial latents and first-chunk lists fail before any
work with a clear message and write nothing.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from .conftest import REPO, ComfyError, host
from .video_check import read_video
from .workflow_twins import shipped_twins

SAMPLER = "3"
REPORT = "20"
FIRST_STEPS = "1000,750,500,250"


def _prefix(tag: str) -> str:
    return f"e2e/{tag}_{uuid.uuid4().hex[:8]}"


def _files_with_prefix(comfy, prefix: str) -> list[Path]:
    folder = comfy.output_dir / Path(prefix).parent
    return sorted(folder.glob(Path(prefix).name + "*")) if folder.exists() else []


def _write_png(comfy, width: int, height: int, seed: int = 0) -> str:
    """A random RGB PNG in the server's input folder; returns its name (what LoadImage takes)."""
    import numpy as np
    from PIL import Image

    name = f"hf_e2e_start_{uuid.uuid4().hex[:8]}.png"
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(comfy.base_dir / "input" / name)
    return name


def _write_mp4(comfy, frames: int, width: int, height: int, fps: int = 16, seed: int = 0) -> str:
    """An H.264 MP4 of ``frames`` random frames in the server's input folder (LoadVideo's folder)."""
    import av
    import numpy as np

    name = f"hf_e2e_clip_{uuid.uuid4().hex[:8]}.mp4"
    rng = np.random.default_rng(seed)
    with av.open(str(comfy.base_dir / "input" / name), mode="w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return name


def _base(comfy, sampler_inputs: dict, *, width: int, height: int, length: int, seed: int, prefix: str,
          initial: list | None, extra: dict, concat: bool = True, text_seed: int = 7) -> dict:
    """UNETLoader + HFTestConditioning -> sampler(initial_latent) -> [LatentConcat(initial, new)] -> VAEDecode ->
    CreateVideo -> SaveVideo, the report shown by PreviewAny."""
    inputs = {"model": ["1", 0], "conditioning": ["2", 0], "width": width, "height": height, "length": length,
              "seed": seed, "policy": "self_forcing_window"}
    if initial is not None:
        inputs["initial_latent"] = initial
    inputs.update(sampler_inputs)
    wf = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": comfy.models["wan"], "weight_dtype": "default"}},
        "2": {"class_type": "HFTestConditioning", "inputs": {"seed": text_seed, "length": 40}},
        "3": {"class_type": "HeadForcingARSampler", "inputs": inputs},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": comfy.models["vae"]}},
        "12": {"class_type": "LatentConcat", "inputs": {"samples1": initial, "samples2": [SAMPLER, 0], "dim": "t"}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0] if concat and initial else [SAMPLER, 0],
                                                   "vae": ["4", 0]}},
        "90": {"class_type": "CreateVideo", "inputs": {"images": ["5", 0], "fps": 16.0}},
        "91": {"class_type": "SaveVideo", "inputs": {"video": ["90", 0], "filename_prefix": prefix, "format": "mp4",
                                                    "codec": "h264"}},
        REPORT: {"class_type": "PreviewAny", "inputs": {"source": [SAMPLER, 1]}},
    }
    if not (concat and initial):
        del wf["12"]
    wf.update(extra)
    return wf


def _image_nodes(comfy, image_name: str) -> dict:
    return {"10": {"class_type": "LoadImage", "inputs": {"image": image_name}},
            "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 0]}}}


def _sampler_progress(run) -> list[dict]:
    return [m for m in run.of_type("progress") if str(m.get("node")) == SAMPLER]


# --------------------------------------------------------------------------------------------
# image-to-video: LoadImage -> VAEEncode -> sampler, equal to the core's run
# --------------------------------------------------------------------------------------------

def test_image_to_video_from_load_image_equals_core_run(comfy, tmp_path):
    """Causal Forcing++ frame-wise 2-step preset, its widgets left at chunk-wise values: the preset's values
    run (frames per block 1, steps 1000,500, first chunk 4 steps) and the new frames equal the core's."""
    width, height, length, seed = 64, 48, 17, 5  # 17 frames = 5 latent = the image + 4 new
    image = _write_png(comfy, width, height, seed=1)
    prefix = _prefix("i2v")
    wf = _base(comfy, {"model_preset": "Causal Forcing++ frame-wise 2-step", "frames_per_block": 3,
                       "steps": "1000,750,500,250", "first_chunk_steps": "", "shift": 5.0},
               width=width, height=height, length=length, seed=seed, prefix=prefix, initial=["11", 0],
               extra={**_image_nodes(comfy, image),
                      "30": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0],
                                                                   "filename_prefix": prefix + "_initial"}},
                      "31": {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER, 0],
                                                                   "filename_prefix": prefix + "_new"}}})
    run = comfy.run_ws(wf, timeout=300)

    (video,) = comfy.outputs(run.entry, ".mp4")
    frames, w, h = read_video(video)
    assert (w, h) == (width, height) and len(frames) == length  # 4 * (1 + 4) - 3
    # model calls: 1 clean pass for the image, the first new frame 4 steps + clean pass, 3 frames 2 + 1
    progress = _sampler_progress(run)
    assert progress and {m["max"] for m in progress} == {1 + 5 + 3 * 3}, progress
    assert max(m["value"] for m in progress) == 15

    report = comfy.ui_text(run.entry, REPORT)[0]
    print("\n[report]\n" + report)
    assert "16 new frames (4 latent) after an initial latent of 1 latent frame (1 video frame)" in report, report
    assert "the whole video is 17 frames (5 latent" in report, report
    assert ("model preset: Causal Forcing++ frame-wise 2-step (zhuhz22/Causal-Forcing "
            "causal-forcing++/framewise-2step.pt") in report, report
    assert "frames per block 1, steps 1000,500, first-chunk steps 1000,750,500,250, shift 5" in report, report
    assert ("the preset replaced the widget values frames_per_block 3 -> 1; steps 1000,750,500,250 -> 1000,500; "
            "first_chunk_steps (empty) -> 1000,750,500,250") in report, report
    assert "chunks: 4 of 1 latent frames, 2 steps + clean pass each; the first chunk 4 steps" in report, report

    latents = {("initial" if "_initial" in p.name else "new"): p for p in comfy.outputs(run.entry, ".latent")}
    assert set(latents) == {"initial", "new"}, latents
    script = tmp_path / "core_i2v.py"
    script.write_text(_CORE_I2V.format(repo=str(REPO), comfy=str(host.COMFY)))
    out = tmp_path / "core.json"
    proc = subprocess.run([str(host.VENV_PY), str(script), str(latents["initial"]), str(latents["new"]), str(out),
                           str(width), str(height), str(length), str(seed), "7", "40"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    print("[core]", res)
    assert res["initial_shape"] == [1, 16, 1, 6, 8] and res["new_shape"] == [1, 16, 4, 6, 8], res
    assert res["max_abs_diff"] < 1e-4, res
    # the initial latent really is mapped into the model's space (process_in) before it is cached, and the
    # preset's first-chunk list really ran: either change gives other frames
    assert res["max_abs_diff_raw_initial"] > 1e-2, res
    assert res["max_abs_diff_no_first_chunk"] > 1e-2, res


_CORE_I2V = r'''
import json, sys
sys.path.insert(0, {repo!r})
import torch
from safetensors.torch import load_file
from headforcing_core import generate
from headforcing_core.noise import noise_frames
from headforcing_core.wan_model import WanBackbone
from tools.tiny_models import tiny_wan_state_dict, tiny_wan_config
import importlib.util
spec = importlib.util.spec_from_file_location("cbridge", {repo!r} + "/nodes/comfy_bridge.py")
bridge = importlib.util.module_from_spec(spec); sys.modules["cbridge"] = bridge; spec.loader.exec_module(bridge)
lf_spec = importlib.util.spec_from_file_location("lf", {comfy!r} + "/comfy/latent_formats.py")
lf = importlib.util.module_from_spec(lf_spec); lf_spec.loader.exec_module(lf)

init_path, new_path, out, width, height, length, seed, text_seed, tokens = sys.argv[1:]
width, height, length, seed, text_seed, tokens = map(int, (width, height, length, seed, text_seed, tokens))
initial = load_file(init_path)["latent_tensor"].float()
comfy_new = load_file(new_path)["latent_tensor"].float()

model = WanBackbone(tiny_wan_config())
model.load_state_dict(tiny_wan_state_dict(seed=0))
model.eval()
g = torch.Generator(device="cpu").manual_seed(text_seed % (2**63))
context = torch.randn((1, tokens, 4096), generator=g) * 0.1
fmt = lf.Wan21()
T = bridge.latent_frames_for(length)
t0 = initial.shape[2]
noise = noise_frames(lambda n: bridge.latent_shape(width, height, n), seed, t0, T)

def run(init, first):
    latents = generate(model, context, noise, steps=(1000, 500), shift=5.0, frames_per_block=1,
                       policy="self_forcing_window", generator=bridge.renoise_generator(seed), first_chunk_steps=first,
                       initial_latent=init, dtype=torch.float32)
    return fmt.process_out(latents.float())

mine = run(fmt.process_in(initial), (1000, 750, 500, 250))
raw = run(initial, (1000, 750, 500, 250))
plain = run(fmt.process_in(initial), None)
json.dump({{
    "initial_shape": list(initial.shape), "new_shape": list(comfy_new.shape),
    "max_abs_diff": float((mine - comfy_new).abs().max()),
    "max_abs_diff_raw_initial": float((raw - comfy_new).abs().max()),
    "max_abs_diff_no_first_chunk": float((plain - comfy_new).abs().max()),
}}, open(out, "w"))
'''


# --------------------------------------------------------------------------------------------
# extend a video: LoadVideo -> GetVideoComponents -> VAEEncode -> sampler -> LatentConcat
# --------------------------------------------------------------------------------------------

def test_extend_video_from_load_video(comfy):
    width, height = 64, 48
    clip = _write_mp4(comfy, 33, width, height)  # 33 frames = 9 latent frames = 3 chunks of 3
    prefix = _prefix("extend")
    wf = _base(comfy, {"model_preset": "Self Forcing chunk-wise"}, width=width, height=height, length=57, seed=3,
               prefix=prefix, initial=["11", 0],
               extra={"10": {"class_type": "LoadVideo", "inputs": {"file": clip}},
                      "13": {"class_type": "GetVideoComponents", "inputs": {"video": ["10", 0]}},
                      "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["13", 0], "vae": ["4", 0]}}})
    run = comfy.run_ws(wf, timeout=300)
    (video,) = comfy.outputs(run.entry, ".mp4")
    frames, w, h = read_video(video)
    assert (w, h) == (width, height)
    assert len(frames) == 57  # 4 * (9 + 6) - 3: the 33 given frames and 24 new ones, decoded once
    report = comfy.ui_text(run.entry, REPORT)[0]
    assert "24 new frames (6 latent) after an initial latent of 9 latent frames (33 video frames)" in report, report
    assert "9 latent frames put into the cache first (3 clean passes at timestep 0)" in report, report
    assert "frames per block 3, steps 1000,750,500,250, first-chunk steps none, shift 5" in report, report
    # 3 clean passes for the video, then 2 chunks x (4 steps + clean pass)
    assert {m["max"] for m in _sampler_progress(run)} == {3 + 2 * 5}


# --------------------------------------------------------------------------------------------
# model presets, first-chunk steps and the memory pre-flight
# --------------------------------------------------------------------------------------------

def test_custom_preset_uses_the_widgets_with_a_first_chunk_list(comfy):
    """'custom' (the default) reads the widgets, first_chunk_steps included: 3 frame-wise chunks, the first
    with 4 steps, the others with 1."""
    prefix = _prefix("custom_first")
    wf = _base(comfy, {"frames_per_block": 1, "steps": "1000", "first_chunk_steps": " 1000, 750,500 ,250 "},
               width=64, height=48, length=9, seed=2, prefix=prefix, initial=None, extra={})
    run = comfy.run_ws(wf, timeout=300)
    assert {m["max"] for m in _sampler_progress(run)} == {5 + 2 * 2}
    report = comfy.ui_text(run.entry, REPORT)[0]
    assert ("model preset: custom (the frames_per_block, steps, first_chunk_steps and shift widgets): frames per "
            "block 1, steps 1000, first-chunk steps 1000,750,500,250, shift 5") in report, report
    assert "replaced" not in report, report
    (video,) = comfy.outputs(run.entry, ".mp4")
    assert len(read_video(video)[0]) == 9


def _kv(report: str) -> str:
    m = re.search(r"memory estimate: KV cache ([\d.]+ [MG]iB)", report)
    assert m, report
    return m.group(1)


def test_memory_estimate_counts_the_initial_frames(comfy):
    """Under 'full' the cache holds every frame: a run of 6 initial + 3 new latent frames needs the KV cache of
    a 9-frame text-to-video run, not of 3 frames."""
    reports = []
    for initial, length in ((["40", 0], 33), (None, 33), (None, 9)):
        extra = {"40": {"class_type": "HFTestRandomLatent", "inputs": {"seed": 4, "width": 64, "height": 64,
                                                                      "length": 21, "batch_size": 1}}}
        wf = _base(comfy, {"policy": "full"}, width=64, height=64, length=length, seed=1,
                   prefix=_prefix("kv_initial"), initial=initial, extra=extra if initial else {})
        reports.append(comfy.ui_text(comfy.run(wf, timeout=300), REPORT)[0])
    with_initial, t2v_same_total, t2v_new_only = map(_kv, reports)
    print(f"\n[kv] 6 initial + 3 new: {with_initial}; 9 frames: {t2v_same_total}; 3 frames: {t2v_new_only}")
    assert with_initial == t2v_same_total != t2v_new_only


# --------------------------------------------------------------------------------------------
# bad input: a clear error before any work, nothing written
# --------------------------------------------------------------------------------------------

def _latent_node(class_type: str, **inputs) -> dict:
    return {"40": {"class_type": class_type, "inputs": inputs}}


BAD = [
    # a single image with a chunk-wise model
    ("image_chunkwise", {"model_preset": "Self Forcing chunk-wise"}, "image", dict(length=17),
     r"initial_latent has 1 latent frame \(1 video frame\); with 3 frames per block the cache takes whole chunks"
     r".*a single image \(1 latent frame\) needs a frame-wise model: frames_per_block 1"),
    ("size", {"frames_per_block": 1}, _latent_node("HFTestRandomLatent", seed=1, width=64, height=64, length=1,
                                                   batch_size=1), dict(length=17),
     r"initial_latent is 64x64 \(latent 8x8\) but the sampler's width and height are 64x48: set them to 64x64"),
    ("channels", {"frames_per_block": 1}, _latent_node("EmptyMochiLatentVideo", width=64, height=48, length=7,
                                                       batch_size=1), dict(length=17),
     r"initial_latent has 12 channels; this model's latents have 16"),
    ("batch", {"frames_per_block": 1}, _latent_node("HFTestRandomLatent", seed=1, width=64, height=48, length=1,
                                                    batch_size=2), dict(length=17),
     r"initial_latent holds a batch of 2 latents"),
    ("whole_chunks", {}, _latent_node("HFTestRandomLatent", seed=1, width=64, height=48, length=5, batch_size=1),
     dict(length=33),
     r"initial_latent has 2 latent frames \(5 video frames\); with 3 frames per block the cache takes whole chunks"
     r".*trim the video to 9 or 21 frames"),
    ("image_latent", {"frames_per_block": 1}, _latent_node("EmptyLatentImage", width=64, height=48, batch_size=1),
     dict(length=17), r"initial_latent is \[1, 4, 6, 8\], an image latent of 4 dimensions"),
    ("too_short", {}, _latent_node("HFTestRandomLatent", seed=1, width=64, height=48, length=9, batch_size=1),
     dict(length=9), r"length 9 video frames is 3 latent frames in all, but the initial latent already has 3 .* "
                     r"ask for at least 21 frames"),
    ("first_chunk_text", {"first_chunk_steps": "1000, most"}, None, dict(length=9),
     r"first_chunk_steps: steps '1000, most' is not a comma-separated list of numbers"),
    ("first_chunk_order", {"first_chunk_steps": "250,1000"}, None, dict(length=9),
     r"first_chunk_steps: denoising steps must strictly decrease"),
]


@pytest.mark.parametrize("case, sampler_inputs, source, kw, message", BAD, ids=[b[0] for b in BAD])
def test_bad_initial_latent_or_first_chunk_steps_fail_cleanly(comfy, case, sampler_inputs, source, kw, message):
    prefix = _prefix(f"bad_{case}")
    if source == "image":
        extra, initial = _image_nodes(comfy, _write_png(comfy, 64, 48)), ["11", 0]
    elif source is None:
        extra, initial = {}, None
    else:
        extra, initial = source, ["40", 0]
    wf = _base(comfy, sampler_inputs, width=64, height=48, seed=1, prefix=prefix, initial=initial, extra=extra, **kw)
    t0 = time.time()
    with pytest.raises(ComfyError) as info:
        comfy.run(wf, timeout=300)
    text = str(info.value)
    print("\n[error]", text.splitlines()[0][:400])
    assert re.search(message, text, re.S), text
    assert "ShapeError" in text and "HeadForcingARSampler" in text, text
    assert time.time() - t0 < 60
    assert not _files_with_prefix(comfy, prefix)


# --------------------------------------------------------------------------------------------
# the shipped workflows run (API twins, patched as `tools/host.py demo --tiny` patches them)
# --------------------------------------------------------------------------------------------

def _shipped(comfy, name: str) -> dict:
    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    wf = host.patch_workflow(api, {"diffusion_models": comfy.models["wan"], "vae": comfy.models["vae"]},
                             tiny=True, overrides={"width": 64, "height": 48}, seed=None)
    tag = uuid.uuid4().hex[:8]
    for node in wf.values():
        if node["class_type"] == "SaveVideo":
            node["inputs"]["filename_prefix"] = f"e2e/{name}_{tag}"
    return wf


def _only(wf: dict, class_type: str) -> dict:
    (node,) = [n for n in wf.values() if n["class_type"] == class_type]
    return node["inputs"]


def test_image_to_video_workflow_runs(comfy):
    wf = _shipped(comfy, "headforcing_image_to_video")
    _only(wf, "LoadImage")["image"] = _write_png(comfy, 80, 60, seed=3)  # ImageScale makes it 64x48
    sampler = _only(wf, "HeadForcingARSampler")
    assert sampler["model_preset"] == "Causal Forcing frame-wise 4-step" and "initial_latent" in sampler
    sampler["length"] = 13  # the image + 3 new latent frames
    entry = comfy.run(wf, timeout=300)
    (video,) = comfy.outputs(entry, ".mp4")
    frames, w, h = read_video(video)
    assert (w, h) == (64, 48) and len(frames) == 13


def test_extend_video_workflow_runs(comfy):
    wf = _shipped(comfy, "headforcing_extend_video")
    _only(wf, "LoadVideo")["file"] = _write_mp4(comfy, 37, 80, 64, seed=5)  # Image From Batch keeps all 37
    trim = _only(wf, "ImageFromBatch")
    assert (trim["batch_index"], trim["length"]) == (0, 81)
    trim["length"] = 33  # 9 latent frames = 3 chunks
    sampler = _only(wf, "HeadForcingARSampler")
    assert sampler["model_preset"] == "Self Forcing chunk-wise" and "initial_latent" in sampler
    sampler["length"] = 45  # the 33 given frames + 12 new
    entry = comfy.run(wf, timeout=300)
    (video,) = comfy.outputs(entry, ".mp4")
    frames, w, h = read_video(video)
    assert (w, h) == (64, 48) and len(frames) == 45


def test_longlive_workflow_runs_with_base_and_lora(comfy):
    """The LongLive story as shipped (base + LoRA through LoraLoaderModelOnly, longlive preset, recache in its
    policy-default mode = longlive), each segment shortened to one chunk; the LoRA is a tiny one in ComfyUI's
    format."""
    import torch

    from headforcing_core.convert import convert_lora
    from tools.tiny_models import tiny_peft_lora, tiny_wan_state_dict

    lora_name = "hf_e2e_longlive_lora.safetensors"
    loras = comfy.base_dir / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    if not (loras / lora_name).exists():
        peft = tiny_peft_lora(tiny_wan_state_dict(seed=0), rank=4, seed=3)
        pt = loras.parent / "hf_e2e_longlive_lora.pt"
        torch.save({"generator_lora": peft}, pt)
        convert_lora(str(pt), str(loras / lora_name), lora_alpha=4.0,
                     base=str(comfy.base_dir / "models" / "diffusion_models" / comfy.models["wan"]))
        pt.unlink()
    wf = _shipped(comfy, "headforcing_longlive_story")
    _only(wf, "LoraLoaderModelOnly")["lora_name"] = lora_name
    assert _only(wf, "HeadForcingCachePolicy")["preset"] == "longlive"
    segments = [n["inputs"] for n in wf.values() if n["class_type"] == "HeadForcingPromptSegment"]
    assert len(segments) >= 3 and {s["transition"] for s in segments[1:]} == {"recache"}
    assert {s["transition_frames"] for s in segments[1:]} == {12}
    assert [s["length"] for s in segments] == [42.0, 39.0, 39.0, 42.0, 39.0, 39.0]  # LongLive's switch frames
    assert {s["length_unit"] for s in segments} == {"latent_frames"}
    for seg in segments:
        seg["length"] = 3.0  # one chunk each
    report_id = next(k for k, n in wf.items() if n["class_type"] == "PreviewAny"
                     and n["inputs"]["source"][0] == next(i for i, m in wf.items()
                                                          if m["class_type"] == "HeadForcingARSampler"))
    entry = comfy.run(wf, timeout=600)
    (video,) = comfy.outputs(entry, ".mp4")
    frames, w, h = read_video(video)
    assert (w, h) == (64, 48) and len(frames) == 4 * 3 * len(segments) - 3
    report = comfy.ui_text(entry, report_id)[0]
    assert "recache (longlive, the policy's default: LongLive's window, 12 frames)" in report, report
    assert "model preset: LongLive" in report and "longlive" in report, report
    assert "lora key not loaded" not in comfy.log_text()


# --------------------------------------------------------------------------------------------
# every API twin is its UI workflow (tools/make_workflows.py writes both from one graph)
# --------------------------------------------------------------------------------------------

API_TWINS = sorted(p.stem for p in (REPO / "workflows" / "api").glob("*.json"))


@pytest.mark.parametrize("name", API_TWINS)
def test_api_twin_matches_ui_workflow(comfy, name):
    assert {"headforcing_image_to_video", "headforcing_extend_video", "headforcing_longlive_story"} <= set(API_TWINS)
    _, api = shipped_twins(REPO / "workflows", name, comfy.object_info())
    # the sampler's model preset and its widgets agree in the shipped files (the preset replaces them)
    for node in api.values():
        if node["class_type"] == "HeadForcingARSampler":
            ins = node["inputs"]
            if ins["model_preset"] != "custom":
                assert ins["frames_per_block"] == (1 if "frame-wise" in ins["model_preset"] else 3), (name, ins)
                assert ins["steps"] == {"Causal Forcing++ frame-wise 2-step": "1000,500",
                                        "Causal Forcing++ frame-wise 1-step": "1000",
                                        "Krea Realtime 14B": "1000,750,500,250,0",
                                        "Krea Realtime 14B, Self Forcing loop": "1000,750,500,250,0"}.get(
                                            ins["model_preset"], "1000,750,500,250")
                assert ins["shift"] == 5.0
