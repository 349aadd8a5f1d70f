"""Issue 13 against the real ComfyUI server: nothing a user can type, load or queue takes it down.

Every test feeds the server something bad — another model family, an impossible size or length,
a hostile file name, a corrupt AR_STATE or head profile (from the generator of
``tests/core/malformed.py``), garbage on the estimate route, an interrupt in the middle of a
large model call — checks the answer (a clear error naming the input or field, a 4xx), and
then checks that the server is alive and serves a good job.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tools import tiny_models as tiny

from .conftest import REPO, ComfyError, host

STATES = "headforcing_states"
DEEP_LAYERS = 4


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def _unet(name: str) -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def _cond(seed: int = 1) -> dict:
    return {"class_type": "HFTestConditioning", "inputs": {"seed": seed, "length": 16}}


def _sampler(**kw) -> dict:
    inputs = {"model": ["1", 0], "conditioning": ["2", 0], "width": 64, "height": 64, "length": 9, "seed": 3,
              "length_unit": "frames", "policy": "head_forcing"}
    inputs.update(kw)
    return {"class_type": "HeadForcingARSampler", "inputs": {k: v for k, v in inputs.items() if v is not None}}


def _save_latent(ref, prefix) -> dict:
    return {"class_type": "SaveLatent", "inputs": {"samples": ref, "filename_prefix": prefix}}


def _preview(ref) -> dict:
    return {"class_type": "PreviewAny", "inputs": {"source": ref}}


def good_job(comfy) -> None:
    """The server is alive and runs a normal job to the end (a sampler run saved as a latent)."""
    assert comfy.server.alive(), "ComfyUI died:\n" + comfy.log_text()[-3000:]
    prefix = f"e2e/good_{_uid()}"
    wf = {"1": _unet(comfy.models["wan"]), "2": _cond(7), "3": _sampler(seed=int(time.time()) % 1000),
          "4": _save_latent(["3", 0], prefix)}
    entry = comfy.run(wf, timeout=300)
    assert comfy.outputs(entry, ".latent"), entry


def refused(comfy, wf: dict, *patterns: str, timeout: float = 300) -> str:
    """Run ``wf``; it must fail with every pattern in its error text; then a good job must run."""
    t0 = time.time()
    with pytest.raises(ComfyError) as info:
        comfy.run(wf, timeout=timeout)
    text = str(info.value)
    took = time.time() - t0
    print(f"\n[refused in {took:.1f} s] " + " | ".join(line for line in text.splitlines()[:3])[:600])
    for p in patterns:
        assert re.search(p, text), (p, text)
    good_job(comfy)
    return text


def rss(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


# --------------------------------------------------------------------------------------------
# models of other families, and a deeper tiny Wan 2.1 for the interrupt measurements
# --------------------------------------------------------------------------------------------

_COMFY_WAN = r'''
import sys
sys.path.insert(0, {comfy!r})
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.ops
from comfy.ldm.wan.model import VaceWanModel, WanModel
from safetensors.torch import save_file
kw = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=1, text_dim=4096, freq_dim=256, out_dim=16,
          operations=comfy.ops.disable_weight_init)
if {kind!r} == "i2v":   # ComfyUI detects WAN21_I2V from img_emb.* and 36 input channels
    m = WanModel(model_type="i2v", in_dim=36, **kw)
else:                   # WAN21_Vace from vace_patch_embedding
    m = VaceWanModel(in_dim=16, vace_layers=1, vace_in_dim=96, **kw)
g = torch.Generator().manual_seed(0)
sd = {{k: (torch.randn(v.shape, generator=g) * 0.02).contiguous() for k, v in m.state_dict().items()}}
save_file(sd, {out!r})
'''


@pytest.fixture(scope="module")
def models(comfy):
    folder = comfy.base_dir / "models" / "diffusion_models"
    names = {"wan22": "hf_tiny_wan22_ti2v.safetensors", "i2v": "hf_tiny_wan21_i2v.safetensors",
             "vace": "hf_tiny_wan21_vace.safetensors", "deep": f"hf_tiny_wan21_{DEEP_LAYERS}layers.safetensors"}
    if not (folder / names["wan22"]).exists():
        tiny.write_tiny_wan(folder / names["wan22"], seed=0, in_dim=48, out_dim=48)  # ComfyUI: WAN22_T2V
    if not (folder / names["deep"]).exists():
        tiny.write_tiny_wan(folder / names["deep"], seed=0, num_layers=DEEP_LAYERS)
    for kind in ("i2v", "vace"):
        if not (folder / names[kind]).exists():
            subprocess.run([str(host.VENV_PY), "-c", _COMFY_WAN.format(comfy=str(host.COMFY), kind=kind,
                                                                       out=str(folder / names[kind]))],
                           check=True, timeout=300)
    return names


@pytest.mark.parametrize("family, words", [
    ("wan22", [r"Wan 2\.2 TI2V-5B \(48-channel latents", "WAN22_T2V", "Wan22 latent format"]),
    ("i2v", [r"Wan 2\.1 image-to-video", "WAN21_I2V"]),
    ("vace", [r"Wan 2\.1 VACE", "WAN21_Vace"]),
])
def test_other_wan_families_are_refused_by_name(comfy, models, family, words):
    prefix = f"e2e/family_{family}_{_uid()}"
    wf = {"1": _unet(models[family]), "2": _cond(), "3": _sampler(), "4": _save_latent(["3", 0], prefix)}
    text = refused(comfy, wf, "ModelFamilyError", "Head Forcing samples Wan 2.1 text-to-video", *words)
    assert not list((comfy.output_dir / "e2e").glob(Path(prefix).name + "*"))
    # Profile Heads takes the same check
    wf = {"1": _unet(models[family]), "2": _cond(),
          "3": {"class_type": "HeadForcingProfileHeads",
                "inputs": {"model": ["1", 0], "conditioning": ["2", 0], "latent_frames": 6, "width": 64,
                           "height": 64, "seed": 0, "query_samples": 4, "taxonomy": "head_forcing"}},
          "4": _preview(["3", 2])}
    refused(comfy, wf, "ModelFamilyError", words[1])
    assert "ModelFamilyError" in text


# --------------------------------------------------------------------------------------------
# sizes and lengths: refused before anything is allocated, advice naming the input
# --------------------------------------------------------------------------------------------

def _profile_heads(**kw) -> dict:
    inputs = {"model": ["1", 0], "conditioning": ["2", 0], "latent_frames": 21, "width": 64, "height": 64,
              "seed": 0, "query_samples": 64, "taxonomy": "head_forcing"}
    inputs.update(kw)
    return {"class_type": "HeadForcingProfileHeads", "inputs": inputs}


def test_profile_heads_at_16384_is_refused_before_allocating(comfy):
    """Defect 2: Profile Heads allocated ≈ 22 GB at 16384² and took the server down."""
    pid = comfy.server.proc.pid
    good_job(comfy)
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset the server's peak RSS
    before = rss(pid)["VmRSS"]
    wf = {"1": _unet(comfy.models["wan"]), "2": _cond(), "3": _profile_heads(width=16384, height=16384),
          "4": _preview(["3", 2])}
    text = refused(comfy, wf, "MemoryBudgetError", r"lower the resolution to at most \d+x\d+", "head statistics")
    grew = rss(pid)["VmHWM"] - before
    print(f"[memory] server peak grew by {grew / 2**20:.0f} MiB while refusing and running the good job")
    assert grew < 1024**3, grew
    assert "GiB" in text


def test_a_million_seconds_is_told_to_shorten_the_video(comfy):
    """Defect 6: the refusal said 'lower the width/height' when the length was the cause."""
    wf = {"1": _unet(comfy.models["wan"]), "2": _cond(),
          "3": _sampler(width=832, height=480, length=1_000_000, length_unit="seconds"), "4": _preview(["3", 1])}
    text = refused(comfy, wf, "MemoryBudgetError", r"free; shorten the video to at most \d+ seconds")
    assert "lower the width/height" not in text


def test_a_long_schedule_is_told_to_shorten_the_schedule(comfy):
    seg = {"class_type": "HeadForcingPromptSegment",
           "inputs": {"conditioning": ["2", 0], "length": 100000.0, "length_unit": "seconds", "transition": "cut",
                      "transition_frames": 0}}
    wf = {"1": _unet(comfy.models["wan"]), "2": _cond(), "5": seg,
          "3": _sampler(width=832, height=480, conditioning=None, prompt_schedule=["5", 0]), "4": _preview(["3", 1])}
    refused(comfy, wf, "MemoryBudgetError", r"free; shorten the schedule to at most \d+ latent frames \([\d.]+ s\) "
                                            r"in total")


def test_profile_heads_with_21_frames_per_block_says_what_is_allowed(comfy):
    wf = {"1": _unet(comfy.models["wan"]), "2": _cond(), "3": _profile_heads(frames_per_block=21),
          "4": _preview(["3", 2])}
    text = refused(comfy, wf, r"frames_per_block 21 is too large for profiling", r"at most 10")
    assert "between 42" not in text


def _queue_schedule_text(comfy, text: str) -> str:
    """Queue a Schedule From Text with ``text`` (its CLIP never loads: the text is refused first);
    returns the refusal, and checks the server still runs a good job."""
    wf = {"2": {"class_type": "HeadForcingPromptScheduleFromText",
                "inputs": {"clip": ["9", 0], "text": text, "default_transition": "cut",
                           "default_transition_frames": 3}},
          "9": {"class_type": "CLIPLoader", "inputs": {"clip_name": "missing.safetensors", "type": "wan"}},
          "4": _preview(["2", 1])}
    with pytest.raises(ComfyError) as info:
        comfy.queue(wf)
    good_job(comfy)
    return str(info.value)


def test_schedule_text_errors_are_reported_once(comfy):
    text = _queue_schedule_text(comfy, "5 | a fox\nbad line")
    assert text.count("no '|' between the length and the prompt") == 1, text


@pytest.mark.parametrize("line", ["36000000 | a fox", "1e13 | a fox", "1e308 | a fox"])
def test_an_endless_schedule_line_is_refused_when_queued_saying_shorten(comfy, line):
    """A length no video can have: refused before anything runs (once a raw overflow from the sampler)."""
    text = _queue_schedule_text(comfy, line)
    assert "longer than any video the sampler makes" in text and "shorten it" in text, text
    assert "Overflow" not in text and "overflowed" not in text


# --------------------------------------------------------------------------------------------
# names of files users save
# --------------------------------------------------------------------------------------------

BAD_NAMES = [(".", "folder reference"), ("..", "folder reference"), ("sub/", "no file name after the last '/'"),
             ("../../escape", "'..' is a folder reference"), ("line\nbreak", "U+000A"), ("x" * 300, "characters long"),
             ("", "it is empty"), ("preset: mine", "character ':'")]


def _files(folder: Path) -> set:
    return {p.relative_to(folder) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.mark.parametrize("name, why", BAD_NAMES)
def test_save_nodes_refuse_bad_names_saying_what_is_allowed(comfy, name, why):
    states, profiles = comfy.output_dir / STATES, comfy.base_dir / "models" / "headforcing"
    before = (_files(states), _files(profiles), _files(comfy.output_dir.parent))
    wf = {"1": _unet(comfy.models["wan"]), "2": _cond(), "3": _sampler(),
          "4": {"class_type": "HeadForcingSaveARState", "inputs": {"ar_state": ["3", 2], "filename": name}}}
    refused(comfy, wf, "StateError", "AR_STATE name .* is not allowed", re.escape(why), "letters, digits, spaces")
    wf = {"5": {"class_type": "HeadForcingLoadHeadProfile",
                "inputs": {"profile_name": "preset: pyramid_forcing_self_forcing_1p3b"}},
          "6": {"class_type": "HeadForcingSaveHeadProfile", "inputs": {"head_profile": ["5", 0], "filename": name}}}
    refused(comfy, wf, "ProfileError", "head profile name .* is not allowed", re.escape(why))
    after = (_files(states), _files(profiles), _files(comfy.output_dir.parent))
    assert after[0] <= before[0] | {p for p in after[0] if str(p).startswith("good")}
    assert after[1] == before[1]


# --------------------------------------------------------------------------------------------
# corrupt AR_STATE files (defects 1 and 4)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_state(comfy):
    name = f"good_{_uid()}"
    wf = {"1": _unet(comfy.models["wan"]), "2": _cond(), "3": _sampler(length=21),
          "4": {"class_type": "HeadForcingSaveARState", "inputs": {"ar_state": ["3", 2], "filename": name}}}
    comfy.run(wf, timeout=300)
    path = comfy.output_dir / STATES / f"{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        return path.name, f.metadata()["headforcing_state"], {k: f.get_tensor(k) for k in f.keys()}


def _continue_wf(state_name: str, prefix: str) -> dict:
    return {"1": _unet(host.TINY_WAN_NAME), "2": _cond(4),
            "5": {"class_type": "HeadForcingLoadARState", "inputs": {"state_name": state_name}},
            "6": {"class_type": "HeadForcingContinue",
                  "inputs": {"model": ["1", 0], "ar_state": ["5", 0], "conditioning": ["2", 0], "length": 3.0,
                             "length_unit": "latent_frames", "transition": "cut", "transition_frames": 0, "seed": 3}},
            "7": _save_latent(["6", 0], prefix)}


STATE_CASES = {
    # the issue's list
    "frames_per_block=0": (lambda m, t: m.update(frames_per_block=0), "frames_per_block"),
    "tail shape": (lambda m, t: t.update(tail=t["tail"][:, :, :2].contiguous()), "tensor tail"),
    "short rng": (lambda m, t: t.update(rng=t["rng"][:64].contiguous()), "tensor rng"),
    "steps abc": (lambda m, t: m.update(steps="abc"), "steps"),
    "negative latent size": (lambda m, t: m.update(latent_size=[-8, 8]), r"latent_size\[0\] \(height\)"),
    "malformed cache map": (lambda m, t: m["cache"].update(types=[{"head_type": 3}]), r"cache\.types"),
    "next_frame 1e12": (lambda m, t: m.update(next_frame=1e12), "next_frame"),
    # more, one per part of the schema
    "fingerprint patch": (lambda m, t: m["fingerprint"].update(patch_size=[1, 0, 0]), r"fingerprint\.patch_size"),
    "policy": (lambda m, t: m["policy"]["rules"][0][1].update(middle={"kind": "Nope"}), r"policy\.rules\[0\]"),
    "history": (lambda m, t: m["history"][0].update(frames=99), "history"),
    "dtype": (lambda m, t: m.update(dtype="torch.int8"), "dtype"),
    "context": (lambda m, t: t.update(context=t["context"][..., :100].contiguous()), "tensor context"),
    "nan": (lambda m, t: t.update(tail=torch.full_like(t["tail"], float("nan"))), "NaN"),
    "version": (lambda m, t: m.update(version=1), "version"),
    "unknown tensor": (lambda m, t: t.update(extra=torch.zeros(3)), "tensor extra"),
}


@pytest.mark.parametrize("case", list(STATE_CASES))
def test_corrupt_states_are_refused_naming_the_field(comfy, good_state, case):
    _, meta_json, tensors = good_state
    change, field = STATE_CASES[case]
    meta, tensors = json.loads(meta_json), dict(tensors)
    change(meta, tensors)
    name = f"bad_{_uid()}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(comfy.output_dir / STATES / name),
              metadata={"headforcing_state": json.dumps(meta)})
    prefix = f"e2e/bad_state_{_uid()}"
    text = refused(comfy, _continue_wf(name, prefix), "StateError", re.escape(name), field)
    assert "Traceback" not in text.split("\n")[0]


def test_generated_state_variants_never_take_the_server_down(comfy, good_state):
    """A sample of the generator's variants (every field wrong in turn, 1 in 40 here; all in the core tests)."""
    import importlib.util
    # by path: under pytest's rootdir layout `tests` is not an importable package name here
    spec = importlib.util.spec_from_file_location("hf_malformed", REPO / "tests" / "core" / "malformed.py")
    malformed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(malformed)
    state_variants = malformed.state_variants

    _, meta_json, tensors = good_state
    outcomes = {"refused": 0, "continued": 0}
    for i, (label, metadata, ts) in enumerate(state_variants(meta_json, tensors, cache_sample=25)):
        if i % 40:
            continue
        name = f"gen_{i}_{_uid()}.safetensors"
        save_file({k: v.contiguous() for k, v in ts.items()}, str(comfy.output_dir / STATES / name), metadata=metadata)
        try:
            comfy.run(_continue_wf(name, f"e2e/gen_state_{_uid()}"), timeout=300)
            outcomes["continued"] += 1
        except ComfyError as e:
            text = str(e)
            assert re.search(r"StateError|ModelFamilyError|ShapeError|HeadForcingError", text), (label, text)
            assert "RuntimeError" not in text and "AttributeError" not in text, (label, text)
            outcomes["refused"] += 1
        assert comfy.server.alive(), label
    print(f"\n[generated states through the server] {outcomes}")
    good_job(comfy)
    assert outcomes["refused"] >= 20


