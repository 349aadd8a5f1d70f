"""Every field of an AR_STATE or head profile file wrong in turn: refused with one clear error naming
the field, or harmless (the file still loads and works). Never a raw exception, never a hang."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from headforcing_core import HeadForcingError, ProfileError, StateError
from headforcing_core.policies import make_policy
from headforcing_core.profiling import load_profile, profile_heads, save_profile
from headforcing_core.prompts import PromptSchedule, PromptSegment
from headforcing_core.state_file import load_state, save_state
from headforcing_core.story import continue_generation, generate_schedule

from .conftest import latent_noise, text_context
from .malformed import profile_variants, state_variants

FIELD = re.compile(r"field '([^']+)'")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _write(path, metadata, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


@pytest.fixture(scope="module", params=["head_forcing", "pyramid_forcing", "full"])
def good_state(request, tiny_model):
    pol = make_policy(request.param)
    a, b = text_context(seed=1), text_context(seed=2, tokens=9)
    sched = PromptSchedule((PromptSegment(a, frames=6), PromptSegment(b, frames=6, transition="recache",
                                                                       transition_frames=3)))
    with torch.no_grad():
        _, state = generate_schedule(tiny_model, sched, latent_noise(12), policy=pol,
                                     generator=torch.Generator().manual_seed(0))
    return state


@pytest.mark.parametrize("cache_sample", [25, pytest.param(1, id="every_cache_field")])
def test_every_state_field_wrong_in_turn(tiny_model, good_state, tmp_path, cache_sample):
    """Every field of a state wrong in turn; the cache section sampled 1 in 25 for every policy, and
    every one of its fields (``every_cache_field``) too."""
    refused, accepted = 0, []
    variants = state_variants(good_state.meta_json, dict(good_state.tensors), cache_sample=cache_sample)
    for i, (label, metadata, tensors) in enumerate(variants):
        path = tmp_path / f"v{i}.safetensors"
        _write(path, metadata, tensors)
        try:
            state = load_state(path)
        except StateError as e:
            msg = str(e)
            assert path.name in msg and len(msg) < 700 and "\n" not in msg, (label, msg)
            refused += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{label}: raw {type(e).__name__}: {e}")
        # accepted: it must still continue (or refuse with the pack's own error)
        try:
            continue_generation(tiny_model, state, text_context(seed=3), latent_noise(3, seed=5))
        except HeadForcingError:
            pass
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{label} loaded but continuing raised {type(e).__name__}: {e}")
        accepted.append(label)
    print(f"\n[malformed states] {refused} refused, {len(accepted)} accepted (well-formed, still usable): {accepted}")
    assert refused > 150 and len(accepted) < 0.15 * (refused + len(accepted))


@pytest.mark.parametrize("change, field", [
    (lambda m, t: m.update(frames_per_block=0), "frames_per_block"),  # defect 1: looped forever
    (lambda m, t: m.update(steps="abc"), "steps"),
    (lambda m, t: m.update(latent_size=[-8, 8]), "latent_size[0] (height)"),
    (lambda m, t: m.update(next_frame=1e12), "next_frame"),
    (lambda m, t: m.update(next_frame=10**12), "next_frame"),
    (lambda m, t: m.update(shift=float("nan")), "shift"),
    (lambda m, t: m["cache"].update(types="oops"), "cache.types"),
    (lambda m, t: m["cache"]["types"][0]["tracker"].update(committed=99), "cache.types[0].tracker.committed"),
    (lambda m, t: m["cache"]["types"][0]["frame_pages"].update({"0": 10**6}), "cache.types[0].frame_pages[0]"),
    (lambda m, t: m["fingerprint"].update(patch_size=[1, 0, 0]), "fingerprint.patch_size[1]"),
    (lambda m, t: t.update(tail=t["tail"][:, :, :1].contiguous()), "tensor tail"),
    (lambda m, t: t.update(rng=t["rng"][:100].contiguous()), "tensor rng"),
    (lambda m, t: m["history"][0].update(frames=5), "history[1].start"),
    (lambda m, t: m["policy"].update(window="three"), "policy.window"),
    (lambda m, t: m["policy"]["rules"][0][1].update(family="spiral"), "policy.rules[0].family"),
    (lambda m, t: m["policy"].update(unprofiled_rules=[["memory", {"sink": -1, "recent": 2}]]),
     "policy.unprofiled_rules[0].sink"),
    (lambda m, t: m["policy"].update(unprofiled_rules="memory"), "policy.unprofiled_rules"),
])
def test_the_reported_broken_states_name_their_field(good_state, tmp_path, change, field):
    meta, tensors = json.loads(good_state.meta_json), dict(good_state.tensors)
    change(meta, tensors)
    path = tmp_path / "broken.safetensors"
    _write(path, {"headforcing_state": json.dumps(meta)}, tensors)
    with pytest.raises(StateError) as e:
        load_state(path)
    assert FIELD.search(str(e.value)).group(1) == field, str(e.value)


def test_a_good_state_round_trips(good_state, tmp_path):
    st = load_state(save_state(good_state, tmp_path / "good.safetensors"))
    assert st.meta == good_state.meta


@pytest.fixture(scope="module")
def good_profile_file(tiny_model, tmp_path_factory):
    prof = profile_heads(tiny_model, [text_context(seed=1)], frames=6, latent_height=4, latent_width=4, seed=0,
                         query_samples=4)
    path = save_profile(prof, tmp_path_factory.mktemp("profiles") / "good.safetensors")
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_every_profile_field_wrong_in_turn(good_profile_file, tmp_path, tiny_model):
    from headforcing_core.backbone import inspect_backbone

    header, tensors = good_profile_file
    spec = inspect_backbone(tiny_model)
    refused, accepted = 0, []
    for i, (label, metadata, ts) in enumerate(profile_variants(header, tensors)):
        path = tmp_path / f"p{i}.safetensors"
        _write(path, metadata, ts)
        try:
            prof = load_profile(path)
        except ProfileError as e:
            msg = str(e)
            assert path.name in msg and len(msg) < 700, (label, msg)
            refused += 1
            continue
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{label}: raw {type(e).__name__}: {e}")
        # accepted: everything a node does with a profile must work or refuse cleanly
        try:
            prof.check_model(spec)
            prof.describe()
            for tax in ("head_forcing", "pyramid_forcing"):
                make_policy(tax, labels=prof.labels_for(tax))
        except HeadForcingError:
            pass
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{label} loaded but using it raised {type(e).__name__}: {e}")
        accepted.append(label)
    print(f"\n[malformed profiles] {refused} refused, {len(accepted)} accepted (well-formed, still usable): {accepted}")
    assert refused > 60


@pytest.mark.parametrize("patch, field", [([1, 0, 0], "model.patch_size[1]"), ([1, 2], "model.patch_size"),
                                          ([2, 2, 2], "model.patch_size")])
def test_the_reported_broken_profiles_name_their_field(good_profile_file, tmp_path, patch, field):
    header, tensors = good_profile_file
    meta = json.loads(header["headforcing"])
    meta["model"]["patch_size"] = patch
    path = tmp_path / "bad.safetensors"
    _write(path, {**header, "headforcing": json.dumps(meta)}, tensors)
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    assert FIELD.search(str(e.value)).group(1) == field, str(e.value)


def test_negative_dim_profile_is_refused(good_profile_file, tmp_path):
    header, tensors = good_profile_file
    meta = json.loads(header["headforcing"])
    meta["model"]["dim"] = -256
    path = tmp_path / "neg.safetensors"
    _write(path, {**header, "headforcing": json.dumps(meta)}, tensors)
    with pytest.raises(ProfileError, match=r"field 'model.dim' must be a whole number from 1 to 65536, got -256"):
        load_profile(path)
