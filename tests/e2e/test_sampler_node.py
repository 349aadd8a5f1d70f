"""HeadForcingARSampler in a real ComfyUI 0.3.75 server with the tiny random Wan2.1 T2V model.

Covers: the schema, a video of 4T-3 frames at the right size (short last chunk included),
bit-for-bit agreement with the core run outside ComfyUI (noise, re-noise seed, latent
scaling), progress messages per model call, per-chunk previews, interruption within one call
with the server staying usable, the memory pre-flight check, and bad inputs (non-Wan model,
size, length, steps, conditioning width) failing with a clear message and no video.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from .conftest import REPO, ComfyError, expected_frames, host
from .core_runs import run_core
from .video_check import read_video
from .workflow_twins import assert_twins

SAMPLER = "3"
PREVIEW = "20"
FRAMES_PER_CALL = 5  # 4 denoising steps + 1 clean pass per chunk


def _inputs(**kw) -> dict:
    """Sampler inputs beyond the harness's (model, conditioning, width, height, length, seed)."""
    base = {"length_unit": "frames", "steps": "1000,750,500,250", "shift": 5.0, "frames_per_block": 3,
            "policy": "self_forcing_window"}
    base.update(kw)
    return base


def _with_report(wf: dict) -> dict:
    """Show the sampler's report STRING with ComfyUI's PreviewAny (an output node)."""
    wf[PREVIEW] = {"class_type": "PreviewAny", "inputs": {"source": [SAMPLER, 1]}}
    return wf


def _prefix(tag: str) -> str:
    return f"e2e/{tag}_{uuid.uuid4().hex[:8]}"


def _files_with_prefix(comfy, prefix: str) -> list[Path]:
    folder = comfy.output_dir / Path(prefix).parent
    return sorted(folder.glob(Path(prefix).name + "*")) if folder.exists() else []


def _error_of(comfy, wf: dict, timeout: float = 300) -> str:
    with pytest.raises(ComfyError) as info:
        comfy.run(wf, timeout=timeout)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------------

def test_sampler_schema(comfy):
    info = comfy.object_info("HeadForcingARSampler")["HeadForcingARSampler"]
    assert info["category"] == "sampling/head_forcing"
    assert info["output"][:2] == ["LATENT", "STRING"]
    assert info["output_name"][:2] == ["latent", "report"]
    req, opt = info["input"]["required"], info["input"].get("optional", {})
    # the widgets a minimal API prompt must give; everything else has a default
    assert list(req) == ["model", "width", "height", "length", "seed"]
    assert ["conditioning", "kv_policy", "length_unit", "steps", "shift", "frames_per_block",
            "policy"] == [n for n in opt if n in ("conditioning", "kv_policy", "length_unit", "steps", "shift",
                                                  "frames_per_block", "policy")]
    assert req["model"][0] == "MODEL" and opt["conditioning"][0] == "CONDITIONING"
    assert opt["kv_policy"][0] == "KV_POLICY"
    for name, spec in {**req, **opt}.items():
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    assert req["width"][1]["default"] == 832 and req["height"][1]["default"] == 480
    assert req["width"][1]["step"] == 16
    assert opt["steps"][1]["default"] == "1000,750,500,250"
    assert opt["shift"][1]["default"] == 5.0 and "8" in opt["shift"][1]["tooltip"]
    assert opt["frames_per_block"][1]["default"] == 3
    assert opt["policy"][1]["default"] == "self_forcing_window"
    policies = opt["policy"][1].get("options") or opt["policy"][0]
    assert policies == ["full", "self_forcing_window", "sink_window", "longlive", "pyramid_forcing", "head_forcing"]
    # issue 12: start from an image / a video, model presets, a first-chunk step list; added after every older
    # input so that UI workflows saved before them keep their widget values in place
    # then Krea's loop (issue 21) and the live prompts' text encoder (issue 22)
    assert list(opt)[-8:] == ["initial_latent", "model_preset", "first_chunk_steps", "vae", "context_frames",
                              "interpolation_blocks", "context_first_latent", "clip"]
    assert opt["clip"][0] == "CLIP" and info["output_name"][-1] == "take"
    assert opt["initial_latent"][0] == "LATENT"
    presets = opt["model_preset"][1].get("options") or opt["model_preset"][0]
    assert presets[0] == "custom" and opt["model_preset"][1]["default"] == "custom"
    assert {"Self Forcing chunk-wise", "Causal Forcing chunk-wise", "Causal Forcing frame-wise 4-step",
            "Causal Forcing++ frame-wise 2-step", "Causal Forcing++ frame-wise 1-step"} <= set(presets)
    assert opt["first_chunk_steps"][1]["default"] == ""
    # every node of the pack carries the prefix (newer ComfyUI ships SamplerARVideo / EmptyARVideoLatent)
    everything = comfy.object_info()
    pack = [n for n, i in everything.items() if i.get("python_module") == "custom_nodes.headforcing"]
    assert {"HeadForcingARSampler", "HeadForcingCachePolicy"} <= set(pack)
    assert all(n.startswith("HeadForcing") for n in pack), pack


