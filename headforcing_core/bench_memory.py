"""The peak memory of a run, measured where it happens (``python -m headforcing_core.bench --memory``).

:func:`measure_run` runs what the AR Sampler node runs — :func:`~headforcing_core.story.generate_schedule`
over a two-prompt story (a cut half-way) from noise it draws itself, capturing the AR_STATE at the end — and
measures the bytes it allocates, without the weights and the prompts' text-encoder outputs (made
before it, as in a graph):

* on a CPU, with :class:`~headforcing_core.memtrack.AllocationTracker` (every storage an op makes,
  until it is freed): the peak of the run and of each phase;
* on CUDA, from the allocator: ``torch.cuda.max_memory_allocated`` above what was allocated before,
  per phase (the peak statistics reset as each phase starts), and a memory-history snapshot replayed to
  the moment of the peak: the largest allocations live then, with the line of this package that made
  each (:func:`largest_at_peak`).

Phases: ``start`` (the cache allocated), ``prompt`` (a prompt encoded; the second one is the switch),
``plan``, ``model_calls``, ``commit``, ``recache``, ``capture`` (the AR_STATE copied off the device).
Next to each measurement is the pre-flight estimate of the same run
(:func:`~headforcing_core.memory.estimate_run`), whose peak must come within −5 % / +15 % of it.
"""

from __future__ import annotations

import contextlib
import time

import torch

from . import sampler as sampler_module
from . import story, story_sampler
from .backbone import WanRunner
from .cache import HeadwiseKVCache
from .memory import estimate_run
from .memtrack import AllocationTracker
from .policies import CachePolicy, make_policy
from .prompts import PromptSchedule, PromptSegment
from .sampler import ARSampler
from .story_sampler import ScheduleSampler
from .transitions import planned_recaches

PHASES = ("start", "prompt", "plan", "model_calls", "commit", "recache", "capture")
HISTORY_ENTRIES = 200_000  # CUDA memory-history events kept (the replay needs the whole run)


