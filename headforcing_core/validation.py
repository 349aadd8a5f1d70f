"""Schemas of the files the pack reads: every field checked as data before anything uses it.

One function per kind of record; each raises the caller's error class with one message that
names the field, says what it must be and what the file holds:

* :func:`validate_fingerprint` — a model shape (``dim``, ``num_heads``, ``num_layers``,
  ``patch_size``, ``in_dim``, ``out_dim``, ``text_dim``), as stored in AR states and head
  profiles: positive whole numbers within :data:`LIMITS`, ``patch_size`` three of them with a
  temporal patch of 1, heads dividing the width into an even head size.
* :func:`validate_state` — the metadata and tensors of an AR_STATE file (everything except the
  cache layout, which :func:`headforcing_core.cache_schema.validate_cache_meta` checks).
* :func:`validate_profile_meta` — the metadata of a head profile file (its tensors are checked
  against the validated model shape by :mod:`headforcing_core.profiling.profile_io`).

The limits are generous sanity bounds, not quality advice: they stop a damaged or hostile
file from asking for impossible sizes (the memory pre-flight judges what fits).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .errors import HeadForcingError

# sanity bounds of stored values (documented in docs/reliability.md)
LIMITS = {
    "layers": 256,  # transformer blocks (Wan2.1-14B: 40)
    "heads": 256,  # attention heads per block (Wan2.1-14B: 40)
    "dim": 65536,  # model width
    "channels": 1024,  # latent channels
    "text_dim": 65536,
    "patch": 64,
    "text_tokens": 512,  # Wan's text length
    "batch": 1024,
    "latent_side": 2048,  # 16384 pixels / 8
    "latent_frames": 10_000_000,  # ≈ 29 days of 16-fps video
    "frames_per_block": 21,  # the training window
    "steps": 1000,
    "shift": 1000.0,
    "history": 1_000_000,  # segments logged in an AR_STATE
    "label": 10_000,  # characters of a label / note / source text
}
STATE_TENSORS = ("context", "tail", "rng", "interp_source")
FLOAT_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
CPU_RNG_BYTES = 5056  # torch.Generator("cpu").get_state().numel() (mt19937 state + normal cache)
CUDA_RNG_BYTES = 16  # seed + philox offset


class Fields:
    """Field checks for one record; every failure names ``where`` and the field."""

    def __init__(self, where: str, error: type[HeadForcingError]):
        self.where = where
        self.error = error

    def fail(self, field: str, why: str):
        raise self.error(f"{self.where}: field {field!r} {why}")

    @staticmethod
    def shown(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 80 else text[:77] + "..."

    def get(self, record: Mapping, key: str, field: str | None = None):
        if not isinstance(record, Mapping):
            self.fail(field or key, f"cannot be read: its parent is a {type(record).__name__}, not an object")
        if key not in record:
            self.fail(field or key, "is missing")
        return record[key]

    def integer(self, value, field: str, lo: int | None = None, hi: int | None = None) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and (lo is None or value >= lo) and (hi is None or value <= hi):
            return value
        rng = (f" from {lo} to {hi}" if lo is not None and hi is not None else
               f" ≥ {lo}" if lo is not None else f" ≤ {hi}" if hi is not None else "")
        self.fail(field, f"must be a whole number{rng}, got {self.shown(value)}")

    def number(self, value, field: str, lo: float | None = None, hi: float | None = None, *,
               lo_open: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi):
            return float(value)
        rng = "" if lo is None else (f" > {lo:g}" if lo_open else f" ≥ {lo:g}")
        rng += "" if hi is None else f"{' and' if rng else ''} ≤ {hi:g}"
        self.fail(field, f"must be a finite number{rng}, got {self.shown(value)}")

    def boolean(self, value, field: str) -> bool:
        if isinstance(value, bool):
            return value
        self.fail(field, f"must be true or false, got {self.shown(value)}")

    def text(self, value, field: str, *, max_len: int = LIMITS["label"], choices=None, optional=False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            self.fail(field, f"must be text, got {self.shown(value)}")
        if choices is not None and value not in choices:
            self.fail(field, f"must be one of {', '.join(map(str, choices))}, got {self.shown(value)}")
        if len(value) > max_len:
            self.fail(field, f"is {len(value)} characters long (at most {max_len})")
        return value

    def mapping(self, value, field: str) -> Mapping:
        if isinstance(value, Mapping):
            return value
        self.fail(field, f"must be an object, got {self.shown(value)}")

    def array(self, value, field: str, lo: int = 0, hi: int | None = None) -> list:
        if not isinstance(value, list):
            self.fail(field, f"must be a list, got {self.shown(value)}")
        if len(value) < lo or (hi is not None and len(value) > hi):
            size = f"{lo} to {hi}" if hi is not None and hi != lo else str(lo) if hi == lo else f"at least {lo}"
            self.fail(field, f"must hold {size} item(s), got {len(value)}")
        return value

    def tensor(self, tensors: Mapping, name: str, *, shape: tuple | None = None, dtypes=None,
               what: str = "") -> torch.Tensor:
        field = f"tensor {name}"
        if name not in tensors:
            self.fail(field, "is missing (damaged file?)")
        t = tensors[name]
        if dtypes is not None and t.dtype not in dtypes:
            self.fail(field, f"must be {'/'.join(str(d).replace('torch.', '') for d in dtypes)}, got "
                             f"{str(t.dtype).replace('torch.', '')}")
        if shape is not None:
            want = tuple(shape)
            if t.ndim != len(want) or any(w is not None and s != w for s, w in zip(t.shape, want)):
                shown = "[" + ", ".join("*" if w is None else str(w) for w in want) + "]"
                self.fail(field, f"has shape {list(t.shape)}; {what or 'it must be'} {shown}")
        return t


# ---------------------------------------------------------------------------------------------
# model shape

FINGERPRINT_KEYS = ("dim", "num_heads", "num_layers", "patch_size", "in_dim", "out_dim", "text_dim")


def validate_fingerprint(fp, where: str, error: type[HeadForcingError], field: str = "model") -> dict:
    """A model shape in canonical form (:data:`FINGERPRINT_KEYS`), or ``error`` naming the bad field."""
    f = Fields(where, error)
    fp = f.mapping(fp, field)
    out = {
        "dim": f.integer(f.get(fp, "dim", f"{field}.dim"), f"{field}.dim", 1, LIMITS["dim"]),
        "num_heads": f.integer(f.get(fp, "num_heads", f"{field}.num_heads"), f"{field}.num_heads", 1,
                               LIMITS["heads"]),
        "num_layers": f.integer(f.get(fp, "num_layers", f"{field}.num_layers"), f"{field}.num_layers", 1,
                                LIMITS["layers"]),
    }
    patch = f.array(f.get(fp, "patch_size", f"{field}.patch_size"), f"{field}.patch_size", 3, 3)
    patch = [f.integer(p, f"{field}.patch_size[{i}]", 1, LIMITS["patch"]) for i, p in enumerate(patch)]
    if patch[0] != 1:
        f.fail(f"{field}.patch_size", f"must have a temporal patch of 1 (the AR sampler works frame by frame), "
                                      f"got {patch}")
    out["patch_size"] = patch
    for key in ("in_dim", "out_dim"):
        out[key] = f.integer(f.get(fp, key, f"{field}.{key}"), f"{field}.{key}", 1, LIMITS["channels"])
    out["text_dim"] = f.integer(f.get(fp, "text_dim", f"{field}.text_dim"), f"{field}.text_dim", 1,
                                LIMITS["text_dim"])
    if out["dim"] % out["num_heads"]:
        f.fail(f"{field}.num_heads", f"({out['num_heads']}) must divide the model width {out['dim']}")
    if (out["dim"] // out["num_heads"]) % 2:
        f.fail(f"{field}.dim", f"/ num_heads must be an even head size for the rotary embedding, got "
                               f"{out['dim']} / {out['num_heads']}")
    return {k: out[k] for k in FINGERPRINT_KEYS}


# ---------------------------------------------------------------------------------------------
# AR_STATE

_MIDDLE_FIELDS = {"Stride": {"interval": int, "capacity": int}, "Cyclic": {"period": int, "bucket_capacity": int},
                  "Merge": {"patch": int, "capacity": int},
                  "Episodic": {"cap": int, "pool": int, "similarity": float}}
_RULE_FIELDS = {"retention": {"sink": "count", "recent": "optional", "window": bool, "middle": ("Episodic",)},
                "pyramid": {"sink_frames": "count", "recent_frames": "positive", "stable_stride": bool,
                            "middle": ("Stride", "Cyclic", "Merge")}}


def _check_policy_record(f: Fields, rec, fingerprint: dict) -> None:
    """Types and ranges of the JSON policy record (``policies.policy_to_dict``)."""
    rec = f.mapping(rec, "policy")
    f.text(f.get(rec, "preset", "policy.preset"), "policy.preset", max_len=200)
    f.text(f.get(rec, "rope", "policy.rope"), "policy.rope", max_len=200)
    f.integer(f.get(rec, "window", "policy.window"), "policy.window", 2, LIMITS["latent_frames"])
    for key in ("clamp_min", "clamp_max"):
        f.integer(rec.get(key, 18 if key == "clamp_min" else 21), f"policy.{key}", 0, LIMITS["latent_frames"])
    f.text(rec.get("note", ""), "policy.note")
    _check_rule_records(f, f.array(f.get(rec, "rules", "policy.rules"), "policy.rules", 1, 64), "policy.rules")
    if "unprofiled_rules" in rec:
        _check_rule_records(f, f.array(rec["unprofiled_rules"], "policy.unprofiled_rules", 0, 64),
                            "policy.unprofiled_rules")
    labels = rec.get("labels")
    if labels is not None:
        labels = f.mapping(labels, "policy.labels")
        f.text(f.get(labels, "taxonomy", "policy.labels.taxonomy"), "policy.labels.taxonomy", max_len=200)
        f.text(labels.get("source", ""), "policy.labels.source")
        rows = f.array(f.get(labels, "types", "policy.labels.types"), "policy.labels.types",
                       fingerprint["num_layers"], fingerprint["num_layers"])
        for li, row in enumerate(rows):
            row = f.array(row, f"policy.labels.types[{li}]", fingerprint["num_heads"], fingerprint["num_heads"])
            for hi, t in enumerate(row):
                f.text(t, f"policy.labels.types[{li}][{hi}]", max_len=200)


def _check_rule_records(f: Fields, rules: list, key: str) -> None:
    """Types and ranges of ``[head type, rule]`` pairs (``RuleBase.to_dict``)."""
    for i, item in enumerate(rules):
        where = f"{key}[{i}]"
        item = f.array(item, where, 2, 2)
        f.text(item[0], f"{where}[0]", max_len=200)
        r = f.mapping(item[1], f"{where}[1]")
        family = f.text(r.get("family", "retention"), f"{where}.family", choices=tuple(_RULE_FIELDS))
        spec = _RULE_FIELDS[family]
        extra = sorted(set(r) - set(spec) - {"family"})
        if extra:
            f.fail(where, f"has unknown field(s) {', '.join(extra)} for a {family} rule")
        for name, kind in spec.items():
            if name == "middle":
                continue
            value = r.get(name, False) if kind is bool else f.get(r, name, f"{where}.{name}")
            if kind is bool:
                f.boolean(value, f"{where}.{name}")
            elif kind == "optional":
                if value is not None:
                    f.integer(value, f"{where}.{name}", 1, LIMITS["latent_frames"])
            else:
                f.integer(value, f"{where}.{name}", 0 if kind == "count" else 1, LIMITS["latent_frames"])
        m = r.get("middle")
        if m is not None:
            m = f.mapping(m, f"{where}.middle")
            kind = f.text(f.get(m, "kind", f"{where}.middle.kind"), f"{where}.middle.kind", choices=spec["middle"])
            fields = _MIDDLE_FIELDS[kind]
            extra = sorted(set(m) - set(fields) - {"kind"})
            if extra:
                f.fail(f"{where}.middle", f"has unknown field(s) {', '.join(extra)} for {kind}")
            for name, typ in fields.items():
                value = f.get(m, name, f"{where}.middle.{name}")
                if typ is int:
                    f.integer(value, f"{where}.middle.{name}", 1, LIMITS["latent_frames"])
                else:
                    f.number(value, f"{where}.middle.{name}", -1.0, 1.0)
        elif family == "pyramid":
            f.fail(f"{where}.middle", "is missing: a Pyramid Forcing rule needs a Stride, Cyclic or Merge middle")


def validate_state(meta, tensors: Mapping[str, torch.Tensor], where: str, error: type[HeadForcingError]):
    """Check an AR_STATE's metadata and its non-cache tensors; returns the parsed :class:`CachePolicy`.

    ``meta`` is the decoded JSON of the file, ``tensors`` all its tensors. The cache section
    (``meta["cache"]`` and the ``cache.*`` tensors) goes to
    :func:`headforcing_core.cache_schema.validate_cache_meta`, which the caller runs once this passed.
    """
    from .policies import resolve_labels
    from .memory import TAIL_FRAMES
    from .prompts import RECACHE_MODES, TRANSITIONS
    from .schedule import FlowMatchSchedule
    from .policies import policy_from_dict
    from .state_format import STATE_FORMAT, STATE_VERSION

    f = Fields(where, error)
    meta = f.mapping(meta, "metadata")
    if meta.get("format") != STATE_FORMAT:
        f.fail("format", f"must be {STATE_FORMAT!r} (this is not a Head Forcing AR_STATE), got "
                         f"{f.shown(meta.get('format'))}")
    version = meta.get("version")
    if not (isinstance(version, int) and not isinstance(version, bool)) or version != STATE_VERSION:
        older = isinstance(version, int) and not isinstance(version, bool) and 0 < version < STATE_VERSION
        f.fail("version", f"is {f.shown(version)}; this pack reads AR_STATE version {STATE_VERSION}"
               + ("; the state was saved by an earlier version of the pack, whose cache stores keys another way: "
                  "run the graph that made it again to save a new state" if older else ""))
    fp = validate_fingerprint(f.get(meta, "fingerprint"), where, error, "fingerprint")
    digest = meta.get("weights_digest")
    if digest is not None:
        f.text(digest, "weights_digest", max_len=64)

    fpb = f.integer(f.get(meta, "frames_per_block"), "frames_per_block", 1, LIMITS["frames_per_block"])
    steps = f.array(f.get(meta, "steps"), "steps", 1, LIMITS["steps"])
    steps = [f.number(s, f"steps[{i}]", 1.0, 1000.0) for i, s in enumerate(steps)]
    shift = f.number(f.get(meta, "shift"), "shift", 0.0, LIMITS["shift"], lo_open=True)
    try:
        FlowMatchSchedule(tuple(steps), shift)
    except HeadForcingError as e:
        f.fail("steps", f"do not form a schedule: {e}")
    batch = f.integer(f.get(meta, "batch"), "batch", 1, LIMITS["batch"])
    size = f.array(f.get(meta, "latent_size"), "latent_size", 2, 2)
    lh = f.integer(size[0], "latent_size[0] (height)", 1, LIMITS["latent_side"])
    lw = f.integer(size[1], "latent_size[1] (width)", 1, LIMITS["latent_side"])
    _, ph, pw = fp["patch_size"]
    if lh % ph or lw % pw:
        f.fail("latent_size", f"{[lh, lw]} is not divisible by the model's patch {ph}×{pw}")
    channels = f.integer(f.get(meta, "channels"), "channels", 1, LIMITS["channels"])
    if channels != fp["in_dim"]:
        f.fail("channels", f"({channels}) must equal the model's latent channels fingerprint.in_dim ({fp['in_dim']})")
    next_frame = f.integer(f.get(meta, "next_frame"), "next_frame", 1, LIMITS["latent_frames"])
    chunks = meta.get("chunks_done", 0)
    f.integer(chunks, "chunks_done", 0, next_frame)
    f.text(f.get(meta, "dtype"), "dtype", choices=tuple(FLOAT_DTYPES))

    # policy: types first, then the policy object itself against the model shape
    _check_policy_record(f, f.get(meta, "policy"), fp)
    try:
        policy = policy_from_dict(meta["policy"])
        policy = resolve_labels(policy, fp["num_layers"], fp["num_heads"])
        policy.head_types(fp["num_layers"], fp["num_heads"])
        policy.validate(fpb)
    except HeadForcingError as e:
        f.fail("policy", f"is not a usable cache policy: {str(e).removeprefix('the AR_STATE')}")

    # history: segments from frame 0, back to back, ending at next_frame
    history = f.array(f.get(meta, "history"), "history", 0, LIMITS["history"])
    pos = 0
    for i, seg in enumerate(history):
        where_i = f"history[{i}]"
        seg = f.mapping(seg, where_i)
        start = f.integer(f.get(seg, "start", f"{where_i}.start"), f"{where_i}.start", 0, LIMITS["latent_frames"])
        frames = f.integer(f.get(seg, "frames", f"{where_i}.frames"), f"{where_i}.frames", 1,
                           LIMITS["latent_frames"])
        f.text(f.get(seg, "transition", f"{where_i}.transition"), f"{where_i}.transition", choices=TRANSITIONS)
        f.integer(seg.get("transition_frames", 0), f"{where_i}.transition_frames", 0, LIMITS["latent_frames"])
        f.integer(seg.get("replaced", 0), f"{where_i}.replaced", 0)
        f.boolean(seg.get("switch", False), f"{where_i}.switch")
        f.text(seg.get("label", ""), f"{where_i}.label")
        f.text(seg.get("text"), f"{where_i}.text", optional=True)
        f.text(seg.get("recache_mode"), f"{where_i}.recache_mode", choices=RECACHE_MODES, optional=True)
        f.boolean(seg.get("same_noise", False), f"{where_i}.same_noise")
        f.boolean(seg.get("live", False), f"{where_i}.live")
        if start != pos:
            f.fail(f"{where_i}.start", f"is {start}; the segment before ends at frame {pos}")
        pos = start + frames
    if history and pos != next_frame:
        f.fail("history", f"covers frames 0-{pos - 1} but next_frame is {next_frame}")

    # tensors outside the cache
    unknown = sorted(k for k in tensors if k not in STATE_TENSORS and not k.startswith("cache."))
    if unknown:
        f.fail(f"tensor {unknown[0]}", "is not part of an AR_STATE (unknown tensor name)")
    floats = tuple(FLOAT_DTYPES.values())
    ctx = f.tensor(tensors, "context", dtypes=floats, shape=(None, None, fp["text_dim"]),
                   what="the prompt's conditioning must be [batch, tokens, text width]")
    if ctx.shape[0] not in (1, batch):
        f.fail("tensor context", f"has batch {ctx.shape[0]}; the state's batch is {batch}")
    if not 1 <= ctx.shape[1] <= LIMITS["text_tokens"]:
        f.fail("tensor context", f"has {ctx.shape[1]} tokens; a conditioning has 1-{LIMITS['text_tokens']}")
    # an interpolation in progress: from interp_source towards context, `step` of `steps` chunks made
    interp = meta.get("interpolation")
    if interp is not None:
        interp = f.mapping(interp, "interpolation")
        steps = f.integer(f.get(interp, "steps", "interpolation.steps"), "interpolation.steps", 2,
                          LIMITS["latent_frames"])
        f.integer(f.get(interp, "step", "interpolation.step"), "interpolation.step", 1, steps - 1)
        src = f.tensor(tensors, "interp_source", dtypes=floats, shape=(None, None, fp["text_dim"]),
                       what="the embedding an interpolation sets off from must be [batch, tokens, text width]")
        if src.shape[0] not in (1, batch) or not 1 <= src.shape[1] <= LIMITS["text_tokens"]:
            f.fail("tensor interp_source", f"is {list(src.shape)}; it must be like the context: batch 1 or {batch}, "
                                           f"1-{LIMITS['text_tokens']} tokens")
    elif "interp_source" in tensors:
        f.fail("tensor interp_source", "is there but the metadata has no interpolation")
    f.tensor(tensors, "tail", dtypes=floats, shape=(batch, channels, min(next_frame, TAIL_FRAMES), lh, lw),
             what="the last latents must be [batch, channels, min(next_frame, 21), latent height, latent width] =")
    rng_device = meta.get("rng_device")
    if "rng" in tensors:
        device = f.text(rng_device, "rng_device", max_len=32)
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            f.fail("rng_device", f"is not a device name, got {f.shown(device)}")
        size = CPU_RNG_BYTES if dev.type == "cpu" else CUDA_RNG_BYTES if dev.type == "cuda" else None
        if size is None:
            f.fail("rng_device", f"must be a cpu or cuda device, got {device!r}")
        f.tensor(tensors, "rng", dtypes=(torch.uint8,), shape=(size,),
                 what=f"a {dev.type} generator state is")
    elif rng_device is not None:
        f.fail("rng_device", f"is {rng_device!r} but the file has no rng tensor")

    f.mapping(f.get(meta, "cache"), "cache")  # its contents: cache_schema.validate_cache_meta, called next
    return policy


# ---------------------------------------------------------------------------------------------
# head profiles

_CALIBRATION_INTS = ("prompts", "frames", "frames_per_block", "latent_height", "latent_width", "tokens_per_frame",
                     "query_samples", "queries_per_frame", "seed", "model_calls", "observations")


def validate_profile_meta(meta, where: str, error: type[HeadForcingError]) -> dict:
    """Check a head profile's JSON metadata; returns it with ``model`` in canonical form.

    The tensors (labels and statistics) are checked against the validated model shape, and the
    thresholds for usability by their classifier, in
    :func:`headforcing_core.profiling.profile_io.load_profile` (the profiling package sits above
    this module and owns both).
    """
    from .policies import TAXONOMIES

    f = Fields(where, error)
    meta = dict(f.mapping(meta, "metadata"))
    meta["model"] = validate_fingerprint(f.get(meta, "model"), where, error, "model")
    f.text(f.get(meta, "taxonomy"), "taxonomy", choices=tuple(TAXONOMIES))
    sources = f.mapping(meta.get("label_sources") or {}, "label_sources")
    for tax, src in sources.items():
        f.text(src, f"label_sources.{tax}")
    thresholds = f.mapping(meta.get("thresholds") or {}, "thresholds")
    for tax, values in thresholds.items():
        values = f.mapping(values, f"thresholds.{tax}")
        for key, value in values.items():
            f.number(value, f"thresholds.{tax}.{key}")
    calibration = meta.get("calibration")
    if calibration is not None:
        calibration = f.mapping(calibration, "calibration")
        for key in _CALIBRATION_INTS:
            if key in calibration:
                f.integer(calibration[key], f"calibration.{key}", 0)
        for key in ("seconds", "shift"):
            if key in calibration:
                f.number(calibration[key], f"calibration.{key}", 0.0)
        for key in ("policy", "dtype", "device"):
            if key in calibration:
                f.text(calibration[key], f"calibration.{key}", max_len=200)
        if "steps" in calibration:
            steps = f.array(calibration["steps"], "calibration.steps", 1, LIMITS["steps"])
            for i, v in enumerate(steps):
                f.number(v, f"calibration.steps[{i}]", 1.0, 1000.0)
    settings = meta.get("summary_settings")
    if settings is not None:
        settings = f.mapping(settings, "summary_settings")
        for key, value in settings.items():
            f.integer(value, f"summary_settings.{key}", 0, LIMITS["frames_per_block"])
    fpb = meta.get("frames_per_block")
    if fpb is not None:
        f.integer(fpb, "frames_per_block", 1, LIMITS["frames_per_block"])
    for key in ("source", "attribution", "created", "software"):
        f.text(meta.get(key, ""), key)
    for key in ("read_only", "statistics"):
        if key in meta:
            f.boolean(meta[key], key)
    return meta