# --------------------------------------------------------------------------------------------
# a video, progress per call, a preview per chunk
# --------------------------------------------------------------------------------------------

def test_sampler_makes_video_with_progress_and_previews(comfy, sampler_wf):
    # 17 frames -> T = 5 latent frames -> chunks of 3 + 2 (a short last chunk) -> 4*5-3 = 17 frames
    width, height, length = 64, 48, 17
    prefix = _prefix("sampler_video")
    wf = _with_report(sampler_wf(_inputs(), width=width, height=height, length=length, seed=11, prefix=prefix))
    t0 = time.time()
    run = comfy.run_ws(wf, timeout=300)
    elapsed = time.time() - t0

    videos = comfy.outputs(run.entry, ".mp4")
    assert len(videos) == 1, run.entry.get("outputs")
    frames, w, h = read_video(videos[0])
    assert (w, h) == (width, height)
    assert len(frames) == expected_frames(5) == 17

    # one progress message per model call: 2 chunks x 5 calls, values 1..10 of 10
    progress = [m for m in run.of_type("progress") if str(m.get("node")) == SAMPLER]
    total = 2 * FRAMES_PER_CALL
    assert progress and all(m["max"] == total for m in progress), progress
    assert sorted({m["value"] for m in progress}) == list(range(1, total + 1)), progress

    # a preview per finished chunk (the server runs with --preview-method auto -> latent2rgb)
    ours = [p for p in run.previews if p[1] is None or str(p[1].get("node_id")) == SAMPLER]
    assert len(ours) >= 2, [(e, m) for e, m, _ in run.previews]
    assert all(body[:2] == b"\xff\xd8" for _, _, body in ours), "previews should be JPEG images"

    report = comfy.ui_text(run.entry, PREVIEW)[0]
    assert "17 frames (5 latent" in report and "64x48" in report, report
    assert "chunks: 2 of 3 latent frames (the last one 2)" in report and "s/chunk" in report, report
    assert "self_forcing_window" in report and "KV cache" in report, report
    print(f"\n[timing] 64x48, 17 frames, 2 chunks: {elapsed:.2f} s wall; report:\n{report}")


def test_sampler_matches_core_run_and_latent_scaling(comfy, sampler_wf, tmp_path):
    """The LATENT equals the core's own run on the same weights, noise and re-noise seed, mapped
    out of the model's normalized space with Wan 2.1's process_out (x * std + mean)."""
    width, height, length, seed, text_seed = 48, 32, 13, 5, 7
    prefix = _prefix("sampler_latent")
    wf = sampler_wf(_inputs(policy="full"), width=width, height=height, length=length, seed=seed,
                    text_seed=text_seed, text_tokens=40, prefix=prefix)
    wf["30"] = {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER, 0], "filename_prefix": prefix}}
    entry = comfy.run(wf, timeout=300)
    latents = comfy.outputs(entry, ".latent")
    assert len(latents) == 1, entry.get("outputs")

    res = run_core(tmp_path, _CORE_RUN, latents[0], width, height, length, seed, text_seed, 40)
    assert res["shape"] == [1, 16, 4, 4, 6], res
    assert res["max_abs_diff"] < 1e-4, res
    # the scaling really is applied: the raw (normalized) latent is far from what ComfyUI holds
    assert res["max_abs_diff_unscaled"] > 0.1, res
    # the initial noise is comfy.sample.prepare_noise's for the same seed and shape
    assert res["noise_matches_prepare_noise"], res