@contextlib.contextmanager
def _phases(enter):
    """Route the run's steps through ``enter(phase)`` (a context manager) while the block runs."""
    patches = [
        (ARSampler, "start", "start"), (ARSampler, "set_prompt", "prompt"),
        (sampler_module, "plan_chunk", "plan"), (story_sampler, "plan_chunk", "plan"),
        (WanRunner, "forward", "model_calls"), (HeadwiseKVCache, "commit", "commit"),
        (ScheduleSampler, "recache", "recache"), (ScheduleSampler, "recache_longlive", "recache"),
        (story, "capture_state", "capture"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]

    def wrap(fn, phase):
        def wrapped(*args, **kwargs):
            with enter(phase):
                return fn(*args, **kwargs)
        return wrapped

    try:
        for (owner, name, phase), (_, _, fn) in zip(patches, saved):
            setattr(owner, name, wrap(fn, phase))
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _story(contexts: list[torch.Tensor], frames: int, frames_per_block: int, switch: PromptSegment | None = None
           ) -> PromptSchedule:
    """Two prompts, the switch at the chunk nearest half-way (one prompt for a one-chunk video); ``switch``
    gives the second segment's transition (default: a cut)."""
    chunks = frames // frames_per_block
    if len(contexts) < 2 or chunks < 2:
        return PromptSchedule((PromptSegment(contexts[0], frames),))
    first = chunks // 2 * frames_per_block
    how = {"transition": "cut"} if switch is None else {
        "transition": switch.transition, "transition_frames": switch.transition_frames,
        "recache_mode": switch.recache_mode}
    return PromptSchedule((PromptSegment(contexts[0], first), PromptSegment(contexts[1], frames - first, **how)))


def measure_run(backbone: torch.nn.Module, policy: str | CachePolicy, contexts: list[torch.Tensor], *,
                latent_frames: int, latent_height: int, latent_width: int, frames_per_block: int = 3,
                dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                attention_backend: str = "auto", seed: int = 0, switch: PromptSegment | None = None) -> dict:
    """Peak bytes of one run (see the module docstring) and its estimate, as a JSON-able dict. ``switch``: a
    segment whose transition (and recache mode) the switch half-way uses; default a cut."""
    pol = make_policy(policy) if isinstance(policy, str) else policy
    runner = WanRunner(backbone, dtype=dtype, device=device)
    dev, dt = runner.device, runner.dtype
    schedule = _story([c.to(dev, dt) for c in contexts], latent_frames, frames_per_block, switch)
    recaches = planned_recaches(schedule, frames_per_block, pol)
    shape = (1, runner.spec.in_dim, latent_frames, latent_height, latent_width)

    def run():
        g = torch.Generator(device=dev).manual_seed(seed)
        noise = torch.randn(shape, generator=g, device=dev)
        out, state = story.generate_schedule(backbone, schedule, noise, frames_per_block=frames_per_block,
                                             policy=pol, generator=g, attention_backend=attention_backend,
                                             dtype=dt, device=dev)
        return out, state

    t0 = time.perf_counter()
    if dev.type == "cuda":
        measured = _measure_cuda(run, dev)
    else:
        measured = _measure_tracker(run, dev)
    measured["seconds"] = round(time.perf_counter() - t0, 3)
    def estimate(state_on_device: bool):
        return estimate_run(runner.spec, pol, latent_frames=latent_frames, latent_height=latent_height,
                            latent_width=latent_width, frames_per_block=frames_per_block, dtype=dt,
                            state_on_device=state_on_device, text_tokens=max(c.shape[1] for c in contexts),
                            prompts=len(schedule), recaches=recaches)

    est = estimate(dev.type == "cpu")
    measured["estimate"] = {"run_bytes": est.run_bytes, "peak_phase": est.peak_phase, "phases": est.phases,
                            "parts": est.parts()}
    measured["estimate_over_measured"] = est.run_bytes / max(measured["peak_bytes"], 1)
    # the peak before the AR_STATE is captured: what a GPU holds, whose state goes to the host
    device_phases = [p["peak_bytes"] for name, p in measured["phases"].items() if name != "capture"]
    measured["device_peak_bytes"] = max(device_phases) if device_phases else measured["peak_bytes"]
    device_est = estimate(False)
    measured["device_estimate"] = {"run_bytes": device_est.run_bytes, "peak_phase": device_est.peak_phase,
                                   "phases": device_est.phases}
    measured["device_estimate_over_measured"] = device_est.run_bytes / max(measured["device_peak_bytes"], 1)
    measured["kv_bytes"] = est.kv_bytes
    return measured


def _measure_tracker(run, dev: torch.device) -> dict:
    with torch.no_grad(), AllocationTracker(device=dev.type) as tracker, _phases(tracker.phase):
        out, state = run()
        del out, state
    report = tracker.report()
    report["method"] = "allocation tracker (TorchDispatchMode)"
    return report


def _measure_cuda(run, dev: torch.device) -> dict:
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    peaks: dict[str, int] = {}
    overall = [0]

    @contextlib.contextmanager
    def enter(phase):
        torch.cuda.synchronize(dev)
        overall[0] = max(overall[0], torch.cuda.max_memory_allocated(dev))
        torch.cuda.reset_peak_memory_stats(dev)
        try:
            yield
        finally:
            torch.cuda.synchronize(dev)
            p = torch.cuda.max_memory_allocated(dev)
            peaks[phase] = max(peaks.get(phase, 0), p - base)
            overall[0] = max(overall[0], p)
            torch.cuda.reset_peak_memory_stats(dev)

    torch.cuda.reset_peak_memory_stats(dev)
    torch.cuda.memory._record_memory_history(max_entries=HISTORY_ENTRIES)
    try:
        with torch.no_grad(), _phases(enter):
            out, state = run()
            del out, state
        torch.cuda.synchronize(dev)
        overall[0] = max(overall[0], torch.cuda.max_memory_allocated(dev))
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return {"method": "torch.cuda.max_memory_allocated above the weights", "peak_bytes": overall[0] - base,
            "phases": {k: {"peak_bytes": v} for k, v in peaks.items()},
            "largest_at_peak": largest_at_peak(snapshot, dev.index or 0)}


def largest_at_peak(snapshot: dict, device: int = 0, top: int = 12) -> list[dict]:
    """Replay a CUDA memory-history snapshot's trace (``torch.cuda.memory._snapshot()``): the ``top``
    largest allocations live when the allocated bytes peaked, each with the innermost frame of this package
    (else the innermost frame) that made it."""
    traces = snapshot.get("device_traces", [])
    events = traces[device] if device < len(traces) else []
    live: dict[int, dict] = {}
    total = best = 0
    at_best: list[dict] = []
    for ev in events:
        action, addr, size = ev.get("action"), ev.get("addr"), int(ev.get("size", 0))
        if action == "alloc":
            live[addr] = ev
            total += size
            if total > best:
                best = total
                at_best = sorted(live.values(), key=lambda e: -int(e.get("size", 0)))[:top]
        elif action in ("free_requested", "free") and addr in live:
            total -= int(live.pop(addr).get("size", 0))
    return [{"bytes": int(e.get("size", 0)), "where": _call_site(e.get("frames", []))} for e in at_best]


def _call_site(frames: list[dict]) -> str:
    ours = [f for f in frames if "headforcing_core" in f.get("filename", "")]
    f = (ours or frames or [{}])[0]
    return f"{f.get('filename', '?').split('headforcing_core')[-1].lstrip('/')}:{f.get('line', '?')} " \
           f"{f.get('name', '')}".strip()
