"""Multi-prompt and continuation nodes in a real ComfyUI 0.3.75 server with the tiny random Wan.

Covers: the schemas; a PROMPT_SCHEDULE sampler run equal to the same story told by the
sampler and a chain of Continue nodes (joined with LatentConcat on t); ComfyUI's cache
re-running only the edited segment and the ones after it; AR_STATE save / load round trip;
bad input (a state from another model, zero-length segments, unparsable schedule text,
wrong socket values) failing clearly with the server still usable. The text node's CLIP
encoding is checked in-process with a stand-in CLIP (umT5 cannot be made tiny).
"""
from __future__ import annotations

import os
import uuid

import pytest
import torch

from .conftest import REPO, ComfyError, host, pack_module
from .workflow_twins import shipped_twins

SEED = 5
POLICY = "head_forcing"


def _prefix(tag: str) -> str:
    return f"e2e/{tag}_{uuid.uuid4().hex[:8]}"


def _latents(comfy, entry: dict) -> list[torch.Tensor]:
    from safetensors.torch import load_file
    return [load_file(str(p))["latent_tensor"] for p in comfy.outputs(entry, ".latent")]


def _cond(seed: int) -> dict:
    return {"class_type": "HFTestConditioning", "inputs": {"seed": seed, "length": 32}}


def _sampler(comfy, cond=None, schedule=None, seed=SEED, length=9) -> dict:
    inputs = {"model": ["1", 0], "width": 64, "height": 64, "length": length, "seed": seed, "policy": POLICY}
    if cond is not None:
        inputs["conditioning"] = cond
    if schedule is not None:
        inputs["prompt_schedule"] = schedule
    return {"class_type": "HeadForcingARSampler", "inputs": inputs}


def _continue(state, cond, transition="cut", k=0, frames=3, seed=SEED) -> dict:
    return {"class_type": "HeadForcingContinue",
            "inputs": {"model": ["1", 0], "ar_state": state, "conditioning": cond, "length": float(frames),
                       "length_unit": "latent_frames", "transition": transition, "transition_frames": k,
                       "seed": seed}}


def _segment(cond, transition="cut", k=0, previous=None, frames=3) -> dict:
    inputs = {"conditioning": cond, "length": float(frames), "length_unit": "latent_frames",
              "transition": transition, "transition_frames": k}
    if previous is not None:
        inputs["previous"] = previous
    return {"class_type": "HeadForcingPromptSegment", "inputs": inputs}


def _unet(comfy, name=None) -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name or comfy.models["wan"], "weight_dtype": "default"}}


STORY = [("2", 1, "cut", 0), ("12", 2, "recache", 2), ("22", 3, "blend", 2), ("32", 4, "cut", 0)]


def chain_workflow(comfy, prefix: str, seeds=(1, 2, 3, 4)) -> dict:
    """Sampler(A) -> Continue(B, recache 2) -> Continue(C, blend 2) -> Continue(D, cut), joined on t."""
    wf = {"1": _unet(comfy)}
    for (cid, _, _, _), s in zip(STORY, seeds):
        wf[cid] = _cond(s)
    wf["3"] = _sampler(comfy, cond=["2", 0])
    wf["13"] = _continue(["3", 2], ["12", 0], "recache", 2)
    wf["23"] = _continue(["13", 1], ["22", 0], "blend", 2)
    wf["33"] = _continue(["23", 1], ["32", 0], "cut")
    wf["40"] = {"class_type": "LatentConcat", "inputs": {"samples1": ["3", 0], "samples2": ["13", 0], "dim": "t"}}
    wf["41"] = {"class_type": "LatentConcat", "inputs": {"samples1": ["40", 0], "samples2": ["23", 0], "dim": "t"}}
    wf["42"] = {"class_type": "LatentConcat", "inputs": {"samples1": ["41", 0], "samples2": ["33", 0], "dim": "t"}}
    wf["43"] = {"class_type": "SaveLatent", "inputs": {"samples": ["42", 0], "filename_prefix": prefix}}
    return wf