_CORE_RUN = r'''
from headforcing_core import generate
spec = importlib.util.spec_from_file_location("cbridge", sys.path[0] + "/nodes/comfy_bridge.py")
bridge = importlib.util.module_from_spec(spec); sys.modules["cbridge"] = bridge; spec.loader.exec_module(bridge)
T = bridge.latent_frames_for(length)
shape = bridge.latent_shape(width, height, T)
noise = bridge.initial_noise(shape, seed)
latents = generate(model, context, noise, steps=(1000, 750, 500, 250), shift=5.0, frames_per_block=3,
                   policy="full", generator=bridge.renoise_generator(seed), dtype=torch.float32)
mine = lf.Wan21().process_out(latents.float())

sys.path.append(lf_spec.origin.rsplit("/comfy/", 1)[0])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.sample
ref = comfy.sample.prepare_noise(torch.zeros(shape), seed)
json.dump({
    "shape": list(comfy_latent.shape),
    "max_abs_diff": float((mine - comfy_latent).abs().max()),
    "max_abs_diff_unscaled": float((latents - comfy_latent).abs().max()),
    "noise_matches_prepare_noise": bool(torch.equal(ref, noise)),
}, open(out, "w"))
'''


# --------------------------------------------------------------------------------------------
# interruption
# --------------------------------------------------------------------------------------------

def test_interrupt_stops_within_one_call_and_server_stays_usable(comfy, sampler_wf):
    # long enough that it cannot finish before the interrupt lands: 241 frames = 61 latent
    # frames = 21 chunks = 105 model calls
    prefix = _prefix("sampler_interrupt")
    wf = sampler_wf(_inputs(), width=256, height=256, length=241, seed=101, prefix=prefix)
    sent = {}

    def on_message(run, msg):
        d = msg.get("data") or {}
        if (msg.get("type") == "progress" and str(d.get("node")) == SAMPLER and d.get("value", 0) >= 3
                and "at" not in sent):
            sent["value"] = d["value"]
            comfy.interrupt()
            sent["at"] = time.time()

    log_before = len(comfy.log_text())
    run = comfy.run_ws(wf, timeout=300, raise_on_error=False, on_message=on_message)
    stopped_at = time.time()
    assert "at" in sent, "never saw the sampler's progress"
    assert run.of_type("execution_interrupted"), [m["type"] for m in run.messages]
    assert not _files_with_prefix(comfy, prefix), "an interrupted run must not write a video"

    progress = [m for m in run.of_type("progress") if str(m.get("node")) == SAMPLER]
    total = progress[0]["max"]
    assert total == 21 * FRAMES_PER_CALL
    pattern = re.compile(r"headforcing: interrupted after (\d+) of (\d+) model calls")
    deadline = time.time() + 30  # the server's log reaches the file with some delay
    while not (m := pattern.search(log := comfy.log_text()[log_before:])) and time.time() < deadline:
        time.sleep(0.5)
    assert m, f"log grew by {len(log)} chars since the run started; tail:\n" + comfy.log_text()[-3000:]
    done = int(m.group(1))
    assert int(m.group(2)) == total and done < total
    # the interrupt arrived while call sent["value"] + 1 (at most) was running: the sampler made
    # no more than that one call after it (progress messages can lag behind on the socket)
    assert done <= max(v["value"] for v in progress) + 1, (done, sent)
    assert max(v["value"] for v in progress) <= done
    # and it stopped right away: well within the chunk (5 calls) the interrupt arrived in
    assert done <= sent["value"] + FRAMES_PER_CALL, (done, sent)
    latency = stopped_at - sent["at"]
    print(f"\n[timing] interrupt sent at call {sent['value']}, sampler stopped after call {done} of {total}; "
          f"interrupt -> execution_interrupted {latency:.2f} s")

    # the server is usable: the next run succeeds
    prefix2 = _prefix("sampler_after_interrupt")
    entry = comfy.run(sampler_wf(_inputs(), width=64, height=48, length=9, seed=102, prefix=prefix2), timeout=300)
    videos = comfy.outputs(entry, ".mp4")
    assert len(videos) == 1
    frames, w, h = read_video(videos[0])
    assert len(frames) == 9 and (w, h) == (64, 48)


