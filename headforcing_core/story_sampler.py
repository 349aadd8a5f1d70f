"""The schedule sampler: an AR sampler that runs a prompt schedule, transitions included.

:class:`ScheduleSampler` extends :class:`~headforcing_core.sampler.ARSampler` with the current prompt,
the last committed latents (for a recache) and a log of the transitions applied. It carries out the
plan of :mod:`headforcing_core.transitions` (``cut``, ``recache`` in its three modes, ``blend``,
``interpolate``; their meaning is in :mod:`headforcing_core.prompts`) and the live switches of
:mod:`headforcing_core.live`. Whole runs and continuations, with their AR_STATE,
are :mod:`headforcing_core.story`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .errors import ShapeError
from .geometry import chunk_bounds
from .memory import TAIL_FRAMES
from .chunk_attention import ChunkAttention
from .plan import plan_chunk
from .prompts import LONGLIVE_SINK, LONGLIVE_WINDOW, PromptSchedule
from .retention import ChunkKeys, Key
from .sampler import ARSampler, Hooks
from .transitions import (Interpolation, SegmentPlan, blend_text, blend_weight, count_model_calls,
                          default_recache_mode, plan_segments)
from .live import LiveInput, LiveSwitch, splice


@dataclass
class ScheduleSampler(ARSampler):
    """An :class:`~headforcing_core.sampler.ARSampler` that runs prompt schedules.

    Besides the sampler state it remembers the current prompt's conditioning
    (``context``), an interpolation in progress (``interpolation``) and the last committed
    latents (``tail``, up to 21 frames, for ``recache``). ``events`` logs every transition applied:
    ``{"frame", "transition", "switch", "frames", "replaced"}``.

    Chunk by chunk: a segment's chunks start at its first frame; before each, the text in effect is
    set (a blend's mix of cross-attention K/V, an interpolation's next embedding) and, in a live run,
    the :class:`~headforcing_core.live.LiveInput` is asked for a switch.
    """

    context: torch.Tensor | None = None
    tail: torch.Tensor | None = None
    events: list = field(default_factory=list)
    interpolation: Interpolation | None = None  # an interpolate transition in progress
    executed: PromptSchedule | None = None  # what the last run_schedule made (live switches included)
    live_frames: list = field(default_factory=list)  # frames where a live switch was made

    # ---- planning --------------------------------------------------------------------------
    def plan_schedule(self, schedule: PromptSchedule) -> list[SegmentPlan]:
        return plan_segments(schedule, self.frames_per_block, **self._where())

    def schedule_model_calls(self, schedule: PromptSchedule, start_frame: int | None = None) -> int:
        """Model calls running ``schedule`` makes from here (or, for a run that first puts ``start_frame``
        initial frames into the cache, from there)."""
        first = len(self.first_noise_schedule.timesteps) if (self.first_noise_schedule is not None
                                                              and self.chunks_generated == 0) else None
        where = self._where()
        if start_frame is not None:
            where["start_frame"] = start_frame
        return count_model_calls(schedule, self.frames_per_block, len(self.noise_schedule.timesteps),
                                 first_steps=first, **where)

    def _where(self) -> dict:
        return dict(start_frame=self.next_frame, context=self.context, started=self.text is not None,
                    tail_frames=0 if self.tail is None else self.tail.shape[2],
                    default_mode=default_recache_mode(self.policy))

    # ---- running ---------------------------------------------------------------------------
    @torch.no_grad()
    def run_schedule(self, schedule: PromptSchedule, noise: torch.Tensor, generator: torch.Generator | None = None,
                     hooks: Hooks | None = None, calls_done: int = 0, calls_total: int | None = None,
                     live: LiveInput | None = None) -> torch.Tensor:
        """Generate every segment of ``schedule`` (noise ``[B, C, total, H, W]``), continuing from the cache.

        Call :meth:`start` first (and nothing else: the first segment sets the prompt), or
        restore the sampler from an AR_STATE. ``live`` is asked before every chunk for a prompt switch
        (:mod:`headforcing_core.live`); what the run made, switches included, is ``executed`` afterwards.
        """
        if self.cache is None:
            raise RuntimeError("call start() before run_schedule()")
        hooks = hooks or Hooks()
        plans = self.plan_schedule(schedule)
        first = plans[0].start
        total_frames = sum(p.segment.frames for p in plans)
        if noise.ndim != 5 or noise.shape[2] != total_frames:
            raise ShapeError(f"noise {tuple(noise.shape)} does not cover the schedule's {total_frames} latent frames")
        total = calls_total or (calls_done + self.schedule_model_calls(schedule))
        done = calls_done
        out = torch.empty_like(noise, device=self.runner.device)
        i, switched_at = 0, None
        while i < len(plans):
            p = plans[i]
            done, made, switch = self._run_segment(p, noise, out, first, generator, hooks, done, total,
                                                   live if p.start != switched_at else _AskAfter(live, p.start))
            if switch is None:
                i += 1
                continue
            # a live switch at the chunk boundary after `made` frames of this segment: the rest of the plan is new
            rest = PromptSchedule(tuple(q.segment for q in plans[i:]))
            spliced = splice(rest, made, switch)
            kept = [replace(p, segment=spliced[0])] if made else []
            pieces = PromptSchedule(spliced[len(kept):])
            plans = plans[:i] + kept + self.plan_schedule(pieces)
            switched_at = p.start + made
            self.live_frames.append(switched_at)
            total = done + self.schedule_model_calls(pieces)
            i += len(kept)
        self.executed = PromptSchedule(tuple(p.segment for p in plans))
        return out.to(noise.device)

    def _run_segment(self, p: SegmentPlan, noise, out, first: int, generator, hooks: Hooks, done: int, total: int,
                     live: LiveInput | None) -> tuple[int, int, LiveSwitch | None]:
        """Enter segment ``p`` and make its chunks; returns (calls done, frames made, None), or, when ``live``
        switches before one of its chunks, (calls done, frames made so far, the switch) with nothing entered
        or made for the chunk."""
        seg = p.segment
        blend = p.switch and seg.transition == "blend"
        # a blend reads the previous prompt's K/V over its frames; nothing else keeps them past a switch
        previous, new_text, entered = self.text if blend else None, None, False
        for s, f in chunk_bounds(0, seg.frames, self.frames_per_block):
            if live is not None:
                busy = (f"the blend into this prompt runs to latent frame {p.start + seg.transition_frames}"
                        if entered and blend and s < seg.transition_frames else None)
                switch = live.poll(p.start + s, busy)
                if switch is not None and busy is None:
                    return done, s, switch
            if not entered:
                done = self._enter(p, hooks, done, total)
                new_text, entered = self.text, True
            if blend:
                self.text = (blend_text(previous, new_text, blend_weight(s, f, seg.transition_frames))
                             if s < seg.transition_frames else new_text)
            elif self.interpolation is not None:
                self.text = self.runner.encode_text(self.interpolation.next_context())
                if self.interpolation.done:
                    self.interpolation = None
            local = p.start - first + s
            done = self._sample(noise[:, :, local:local + f], generator, hooks, done, total,
                                out[:, :, local:local + f])
        if blend:
            self.text = new_text
        return done, seg.frames, None

    def embedding(self) -> torch.Tensor | None:
        """The text-encoder output of the last chunk made: the prompt's, or mid-interpolation the one in effect."""
        return self.interpolation.current() if self.interpolation is not None else self.context

    def _sample(self, noise, generator, hooks: Hooks, done: int, total: int, out: torch.Tensor) -> int:
        """Sample frames into ``out`` (a view of the run's output; chunk indexes of ``on_chunk`` run on across
        segments); returns the model calls done."""
        offset = self.chunks_generated
        calls = self.total_model_calls(noise.shape[2])
        on_chunk = hooks.on_chunk
        wrapped = Hooks(hooks.progress, hooks.should_stop,
                        (lambda i, x0: on_chunk(offset + i, x0)) if on_chunk is not None else None)
        self.sample(noise, generator, wrapped, done, total, out=out)
        self.remember(out)
        return done + calls

    def remember(self, latents: torch.Tensor) -> None:
        """Keep (a copy of) the newest committed latents, up to 21 frames, for a later recache."""
        new = latents[:, :, -TAIL_FRAMES:]
        if self.tail is not None:
            new = torch.cat([self.tail.to(latents.device, latents.dtype), new], dim=2)[:, :, -TAIL_FRAMES:]
        self.tail = new.clone(memory_format=torch.contiguous_format)

    def _enter(self, p: SegmentPlan, hooks: Hooks, done: int, total: int) -> int:
        seg = p.segment
        if self.text is None:
            self.set_prompt(seg.context)
            self.context = seg.context
            return done
        if not p.switch:  # the same prompt goes on (an interpolation towards it too)
            self.context = seg.context
            return done
        # a switch: an interpolation sets off from the embedding in effect; any other ends one in progress
        self.interpolation = (Interpolation(self.embedding(), seg.context, seg.transition_frames)
                              if seg.transition == "interpolate" else None)
        self.set_prompt(seg.context)  # the cache's memory heads open a new episode
        self.context = seg.context
        event = {"frame": self.next_frame, "transition": seg.transition, "switch": True,
                 "frames": seg.transition_frames if seg.transition != "cut" else 0, "replaced": 0}
        if seg.transition == "recache" and p.recache:
            if p.mode == "block_causal":
                done, event["replaced"] = self.recache(p.recache, hooks, done, total)
            else:
                done, event["replaced"] = self.recache_longlive(LONGLIVE_WINDOW, p.mode == "longlive", hooks,
                                                                done, total)
            event["frames"] = p.recache
            event["mode"] = p.mode
        self.events.append(event)
        return done

    @torch.no_grad()
    def recache(self, frames: int, hooks: Hooks | None = None, done: int = 0, total: int = 0) -> tuple[int, int]:
        """Re-run the last ``frames`` committed frames at t = 0 under the current prompt (LongLive).

        Returns (model calls done, cache entries replaced). See :mod:`headforcing_core.prompts`.
        """
        hooks = hooks or Hooks()
        if self.tail is None or self.cache is None:
            return done, 0
        n = min(int(frames), self.next_frame, self.tail.shape[2])
        if n <= 0:
            return done, 0
        start = self.next_frame - n
        latents = self.tail[:, :, -n:]
        b = latents.shape[0]
        cache, pol = self.cache, self.policy
        replaced = 0
        for s, f in chunk_bounds(start, n, self.frames_per_block):
            done = self._call_model_checked(hooks, done, total)
            keys = {ts.head_type: ts.tracker.history_keys(s, f) for ts in cache.types}
            self.last_plan = None
            plan = plan_chunk(cache, pol.rope, pol.window, pol.clamp_min, pol.clamp_max, s, f, keys=keys,
                              episodes_before=s, gather_prerotated=True)
            self.last_plan = plan
            # the clean pass rewrites the re-run frames wherever they are held whole, layer by layer
            self.runner.forward(latents[:, :, s - start:s - start + f], torch.zeros(b, f, device=self.runner.device),
                                self.text, ChunkAttention(plan, cache, self.backend, "clean", self.observer),
                                hooks.should_stop)
            plan.release()
            replaced += cache.held_whole(s, f)
            self._report(hooks, done, total)
        return done, replaced

    @torch.no_grad()
    def recache_longlive(self, window: int = LONGLIVE_WINDOW, global_sink: bool = True, hooks: Hooks | None = None,
                         done: int = 0, total: int = 0) -> tuple[int, int]:
        """LongLive's released recache (``pipeline/interactive_causal_inference.py`` ``_recache_after_switch``) at
        the switch frame ``s = next_frame``: one model call at timestep 0 under the new prompt, absolute positions,
        no mask (the block-causal mask it builds is never used by the KV-cache branch; LongLive issue #19):

        * ``s <= window``: frames ``[0, s)`` attend each other; all of their stored K/V are rewritten, the sink
          frames included;
        * past the window, with the global sink: frames ``[s - (window - 3), s)`` attend the 3 sink frames (their
          stored, old-prompt K/V) and each other; their K/V are rewritten, the sink keeps its own;
        * past the window, without it (``global_sink=False``): frames ``[s - window, s)`` attend each other and are
          all rewritten, and their first 3 become the sink until the next switch.

        Returns (model calls done, stored frame entries rewritten)."""
        hooks = hooks or Hooks()
        s = self.next_frame
        if self.tail is None or self.cache is None or s == 0:
            return done, 0
        sink = LONGLIVE_SINK
        if s <= window:
            first, attend_sink, new_sink = 0, False, None
        elif global_sink:
            first, attend_sink, new_sink = s - (window - sink), True, None
        else:
            first, attend_sink, new_sink = s - window, False, list(range(s - window, s - window + sink))
        first = max(first, s - self.tail.shape[2])
        n = s - first
        if n <= 0:
            return done, 0
        cache = self.cache
        keys = {}
        for ts in cache.types:
            held = [Key("frame", f, float(f), "sink", True) for f in range(sink)
                    if attend_sink and f in ts.frames.page_of]
            one = tuple(held + [Key("chunk", j, float(first + j), "recent") for j in range(n)])
            keys[ts.head_type] = ChunkKeys(first, n, (one,) * n, (one,) * n)
        done = self._call_model_checked(hooks, done, total)
        if new_sink is not None:  # before planning: the pass writes the new sinks into their pages
            cache.move_sinks(new_sink)
        self.last_plan = None
        plan = plan_chunk(cache, "absolute", self.policy.window, self.policy.clamp_min, self.policy.clamp_max, first, n,
                          keys=keys, gather_prerotated=True)
        self.last_plan = plan
        latents = self.tail[:, :, self.tail.shape[2] - n:]
        self.runner.forward(latents, torch.zeros(latents.shape[0], n, device=self.runner.device), self.text,
                            ChunkAttention(plan, cache, self.backend, "clean", self.observer), hooks.should_stop)
        plan.release()
        replaced = cache.held_whole(first, n)
        self._report(hooks, done, total)
        return done, replaced


class _AskAfter:
    """A live input not asked again before the chunk at ``frame`` (a switch was just made there)."""

    def __init__(self, live: LiveInput | None, frame: int):
        self.live, self.frame = live, frame

    def poll(self, frame: int, busy: str | None) -> LiveSwitch | None:
        return None if self.live is None or frame == self.frame else self.live.poll(frame, busy)
