"""HTTP routes of the pack, registered on ComfyUI's server by the pack's entry point (``__init__.py``
calls :func:`register_routes` once).

``GET /headforcing/estimate`` — the policy node's memory figure for the browser, computed by
the function the node itself calls (:func:`~.policy.policy_output`): the query string carries
the policy node's widget values (``preset``, ``rope``, ``sink_frames``, ``recent_frames``,
``memory_episodes``, ``memory_similarity``, ``width``, ``height``, ``length``, Pyramid
Forcing's parameters; missing ones take the node's defaults) and optionally
``profile`` (a name Load Head Profile lists: ``preset: …`` or a file in models/headforcing),
whose labels type the heads as when that node feeds the policy's ``head_profile`` input.
Values are checked against the node's own schema (type, min, max, options) before anything
runs. Answers JSON:

* 200 ``{"ok": true, "summary": <exactly the node's summary output>, "kv_bytes", "activation_bytes",
  "text_bytes", "total_bytes", "kv_bytes_by_type", "attended_frames", "latent_frames",
  "frames", "seconds", "window_kv_bytes", "notes"}``
* 4xx ``{"ok": false, "error": "..."}`` for everything else, never 5xx: 400 for a bad parameter
  (the message names it), 404 for an unknown profile name, 422 for a damaged profile file (the
  message names the field) or anything else that keeps the figure from being computed. The
  server never goes down for a bad request. ComfyUI also serves every route under ``/api``
  (``/api/headforcing/estimate``).

``POST /headforcing/live`` — a prompt for a running sampler, from its panel: answered by
:func:`~.live.live_response` (``nodes/live.py`` documents the trip and the checks; docs/live.md the API).

``GET /headforcing/model_presets`` — the AR sampler's model presets as the widget values each one
fills in the browser (:data:`~.comfy_bridge.MODEL_PRESETS`, the table the sampler itself applies):
200 ``{"ok": true, "custom": "custom", "presets": {name: {"frames_per_block", "steps",
"first_chunk_steps", "shift", "source"}}}``.
"""
from __future__ import annotations

import asyncio
import logging
import math

from headforcing_core.errors import HeadForcingError, ProfileError
from headforcing_core.geometry import SPACE_COMPRESSION, latent_frames_for, seconds_of, video_frames_for
from headforcing_core.memory import estimate_run
from headforcing_core.names import check_name
from headforcing_core.policies import make_policy
from headforcing_core.profiling import is_preset, resolve_profile

from .comfy_bridge import CUSTOM_PRESET, MODEL_PRESETS
from .files import profile_folders
from .live import LIVE_PATH, MAX_BODY_BYTES, live_response
from .policy import HeadForcingCachePolicy, policy_output

log = logging.getLogger("headforcing")

ESTIMATE_PATH = "/headforcing/estimate"
MODEL_PRESETS_PATH = "/headforcing/model_presets"
_registered = False
MAX_QUERY_VALUE_LEN = 512
WIDGET_TYPES = ("INT", "FLOAT", "COMBO", "STRING", "BOOLEAN")


class BadRequest(ValueError):
    pass


def _policy_inputs() -> dict[str, tuple]:
    """``{name: (io_type, options)}`` of the policy node's widget inputs (default, min, max, options), from its
    V3 schema."""
    out = {}
    for inp in HeadForcingCachePolicy.define_schema().inputs:
        io_type = inp.get_io_type()
        if io_type in WIDGET_TYPES:
            out[inp.id] = (io_type, inp.as_dict())
    return out


def parse_estimate_query(query) -> dict:
    """Checked widget values (node defaults for missing ones) and the optional profile name."""
    inputs = _policy_inputs()
    unknown = sorted(set(query) - set(inputs) - {"profile"})
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(inputs))}, profile")
    values = {}
    for name, (io_type, opts) in inputs.items():
        raw = query.get(name)
        if raw is None:
            if "default" not in opts:
                raise BadRequest(f"missing parameter {name}")
            values[name] = opts["default"]
            continue
        raw = str(raw)
        if len(raw) > MAX_QUERY_VALUE_LEN:
            raise BadRequest(f"{name} is too long")
        if io_type == "INT":
            try:
                v = int(raw.strip())
            except ValueError:
                raise BadRequest(f"{name} must be an integer, got {raw!r}") from None
        elif io_type == "FLOAT":
            try:
                v = float(raw.strip())
            except ValueError:
                raise BadRequest(f"{name} must be a number, got {raw!r}") from None
            if not math.isfinite(v):
                raise BadRequest(f"{name} must be finite, got {raw!r}")
        elif io_type == "BOOLEAN":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise BadRequest(f"{name} must be true or false, got {raw!r}")
            v = raw.lower() in ("true", "1")
        elif io_type == "COMBO":
            options = [str(o) for o in opts.get("options", [])]
            if raw not in options:
                raise BadRequest(f"{name} must be one of {', '.join(options)}; got {raw!r}")
            v = raw
        else:
            v = raw
        if io_type in ("INT", "FLOAT"):
            lo, hi = opts.get("min"), opts.get("max")
            if lo is not None and v < lo:
                raise BadRequest(f"{name} must be at least {lo}, got {v}")
            if hi is not None and v > hi:
                raise BadRequest(f"{name} must be at most {hi}, got {v}")
        values[name] = v
    profile = query.get("profile")
    if profile is not None:
        profile = str(profile)
        if not profile.strip() or len(profile) > MAX_QUERY_VALUE_LEN or "\x00" in profile:
            raise BadRequest("profile must be a profile name listed by Load Head Profile")
        if not is_preset(profile):
            try:
                check_name(profile, kind="head profile")
            except HeadForcingError as e:
                raise BadRequest(f"profile: {e}") from None
    return {"values": values, "profile": profile or None}