# --------------------------------------------------------------------------------------------
# bad input: a clear error, nothing written
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, inputs, kw, message", [
    ("width", {}, dict(width=72, height=48), r"width 72 is not a positive multiple of 16"),
    ("height", {}, dict(width=64, height=40), r"height 40 is not a positive multiple of 16"),
    ("length", {}, dict(length=5), r"length 5 video frames is 2 latent frame\(s\), shorter than one chunk of 3 "
                                   r"latent frames; ask for at least 9 frames"),
    ("length_fpb", {"frames_per_block": 4}, dict(length=9),
     r"shorter than one chunk of 4 latent frames; ask for at least 13 frames"),
    ("steps_text", {"steps": "1000, seven hundred"}, {}, r"steps '1000, seven hundred' is not a comma-separated"),
    ("steps_order", {"steps": "250,500,1000"}, {}, r"denoising steps must strictly decrease"),
    ("policy_name", {"policy": "nope"}, {}, r"nope"),
])
def test_bad_inputs_fail_cleanly(comfy, sampler_wf, case, inputs, kw, message):
    prefix = _prefix(f"bad_{case}")
    kw.setdefault("length", 9)
    wf = sampler_wf(_inputs(**inputs), prefix=prefix, seed=7, **kw)
    t0 = time.time()
    text = _error_of(comfy, wf)
    print("\n[error]", text.splitlines()[0][:400])
    assert re.search(message, text), text
    assert "HeadForcingARSampler" in text or "policy" in text, text
    assert time.time() - t0 < 60
    assert not _files_with_prefix(comfy, prefix)


def test_non_wan_model_is_refused(comfy, sampler_wf):
    """A real non-Wan MODEL (a tiny LTX-Video transformer that UNETLoader detects as LTXV)."""
    name = "hf_tiny_ltxv.safetensors"
    path = comfy.base_dir / "models" / "diffusion_models" / name
    if not path.exists():
        subprocess.run([str(host.VENV_PY), "-c", _TINY_LTXV.format(comfy=str(host.COMFY), out=str(path))],
                       check=True, timeout=300)
    prefix = _prefix("bad_model")
    wf = sampler_wf(_inputs(), prefix=prefix, seed=3, length=9)
    wf["1"]["inputs"]["unet_name"] = name
    text = _error_of(comfy, wf)
    print("\n[error]", text.splitlines()[0][:400])
    assert "ModelFamilyError" in text, text
    assert "not a Wan2.1-family video transformer" in text and "LTXV" in text, text
    assert "Load Diffusion Model" in text, text
    assert not _files_with_prefix(comfy, prefix)


_TINY_LTXV = r'''
import sys
sys.path.insert(0, {comfy!r})
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.ops
from comfy.ldm.lightricks.model import LTXVModel
from safetensors.torch import save_file
# UNETLoader detects LTXV from adaln_single.*; head dim = attn2.to_k rows // 32 (heads)
m = LTXVModel(in_channels=128, cross_attention_dim=64, attention_head_dim=2, num_attention_heads=32,
              caption_channels=4096, num_layers=1, operations=comfy.ops.disable_weight_init)
g = torch.Generator().manual_seed(0)
sd = {{k: (torch.randn(v.shape, generator=g) * 0.02).contiguous() for k, v in m.state_dict().items()}}
save_file(sd, {out!r})
'''


def test_wrong_conditioning_width_is_refused(comfy, sampler_wf):
    cond = comfy.object_info("HFTestConditioning")["HFTestConditioning"]["input"]
    names = {**cond.get("required", {}), **cond.get("optional", {})}
    width_input = next((n for n in ("width", "dim", "channels", "text_dim") if n in names), None)
    if width_input is None:
        pytest.skip("HFTestConditioning has no option for the conditioning width yet")
    prefix = _prefix("bad_cond")
    wf = sampler_wf(_inputs(), prefix=prefix, seed=3, length=9, text_tokens=16)
    wf["2"]["inputs"][width_input] = 768
    text = _error_of(comfy, wf)
    print("\n[error]", text.splitlines()[0][:400])
    assert "ShapeError" in text, text
    assert "768" in text and "4096" in text and "umT5" in text, text
    assert not _files_with_prefix(comfy, prefix)


