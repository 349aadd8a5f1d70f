"""Head profile files: safetensors tensors + JSON metadata; safe names; shipped presets.

File layout (``*.safetensors``)
-------------------------------
Tensors:

* ``labels.<taxonomy>`` — int8 ``[layers, heads]``: index of each head's type in
  ``policies.TAXONOMIES[taxonomy]`` (``head_forcing``: local 0, anchor 1, memory 2;
  ``pyramid_forcing``: anchor 0, wave 1, veil 2);
* ``stats.{mass,positive,logit,uniform,count}`` — float64 ``[layers, heads, F, F]``: the raw
  sums of :mod:`.stats` (absent in a labels-only preset);
* ``summary.*`` — float32 per-head statistics derived at the default settings, for people
  inspecting the file; ignored when loading (recomputed from ``stats.*``).

Metadata (safetensors header): ``format = "headforcing.head_profile"``, ``format_version``
and ``headforcing`` = one JSON object with ``model`` (the backbone fingerprint),
``taxonomy`` (primary), ``label_sources``, ``thresholds`` (per taxonomy), ``calibration``,
``frames_per_block``, ``source``, ``attribution``, ``read_only``, ``created``, ``software``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import HeadForcingError, ProfileError
from ..names import list_names, safe_path
from ..validation import validate_profile_meta
from ..policies import (PYRAMID_PRESET_SOURCE, PYRAMID_TO_HEAD_FORCING, TAXONOMIES, TRAINING_WINDOW,
                        pyramid_forcing_preset_labels)
from ..wan_model import WanConfig
from .classify import CLASSIFIED_TAXONOMIES, label_codes, labels_from_codes, thresholds_for
from .profile import HeadProfile
from .stats import STAT_NAMES, FrameStats, summarize

FORMAT = "headforcing.head_profile"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
FOLDER_NAME = "headforcing"  # ComfyUI model folder (models/headforcing)
PRESET_PREFIX = "preset: "


# ---------------------------------------------------------------------------------------------
# names (the pack's one name policy: headforcing_core.names)

PROFILE_KIND = "head profile"


def profile_path(folder, name: str, *, must_exist: bool = False) -> Path:
    """The path of profile ``name`` in ``folder`` under the pack's name policy (ProfileError otherwise)."""
    return safe_path(folder, name, kind=PROFILE_KIND, suffix=SUFFIX, must_exist=must_exist, error=ProfileError)


def list_profiles(folder) -> list[str]:
    """Names of the profile files in ``folder`` that :func:`profile_path` accepts (never raises)."""
    return list_names(folder, suffix=SUFFIX)


# ---------------------------------------------------------------------------------------------
# save / load


def _software() -> str:
    from .. import __version__
    return f"headforcing_core {__version__}"


def profile_tensors(profile: HeadProfile) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for tax, lab in profile.labels_by_taxonomy.items():
        tensors[f"labels.{tax}"] = torch.from_numpy(label_codes(lab))
    if profile.stats is not None:
        for n, t in profile.stats.tensors().items():
            tensors[f"stats.{n}"] = t.detach().to("cpu", torch.float64).contiguous()
        try:
            summ = summarize(profile.stats)
        except HeadForcingError:
            summ = None
        if summ is not None:
            for n, a in summ.arrays().items():
                tensors[f"summary.{n}"] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return tensors


def profile_metadata(profile: HeadProfile) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "model": profile.model,
        "taxonomy": profile.taxonomy,
        "label_sources": {t: lab.source for t, lab in profile.labels_by_taxonomy.items()},
        "thresholds": {t: dict(v) for t, v in profile.thresholds.items()},
        "calibration": profile.calibration,
        "frames_per_block": profile.stats.frames_per_block if profile.stats is not None else None,
        "statistics": profile.stats is not None,
        "summary_settings": {"sink_frames": 3, "recent_frames": 4},
        "source": profile.source,
        "attribution": profile.attribution,
        "read_only": profile.read_only,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "software": _software(),
    }


