"""AR_STATE: continuation equals one run, states are immutable, files round-trip, bad input is refused."""

import json

import pytest
import torch
from safetensors.torch import save_file

from headforcing_core import WanConfig, generate, random_backbone
from headforcing_core.errors import StateError
from headforcing_core.policies import PRESETS, make_policy, policy_from_dict, policy_to_dict
from headforcing_core.prompts import PromptSchedule, PromptSegment
from headforcing_core.names import safe_path
from headforcing_core.state import ARState
from headforcing_core.state_file import load_state, save_state
from headforcing_core.story import continue_generation, generate_schedule

from .conftest import TINY, latent_noise, text_context


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


A = text_context(seed=11)
B = text_context(seed=12)
C = text_context(seed=13, tokens=7)

# budgets small enough that every tier evicts within the 16 frames these tests generate
POLICIES = {
    "full": make_policy("full"),
    "self_forcing_window": make_policy("self_forcing_window", recent=9),
    "sink_window": make_policy("sink_window", sink=1, recent=3),
    "longlive": make_policy("longlive", sink=1, recent=4),
    "pyramid_forcing": make_policy("pyramid_forcing"),
    "head_forcing": make_policy("head_forcing"),
}
assert set(POLICIES) == set(PRESETS)


def seg(ctx, frames, transition="cut", k=0):
    return PromptSegment(ctx, frames=frames, transition=transition, transition_frames=k)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def gen(seed=7):
    return torch.Generator().manual_seed(seed)


def cache_tensors(state):
    return {k: v for k, v in state.tensors.items() if k.startswith("cache.")}


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("transition,k", [("cut", 0), ("recache", 3), ("blend", 4)])
def test_schedule_equals_run_then_continue(tiny_model, policy, transition, k):
    """[A, B] in one run == A, then Continue(B) from A's state, with the same noise and re-noise seed."""
    pol = POLICIES[policy]
    noise = latent_noise(16)
    b = seg(B, 7, transition, k)
    whole, whole_state = generate_schedule(tiny_model, PromptSchedule((seg(A, 9), b)), noise, policy=pol,
                                           generator=gen())
    first, state = generate_schedule(tiny_model, A, noise[:, :, :9], policy=pol, generator=gen())
    second, cont_state = continue_generation(tiny_model, state, PromptSchedule((b,)), noise[:, :, 9:])
    assert rel_err(torch.cat([first, second], dim=2), whole) < 1e-5
    assert cont_state.next_frame == whole_state.next_frame == 16
    ct, wt = cache_tensors(cont_state), cache_tensors(whole_state)
    assert ct.keys() == wt.keys()
    if policy != "full":  # same capacities: the snapshots match slot for slot
        for name in ct:
            assert torch.allclose(ct[name], wt[name], atol=1e-5), name
    assert [h["transition"] for h in cont_state.history] == ["cut", transition]
    assert json.loads(cont_state.meta_json)["cache"]["types"] == json.loads(whole_state.meta_json)["cache"]["types"] \
        or policy == "full"


def test_three_segment_chain(tiny_model):
    noise = latent_noise(15)
    pol = POLICIES["head_forcing"]
    segs = [seg(A, 6), seg(B, 3, "recache", 2), seg(C, 6, "blend", 3)]
    whole, _ = generate_schedule(tiny_model, PromptSchedule(tuple(segs)), noise, policy=pol, generator=gen())
    out1, s1 = generate_schedule(tiny_model, PromptSchedule((segs[0],)), noise[:, :, :6], policy=pol, generator=gen())
    out2, s2 = continue_generation(tiny_model, s1, PromptSchedule((segs[1],)), noise[:, :, 6:9])
    out3, s3 = continue_generation(tiny_model, s2, PromptSchedule((segs[2],)), noise[:, :, 9:])
    assert rel_err(torch.cat([out1, out2, out3], 2), whole) < 1e-5
    assert [h["start"] for h in s3.history] == [0, 6, 9]


def test_continue_same_prompt_equals_one_long_run(tiny_model):
    """Continuing with the state's own prompt is not a switch: the result is one uninterrupted run."""
    noise = latent_noise(15)
    for policy in ("full", "head_forcing"):
        ref = generate(tiny_model, A, noise, policy=POLICIES[policy], generator=gen())
        first, state = generate_schedule(tiny_model, A, noise[:, :, :9], policy=POLICIES[policy], generator=gen())
        second, _ = continue_generation(tiny_model, state, A.clone(), noise[:, :, 9:])
        assert rel_err(torch.cat([first, second], 2), ref) < 1e-5