def test_memory_preflight_refuses_what_cannot_fit(comfy, sampler_wf):
    """A run whose KV cache alone exceeds this machine's memory is refused before any work."""
    prefix = _prefix("bad_memory")
    # full policy: every latent frame of every layer kept; 8192x8192, 20001 frames -> many TB
    wf = sampler_wf(_inputs(policy="full"), prefix=prefix, seed=3, width=8192, height=8192, length=20001)
    t0 = time.time()
    text = _error_of(comfy, wf)
    print("\n[error]", text.splitlines()[0][:400])
    assert "MemoryBudgetError" in text, text
    assert "GiB" in text and "is free" in text, text
    assert "choose a bounded policy" in text and "lower the resolution to at most" in text, text
    assert "shorten the video to at most" in text, text
    assert time.time() - t0 < 60, "the refusal must come before any work"
    assert not _files_with_prefix(comfy, prefix)


# --------------------------------------------------------------------------------------------
# the example workflow (UI format) and its API twin
# --------------------------------------------------------------------------------------------

UI_WORKFLOW = REPO / "workflows" / "headforcing_long_video.json"
API_WORKFLOW = REPO / "workflows" / "api" / "headforcing_long_video.json"

def test_example_workflow_ui_matches_api_twin(comfy):
    ui = json.loads(UI_WORKFLOW.read_text())
    api = json.loads(API_WORKFLOW.read_text())
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert notes and "head_forcing" in notes[0]["widgets_values"][0]
    assert_twins(ui, api, comfy.object_info())
    # the one-minute settings
    sampler = api["5"]["inputs"]
    assert (sampler["width"], sampler["height"], sampler["length"], sampler["length_unit"]) == (832, 480, 961,
                                                                                                 "frames")
    assert sampler["kv_policy"] == ["4", 0] and api["4"]["inputs"]["preset"] == "head_forcing"
    assert api["1"]["inputs"]["unet_name"] == "self_forcing_dmd.safetensors"
    assert api["2"]["inputs"]["clip_name"] == "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    assert api["2"]["inputs"]["type"] == "wan" and api["6"]["inputs"]["vae_name"] == "wan_2.1_vae.safetensors"
    assert api["8"]["inputs"]["fps"] == 16.0


def test_example_api_workflow_runs_with_tiny_models(comfy):
    """The API twin, patched the way `tools/host.py demo --tiny` patches it, runs end to end."""
    api = json.loads(API_WORKFLOW.read_text())
    wf = host.patch_workflow(api, {"diffusion_models": comfy.models["wan"], "vae": comfy.models["vae"]},
                             tiny=True, overrides={"width": 64, "height": 48, "length": 33}, seed=None)
    prefix = _prefix("example_workflow")
    wf["9"]["inputs"]["filename_prefix"] = prefix
    entry = comfy.run(wf, timeout=600)
    videos = comfy.outputs(entry, ".mp4")
    assert len(videos) == 1
    frames, w, h = read_video(videos[0])
    assert (w, h) == (64, 48) and len(frames) == 33
    report = comfy.ui_text(entry, "10")[0]
    assert "policy: head_forcing [compact RoPE]" in report, report
    assert "KV cache" in comfy.ui_text(entry, "11")[0]


def test_docs_cover_every_node_input_and_output(comfy):
    """docs/nodes.md has a section per registered HeadForcing node naming all its inputs and outputs."""
    doc = (REPO / "docs" / "nodes.md").read_text()
    lines = doc.splitlines()
    info = comfy.object_info()
    missing = []
    for node_id in comfy.node_ids("HeadForcing"):
        start = next((i for i, line in enumerate(lines) if line.startswith("#") and f"`{node_id}`" in line), None)
        if start is None:
            missing.append(f"{node_id}: no section")
            continue
        level = len(lines[start]) - len(lines[start].lstrip("#"))
        end = next((i for i in range(start + 1, len(lines))
                    if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= level), len(lines))
        section = "\n".join(lines[start:end])
        node = info[node_id]
        names = [n for g in ("required", "optional") for n in node.get("input_order", {}).get(g, [])]
        names += list(node.get("output_name") or [])
        missing += [f"{node_id}: {n}" for n in names if f"`{n}`" not in section]
    assert not missing, "docs/nodes.md lacks:\n" + "\n".join(missing)
