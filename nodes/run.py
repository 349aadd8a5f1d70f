"""The run sequence every node that runs the model shares: AR Sampler, Continue and Profile Heads.

One :class:`ModelRun` per node execution, in this order:

1. :meth:`ModelRun.load` — the pre-flight memory check and the model load (:func:`preflight`):
   refuse, naming the input that drives the cost, what cannot fit before anything is loaded or
   allocated, then load the weights whole and refuse what does not fit next to them;
2. the node prepares its inputs (noise, the initial latent in the model's space);
3. :meth:`ModelRun.call` — the core call with ComfyUI's progress bar, interrupt flag and chunk
   previews wired into the core's hooks (:class:`ComfyHooks`), the node's live panel told what
   the run will do (``nodes/messages.py``), the time it took, and ComfyUI's way of ending an
   interrupted node (:func:`run_interruptible`);
4. the node's report: :func:`memory_line`, :func:`finish_report` (the MODEL's patches, the log).

The multi-prompt glue Sampler and Continue share lives here too (:func:`story_noise`,
:func:`schedule_report`, :func:`story_panel`), so a schedule run and a chain of Continue nodes
draw the same noise and report alike.

Facts this module relies on (ComfyUI 0.3.75):

* The diffusion model works in the *normalized* latent space (``latent_format.process_in``:
  ``(x - mean) / std`` per channel for Wan 2.1). KSampler turns the LATENT it is given into
  that space before sampling and back with ``process_latent_out`` after. Our initial noise is
  already a sample of that space, so the core's output goes through ``process_latent_out``
  (``x * std + mean``) before it leaves as a LATENT that ``VAEDecode`` understands
  (:func:`latent_output`).
* Progress: ``comfy.utils.ProgressBar`` → the server's global hook, which sends a websocket
  ``progress`` message (and a preview image when one is attached) and *also* raises
  ``InterruptProcessingException`` when the interrupt flag is set.
* Interruption: ``comfy.model_management.processing_interrupted()`` is the flag POST
  /interrupt sets; ``throw_exception_if_processing_interrupted()`` clears it and raises.
* Previews: ``latent_preview.get_previewer(device, latent_format)`` honours the server's
  ``--preview-method`` (``auto`` → latent2rgb unless a TAE decoder is installed) and decodes
  a *normalized* latent.

ComfyUI is imported inside the functions that talk to it.
"""
from __future__ import annotations

import logging
import time

import torch

from headforcing_core.backbone import BackboneSpec
from headforcing_core.errors import Interrupted
from headforcing_core.memory import GiB, MiB, estimate_run, with_weights
from headforcing_core.memory import preflight as core_preflight
from headforcing_core.noise import noise_frames, segment_noise
from headforcing_core.prompts import PromptSchedule
from headforcing_core.sampler import Hooks
from headforcing_core.transitions import count_model_calls, default_recache_mode

from .comfy_bridge import describe_weights
from .messages import chunk_done, describe_run
from .model_patches import patch_report, unhonoured_patches

log = logging.getLogger("headforcing")


# ---------------------------------------------------------------------------------------------
# pre-flight and model load


def preflight(model, spec: BackboneSpec, estimate_at, *, latent_frames: int, latent_height: int,
              latent_width: int, min_frames: int, describe_length=None, describe_size=None,
              what: str = "the video", bounded_policy_hint: bool = False, extra_models=()):
    """The one pre-flight of every node that allocates: refuse (naming the input that drives the cost)
    what cannot fit in an empty device before evicting or loading anything, load the model, then
    refuse what does not fit next to its weights. Returns the run's estimate, its weights term the
    model as ComfyUI holds it loaded (``ModelPatcher.model_size()``: fp8 weights count one byte a
    parameter; :meth:`~headforcing_core.backbone.BackboneSpec.weights_bytes` restates it).

    ``estimate_at(latent_frames, latent_height, latent_width)`` is the run's
    :func:`~headforcing_core.memory.estimate_run` at another length or size. ``extra_models``: other
    ModelPatchers the run calls directly (Krea's context VAE), loaded together with the model so that
    nothing is loaded (and nothing unloaded) in the middle of the run; their weights count as weights,
    their workspace is ``estimate_at``'s."""
    import comfy.model_management as mm

    device = model.load_device
    weights = int(model.model_size()) + sum(int(m.model_size()) for m in extra_models)  # all loaded together
    kw = dict(latent_frames=latent_frames, latent_height=latent_height, latent_width=latent_width,
              patch=tuple(spec.patch_size[1:]), min_frames=min_frames, describe_length=describe_length,
              describe_size=describe_size, what=what, bounded_policy_hint=bounded_policy_hint)
    est = core_preflight(lambda t, h, w: with_weights(estimate_at(t, h, w), weights),
                         free_bytes=mm.get_total_memory(device), **kw)
    mm.load_models_gpu([model, *extra_models], memory_required=est.run_bytes, force_full_load=True)
    # free memory is counted next to the loaded weights; the estimate keeps them for the report
    return with_weights(core_preflight(estimate_at, free_bytes=mm.get_free_memory(device), **kw), weights)


