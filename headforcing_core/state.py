"""AR_STATE: a finished run's committed cache and position, to continue it later.

An :class:`ARState` holds everything needed to extend a video exactly as if the run
had not stopped:

* the committed head-wise KV cache (every tier of every head group: slot buffers and
  the bookkeeping of which slot holds which frames, episodes, merge accumulators);
* the next frame index, the RNG state of the re-noising generator;
* the policy (labels included), the noise schedule settings (steps, shift,
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

Where the rest lives: :mod:`headforcing_core.story` makes states (``generate_schedule``,
``continue_generation``, ``capture_state``) and continues them (``restore_sampler``);
:mod:`headforcing_core.state_file` saves and loads them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import torch

from .backbone import BackboneSpec
from .errors import PolicyError, StateError
from .geometry import video_frames_for
from .policies import CachePolicy, policy_from_dict


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

    Read its pieces through the properties; build one with :func:`~headforcing_core.story.capture_state`
    (or :func:`~headforcing_core.story.generate_schedule` / :func:`~headforcing_core.story.continue_generation`),
    restore with :func:`~headforcing_core.story.restore_sampler`, save/load with
    :func:`~headforcing_core.state_file.save_state` / :func:`~headforcing_core.state_file.load_state`.
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
        """The policy record, read by the one policy codec (a :class:`StateError` if it cannot be read)."""
        try:
            return policy_from_dict(self.meta["policy"])
        except PolicyError as e:
            raise StateError(f"the AR_STATE's {e}") from None

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
