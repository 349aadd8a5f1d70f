"""Prompt schedules: validation, the text format, and what each transition does per frame."""

import pytest
import torch

from headforcing_core import generate
from headforcing_core.backbone import WanRunner
from headforcing_core.chunk_attention import ChunkAttention
from headforcing_core.plan import plan_chunk
from headforcing_core.policies import Episodic, HeadLabels, RetentionRule, make_policy
from headforcing_core.prompts import PromptSchedule, PromptSegment, ScheduleError, seconds_to_latent_frames
from headforcing_core.schedule import FlowMatchSchedule
from headforcing_core.schedule_text import parse_schedule_text
from headforcing_core.story import generate_schedule
from headforcing_core.story_sampler import ScheduleSampler
from headforcing_core.transitions import blend_text, blend_weight

from .conftest import latent_noise, text_context


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


A = text_context(seed=11)
B = text_context(seed=12)


def seg(ctx, frames, transition="cut", k=0, label=""):
    return PromptSegment(ctx, frames=frames, transition=transition, transition_frames=k, label=label)


# ---------------------------------------------------------------------------------------------
# schedule objects


def test_schedule_is_immutable_and_chains():
    one = PromptSchedule.single(A, 6, label="a")
    two = one.then(seg(B, 3, "blend", 2, label="b"))
    assert len(one) == 1 and len(two) == 2  # `then` returns a new schedule
    assert two.total_frames == 9 and two.bounds() == [(0, 6), (6, 3)]
    with pytest.raises(Exception):
        two.segments = ()  # frozen
    assert isinstance(two.segments, tuple)


@pytest.mark.parametrize("kwargs,match", [
    (dict(frames=0), "at least 1 latent frame"),
    (dict(frames=-3), "at least 1 latent frame"),
    (dict(seconds=0.0), "positive number of seconds"),
    (dict(frames=3, seconds=1.0), "exactly one"),
    (dict(), "exactly one"),
    (dict(frames=3, transition="fade"), "unknown transition"),
    (dict(frames=3, transition="recache", transition_frames=0), "at least 1 frame"),
    (dict(frames=3, transition="recache", transition_frames=22), "at most 21"),
    (dict(frames=3, transition="blend", transition_frames=4), "does not fit"),
    (dict(frames=4_000_002), "longer than any video"),
    (dict(seconds=1e13), "longer than any video"),
])
def test_bad_segments_are_refused(kwargs, match):
    with pytest.raises(ScheduleError, match=match):
        PromptSegment(A, label="x", **kwargs)


def test_a_schedule_longer_than_any_video_is_refused_saying_shorten():
    """Each line may fit while the whole does not: refused as text and as segments, naming the total."""
    with pytest.raises(ScheduleError, match=r"add up to 1\.8e\+06 s.*shorten"):
        parse_schedule_text("900000 | a fox\n900000 | the fox sleeps")
    half = PromptSegment(A, seconds=900_000.0)
    with pytest.raises(ScheduleError, match=r"adds up to 7200000 latent frames.*shorten the segments"):
        PromptSchedule((half, half)).resolve(3)


def test_bad_schedules_are_refused():
    with pytest.raises(ScheduleError, match="at least one segment"):
        PromptSchedule(())
    with pytest.raises(ScheduleError, match="different widths"):
        PromptSchedule((seg(A, 3), seg(torch.zeros(1, 4, 768), 3)))
    with pytest.raises(ScheduleError, match=r"\[batch, tokens, width\]"):
        PromptSegment(torch.zeros(4, 4096), frames=3)
    # a blend given in seconds is checked once the length is known
    s = PromptSchedule((seg(A, 3), PromptSegment(B, seconds=0.5, transition="blend", transition_frames=5)))
    with pytest.raises(ScheduleError, match="segment 2.*does not fit"):
        s.resolve(3)


@pytest.mark.parametrize("seconds,fpb,frames", [(5, 3, 21), (5, 1, 20), (1, 3, 3), (0.1, 3, 3), (2.5, 3, 9),
                                                (60, 3, 240)])
def test_seconds_round_to_whole_chunks(seconds, fpb, frames):
    assert seconds_to_latent_frames(seconds, fpb) == frames
    assert PromptSchedule((PromptSegment(A, seconds=seconds),)).resolve(fpb).total_frames == frames


