"""What the server tells the browser extension (``web/headforcing.js``), in one place.

Two channels, both plain JSON:

* **Node UI data** (``io.NodeOutput(..., ui=...)``): ComfyUI sends a node's ``ui`` dict to the
  browser that queued the prompt as the ``executed`` event (``detail.output``), stores it in
  ``/history`` and re-sends it when the node's result comes from the cache. Every value of a
  ``ui`` dict must be a list (ComfyUI concatenates the lists of list-mapped calls).
  :func:`head_map_ui` builds the ``headforcing_head_map`` entry the profile nodes add next to
  their heat-map PNG; the extension draws it as an interactive head map. :data:`TYPE_COLORS` is
  the one palette of head types: the payload carries it, and the PNG (``nodes/heat_map.py``)
  is drawn with it, so the two never disagree.
* **Progress events** (:func:`send_progress`): ``PromptServer.instance.send_sync(
  "headforcing.progress", payload, client_id)`` — a websocket message to the client that
  queued the prompt (``client_id`` is the server's ``client_id`` of the running prompt; ComfyUI's
  own ``progress`` messages use the same, and broadcast when it is None). The AR sampler sends one
  per committed chunk through :class:`SamplerPanel`.

Payload formats are documented in docs/web.md; the extension ignores fields it does not know
and every payload carries ``"v": 1``.

Chunk previews: the panel carries its own small JPEG (data URL) of the chunk's newest latent
frame, made with the model's latent→RGB factors (``latent_format.latent_rgb_factors``; a linear
map, ~1 ms). It does not depend on the server's ``--preview-method`` (ComfyUI's own previews
stay as they are, shown by ComfyUI on the node when that flag is on).

Nothing here may break a run: every send is wrapped, a failure is logged once and dropped.

Imports nothing from ComfyUI at load (the server only inside :func:`send_progress`) and nothing
of the other node modules: it sits below them all.
"""
from __future__ import annotations

import base64
import contextlib
import contextvars
import io as _io
import logging
import math
import time
from typing import Any

from headforcing_core.geometry import FPS, TIME_COMPRESSION, chunk_bounds, seconds_of

log = logging.getLogger("headforcing")

PAYLOAD_VERSION = 1
EVENT_PROGRESS = "headforcing.progress"
EVENT_LIVE = "headforcing.live"  # a live switch applied, waiting, refused or expired (nodes/live.py)
HEAD_MAP_KEY = "headforcing_head_map"
TAKE_KEY = "headforcing_take"  # the sampler's / Continue's take (schedule text), in its UI data
PREVIEW_MAX_SIDE = 192

# head type -> RGB: the one palette of the head map, drawn by the browser from this payload and into
# the heat-map PNG by nodes/heat_map.py
TYPE_COLORS = {
    "local": (232, 126, 34),     # orange
    "anchor": (52, 101, 164),    # blue
    "memory": (46, 160, 90),     # green
    "wave": (142, 68, 173),      # purple
    "veil": (22, 160, 160),      # teal
    "all": (140, 140, 140),
}
# per-head statistics shown on hover (HeadSummary attribute -> label)
HOVER_STATS = (
    ("sink_mass", "sink"),
    ("middle_mass", "middle"),
    ("recent_mass", "recent"),
    ("current_mass", "current"),
    ("period", "period"),
    ("period_strength", "period strength"),
)

_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning("headforcing: " + msg, *args)


# ---------------------------------------------------------------------------------------------
# head map (profile nodes)


def type_colors() -> dict[str, str]:
    """``{type: "#rrggbb"}`` for every head type."""
    return {t: "#%02x%02x%02x" % rgb for t, rgb in TYPE_COLORS.items()}


def _num(x) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return round(v, 4) if math.isfinite(v) else None


