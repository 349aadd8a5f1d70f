"""Policies that keep everything reproduce `full` bit for bit; bounded ones really differ."""

import pytest
import torch

from headforcing_core import generate
from headforcing_core.policies import HeadLabels, RetentionRule, make_policy

from .conftest import latent_noise, text_context

FRAMES = 12


@pytest.fixture(scope="module")
def full_result(tiny_model):
    with torch.no_grad():
        return generate(tiny_model, text_context(), latent_noise(FRAMES), policy="full",
                        generator=torch.Generator().manual_seed(5))


def run(model, policy):
    return generate(model, text_context(), latent_noise(FRAMES), policy=policy,
                    generator=torch.Generator().manual_seed(5))


KEEP_ALL = {
    "self_forcing_window": make_policy("self_forcing_window", recent=FRAMES + 3),
    "sink_window": make_policy("sink_window", sink=3, recent=FRAMES, rope="absolute"),
    # Pyramid Forcing's window_clamp puts every sink at the sink time (frames 1 and 2 at time 0 too):
    # with everything kept, only absolute positions make it Self Forcing
    "pyramid_forcing": make_policy("pyramid_forcing", recent=FRAMES, rope="absolute",
                                   labels=HeadLabels("pyramid_forcing", (("anchor", "veil"), ("wave", "anchor")))),
    "head_forcing": make_policy("head_forcing", labels=HeadLabels("head_forcing", (("memory", "anchor"), ("local", "memory"))),
                                rules={"local": RetentionRule(recent=FRAMES), "anchor": RetentionRule(sink=3, recent=FRAMES),
                                       "memory": RetentionRule(sink=3, recent=FRAMES)}),
}


@pytest.mark.parametrize("name", list(KEEP_ALL))
def test_keep_everything_equals_full_bit_for_bit(tiny_model, full_result, name):
    assert torch.equal(run(tiny_model, KEEP_ALL[name]), full_result)


@pytest.mark.parametrize("name", ["self_forcing_window", "sink_window", "pyramid_forcing", "head_forcing"])
def test_default_budgets_differ_from_full_on_long_videos(tiny_model, name):
    # guard against a cache that silently keeps everything: with a 30-frame video the
    # bounded presets must evict something and so change the result
    noise = latent_noise(30, h=4, w=4)
    full = generate(tiny_model, text_context(), noise, policy="full", generator=torch.Generator().manual_seed(5))
    ours = generate(tiny_model, text_context(), noise, policy=name, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(full, ours, atol=1e-6)
