"""End-to-end harness: a REAL ComfyUI 0.3.75 server (from .host/) with the pack and tiny models.

Fixtures
--------
``comfy`` (session): starts ``.host/venv/bin/python .host/ComfyUI/main.py --cpu --listen 127.0.0.1
  --port <free> --base-directory <tmp> --preview-method auto`` with the tiny random Wan2.1 T2V model
  and Wan VAE written into ``<tmp>/models/{diffusion_models,vae}/`` and both this pack and the
  test-only node pack (``comfy_test_nodes/``, ids ``HFTest*``) linked into ``<tmp>/custom_nodes/``.
  Yields an :class:`E2EClient`: ``queue(wf) -> prompt_id``, ``wait(prompt_id, timeout) -> history
  entry`` (raises ``ComfyError`` with the node's error text), ``run(wf)``, ``run_ws(wf)`` (also
  collects websocket progress/preview messages), ``object_info()``, ``log_text()``,
  ``output_dir``, ``outputs(entry, ".mp4")``, ``ui_text(entry, node_id)``, ``models``.
``sampler_wf`` (function fixture): ``sampler_wf(sampler_inputs, **kw)`` builds the standard
  UNETLoader -> HeadForcingARSampler -> VAEDecode -> CreateVideo -> SaveVideo API workflow with
  the tiny models filled in (see :func:`sampler_workflow`; :func:`decode_workflow` and
  :func:`save_nodes` are plain helpers, importable with ``from .conftest import ...``).

The tests skip with a reason when the host is missing or this python lacks torch/av (run them
with ``python3 tools/host.py test``, which sets HF_E2E_REQUIRED=1 so they fail instead).
Artifacts (server log, saved videos) go to ``$HF_TEST_ARTIFACTS/e2e`` (default test-artifacts/e2e).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("HF_TEST_ARTIFACTS", REPO / "test-artifacts")) / "e2e"
REQUIRED = os.environ.get("HF_E2E_REQUIRED") == "1"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


from tools import comfyhost as host  # noqa: E402  (the host library behind tools/host.py)
ComfyError = host.ComfyError

# Standard workflow pieces (one place; the sampler's input names live here).
SAMPLER_CLASS = "HeadForcingARSampler"
SAMPLER_MODEL_INPUT = "model"
SAMPLER_CONDITIONING_INPUT = "conditioning"
FPS = 16


def host_problem() -> str | None:
    """Why the end-to-end tests cannot run here, or None."""
    if not (host.VENV_PY.exists() and (host.COMFY / "main.py").exists()):
        return ".host is not built: run `python3 tools/host.py test` (or `python3 tools/host.py build`)"
    missing = []
    for mod in ("torch", "av", "safetensors", "numpy"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        return (f"this python ({sys.executable}) lacks {', '.join(missing)}: run the tests under the "
                "host venv with `python3 tools/host.py test`")
    return None


def _skip_or_fail(reason: str):
    if REQUIRED:
        pytest.fail(f"end-to-end host unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


# --------------------------------------------------------------------------------------
# client
# --------------------------------------------------------------------------------------

@dataclass
class WSRun:
    """A prompt run while listening on the websocket."""
    prompt_id: str
    messages: list = field(default_factory=list)      # JSON messages {"type", "data"}
    previews: list = field(default_factory=list)      # (event_type, metadata dict | None, image bytes)
    entry: dict | None = None                         # /history entry (None if it failed)
    error: str | None = None                          # ComfyError text if it failed

    def of_type(self, t: str) -> list[dict]:
        return [m["data"] for m in self.messages if m.get("type") == t]


class E2EClient(host.ComfyClient):
    def __init__(self, server, base: Path, models: dict):
        super().__init__(server.url, server)
        self.base_dir = Path(base)
        self.output_dir = self.base_dir / "output"
        self.log_path = server.log_path
        self.models = models  # {"wan": file name in diffusion_models, "vae": file name in vae}

    def log_text(self) -> str:
        return self.server.log_text()

    def outputs(self, entry: dict, ext: str | None = ".mp4") -> list[Path]:
        return host.output_files(entry, self.base_dir, ext)

    @staticmethod
    def ui_text(entry: dict, node_id: str) -> list[str]:
        return list((entry.get("outputs") or {}).get(str(node_id), {}).get("text", []))

    def node_ids(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.object_info() if k.startswith(prefix))

    def run_ws(self, workflow: dict, timeout: float = 600.0, raise_on_error: bool = True,
               preview_metadata: bool = True, on_message=None) -> WSRun:
        """Run a prompt while listening on /ws; collects progress/progress_state/executing/... messages
        and binary previews.  ``on_message(run, msg)`` is called for every JSON message (e.g. to
        interrupt after the first preview)."""
        import aiohttp

        cid = uuid.uuid4().hex
        ws_url = self.url.replace("http://", "ws://") + f"/ws?clientId={cid}"

        async def go() -> WSRun:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(ws_url, max_msg_size=0) as ws:
                    if preview_metadata:
                        await ws.send_json({"type": "feature_flags",
                                            "data": {"supports_preview_metadata": True}})
                    prompt_id = await asyncio.to_thread(self.queue, workflow, cid)
                    run = WSRun(prompt_id)
                    deadline = time.time() + timeout
                    while True:
                        remaining = deadline - time.time()
                        if remaining <= 0:
                            run.error = f"timeout after {timeout:.0f} s"
                            await asyncio.to_thread(self.interrupt)
                            return run
                        try:
                            msg = await ws.receive(timeout=min(remaining, 5.0))
                        except asyncio.TimeoutError:
                            if not self.server.alive():
                                run.error = "ComfyUI died:\n" + self.server.log_tail()
                                return run
                            continue
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            data = json.loads(msg.data)
                            run.messages.append(data)
                            if on_message is not None:
                                await asyncio.to_thread(on_message, run, data)
                            d = data.get("data") or {}
                            if d.get("prompt_id") == prompt_id and (
                                    (data["type"] == "executing" and d.get("node") is None)
                                    or data["type"] in ("execution_error", "execution_interrupted")):
                                return run
                        elif msg.type == aiohttp.WSMsgType.BINARY:
                            raw = bytes(msg.data)
                            event = int.from_bytes(raw[:4], "big")
                            meta = None
                            body = raw[4:]
                            if event == 4:  # PREVIEW_IMAGE_WITH_METADATA
                                n = int.from_bytes(body[:4], "big")
                                meta = json.loads(body[4:4 + n])
                                body = body[4 + n:]
                            elif event == 1:  # PREVIEW_IMAGE: 4-byte image type, then the image
                                body = body[4:]
                            run.previews.append((event, meta, body))
                        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            run.error = f"websocket closed: {msg!r}"
                            return run

        run = _run_in_own_loop(go)
        if run.error is None:
            try:
                run.entry = self.wait(run.prompt_id, timeout=60)
            except ComfyError as e:
                run.error = str(e)
        if run.error and raise_on_error:
            raise ComfyError(run.error)
        return run


def _run_in_own_loop(coro_fn):
    """asyncio.run(coro_fn()) in a fresh thread: the calling thread may already run an event loop
    (e.g. a session-scoped Playwright sync browser keeps one alive in the main thread)."""
    box = {}

    def target():
        try:
            box["value"] = asyncio.run(coro_fn())
        except BaseException as e:  # re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, name="comfy-ws", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def pack_module(submodule: str):
    """``nodes.<submodule>`` of the pack, imported in this process as ComfyUI imports the pack (a package,
    ComfyUI's own modules on the path, ``--cpu``); skips when ComfyUI's ``comfy_api`` cannot be imported."""
    import importlib
    import importlib.util

    if str(host.COMFY) not in sys.path:
        sys.path.insert(0, str(host.COMFY))
    try:
        import comfy.cli_args
        comfy.cli_args.args.cpu = True  # as the server runs: no CUDA probing in this process
        import comfy_api.latest  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"ComfyUI's comfy_api is not importable here: {e}")
    name = "headforcing_pack_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return importlib.import_module(f"{name}.nodes.{submodule}")


# --------------------------------------------------------------------------------------
# workflow builders (API format)
# --------------------------------------------------------------------------------------

def save_nodes(images_ref: list, prefix: str, fps: float = FPS, first_id: int = 90) -> dict:
    """CreateVideo(fps) -> SaveVideo(mp4/h264) for an IMAGE output."""
    a, b = str(first_id), str(first_id + 1)
    return {
        a: {"class_type": "CreateVideo", "inputs": {"images": images_ref, "fps": float(fps)}},
        b: {"class_type": "SaveVideo", "inputs": {"video": [a, 0], "filename_prefix": prefix,
                                                   "format": "mp4", "codec": "h264"}},
    }


def decode_workflow(latent_node: dict, vae_name: str, prefix: str = "e2e/decode", fps: float = FPS) -> dict:
    """<latent node> -> VAEDecode(VAELoader) -> CreateVideo -> SaveVideo."""
    wf = {
        "1": latent_node,
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": vae_name}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
    }
    wf.update(save_nodes(["3", 0], prefix, fps))
    return wf


def sampler_workflow(sampler_inputs: dict | None = None, *, unet_name: str, vae_name: str,
                     width: int = 64, height: int = 64, length: int = 9, seed: int = 0,
                     text_seed: int = 1, text_tokens: int = 512, prefix: str = "e2e/sampler",
                     fps: float = FPS, sampler_class: str = SAMPLER_CLASS,
                     model_input: str = SAMPLER_MODEL_INPUT,
                     conditioning_input: str = SAMPLER_CONDITIONING_INPUT,
                     extra_nodes: dict | None = None) -> dict:
    """The standard graph:

        "1" UNETLoader(tiny wan) ─MODEL─┐
        "2" HFTestConditioning ─────────┴→ "3" <sampler>(width, height, length, seed, **sampler_inputs)
        "4" VAELoader(tiny vae) → "5" VAEDecode("3".0) → "90" CreateVideo(fps) → "91" SaveVideo

    ``sampler_inputs`` override/extend the sampler's inputs (links are ``["node_id", slot]``;
    put the linked nodes in ``extra_nodes``; ids 10-89 are free).  Set an input to ``None`` to
    drop it.
    """
    inputs = {model_input: ["1", 0], conditioning_input: ["2", 0],
              "width": width, "height": height, "length": length, "seed": seed}
    inputs.update(sampler_inputs or {})
    inputs = {k: v for k, v in inputs.items() if v is not None}
    wf = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": "default"}},
        "2": {"class_type": "HFTestConditioning", "inputs": {"seed": text_seed, "length": text_tokens}},
        "3": {"class_type": sampler_class, "inputs": inputs},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": vae_name}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 0]}},
    }
    wf.update(save_nodes(["5", 0], prefix, fps))
    wf.update(extra_nodes or {})
    return wf


def expected_frames(latent_frames: int) -> int:
    """Wan's VAE decodes T latent frames to 4T-3 video frames."""
    return 4 * latent_frames - 3


# --------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    problem = host_problem()
    if problem:
        _skip_or_fail(problem)
    from tools import tiny_models as tiny

    base = host.prepare_base(tmp_path_factory.mktemp("comfy_base"), test_nodes=True)
    models = {"wan": host.TINY_WAN_NAME, "vae": host.TINY_VAE_NAME}
    tiny.write_tiny_wan(base / "models" / "diffusion_models" / models["wan"], seed=0)
    tiny.write_tiny_wan_vae(base / "models" / "vae" / models["vae"], seed=0)

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        try:
            server, startup = stack.enter_context(host.test_server(base, ARTIFACTS, extra_args=["--preview-method", "auto"]))
        except ComfyError as e:
            pytest.fail(str(e), pytrace=False)
        client = E2EClient(server, base, models)
        client.startup_seconds = startup
        yield client


@pytest.fixture
def sampler_wf(comfy):
    """``sampler_wf(sampler_inputs, **kw)``: :func:`sampler_workflow` with the tiny models filled in."""
    def build(sampler_inputs: dict | None = None, **kw):
        kw.setdefault("unet_name", comfy.models["wan"])
        kw.setdefault("vae_name", comfy.models["vae"])
        return sampler_workflow(sampler_inputs, **kw)
    return build