def test_folder_listings_survive_bad_files(comfy, good_state):
    states = comfy.output_dir / STATES
    profiles = comfy.base_dir / "models" / "headforcing"
    profiles.mkdir(parents=True, exist_ok=True)
    made = []
    try:
        for folder in (states, profiles):
            for name in ("new\nline.safetensors", ".hidden.safetensors", f"garbage_{_uid()}.safetensors"):
                (folder / name).write_bytes(os.urandom(64))
                made.append(folder / name)
            made.append(folder / f"dir_{_uid()}.safetensors")
            made[-1].mkdir()
            made.append(folder / f"dangling_{_uid()}.safetensors")
            os.symlink(folder / "nowhere", made[-1])
            raw = os.fsencode(folder) + f"/bad_{_uid()}".encode() + b"\xff.safetensors"  # not UTF-8
            with open(raw, "wb") as f:
                f.write(b"x")
            made.append(Path(os.fsdecode(raw)))
        info = comfy.object_info()
        listed = info["HeadForcingLoadARState"]["input"]["required"]["state_name"]
        options = listed[1]["options"] if len(listed) > 1 and "options" in listed[1] else listed[0]
        assert good_state[0] in options and not any("\n" in o or o.startswith((".", "dir_", "dangling_"))
                                                    for o in options), options
        plisted = info["HeadForcingLoadHeadProfile"]["input"]["required"]["profile_name"]
        poptions = plisted[1]["options"] if len(plisted) > 1 and "options" in plisted[1] else plisted[0]
        assert "preset: pyramid_forcing_self_forcing_1p3b" in poptions
        # a listed file that is garbage fails clearly; the good state still continues
        garbage = sorted(o for o in options if o.startswith("garbage_"))[0]
        refused(comfy, _continue_wf(garbage, f"e2e/garbage_{_uid()}"), "StateError", "not a readable AR_STATE")
        comfy.run(_continue_wf(good_state[0], f"e2e/good_continue_{_uid()}"), timeout=300)
    finally:  # the harness copies the output folder when the session ends
        for p in made:
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            elif os.path.lexists(p):
                os.unlink(p)