def schedule_workflow(comfy, prefix: str) -> dict:
    wf = {"1": _unet(comfy)}
    prev = None
    for i, (cid, seed, transition, k) in enumerate(STORY):
        wf[cid] = _cond(seed)
        sid = str(50 + i)
        wf[sid] = _segment([cid, 0], transition, k, previous=prev)
        prev = [sid, 0]
    wf["60"] = _sampler(comfy, schedule=prev)
    wf["61"] = {"class_type": "SaveLatent", "inputs": {"samples": ["60", 0], "filename_prefix": prefix}}
    return wf


# --------------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------------

def test_schemas(comfy):
    info = comfy.object_info()
    seg = info["HeadForcingPromptSegment"]
    assert seg["output"] == ["PROMPT_SCHEDULE", "STRING"]
    assert seg["input"]["optional"]["previous"][0] == "PROMPT_SCHEDULE"
    mode = seg["input"]["optional"]["recache_mode"]  # issue 15: the recache mode, optional (older prompts run)
    assert (mode[1].get("options") or mode[0]) == ["policy default", "block_causal", "longlive", "longlive_local_sink"]
    assert mode[1]["default"] == "policy default"
    assert all(w in mode[1]["tooltip"] for w in ("block_causal", "longlive", "no mask", "sink"))
    text = info["HeadForcingPromptScheduleFromText"]
    assert text["input"]["required"]["clip"][0] == "CLIP" and text["output"][0] == "PROMPT_SCHEDULE"
    cont = info["HeadForcingContinue"]
    assert cont["output"] == ["LATENT", "AR_STATE", "STRING", "STRING"]  # ..., report, take (issue 22)
    assert cont["input"]["required"]["ar_state"][0] == "AR_STATE"
    assert {"conditioning", "prompt_schedule"} <= set(cont["input"]["optional"])
    sampler = info["HeadForcingARSampler"]
    assert sampler["output"] == ["LATENT", "STRING", "AR_STATE", "STRING"]  # ..., take (issue 22)
    for node in (sampler, cont):
        assert node["input"]["optional"]["clip"][0] == "CLIP" and node["output_name"][-1] == "take"
    assert sampler["input"]["optional"]["prompt_schedule"][0] == "PROMPT_SCHEDULE"
    assert info["HeadForcingSaveARState"]["output_node"] is True
    assert info["HeadForcingLoadARState"]["output"] == ["AR_STATE", "STRING"]
    for node in ("HeadForcingPromptSegment", "HeadForcingPromptScheduleFromText", "HeadForcingContinue",
                 "HeadForcingSaveARState", "HeadForcingLoadARState"):
        ins = {**info[node]["input"]["required"], **info[node]["input"].get("optional", {})}
        assert all(spec[1].get("tooltip") for spec in ins.values() if len(spec) > 1), node
    assert "LatentConcat" in info  # the documented way to join segment latents


# --------------------------------------------------------------------------------------------
# a schedule run == sampler + Continue chain; ComfyUI's cache re-runs only what changed
# --------------------------------------------------------------------------------------------

def test_schedule_equals_continue_chain(comfy):
    wf = chain_workflow(comfy, _prefix("mp_chain"))
    wf.update({k: v for k, v in schedule_workflow(comfy, _prefix("mp_schedule")).items() if k != "1"})
    entry = comfy.run(wf, timeout=600)
    (chain,), (sched,) = (_latents_of(comfy, entry["outputs"], node) for node in ("43", "61"))
    assert chain.shape == sched.shape == (1, 16, 12, 8, 8)
    err = float((chain - sched).norm() / sched.norm())
    assert err < 1e-5, err


def _latents_of(comfy, outputs: dict, node: str) -> list[torch.Tensor]:
    return _latents(comfy, {"outputs": {node: outputs[node]}})


def _executed(run) -> set[str]:
    return {str(d["node"]) for d in run.of_type("executing") if d.get("node") is not None
            and d.get("prompt_id") == run.prompt_id}


def _cached(run) -> set[str]:
    out = set()
    for d in run.of_type("execution_cached"):
        if d.get("prompt_id") == run.prompt_id:
            out |= {str(n) for n in d.get("nodes", [])}
    return out


