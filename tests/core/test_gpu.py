"""GPU checks (skipped without CUDA): full-size shapes under every preset, in bf16."""

import pytest
import torch

from headforcing_core import WanConfig, generate, random_backbone
from headforcing_core.policies import PRESETS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def model_1p3b():
    return random_backbone(WanConfig(), seed=0, dtype=torch.bfloat16).cuda()


@pytest.mark.parametrize("preset", PRESETS)
def test_1p3b_shape_a_few_chunks_under_every_preset(model_1p3b, preset):
    g = torch.Generator(device="cuda").manual_seed(0)
    noise = torch.randn(1, 16, 9, 60, 104, device="cuda", generator=g)
    ctx = torch.randn(1, 64, 4096, device="cuda", generator=g) * 0.1
    out = generate(model_1p3b, ctx, noise, policy=preset, generator=g)
    assert out.shape == noise.shape and torch.isfinite(out).all()
