"""First-chunk steps and initial latents (Causal Forcing++, image-to-video, video extension).

``generate(…, first_chunk_steps=…, initial_latent=…)`` equals an independent dense block-causal
reference of Self Forcing's / Causal Forcing's ``CausalInferencePipeline.inference`` (the initial
frames in every prefix at timestep 0; the first generated chunk on its own step list).
"""

import pytest
import torch

from headforcing_core import generate
from headforcing_core.errors import ShapeError
from headforcing_core.policies import PRESETS
from headforcing_core.prompts import PromptSchedule, PromptSegment
from headforcing_core.story import continue_generation, generate_schedule

from .conftest import latent_noise, text_context
from .dense_reference import dense_generate

STEPS_2 = (1000, 500)
STEPS_4 = (1000, 750, 500, 250)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def initial(frames, seed=9, h=8, w=8, batch=1):
    return latent_noise(frames, h=h, w=w, batch=batch, seed=seed) * 0.7


@pytest.mark.parametrize("fpb,t0,steps,first", [
    (1, 0, STEPS_2, STEPS_4),  # Causal Forcing++ 2-step: a 4-step first chunk
    (1, 0, (1000,), STEPS_4),  # Causal Forcing++ 1-step
    (1, 1, STEPS_4, None),  # image-to-video with a frame-wise model
    (1, 1, STEPS_2, STEPS_4),
    (3, 3, STEPS_4, None),  # video extension with a chunk-wise model: one chunk …
    (3, 6, STEPS_4, None),  # … and two
    (3, 3, STEPS_2, STEPS_4),  # an extension whose first new chunk has its own step list
])
def test_generate_equals_the_dense_reference(tiny_model, fpb, t0, steps, first):
    ctx, noise = text_context(), latent_noise(6)
    init = initial(t0) if t0 else None
    with torch.no_grad():
        ours = generate(tiny_model, ctx, noise, steps=steps, frames_per_block=fpb, first_chunk_steps=first,
                        initial_latent=init, generator=torch.Generator().manual_seed(4))
        ref = dense_generate(tiny_model, ctx, noise, steps, 5.0, fpb, torch.Generator().manual_seed(4),
                             initial=init, first_steps=first)
    assert ours.shape == noise.shape  # only the new frames come back
    assert rel_err(ours, ref) < 1e-5


def test_first_chunk_steps_and_initial_latent_really_change_the_result(tiny_model):
    ctx, noise = text_context(), latent_noise(6)
    with torch.no_grad():
        plain = generate(tiny_model, ctx, noise, steps=STEPS_2, frames_per_block=1,
                         generator=torch.Generator().manual_seed(4))
        first = generate(tiny_model, ctx, noise, steps=STEPS_2, frames_per_block=1, first_chunk_steps=STEPS_4,
                         generator=torch.Generator().manual_seed(4))
        image = generate(tiny_model, ctx, noise, steps=STEPS_2, frames_per_block=1, initial_latent=initial(1),
                         generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(plain, first, atol=1e-4)
    assert not torch.allclose(plain[:, :, 0], image[:, :, 0], atol=1e-4)


def test_model_calls_count_the_prefill_and_the_first_chunk(tiny_model):
    calls = []
    with torch.no_grad():
        generate(tiny_model, text_context(), latent_noise(3), steps=STEPS_2, frames_per_block=1,
                 first_chunk_steps=STEPS_4, initial_latent=initial(2), progress=lambda d, t: calls.append((d, t)))
    # 2 prefill passes + first chunk (4 steps + clean) + 2 chunks (2 steps + clean)
    assert [d for d, _ in calls] == list(range(1, 2 + 5 + 6 + 1)) and {t for _, t in calls} == {13}


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "full"])
def test_bounded_presets_run_with_them(tiny_model, preset):
    noise = latent_noise(24, h=4, w=4)
    with torch.no_grad():
        out = generate(tiny_model, text_context(), noise, policy=preset, first_chunk_steps=STEPS_4, steps=STEPS_2,
                       initial_latent=initial(6, h=4, w=4), generator=torch.Generator().manual_seed(4))
    assert out.shape == noise.shape and bool(torch.isfinite(out).all())


def test_a_state_after_an_extension_continues_exactly(tiny_model):
    """[A, B] with initial frames in one run == A with them, then Continue(B) from A's state."""
    a, b = text_context(seed=11), text_context(seed=12)
    noise = latent_noise(12)
    init = initial(3)
    seg_b = PromptSegment(b, frames=6, transition="recache", transition_frames=4)
    with torch.no_grad():
        whole, whole_state = generate_schedule(tiny_model, PromptSchedule((PromptSegment(a, frames=6), seg_b)), noise,
                                               policy="head_forcing", initial_latent=init,
                                               generator=torch.Generator().manual_seed(7))
        first, state = generate_schedule(tiny_model, a, noise[:, :, :6], policy="head_forcing", initial_latent=init,
                                         generator=torch.Generator().manual_seed(7))
        second, cont = continue_generation(tiny_model, state, PromptSchedule((seg_b,)), noise[:, :, 6:])
    assert rel_err(torch.cat([first, second], 2), whole) < 1e-5
    assert state.next_frame == 9 and cont.next_frame == whole_state.next_frame == 15
    assert [h["start"] for h in cont.history] == [0, 3, 9] and cont.history[0]["label"] == "initial latent"


@pytest.mark.parametrize("bad,match", [
    (initial(2), "whole chunks of 3 frames.*use 3 or 6 frames"),
    (initial(1), "single image .* frame-wise model"),
    (latent_noise(3, h=8, w=16), "initial_latent is 128x64"),
    (torch.zeros(1, 4, 3, 8, 8), "4 channels"),
    (initial(3, batch=2), "batch 2"),
    (torch.full((1, 16, 3, 8, 8), float("nan")), "NaN"),
    (torch.zeros(16, 3, 8, 8), r"must be \[batch"),
])
def test_bad_initial_latents_are_refused_before_sampling(tiny_model, bad, match):
    calls = []
    with pytest.raises(ShapeError, match=match):
        generate(tiny_model, text_context(), latent_noise(3), initial_latent=bad, progress=lambda d, t: calls.append(d))
    assert calls == []


@pytest.mark.parametrize("first,match", [((), "at least one"), ((500, 750), "strictly decrease"),
                                         ((1200,), r"lie in \[0, 1000\]"), (("a",), "must be numbers")])
def test_bad_first_chunk_steps_are_refused(tiny_model, first, match):
    with pytest.raises(ShapeError, match="first_chunk_steps: .*" + match):
        generate(tiny_model, text_context(), latent_noise(3), first_chunk_steps=first)