def test_editing_the_third_segment_reruns_only_it_and_later(comfy):
    prefix = _prefix("mp_cache")
    first = comfy.run_ws(chain_workflow(comfy, prefix), timeout=600)
    assert first.entry is not None
    edited = comfy.run_ws(chain_workflow(comfy, prefix, seeds=(1, 2, 30, 4)), timeout=600)
    executed, cached = _executed(edited), _cached(edited)
    segments = {"3": 1, "13": 2, "23": 3, "33": 4}
    ran = {segments[n] for n in executed if n in segments}
    assert ran == {3, 4}, (executed, cached)
    assert {"1", "2", "12", "32", "3", "13", "40"} <= cached, cached
    assert "22" in executed  # the edited prompt
    a, b = _latents(comfy, first.entry)[0], _latents(comfy, edited.entry)[0]
    # frames of segments 1-2 (3 + 3 latent frames) unchanged, the rest differ
    assert torch.equal(a[:, :, :6], b[:, :, :6])
    assert not torch.allclose(a[:, :, 6:9], b[:, :, 6:9])


# --------------------------------------------------------------------------------------------
# AR_STATE files
# --------------------------------------------------------------------------------------------

def test_save_and_load_ar_state(comfy):
    name = f"e2e_state_{uuid.uuid4().hex[:8]}"
    direct = _prefix("mp_direct")
    wf = {"1": _unet(comfy), "2": _cond(1), "5": _cond(2),
          "3": _sampler(comfy, cond=["2", 0]),
          "4": {"class_type": "HeadForcingSaveARState", "inputs": {"ar_state": ["3", 2], "filename": name}},
          "6": _continue(["3", 2], ["5", 0], "recache", 3),
          "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": direct}}}
    entry = comfy.run(wf, timeout=600)
    saved = comfy.output_dir / "headforcing_states" / f"{name}.safetensors"
    assert saved.is_file()
    assert "saved AR_STATE" in comfy.ui_text(entry, "4")[0]
    info = comfy.object_info("HeadForcingLoadARState")["HeadForcingLoadARState"]
    options = info["input"]["required"]["state_name"][1].get("options") or info["input"]["required"]["state_name"][0]
    assert f"{name}.safetensors" in options
    wf2 = {"1": _unet(comfy), "5": _cond(2),
           "10": {"class_type": "HeadForcingLoadARState",
                  "inputs": {"state_name": f"{name}.safetensors", "model": ["1", 0]}},
           "11": _continue(["10", 0], ["5", 0], "recache", 3),
           "12": {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": _prefix("mp_loaded")}}}
    entry2 = comfy.run(wf2, timeout=600)
    a, b = _latents(comfy, entry)[0], _latents(comfy, entry2)[0]
    assert a.shape == (1, 16, 3, 8, 8) and torch.equal(a, b)

    # a damaged file is refused with a clear message (and the good one is untouched)
    bad = saved.with_name(saved.stem + "_bad.safetensors")
    bad.write_bytes(saved.read_bytes()[:1000])
    wf3 = {"10": {"class_type": "HeadForcingLoadARState", "inputs": {"state_name": f"{name}_bad.safetensors"}},
           "11": {"class_type": "PreviewAny", "inputs": {"source": ["10", 1]}}}
    with pytest.raises(ComfyError, match="not a readable AR_STATE|damaged"):
        comfy.run(wf3, timeout=120)
    # a name escaping the states folder is refused
    wf4 = {"1": _unet(comfy), "2": _cond(1), "3": _sampler(comfy, cond=["2", 0]),
           "4": {"class_type": "HeadForcingSaveARState", "inputs": {"ar_state": ["3", 2], "filename": "../../escape"}}}
    with pytest.raises(ComfyError, match="is not allowed: '..' is a folder reference"):
        comfy.run(wf4, timeout=300)
    assert not (comfy.base_dir / "escape.safetensors").exists()


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

def _write_other_model(comfy) -> str:
    from safetensors.torch import save_file

    from headforcing_core import WanConfig, random_backbone
    name = "hf_tiny_wan_3_layers.safetensors"
    path = comfy.base_dir / "models" / "diffusion_models" / name
    if not path.exists():
        model = random_backbone(WanConfig(dim=256, num_heads=2, num_layers=3, ffn_dim=512), seed=1)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return name


def test_state_from_another_model_is_refused(comfy):
    other = _write_other_model(comfy)
    wf = {"1": _unet(comfy), "9": _unet(comfy, other), "2": _cond(1), "5": _cond(2),
          "3": _sampler(comfy, cond=["2", 0]),
          "6": {**_continue(["3", 2], ["5", 0])},
          "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": _prefix("mp_bad")}}}
    wf["6"]["inputs"]["model"] = ["9", 0]
    with pytest.raises(ComfyError, match=r"HeadForcingContinue.*another model.*2 layers.*3 layers"):
        comfy.run(wf, timeout=300)
    assert comfy.server.alive()