# ---------------------------------------------------------------------------------------------
# text format


def test_parse_schedule_text():
    text = """
    # a story
    5 | a red fox runs through snow
    4.5s | the fox stops | blend 6

    6 | close-up of the eyes | Recache 3
    2 | the end | cut
    """
    lines = parse_schedule_text(text, default_transition="blend", default_frames=2)
    assert [(l.line, l.seconds, l.prompt, l.transition, l.transition_frames) for l in lines] == [
        (3, 5.0, "a red fox runs through snow", "blend", 2),
        (4, 4.5, "the fox stops", "blend", 6),
        (6, 6.0, "close-up of the eyes", "recache", 3),
        (7, 2.0, "the end", "cut", 0),
    ]


@pytest.mark.parametrize("bad,line,why", [
    ("five | a fox", 2, "not a length in seconds"),
    ("5 a fox", 2, "no '|'"),
    ("0 | a fox", 2, "positive number"),
    ("-1 | a fox", 2, "positive number"),
    ("5 |   ", 2, "prompt is empty"),
    ("5 | a | b | c", 2, "too many"),
    ("5 | a fox | dissolve 3", 2, "not a transition"),
    ("5 | a fox | blend", 2, "needs a frame count"),
    ("5 | a fox | blend x", 2, "not a whole number"),
    ("5 | a fox | recache 40", 2, "at most 21"),
    ("36000000 | a fox", 2, "shorten it"),  # longer than any video the sampler makes
    ("1e13 | a fox", 2, "shorten it"),  # once a raw "storage size overflowed" from the sampler
    ("1e308 | a fox", 2, "shorten it"),  # once a raw OverflowError
])
def test_parse_errors_name_the_line(bad, line, why):
    text = "3 | fine first line\n" + bad + "\n4 | fine"
    with pytest.raises(ScheduleError) as e:
        parse_schedule_text(text)
    msg = str(e.value)
    assert f"line {line} " in msg and why in msg and repr(bad.strip())[:20] in msg, msg


def test_parse_rejects_empty_text():
    with pytest.raises(ScheduleError, match="no segments"):
        parse_schedule_text("\n  # only a comment\n")


# ---------------------------------------------------------------------------------------------
# transitions, observed on the model calls


class Spy:
    """Records every model call of a sampler: chunk, timesteps, commit target, text keys and latents."""

    def __init__(self, sampler):
        self.calls = []
        inner = sampler.runner.forward

        def forward(latents, timesteps, text, attention, *args, **kwargs):
            plan = attention.plan
            kind = "read" if attention.pass_ == "noisy" else ("replace" if plan.rerun else "commit")
            types = [seg.store.head_type for seg in plan.segments if seg.cls == 0]
            self.calls.append(dict(start=plan.chunk_start, frames=plan.frames,
                                   t=timesteps.flatten().tolist(), kind=kind, keys=[k.clone() for k in text.keys],
                                   values=[v.clone() for v in text.values], latents=latents.clone(),
                                   history=[[(i,) for src, i, _, _ in plan.listing(t) if src == "frame"]
                                            for t in types]))
            return inner(latents, timesteps, text, attention, *args, **kwargs)

        sampler.runner.forward = forward


def run_spied(model, schedule, noise, policy="full", seed=7):
    runner = WanRunner(model)
    sampler = ScheduleSampler(runner, make_policy(policy) if isinstance(policy, str) else policy,
                              FlowMatchSchedule(), 3)
    spy = Spy(sampler)
    b, _, t, h, w = noise.shape
    sampler.start(b, h, w, t)
    out = sampler.run_schedule(schedule, noise, torch.Generator().manual_seed(seed))
    return sampler, spy, out


def texts(model):
    runner = WanRunner(model)
    return runner.encode_text(A), runner.encode_text(B)


def same_text(call, text):
    return all(torch.equal(a, b) for a, b in zip(call["keys"], text.keys)) and \
        all(torch.equal(a, b) for a, b in zip(call["values"], text.values))


