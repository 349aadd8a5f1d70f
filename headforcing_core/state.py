"""AR_STATE: a finished run's committed cache and position, to continue it later.

An :class:`ARState` holds everything needed to extend a video exactly as if the run
had not stopped:

* the committed head-wise KV cache (every tier of every head group: slot buffers and
  the bookkeeping of which slot holds which frames, episodes, merge accumulators);
* the next frame index, the RNG state of the re-noising generator;
* the policy (labels included), the schedule settings (steps, shift,
  frames_per_block), batch, latent size and channels, the cache dtype;
* the model fingerprint (:meth:`BackboneSpec.fingerprint`) and a digest of a few
  weights (a mismatch of the digest only warns: LoRA-patched weights differ);
* the current prompt's conditioning and the last ≤ 21 latents (for ``recache`` and
  ``blend`` transitions of the next segment, and to tell a prompt switch apart
  from "same prompt, keep going"); the log of segments generated so far.

States are immutable from the outside: every tensor is a private CPU copy, the
bookkeeping is a JSON string, and continuing copies the cache into freshly
allocated device buffers first, so the input state is never changed and two
continuations of one state are independent. Between nodes a state lives in CPU
memory (its size is the cache's: the policy's budget, see ``memory.estimate_run``).

The ``full`` policy's all-frames tier is allocated for the frames of one run; a
continuation allocates it for old + new frames and copies the old frames in — one
copy of the whole cache per continuation (which happens anyway when a state moves
from CPU back to the device), and the device then holds old + new frames.

Files: safetensors (tensors, names ``cache.l{layer}.g{group}.{tier}…``, ``context``,
``tail``, ``rng``) with the JSON bookkeeping under the metadata key
``headforcing_state`` (``format``, ``version``, settings, policy, cache layout).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import torch

from .backbone import BackboneSpec, WanRunner
from .errors import HeadForcingError, StateError
from .errors import PolicyError
from .policies import CachePolicy
from .policies import policy_from_dict as _policy_from_dict
from .policies import policy_to_dict  # noqa: F401 (re-export: the one policy codec lives with the policy)
from .prompts import PromptSchedule, ScheduleSampler, as_schedule
from .geometry import chunk_bounds, video_frames_for
from .sampler import Hooks, build_sampler, validate_initial_latent, validate_inputs
from .schedule import SELF_FORCING_SHIFT, SELF_FORCING_STEPS, FlowMatchSchedule

log = logging.getLogger("headforcing")

from .state_format import STATE_FORMAT, STATE_META_KEY, STATE_SUFFIX, STATE_VERSION  # noqa: F401 (re-export)


# ---------------------------------------------------------------------------------------------
# policy <-> JSON

def policy_from_dict(d: Mapping) -> CachePolicy:
    """A state's policy record (:func:`headforcing_core.policies.policy_from_dict`), as a :class:`StateError`."""
    try:
        return _policy_from_dict(d)
    except PolicyError as e:
        raise StateError(f"the AR_STATE's {e}") from None


# ---------------------------------------------------------------------------------------------
# model identity


def weights_digest(module: torch.nn.Module) -> str | None:
    """A short digest of a few weights (first values of the patch embedding, first q and the head)."""
    try:
        h = hashlib.sha256()
        for w in (module.patch_embedding.weight, module.blocks[0].self_attn.q.weight, module.head.head.weight):
            h.update(w.detach().reshape(-1)[:4096].to("cpu", torch.float32).numpy().tobytes())
        return h.hexdigest()[:16]
    except Exception:  # noqa: BLE001 - a digest is a courtesy check; never fail a run over it
        return None


def _describe_fingerprint(fp: Mapping) -> str:
    return (f"dim {fp.get('dim')}, {fp.get('num_heads')} heads, {fp.get('num_layers')} layers, "
            f"patch {fp.get('patch_size')}, {fp.get('in_dim')} latent channels, text width {fp.get('text_dim')}")


# ---------------------------------------------------------------------------------------------
# the state


