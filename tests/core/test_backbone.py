"""The runner drives Wan-shaped modules by name, through their own (casting) layers."""

import pytest
import torch
import torch.nn.functional as F

from headforcing_core import WanBackbone, WanConfig, generate, inspect_backbone, random_backbone

from .conftest import TINY, latent_noise, text_context


class CastingLinear(torch.nn.Linear):
    """Like ComfyUI's ops: weights stay in storage dtype and are cast on the fly per call."""

    calls = 0

    def forward(self, x):
        CastingLinear.calls += 1
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def castify(module: torch.nn.Module) -> None:
    for name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear:
            child.__class__ = CastingLinear
        else:
            castify(child)


def test_shapes_are_read_off_the_module():
    spec = inspect_backbone(WanBackbone(WanConfig(dim=384, num_heads=3, num_layers=3, ffn_dim=64)))
    assert (spec.dim, spec.num_heads, spec.num_layers, spec.head_dim) == (384, 3, 3, 128)
    assert spec.tokens_per_frame(60, 104) == 1560


def test_bf16_weights_cast_on_the_fly_without_copies():
    model = random_backbone(TINY, seed=0)
    reference = generate(model, text_context(), latent_noise(3), generator=torch.Generator().manual_seed(0))
    bf16 = random_backbone(TINY, seed=0, dtype=torch.bfloat16)
    castify(bf16)
    before = {n: (p.data_ptr(), p.dtype) for n, p in bf16.named_parameters()}
    CastingLinear.calls = 0
    out = generate(bf16, text_context(), latent_noise(3), generator=torch.Generator().manual_seed(0),
                   dtype=torch.float32)
    assert CastingLinear.calls > 0
    assert before == {n: (p.data_ptr(), p.dtype) for n, p in bf16.named_parameters()}
    # bf16-rounded weights computed in float32: close to the float32 model, not equal
    assert out.dtype == torch.float32
    assert float((out - reference).norm() / reference.norm()) < 0.05


def test_state_dict_round_trip_infers_the_shape():
    model = random_backbone(TINY, seed=3)
    again = WanBackbone.from_state_dict(model.state_dict())
    assert again.config == TINY
    assert set(model.state_dict()) == set(again.state_dict())


def test_spec_from_fingerprint_keeps_the_stored_shape():
    from dataclasses import replace

    from headforcing_core import BackboneSpec, WanConfig, inspect_backbone, random_backbone
    spec = inspect_backbone(random_backbone(WanConfig(dim=96, num_heads=3, num_layers=2, ffn_dim=128, text_dim=40)))
    again = BackboneSpec.from_fingerprint(spec.fingerprint())
    assert again.fingerprint() == spec.fingerprint()
    # what a fingerprint does not store is Wan's (the FFN width of another width stays unknown: estimates use
    # Wan's ratio)
    assert replace(again, ffn_dim=spec.ffn_dim) == spec and again.ffn_dim == 0
    # a 1.3B-wide model is Wan 2.1 1.3B's FFN (8960), not the ratio's 8970
    wan = inspect_backbone(random_backbone(WanConfig(num_layers=1)))
    assert BackboneSpec.from_fingerprint(wan.fingerprint()).ffn_width == wan.ffn_width == 8960


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float64, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float64), (torch.float32, torch.float32)])
def test_reference_norms_compute_wans_float32_norm_for_any_weight_and_input_dtype(x_dtype, w_dtype):
    """Wan: norm(x.float()).type_as(x) (RMS norm: times the weight after the cast); our modules take
    half-precision input directly and keep float32 weights float32, whatever mix a checkpoint loads as."""
    from headforcing_core.wan_model import WanLayerNorm, WanRMSNorm
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 64, generator=g) * 3 + 1).to(x_dtype)
    ln = WanLayerNorm(64, elementwise_affine=True)
    rms = WanRMSNorm(64)
    with torch.no_grad():
        for m in (ln, rms):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    ln, rms = ln.to(w_dtype), rms.to(w_dtype)
    xf = x.double()
    mean, var = xf.mean(-1, keepdim=True), xf.var(-1, unbiased=False, keepdim=True)
    want_ln = (xf - mean) / torch.sqrt(var + 1e-6) * ln.weight.double() + ln.bias.double()
    want_rms = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x_dtype).double() * rms.weight.double()
    tol = {torch.float64: 1e-6, torch.float32: 1e-5}.get(x_dtype, 6e-2)
    for got, want in ((ln(x), want_ln), (rms(x), want_rms)):
        assert got.dtype == x_dtype
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol * 4)
