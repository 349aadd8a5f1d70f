"""AR_STATE files: :func:`save_state` and :func:`load_state`.

Files: safetensors (tensors, names ``cache.l{layer}.g{group}.{tier}…``, ``context``,
``tail``, ``rng``) with the JSON bookkeeping under the metadata key
``headforcing_state`` (``format``, ``version``, settings, policy, cache layout).
The format's identity (name, version, metadata key, suffix) is :mod:`headforcing_core.state_format`;
every field of a file is checked as data on load (:mod:`headforcing_core.validation`,
:mod:`headforcing_core.cache_schema`) before an :class:`~headforcing_core.state.ARState` is made.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .errors import StateError
from .state import ARState
from .state_format import STATE_META_KEY, STATE_SUFFIX


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
