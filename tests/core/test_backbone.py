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


def test_fp8_weights_cast_on_the_fly_and_compute_in_float32():
    """fp8 is a storage format (ComfyUI's fp8 weight dtypes keep every parameter but the patch embedding
    in it and cast each layer's weights per call): the runner computes in float32 and gives exactly what
    the weights rounded to fp8 give in float32 (e5m2 and scaled fp8: tests/e2e/test_fp8_weights_e2e.py)."""
    fp8 = torch.float8_e4m3fn
    rounded, stored = random_backbone(TINY, seed=0), random_backbone(TINY, seed=0)
    with torch.no_grad():
        for (name, r), s in zip(rounded.named_parameters(), stored.parameters()):
            if not name.startswith("patch_embedding."):
                r.copy_(r.to(fp8).float())
                s.data = s.data.to(fp8)
    castify(stored)
    want = generate(rounded, text_context(), latent_noise(3), generator=torch.Generator().manual_seed(0))
    got = generate(stored, text_context(), latent_noise(3), generator=torch.Generator().manual_seed(0))
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_fp8_weights_without_casting_layers_and_an_fp8_compute_dtype_are_refused():
    from headforcing_core import HeadForcingError, ModelFamilyError
    plain = random_backbone(TINY, seed=0)
    plain.blocks[0].self_attn.q.weight.data = plain.blocks[0].self_attn.q.weight.data.to(torch.float8_e4m3fn)
    with pytest.raises(ModelFamilyError, match="weights are float8_e4m3fn but its layers do not cast them"):
        generate(plain, text_context(), latent_noise(3), generator=torch.Generator().manual_seed(0))
    with pytest.raises(HeadForcingError, match="fp8 is a weight format, not a compute dtype"):
        generate(random_backbone(TINY, seed=0), text_context(), latent_noise(3), dtype=torch.float8_e4m3fn,
                 generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cfg, published", [(TINY, None), (WanConfig(), 1.42e9),
                                            (WanConfig(dim=5120, num_heads=40, num_layers=40, ffn_dim=13824), 14.29e9)])
def test_weights_bytes_restate_how_comfyui_stores_each_parameter(cfg, published):
    """:meth:`BackboneSpec.weights_bytes` against the module itself (on the meta device), each tensor
    classified by the layer it belongs to: Linear weights and biases, the float32 patch embedding, the rest."""
    from headforcing_core import BackboneSpec
    with torch.device("meta"):
        model = WanBackbone(cfg)
    linear = other = patch = layers = 0
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if isinstance(module, torch.nn.Linear):
            linear, layers = linear + own, layers + 1
        elif name == "patch_embedding":
            patch += own
        else:
            other += own
    spec = BackboneSpec.from_config(cfg)
    assert spec.parameter_counts() == {"linear": linear, "linear_layers": layers, "other": other,
                                       "patch_embedding": patch}
    if published:
        assert linear + other + patch == pytest.approx(published, rel=2e-3)
    e4m3, e5m2, bf16 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16)
    assert spec.weights_bytes(e4m3) == spec.weights_bytes(e5m2) == linear + other + 4 * patch
    assert spec.weights_bytes(bf16) == 2 * (linear + other) + 4 * patch
    assert spec.weights_bytes(torch.float32, scaled_fp8=e4m3) == linear + 4 * layers + 4 * other + 4 * patch
    assert spec.weights_bytes(bf16, scaled_fp8=e4m3, scales_per_layer=2) == linear + 8 * layers + 2 * other + 4 * patch
    assert 0.5 < spec.weights_bytes(e4m3) / spec.weights_bytes(bf16) < 0.51