@dataclass(frozen=True, eq=False)
class ARState:
    """An immutable snapshot of a finished AR run (see the module docstring).

    Read its pieces through the properties; build one with :func:`capture_state`
    (or :func:`generate_schedule` / :func:`continue_generation`), restore with
    :func:`restore_sampler`, save/load with :func:`save_state` / :func:`load_state`.
    """

    meta_json: str
    tensors: Mapping[str, torch.Tensor]

    def __post_init__(self):
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    # ---- bookkeeping ----------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        """A fresh copy of the JSON bookkeeping (changing it changes nothing)."""
        return json.loads(self.meta_json)

    @property
    def fingerprint(self) -> dict:
        return self.meta["fingerprint"]

    @property
    def next_frame(self) -> int:
        return int(self.meta["next_frame"])

    @property
    def frames_per_block(self) -> int:
        return int(self.meta["frames_per_block"])

    @property
    def steps(self) -> tuple[float, ...]:
        return tuple(float(s) for s in self.meta["steps"])

    @property
    def shift(self) -> float:
        return float(self.meta["shift"])

    @property
    def batch(self) -> int:
        return int(self.meta["batch"])

    @property
    def latent_size(self) -> tuple[int, int]:
        """(height, width) of the latent, in latent cells."""
        h, w = self.meta["latent_size"]
        return int(h), int(w)

    @property
    def channels(self) -> int:
        return int(self.meta["channels"])

    @property
    def policy(self) -> CachePolicy:
        return policy_from_dict(self.meta["policy"])

    @property
    def history(self) -> list[dict]:
        return self.meta["history"]

    # ---- tensors (read-only views of the private copies: clone before changing) ------------
    @property
    def context(self) -> torch.Tensor:
        return self.tensors["context"]

    @property
    def tail(self) -> torch.Tensor:
        return self.tensors["tail"]

    @property
    def rng_state(self) -> torch.Tensor | None:
        return self.tensors.get("rng")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    # ---- checks ---------------------------------------------------------------------------
    def check_model(self, spec: BackboneSpec, digest: str | None = None) -> list[str]:
        """Raise :class:`StateError` unless ``spec`` is the model this state was made with; returns warnings."""
        mine, theirs = self.fingerprint, spec.fingerprint()
        if mine != theirs:
            raise StateError(
                f"this AR_STATE was made with another model ({_describe_fingerprint(mine)}); the connected model "
                f"has {_describe_fingerprint(theirs)}. Continue with the model that made the state.")
        notes = []
        saved = self.meta.get("weights_digest")
        if digest and saved and digest != saved:
            notes.append("the connected model's weights differ from those that made this AR_STATE (another "
                         "checkpoint, dtype or LoRA?): the continuation may not match the video so far")
        return notes

    def check_latents(self, noise_shape: tuple) -> None:
        b, c, t, h, w = noise_shape
        if (h, w) != self.latent_size:
            sh, sw = self.latent_size
            raise StateError(
                f"this AR_STATE is for a {sw * 8}x{sh * 8} video (latent {sw}x{sh}); the continuation asks for "
                f"{w * 8}x{h * 8} (latent {w}x{h}). A continuation keeps the size of the video it extends.")
        if b != self.batch:
            raise StateError(f"this AR_STATE holds a batch of {self.batch}; the continuation's batch is {b}")
        if c != self.channels:
            raise StateError(f"this AR_STATE has {self.channels} latent channels; the continuation has {c}")

    def describe(self) -> str:
        m = self.meta
        h, w = self.latent_size
        lines = [f"AR_STATE: {self.next_frame} latent frames so far ({video_frames_for(self.next_frame)} video frames) at "
                 f"{w * 8}x{h * 8}, batch {self.batch}, policy {m['policy']['preset']}, "
                 f"{self.nbytes / 2**20:.1f} MiB"]
        for i, seg in enumerate(self.history):
            lines.append(f"  {i + 1}. frames {seg['start']}–{seg['start'] + seg['frames'] - 1} "
                         f"({seg['transition']}{' ' + str(seg['transition_frames']) if seg['transition'] != 'cut' else ''})"
                         + (f": {seg['label']}" if seg.get("label") else ""))
        return "\n".join(lines)


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def capture_state(sampler: ScheduleSampler, generator: torch.Generator | None, *,
                  history: list[dict] | None = None, digest: str | None = None) -> ARState:
    """Snapshot a sampler after a run (CPU copies: the sampler may go on or be dropped)."""
    if sampler.cache is None or sampler.context is None or sampler.tail is None:
        raise StateError("nothing to capture: the sampler has not generated any frames")
    tensors, cache_meta = sampler.cache.state_dict()
    tensors["context"] = _cpu_copy(sampler.context)
    tensors["tail"] = _cpu_copy(sampler.tail)
    rng_device = None
    if generator is not None:
        tensors["rng"] = _cpu_copy(generator.get_state())
        rng_device = str(generator.device)
    h, w = sampler.latent_hw
    meta = {
        "format": STATE_FORMAT, "version": STATE_VERSION,
        "fingerprint": sampler.runner.spec.fingerprint(), "weights_digest": digest,
        "policy": policy_to_dict(sampler.policy),
        "steps": list(sampler.schedule.steps), "shift": sampler.schedule.shift,
        "frames_per_block": sampler.frames_per_block,
        "batch": sampler.batch, "latent_size": [h, w], "channels": sampler.runner.spec.in_dim,
        "next_frame": sampler.next_frame, "chunks_done": sampler.chunks_generated,
        "dtype": str(sampler.runner.dtype), "rng_device": rng_device,
        "history": list(history or []), "cache": cache_meta,
    }
    return ARState(json.dumps(meta), tensors)


