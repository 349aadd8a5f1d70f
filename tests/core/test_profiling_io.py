"""Head profile files: round trip, validation, safe names, the shipped Pyramid Forcing preset."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from headforcing_core import ProfileError, WanConfig, inspect_backbone, make_policy, random_backbone
from headforcing_core.policies import pyramid_forcing_preset_labels
from headforcing_core.profiling import (PRESET_PREFIX, classify_head_forcing, list_profiles, load_profile,
                                        preset_names, preset_profile, profile_heads, resolve_profile,
                                        profile_path, save_profile)

from .conftest import text_context


@pytest.fixture(scope="module")
def tiny_profile(tiny_model):
    return profile_heads(tiny_model, [text_context(seed=1), text_context(seed=2)], frames=12, latent_height=4,
                         latent_width=4, seed=3, query_samples=6, taxonomy="pyramid_forcing",
                         thresholds={"recent_frames": 3})


def test_round_trip_keeps_tensors_and_metadata(tiny_profile, tmp_path):
    path = save_profile(tiny_profile, profile_path(tmp_path, "tiny"))
    assert path == tmp_path / "tiny.safetensors" and path.is_file()
    loaded = load_profile(path, name="tiny.safetensors")
    assert loaded.name == "tiny.safetensors"
    for n, t in tiny_profile.stats.tensors().items():
        got = getattr(loaded.stats, n)
        assert got.dtype == torch.float64 and torch.equal(got, t), n
    assert loaded.stats.frames_per_block == tiny_profile.stats.frames_per_block == 3
    assert loaded.labels_by_taxonomy == tiny_profile.labels_by_taxonomy
    assert loaded.taxonomy == "pyramid_forcing" and loaded.labels == tiny_profile.labels
    assert loaded.thresholds == tiny_profile.thresholds
    assert loaded.thresholds["pyramid_forcing"]["recent_frames"] == 3
    assert loaded.calibration == tiny_profile.calibration
    assert loaded.model == tiny_profile.model == inspect_backbone(random_backbone(
        WanConfig(dim=256, num_heads=2, num_layers=2, ffn_dim=512))).fingerprint()
    assert loaded.source == tiny_profile.source
    # the header is plain JSON anyone can read
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
        keys = set(f.keys())
    meta = json.loads(header["headforcing"])
    assert header["format"] == "headforcing.head_profile" and meta["model"]["num_heads"] == 2
    assert meta["calibration"]["frames"] == 12 and meta["taxonomy"] == "pyramid_forcing"
    assert {"labels.head_forcing", "labels.pyramid_forcing", "stats.mass", "summary.sink_mass"} <= keys
    # the loaded profile re-classifies to the same labels as the original
    assert loaded.classify("head_forcing").labels == tiny_profile.classify("head_forcing").labels
    # and drives a policy
    make_policy("head_forcing", labels=loaded.labels_for("head_forcing"))


def test_other_model_shape_is_refused_naming_both(tiny_profile, tmp_path):
    path = save_profile(tiny_profile, tmp_path / "tiny.safetensors")
    other = inspect_backbone(random_backbone(WanConfig(dim=512, num_heads=4, num_layers=3, ffn_dim=512)))
    with pytest.raises(ProfileError) as e:
        load_profile(path, expect=other)
    msg = str(e.value)
    assert "2 layers × 2 heads, dim 256" in msg and "3 layers × 4 heads, dim 512" in msg
    load_profile(path, expect=inspect_backbone(random_backbone(WanConfig(dim=256, num_heads=2, num_layers=2,
                                                                         ffn_dim=512))))
    with pytest.raises(ProfileError, match="30 layers × 12 heads, dim 1536.*2 layers × 2 heads, dim 256"):
        preset_profile(PRESET_PREFIX + "pyramid_forcing_self_forcing_1p3b").check_model(tiny_profile.model)


@pytest.mark.parametrize("name", ["../x", "a/../../x", "..", "/etc/passwd", "/tmp/x.safetensors", "..\\x",
                                  "C:\\x", "", "   ", "a\x00b", "sub/", ".", "preset: x", "sub/../../x"])
def test_names_leaving_the_folder_are_refused(tmp_path, name):
    with pytest.raises(ProfileError, match="head profile name .* is not allowed"):
        profile_path(tmp_path / "profiles", name)


def test_symlinks_out_of_the_folder_are_refused(tmp_path, tiny_profile):
    folder = tmp_path / "profiles"
    outside = tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    save_profile(tiny_profile, outside / "secret.safetensors")
    os.symlink(outside, folder / "link_dir")
    os.symlink(outside / "secret.safetensors", folder / "link.safetensors")
    with pytest.raises(ProfileError, match="points outside its folder"):
        profile_path(folder, "link_dir/secret.safetensors")
    with pytest.raises(ProfileError, match="points outside its folder"):
        profile_path(folder, "link.safetensors")
    save_profile(tiny_profile, folder / "ok.safetensors")
    os.symlink(folder / "ok.safetensors", folder / "alias.safetensors")  # a link inside is fine
    assert profile_path(folder, "alias") == folder / "ok.safetensors"
    assert list_profiles(folder) == ["alias.safetensors", "ok.safetensors"]
    with pytest.raises(ProfileError, match="outside"):
        resolve_profile("link.safetensors", [folder])


def test_profiles_in_sub_folders_list_and_load_by_their_sub_folder_name(tmp_path, tiny_profile):
    folder = tmp_path / "headforcing"
    save_profile(tiny_profile, profile_path(folder, "wan14b/mine"))
    assert list_profiles(folder) == ["wan14b/mine.safetensors"]
    for name in ("wan14b/mine", "wan14b/mine.safetensors"):
        loaded = resolve_profile(name, [folder])
        assert loaded.labels.types == tiny_profile.labels.types


def test_corrupt_files_give_a_clear_error(tiny_profile, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(300))
    with pytest.raises(ProfileError, match="'junk.safetensors' is not a readable safetensors file"):
        load_profile(junk)
    good = save_profile(tiny_profile, tmp_path / "good.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ProfileError, match="corrupt or truncated"):
        load_profile(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ProfileError, match="not a head profile"):
        load_profile(foreign)
    bad_meta = tmp_path / "bad_meta.safetensors"
    save_file({"labels.head_forcing": torch.zeros(2, 2, dtype=torch.int8)}, str(bad_meta),
              metadata={"format": "headforcing.head_profile", "format_version": "1", "headforcing": "{oops"})
    with pytest.raises(ProfileError, match="metadata is not valid JSON"):
        load_profile(bad_meta)
    bad_codes = tmp_path / "bad_codes.safetensors"
    meta = {"model": tiny_profile.model, "taxonomy": "head_forcing"}
    save_file({"labels.head_forcing": torch.full((2, 2), 7, dtype=torch.int8)}, str(bad_codes),
              metadata={"format": "headforcing.head_profile", "format_version": "1", "headforcing": json.dumps(meta)})
    with pytest.raises(ProfileError, match="codes outside"):
        load_profile(bad_codes)
    wrong_shape = tmp_path / "wrong_shape.safetensors"
    save_file({"labels.head_forcing": torch.zeros(3, 2, dtype=torch.int8)}, str(wrong_shape),
              metadata={"format": "headforcing.head_profile", "format_version": "1", "headforcing": json.dumps(meta)})
    with pytest.raises(ProfileError, match=r"has shape \[3, 2\]; the profile's model has 2 layers × 2 heads"):
        load_profile(wrong_shape)
    with pytest.raises(ProfileError, match="no head profile file"):
        load_profile(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("thresholds, why", [({"recent_frames": -1}, "must be ≥ 0"),
                                             ({"no_such_knob": 1}, "unknown pyramid_forcing threshold")])
def test_stored_thresholds_the_classifier_refuses_are_refused(tiny_profile, tmp_path, thresholds, why):
    meta = {"model": tiny_profile.model, "taxonomy": "pyramid_forcing", "thresholds": {"pyramid_forcing": thresholds}}
    bad = tmp_path / "bad_thresholds.safetensors"
    save_file({"labels.pyramid_forcing": torch.zeros(2, 2, dtype=torch.int8)}, str(bad),
              metadata={"format": "headforcing.head_profile", "format_version": "1", "headforcing": json.dumps(meta)})
    with pytest.raises(ProfileError, match=f"head profile 'bad_thresholds.safetensors': field 'thresholds.pyramid_forcing' "
                                           f"are not usable: .*{why}"):
        load_profile(bad)


def test_pyramid_preset_is_a_labels_only_profile_with_attribution(tmp_path):
    assert preset_names() == [PRESET_PREFIX + "pyramid_forcing_self_forcing_1p3b"]
    p = preset_profile(preset_names()[0])
    assert p.read_only and p.stats is None and p.taxonomy == "pyramid_forcing"
    assert p.labels == pyramid_forcing_preset_labels()
    assert p.labels.counts() == {"anchor": 172, "wave": 156, "veil": 32}  # counts of the CSV
    assert "IF-LAB-PKU/Pyramid-Forcing" in p.attribution and "Apache" in p.attribution
    assert p.model == {"dim": 1536, "num_heads": 12, "num_layers": 30, "patch_size": [1, 2, 2], "in_dim": 16,
                       "out_dim": 16, "text_dim": 4096}
    assert "STAND-IN" in p.labels_for("head_forcing").source
    with pytest.raises(ProfileError, match="no statistics"):
        p.classify("pyramid_forcing")
    # saved and loaded, it keeps its labels and attribution
    loaded = load_profile(save_profile(p, tmp_path / "copy.safetensors"))
    assert loaded.labels_by_taxonomy == p.labels_by_taxonomy and loaded.attribution == p.attribution
    assert loaded.stats is None
    assert resolve_profile(preset_names()[0], []).labels == p.labels
    make_policy("pyramid_forcing", labels=p.labels)


def test_head_forcing_recipe_counts_and_ties():
    """360 heads (Self Forcing's 30 × 12): 90 anchors, 54 local, 216 memory; equal stats tie-break by
    (layer, head)."""
    import numpy as np
    from headforcing_core.profiling import HeadSummary

    zeros = np.zeros((30, 12))
    age = np.zeros((30, 12, 21))
    s = HeadSummary(3, 4, zeros, zeros, zeros, zeros, zeros, zeros, zeros, zeros, age, age, age, zeros, zeros, zeros)
    labels = classify_head_forcing(s)
    assert labels.counts() == {"local": 54, "anchor": 90, "memory": 216}
    flat = [t for row in labels.types for t in row]
    assert flat[:90] == ["anchor"] * 90 and flat[90:144] == ["local"] * 54
    sink = np.random.default_rng(0).random((30, 12))
    s2 = HeadSummary(3, 4, sink, zeros, zeros, zeros, zeros, zeros, zeros, zeros, age, age, age, zeros, zeros, zeros)
    l2 = classify_head_forcing(s2)
    top = sorted(((v, (li, hi)) for (li, hi), v in np.ndenumerate(sink)), reverse=True)[:90]
    assert all(l2.types[li][hi] == "anchor" for _, (li, hi) in top)
    assert classify_head_forcing(s2) == l2  # deterministic
