"""The ComfyUI-free helpers of nodes/comfy_bridge.py (no ComfyUI import needed).

``nodes/__init__.py`` imports ComfyUI's ``comfy_api``, so the bridge module is loaded from its
file on its own here; it imports ComfyUI only inside the functions that talk to the server.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from headforcing_core.errors import HeadForcingError, PolicyError, ShapeError
from headforcing_core.policies import CachePolicy, Episodic, make_policy

ROOT = Path(__file__).resolve().parents[2]


def _load_bridge():
    name = "hf_nodes_comfy_bridge"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "nodes" / "comfy_bridge.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


bridge = _load_bridge()


def test_bridge_imports_no_comfy():
    code = (f"import importlib.util, sys; sys.path.insert(0, {str(ROOT)!r}); "
            f"s = importlib.util.spec_from_file_location('b', {str(ROOT / 'nodes' / 'comfy_bridge.py')!r}); "
            "m = importlib.util.module_from_spec(s); sys.modules['b'] = m; s.loader.exec_module(m); "
            "bad = [n for n in sys.modules if n.split('.')[0] in ('comfy', 'comfy_api', 'latent_preview')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("text, expected", [
    ("1000,750,500,250", (1000.0, 750.0, 500.0, 250.0)),
    (" 1000, 750 ,500 , 250 ", (1000.0, 750.0, 500.0, 250.0)),
    ("1000 750 500", (1000.0, 750.0, 500.0)),
    ("1000;937.5", (1000.0, 937.5)),
    ("1000", (1000.0,)),
])
def test_parse_steps(text, expected):
    assert bridge.parse_steps(text) == expected


@pytest.mark.parametrize("text", ["", "  , ", "1000,abc", "nan", "1000,inf"])
def test_parse_steps_rejects(text):
    with pytest.raises(ShapeError):
        bridge.parse_steps(text)


def test_default_steps_and_shift_are_self_forcing():
    assert bridge.DEFAULT_STEPS == "1000,750,500,250"
    assert bridge.DEFAULT_SHIFT == 5.0


@pytest.mark.parametrize("length, unit, frames, latent, decoded", [
    (81, "frames", 81, 21, 81),
    (80, "frames", 80, 20, 77),   # rounded down to 4k+1
    (9, "frames", 9, 3, 9),
    (1, "frames", 1, 1, 1),
    (5, "seconds", 81, 21, 81),
    (60, "seconds", 961, 241, 961),
])
def test_frame_arithmetic(length, unit, frames, latent, decoded):
    assert bridge.video_frames(length, unit) == frames
    assert bridge.latent_frames_for(frames) == latent
    assert bridge.decoded_frames(latent) == decoded


def test_bad_length_unit_and_length():
    with pytest.raises(ShapeError):
        bridge.video_frames(10, "minutes")
    with pytest.raises(ShapeError):
        bridge.video_frames(0, "frames")


@pytest.mark.parametrize("w, h, ok", [(832, 480, True), (16, 16, True), (840, 480, False), (832, 488, False),
                                      (0, 480, False)])
def test_check_video_size(w, h, ok):
    if ok:
        bridge.check_video_size(w, h)
    else:
        with pytest.raises(ShapeError, match="multiple of 16"):
            bridge.check_video_size(w, h)


def test_check_length_names_the_minimum():
    bridge.check_length(9, 3, 3)
    with pytest.raises(ShapeError, match="ask for at least 9 frames"):
        bridge.check_length(5, 2, 3)
    with pytest.raises(ShapeError, match="ask for at least 13 frames"):
        bridge.check_length(9, 3, 4)


def test_latent_shape():
    assert bridge.latent_shape(832, 480, 21) == (1, 16, 21, 60, 104)


def test_initial_noise_is_prepare_noise_compatible_and_private():
    """Same numbers as comfy.sample.prepare_noise (torch.manual_seed(seed) + torch.randn on the CPU),
    without touching the global generator."""
    shape = (1, 16, 3, 4, 6)
    state = torch.get_rng_state()
    noise = bridge.initial_noise(shape, 1234)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not move"
    g = torch.manual_seed(1234)  # what prepare_noise does
    ref = torch.randn(shape, dtype=torch.float32, generator=g, device="cpu")
    torch.set_rng_state(state)
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(noise, ref)
    # the largest seed ComfyUI's widget allows works
    assert bridge.initial_noise((2,), bridge.MAX_SEED).shape == (2,)


def test_renoise_generator_is_seed_plus_one():
    a = torch.randn(5, generator=bridge.renoise_generator(7))
    b = torch.randn(5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    torch.randn(1, generator=bridge.renoise_generator(bridge.MAX_SEED))  # wraps to 0


def test_conditioning_tensor():
    t = torch.zeros(1, 7, 4096)
    assert bridge.conditioning_tensor([[t, {"pooled_output": None}]]) is t
    with pytest.raises(ShapeError, match="empty"):
        bridge.conditioning_tensor([])
    with pytest.raises(ShapeError, match="2 separate prompts"):
        bridge.conditioning_tensor([[t, {}], [t, {}]])
    with pytest.raises(ShapeError, match=r"\[batch, tokens, width\]"):
        bridge.conditioning_tensor([[torch.zeros(7, 4096), {}]])


@pytest.mark.parametrize("preset", ["full", "self_forcing_window", "sink_window", "pyramid_forcing",
                                    "head_forcing"])
def test_build_policy_defaults_equal_make_policy(preset):
    policy = bridge.build_policy(preset)
    assert isinstance(policy, CachePolicy)
    assert policy == make_policy(preset)
    # the node's episodic widgets at their defaults change nothing either
    memory = make_policy("head_forcing").rule_map["memory"].middle
    assert bridge.build_policy(preset, memory_episodes=memory.cap,
                               memory_similarity=memory.similarity) == make_policy(preset)


def test_build_policy_overrides():
    p = bridge.build_policy("sink_window", rope="compact", sink_frames=2, recent_frames=5)
    assert p.rope == "compact"
    rule = p.rule_map["all"]
    assert (rule.sink, rule.recent) == (2, 5)
    p = bridge.build_policy("head_forcing", memory_episodes=3, memory_similarity=0.5)
    mem = p.rule_map["memory"].middle
    assert isinstance(mem, Episodic) and (mem.cap, mem.similarity) == (3, 0.5)
    # the other head types keep their rules
    assert p.rule_map["local"] == make_policy("head_forcing").rule_map["local"]
    # episodic widgets are ignored by presets without memory heads
    assert bridge.build_policy("pyramid_forcing", memory_episodes=3) == make_policy("pyramid_forcing")


def test_build_policy_maps_every_pyramid_forcing_widget_to_its_rule():
    """Each of the 12 widgets (Pyramid Forcing's configs/pyramid-forcing.yaml names) lands in its own field."""
    from headforcing_core.policies import Cyclic, Merge, Stride
    widgets = {"anchor_sink_frames": 2, "wave_sink_frames": 5, "veil_sink_frames": 7, "pyramid_recent_frames": 9,
               "stride_interval": 11, "stride_capacity": 13, "cyclic_period": 8, "cyclic_bucket_capacity": 3,
               "merge_patch": 1, "merge_capacity": 6, "sink_time_clamp_min": 10, "sink_time_clamp_max": 19}
    assert set(widgets) == set(bridge.PYRAMID_DEFAULTS)
    p = bridge.build_policy("pyramid_forcing", pyramid=widgets)
    anchor, wave, veil = (p.rule_map[t] for t in ("anchor", "wave", "veil"))
    assert (anchor.sink_frames, anchor.recent_frames, anchor.middle, anchor.stable_stride) == (2, 9, Stride(11, 13),
                                                                                               True)
    assert (wave.sink_frames, wave.recent_frames, wave.middle) == (5, 9, Cyclic(8, 3))
    assert (veil.sink_frames, veil.recent_frames, veil.middle) == (7, 9, Merge(1, 6))
    assert (p.clamp_min, p.clamp_max) == (10, 19)
    # the defaults are Pyramid Forcing's config
    assert bridge.build_policy("pyramid_forcing", pyramid=dict(bridge.PYRAMID_DEFAULTS)) == make_policy(
        "pyramid_forcing")


@pytest.mark.parametrize("widget,value,match", [
    ("pyramid_recent_frames", 3, "above one chunk"), ("stride_interval", 0, "interval must be"),
    ("stride_capacity", 0, "capacity must be"), ("cyclic_period", 0, "period must be"),
    ("cyclic_bucket_capacity", 0, "bucket capacity must be"), ("merge_patch", 0, "patch must be"),
    ("merge_capacity", 0, "capacity must be"), ("anchor_sink_frames", -1, "sink frames"),
    ("sink_time_clamp_min", 22, "clamp min ≤ clamp max"),
])
def test_impossible_pyramid_forcing_widgets_are_refused_before_sampling(widget, value, match):
    """Refused when the sampler's request is made (before the model is loaded or any call)."""
    with pytest.raises(PolicyError, match=match):
        policy = bridge.build_policy("pyramid_forcing", pyramid={widget: value})
        bridge.make_request(width=832, height=480, length=81, policy=policy)


def test_a_merge_patch_that_does_not_divide_the_grid_is_refused_by_the_estimate():
    """The Cache Policy node's summary and the sampler's pre-flight (both estimate_run) refuse it."""
    policy = bridge.build_policy("pyramid_forcing", pyramid={"merge_patch": 4})
    with pytest.raises(PolicyError, match="does not divide the 30×52 token grid"):
        bridge.policy_summary(policy, width=832, height=480, frames=81)
    assert "KV cache" in bridge.policy_summary(policy, width=832, height=448, frames=81)  # 28×52: divides


def test_build_policy_rejects():
    with pytest.raises(HeadForcingError, match="unknown policy preset"):
        bridge.build_policy("nope")
    with pytest.raises(HeadForcingError, match="unknown RoPE mode"):
        bridge.build_policy("full", rope="spiral")


def test_sampler_policy_prefers_the_connected_one():
    connected = make_policy("sink_window", sink=1)
    assert bridge.sampler_policy(connected, "full") is connected
    assert bridge.sampler_policy(None, "pyramid_forcing") == make_policy("pyramid_forcing")
    with pytest.raises(HeadForcingError, match="Cache Policy node"):
        bridge.sampler_policy("head_forcing", "full")


def test_make_request_validates_everything_up_front():
    policy = make_policy("self_forcing_window")
    req = bridge.make_request(width=832, height=480, length=5, length_unit="seconds", seed=3, steps="1000,750",
                              shift=5.0, frames_per_block=3, policy=policy)
    assert (req.frames, req.latent_frames, req.chunks, req.shape) == (81, 21, 7, (1, 16, 21, 60, 104))
    assert req.steps == (1000.0, 750.0)
    with pytest.raises(ShapeError, match="shift must be positive"):
        bridge.make_request(width=832, height=480, length=81, steps="1000", shift=0.0, policy=policy)
    with pytest.raises(ShapeError, match="must lie in"):
        bridge.make_request(width=832, height=480, length=81, steps="2000,1000", policy=policy)
    with pytest.raises(PolicyError, match="below one chunk"):
        bridge.make_request(width=832, height=480, length=81, policy=make_policy("self_forcing_window", recent=3))


def test_policy_summary_reports_memory_for_the_1p3b_shape():
    text = bridge.policy_summary(make_policy("head_forcing"), width=832, height=480, frames=961)
    assert text.startswith("head_forcing [compact RoPE]")
    assert "Wan2.1-T2V-1.3B, 832x480, 961 frames (241 latent, 60.1 s at 16 fps), bfloat16" in text
    assert "KV cache" in text and "GiB" in text
    full = bridge.policy_summary(make_policy("full"), width=832, height=480, frames=961)
    window = bridge.policy_summary(make_policy("self_forcing_window"), width=832, height=480, frames=961)

    def kv(t):
        import re
        return float(re.search(r"KV cache (\d+\.\d+) GiB", t).group(1))

    assert kv(full) > kv(window) > kv(text)