def head_map_payload(profile) -> dict:
    """JSON the extension draws: layers × heads of type codes, colours, and per-head statistics.

    ``profile`` is a :class:`headforcing_core.profiling.HeadProfile` (its primary labels are
    drawn; labels of the other taxonomies travel along for the hover text), or a bare
    :class:`headforcing_core.policies.HeadLabels`.
    """
    from headforcing_core.policies import TAXONOMIES

    labels = getattr(profile, "labels", None)
    if labels is None or not hasattr(profile, "labels_by_taxonomy"):
        labels, profile = profile, None
    layers, heads = labels.shape
    types = list(TAXONOMIES[labels.taxonomy])
    codes = [[types.index(t) for t in row] for row in labels.types]
    other = {}
    stats = None
    name = source = ""
    if profile is not None:
        name = getattr(profile, "name", "") or ""
        source = getattr(profile, "source", "") or ""
        for tax, lab in profile.labels_by_taxonomy.items():
            if tax == labels.taxonomy or tax not in TAXONOMIES:
                continue
            names = list(TAXONOMIES[tax])
            other[tax] = {"types": names, "labels": [[names.index(t) for t in row] for row in lab.types]}
        if getattr(profile, "stats", None) is not None:
            try:
                summ = profile.summary()
                stats = {key: [[_num(v) for v in row] for row in getattr(summ, key).tolist()]
                         for key, _ in HOVER_STATS}
            except Exception as e:  # statistics too short to summarize: labels only
                _warn_once("head_map_stats", "head map without statistics: %s", e)
                stats = None
    counts = labels.counts()
    return {
        "v": PAYLOAD_VERSION,
        "name": name,
        "source": source or labels.source,
        "taxonomy": labels.taxonomy,
        "layers": layers,
        "heads": heads,
        "types": types,
        "labels": codes,
        "counts": {t: counts.get(t, 0) for t in types},
        "colors": {t: c for t, c in type_colors().items() if t in types or any(
            t in o["types"] for o in other.values())},
        "other": other,
        "stats": stats,
        "stat_names": {key: label for key, label in HOVER_STATS},
    }


def head_map_ui(profile) -> dict:
    """The ``ui`` entry of a profile node: ``{"headforcing_head_map": [payload]}`` (merge it into
    the node's other ui entries). Never raises: a broken payload only loses the drawing."""
    try:
        return {HEAD_MAP_KEY: [head_map_payload(profile)]}
    except Exception as e:
        _warn_once("head_map", "could not build the head map for the browser: %s", e)
        return {}


# ---------------------------------------------------------------------------------------------
# progress events (sampler)


def _server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def executing_node() -> tuple[str | None, str | None]:
    """(prompt id, node id) of the node ComfyUI is executing now, or (None, None)."""
    try:
        from comfy_execution.utils import get_executing_context
        ctx = get_executing_context()
    except ImportError:
        ctx = None
    if ctx is None:
        return None, None
    return ctx.prompt_id, ctx.node_id


def running_client() -> str | None:
    """ComfyUI's ``client_id`` of the prompt running now (the browser that queued it), or None."""
    srv = _server()
    return getattr(srv, "client_id", None) if srv is not None else None


def send_progress(node_id: str | None, payload: dict, *, event: str = EVENT_PROGRESS) -> bool:
    """Send ``payload`` (plus ``node``, ``prompt_id``, ``v``) to the browser that queued the running
    prompt. Returns whether it was handed to the server; never raises."""
    try:
        srv = _server()
        if srv is None:
            return False
        prompt_id, ctx_node = executing_node()
        node = node_id if node_id is not None else ctx_node
        if node is None:  # not inside a node's execution: nobody to address
            return False
        data = dict(payload)
        data.setdefault("v", PAYLOAD_VERSION)
        data["node"] = str(node)
        data.setdefault("prompt_id", prompt_id or getattr(srv, "last_prompt_id", None))
        srv.send_sync(event, data, getattr(srv, "client_id", None))
        return True
    except Exception as e:
        _warn_once("send", "could not send %s: %s", event, e)
        return False


def preview_frames(x0, latent_format=None, max_side: int = PREVIEW_MAX_SIDE) -> list[str]:
    """Small JPEG data URLs of every latent frame of ``x0`` (``[B, C, T, h, w]``, the model's normalized latent
    space, batch 0) through ``latent_format``'s latent→RGB factors — each one stands for 4 video frames —
    or [] when the format has none."""
    try:
        import numpy as np
        from PIL import Image

        factors = getattr(latent_format, "latent_rgb_factors", None)
        if factors is None:
            return []
        frames = x0[0].detach().float().cpu().numpy()  # [C, T, h, w]
        f = np.asarray(factors, dtype=np.float32)  # [C, 3]
        if f.shape[0] != frames.shape[0]:
            return []
        # numpy, not torch: torch would spread this small product over the server's threads, and on a busy
        # CPU that contention costs 30x (measured: 2 ms vs 60-80 ms for 3 frames at 832x480, 2 cores)
        rgb = np.tensordot(frames, f, axes=([0], [0]))  # [T, h, w, 3]
        bias = getattr(latent_format, "latent_rgb_factors_bias", None)
        if bias is not None:
            rgb = rgb + np.asarray(bias, dtype=np.float32)
        images = np.clip((rgb + 1.0) * 127.5, 0, 255).astype(np.uint8)
        out = []
        for img in images:
            im = Image.fromarray(img)
            h, w = img.shape[:2]
            scale = max_side / max(h, w)
            # latent frames are 8x smaller than the video: scale up small ones so they read as a picture
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
            buf = _io.BytesIO()
            im.save(buf, format="JPEG", quality=80)
            out.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"))
        return out
    except Exception as e:
        _warn_once("preview", "no chunk preview for the panel: %s", e)
        return []


