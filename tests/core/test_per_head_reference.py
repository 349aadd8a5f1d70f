"""The sampler equals an independent dense per-head reference for every preset (issue: fidelity).

The reference (per_head_reference.py) recomputes the whole AR run with its own forward pass,
its own K/V store, pooling, merging, RoPE and softmax; it takes from the pack only the key-set
listing of every chunk (recorded while the sampler runs).
"""

import pytest
import torch

import headforcing_core.sampler as sampler_mod
from headforcing_core import WanConfig, generate, random_backbone
from headforcing_core.policies import HeadLabels, make_policy

from .conftest import TINY, latent_noise, text_context
from .per_head_reference import Reference

TWELVE = WanConfig(dim=12 * 16, num_heads=12, num_layers=2, ffn_dim=128)

LABELS = {
    "pyramid_forcing": {2: (("anchor", "veil"), ("wave", "anchor")),
                        12: (("anchor", "wave", "veil") * 4, ("wave",) * 5 + ("anchor",) * 5 + ("veil",) * 2)},
    "head_forcing": {2: (("local", "memory"), ("anchor", "memory")),
                     12: (("local", "anchor", "memory") * 4, ("memory",) * 6 + ("local",) * 3 + ("anchor",) * 3)},
}


def record(monkeypatch, cache_holder):
    """Wrap the sampler's planner: keep, per chunk, every type's key sets and the episodes held."""
    chunks = {}
    original = sampler_mod.plan_chunk

    def spy(cache, *args, **kwargs):
        plan = original(cache, *args, **kwargs)
        episodes = {}
        for ts in cache.types:
            if ts.episodes is not None:
                ep = ts.episodes
                for b in range(cache.batch):
                    for slot, frames in enumerate(ep.episodes(b)):
                        episodes[(ts.head_type, b, ep.layer_ids[slot])] = frames
        chunks[plan.chunk_start] = (plan, episodes, {ts.head_type: ts.rule for ts in cache.types})
        return plan

    monkeypatch.setattr(sampler_mod, "plan_chunk", spy)
    return chunks


def listings(chunks):
    def for_chunk(start):
        plan, episodes, rules = chunks[start]

        def get(head_type, j, pass_):
            rows = plan.listing(head_type, j if plan.classes > 1 else 0, pass_)
            rule = rules[head_type]
            entries = []
            for source, index, role, time in rows:
                if source == "block":
                    entries.append(("block", index, time, rule.middle.patch, "top_left"))
                elif source == "episodes":
                    entries.append(("episodes", 0, None, rule.middle.pool, "centroid"))
                else:
                    entries.append((source, index, time, 1, "native"))
            eps = {(b, layer): frames for (t, b, layer), frames in episodes.items() if t == head_type}
            return {"entries": entries, "episodes": eps, "frames": plan.frames}

        return get

    return {start: for_chunk(start) for start in chunks}


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("heads", [2, 12])
@pytest.mark.parametrize("preset", ["self_forcing_window", "sink_window", "longlive", "pyramid_forcing",
                                    "head_forcing", "full"])
