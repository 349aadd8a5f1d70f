"""Live prompt switches and takes (issue 22), on the tiny model, on the CPU.

* Krea Realtime's interpolation, restated: ``linspace(0, 1, N)`` weights, one embedding per chunk,
  from the embedding in effect;
* the text format's new pieces (``interpolate N``, ``N latent``, ``| same noise``) read back what
  :meth:`ScheduleLine.text` writes;
* a run steered by a scripted :class:`LiveInput` records a take whose schedule text, parsed and run
  again like the Prompt Schedule From Text node does, gives the same latents bit for bit — with one
  prompt, and with a prepared story whose noise draws the switch falls across;
* a switch asked inside a blend waits for its end; an AR_STATE taken mid-interpolation continues it.
"""

import json

import pytest
import torch

from headforcing_core.live import LiveSwitch, splice, take_lines, take_text
from headforcing_core.noise import noise_frames, segment_noise
from headforcing_core.prompts import PromptSchedule, PromptSegment, ScheduleError
from headforcing_core.schedule_text import ScheduleLine, format_schedule_text, parse_schedule_text
from headforcing_core.state_file import load_state, save_state
from headforcing_core.story import continue_generation, generate_schedule
from headforcing_core.transitions import Interpolation, interpolate_context, interpolation_weight

from .conftest import rel_err, text_context

FPB = 3
SEED = 5
SHAPE = (1, 16, None, 8, 8)


def encode(text: str) -> torch.Tensor:
    """A stand-in text encoder, deterministic from the text (as the test CLIP node is)."""
    return text_context(seed=sum(ord(c) * (i + 1) for i, c in enumerate(text)) % 100_000, tokens=5 + len(text) % 7)


def shape_of(n):
    return (1, 16, n, 8, 8)


def story_noise(schedule: PromptSchedule, start: int = 0) -> torch.Tensor:
    """The nodes' noise rule (nodes/run.py story_noise): one draw per noise piece of the schedule."""
    return segment_noise(lambda s, e: noise_frames(shape_of, SEED, s, e), start,
                         schedule.resolve(FPB).noise_lengths())


class Script:
    """A LiveInput that makes given switches before given chunks (counted from 1), logging what it was asked."""

    def __init__(self, switches: dict[int, LiveSwitch]):
        self.switches = dict(switches)
        self.asked = []  # (chunk, frame, busy)

    def poll(self, frame, busy):
        self.asked.append((len(self.asked) + 1, frame, busy))
        chunk = len(self.asked)
        if busy is not None:
            pending = [k for k in self.switches if k <= chunk]
            if pending:  # keep it for a later chunk
                self.switches[chunk + 1] = self.switches.pop(pending[0])
            return None
        return self.switches.pop(chunk, None)


def run(model, schedule, live=None):
    schedule = schedule.resolve(FPB)
    return generate_schedule(model, schedule, story_noise(schedule), policy="head_forcing",
                             generator=torch.Generator().manual_seed(SEED + 1), live=live)


def rerender(model, text):
    """What the Prompt Schedule From Text node and the sampler do with a take's text."""
    lines = parse_schedule_text(text)
    schedule = PromptSchedule(tuple(
        PromptSegment(encode(line.prompt), transition=line.transition, transition_frames=line.transition_frames,
                      recache_mode=line.recache_mode, label=line.prompt, text=line.prompt, same_noise=line.same_noise,
                      **line.length_keywords()) for line in lines))
    return run(model, schedule)


def switch(text, transition="cut", n=0, mode=None):
    return LiveSwitch(encode(text), text, transition, n, mode)


# ---------------------------------------------------------------------------------------------
# Krea Realtime's interpolation, restated


def test_interpolation_weights_are_krea_linspace():
    # release_server.py: lerp(old, new, linspace(0, 1, steps)), one per block; the server asks for 4
    assert [interpolation_weight(j, 4) for j in range(4)] == pytest.approx([0, 1 / 3, 2 / 3, 1], abs=1e-7)
    assert interpolation_weight(0, 4) == 0.0 and interpolation_weight(3, 4) == 1.0
    assert [interpolation_weight(j, 2) for j in range(2)] == [0.0, 1.0]
    assert interpolation_weight(0, 1) == 1.0  # one step: a cut
    with pytest.raises(ValueError):
        interpolation_weight(4, 4)