def save_profile(profile: HeadProfile, path) -> Path:
    """Write ``profile`` to ``path`` (atomically: a temporary file in the same folder, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
            "headforcing": json.dumps(profile_metadata(profile), sort_keys=True)}
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=SUFFIX, dir=str(path.parent))
    os.close(fd)
    try:
        save_file(profile_tensors(profile), tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_profile(path, *, expect=None, name: str | None = None) -> HeadProfile:
    """Read a profile file. ProfileError for a missing, corrupt or foreign file, and — when
    ``expect`` (a BackboneSpec or fingerprint) is given — for a profile of another model shape."""
    path = Path(path)
    label = name or path.name
    if not path.is_file():
        raise ProfileError(f"no head profile file {label!r} (looked at {path})")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types (and OSError/ValueError)
        raise ProfileError(f"head profile {label!r} is not a readable safetensors file (corrupt or truncated?): "
                           f"{type(e).__name__}: {e}") from None
    if header.get("format") != FORMAT:
        raise ProfileError(f"{label!r} is a safetensors file but not a head profile (format "
                           f"{header.get('format')!r}, expected {FORMAT!r})")
    where = f"head profile {label!r}"
    version = str(header.get("format_version", "")).strip()
    if not version.isdigit():
        raise ProfileError(f"{where}: field 'format_version' must be a whole number, got {version[:40]!r}")
    if int(version) > FORMAT_VERSION:
        raise ProfileError(f"{where} has format version {version}; this pack reads up to {FORMAT_VERSION} "
                           "(update Head Forcing)")
    if "headforcing" not in header:
        raise ProfileError(f"{where}: the metadata lacks its 'headforcing' record (damaged file?)")
    try:
        meta = json.loads(header["headforcing"])
    except (ValueError, RecursionError) as e:
        raise ProfileError(f"{where}: the metadata is not valid JSON ({e})") from None
    meta = validate_profile_meta(meta, where, ProfileError)
    _check_thresholds_usable(meta, where)
    try:
        profile = _profile_from(meta, tensors, label, where)
    except HeadForcingError as e:  # checks of the labels / statistics classes: say which file
        msg = str(e)
        raise ProfileError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    if expect is not None:
        profile.check_model(expect)
    return profile


def _check_thresholds_usable(meta: dict, where: str) -> None:
    """Stored thresholds of a classified taxonomy must be ones its classifier accepts."""
    for tax, values in (meta.get("thresholds") or {}).items():
        if tax in CLASSIFIED_TAXONOMIES:
            try:
                thresholds_for(tax, dict(values))
            except (HeadForcingError, TypeError, ValueError) as e:
                raise ProfileError(f"{where}: field 'thresholds.{tax}' are not usable: {e}") from None


def _profile_from(meta: dict, tensors: dict, label: str, where: str) -> HeadProfile:
    """A HeadProfile from validated metadata and the file's tensors (checked against the model shape)."""
    model = meta["model"]
    layers, heads = model["num_layers"], model["num_heads"]
    sources = meta.get("label_sources") or {}
    labels = {}
    stat_tensors = {}
    for key, t in tensors.items():
        kind, _, name = key.partition(".")
        if kind == "labels":
            if name not in TAXONOMIES:
                raise ProfileError(f"{where}: tensor {key!r} names an unknown taxonomy")
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise ProfileError(f"{where}: tensor {key!r} must hold integer codes, got {t.dtype}")
            if tuple(t.shape) != (layers, heads):
                raise ProfileError(f"{where}: tensor {key!r} has shape {list(t.shape)}; the profile's model has "
                                   f"{layers} layers × {heads} heads")
            labels[name] = labels_from_codes(t.to(torch.int64).numpy(), name, str(sources.get(name, "")))
        elif kind == "stats":
            stat_tensors[name] = t
        elif kind != "summary":  # summaries are for people reading the file; recomputed on load
            raise ProfileError(f"{where}: tensor {key!r} is not part of a head profile")
    if not labels:
        raise ProfileError(f"{where}: the file holds no labels")
    stats = None
    if stat_tensors:
        fpb = meta.get("frames_per_block")
        if fpb is None:
            raise ProfileError(f"{where}: field 'frames_per_block' is missing (the file has statistics)")
        stats = FrameStats.from_tensors(stat_tensors, fpb)  # checks names, shapes, finiteness
        if stats.shape != (layers, heads):
            raise ProfileError(f"{where}: the statistics cover {stats.shape[0]}×{stats.shape[1]} heads; the "
                               f"profile's model has {layers} layers × {heads} heads")
        if not fpb <= stats.frames <= TRAINING_WINDOW:
            raise ProfileError(f"{where}: the statistics cover {stats.frames} frames; a calibration window has "
                               f"{fpb} (frames_per_block) to {TRAINING_WINDOW}")
        extra = sorted(set(stat_tensors) - set(STAT_NAMES))
        if extra:
            raise ProfileError(f"{where}: tensor 'stats.{extra[0]}' is not a profile statistic")
    taxonomy = meta["taxonomy"]
    if taxonomy not in labels:
        raise ProfileError(f"{where}: field 'taxonomy' is {taxonomy!r}, which has no labels in the file")
    return HeadProfile(model=model, labels_by_taxonomy=labels, taxonomy=taxonomy,
                       thresholds=meta.get("thresholds") or {}, stats=stats, calibration=meta.get("calibration"),
                       source=str(meta.get("source", "")), attribution=str(meta.get("attribution", "")),
                       read_only=bool(meta.get("read_only", False)), name=label)