def test_cut_swaps_the_context_at_the_boundary(tiny_model):
    ta, tb = texts(tiny_model)
    sampler, spy, _ = run_spied(tiny_model, PromptSchedule((seg(A, 6), seg(B, 6))), latent_noise(12))
    assert [c["start"] for c in spy.calls] == [0] * 5 + [3] * 5 + [6] * 5 + [9] * 5
    for c in spy.calls:
        assert same_text(c, ta if c["start"] < 6 else tb)
    assert not [c for c in spy.calls if c["kind"] == "replace"]
    assert sampler.events == [dict(frame=6, transition="cut", switch=True, frames=0, replaced=0)]


def test_same_prompt_again_is_not_a_switch(tiny_model):
    """A segment repeating the current prompt just continues: identical to one long segment."""
    noise = latent_noise(12)
    sampler, _, out = run_spied(tiny_model, PromptSchedule((seg(A, 6), seg(A.clone(), 6, "recache", 3))), noise)
    assert sampler.events == []
    ref = generate(tiny_model, A, noise, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, ref)


def test_blend_interpolates_cross_attention_kv_per_chunk(tiny_model):
    ta, tb = texts(tiny_model)
    sampler, spy, _ = run_spied(tiny_model, PromptSchedule((seg(A, 3), seg(B, 9, "blend", 6))), latent_noise(12))
    alpha = {0: 0.0, 3: blend_weight(0, 3, 6), 6: blend_weight(3, 3, 6), 9: 1.0}
    assert alpha[3] == pytest.approx(0.25) and alpha[6] == pytest.approx(0.75)
    for c in spy.calls:
        a = alpha[c["start"]]
        for layer in range(len(ta.keys)):
            assert torch.allclose(c["keys"][layer], (1 - a) * ta.keys[layer] + a * tb.keys[layer], atol=1e-6)
            assert torch.allclose(c["values"][layer], (1 - a) * ta.values[layer] + a * tb.values[layer], atol=1e-6)
    assert same_text([c for c in spy.calls if c["start"] == 0][0], ta)
    assert same_text([c for c in spy.calls if c["start"] == 9][0], tb)  # past the blend: exactly B
    assert sampler.events[0]["transition"] == "blend" and sampler.events[0]["frames"] == 6


def test_blend_weights():
    assert blend_weight(0, 3, 3) == pytest.approx(0.5)
    assert blend_weight(0, 1, 4) == pytest.approx(0.125)
    assert blend_weight(2, 3, 3) == pytest.approx((5 / 6 + 1 + 1) / 3)  # a chunk straddling the end
    one = torch.ones(1, 2, 4, 8)
    mixed = blend_text(_text(one), _text(3 * one), 0.25)
    assert torch.allclose(mixed.keys[0], 1.5 * one) and torch.allclose(mixed.values[0], 1.5 * one)


def _text(x):
    from headforcing_core.backbone import TextContext
    return TextContext([x], [x])


def test_recache_reruns_exactly_the_last_frames_at_t0(tiny_model):
    ta, tb = texts(tiny_model)
    noise = latent_noise(12)
    sampler, spy, out = run_spied(tiny_model, PromptSchedule((seg(A, 7), seg(B, 5, "recache", 4))), noise)
    reruns = [c for c in spy.calls if c["kind"] == "replace"]
    # the last 4 committed frames (3..6) re-run at t = 0 under B, in chunks of 3 from the oldest
    assert [(c["start"], c["frames"]) for c in reruns] == [(3, 3), (6, 1)]
    for c in reruns:
        assert c["t"] == [0.0] * c["frames"] and same_text(c, tb)
        assert torch.equal(c["latents"], out[:, :, c["start"]:c["start"] + c["frames"]])
    # each re-run chunk attends only to strictly older history (the refreshed frames included)
    assert reruns[0]["history"] == [[(0,), (1,), (2,)]]
    assert reruns[1]["history"] == [[(f,) for f in range(6)]]
    # order: A's last clean pass, then the re-runs, then B's first chunk
    kinds = [(c["start"], c["kind"]) for c in spy.calls]
    i = kinds.index((3, "replace"))
    assert kinds[i - 1] == (6, "commit") and kinds[i + 2][0] == 7
    assert sampler.events == [dict(frame=7, transition="recache", switch=True, frames=4, replaced=2 * 4,
                                   mode="block_causal")]