def test_interpolate_context_pads_then_lerps():
    old, new = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    mid = interpolate_context(old, new, 0.25)
    padded = torch.cat([old, torch.zeros(1, 2, 8)], dim=1)
    assert mid.shape == (1, 5, 8)
    assert torch.allclose(mid, padded + 0.25 * (new - padded))
    assert torch.equal(interpolate_context(old, new, 0.0)[:, :3], old)  # the ends are exact
    assert torch.equal(interpolate_context(old, new, 1.0), new)


def test_an_interpolation_sets_off_from_the_embedding_in_effect():
    a, b = torch.zeros(1, 2, 4), torch.ones(1, 2, 4)
    it = Interpolation(a, b, 4)
    assert torch.equal(it.current(), a)
    got = [it.next_context()[0, 0, 0].item() for _ in range(2)]
    assert got == pytest.approx([0.0, 1 / 3])
    assert torch.allclose(it.current(), torch.full((1, 2, 4), 1 / 3)) and not it.done


def test_interpolate_transition_encodes_one_embedding_per_chunk(tiny_model):
    from headforcing_core.backbone import WanRunner
    from headforcing_core.story_sampler import ScheduleSampler
    from headforcing_core.policies import make_policy
    from headforcing_core.schedule import FlowMatchSchedule

    a, b = encode("a fox"), encode("a city")
    runner = WanRunner(tiny_model)
    sampler = ScheduleSampler(runner, make_policy("full"), FlowMatchSchedule(), FPB)
    seen = []
    inner = runner.forward

    def forward(latents, timesteps, text, attention, *args, **kw):
        if attention.pass_ == "noisy":
            seen.append((attention.plan.chunk_start, text))
        return inner(latents, timesteps, text, attention, *args, **kw)

    runner.forward = forward
    schedule = PromptSchedule((PromptSegment(a, frames=6), PromptSegment(b, frames=15, transition="interpolate",
                                                                         transition_frames=4)))
    sampler.start(1, 8, 8, 21)
    sampler.run_schedule(schedule, story_noise(schedule), torch.Generator().manual_seed(1))
    want = {0: a, 3: a, 6: a, 9: interpolate_context(a, b, 1 / 3), 12: interpolate_context(a, b, 2 / 3), 15: b, 18: b}
    for start, text in seen:
        ref = runner.encode_text(want[start])
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(text.keys, ref.keys)), start
    # the weights' ends are the prompts themselves, bit for bit
    assert all(torch.equal(x, y) for x, y in zip([t for s, t in seen if s == 6][0].keys, runner.encode_text(a).keys))
    assert all(torch.equal(x, y) for x, y in zip([t for s, t in seen if s == 15][0].keys, runner.encode_text(b).keys))
    assert sampler.interpolation is None and sampler.events[0]["transition"] == "interpolate"


# ---------------------------------------------------------------------------------------------
# the text format


def test_take_lines_read_back():
    lines = [ScheduleLine(1, 1.5, "a red fox", "cut"),
             ScheduleLine(2, None, "a fox in a city", "interpolate", 4, frames=7, same_noise=True),
             ScheduleLine(3, 0.75, "neon rain", "recache", 3, "longlive"),
             ScheduleLine(4, 2.25, "the end", "blend", 6, same_noise=True)]
    text = format_schedule_text(lines, ["a take", "two  words"])
    assert text.splitlines()[:2] == ["# a take", "# two words"]
    assert "7 latent | a fox in a city | interpolate 4 | same noise" in text
    assert parse_schedule_text(text) == [ScheduleLine(n + 3, *[getattr(x, f) for f in (
        "seconds", "prompt", "transition", "transition_frames", "recache_mode", "frames", "same_noise")])
        for n, x in enumerate(lines)]