# ---------------------------------------------------------------------------------------------
# progress, interrupt, previews


class ComfyHooks:
    """Core hooks wired to ComfyUI: progress bar, interrupt flag, per-chunk previews, chunk timing."""

    def __init__(self, model, total_calls: int):
        import comfy.model_management
        import comfy.utils
        import latent_preview

        self._mm = comfy.model_management
        self.pbar = comfy.utils.ProgressBar(total_calls)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        self.done = 0
        self.total = total_calls
        self.chunk_seconds: list[float] = []
        self._chunk_started = time.perf_counter()

    @property
    def core(self) -> Hooks:
        """The core's :class:`~headforcing_core.sampler.Hooks` calling these."""
        return Hooks(self.progress, self.should_stop, self.on_chunk)

    def progress(self, done: int, total: int) -> None:
        self.done = done
        self.pbar.update_absolute(done, total)

    def should_stop(self) -> bool:
        return self._mm.processing_interrupted()

    def on_chunk(self, index: int, x0: torch.Tensor) -> None:
        now = time.perf_counter()
        self.chunk_seconds.append(now - self._chunk_started)
        self._chunk_started = now
        chunk_done(x0)  # the node's live panel in the browser, if one is open (nodes/messages.py)
        if self.previewer is None:
            return
        # the chunk's newest latent frame (normalized space, what the previewers expect)
        preview = self.previewer.decode_latent_to_preview_image("JPEG", x0[:1, :, -1:].float())
        self.pbar.update_absolute(self.done, self.total, preview)


def run_interruptible(fn, hooks: ComfyHooks):
    """Run a core call whose hooks watch ComfyUI's interrupt flag, and end the node the way
    ComfyUI expects when it is set: the core's ``should_stop`` hook (before every model call)
    raises :class:`Interrupted`, ComfyUI's progress hook (after every call) raises its own
    ``InterruptProcessingException``; both leave the server ready for the next prompt."""
    import comfy.model_management as mm

    try:
        return fn()
    except (Interrupted, mm.InterruptProcessingException) as e:
        log.info("headforcing: interrupted after %d of %d model calls", hooks.done, hooks.total)
        if isinstance(e, mm.InterruptProcessingException):
            raise
        mm.throw_exception_if_processing_interrupted()  # clears the flag and raises
        raise mm.InterruptProcessingException() from None


# ---------------------------------------------------------------------------------------------
# the sequence


class ModelRun:
    """One node's run of the model: :meth:`load` (pre-flight, load), then :meth:`call` (the core call).

    After :meth:`call`: ``estimate`` (the pre-flight's), ``seconds`` (the core call's wall time),
    ``chunk_seconds`` (per committed chunk), ``device`` and ``dtype``."""

    def __init__(self, model, estimate, dtype: torch.dtype):
        self.model = model
        self.estimate = estimate
        self.dtype = dtype
        self.device = model.load_device
        self.seconds = 0.0
        self.chunk_seconds: list[float] = []

    @classmethod
    def load(cls, model, spec: BackboneSpec, estimate_at, *, dtype: torch.dtype, **preflight_kw) -> "ModelRun":
        """Pre-flight and load (:func:`preflight`'s keywords); nothing is loaded when the run cannot fit."""
        return cls(model, preflight(model, spec, estimate_at, **preflight_kw), dtype)

    def call(self, work, *, model_calls: int, panel: dict | None = None):
        """``work(hooks)`` — the core call, given the core :class:`~headforcing_core.sampler.Hooks` — with
        ComfyUI's progress bar over ``model_calls`` calls, its interrupt flag and previews; ``panel``: what
        the node's live panel shows (:func:`story_panel`; the KV budget is the pre-flight's). Returns what
        ``work`` returns."""
        hooks = ComfyHooks(self.model, model_calls)
        if panel is not None:
            describe_run(**panel, kv_budget_bytes=self.estimate.kv_bytes)
        started = time.perf_counter()
        out = run_interruptible(lambda: work(hooks.core), hooks)
        self.seconds = time.perf_counter() - started
        self.chunk_seconds = hooks.chunk_seconds
        return out

    def latent_output(self, latents: torch.Tensor) -> dict:
        """The core's latents (the model's normalized space) as a LATENT for VAEDecode."""
        import comfy.model_management as mm

        return {"samples": self.model.model.process_latent_out(latents.float()).to(mm.intermediate_device())}

    def computed_on(self) -> str:
        """``"cpu in float32"``: the device and dtype the run computed on."""
        return f"{self.device} in {str(self.dtype).replace('torch.', '')}"


# ---------------------------------------------------------------------------------------------
# reports