def _load_profile(name: str):
    """A HEAD_PROFILE by the names Load Head Profile accepts (a preset or a file in its folders)."""
    return resolve_profile(name, profile_folders())


def compute_estimate(values: dict, profile_name: str | None = None) -> dict:
    """The policy node's output for these widget values, plus the numbers behind its summary."""
    profile = _load_profile(profile_name) if profile_name else None
    out = policy_output(values, profile)
    width, height, frames = int(values["width"]), int(values["height"]), int(values["length"])
    latent = latent_frames_for(frames)
    lh, lw = height // SPACE_COMPRESSION, width // SPACE_COMPRESSION
    est = estimate_run(out.spec, out.policy, latent_frames=latent, latent_height=lh, latent_width=lw,
                       frames_per_block=3)
    window = estimate_run(out.spec, make_policy("self_forcing_window"), latent_frames=latent, latent_height=lh,
                          latent_width=lw, frames_per_block=3)
    return {
        "ok": True,
        "summary": out.summary,
        "preset": values.get("preset"),
        "profile": profile_name,
        # byte counts as whole numbers (the core's per-type budgets may come as floats, e.g. pyramid_forcing's)
        "kv_bytes": round(est.kv_bytes),
        "kv_bytes_by_type": {t: round(b) for t, b in est.kv_bytes_by_type.items()},
        "activation_bytes": round(est.activation_bytes),
        "text_bytes": round(est.text_bytes),
        "total_bytes": round(est.total_bytes),
        "attended_frames": round(est.attended_tokens / est.tokens_per_frame, 3),
        "latent_frames": latent,
        "frames": video_frames_for(latent),
        "seconds": round(seconds_of(latent), 3),
        "window_kv_bytes": round(window.kv_bytes),
        "notes": list(est.notes),
    }


def estimate_response(query) -> tuple[int, dict]:
    """(HTTP status, JSON body) for a query mapping; never raises, never answers 5xx.

    400: a bad parameter (the message names it); 404: no profile of that name; 422: the named
    profile file is damaged or does not fit (its schema error names the field); 422 also for
    anything else that goes wrong computing the figure (logged with its traceback).
    """
    try:
        parsed = parse_estimate_query(query)
    except (BadRequest, HeadForcingError, ValueError) as e:
        return 400, {"ok": False, "error": str(e)}
    try:
        return 200, compute_estimate(parsed["values"], parsed["profile"])
    except ProfileError as e:
        status = 404 if str(e).startswith("no head profile") else 422
        return status, {"ok": False, "error": str(e)}
    except (HeadForcingError, ValueError) as e:  # HeadForcingError subclasses are ValueErrors
        return 400, {"ok": False, "error": str(e)}
    except Exception as e:  # never take the server down (or answer 5xx) for a figure
        log.exception("headforcing: %s failed", ESTIMATE_PATH)
        return 422, {"ok": False, "error": f"the estimate could not be computed for these values "
                                           f"({type(e).__name__}: {e}); the server log has the details"}


def model_presets_response() -> dict:
    """The model presets as the sampler widgets they fill (``custom`` fills nothing)."""
    return {"ok": True, "custom": CUSTOM_PRESET,
            "presets": {name: {**preset.widget_values(), "source": preset.source}
                        for name, preset in MODEL_PRESETS.items() if preset is not None}}


async def read_limited(stream, limit: int) -> bytes:
    """A request body up to ``limit`` + 1 bytes (a longer one is refused without being held): ``read(n)``
    returns what has arrived, so read until the end or past the limit."""
    parts, size = [], 0
    while size <= limit:
        part = await stream.read(limit + 1 - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


def register_routes() -> bool:
    """Add the routes to ``PromptServer.instance.routes`` (once). False outside a server."""
    global _registered
    if _registered:
        return True
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    srv = getattr(PromptServer, "instance", None)
    if srv is None:
        return False

    @srv.routes.get(ESTIMATE_PATH)
    async def headforcing_estimate(request):
        query = {k: request.query.get(k) for k in request.query.keys()}
        status, body = await asyncio.to_thread(estimate_response, query)
        return web.json_response(body, status=status)

    @srv.routes.post(LIVE_PATH)
    async def headforcing_live(request):
        status, body = live_response(await read_limited(request.content, MAX_BODY_BYTES))
        return web.json_response(body, status=status)

    @srv.routes.get(MODEL_PRESETS_PATH)
    async def headforcing_model_presets(request):
        return web.json_response(model_presets_response())

    _registered = True
    return True