@pytest.mark.parametrize("bad,why", [
    ("3 | a | interpolate", "needs a chunk count"),
    ("3 | a | interpolate 0", "at least 1 chunk"),
    ("3 | a | cut | loud", "only '| same noise' may follow"),
    ("0 latent | a", "at least 1 latent frame"),
    ("1.5 latent | a", "not a whole number of latent frames"),
])
def test_new_syntax_errors_name_the_line(bad, why):
    with pytest.raises(ScheduleError, match=why) as e:
        parse_schedule_text("3 | first\n" + bad)
    assert "line 2 " in str(e.value)


def test_same_noise_cannot_start_a_story():
    with pytest.raises(ScheduleError, match="first line"):
        parse_schedule_text("3 | a | cut | same noise")
    with pytest.raises(ScheduleError, match="nothing comes before"):
        PromptSchedule((PromptSegment(encode("a"), frames=3, same_noise=True),)).noise_lengths()


def test_a_prompt_that_cannot_be_a_line_is_refused_when_written():
    with pytest.raises(ScheduleError, match="cannot be a schedule line"):
        ScheduleLine(1, 1.0, "a | b").text()


# ---------------------------------------------------------------------------------------------
# splicing a switch into the plan


def test_splice_keeps_every_frames_noise_draw():
    a, b, c = encode("a"), encode("b"), encode("c")
    plan = PromptSchedule((PromptSegment(a, frames=9), PromptSegment(b, frames=6, transition="blend", transition_frames=3),
                           PromptSegment(c, frames=6, same_noise=True)))
    out = splice(plan, 6, switch("d", "interpolate", 4))
    assert [(s.frames, s.transition, s.same_noise, s.text) for s in out] == [
        (6, "cut", False, None),                      # segment 1 cut short
        (3, "interpolate", True, "d"),                # the rest of segment 1's draw
        (12, "cut", False, "d")]                      # segments 2 + 3 were one draw: one piece
    assert PromptSchedule(out).noise_lengths() == [9, 12] == plan.noise_lengths()
    # at a segment's first frame the switch replaces it and starts its draw
    out = splice(plan, 9, switch("d"))
    assert [(s.frames, s.same_noise) for s in out] == [(9, False), (12, False)]
    with pytest.raises(ScheduleError, match="outside"):
        splice(plan, 21, switch("d"))


# ---------------------------------------------------------------------------------------------
# a steered run and its take


def _take(state, first_entry=0):
    text, problems = take_text(state.history[first_entry:], FPB, ["a take"])
    assert not problems, problems
    return text


def test_a_take_rerenders_bit_for_bit(tiny_model):
    """One prompt, steered twice (a cut, then Krea's interpolation); the take is ordinary schedule text."""
    plan = PromptSchedule((PromptSegment(encode("a red fox in snow"), frames=24, text="a red fox in snow"),))
    script = Script({3: switch("a fox in a neon city"), 5: switch("the fox at night", "interpolate", 4)})
    live_latents, live_state = run(tiny_model, plan, script)
    assert [a[:2] for a in script.asked] == [(k, 3 * (k - 1)) for k in range(1, 9)]  # asked before every chunk
    text = _take(live_state)
    assert text == ("# a take\n"
                    "1.5 | a red fox in snow | cut\n"
                    "1.5 | a fox in a neon city | cut | same noise\n"
                    "3 | the fox at night | interpolate 4 | same noise\n")
    assert [e["live"] for e in live_state.history] == [False, True, True]
    again, state = rerender(tiny_model, text)
    assert torch.equal(again, live_latents)
    # the switches are switches: the same latents as the first 6 frames of an unsteered run, then not
    plain, _ = run(tiny_model, plan)
    assert torch.equal(plain[:, :, :6], live_latents[:, :, :6]) and not torch.equal(plain, live_latents)
    assert take_text(state.history, FPB)[0].splitlines() == text.splitlines()[1:]