def restore_sampler(state: ARState, backbone: torch.nn.Module, new_frames: int, *,
                    generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                    attention_backend: str = "auto", device: torch.device | str | None = None
                    ) -> tuple[ScheduleSampler, torch.Generator | None]:
    """A sampler continuing ``state`` with room for ``new_frames`` more frames, and the re-noise generator.

    The cache is *copied* into fresh device buffers (the state is not touched). Without
    ``generator`` the state's saved RNG state is restored into a new generator.
    """
    runner = WanRunner(backbone, dtype=dtype, device=device)
    state.check_model(runner.spec)
    meta = state.meta
    sampler = ScheduleSampler(runner, state.policy, FlowMatchSchedule(state.steps, state.shift),
                              state.frames_per_block, attention_backend)
    h, w = state.latent_size
    cache_meta = meta["cache"]
    total = max(state.next_frame + int(new_frames), int(cache_meta.get("total_frames", 0)))
    sampler.start(state.batch, h, w, total)
    sampler.cache.load_state_dict(state.tensors, cache_meta)
    sampler.set_prompt(state.context)  # the first prompt of this sampler: not a switch
    sampler.context = state.context
    sampler.tail = state.tail.to(runner.device, copy=True)
    sampler.next_frame = state.next_frame
    sampler.chunks_generated = int(meta.get("chunks_done", 0))
    if generator is None and state.rng_state is not None:
        rng_device = torch.device(meta.get("rng_device") or "cpu")
        if rng_device.type == "cuda" and not torch.cuda.is_available():
            raise StateError(f"this AR_STATE continues a re-noise generator on {rng_device}, which this machine "
                             "lacks; continue it on a CUDA machine or pass a generator")
        generator = torch.Generator(device=rng_device)
        generator.set_state(state.rng_state.clone())
    return sampler, generator


# ---------------------------------------------------------------------------------------------
# running


def _history(sampler: ScheduleSampler, schedule: PromptSchedule, first_frame: int) -> list[dict]:
    out = []
    events = {e["frame"]: e for e in sampler.events}
    pos = first_frame
    for seg in schedule:
        ev = events.get(pos)
        out.append({"start": pos, "frames": seg.frames, "transition": seg.transition if ev else "cut",
                    "transition_frames": (ev["frames"] if ev else 0), "switch": bool(ev),
                    "replaced": ev["replaced"] if ev else 0, "label": seg.label})
        pos += seg.frames
    return out


def _hooks(progress, should_stop, on_chunk, hooks: Hooks | None) -> Hooks:
    return hooks if hooks is not None else Hooks(progress, should_stop, on_chunk)