def test_full_policy_grows_on_continue(tiny_model):
    noise = latent_noise(12)
    _, state = generate_schedule(tiny_model, A, noise[:, :, :6], policy="full", generator=gen())
    assert state.tensors["cache.all.frames.k"].shape[2] == 6  # pages
    _, s2 = continue_generation(tiny_model, state, B, noise[:, :, 6:])
    assert s2.tensors["cache.all.frames.k"].shape[2] == 12
    assert state.tensors["cache.all.frames.k"].shape[2] == 6  # the input state is untouched


def test_states_are_immutable_and_continuations_independent(tiny_model):
    noise = latent_noise(12)
    _, state = generate_schedule(tiny_model, A, noise[:, :, :6], policy="head_forcing", generator=gen())
    before = {k: v.clone() for k, v in state.tensors.items()}
    meta = state.meta_json
    assert all(v.device.type == "cpu" for v in state.tensors.values())
    out1, s1 = continue_generation(tiny_model, state, PromptSchedule((seg(B, 6, "recache", 3),)), noise[:, :, 6:])
    out2, s2 = continue_generation(tiny_model, state, PromptSchedule((seg(B, 6, "recache", 3),)), noise[:, :, 6:])
    assert torch.equal(out1, out2)
    assert s1.tensors.keys() == s2.tensors.keys()
    assert all(torch.equal(s1.tensors[k], s2.tensors[k]) for k in s1.tensors)
    assert state.meta_json == meta
    assert state.tensors.keys() == before.keys()
    assert all(torch.equal(state.tensors[k], before[k]) for k in before)
    # new states never share storage with the old one
    ptrs = {t.data_ptr() for t in state.tensors.values() if t.numel()}
    assert not ptrs & {t.data_ptr() for t in s1.tensors.values() if t.numel()}
    with pytest.raises(TypeError):
        state.tensors["context"] = torch.zeros(1)  # read-only mapping
    with pytest.raises(Exception):
        state.meta_json = "{}"  # frozen
    m = state.meta
    m["next_frame"] = 99  # a copy
    assert state.next_frame == 6


def test_continue_restores_the_renoise_stream(tiny_model):
    """Without a generator the state's saved RNG state drives the re-noise draws; a given one overrides."""
    noise = latent_noise(12)
    _, state = generate_schedule(tiny_model, A, noise[:, :, :6], generator=gen())
    out_saved, _ = continue_generation(tiny_model, state, A, noise[:, :, 6:])
    out_other, _ = continue_generation(tiny_model, state, A, noise[:, :, 6:], generator=gen(123))
    assert not torch.allclose(out_saved, out_other)


@pytest.mark.parametrize("policy", ["full", "pyramid_forcing", "head_forcing"])
def test_save_and_load_round_trip(tiny_model, tmp_path, policy):
    noise = latent_noise(12)
    _, state = generate_schedule(tiny_model, PromptSchedule((seg(A, 3), seg(C, 3))), noise[:, :, :6],
                                 policy=POLICIES[policy], generator=gen())
    path = save_state(state, safe_path(tmp_path, "story_1", kind="AR_STATE", error=StateError))
    assert path == tmp_path / "story_1.safetensors" and path.is_file()
    loaded = load_state(path)
    assert loaded.meta == state.meta
    assert loaded.tensors.keys() == state.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], state.tensors[k]) for k in state.tensors)
    a, _ = continue_generation(tiny_model, state, seg(B, 6, "recache", 2), noise[:, :, 6:])
    b, _ = continue_generation(tiny_model, loaded, seg(B, 6, "recache", 2), noise[:, :, 6:])
    assert torch.equal(a, b)
    assert "AR_STATE: 6 latent frames" in loaded.describe()


def test_policy_json_round_trip():
    for preset in PRESETS:
        pol = make_policy(preset)
        assert policy_from_dict(json.loads(json.dumps(policy_to_dict(pol)))) == pol


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.fixture(scope="module")
def small_state(tiny_model):
    with torch.no_grad():
        return generate_schedule(tiny_model, A, latent_noise(3), policy="head_forcing", generator=gen())[1]