def test_sampler_equals_the_per_head_reference(monkeypatch, preset, heads):
    cfg = TINY if heads == 2 else TWELVE
    model = random_backbone(cfg, seed=0)
    frames = {"pyramid_forcing": 30, "head_forcing": 21}.get(preset, 18)
    kwargs = {}
    if preset in LABELS:
        kwargs["labels"] = HeadLabels(preset, LABELS[preset][heads])
    if preset == "self_forcing_window":
        kwargs["recent"] = 12  # a window that slides within these frames
    if preset == "sink_window":
        kwargs.update(sink=2, recent=6)
    pol = make_policy(preset, **kwargs)
    if preset == "head_forcing":  # episodes that split and merge within the run
        from headforcing_core.policies import Episodic, RetentionRule
        pol = make_policy(preset, labels=kwargs["labels"], rules={
            "memory": RetentionRule(sink=3, recent=4, middle=Episodic(3, 2, 0.5))})
    ctx = text_context()
    noise = latent_noise(frames, h=4, w=4, batch=2 if heads == 2 else 1)
    chunks = record(monkeypatch, None)
    with torch.no_grad():
        ours = generate(model, ctx, noise, policy=pol, generator=torch.Generator().manual_seed(5))
    head_types = pol.head_types(cfg.num_layers, cfg.num_heads) if pol.labels is not None else \
        tuple(("all",) * cfg.num_heads for _ in range(cfg.num_layers))
    ref = Reference(model, head_types, (4, 4), 3, pol.rope)
    with torch.no_grad():
        theirs = ref.generate(ctx, noise, (1000, 750, 500, 250), 5.0, torch.Generator().manual_seed(5),
                              listings(chunks))
    assert rel_err(ours, theirs) < 1e-5
    if preset == "pyramid_forcing":  # the run really used per-query-frame sets, blocks and middles
        assert any(plan.classes == 3 for plan, _, _ in chunks.values())
        assert any(r[0] == "block" for plan, _, _ in chunks.values() for r in plan.listing("veil", 0))
    if preset == "head_forcing":
        assert any(len(f) > 1 for _, eps, _ in chunks.values() for f in eps.values())


@pytest.mark.parametrize("fpb,t0,steps,first", [(3, 6, (1000, 500), (1000, 750, 500, 250)),  # extension
                                                 (1, 1, (1000, 750, 500, 250), None)])  # image-to-video
@pytest.mark.parametrize("preset", ["self_forcing_window", "sink_window", "longlive", "pyramid_forcing",
                                    "head_forcing"])
def test_initial_frames_are_ordinary_history_for_every_bounded_preset(monkeypatch, preset, fpb, t0, steps, first):
    """An initial latent's frames are committed like generated ones (sinks, windows, middles, episodes):
    the sampler equals the per-head reference that prefills its store with them, and the last chunk's
    key sets still hold initial frames where the preset keeps its oldest frames."""
    model = random_backbone(TINY, seed=0)
    kwargs = {"labels": HeadLabels(preset, LABELS[preset][2])} if preset in LABELS else {}
    if preset == "self_forcing_window":
        kwargs["recent"] = 6  # the initial frames leave the window during the run
    if preset == "sink_window":
        kwargs.update(sink=2, recent=6)
    pol = make_policy(preset, **kwargs)
    ctx, noise = text_context(), latent_noise(15 if fpb == 3 else 9, h=4, w=4)
    initial = latent_noise(t0, h=4, w=4, seed=21) * 0.7
    chunks = record(monkeypatch, None)
    with torch.no_grad():
        ours = generate(model, ctx, noise, policy=pol, frames_per_block=fpb, steps=steps, first_chunk_steps=first,
                        initial_latent=initial, generator=torch.Generator().manual_seed(5))
    head_types = pol.head_types(TINY.num_layers, TINY.num_heads) if pol.labels is not None else \
        tuple(("all",) * TINY.num_heads for _ in range(TINY.num_layers))
    ref = Reference(model, head_types, (4, 4), fpb, pol.rope)
    with torch.no_grad():
        theirs = ref.generate(ctx, noise, steps, 5.0, torch.Generator().manual_seed(5), listings(chunks),
                              initial=initial, first_steps=first)
    assert sorted(chunks) == list(range(0, t0 + noise.shape[2], fpb))  # the prefill chunks were planned too
    assert rel_err(ours, theirs) < 1e-5
    last = chunks[max(chunks)][0]
    kept = {index for head_type in set(sum(head_types, ())) for source, index, _, _ in last.listing(head_type, 0)
            if source == "frame"}
    if preset in ("sink_window", "longlive", "pyramid_forcing", "head_forcing"):  # sinks are the first frames
        assert 0 in kept, kept
    else:  # the window slid past them
        assert not kept & set(range(t0)), kept
