"""The memory pre-flight refuses what cannot fit and names the input that drives the cost."""

import pytest
import torch

from headforcing_core import MemoryBudgetError, WanConfig
from headforcing_core.backbone import BackboneSpec
from headforcing_core.memory import TAIL_FRAMES, GiB, estimate_run, latent_bytes, preflight, with_weights
from headforcing_core.profiling import estimate_profile

SPEC = BackboneSpec.from_config(WanConfig())  # Wan2.1-T2V-1.3B


def video(t: int) -> str:
    return f"{4 * t - 3} frames"


def pixels(h: int, w: int) -> str:
    return f"{w * 8}x{h * 8}"


def sampler_estimate(policy="self_forcing_window", **kw):
    def at(t, h, w):
        return estimate_run(SPEC, policy, latent_frames=t, latent_height=h, latent_width=w, output_copies=1, **kw)
    return at


def refuse(estimate, t, h, w, free, **kw) -> str:
    with pytest.raises(MemoryBudgetError) as e:
        preflight(estimate, latent_frames=t, latent_height=h, latent_width=w, free_bytes=free, min_frames=3,
                  describe_length=video, describe_size=pixels, **kw)
    return str(e.value)


def test_a_run_that_fits_passes_and_returns_its_estimate():
    est = preflight(sampler_estimate(), latent_frames=21, latent_height=60, latent_width=104, free_bytes=80 * GiB,
                    min_frames=3, describe_length=video, describe_size=pixels)
    assert 5 * GiB < est.total_bytes < 20 * GiB and est.peak_phase == "run"


def test_a_million_seconds_is_told_to_shorten_the_video():
    """Defect 6: the length drove the cost but the advice said 'lower the width/height'."""
    t = 4 * 1_000_000 + 1
    msg = refuse(sampler_estimate(), t, 60, 104, 24 * GiB)
    first = msg.split("free; ")[1]
    assert first.startswith("shorten the video to at most"), msg
    # the advised length fits, one chunk more does not
    n = int(first.split("at most ")[1].split(" frames")[0])
    best = (n + 3) // 4
    fits = sampler_estimate()
    assert fits(best, 60, 104).total_bytes <= 0.9 * 24 * GiB < fits(best + 1, 60, 104).total_bytes
    assert "latents" in msg and "GiB" in msg


def test_a_huge_frame_is_told_to_lower_the_resolution():
    msg = refuse(sampler_estimate(), 21, 2048, 2048, 24 * GiB)
    assert msg.split("free; ")[1].startswith("lower the resolution to at most"), msg
    size = msg.split("lower the resolution to at most ")[1].split(",")[0].rstrip(".")
    w, h = (int(v) for v in size.split("x"))
    assert w % 16 == 0 and h % 16 == 0 and w == h  # keeps the aspect ratio, a valid size
    assert sampler_estimate()(21, h // 8, w // 8).total_bytes <= 0.9 * 24 * GiB


def test_full_policy_is_told_to_pick_a_bounded_one():
    msg = refuse(sampler_estimate("full"), 4 * 3600 + 1, 60, 104, 24 * GiB, bounded_policy_hint=True)
    assert "choose a bounded policy" in msg and "shorten the video" in msg, msg


def test_weights_alone_too_big():
    def at(t, h, w):
        return with_weights(sampler_estimate()(t, h, w), 100 * GiB)
    msg = refuse(at, 21, 60, 104, 24 * GiB)
    assert "weights alone need" in msg, msg


def test_profile_heads_at_16384_is_refused_naming_the_resolution():
    """Defect 2: Profile Heads computed an estimate but never refused (≈ 22 GB allocated)."""
    spec = BackboneSpec.from_config(WanConfig(dim=256, num_heads=2, num_layers=2, ffn_dim=512))

    def at(t, h, w):
        return estimate_profile(spec, frames=t, latent_height=h, latent_width=w, frames_per_block=3,
                                query_samples=64, dtype=torch.float32)

    est = at(21, 2048, 2048)
    assert est.total_bytes > 22 * GiB and est.extra_bytes > 0
    with pytest.raises(MemoryBudgetError) as e:
        preflight(at, latent_frames=21, latent_height=2048, latent_width=2048, free_bytes=24 * GiB, min_frames=6,
                  describe_length=lambda t: f"latent_frames {t}", describe_size=pixels, what="the calibration video")
    msg = str(e.value)
    assert "lower the resolution to at most" in msg and "head statistics" in msg, msg


def test_continuation_cannot_resize_so_only_length_is_advised():
    def at(t, h, w):
        return estimate_run(SPEC, "self_forcing_window", latent_frames=100 + t, new_frames=t, latent_height=h,
                            latent_width=w, output_copies=1)
    with pytest.raises(MemoryBudgetError) as e:
        preflight(at, latent_frames=4_000_000, latent_height=60, latent_width=104, free_bytes=24 * GiB, min_frames=3,
                  describe_length=lambda t: f"{t / 4:g} seconds", what="the continuation")
    msg = str(e.value)
    assert "shorten the continuation to at most" in msg and "resolution" not in msg, msg


def test_estimate_grows_with_length_only_through_the_latents_for_bounded_policies():
    a = sampler_estimate()(21, 60, 104)
    b = sampler_estimate()(2100, 60, 104)
    assert a.kv_bytes == b.kv_bytes and a.attention_bytes == b.attention_bytes
    tail = latent_bytes(SPEC, TAIL_FRAMES, 60, 104)  # the last 21 frames kept for a recache
    assert b.latent_bytes - tail == 100 * (a.latent_bytes - tail)


def test_state_copies_count_only_when_they_share_the_device_memory():
    cpu = estimate_run(SPEC, "head_forcing", latent_frames=90, latent_height=60, latent_width=104,
                       state_on_device=True, input_state_bytes=123)
    gpu = estimate_run(SPEC, "head_forcing", latent_frames=90, latent_height=60, latent_width=104,
                       input_state_bytes=123)
    # the state copies every pool of the cache plus the last latents and the prompt
    assert cpu.kv_bytes < cpu.state_bytes < 1.2 * cpu.kv_bytes and cpu.input_state_bytes == 123
    assert gpu.state_bytes == 0 and gpu.input_state_bytes == 0
