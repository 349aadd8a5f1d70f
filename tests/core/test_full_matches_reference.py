"""With the `full` policy the AR sampler equals a dense block-causal reference."""

import pytest
import torch

from headforcing_core import generate

from .conftest import latent_noise, text_context
from .dense_reference import dense_generate

STEPS = (1000, 750, 500, 250)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("frames_per_block,frames", [(3, 9), (1, 4), (3, 7)])
def test_full_policy_equals_dense_reference_float32(tiny_model, frames_per_block, frames):
    ctx, noise = text_context(), latent_noise(frames)
    ours = generate(tiny_model, ctx, noise, steps=STEPS, shift=5.0, frames_per_block=frames_per_block,
                    policy="full", generator=torch.Generator().manual_seed(7))
    ref = dense_generate(tiny_model, ctx, noise, STEPS, 5.0, frames_per_block, torch.Generator().manual_seed(7))
    assert rel_err(ours, ref) < 1e-5


def test_full_policy_equals_dense_reference_float64(tiny_model64):
    ctx, noise = text_context(dtype=torch.float64), latent_noise(6, dtype=torch.float64)
    ours = generate(tiny_model64, ctx, noise, frames_per_block=3, generator=torch.Generator().manual_seed(3))
    ref = dense_generate(tiny_model64, ctx, noise, STEPS, 5.0, 3, torch.Generator().manual_seed(3))
    assert rel_err(ours, ref) < 1e-12


def test_batch_of_two_with_shared_prompt(tiny_model):
    ctx, noise = text_context(), latent_noise(6, batch=2)
    ours = generate(tiny_model, ctx, noise, generator=torch.Generator().manual_seed(1))
    ref = dense_generate(tiny_model, ctx.expand(2, -1, -1), noise, STEPS, 5.0, 3, torch.Generator().manual_seed(1))
    assert rel_err(ours, ref) < 1e-5


def test_reference_is_sensitive_to_the_mask(tiny_model):
    """Guard: the comparison can fail — a non-causal run differs from the AR result."""
    ctx, noise = text_context(), latent_noise(6)
    ours = generate(tiny_model, ctx, noise, generator=torch.Generator().manual_seed(7))
    ref = dense_generate(tiny_model, ctx, noise, STEPS, 5.0, 6, torch.Generator().manual_seed(7))  # one big chunk
    assert rel_err(ours, ref) > 1e-3