# ---------------------------------------------------------------------------------------------
# presets (shipped with the pack, read-only, labels only)

PYRAMID_PRESET = "pyramid_forcing_self_forcing_1p3b"


def _wan_1p3b_fingerprint() -> dict:
    c = WanConfig()
    return {"dim": c.dim, "num_heads": c.num_heads, "num_layers": c.num_layers, "patch_size": list(c.patch_size),
            "in_dim": c.in_dim, "out_dim": c.out_dim, "text_dim": c.text_dim}


def _pyramid_preset() -> HeadProfile:
    pyr = pyramid_forcing_preset_labels()
    stand_in = pyr.mapped("head_forcing", PYRAMID_TO_HEAD_FORCING,
                          "STAND-IN derived from " + PYRAMID_PRESET_SOURCE + " (veil→anchor, anchor→memory, "
                          "wave→local); profile the model for real head_forcing labels")
    return HeadProfile(
        model=_wan_1p3b_fingerprint(), labels_by_taxonomy={"pyramid_forcing": pyr, "head_forcing": stand_in},
        taxonomy="pyramid_forcing", source=PYRAMID_PRESET_SOURCE,
        attribution=("Labels from Pyramid Forcing by Jiayu Chen et al. (Peking University), "
                     "https://github.com/IF-LAB-PKU/Pyramid-Forcing, configs/head_configs/best_labels.csv, "
                     "Apache License 2.0 (see the pack's NOTICE). -1 oscillating = wave, 1 stable = anchor, "
                     "2 stable-sparse = veil."),
        read_only=True, name=PRESET_PREFIX + PYRAMID_PRESET)


PRESETS = {PYRAMID_PRESET: _pyramid_preset}


def preset_names() -> list[str]:
    """Dropdown names of the shipped presets (``"preset: <name>"``)."""
    return [PRESET_PREFIX + n for n in PRESETS]


def is_preset(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PRESET_PREFIX) and name[len(PRESET_PREFIX):] in PRESETS


def preset_profile(name: str) -> HeadProfile:
    """A shipped preset by name (with or without the ``"preset: "`` prefix)."""
    key = name[len(PRESET_PREFIX):] if name.startswith(PRESET_PREFIX) else name
    if key not in PRESETS:
        raise ProfileError(f"no preset head profile {name!r}; presets: {', '.join(preset_names())}")
    return PRESETS[key]()


def resolve_profile(name: str, folders, *, expect=None) -> HeadProfile:
    """Load ``name``: a preset (``"preset: …"``) or a file in the first of ``folders`` that has it."""
    if is_preset(name):
        profile = preset_profile(name)
        if expect is not None:
            profile.check_model(expect)
        return profile
    for folder in folders:
        path = profile_path(folder, name)
        if path.is_file():
            return load_profile(path, expect=expect, name=name)
    raise ProfileError(f"no head profile {name!r} in the profile folder(s) {', '.join(map(str, folders)) or '(none)'}")
