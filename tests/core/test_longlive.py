"""LongLive, exactly: its frame-sink window and its prompt-switch recache as LongLive's code runs them.

Restated from NVlabs/LongLive (release branch v1.0), independently of the pack's cache:

* the window (``wan/modules/causal_model.py`` ``CausalWanSelfAttention.forward``,
  ``configs/longlive_interactive_inference.yaml``): 3-frame chunks, ``local_attn_size`` 12 frames
  *counting the sink and the chunk* — sink frames 0-2, the 6 newest history frames, the chunk;
  keys at their absolute positions;
* the recache (``pipeline/interactive_causal_inference.py`` ``_recache_after_switch``): at switch frame
  ``s``, ``min(12, s)`` frames before it run once at timestep 0 under the new prompt, absolute positions,
  no mask. With the global sink (the released config) and ``s > 12`` only the last 9 matter: they attend
  the sink's stored (old-prompt) K/V and each other and are rewritten, the sink is kept; without it all
  12 attend each other, are rewritten, and the first 3 become the sink. ``s <= 12``: frames ``[0, s)``
  attend each other and are all rewritten.
"""

import pytest
import torch

from headforcing_core import WanRunner, make_policy
from headforcing_core.prompts import PromptSchedule, PromptSegment
from headforcing_core.schedule import FlowMatchSchedule
from headforcing_core.schedule_text import parse_schedule_text
from headforcing_core.story_sampler import ScheduleSampler

from .conftest import latent_noise, text_context
from .per_head_reference import Reference

W, S = 12, 3


def longlive_rule(s, global_sink=True):
    """(frames re-run, sink frames they attend, frames rewritten, the sink afterwards) for a switch at s."""
    if s == 0:
        return [], [], [], [0, 1, 2]
    if s <= W:
        frames = list(range(0, s))
        return frames, [], frames, [0, 1, 2]
    if global_sink:
        frames = list(range(s - (W - S), s))
        return frames, [0, 1, 2], frames, [0, 1, 2]
    frames = list(range(s - W, s))
    return frames, [], frames, frames[:S]


def window(start, sinks):
    """LongLive's attended history for the chunk at ``start``: the sink + the 6 newest other frames."""
    hist = [f for f in range(start) if f not in sinks][-(W - S - 3):]
    return sorted(set(sinks) | set(hist)) if start else []


A, B = text_context(seed=11), text_context(seed=12)


def run_switch(model, s, mode, total=None, n=W):
    """A story A → B switching at frame s with a LongLive recache (``recache n [mode]``; ``mode`` None: the
    policy's default); returns the sampler, its record, the output."""
    total = total or s + 6
    runner = WanRunner(model)
    sampler = ScheduleSampler(runner, make_policy("longlive"), FlowMatchSchedule(), 3)
    record = []
    original = sampler.recache_longlive

    def spy(*a, **k):
        before = {f: p for f, p in sampler.cache.store("all").frames.page_of.items()}
        pool_before = sampler.cache.store("all").frames.k.clone()
        done, replaced = original(*a, **k)
        plan = sampler.last_plan
        store = sampler.cache.store("all")
        record.append(dict(start=plan.chunk_start, frames=plan.frames, listing=plan.listing("all"),
                           pages_before=before, pool_before=pool_before, replaced=replaced,
                           pages_after=dict(store.frames.page_of), pool_after=store.frames.k.clone(),
                           sinks_after=list(store.tracker.sinks)))
        return done, replaced

    sampler.recache_longlive = spy
    noise = latent_noise(total, h=4, w=4)
    sampler.start(1, 4, 4, total)
    segs = (PromptSegment(A, frames=s), PromptSegment(B, frames=total - s, transition="recache",
                                                      transition_frames=n, recache_mode=mode))
    with torch.no_grad():
        out = sampler.run_schedule(PromptSchedule(segs), noise, torch.Generator().manual_seed(3))
    return sampler, record, out, noise


@pytest.mark.parametrize("s,mode", [(6, "longlive"), (12, "longlive"), (15, "longlive"), (21, "longlive"),
                                    (6, "longlive_local_sink"), (15, "longlive_local_sink"),
                                    (24, "longlive_local_sink")])
def test_recache_reruns_attends_and_rewrites_what_longlive_does(tiny_model, s, mode):
    sampler, record, _, _ = run_switch(tiny_model, s, mode)
    frames, attends_sink, rewritten, sink_after = longlive_rule(s, mode == "longlive")
    (rec,) = record
    assert (rec["start"], rec["frames"]) == (frames[0], len(frames))  # one model call over these frames
    got_frames = [i for src, i, _, _ in rec["listing"] if src == "frame"]
    got_chunk = [rec["start"] + i for src, i, _, _ in rec["listing"] if src == "chunk"]
    assert got_frames == attends_sink and got_chunk == frames  # no mask: every re-run frame sees them all
    assert all(t == (i if src == "frame" else rec["start"] + i) for src, i, _, t in rec["listing"])  # absolute
    held = set(rec["pages_after"])
    rewritten_held = [f for f in rewritten if f in held]
    assert rec["replaced"] == len(rewritten_held) * 2  # per layer (the tiny model has 2)
    assert rec["sinks_after"] == sink_after
    after = lambda f: rec["pool_after"][:, 2:4, rec["pages_after"][f]]  # noqa: E731  layer 1: prompt-dependent
    # the sink keeps its stored K/V under the global sink (the old prompt's)
    if mode == "longlive" and s > W:
        for f in range(S):
            assert torch.equal(after(f), rec["pool_before"][:, 2:4, rec["pages_before"][f]])
    for f in rewritten_held:  # rewritten under the new prompt
        if f in rec["pages_before"]:
            assert not torch.allclose(after(f), rec["pool_before"][:, 2:4, rec["pages_before"][f]], atol=1e-5)
    for f in set(rec["pages_before"]) - set(rewritten):  # everything else kept
        if f in held:
            assert torch.equal(after(f), rec["pool_before"][:, 2:4, rec["pages_before"][f]])