def test_recache_replaces_kv_where_frames_are_kept_whole(tiny_model):
    """After a recache the cache holds, for the re-run frames, exactly the K/V a clean pass under the
    new prompt commits; other frames keep theirs; layer 0's K/V (text-independent) do not move."""
    ta, tb = texts(tiny_model)
    sched_a = PromptSchedule((seg(A, 6),))
    noise = latent_noise(6)
    sampler, _, out = run_spied(tiny_model, sched_a, noise)
    pool = sampler.cache.store("all").frames
    before = pool.k.clone()
    # independent expectation: a fresh sampler committing frames 0-2 under A, then 3-5 under B
    ref = ScheduleSampler(sampler.runner, make_policy("full"), FlowMatchSchedule(), 3)
    ref.start(1, 8, 8, 6)
    for start, text in ((0, ta), (3, tb)):
        ref.cache.reserve(start, 3)
        plan = plan_chunk(ref.cache, "absolute", 21, 18, 21, start, 3)
        ref.runner.forward(out[:, :, start:start + 3], torch.zeros(1, 3), text,
                           ChunkAttention(plan, ref.cache, ref.backend, "clean"))
        ref.cache.commit(start, 3, None, None)
    sampler.set_prompt(B)
    _, replaced = sampler.recache(3)
    assert replaced == 3 * len(sampler.runner.module.blocks)
    ref_pool = ref.cache.store("all").frames
    heads = sampler.runner.spec.num_heads
    for li in range(len(sampler.runner.module.blocks)):
        rows = slice(li * heads, (li + 1) * heads)
        for f in range(6):
            page, ref_page = pool.page_of[f], ref_pool.page_of[f]
            got = pool.k[:, rows, page], pool.v[:, rows, page]
            want = ref_pool.k[:, rows, ref_page], ref_pool.v[:, rows, ref_page]
            assert torch.allclose(got[0], want[0], atol=1e-5) and torch.allclose(got[1], want[1], atol=1e-5)
            old = before[:, rows, page]
            if f < 3:
                assert torch.equal(got[0], old)
            elif li == 0:
                assert torch.allclose(got[0], old, atol=1e-6)  # layer 0 never sees the text
            else:
                assert not torch.allclose(got[0], old, atol=1e-4)  # later layers do


def test_replace_frames_touches_only_whole_frames():
    from .retention_harness import build, frame_kv, run_to
    pol = make_policy("pyramid_forcing", labels=HeadLabels("pyramid_forcing", (("anchor", "veil"),)))
    cache = build(pol, ["anchor", "veil"], total=40, fpb=1)
    run_to(cache, pol, 18, frames=1)
    anchor, veil = cache.store("anchor"), cache.store("veil")
    # frame 6: kept whole by the anchor's stride store, only merged (pooled) by the veil
    assert 6 in anchor.frames.page_of and 6 not in veil.frames.page_of
    k, v = frame_kv(cache, 0)
    assert cache.replace_frames(6, 1, -k - 1, -v - 1) == 1
    assert cache.replace_frames(16, 1, -k - 1, -v - 1) == 2  # a recent frame of both
    assert cache.replace_frames(5, 1, -k - 1, -v - 1) == 0  # held by neither
    page = anchor.frames.page_of[6]
    assert (anchor.frames.k[:, :, page] == -1).all() and (anchor.frames.v[:, :, page] == -1.5).all()
    raw12 = cache.raw_frame("anchor", 12)[0]  # others keep theirs (stored rotated at their own time)
    assert torch.allclose(raw12, torch.full_like(raw12, 12.0))


def memory_policy(similarity=-1.0):
    """Every head a memory head whose episodes never split on similarity (only on a prompt switch)."""
    return make_policy("head_forcing", labels=HeadLabels.uniform(2, 2, "memory", "head_forcing", "test"),
                       rules={"memory": RetentionRule(sink=3, recent=6, middle=Episodic(8, 2, similarity))})


def episodes(sampler):
    return sampler.cache.store("memory").episodes.episodes(0)


