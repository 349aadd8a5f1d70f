"""Bad input gets a clear error before any model call."""

import pytest
import torch

from headforcing_core import generate
from headforcing_core.errors import ModelFamilyError, PolicyError, ShapeError
from headforcing_core.policies import HeadLabels, RetentionRule, make_policy, pyramid_forcing_preset_labels

from .conftest import latent_noise, text_context


class CallCounter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return False


def expect_error_before_sampling(model, exc, match, **kw):
    counter = CallCounter()
    args = dict(context=text_context(), noise=latent_noise(6))
    args.update(kw)
    with pytest.raises(exc, match=match):
        generate(model, args.pop("context"), args.pop("noise"), should_stop=counter, **args)
    assert counter.calls == 0


def test_labels_of_another_shape(tiny_model):
    pol = make_policy("pyramid_forcing", labels=pyramid_forcing_preset_labels())
    expect_error_before_sampling(tiny_model, PolicyError, r"30-layer × 12-head .* 2 layers × 2 heads", policy=pol)


def test_unknown_labels():
    with pytest.raises(PolicyError, match=r"unknown head label '7' at layer 0, head 1"):
        HeadLabels.from_codes([["1", "7"], ["1", "1"]])
    with pytest.raises(PolicyError, match="unknown head label 'memory'"):
        HeadLabels("pyramid_forcing", (("anchor", "memory"),))


def test_labels_of_the_wrong_taxonomy():
    with pytest.raises(PolicyError, match="cannot drive the head_forcing policy"):
        make_policy("head_forcing", labels=HeadLabels("pyramid_forcing", (("anchor", "wave"),)))


def test_window_below_one_chunk(tiny_model):
    expect_error_before_sampling(tiny_model, PolicyError, "below one chunk",
                                 policy=make_policy("self_forcing_window", recent=3))


def test_policy_without_recent_frames(tiny_model):
    expect_error_before_sampling(tiny_model, PolicyError, "no recent frames",
                                 policy=make_policy("sink_window", sink=3, recent=0))
    rules = {"local": RetentionRule(recent=0)}
    expect_error_before_sampling(tiny_model, PolicyError, "no recent frames",
                                 policy=make_policy("head_forcing", rules=rules))


def test_zero_caps(tiny_model):
    from headforcing_core.policies import Episodic, PyramidRule, Stride
    pol = make_policy("pyramid_forcing", rules={"anchor": PyramidRule(3, 4, Stride(6, 0))})
    expect_error_before_sampling(tiny_model, PolicyError, "stride capacity must be a whole number ≥ 1", policy=pol)
    pol = make_policy("head_forcing", rules={"memory": RetentionRule(sink=3, recent=4, middle=Episodic(0, 2))})
    expect_error_before_sampling(tiny_model, PolicyError, "episodic cap must be a whole number ≥ 1", policy=pol)
    # a Pyramid Forcing middle belongs in a PyramidRule: said, not silently misread
    pol = make_policy("pyramid_forcing", rules={"anchor": RetentionRule(sink=3, recent=4, middle=Stride(6, 4))})
    expect_error_before_sampling(tiny_model, PolicyError, "use PyramidRule", policy=pol)


def test_unknown_preset_and_rope():
    with pytest.raises(PolicyError, match="unknown policy preset"):
        make_policy("everything")
    with pytest.raises(PolicyError, match="unknown RoPE mode"):
        make_policy("full", rope="spiral")


def test_length_shorter_than_a_chunk(tiny_model):
    expect_error_before_sampling(tiny_model, ShapeError, "shorter than one chunk", noise=latent_noise(2))


def test_odd_latent_size(tiny_model):
    expect_error_before_sampling(tiny_model, ShapeError, "multiples of 16", noise=latent_noise(3, h=7, w=8))


def test_conditioning_of_the_wrong_width(tiny_model):
    expect_error_before_sampling(tiny_model, ShapeError, "text width 4096",
                                 context=torch.randn(1, 10, 768))


def test_too_long_context(tiny_model):
    with pytest.raises(ShapeError, match="at most 512"):
        generate(tiny_model, torch.randn(1, 600, 4096), latent_noise(3))


def test_not_a_wan_model():
    class UNetModel(torch.nn.Module):  # e.g. an SD1.5 UNet
        def __init__(self):
            super().__init__()
            self.input_blocks = torch.nn.ModuleList([torch.nn.Conv2d(4, 8, 3)])

    with pytest.raises(ModelFamilyError, match="UNetModel lacks patch_embedding"):
        generate(UNetModel(), text_context(), latent_noise(3))