@pytest.mark.parametrize("s", [3, 15])
@pytest.mark.parametrize("n", [1, 3, 9, 21])
def test_the_longlive_modes_rerun_longlives_window_whatever_n_says(tiny_model, s, n):
    """LongLive's window comes from its config (local_attn_size 12), not from the segment's N: a Prompt
    Segment's default "recache 3" under the longlive preset (whose default mode is longlive) re-runs what
    LongLive re-runs, and the report says so."""
    sampler, record, _, _ = run_switch(tiny_model, s, None, n=n)
    frames, attends_sink, _, _ = longlive_rule(s)
    (rec,) = record
    assert (rec["start"], rec["frames"]) == (frames[0], len(frames))
    assert [i for src, i, _, _ in rec["listing"] if src == "frame"] == attends_sink
    (event,) = sampler.events
    assert event["mode"] == "longlive" and event["frames"] == len(frames)
    seg = PromptSegment(B, frames=3, transition="recache", transition_frames=n)
    assert seg.describe("longlive") == "3 latent frames, recache (longlive, the policy's default: LongLive's window, " \
                                       "12 frames)"
    assert seg.describe("block_causal") == f"3 latent frames, recache {n} (block_causal, the policy's default)"


def test_a_switch_at_frame_zero_reruns_nothing(tiny_model):
    runner = WanRunner(tiny_model)
    sampler = ScheduleSampler(runner, make_policy("longlive"), FlowMatchSchedule(), 3)
    sampler.start(1, 4, 4, 6)
    sampler.set_prompt(A)
    sampler.context = A
    sampler.tail = latent_noise(3, h=4, w=4)
    assert sampler.recache_longlive(W) == (0, 0)
    assert longlive_rule(0) == ([], [], [], [0, 1, 2])


def test_the_longlive_preset_is_its_window(tiny_model):
    """Over 30 frames the preset equals a dense per-head reference of LongLive's window."""
    from headforcing_core import generate
    noise = latent_noise(30, h=4, w=4)
    with torch.no_grad():
        ours = generate(tiny_model, A, noise, policy="longlive", generator=torch.Generator().manual_seed(5))
    ref = Reference(tiny_model, (("all", "all"),) * 2, (4, 4), 3, "absolute")
    listings = {start: _window_listing(start, [0, 1, 2]) for start in range(0, 30, 3)}
    with torch.no_grad():
        theirs = ref.generate(A, noise, (1000, 750, 500, 250), 5.0, torch.Generator().manual_seed(5), listings)
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-5


def _window_listing(start, sinks, frames=3):
    entries = [("frame", f, float(f), 1, "native") for f in window(start, sinks)]
    entries += [("chunk", j, float(start + j), 1, "native") for j in range(frames)]
    return lambda head_type, j, pass_: {"entries": entries, "episodes": {}, "frames": frames}


@pytest.mark.parametrize("s,mode", [(9, "longlive"), (15, "longlive"), (18, "longlive_local_sink")])
def test_the_longlive_recache_equals_a_dense_reference(tiny_model, s, mode):
    sampler, _, ours, noise = run_switch(tiny_model, s, mode, total=s + 9)
    frames, attends_sink, _, sink_after = longlive_rule(s, mode == "longlive")
    ref = Reference(tiny_model, (("all", "all"),) * 2, (4, 4), 3, "absolute")
    sinks = {"now": [0, 1, 2]}

    def before_chunk(start, out):
        if start != s:
            return
        entries = [("frame", f, float(f), 1, "native") for f in attends_sink]
        entries += [("chunk", j, float(frames[0] + j), 1, "native") for j in range(len(frames))]
        listing = lambda ht, j: {"entries": entries, "episodes": {}, "frames": len(frames)}  # noqa: E731
        ref.forward(out[:, :, frames[0]:s], torch.zeros(1, len(frames)), B, frames[0], listing, True)
        sinks["now"] = sink_after

    listings = {}
    for start in range(0, s + 9, 3):
        # the sink a chunk sees is the one in effect when it runs (after the recache at s)
        listings[start] = (lambda st: (lambda ht, j, p: _window_listing(st, sinks["now"])(ht, j, p)))(start)
    with torch.no_grad():
        theirs = ref.generate(lambda start: A if start < s else B, noise, (1000, 750, 500, 250), 5.0,
                              torch.Generator().manual_seed(3), listings, before_chunk)
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-5


def test_schedule_text_names_the_recache_mode():
    lines = parse_schedule_text("3 | a\n3 | b | recache 12 longlive\n3 | c | recache 4 block_causal\n3 | d | recache 2")
    assert [(l.transition, l.transition_frames, l.recache_mode) for l in lines] == [
        ("cut", 0, None), ("recache", 12, "longlive"), ("recache", 4, "block_causal"), ("recache", 2, None)]
    with pytest.raises(ValueError, match="not a recache mode"):
        parse_schedule_text("3 | a | recache 12 sideways")


def test_default_recache_mode_is_longlive_only_under_its_preset():
    from headforcing_core.policies import make_policy
    from headforcing_core.transitions import default_recache_mode
    assert default_recache_mode("longlive") == default_recache_mode(make_policy("longlive")) == "longlive"
    for other in ("full", "self_forcing_window", "sink_window", None):
        assert default_recache_mode(other) == "block_causal"
    assert default_recache_mode(make_policy("head_forcing")) == "block_causal"