def memory_line(run: ModelRun) -> str:
    """The report's memory line: the pre-flight's estimate, and the weights as loaded (and in which format)."""
    est = run.estimate
    return (f"memory estimate: {est.breakdown()}; peak ≈ {est.run_bytes / GiB:.3f} GiB ({est.peak_phase}) + "
            f"weights {est.weights_bytes / MiB:.1f} MiB as loaded ({describe_weights(run.model)})")


def model_patch_lines(model) -> list[str]:
    """The MODEL's patches for the report: the LoRA / weight patches applied, and every patch the
    sampler does not apply (nodes/model_patches.py), each also logged as a warning."""
    for note in unhonoured_patches(model):
        log.warning("headforcing: model patch not applied: %s", note)
    return patch_report(model)


def finish_report(model, lines: list[str]) -> str:
    """The report: ``lines`` (empty ones dropped) and the MODEL's patches; logged on one line."""
    report = "\n".join(line for line in [*lines, *model_patch_lines(model)] if line)
    log.info("headforcing: %s", report.replace("\n", " | "))
    return report


# ---------------------------------------------------------------------------------------------
# multi-prompt glue shared by the sampler and Continue


def story_noise(shape_of, seed: int, start_frame: int, schedule: PromptSchedule) -> torch.Tensor:
    """The initial noise of ``schedule``'s segments from ``start_frame`` on: the segment covering latent
    frames ``[s, e)`` starts from frames ``s…e-1`` of the noise a fresh run of ``e`` frames would draw with
    the same seed. So with the sampler's seed on every Continue, Sampler(A) → Continue(B) → Continue(C)
    gives what one Sampler run of the schedule [A, B, C] gives. Each segment's frames are drawn on their
    own (same values as the whole draw, bounded memory); a segment marked ``same_noise`` goes on with the
    draw of the one before (a live switch's line in a take)."""
    return segment_noise(lambda s, e: noise_frames(shape_of, seed, s, e), start_frame, schedule.noise_lengths())


def story_model_calls(schedule: PromptSchedule, frames_per_block: int, steps: int, *, first_steps: int | None = None,
                      start_frame: int = 0, context=None, tail_frames: int = 0, policy=None) -> int:
    """Model calls of a schedule run; from ``start_frame`` on, after a cache that already holds frames (an AR_STATE
    or an initial latent) whose prompt was ``context`` and ``tail_frames`` of whose latents a recache may re-run."""
    where = {} if not start_frame else dict(start_frame=start_frame, context=context, started=True,
                                            tail_frames=tail_frames)
    return count_model_calls(schedule, frames_per_block, steps, first_steps=first_steps,
                             default_mode=default_recache_mode(policy), **where)


def schedule_report(schedule: PromptSchedule, start_frame: int = 0, default_mode: str | None = None) -> str:
    """The schedule's segments for a report (nothing for one segment from frame 0); ``default_mode``: the
    recache mode a recache segment that names none gets (said next to it)."""
    if len(schedule) == 1 and start_frame == 0:
        return ""
    lines = [f"prompt schedule ({len(schedule)} segment{'s' if len(schedule) > 1 else ''}):"]
    pos = start_frame
    for i, seg in enumerate(schedule):
        text = seg.describe(default_mode)
        lines.append(f"  {i + 1}. latent frames {pos}-{pos + seg.frames - 1}: {text}")
        pos += seg.frames
    return "\n".join(lines)


def text_encoder(clip) -> list:
    """The model behind a CLIP (its ModelPatcher) for :func:`preflight`'s ``extra_models``; [] for none."""
    patcher = getattr(clip, "patcher", None)
    return [patcher] if patcher is not None and hasattr(patcher, "model_size") else []


def story_panel(model, spec: BackboneSpec, policy, schedule: PromptSchedule, *, start_frame: int,
                frames_per_block: int, latent_size: tuple[int, int], width: int, height: int, dtype: torch.dtype,
                batch: int = 1, live=None) -> dict:
    """What the sampler's live panel shows of a schedule run (:meth:`ModelRun.call`'s ``panel``): chunk k of n,
    seconds, the segment, and the KV cache in use after each chunk; ``live`` (a ``nodes/live.py`` LiveRun):
    what its prompt box may send."""
    h, w = latent_size
    return dict(
        total_latent_frames=schedule.total_frames, start_frame=start_frame, frames_per_block=frames_per_block,
        policy=policy.preset, latent_format=model.model.latent_format,
        segments=[(seg.label or seg.text or "", seg.frames) for seg in schedule],
        kv_bytes_at=lambda n: estimate_run(spec, policy, latent_frames=max(1, n), latent_height=h, latent_width=w,
                                           frames_per_block=frames_per_block, batch=batch, dtype=dtype).kv_bytes,
        width=width, height=height, live=live.panel_info() if live is not None else None)