def generate_schedule(backbone: torch.nn.Module, schedule: PromptSchedule | torch.Tensor, noise: torch.Tensor,
                      steps: tuple[float, ...] = SELF_FORCING_STEPS, shift: float = SELF_FORCING_SHIFT,
                      frames_per_block: int = 3, policy: str | CachePolicy = "full",
                      generator: torch.Generator | None = None, first_chunk_steps: tuple[float, ...] | None = None,
                      initial_latent: torch.Tensor | None = None, *, hooks: Hooks | None = None,
                      progress=None, should_stop=None, on_chunk=None, attention_backend: str = "auto",
                      dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> tuple[torch.Tensor, ARState]:
    """Generate a multi-prompt video and return ``(latents, ARState)``.

    ``schedule``: a :class:`PromptSchedule` (or one conditioning tensor: a single segment
    covering the noise). ``noise``: ``[B, C, total, H, W]`` for all segments. With one
    segment this is exactly :func:`headforcing_core.generate` (plus the state);
    ``first_chunk_steps`` and ``initial_latent`` work as they do there (the initial frames are
    put into the cache under the first segment's prompt and are part of the state's video).
    ``dtype`` / ``device``: where and in what precision to compute, as for ``generate``.
    """
    t0 = initial_latent.shape[2] if torch.is_tensor(initial_latent) and initial_latent.ndim == 5 else 0
    sampler = build_sampler(backbone, policy, steps=steps, shift=shift, frames_per_block=frames_per_block,
                            attention_backend=attention_backend, dtype=dtype, device=device,
                            latent_frames=t0 + (noise.shape[2] if noise.ndim == 5 else 0), sampler_cls=ScheduleSampler,
                            first_chunk_steps=first_chunk_steps)
    sched = as_schedule(schedule, noise.shape[2] if noise.ndim == 5 else None).resolve(frames_per_block)
    for seg in sched:
        validate_inputs(sampler.runner, seg.context, noise, frames_per_block)
    if noise.shape[2] != sched.total_frames:
        raise HeadForcingError(f"the noise has {noise.shape[2]} latent frames but the schedule's segments add up to "
                               f"{sched.total_frames}")
    validate_initial_latent(initial_latent, tuple(noise.shape), frames_per_block, sampler.runner.spec.in_dim)
    b, _, t, h, w = noise.shape
    sampler.start(b, h, w, t0 + t)
    hooks = _hooks(progress, should_stop, on_chunk, hooks)
    done, total, history = 0, None, []
    if t0:
        sampler.set_prompt(sched[0].context)
        sampler.context = sched[0].context
        sampler.remember(initial_latent.to(sampler.runner.device))  # a recache may reach into these frames
        total = len(chunk_bounds(0, t0, frames_per_block)) + sampler.schedule_model_calls(sched, start_frame=t0)
        done = sampler.prefill(initial_latent, hooks, 0, total)
        history = [{"start": 0, "frames": t0, "transition": "cut", "transition_frames": 0, "switch": False,
                    "replaced": 0, "label": "initial latent"}]
    out = sampler.run_schedule(sched, noise, generator, hooks, done, total)
    state = capture_state(sampler, generator, history=history + _history(sampler, sched, t0),
                          digest=weights_digest(backbone))
    return out, state


def continue_generation(backbone: torch.nn.Module, state: ARState, schedule: PromptSchedule | torch.Tensor,
                        noise: torch.Tensor, *, generator: torch.Generator | None = None, hooks: Hooks | None = None,
                        progress=None, should_stop=None, on_chunk=None, attention_backend: str = "auto",
                        dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> tuple[torch.Tensor, ARState]:
    """Extend the video of ``state`` by the segments of ``schedule``; returns ``(new latents, new state)``.

    ``noise`` covers the new frames only. The first segment's transition applies against
    the state's last prompt. The re-noising draws continue the state's RNG stream unless
    ``generator`` is given. ``state`` is left unchanged.
    """
    if not isinstance(state, ARState):
        raise StateError(f"expected an AR_STATE, got {type(state).__name__}")
    if noise.ndim != 5:
        raise StateError(f"noise must be [batch, channels, frames, height, width], got {tuple(noise.shape)}")
    state.check_latents(tuple(noise.shape))
    sched = as_schedule(schedule, noise.shape[2]).resolve(state.frames_per_block)
    if noise.shape[2] != sched.total_frames:
        raise HeadForcingError(f"the noise has {noise.shape[2]} latent frames but the schedule's segments add up to "
                               f"{sched.total_frames}")
    sampler, gen = restore_sampler(state, backbone, sched.total_frames, generator=generator, dtype=dtype,
                                   attention_backend=attention_backend, device=device)
    for seg in sched:
        sampler.runner.spec.check_context(seg.context, state.batch)
    first = sampler.next_frame
    out = sampler.run_schedule(sched, noise.to(sampler.runner.device), gen,
                               _hooks(progress, should_stop, on_chunk, hooks))
    new_state = capture_state(sampler, gen, history=state.history + _history(sampler, sched, first),
                              digest=state.meta.get("weights_digest") or weights_digest(backbone))
    return out.to(noise.device), new_state


# ---------------------------------------------------------------------------------------------
# files


def save_state(state: ARState, path: str | os.PathLike) -> Path:
    """Write ``state`` as safetensors + JSON metadata (atomically: a temp file, then a rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in state.tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=STATE_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", STATE_META_KEY: state.meta_json})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_state(path: str | os.PathLike) -> ARState:
    """Read an AR_STATE file; :class:`StateError` naming the field for anything missing, corrupt,
    inconsistent or of another version (see :mod:`headforcing_core.validation`)."""
    from safetensors import safe_open

    from .cache_schema import validate_cache_meta
    from .validation import validate_state

    path = Path(path)
    if not path.is_file():
        raise StateError(f"AR_STATE file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(STATE_META_KEY)
            if raw is None:
                raise StateError(f"{path.name} is a safetensors file but not a Head Forcing AR_STATE "
                                 "(no headforcing_state metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except StateError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise StateError(f"{path.name} is not a readable AR_STATE file (damaged or truncated?): {e}") from None
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise StateError(f"{path.name}: the AR_STATE metadata is not valid JSON ({e})") from None
    where = f"AR_STATE {path.name!r}"
    validate_state(meta, tensors, where, StateError)
    validate_cache_meta(meta["cache"], tensors, meta, where=where, error=StateError)  # once the rest is known good
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise StateError(f"{path.name}: tensor(s) {', '.join(bad[:4])} hold NaN/inf values (damaged file?)")
    return ARState(raw, tensors)