# --------------------------------------------------------------------------------------------
# corrupt head profiles and the estimate route (defect 3)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_profile(comfy):
    """A profile of the tiny model, made by the core (the same shape the server's tiny model has)."""
    from headforcing_core import random_backbone
    from headforcing_core.profiling import profile_heads, save_profile

    model = random_backbone(tiny.tiny_wan_config(), seed=0)
    with torch.no_grad():
        prof = profile_heads(model, [torch.randn(1, 8, 4096) * 0.1], frames=6, latent_height=4, latent_width=4,
                             seed=0, query_samples=4)
    folder = comfy.base_dir / "models" / "headforcing"
    path = save_profile(prof, folder / f"good_{_uid()}.safetensors")
    with safe_open(str(path), "pt") as f:
        return path.name, f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def estimate(comfy, **query) -> tuple[int, dict]:
    url = comfy.url + "/headforcing/estimate?" + urllib.parse.urlencode(query)
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


PROFILE_CASES = {
    "patch [1,0,0]": (lambda m: m["model"].update(patch_size=[1, 0, 0]), r"model\.patch_size\[1\]"),
    "patch [1,2]": (lambda m: m["model"].update(patch_size=[1, 2]), r"model\.patch_size"),
    "negative dim": (lambda m: m["model"].update(dim=-256), r"model\.dim"),
    "layers": (lambda m: m["model"].update(num_layers=10**6), r"model\.num_layers"),
    "taxonomy": (lambda m: m.update(taxonomy="wave"), "taxonomy"),
    "thresholds": (lambda m: m.update(thresholds={"head_forcing": {"anchor_fraction": "lots"}}),
                   r"thresholds\.head_forcing\.anchor_fraction"),
}


