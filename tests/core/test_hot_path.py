"""The head-aware path is planned once per chunk and runs without host synchronisation.

Counted with a TorchDispatchMode on the CPU (the same ATen ops a CUDA run dispatches), on the
1.3B model's head layout (30 layers × 12 heads, Pyramid Forcing's published labels) with a
narrow width so it runs in seconds.
"""

import pytest
import torch

from headforcing_core import WanConfig, WanRunner, generate, random_backbone
from headforcing_core.counters import OpCounter
from headforcing_core.policies import Episodic, HeadLabels, PRESETS, RetentionRule, make_policy
from headforcing_core.sampler import ARSampler
from headforcing_core.schedule import FlowMatchSchedule

from .conftest import TINY, text_context

LAYOUT_1P3B = WanConfig(dim=12 * 16, num_heads=12, num_layers=30, ffn_dim=64)
# the old code (before the plan/run rewrite) dispatched 19,150 ops for one steady-state
# self_forcing_window chunk of this model; the window's count must not grow
OLD_WINDOW_OPS = 19_150


@pytest.fixture(scope="module")
def counts():
    model = random_backbone(LAYOUT_1P3B, seed=0)
    runner = WanRunner(model)
    out = {}
    for preset in ("self_forcing_window", "sink_window", "longlive", "pyramid_forcing", "head_forcing"):
        sampler = ARSampler(runner, make_policy(preset), FlowMatchSchedule(), 3)
        sampler.start(1, 4, 4, 60)
        sampler.set_prompt(text_context())
        noise = torch.randn(1, 16, 51, 4, 4, generator=torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            sampler.sample(noise[:, :, :48], gen)  # well past every warm-up: a steady-state chunk follows
            inner = OpCounter()
            forward = runner.forward

            def counted(*a, **k):
                with inner:
                    return forward(*a, **k)

            runner.forward = counted
            try:
                with OpCounter() as outer:
                    sampler.sample(noise[:, :, 48:], gen)
            finally:
                runner.forward = forward
        out[preset] = (outer, inner, sampler.last_plan)
    return out


@pytest.mark.parametrize("preset", ["self_forcing_window", "sink_window", "longlive", "pyramid_forcing",
                                    "head_forcing"])
def test_no_sync_prone_op_in_the_layer_loop(counts, preset):
    outer, inner, plan = counts[preset]
    assert inner.sync == 0, dict(inner.sync_ops)
    assert outer.sync <= 10, dict(outer.sync_ops)  # the plan's uploads: a handful per chunk, outside the loop
    assert set(outer.sync_ops) <= {"lift_fresh"}  # never .item(), nonzero or a data-dependent size


@pytest.mark.parametrize("preset", ["sink_window", "longlive", "pyramid_forcing", "head_forcing"])
def test_typed_presets_stay_within_15_percent_of_the_window(counts, preset):
    window = counts["self_forcing_window"][0].total
    assert counts[preset][0].total <= 1.15 * window, (counts[preset][0].total, window)


def test_the_window_dispatches_no_more_than_before(counts):
    assert counts["self_forcing_window"][0].total <= OLD_WINDOW_OPS


def test_pyramid_chunk_is_planned_per_query_frame(counts):
    assert counts["pyramid_forcing"][2].classes == 3
    assert counts["head_forcing"][2].classes == 1  # nothing depends on the query frame: one set per chunk


# ------------------------------------------------------------------------------------------
# batch rows are independent


def _policies():
    pols = {p: make_policy(p) for p in PRESETS if p != "full"}
    # memory heads whose episodes split and merge: rows with different content get different episodes
    pols["head_forcing_episodes"] = make_policy(
        "head_forcing", labels=HeadLabels.uniform(2, 2, "memory", "head_forcing", "test"),
        rules={"memory": RetentionRule(sink=3, recent=6, middle=Episodic(3, 2, 0.5))})
    return pols


@pytest.mark.parametrize("name", list(_policies()))
def test_a_batch_of_two_equals_two_runs_of_one(name):
    """One denoising step (no re-noise draws), so each row's result depends only on its own noise."""
    model = random_backbone(TINY, seed=0)
    pol = _policies()[name]
    noise = torch.randn(2, 16, 36, 4, 4, generator=torch.Generator().manual_seed(3))
    noise[1] = noise[1] * 3 + 1  # a very different second row
    run = lambda n: generate(model, text_context(), n, policy=pol, steps=(1000,))  # noqa: E731
    with torch.no_grad():
        both = run(noise)
        rows = [run(noise[i:i + 1]) for i in range(2)]
    for i in range(2):
        assert torch.allclose(both[i:i + 1], rows[i], atol=2e-6, rtol=1e-5), (name, i)


def test_rows_really_keep_different_episodes():
    model = random_backbone(TINY, seed=0)
    pol = _policies()["head_forcing_episodes"]
    runner = WanRunner(model)
    sampler = ARSampler(runner, pol, FlowMatchSchedule((1000,)), 3)
    noise = torch.randn(2, 16, 36, 4, 4, generator=torch.Generator().manual_seed(3))
    noise[1] = noise[1] * 3 + 1
    sampler.start(2, 4, 4, 36)
    sampler.set_prompt(text_context())
    with torch.no_grad():
        sampler.sample(noise)
    mem = sampler.cache.store("memory").episodes
    assert mem.episodes(0) != mem.episodes(1)
