"""Live prompts through the real server (issue 22): the route, the CLIP path, the take.

* a sampler with the test-only text encoder (``HFTestTextEncoder``, a CLIP stand-in for umT5) on its
  ``clip`` input is steered twice over ``POST /headforcing/live`` while it runs (a cut, then Krea's
  interpolation); each switch lands at the chunk after the one it was sent during; the ``take``
  output is the schedule; the same graph with the take in Prompt Schedule From Text re-renders the
  latents bit for bit; Continue goes on from the take's AR_STATE;
* the route refuses, with a message: another browser's request, an unknown prompt, a finished run,
  bad fields, oversized bodies, a flood; the server stays up;
* ``nodes/live.py`` in-process: the rate limit, the last chunk, prepared segments, the graph's texts.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from .conftest import pack_module

torch = pytest.importorskip("torch")
from safetensors.torch import load_file  # noqa: E402

LIVE = "/headforcing/live"
FIRST = "a red fox trots through fresh snow"
SIZE = 128  # 16 x 16 latent: chunks slow enough (a fraction of a second on 2 CPU cores) to steer from a client
CHUNKS = 16  # room for the second switch on a fast machine too


def post(comfy, payload, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(comfy.url + LIVE, data=data, headers={"Content-Type": "application/json"},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def live_graph(comfy, prefix: str, *, schedule_text: str | None = None, seed: int = 3) -> dict:
    """UNETLoader + HFTestTextEncoder → CLIPTextEncode → sampler (clip connected) → SaveLatent; with
    ``schedule_text``, a Prompt Schedule From Text on the sampler's prompt_schedule too (the re-render)."""
    wf = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": comfy.models["wan"], "weight_dtype": "default"}},
        "2": {"class_type": "HFTestTextEncoder", "inputs": {}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": FIRST}},
        "4": {"class_type": "HeadForcingARSampler",
              "inputs": {"model": ["1", 0], "conditioning": ["3", 0], "clip": ["2", 0], "width": SIZE,
                         "height": SIZE, "length": 4 * 3 * CHUNKS - 3, "seed": seed, "policy": "head_forcing"}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": prefix}},
    }
    if schedule_text is not None:
        wf["6"] = {"class_type": "HeadForcingPromptScheduleFromText", "inputs": {"clip": ["2", 0],
                                                                                 "text": schedule_text}}
        wf["4"]["inputs"]["prompt_schedule"] = ["6", 0]
    return wf


def latents(comfy, entry) -> torch.Tensor:
    (path,) = comfy.outputs(entry, ".latent")
    return load_file(str(path))["latent_tensor"]


class Steer:
    """Sends switches from the websocket listener when chunks land; records the answers."""

    def __init__(self, comfy, plan: dict[int, dict]):
        self.comfy, self.plan = comfy, dict(plan)
        self.answers, self.live_events = [], []

    def __call__(self, run, msg):
        d = msg.get("data") or {}
        if msg.get("type") == "headforcing.live":
            self.live_events.append(d)
        if msg.get("type") != "headforcing.progress" or d.get("kind") != "chunk":
            return
        ask = self.plan.pop(d["chunk"], None)
        if ask is not None:  # chunk d["chunk"] is committed: chunk + 1 runs now
            cid = next(m["data"]["sid"] for m in run.messages if m["type"] == "status" and "sid" in m.get("data", {}))
            status, body = post(self.comfy, {"prompt_id": run.prompt_id, "node": "4", "client_id": cid, **ask})
            self.answers.append((d["chunk"], status, body))


@pytest.fixture(scope="module")
def steered(comfy):
    """One live run, switched after chunks 2 and 5 were committed; its /history entry and what was seen."""
    steer = Steer(comfy, {2: {"text": "a fox in a neon city at night", "transition": "cut"},
                          5: {"text": "the fox walks into the rain", "transition": "interpolate", "frames": 3}})
    t0 = time.time()
    run = comfy.run_ws(live_graph(comfy, "e2e/live/steered"), timeout=600, on_message=steer)
    return run, steer, time.time() - t0


def test_switches_land_at_the_next_chunk_and_make_the_take(comfy, steered):
    run, steer, seconds = steered
    assert [(chunk, status) for chunk, status, _ in steer.answers] == [(2, 202), (5, 202)], steer.answers
    for chunk, _, body in steer.answers:
        assert body["ok"] and body["status"] == "queued" and body["takes_effect_at_chunk"] >= chunk + 1, body
    applied = [e for e in steer.live_events if e["kind"] == "applied"]
    assert len(applied) == 2, steer.live_events
    for event, (_, _, body) in zip(applied, steer.answers):
        # sent while chunk k ran → made at chunk k + 1, as the route promised
        assert event["chunk"] == event["sent_during_chunk"] + 1 == body["takes_effect_at_chunk"], (event, body)
        assert event["frame"] == 3 * (event["chunk"] - 1)
    entry = run.entry
    (take,) = entry["outputs"]["4"]["headforcing_take"]
    lines = [line for line in take.splitlines() if not line.startswith("#")]
    f1, f2 = (e["frame"] for e in applied)
    assert lines == [f"{f1 / 4:g} | {FIRST} | cut",
                     f"{(f2 - f1) / 4:g} | a fox in a neon city at night | cut | same noise",
                     f"{(3 * CHUNKS - f2) / 4:g} | the fox walks into the rain | interpolate 3 | same noise"], take
    assert "2 live switches" in take
    chunks = [d for d in run.of_type("headforcing.progress") if d.get("kind") == "chunk"]
    assert len(chunks) == CHUNKS and all(len(d["frames"]) == 3 and d["frame_seconds"] == 0.25 for d in chunks)
    assert chunks[0]["live"]["text"] is True and chunks[0]["live"]["segments"] == [FIRST]
    assert chunks[-1]["prompt"] == "the fox walks into the rain" and chunks[-1]["segments"] == 3
    print(f"steered run: {seconds:.1f} s, switches at chunks {[e['chunk'] for e in applied]}")


def test_the_take_rerenders_bit_for_bit_and_continues(comfy, steered):
    run, _, _ = steered
    (take,) = run.entry["outputs"]["4"]["headforcing_take"]
    again = comfy.run(live_graph(comfy, "e2e/live/rerender", schedule_text=take), timeout=600)
    a, b = latents(comfy, run.entry), latents(comfy, again)
    assert a.shape == (1, 16, 3 * CHUNKS, SIZE // 8, SIZE // 8) and torch.equal(a, b)
    (retake,) = again["outputs"]["4"]["headforcing_take"]
    assert retake.splitlines()[1:] == take.splitlines()[1:], "a re-render's take is the take"
    # the same graph without the live switches differs from frame f1 on
    plain = comfy.run(live_graph(comfy, "e2e/live/plain"), timeout=600)
    c = latents(comfy, plain)
    assert not torch.equal(a, c)


def test_continue_goes_on_from_the_take(comfy):
    """Sampler(take) -> Continue(conditioning, clip) with a live switch: Continue's take re-renders it."""
    wf = live_graph(comfy, "e2e/live/cont_a", schedule_text="0.75 | a fox | cut\n0.75 | a bird | interpolate 4")
    wf["7"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a bird"}}
    wf["8"] = {"class_type": "HeadForcingContinue",
               "inputs": {"model": ["1", 0], "ar_state": ["4", 2], "conditioning": ["7", 0], "clip": ["2", 0],
                          "length": 9.0, "length_unit": "latent_frames", "transition": "cut",
                          "transition_frames": 0, "seed": 3}}
    wf["9"] = {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": "e2e/live/cont_b"}}
    entry = comfy.run(wf, timeout=600)
    (take,) = entry["outputs"]["8"]["headforcing_take"]
    # the bird's interpolation (4 chunks) had made 1 step when the sampler stopped: Continue goes on with it
    assert take.splitlines()[1:] == ["2.25 | a bird | cut"], take
    (first,) = [p for p in comfy.outputs(entry, ".latent") if "cont_b" in p.name]
    wf["8"]["inputs"].pop("conditioning")
    wf["10"] = {"class_type": "HeadForcingPromptScheduleFromText", "inputs": {"clip": ["2", 0], "text": take}}
    wf["8"]["inputs"]["prompt_schedule"] = ["10", 0]
    wf["9"]["inputs"]["filename_prefix"] = "e2e/live/cont_c"
    again = comfy.run(wf, timeout=600)
    (second,) = [p for p in comfy.outputs(again, ".latent") if "cont_c" in p.name]
    assert torch.equal(load_file(str(first))["latent_tensor"], load_file(str(second))["latent_tensor"])


def test_the_route_refuses_with_a_message(comfy, steered):
    run, _, _ = steered
    ok = {"prompt_id": run.prompt_id, "node": "4", "client_id": "x", "text": "a cat"}
    status, body = post(comfy, ok)
    assert status == 409 and "has finished" in body["error"], body
    status, body = post(comfy, {**ok, "prompt_id": "not-a-prompt"})
    assert status == 404 and "no run of prompt not-a-prompt" in body["error"], body
    for bad, code, why in [
        ({**ok, "text": "a | b"}, 400, "without '|'"), ({**ok, "text": "x" * 1001}, 413, "at most 1000"),
        ({**ok, "text": None, "segment": None}, 400, "either a text"), ({**ok, "transition": "wipe"}, 400,
                                                                         "transition must be one of"),
        ({**ok, "transition": "interpolate", "frames": 65}, 400, "1-64 chunks"), ({**ok, "evil": 1}, 400, "unknown"),
        ({**ok, "recache_mode": "longlive"}, 400, "goes with a recache"), ({**ok, "prompt_id": ""}, 400, "prompt_id"),
        ([1, 2], 400, "JSON object"),
    ]:
        status, body = post(comfy, bad)
        assert status == code and why in body["error"], (bad, status, body)
    for raw, code in [(b"{not json", 400), (b"\xff\xfe", 400), (b"x" * 20000, 413)]:
        status, body = post(comfy, None, raw=raw)
        assert status == code and not body["ok"], (raw[:10], status, body)
    assert comfy.object_info("HeadForcingARSampler"), "the server is up"


def test_another_browser_and_a_queued_prompt_are_refused_while_it_runs(comfy):
    """While a run is live: a request with another client id (403), one for the prompt queued behind it (404,
    'waiting in the queue'), a flood (429) — and the run still finishes."""
    wf = live_graph(comfy, "e2e/live/guarded")
    seen = {}

    def on_message(run, msg):
        d = msg.get("data") or {}
        if msg.get("type") != "headforcing.progress" or d.get("kind") != "chunk" or d["chunk"] != 2:
            return
        seen["other"] = post(comfy, {"prompt_id": run.prompt_id, "node": "4", "client_id": "someone-else",
                                     "text": "a cat"})
        second = comfy.queue(live_graph(comfy, "e2e/live/queued", seed=4))
        seen["queued"] = post(comfy, {"prompt_id": second, "node": "4", "client_id": "x", "text": "a cat"})
        seen["node"] = post(comfy, {"prompt_id": run.prompt_id, "node": "5", "client_id": "x", "text": "a cat"})
        seen["second"] = second

    run = comfy.run_ws(wf, timeout=600, on_message=on_message)
    assert seen["other"][0] == 403 and "another browser" in seen["other"][1]["error"]
    assert seen["queued"][0] == 404 and "waiting in the queue" in seen["queued"][1]["error"], seen["queued"]
    assert seen["node"][0] == 404 and "node 5" in seen["node"][1]["error"] and "node 4 does" in seen["node"][1]["error"]
    assert run.entry["outputs"]["4"]["headforcing_take"][0].count("|") == 2  # no switch made
    comfy.wait(seen["second"], timeout=600)


# --------------------------------------------------------------------------------------------
# nodes/live.py in-process (the pack imported as a package, as ComfyUI does)


@pytest.fixture(scope="module")
def live_mod():
    return pack_module("live")


def _run(M, clock, **kw):
    from headforcing_core.prompts import PromptSchedule, PromptSegment

    events = []
    ctx = torch.zeros(1, 4, 4096)
    prepared = [M.Prepared("a fox", ctx, "a fox"), M.Prepared("a bird", ctx + 1, None)]
    run = M.LiveRun("p1", "4", "me", encode=lambda text: torch.ones(1, 2, 4096) * len(text), prepared=prepared,
                    chunks=4, start_frame=0, end_frame=12, send=events.append, clock=clock, **kw)
    return run, events


def _req(M, **kw):
    return M.parse_request({"prompt_id": "p1", "node": "4", "client_id": "me", **kw})


def test_a_run_takes_a_few_requests_a_second(live_mod):
    M = live_mod
    now = [0.0]
    run, _ = _run(M, lambda: now[0])
    for _ in range(M.RATE_BURST):
        assert run.submit(_req(M, text="a cat"))["ok"]
    with pytest.raises(M.LiveError, match="too many requests") as e:
        run.submit(_req(M, text="a cat"))
    assert e.value.status == 429
    now[0] += 1.0 / M.RATE_PER_SECOND
    assert run.submit(_req(M, text="a dog"))["replaced"], "a newer request replaces the waiting one"


def test_poll_encodes_between_chunks_and_says_when(live_mod):
    M = live_mod
    run, events = _run(M, lambda: 0.0)
    assert run.poll(0, None) is None  # chunk 1 starts, nothing asked
    answer = run.submit(_req(M, segment=2, transition="interpolate", frames=4))
    assert answer["takes_effect_at_chunk"] == 2 and answer["running_chunk"] == 1
    busy = run.poll(3, "a blend runs")
    assert busy is None and events[-1]["kind"] == "waiting" and "a blend runs" in events[-1]["message"]
    switch = run.poll(6, None)
    assert switch.text == "a bird" and switch.transition == "interpolate" and torch.equal(switch.context,
                                                                                          torch.ones(1, 4, 4096))
    assert events[-1]["kind"] == "applied" and events[-1]["chunk"] == 3 and events[-1]["sent_during_chunk"] == 1
    run.submit(_req(M, text="a cat"))
    assert run.poll(9, None).text == "a cat"  # chunk 4 of 4: the last
    with pytest.raises(M.LiveError, match="last chunk"):
        run.submit(_req(M, text="a dog"))
    assert run.report_lines()[0].startswith("live: 2 switches: chunk 3 (frame 6): interpolate 4 → 'a bird'")


def test_a_switch_that_cannot_be_made_never_stops_the_run(live_mod):
    M = live_mod
    def too_narrow(ctx):
        raise ValueError("8 channels")

    run, events = _run(M, lambda: 0.0, check=too_narrow)
    run.submit(_req(M, text="a cat"))
    assert run.poll(0, None) is None and events[-1]["kind"] == "refused" and "8 channels" in events[-1]["message"]
    run2, events2 = _run(M, lambda: 0.0)
    run2.submit(_req(M, text="a cat", transition="blend", frames=13))
    assert run2.poll(0, None) is None and "does not fit" in events2[-1]["message"]
    run2.submit(_req(M, text="a cat"))
    run2.finish()
    assert events2[-1]["kind"] == "expired"


def test_requests_reach_only_their_run(live_mod):
    M = live_mod
    reg = M.LiveRegistry()
    run, _ = _run(M, lambda: 0.0)
    reg.open(run)
    anonymous = M.LiveRun("p9", "4", None, encode=lambda text: torch.ones(1, 2, 4096), chunks=4, end_frame=12)
    with pytest.raises(M.LiveError, match="queued without a client_id"):
        anonymous.submit(_req(M, text="a cat"))
    with pytest.raises(M.LiveError, match="another browser"):
        reg.submit(M.parse_request({"prompt_id": "p1", "node": "4", "client_id": "you", "text": "a"}))
    with pytest.raises(M.LiveError, match="node 9 of prompt p1 takes no live input"):
        reg.submit(M.parse_request({"prompt_id": "p1", "node": "9", "client_id": "me", "text": "a"}))
    with pytest.raises(M.LiveError, match="waiting in the queue"):
        reg.submit(M.parse_request({"prompt_id": "p2", "node": "4", "text": "a"}), queue_state=lambda pid: "queued")
    assert reg.submit(M.parse_request({"prompt_id": "p1", "node": "4", "client_id": "me", "text": "a"}))["ok"]
    reg.close(run)
    with pytest.raises(M.LiveError, match="has finished") as e:
        reg.submit(M.parse_request({"prompt_id": "p1", "node": "4", "client_id": "me", "text": "a"}))
    assert e.value.status == 409
    # the route's function never raises and answers JSON; the body is read to its end, at most 8 KiB + 1
    assert M.live_response(b"{]", reg)[0] == 400 and M.live_response(b"x" * 9000, reg)[0] == 413
    import asyncio
    import concurrent.futures

    class Trickle:  # a body that arrives a few bytes at a time
        def __init__(self, data):
            self.data = data

        async def read(self, n):
            part, self.data = self.data[:min(n, 7)], self.data[min(n, 7):]
            return part

    routes = pack_module("routes")
    body = json.dumps({"prompt_id": "p1", "node": "4", "text": "a"}).encode()

    def run(coro):  # in a thread of its own: the test session may already run an event loop (Playwright's)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coro).result()

    assert run(routes.read_limited(Trickle(body), M.MAX_BODY_BYTES)) == body
    assert len(run(routes.read_limited(Trickle(b"x" * 20000), M.MAX_BODY_BYTES))) == M.MAX_BODY_BYTES + 1


def test_graph_texts_read_the_clip_text_encoders(live_mod):
    M = live_mod
    from headforcing_core.prompts import PromptSchedule, PromptSegment

    c = torch.zeros(1, 2, 4096)
    prompt = {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["9", 0]}},
              "2": {"class_type": "CLIPTextEncode", "inputs": {"text": ["8", 0], "clip": ["9", 0]}},
              "3": {"class_type": "HeadForcingPromptSegment", "inputs": {"conditioning": ["1", 0]}},
              "4": {"class_type": "HeadForcingPromptSegment", "inputs": {"conditioning": ["2", 0],
                                                                        "previous": ["3", 0]}},
              "5": {"class_type": "HeadForcingARSampler", "inputs": {"prompt_schedule": ["4", 0]}},
              "6": {"class_type": "HeadForcingARSampler", "inputs": {"conditioning": ["1", 0]}}}
    two = PromptSchedule((PromptSegment(c, frames=3), PromptSegment(c, frames=3)))
    assert [s.text for s in M.graph_texts(prompt, "5", two)] == ["a fox", None]  # a linked text is not known
    assert [s.text for s in M.graph_texts(prompt, "6", PromptSchedule.single(c, 3))] == ["a fox"]
    assert M.graph_texts({"bad": 1}, "5", two) is two