def test_zero_length_segment_is_refused(comfy):
    wf = schedule_workflow(comfy, _prefix("mp_zero"))
    wf["52"]["inputs"]["length"] = 0.0
    with pytest.raises(ComfyError, match=r"HeadForcingPromptSegment.*zero-length segments are not allowed"):
        comfy.run(wf, timeout=300)
    wf = schedule_workflow(comfy, _prefix("mp_blend"))
    wf["52"]["inputs"]["transition_frames"] = 9  # a blend longer than its 3-frame segment
    with pytest.raises(ComfyError, match=r"blend over 9 latent frames does not fit"):
        comfy.run(wf, timeout=300)


def test_unparsable_schedule_text_names_the_line(comfy):
    wf = {"1": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_missing.safetensors", "type": "wan"}},
          "2": {"class_type": "HeadForcingPromptScheduleFromText",
                "inputs": {"clip": ["1", 0], "text": "5 | a fox in the snow\nfive | the fox stops\n"}},
          "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}}
    with pytest.raises(ComfyError) as info:
        comfy.queue(wf)
    msg = str(info.value)
    assert "HeadForcingPromptScheduleFromText" in msg and "line 2 ('five | the fox stops')" in msg, msg
    assert "not a length in seconds" in msg


def test_neither_conditioning_nor_schedule(comfy):
    wf = {"1": _unet(comfy), "3": _sampler(comfy),
          "7": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": _prefix("mp_none")}}}
    with pytest.raises(ComfyError, match="connect a conditioning .* or a prompt_schedule"):
        comfy.run(wf, timeout=300)
    # the server still serves a good story afterwards, from its cache where it can
    entry = comfy.run(schedule_workflow(comfy, _prefix("mp_after")), timeout=600)
    assert _latents(comfy, entry)[0].shape == (1, 16, 12, 8, 8)


# --------------------------------------------------------------------------------------------
# the text node's encoding, in-process with a stand-in CLIP
# --------------------------------------------------------------------------------------------

class FakeClip:
    """Stands in for ComfyUI's CLIP: tokenize / encode_from_tokens_scheduled, a tensor per text."""

    def __init__(self):
        self.texts = []

    def tokenize(self, text):
        self.texts.append(text)
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens):
        g = torch.Generator().manual_seed(sum(map(ord, tokens["text"])))
        return [[torch.randn(1, 7, 4096, generator=g), {"pooled_output": None}]]


@pytest.fixture(scope="module")
def pack_nodes():
    return pack_module("prompts")


def test_text_node_encodes_every_line(pack_nodes):
    clip = FakeClip()
    text = "# story\n5 | a fox\n\n2.5 | the fox sits | blend 4\n1 | the end\n"
    out = pack_nodes.HeadForcingPromptScheduleFromText.execute(clip, text, "recache", 2)
    schedule, summary = out.result if hasattr(out, "result") else out
    assert clip.texts == ["a fox", "the fox sits", "the end"]
    assert [(s.seconds, s.transition, s.transition_frames, s.label) for s in schedule] == [
        (5.0, "recache", 2, "a fox"), (2.5, "blend", 4, "the fox sits"), (1.0, "recache", 2, "the end")]
    assert schedule.resolve(3).total_frames == 21 + 9 + 3
    assert "blend 4" in summary
    assert pack_nodes.HeadForcingPromptScheduleFromText.validate_inputs(text="5 | ok\nbad line") == \
        "line 2 ('bad line'): no '|' between the length and the prompt; expected 'seconds | prompt' " \
        "(optionally '| cut', '| recache N [mode]', '| blend N' or '| interpolate N')"
    # a recache line may name its mode (issue 15); without one the policy's default applies at sampling time
    out = pack_nodes.HeadForcingPromptScheduleFromText.execute(
        clip, "3 | a | cut\n3 | b | recache 12 longlive\n3 | c | recache 3\n3 | d | recache 12 longlive_local_sink")
    schedule, summary = out.result if hasattr(out, "result") else out
    assert [s.recache_mode for s in schedule] == [None, "longlive", None, "longlive_local_sink"]
    # the LongLive modes re-run LongLive's own window whatever N says, and the summary says so
    assert "recache (longlive: LongLive's window, 12 frames): b" in summary and "recache 3: c" in summary, summary
    assert pack_nodes.HeadForcingPromptScheduleFromText.validate_inputs(text="3 | a | recache 3 sideways") == \
        "line 1 ('3 | a | recache 3 sideways'): 'sideways' is not a recache mode (block_causal, longlive, " \
        "longlive_local_sink); expected 'seconds | prompt' (optionally '| cut', '| recache N [mode]', '| blend N' or " \
        "'| interpolate N')"


# --------------------------------------------------------------------------------------------
# example workflows: UI file == API twin, and the twin runs with the tiny models
# --------------------------------------------------------------------------------------------

WORKFLOWS = {"headforcing_story": 4 * 60, "headforcing_continuation": 3 * 21}  # latent frames

@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_workflow_ui_matches_api_twin(comfy, name):
    _, api = shipped_twins(REPO / "workflows", name, comfy.object_info())
    types = [n["class_type"] for n in api.values()]
    if name == "headforcing_story":
        assert types.count("HeadForcingPromptSegment") >= 4
        segs = [n["inputs"] for n in api.values() if n["class_type"] == "HeadForcingPromptSegment"]
        assert sum(s["length"] for s in segs) == 60.0 and {s["length_unit"] for s in segs} == {"seconds"}
        assert {s["transition"] for s in segs} == {"cut", "blend", "recache"}
    else:
        assert types.count("HeadForcingContinue") >= 2 and "HeadForcingSaveARState" in types
        assert "LatentConcat" in types


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.skipif(
    not os.environ.get("HF_E2E_LONG"), reason="the full-length stories take minutes on a CPU: set HF_E2E_LONG=1"))],
    ids=["short", "full_length"])