@pytest.mark.parametrize("case", list(PROFILE_CASES))
def test_corrupt_profiles_get_a_4xx_and_a_clear_node_error(comfy, good_profile, case):
    _, header, tensors = good_profile
    change, field = PROFILE_CASES[case]
    meta = json.loads(header["headforcing"])
    change(meta)
    name = f"bad_{_uid()}.safetensors"
    save_file(tensors, str(comfy.base_dir / "models" / "headforcing" / name),
              metadata={**header, "headforcing": json.dumps(meta)})
    status, body = estimate(comfy, preset="head_forcing", profile=name)
    print(f"\n[route] {case}: HTTP {status} {body.get('error', '')[:200]}")
    assert status == 422 and not body["ok"] and re.search(field, body["error"]) and name in body["error"], body
    wf = {"5": {"class_type": "HeadForcingLoadHeadProfile", "inputs": {"profile_name": name}},
          "6": {"class_type": "HeadForcingCachePolicy",
                "inputs": {"preset": "head_forcing", "rope": "preset default", "sink_frames": -1, "recent_frames": -1,
                           "memory_episodes": 8, "memory_similarity": 0.9, "width": 832, "height": 480,
                           "length": 81, "head_profile": ["5", 0]}},
          "7": _preview(["6", 1])}
    refused(comfy, wf, "ProfileError", field, re.escape(name))