class SamplerPanel:
    """Feeds the sampler's live panel: one ``headforcing.progress`` event per committed chunk.

    Made by :func:`live_panel` around a node's work; :meth:`configure` (through
    :func:`describe_run`) tells it what the run will do and announces the start; :meth:`chunk`
    (through :func:`chunk_done`, from the sampler's per-chunk hook) reports each committed chunk
    with its clean latent. ``segments`` are ``(prompt text or label, latent frames)`` in order,
    for multi-prompt schedules; the panel shows the segment the newest chunk belongs to.
    ``kv_bytes_at(latent_frames)`` gives the KV cache bytes held after that many committed frames
    (``estimate_run`` of the same policy), ``kv_budget_bytes`` the run's steady state. ``live``: what
    the panel's prompt box may send (``nodes/live.py`` ``LiveRun.panel_info``), None when the run takes
    no live input; :meth:`switched` follows a live switch.

    Every chunk brings its frames (``frames``: one small JPEG per latent frame, each standing for
    ``frame_seconds`` of video), which the panel plays at the video's own rate; the time they take to
    make is kept (:meth:`preview_line`, the report's "previews" line).
    """

    def __init__(self, node_id: str | None = None, send=send_progress):
        self.node_id = node_id if node_id is not None else executing_node()[1]
        self.send = send
        self.total = 0
        self.fpb = 1
        self.chunks = 0
        self.policy = ""
        self.latent_format = None
        self.segments: list[tuple[str, int]] = []
        self.kv_bytes_at = None
        self.kv_budget = None
        self.start_frame = 0
        self.size = (None, None)
        self.done_frames = 0
        self.done_chunks = 0
        self.t0 = time.perf_counter()
        self.sent = 0
        self.configured = False
        self.live: dict | None = None
        self.live_segments: set[int] = set()  # indexes of segments switched to live
        self.preview_seconds: list[float] = []
        self.preview_counts: list[int] = []

    def configure(self, *, total_latent_frames: int, frames_per_block: int, policy: str = "", latent_format=None,
                  segments: list[tuple[str, int]] | None = None, kv_bytes_at=None,
                  kv_budget_bytes: int | None = None, start_frame: int = 0, width: int | None = None,
                  height: int | None = None, live: dict | None = None) -> None:
        self.total = int(total_latent_frames)
        self.fpb = max(1, int(frames_per_block))
        self.chunks = len(chunk_bounds(0, self.total, self.fpb))
        self.policy = policy
        self.latent_format = latent_format
        self.segments = [(str(t), int(n)) for t, n in (segments or [])]
        self.kv_bytes_at = kv_bytes_at
        self.kv_budget = kv_budget_bytes
        self.start_frame = int(start_frame)
        self.size = (width, height)
        self.live = live
        self.configured = True
        self.begin()

    def switched(self, frame: int, label: str) -> None:
        """A live switch to ``label`` at the node's latent frame ``frame`` (from its start): the rest of the run
        is that prompt."""
        kept, edge = [], 0
        for text, n in self.segments:
            if edge + n <= frame:
                kept.append((text, n))
            elif edge < frame:
                kept.append((text, frame - edge))
            edge += n
        self.segments = kept + [(str(label), max(1, self.total - frame))]
        self.live_segments = {i for i in self.live_segments if i < len(kept)} | {len(kept)}

    def _segment(self, frame: int) -> tuple[int, str] | None:
        edge = 0
        for i, (text, n) in enumerate(self.segments):
            edge += n
            if frame < edge:
                return i, text
        return (len(self.segments) - 1, self.segments[-1][0]) if self.segments else None

    def payload(self, x0=None) -> dict:
        absolute = self.start_frame + self.done_frames
        p: dict[str, Any] = {
            "kind": "chunk",
            "chunk": self.done_chunks,
            "chunks": max(self.chunks, self.done_chunks),
            "latent_frames": self.done_frames,
            "latent_frames_total": max(self.total, self.done_frames),
            "seconds_done": round(seconds_of(absolute), 3),
            "seconds_total": round(seconds_of(self.start_frame + max(self.total, self.done_frames)), 3),
            "elapsed": round(time.perf_counter() - self.t0, 3),
            "policy": self.policy,
        }
        if self.size[0]:
            p["width"], p["height"] = self.size
        seg = self._segment(max(0, self.done_frames - 1))
        if seg is not None:
            p["segment"], p["segments"], p["prompt"] = seg[0] + 1, len(self.segments), seg[1][:500]
            p["segment_live"] = seg[0] in self.live_segments
        if self.kv_bytes_at is not None:
            try:
                p["kv_bytes"] = int(self.kv_bytes_at(absolute))
            except Exception as e:
                _warn_once("kv", "no KV figure for the panel: %s", e)
        if self.kv_budget is not None:
            p["kv_budget_bytes"] = int(self.kv_budget)
        if self.live is not None:
            p["live"] = self.live
        if x0 is not None:
            started = time.perf_counter()
            frames = preview_frames(x0, self.latent_format)
            self.preview_seconds.append(time.perf_counter() - started)
            self.preview_counts.append(len(frames))
            if frames:
                p["frames"], p["frame_seconds"], p["preview"] = frames, TIME_COMPRESSION / FPS, frames[-1]
        return p

    def preview_line(self) -> str:
        """The report's line on the chunk previews: frames per chunk and what they cost."""
        if not self.preview_seconds:
            return ""
        n = len(self.preview_seconds)
        mean, worst = sum(self.preview_seconds) / n, max(self.preview_seconds)
        frames = sum(self.preview_counts) / n
        return (f"previews: {frames:g} frames per chunk (latent→RGB, ≤ {PREVIEW_MAX_SIDE} px), {1000 * mean:.1f} ms per "
                f"chunk (worst {1000 * worst:.1f} ms) on the CPU, for {n} chunk{'s' if n != 1 else ''}")

    def begin(self) -> None:
        """Announce the run (chunk 0 of n) so the panel resets before the first chunk lands."""
        self.t0 = time.perf_counter()
        self.done_frames = self.done_chunks = 0
        p = self.payload()
        p["kind"] = "start"
        self.sent += bool(self.send(self.node_id, p))

    def chunk(self, x0) -> None:
        """A chunk was committed; ``x0`` is its clean latent ``[B, C, f, h, w]``."""
        try:
            self.done_chunks += 1
            self.done_frames += int(x0.shape[2])
            self.sent += bool(self.send(self.node_id, self.payload(x0)))
        except Exception as e:  # a panel must never break a run
            _warn_once("chunk", "panel update failed: %s", e)

    def finish(self, ok: bool = True) -> None:
        if not (self.configured or self.done_chunks):
            return
        p = self.payload()
        p["kind"] = "done" if ok else "stopped"
        self.sent += bool(self.send(self.node_id, p))


