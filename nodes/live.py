"""Live prompt input: a person steers a running AR Sampler (or Continue) from its panel in the page.

The trip of a live prompt, one way:

``POST /headforcing/live`` (``nodes/routes.py``) → :func:`live_response` (size, JSON, every field
checked: :func:`parse_request`) → :meth:`LiveRegistry.submit` (the run it was sent for: prompt id,
node and the browser that queued it) → :meth:`LiveRun.submit` (rates, limits; the request waits as the
run's *pending* switch, a newer one replaces it) → between two chunks the sampler's loop asks
:meth:`LiveRun.poll` (``headforcing_core.story_sampler``): the text is encoded there, with the graph's
own CLIP, into a :class:`~headforcing_core.live.LiveSwitch` that the core splices into the run's
plan at that chunk boundary. The panel hears back on the websocket (``headforcing.live``: applied,
waiting, refused, expired) and sees each chunk's frames as they come (``headforcing.progress``).

Safety: a request reaches only the run of its prompt id and node while that node runs, and only
from the browser that queued it (ComfyUI's ``client_id``); it carries text (bounded, one line, no
``|``) or the number of a prepared segment, never a name or a path, so it cannot touch files; each
run takes a few requests a second and a bounded number of switches; the route answers every
request with JSON and a 4xx for what it refuses, and no failure of a switch can stop the run.

A live run is not reproducible from the node's inputs alone, and ComfyUI caches the node's outputs
by its inputs: running the same graph again shows the same take. Its ``take`` output (schedule
text) is what re-renders it: :func:`headforcing_core.live.take_text`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

from headforcing_core.geometry import chunk_bounds
from headforcing_core.live import LiveSwitch, describe_switch, take_text
from headforcing_core.prompts import (MAX_TRANSITION_FRAMES, RECACHE_MODES, TRANSITIONS, PromptSchedule,
                                      ScheduleError, shorten)

from .messages import EVENT_LIVE, executing_node, live_switched, running_client, send_progress

log = logging.getLogger("headforcing")

LIVE_PATH = "/headforcing/live"
MAX_BODY_BYTES = 8192  # a request is a few hundred bytes
MAX_TEXT_CHARS = 1000  # a prompt (umT5 reads 512 tokens)
MAX_ID_CHARS = 128  # prompt ids, node ids, client ids
MAX_INTERPOLATE_CHUNKS = 64
RATE_PER_SECOND = 2.0  # requests a run takes, on average ...
RATE_BURST = 5  # ... and at once
MAX_SWITCHES = 256  # switches one run makes
FINISHED_KEPT = 64  # finished runs remembered (to say "finished" rather than "unknown")
MAX_OFFERED = 64  # prepared segments the panel offers by name


class LiveError(ValueError):
    """A refused request: HTTP ``status`` and a message for the person."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LiveRequest:
    """A checked request: for ``prompt_id``'s node ``node``, sent by ``client_id``; a new prompt (``text``) or a
    prepared segment (``segment``, 1-based), and the transition into it."""

    prompt_id: str
    node: str
    client_id: str | None
    text: str | None
    segment: int | None
    transition: str
    frames: int
    recache_mode: str | None

    def describe(self) -> str:
        what = f"{self.text!r}" if self.text is not None else f"prepared segment {self.segment}"
        trans = self.transition if self.transition == "cut" else f"{self.transition} {self.frames}"
        return f"{trans} → {shorten(what, 60)}"