@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_api_workflow_runs_with_tiny_models(comfy, name, full):
    """The API twin, patched as `tools/host.py demo --tiny` patches it, runs end to end (short: every
    segment and Continue 1 s = 3 latent frames; full_length: as shipped, about a minute / 15 s)."""
    import json

    from .video_check import read_video
    api = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
    wf = host.patch_workflow(api, {"diffusion_models": comfy.models["wan"], "vae": comfy.models["vae"]},
                             tiny=True, overrides={"width": 64, "height": 48}, seed=None)
    tag = uuid.uuid4().hex[:8]
    latent_frames = WORKFLOWS[name]
    for node in wf.values():
        if node["class_type"] == "SaveVideo":
            node["inputs"]["filename_prefix"] = f"e2e/{name}_{tag}"
        if node["class_type"] == "HeadForcingSaveARState":
            node["inputs"]["filename"] = f"e2e_{name}_{tag}"
        if not full and node["class_type"] in ("HeadForcingPromptSegment", "HeadForcingContinue"):
            node["inputs"]["length"] = 1.0
            node["inputs"]["transition_frames"] = min(node["inputs"]["transition_frames"], 3)
        if not full and node["class_type"] == "HeadForcingARSampler" and "conditioning" in node["inputs"]:
            node["inputs"]["length"] = 9  # 3 latent frames
    if not full:
        latent_frames = 12 if name == "headforcing_story" else 9
    entry = comfy.run(wf, timeout=1800)
    (video,) = comfy.outputs(entry, ".mp4")
    frames, w, h = read_video(video)
    assert (w, h) == (64, 48) and len(frames) == 4 * latent_frames - 3
    if name == "headforcing_continuation":
        assert (comfy.output_dir / "headforcing_states" / f"e2e_{name}_{tag}.safetensors").is_file()