@pytest.mark.parametrize("transition,k", [("cut", 0), ("recache", 3), ("blend", 3)])
def test_memory_heads_open_an_episode_at_each_switch(tiny_model, transition, k):
    noise = latent_noise(24)
    same, _, _ = run_spied(tiny_model, PromptSchedule((seg(A, 12), seg(A, 12))), noise, memory_policy())
    assert all(len(e) == 1 for e in episodes(same))  # one prompt: one episode of frames 3..17
    switched, _, _ = run_spied(tiny_model, PromptSchedule((seg(A, 12), seg(B, 12, transition, k))), noise,
                               memory_policy())
    for eps in episodes(switched):
        # the switch at frame 12: the old prompt's frames 3..11 form one episode, the new prompt's another
        assert eps == [tuple(range(3, 12)), tuple(range(12, 18))]


def test_generate_schedule_with_one_segment_is_generate(tiny_model):
    noise = latent_noise(7)
    for policy in ("full", "head_forcing"):
        ref = generate(tiny_model, A, noise, policy=policy, generator=torch.Generator().manual_seed(3))
        out, state = generate_schedule(tiny_model, A, noise, policy=policy, generator=torch.Generator().manual_seed(3))
        assert torch.equal(out, ref)
        assert state.next_frame == 7


def test_schedule_noise_must_cover_the_segments(tiny_model):
    with pytest.raises(ValueError, match="add up to 9"):
        generate_schedule(tiny_model, PromptSchedule((seg(A, 6), seg(B, 3))), latent_noise(12))


def test_model_call_count_progress_and_chunk_indexes(tiny_model):
    from headforcing_core.transitions import count_model_calls
    from headforcing_core.sampler import Hooks
    sched = PromptSchedule((seg(A, 7), seg(B, 5, "recache", 4), seg(A, 3, "blend", 2)))
    runner = WanRunner(tiny_model)
    sampler = ScheduleSampler(runner, make_policy("head_forcing"), FlowMatchSchedule(), 3)
    spy = Spy(sampler)
    sampler.start(1, 8, 8, 15)
    progress, chunks = [], []
    sampler.run_schedule(sched, latent_noise(15), torch.Generator().manual_seed(1),
                         Hooks(progress=lambda d, t: progress.append((d, t)), on_chunk=lambda i, x: chunks.append(i)))
    n = count_model_calls(sched, 3, 4)
    assert n == (3 + 2 + 1) * 5 + 2  # chunks × (4 steps + clean pass) + 2 re-run chunks
    assert len(spy.calls) == n
    assert [d for d, _ in progress] == list(range(1, n + 1)) and {t for _, t in progress} == {n}
    assert chunks == list(range(6))  # chunk indexes run on across segments


def test_recache_can_be_interrupted(tiny_model):
    from headforcing_core.errors import Interrupted
    from headforcing_core.sampler import Hooks
    runner = WanRunner(tiny_model)
    sampler = ScheduleSampler(runner, make_policy("full"), FlowMatchSchedule(), 3)
    sampler.start(1, 8, 8, 6)
    sampler.run_schedule(PromptSchedule((seg(A, 3),)), latent_noise(3))
    spy = Spy(sampler)
    with pytest.raises(Interrupted, match="after 0 of 6 "):  # 1 re-run + 5 calls
        sampler.run_schedule(PromptSchedule((seg(B, 3, "recache", 3),)), latent_noise(3),
                             hooks=Hooks(should_stop=lambda: True))
    assert spy.calls == [] and sampler.next_frame == 3


def test_segment_noise_is_the_same_in_one_run_or_one_by_one():
    from headforcing_core.noise import initial_noise, noise_frames
    from headforcing_core.noise import segment_noise

    def shape_of(n):
        return (1, 2, n, 3, 3)

    def draw(s, e):
        return noise_frames(shape_of, 9, s, e)

    assert torch.equal(segment_noise(draw, 0, [10]), initial_noise(shape_of(10), 9))  # one segment: a plain draw
    whole = segment_noise(draw, 0, [4, 6, 5])
    parts = [segment_noise(draw, 0, [4]), segment_noise(draw, 4, [6]), segment_noise(draw, 10, [5])]
    assert torch.equal(whole, torch.cat(parts, dim=2))
    # each segment's frames are those of a fresh run as long as the story up to its end
    assert torch.equal(whole[:, :, 4:10], initial_noise(shape_of(10), 9)[:, :, 4:10])
    assert torch.equal(whole[:, :, 10:], initial_noise(shape_of(15), 9)[:, :, 10:])