def _id(body: dict, key: str, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_CHARS or not value.isprintable():
        raise LiveError(400, f"{key} must be the running {'prompt' if key == 'prompt_id' else key}'s id "
                             f"(a short string), got {shorten(repr(value), 40)}")
    return value.strip()


def parse_request(body) -> LiveRequest:
    """Every field of a request body checked (:class:`LiveError` 400 naming the field)."""
    if not isinstance(body, dict):
        raise LiveError(400, "the body must be a JSON object")
    known = {"prompt_id", "node", "client_id", "text", "segment", "transition", "frames", "recache_mode"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise LiveError(400, f"unknown field(s) {', '.join(map(str, unknown))[:200]}; known: {', '.join(sorted(known))}")
    prompt_id, node = _id(body, "prompt_id"), _id(body, "node")
    client_id = _id(body, "client_id", required=False)
    text, segment = body.get("text"), body.get("segment")
    if (text is None) == (segment is None):
        raise LiveError(400, "send either a text (a new prompt) or a segment (the number of a prepared one)")
    if text is not None:
        if not isinstance(text, str):
            raise LiveError(400, "text must be a string")
        if len(text) > MAX_TEXT_CHARS:
            raise LiveError(413, f"the prompt is {len(text)} characters; at most {MAX_TEXT_CHARS}")
        text = text.strip()
        if not text:
            raise LiveError(400, "the prompt is empty")
        if "|" in text or any(not c.isprintable() for c in text):
            raise LiveError(400, "a live prompt is one line of printable text without '|' (it becomes a line of the "
                                 "take's schedule text)")
    if segment is not None and (not isinstance(segment, int) or isinstance(segment, bool) or segment < 1):
        raise LiveError(400, f"segment must be a whole number ≥ 1, got {shorten(repr(segment), 40)}")
    transition = body.get("transition", "cut")
    if transition not in TRANSITIONS:
        raise LiveError(400, f"transition must be one of {', '.join(TRANSITIONS)}, got {shorten(repr(transition), 40)}")
    frames = body.get("frames", 0)
    if not isinstance(frames, int) or isinstance(frames, bool):
        raise LiveError(400, f"frames must be a whole number, got {shorten(repr(frames), 40)}")
    limits = {"cut": (0, math.inf), "recache": (1, MAX_TRANSITION_FRAMES), "blend": (1, 10_000),
              "interpolate": (1, MAX_INTERPOLATE_CHUNKS)}
    lo, hi = limits[transition]
    if transition == "cut":
        frames = 0
    elif not lo <= frames <= hi:
        unit = "chunks" if transition == "interpolate" else "latent frames"
        raise LiveError(400, f"{transition} takes {lo}-{hi} {unit}, got {frames}")
    mode = body.get("recache_mode")
    if mode is not None and (transition != "recache" or mode not in RECACHE_MODES):
        raise LiveError(400, f"recache_mode goes with a recache and is one of {', '.join(RECACHE_MODES)} (or none: "
                             f"the policy's default), got {shorten(repr(mode), 40)}")
    return LiveRequest(prompt_id, node, client_id, text, segment, transition, frames, mode)


# ---------------------------------------------------------------------------------------------
# one run that takes live input


@dataclass(frozen=True)
class Prepared:
    """A prompt the run already has encoded (a segment of its schedule): the panel offers it by number."""

    label: str
    context: object
    text: str | None


class LiveRun:
    """A running node's live input: the route submits requests (the server's loop), the sampler polls them
    between chunks (the prompt worker); a lock keeps the two apart, and nothing slow runs under it.

    ``encode(text)`` → ``[1, L, C]`` (the graph's CLIP) or None without one; ``check(context)`` raises for a
    conditioning the model cannot take; ``chunks``: chunks the node makes; ``end_frame``: the frame after
    its last (``start_frame``: its first); ``send(payload)``: a ``headforcing.live`` event to the page."""

    def __init__(self, prompt_id: str, node: str, client_id: str | None, *, encode=None, check=None,
                 prepared: list[Prepared] = (), chunks: int = 0,
                 start_frame: int = 0, end_frame: int = 0, send=None, clock=time.monotonic):
        self.prompt_id, self.node, self.client_id = prompt_id, node, client_id
        self.encode, self.check = encode, check
        self.prepared = list(prepared)
        self.chunks, self.start_frame, self.end_frame = int(chunks), int(start_frame), int(end_frame)
        self.send = send or (lambda payload: None)
        self.clock = clock
        self.lock = threading.Lock()
        self.running = 0  # the chunk being made (1-based; 0 before the first)
        self.pending: LiveRequest | None = None
        self.pending_since = 0  # the chunk that was running when it came
        self.switches: list[dict] = []
        self.waiting_told = False
        self.tokens, self.refill_at = float(RATE_BURST), clock()
        self.closed = False

    # ---- what the panel is told when the run starts ------------------------------------------
    def panel_info(self) -> dict:
        return {"text": self.encode is not None, "prompt_id": self.prompt_id, "max_chars": MAX_TEXT_CHARS,
                "segments": [p.label[:200] for p in self.prepared[:MAX_OFFERED]], "transitions": list(TRANSITIONS),
                "max_interpolate": MAX_INTERPOLATE_CHUNKS, "max_recache": MAX_TRANSITION_FRAMES}

    # ---- the route's side --------------------------------------------------------------------
    def _take_token(self) -> bool:
        now = self.clock()
        self.tokens = min(RATE_BURST, self.tokens + (now - self.refill_at) * RATE_PER_SECOND)
        self.refill_at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def submit(self, req: LiveRequest) -> dict:
        """Queue ``req`` for the next chunk boundary (a :class:`LiveError` says why not)."""
        with self.lock:
            if self.closed:
                raise LiveError(409, f"the run of prompt {self.prompt_id} has finished: live input goes to a running "
                                     "sampler")
            if self.client_id is None:
                raise LiveError(403, "this prompt was queued without a client_id: only a run queued by a browser tab "
                                     "(or a client that sends its client_id with the prompt) takes live input, from it")
            if req.client_id != self.client_id:
                raise LiveError(403, "this run was queued from another browser tab or client: only it can steer it")
            if not self._take_token():
                raise LiveError(429, f"too many requests: a run takes {RATE_PER_SECOND:g} a second (a burst of "
                                     f"{RATE_BURST}); wait a moment")
            if len(self.switches) >= MAX_SWITCHES:
                raise LiveError(429, f"this run has made {MAX_SWITCHES} switches, the most one run takes")
            if self.running >= self.chunks:
                raise LiveError(409, f"the run is making its last chunk ({self.running} of {self.chunks}): "
                                     "nothing is left to switch")
            if req.text is not None and self.encode is None:
                raise LiveError(409, "this sampler has no text encoder: connect the graph's CLIP to its 'clip' input "
                                     "to type prompts (or pick a prepared segment)")
            if req.segment is not None and req.segment > len(self.prepared):
                raise LiveError(400, f"segment {req.segment}: this run has {len(self.prepared)} prepared "
                                     f"segment{'s' if len(self.prepared) != 1 else ''}")
            replaced = self.pending is not None
            self.pending, self.pending_since, self.waiting_told = req, self.running, False
            at = self.running + 1
        message = (f"{req.describe()}: at chunk {at} (the next boundary)"
                   + ("; it replaces the switch that was waiting" if replaced else ""))
        return {"ok": True, "status": "queued", "running_chunk": at - 1, "takes_effect_at_chunk": at,
                "replaced": replaced, "message": message}

    # ---- the sampler's side (headforcing_core.live.LiveInput) --------------------------------------
    def poll(self, frame: int, busy: str | None) -> LiveSwitch | None:
        """Before the chunk at latent frame ``frame``: the pending switch (encoded now), or None."""
        with self.lock:
            self.running += 1
            chunk, req, sent_during = self.running, self.pending, self.pending_since
            if req is None:
                return None
            if busy is not None:
                tell, self.waiting_told = not self.waiting_told, True
            else:
                self.pending = None
        if busy is not None:
            if tell:
                self._event("waiting", req, chunk, frame, f"{req.describe()} waits: {busy}")
            return None
        try:
            switch = self._switch(req, frame)
        except Exception as e:  # a switch that cannot be made never stops the run
            self._event("refused", req, chunk, frame, f"{req.describe()} was not made: {e}")
            return None
        with self.lock:
            self.switches.append({"chunk": chunk, "frame": frame, "text": switch.text, "transition": req.transition,
                                  "frames": req.frames, "sent_during_chunk": sent_during})
        live_switched(frame - self.start_frame, switch.text)  # the panel shows the new prompt from there
        self._event("applied", req, chunk, frame, f"{describe_switch(switch)} at chunk {chunk} (latent frame {frame})",
                    sent_during_chunk=sent_during)
        return switch

    def _switch(self, req: LiveRequest, frame: int) -> LiveSwitch:
        if req.transition == "blend" and req.frames > self.end_frame - frame:
            raise ScheduleError(f"a blend over {req.frames} latent frames does not fit the {self.end_frame - frame} "
                                "frames left")
        if req.segment is not None:
            prep = self.prepared[req.segment - 1]
            context, text = prep.context, prep.text
            if not text:
                text = prep.label or f"prepared segment {req.segment}"
        else:
            context, text = self.encode(req.text), req.text
        if self.check is not None:
            self.check(context)
        return LiveSwitch(context, text, req.transition, req.frames, req.recache_mode)

    def _event(self, kind: str, req: LiveRequest | None, chunk: int, frame: int | None, message: str, **extra):
        payload = {"kind": kind, "chunk": chunk, "chunks": self.chunks, "frame": frame, "message": message,
                   "prompt_id": self.prompt_id, "switches": len(self.switches), **extra}
        if req is not None:
            payload["request"] = {"text": req.text, "segment": req.segment, "transition": req.transition,
                                  "frames": req.frames, "recache_mode": req.recache_mode}
        try:
            self.send(payload)
        except Exception as e:  # the page not hearing back never stops the run
            log.warning("headforcing: live event not sent: %s", e)

    def finish(self) -> None:
        with self.lock:
            self.closed, req = True, self.pending
            self.pending = None
        if req is not None:
            self._event("expired", req, self.running, None,
                        f"{req.describe()} was not made: the run ended (chunk {self.running} of {self.chunks}) first")

    def report_lines(self) -> list[str]:
        if not self.switches:
            return []
        made = "; ".join(f"chunk {s['chunk']} (frame {s['frame']}): "
                         + (s["transition"] if s["transition"] == "cut" else f"{s['transition']} {s['frames']}")
                         + f" → {shorten(s['text'], 50)!r}" for s in self.switches)
        return [f"live: {len(self.switches)} switch{'es' if len(self.switches) != 1 else ''}: {made}"]


# ---------------------------------------------------------------------------------------------
# the runs that take input now


class LiveRegistry:
    """The runs taking live input, by (prompt id, node), and the last finished ones (to say so)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.runs: dict[tuple[str, str], LiveRun] = {}
        self.finished: OrderedDict[str, str] = OrderedDict()  # prompt id -> node

    def open(self, run: LiveRun) -> None:
        with self.lock:
            self.runs[(run.prompt_id, run.node)] = run

    def close(self, run: LiveRun) -> None:
        run.finish()
        with self.lock:
            self.runs.pop((run.prompt_id, run.node), None)
            self.finished[run.prompt_id] = run.node
            self.finished.move_to_end(run.prompt_id)
            while len(self.finished) > FINISHED_KEPT:
                self.finished.popitem(last=False)

    def submit(self, req: LiveRequest, queue_state=None) -> dict:
        with self.lock:
            run = self.runs.get((req.prompt_id, req.node))
            others = [r for (pid, _), r in self.runs.items() if pid == req.prompt_id]
            finished = req.prompt_id in self.finished
        if run is None:
            if others:
                raise LiveError(404, f"node {req.node} of prompt {req.prompt_id} takes no live input now (node "
                                     f"{others[0].node} does)")
            if finished:
                raise LiveError(409, f"the run of prompt {req.prompt_id} has finished: live input goes to a running "
                                     "sampler")
            where = (queue_state or prompt_state)(req.prompt_id)
            raise LiveError(404, {"queued": f"prompt {req.prompt_id} is waiting in the queue: it takes live input once "
                                            "its sampler runs",
                                  "running": f"prompt {req.prompt_id} is running, but no sampler of it takes live input "
                                             "now (it runs another node, or has not reached its sampler)"}.get(
                where, f"no run of prompt {req.prompt_id} takes live input here (unknown, or finished long ago)"))
        return run.submit(req)


REGISTRY = LiveRegistry()


def prompt_state(prompt_id: str) -> str | None:
    """"running" / "queued" when ComfyUI's queue holds ``prompt_id``, else None."""
    try:
        from server import PromptServer
        running, queued = PromptServer.instance.prompt_queue.get_current_queue_volatile()
    except Exception:
        return None
    if any(len(x) > 1 and x[1] == prompt_id for x in running):
        return "running"
    if any(len(x) > 1 and x[1] == prompt_id for x in queued):
        return "queued"
    return None


def live_response(raw: bytes, registry: LiveRegistry = REGISTRY) -> tuple[int, dict]:
    """(HTTP status, JSON body) for a request body; never raises, never answers 5xx."""
    try:
        if len(raw) > MAX_BODY_BYTES:
            raise LiveError(413, f"the request is {len(raw)} bytes; at most {MAX_BODY_BYTES}")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise LiveError(400, "the body must be JSON (UTF-8)") from None
        return 202, registry.submit(parse_request(body))
    except LiveError as e:
        return e.status, {"ok": False, "error": str(e)}
    except Exception as e:  # never take the server down (or answer 5xx) for a live prompt
        log.exception("headforcing: %s failed", LIVE_PATH)
        return 422, {"ok": False, "error": f"the live prompt could not be taken ({type(e).__name__}: {e})"}


# ---------------------------------------------------------------------------------------------
# the node's side


def graph_texts(prompt, node_id, schedule: PromptSchedule) -> PromptSchedule:
    """``schedule`` with the text of each segment whose conditioning comes from a CLIPTextEncode with a literal
    text in the queued prompt (ComfyUI's hidden ``PROMPT``): a take writes prompts as text. The sampler's
    ``conditioning``, or a chain of Prompt Segment nodes on ``prompt_schedule``; other sources keep no text."""
    try:
        node = prompt[str(node_id)]["inputs"]
        link = node.get("prompt_schedule")
        texts = _chain_texts(prompt, link) if isinstance(link, list) else [_text_of(prompt, node.get("conditioning"))]
    except (KeyError, TypeError, IndexError, AttributeError):
        return schedule
    if len(texts) > len(schedule):
        return schedule
    texts = [None] * (len(schedule) - len(texts)) + texts  # a chain that starts from another schedule node
    return PromptSchedule(tuple(replace(seg, text=t) if seg.text is None and t else seg
                                for seg, t in zip(schedule, texts)))


def _text_of(prompt, link) -> str | None:
    if not isinstance(link, list):
        return None
    src = prompt.get(str(link[0]), {})
    text = src.get("inputs", {}).get("text")
    return text if src.get("class_type") == "CLIPTextEncode" and isinstance(text, str) else None


def _chain_texts(prompt, link) -> list:
    """Texts of a chain of Prompt Segment nodes ending at ``link``, first to last."""
    out = []
    while isinstance(link, list) and len(out) < 10_000:
        src = prompt.get(str(link[0]), {})
        if src.get("class_type") != "HeadForcingPromptSegment":
            break
        out.insert(0, _text_of(prompt, src["inputs"].get("conditioning")))
        link = src["inputs"].get("previous")
    return out


CLIP_TOOLTIP = ("Optional: the graph's text encoder (CLIPLoader, type 'wan'). Connected, the node's panel takes "
                "prompts typed while it runs: each is encoded here, between two chunks, and switched in at the next "
                "chunk boundary (cut, recache, blend or interpolate). The switches are recorded in 'take'.")
TAKE_TOOLTIP = ("The run as schedule text, live switches included (one 'length | prompt | transition' per line). "
                "In a Prompt Schedule From Text node (same CLIP) on this node's prompt_schedule, with the same seed, "
                "it renders the same video again; the panel's 'Use take' button does that for you.")


def schedule_texts(prompt, schedule: PromptSchedule) -> PromptSchedule:
    """:func:`graph_texts` of the executing node (ComfyUI's hidden ``PROMPT`` of it)."""
    node = executing_node()[1]
    return schedule if prompt is None or node is None else graph_texts(prompt, node, schedule)


@contextlib.contextmanager
def live_input(schedule: PromptSchedule, *, clip=None, spec=None, batch: int = 1, start_frame: int,
               frames_per_block: int):
    """Around a node's run: a :class:`LiveRun` for the executing node (None outside a prompt), open in
    :data:`REGISTRY` while it runs. ``schedule``: the node's prepared segments (offered by number); ``clip``:
    the text encoder of typed prompts; ``spec``: the model's shape, which a switched-in prompt must fit."""
    prompt_id, node = executing_node()
    if prompt_id is None or node is None:
        yield None
        return
    encode = None
    if clip is not None:
        from .comfy_bridge import conditioning_tensor
        from .prompts import encode_prompt

        def encode(text):
            return conditioning_tensor(encode_prompt(clip, text))
    prepared = [Prepared(seg.text or seg.label or f"segment {i + 1}", seg.context, seg.text)
                for i, seg in enumerate(schedule)]
    chunks = sum(len(chunk_bounds(0, seg.frames, frames_per_block)) for seg in schedule)
    run = LiveRun(prompt_id, str(node), running_client(), encode=encode,
                  check=None if spec is None else (lambda ctx: spec.check_context(ctx, batch)), prepared=prepared,
                  chunks=chunks, start_frame=start_frame, end_frame=start_frame + schedule.total_frames,
                  send=lambda payload: send_progress(node, payload, event=EVENT_LIVE))
    REGISTRY.open(run)
    try:
        yield run
    finally:
        REGISTRY.close(run)


def take_result(history: list[dict], frames_per_block: int, live: LiveRun | None, *, seed: int) -> tuple[str, list[str]]:
    """The ``take`` output (schedule text of ``history``, the node's own segments) and the report's lines on it."""
    switches = len(live.switches) if live is not None else 0
    comments = [f"Head Forcing take, seed {seed}, {switches} live switch{'es' if switches != 1 else ''}. Re-render: "
                "this text in Prompt Schedule From Text (the same CLIP) on the same node's prompt_schedule, same seed."]
    text, problems = take_text(history, frames_per_block, comments)
    lines = live.report_lines() if live is not None else []
    return text, lines + [f"take: {p}" for p in problems]
