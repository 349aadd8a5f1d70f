"""Issue 21 part 4 in the real server: head profiles and AR states in sub-folders of their folders.

The pack's Save nodes take ``sub/name`` as ComfyUI's own savers take a ``sub/prefix`` (the file lands
in the sub-folder, which is created), and its Load nodes list ``sub/name.safetensors`` as ComfyUI's
own loaders list a model filed in a sub-folder (UNETLoader is the yardstick here) — while nothing
leaves the folder: a linked sub-folder that points outside is neither listed, nor loaded through
the estimate route, nor written into.
"""
from __future__ import annotations

import os
import shutil
import uuid

import pytest

from .conftest import ComfyError
from .test_reliability_e2e import estimate

PRESET = "preset: pyramid_forcing_self_forcing_1p3b"
STATES = "headforcing_states"


def _uid() -> str:
    return uuid.uuid4().hex[:8]


def _options(comfy, node: str, name: str) -> list[str]:
    spec = comfy.object_info(node)[node]["input"]["required"][name]
    if len(spec) > 1 and spec[1].get("options"):  # V3 COMBO
        return list(spec[1]["options"])
    return list(spec[0])  # V1 list of choices


def _save_profile_wf(filename: str) -> dict:
    return {"5": {"class_type": "HeadForcingLoadHeadProfile", "inputs": {"profile_name": PRESET}},
            "6": {"class_type": "HeadForcingSaveHeadProfile", "inputs": {"head_profile": ["5", 0],
                                                                          "filename": filename}}}


def _sampler_wf(comfy, filename: str) -> dict:
    return {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": comfy.models["wan"], "weight_dtype": "default"}},
            "2": {"class_type": "HFTestConditioning", "inputs": {"seed": 1, "length": 16}},
            "3": {"class_type": "HeadForcingARSampler",
                  "inputs": {"model": ["1", 0], "conditioning": ["2", 0], "width": 32, "height": 32, "length": 9,
                             "seed": 3, "length_unit": "frames", "policy": "self_forcing_window"}},
            "4": {"class_type": "HeadForcingSaveARState", "inputs": {"ar_state": ["3", 2], "filename": filename}}}


def test_comfyui_lists_models_in_sub_folders_as_sub_slash_name(comfy):
    """The yardstick: ComfyUI's own UNETLoader lists a model filed in a sub-folder as ``sub/name``."""
    sub = comfy.base_dir / "models" / "diffusion_models" / f"wan14b_{_uid()}"
    sub.mkdir()
    shutil.copyfile(comfy.base_dir / "models" / "diffusion_models" / comfy.models["wan"], sub / "tiny.safetensors")
    assert f"{sub.name}/tiny.safetensors" in _options(comfy, "UNETLoader", "unet_name")


def test_a_profile_saved_as_sub_slash_name_is_listed_and_loads_by_that_name(comfy):
    folder = comfy.base_dir / "models" / "headforcing"
    name = f"wan14b/sub_{_uid()}"
    entry = comfy.run(_save_profile_wf(name), timeout=120)
    path = folder / (name + ".safetensors")
    assert path.is_file(), list(folder.rglob("*"))
    assert f"saved head profile {name}.safetensors" in comfy.ui_text(entry, "6")[0]
    # listed as ComfyUI lists a model in a sub-folder, and loaded by that name
    listed = f"{name}.safetensors"
    assert listed in _options(comfy, "HeadForcingLoadHeadProfile", "profile_name")
    wf = {"5": {"class_type": "HeadForcingLoadHeadProfile", "inputs": {"profile_name": listed}},
          "7": {"class_type": "PreviewAny", "inputs": {"source": ["5", 2]}}}
    summary = comfy.ui_text(comfy.run(wf, timeout=120), "7")[0]
    assert f"head profile '{listed}'" in summary and "30 layers × 12 heads" in summary, summary
    # the Cache Policy's estimate route takes the same name
    status, body = estimate(comfy, preset="pyramid_forcing", profile=listed)
    assert status == 200 and body["profile"] == listed, body
    # saving the same name again without overwrite is refused, naming it with its sub-folder
    wf = _save_profile_wf(name)
    wf["6"]["inputs"]["overwrite"] = False
    with pytest.raises(ComfyError, match=f"a head profile '{name}.safetensors' already exists"):
        comfy.run(wf, timeout=120)


def test_an_ar_state_saved_two_folders_deep_is_listed_and_continues(comfy):
    name = f"runs/{_uid()}/story"
    comfy.run(_sampler_wf(comfy, name), timeout=300)
    path = comfy.output_dir / STATES / (name + ".safetensors")
    assert path.is_file()
    listed = f"{name}.safetensors"
    assert listed in _options(comfy, "HeadForcingLoadARState", "state_name")
    wf = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": comfy.models["wan"], "weight_dtype": "default"}},
          "2": {"class_type": "HFTestConditioning", "inputs": {"seed": 4, "length": 16}},
          "5": {"class_type": "HeadForcingLoadARState", "inputs": {"state_name": listed, "model": ["1", 0]}},
          "6": {"class_type": "HeadForcingContinue",
                "inputs": {"model": ["1", 0], "ar_state": ["5", 0], "conditioning": ["2", 0], "length": 3.0,
                           "length_unit": "latent_frames", "transition": "cut", "transition_frames": 0, "seed": 3}},
          "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"e2e/sub_{_uid()}"}}}
    entry = comfy.run(wf, timeout=300)
    assert comfy.outputs(entry, ".latent"), entry


def test_sub_folders_linked_outside_are_not_listed_loaded_or_written(comfy, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"never opened")
    uid = _uid()
    profiles, states = comfy.base_dir / "models" / "headforcing", comfy.output_dir / STATES
    profiles.mkdir(parents=True, exist_ok=True)
    states.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, profiles / f"link_{uid}")
    os.symlink(outside, states / f"link_{uid}")
    # not listed
    assert not [o for o in _options(comfy, "HeadForcingLoadHeadProfile", "profile_name") if f"link_{uid}" in o]
    assert not [o for o in _options(comfy, "HeadForcingLoadARState", "state_name") if f"link_{uid}" in o]
    # not loaded through the estimate route (the file exists beyond the link)
    status, body = estimate(comfy, preset="pyramid_forcing", profile=f"link_{uid}/secret.safetensors")
    assert status == 422 and "points outside its folder" in body["error"], (status, body)
    # not written: both Save nodes refuse before writing anything
    with pytest.raises(ComfyError, match="points outside its folder"):
        comfy.run(_save_profile_wf(f"link_{uid}/new"), timeout=120)
    with pytest.raises(ComfyError, match="points outside its folder"):
        comfy.run(_sampler_wf(comfy, f"link_{uid}/new"), timeout=300)
    assert os.listdir(outside) == ["secret.safetensors"]
    # and a name climbing out through a real sub-folder is refused by the name policy
    with pytest.raises(ComfyError, match="'..' is a folder reference"):
        comfy.run(_save_profile_wf("wan14b/../../escape"), timeout=120)
    assert not (comfy.base_dir / "models" / "escape.safetensors").exists()
    assert comfy.server.alive()