def test_state_from_another_model_is_refused(small_state):
    other = random_backbone(WanConfig(dim=256, num_heads=2, num_layers=3, ffn_dim=512), seed=0)
    with pytest.raises(StateError, match="another model.*2 layers.*3 layers"):
        continue_generation(other, small_state, B, latent_noise(3))


def test_state_of_another_size_or_batch_is_refused(tiny_model, small_state):
    with pytest.raises(StateError, match="64x64 video.*continuation asks for 128x64"):
        continue_generation(tiny_model, small_state, B, latent_noise(3, h=8, w=16))
    with pytest.raises(StateError, match="batch of 1"):
        continue_generation(tiny_model, small_state, B, latent_noise(3, batch=2))
    with pytest.raises(StateError, match="expected an AR_STATE"):
        continue_generation(tiny_model, {"not": "a state"}, B, latent_noise(3))
    with pytest.raises(ValueError, match="text width"):
        continue_generation(tiny_model, small_state, torch.zeros(1, 4, 768), latent_noise(3))


def test_weights_digest_mismatch_only_warns(small_state):
    from headforcing_core.backbone import inspect_backbone
    from headforcing_core.state import weights_digest
    other = random_backbone(TINY, seed=5)
    notes = small_state.check_model(inspect_backbone(other), weights_digest(other))
    assert notes and "weights differ" in notes[0]


def test_names_escaping_the_folder_are_refused(tmp_path):
    for bad in ["../x", "a/../../x", "/etc/passwd", "", "  ", "a\x00b", "a\\b.safetensors", "a//b"]:
        with pytest.raises(StateError, match="AR_STATE name .* is not allowed"):
            safe_path(tmp_path, bad, kind="AR_STATE", error=StateError)
    with pytest.raises(StateError, match="no AR_STATE file"):
        safe_path(tmp_path, "missing", kind="AR_STATE", error=StateError, must_exist=True)


def test_corrupt_files_are_refused(tmp_path, small_state):
    good = save_state(small_state, tmp_path / "good.safetensors")
    raw = good.read_bytes()

    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "noise.safetensors").write_bytes(b"\x00garbage" * 100)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    meta = json.loads(small_state.meta_json)
    tensors = dict(small_state.tensors)
    save_file({k: v for k, v in tensors.items() if k != "cache.memory.frames.k"}, str(tmp_path / "missing.safetensors"),
              metadata={"headforcing_state": small_state.meta_json})
    save_file(tensors, str(tmp_path / "version.safetensors"),
              metadata={"headforcing_state": json.dumps({**meta, "version": 99})})
    save_file(tensors, str(tmp_path / "json.safetensors"), metadata={"headforcing_state": "{not json"})
    nan = {**tensors, "tail": torch.full_like(tensors["tail"], float("nan"))}
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata={"headforcing_state": small_state.meta_json})
    cases = {"trunc": "damaged or truncated", "noise": "not a readable", "plain": "not a Head Forcing AR_STATE",
             "missing": "cache.memory.frames.k.* is missing", "version": "field .version. is 99", "json": "not valid JSON",
             "nan": "NaN", "absent": "not found"}
    for name, match in cases.items():
        with pytest.raises(StateError, match=match):
            load_state(tmp_path / f"{name}.safetensors")
    assert load_state(good).next_frame == 3  # the good file still loads


def test_inconsistent_bookkeeping_is_refused_on_continue(tiny_model, small_state):
    meta = json.loads(small_state.meta_json)
    pages = meta["cache"]["types"][0]["frame_pages"]
    pages["99"] = next(iter(pages.values()))  # a page used twice
    broken = ARState(json.dumps(meta), dict(small_state.tensors))
    with pytest.raises(StateError, match="inconsistent page table"):
        continue_generation(tiny_model, broken, B, latent_noise(3))
    other_policy = json.loads(small_state.meta_json)
    other_policy["policy"] = json.loads(json.dumps(policy_to_dict(make_policy("full"))))
    with pytest.raises(StateError, match="another policy"):
        continue_generation(tiny_model, ARState(json.dumps(other_policy), dict(small_state.tensors)), B,
                            latent_noise(3))