ROUTE_GARBAGE = [
    ({"width": "abc"}, 400, "width must be an integer"), ({"width": "-16"}, 400, "width must be at least"),
    ({"length": "1e400"}, 400, "length must be an integer"), ({"memory_similarity": "nan"}, 400, "finite"),
    ({"preset": "../../etc"}, 400, "preset must be one of"), ({"bogus": "1"}, 400, "unknown parameter"),
    ({"width": "9" * 600}, 400, "too long"), ({"profile": "../../etc/passwd"}, 400, "'..' is a folder reference"),
    ({"profile": "missing_profile"}, 404, "no head profile"), ({"profile": "a\nb"}, 400, "U+000A"),
    ({"profile": ""}, 400, "profile must be"), ({"width": "16384", "height": "16384", "length": "1000000",
                                                 "preset": "full"}, 200, ""),
]


@pytest.mark.parametrize("query, status, words", ROUTE_GARBAGE)
def test_estimate_route_answers_4xx_never_5xx(comfy, query, status, words):
    got, body = estimate(comfy, **query)
    assert got == status, (got, body)
    assert body["ok"] is (status == 200)
    if words:
        assert words in body["error"], body
    good_job(comfy)


def test_estimate_route_other_methods_and_paths(comfy):
    for method, path in (("POST", "/headforcing/estimate"), ("GET", "/headforcing/nothing"),
                         ("DELETE", "/headforcing/estimate")):
        req = urllib.request.Request(comfy.url + path, method=method, data=b"{}" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert 400 <= e.value.code < 500, (method, path, e.value.code)
    good_job(comfy)


# --------------------------------------------------------------------------------------------
# interrupts inside a model call, measured in block times (defect 8)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("side, fpb, length", [(256, 3, 241), (2048, 1, 9)])
def test_interrupt_lands_within_a_block(comfy, models, side, fpb, length):
    """Interrupt a third of the way into a model call; the node stops at the next block boundary."""
    prefix = f"e2e/interrupt_{side}_{_uid()}"
    wf = {"1": _unet(models["deep"]), "2": _cond(), "4": _save_latent(["3", 0], prefix),
          "3": _sampler(width=side, height=side, length=length, frames_per_block=fpb,
                        policy="self_forcing_window")}
    seen: dict = {}

    def fire():
        seen["interrupt_at"] = time.time()
        comfy.interrupt()

    def on_message(run, msg):
        d = msg.get("data") or {}
        now = time.time()
        if msg.get("type") == "progress" and str(d.get("node")) == "3":
            seen.setdefault(d["value"], now)
            if d["value"] == 2 and "timer" not in seen:
                call = seen[2] - seen[1]
                seen["call"] = call
                seen["timer"] = threading.Timer(0.35 * call, fire)
                seen["timer"].start()
        if msg.get("type") == "execution_interrupted":
            seen["stopped_at"] = now

    run = comfy.run_ws(wf, timeout=600, raise_on_error=False, on_message=on_message)
    assert run.of_type("execution_interrupted"), [m["type"] for m in run.messages][-10:]
    assert "interrupt_at" in seen and "stopped_at" in seen, seen
    block = seen["call"] / DEEP_LAYERS
    latency = seen["stopped_at"] - seen["interrupt_at"]
    print(f"\n[timing] server, {side}x{side}, {fpb} frame(s) per chunk, {DEEP_LAYERS} blocks: a model call took "
          f"{seen['call'] * 1000:.0f} ms ({block * 1000:.0f} ms per block); interrupt -> execution_interrupted "
          f"{latency * 1000:.0f} ms = {latency / block:.2f} block times")
    m = re.findall(r"headforcing: interrupted after (\d+) of (\d+) model calls", comfy.log_text())
    assert m, comfy.log_text()[-2000:]
    if side >= 2048:
        # the rest of the call (≈ 0.65 of it, 2.6 blocks) is not waited for: at most one block plus messaging
        assert latency <= 1.25 * block + 0.5, (latency, block)
    else:
        assert latency < 2.0, latency
    assert not list((comfy.output_dir / "e2e").glob(Path(prefix).name + "*"))
    good_job(comfy)