_PANEL: contextvars.ContextVar[SamplerPanel | None] = contextvars.ContextVar("headforcing_panel", default=None)


@contextlib.contextmanager
def live_panel(node_id: str | None = None, send=send_progress):
    """Around a sampling node's work: chunks committed inside feed that node's live panel.

    ``node_id`` defaults to the node ComfyUI is executing. Ends with a ``done`` (or, when the
    work raised, ``stopped``) event. Nested panels: the innermost one gets the chunks.
    """
    panel = SamplerPanel(node_id, send=send)
    token = _PANEL.set(panel)
    ok = False
    try:
        yield panel
        ok = True
    finally:
        _PANEL.reset(token)
        try:
            panel.finish(ok)
        except Exception as e:
            _warn_once("finish", "panel end failed: %s", e)


def current_panel() -> SamplerPanel | None:
    return _PANEL.get()


def describe_run(**run) -> None:
    """Tell the active panel (if any) what the run will do: :meth:`SamplerPanel.configure`'s keywords."""
    panel = _PANEL.get()
    if panel is None:
        return
    try:
        panel.configure(**run)
    except Exception as e:
        _warn_once("configure", "panel set-up failed: %s", e)


def chunk_done(x0) -> None:
    """From the sampler's per-chunk hook: report a committed chunk to the active panel (if any)."""
    panel = _PANEL.get()
    if panel is not None:
        panel.chunk(x0)


def preview_report() -> str:
    """The active panel's "previews" line for a node's report ("" without one)."""
    panel = _PANEL.get()
    return panel.preview_line() if panel is not None else ""


def live_switched(frame: int, label: str) -> None:
    """A live switch at the node's latent frame ``frame``: the active panel shows that prompt from there."""
    panel = _PANEL.get()
    if panel is not None:
        try:
            panel.switched(frame, label)
        except Exception as e:
            _warn_once("switched", "panel did not follow a switch: %s", e)