def test_a_switch_across_a_prepared_storys_draws(tiny_model):
    """A story of two prepared segments; the switch lands in the first: the take keeps the second's draw."""
    plan = PromptSchedule((PromptSegment(encode("a fox"), frames=12, text="a fox"),
                           PromptSegment(encode("a bird"), frames=9, transition="recache", transition_frames=3,
                                         text="a bird")))
    live_latents, live_state = run(tiny_model, plan, Script({2: switch("a wolf", "recache", 3, "block_causal")}))
    text = _take(live_state)
    assert text.splitlines()[1:] == ["0.75 | a fox | cut",
                                     "2.25 | a wolf | recache 3 block_causal | same noise",
                                     "2.25 | a wolf | cut"]
    again, _ = rerender(tiny_model, text)
    assert torch.equal(again, live_latents)


def test_a_switch_inside_a_blend_waits_for_its_end(tiny_model):
    plan = PromptSchedule((PromptSegment(encode("a"), frames=3, text="a"),
                           PromptSegment(encode("b"), frames=15, transition="blend", transition_frames=7, text="b")))
    script = Script({3: switch("c")})
    live_latents, state = run(tiny_model, plan, script)
    busy = [(chunk, frame) for chunk, frame, why in script.asked if why]
    assert busy == [(3, 6), (4, 9)] and "runs to latent frame 10" in script.asked[2][2]
    assert [(e["start"], e["transition"]) for e in state.history] == [(0, "cut"), (3, "blend"), (12, "cut")]
    assert state.history[2]["text"] == "c" and state.history[2]["live"]
    again, _ = rerender(tiny_model, _take(state))
    assert torch.equal(again, live_latents)


def test_a_state_taken_mid_interpolation_continues_it(tiny_model, tmp_path):
    """[A 6, B interpolate 4 (6 frames), B 6] in one run == [A 6, B interpolate 4 (6 frames)] then Continue
    [B 6], the state saved and loaded in between: the third segment (no switch) carries the interpolation on."""
    a, b = encode("a"), encode("b")
    whole = PromptSchedule((PromptSegment(a, frames=6), PromptSegment(b, frames=6, transition="interpolate",
                                                                     transition_frames=4), PromptSegment(b, frames=6)))
    one, _ = run(tiny_model, whole)
    part = PromptSchedule((PromptSegment(a, frames=6), PromptSegment(b, frames=6, transition="interpolate",
                                                                    transition_frames=4)))
    first, state = run(tiny_model, part)
    assert state.meta["interpolation"] == {"step": 2, "steps": 4} and "interp_source" in state.tensors
    state = load_state(save_state(state, tmp_path / "mid.safetensors"))
    rest = PromptSchedule((PromptSegment(b.clone(), frames=6),))
    more, after = continue_generation(tiny_model, state, rest, story_noise(rest, start=12))
    # a continuation equals one run to float32 rounding (the cache is copied into new slots: tests/core/test_state.py)
    assert rel_err(torch.cat([first, more], dim=2), one) < 1e-5
    assert "interpolation" not in after.meta and "interp_source" not in after.tensors
    # without the interpolation the state would jump to B at once: far from the one run
    from headforcing_core.state import ARState
    meta = dict(state.meta)
    del meta["interpolation"]
    bare = ARState(json.dumps(meta), {k: v for k, v in state.tensors.items() if k != "interp_source"})
    jumped, _ = continue_generation(tiny_model, bare, rest, story_noise(rest, start=12))
    assert rel_err(jumped, one[:, :, 12:]) > 100 * rel_err(more, one[:, :, 12:])


def test_take_of_a_prompt_without_text_says_so(tiny_model):
    plan = PromptSchedule((PromptSegment(encode("x"), frames=6),))
    _, state = run(tiny_model, plan, Script({2: switch("a fox")}))
    lines, problems = take_lines(state.history, FPB)
    assert problems and "without text" in problems[0] and lines[0].prompt == "(conditioning without text)"
    text, _ = take_text(state.history, FPB)
    assert text.startswith("# NOT exact as it stands: line 1's prompt")
