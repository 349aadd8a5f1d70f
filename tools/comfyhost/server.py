"""A real ComfyUI server and a client for it: start it in a base directory, queue prompts, wait for
them, read what they saved. Used by ``serve``, ``demo``, the build's start-up check and the test
fixtures (tests/e2e/conftest.py, tests/browser/conftest.py), so there is one way to start ComfyUI
and talk to it."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .paths import COMFY, PACK_LINK_NAME, REPO, TEST_NODES, TEST_NODES_LINK_NAME, VENV_PY
from .proc import child_env, default_sigint

# --------------------------------------------------------------------------------------
# Base directories and command lines
# --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link(target: Path, link_path: Path) -> None:
    """Make link_path a symlink to target (replacing a stale link)."""
    link_path.parent.mkdir(parents=True, exist_ok=True)
    if link_path.is_symlink() or link_path.exists():
        if link_path.is_symlink() and Path(os.readlink(link_path)) == target:
            return
        if link_path.is_symlink() or link_path.is_file():
            link_path.unlink()
        else:
            raise SystemExit(f"{link_path} exists and is not a symlink; remove it")
    link_path.symlink_to(target, target_is_directory=True)


def prepare_base(base: Path, test_nodes: bool = False) -> Path:
    """A ComfyUI --base-directory: models/ folders, and the pack in its custom_nodes/.

    With --base-directory ComfyUI reads custom nodes ONLY from <base>/custom_nodes (not from
    the ComfyUI tree), so the pack (and, for tests and the tiny demo, the test-only nodes)
    is linked there.
    """
    base = Path(base).resolve()
    for sub in ("models/diffusion_models", "models/text_encoders", "models/vae",
                "custom_nodes", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link(REPO, base / "custom_nodes" / PACK_LINK_NAME)
    tn = base / "custom_nodes" / TEST_NODES_LINK_NAME
    if test_nodes:
        link(TEST_NODES, tn)
    elif tn.is_symlink():
        tn.unlink()
    return base


def base_args(base) -> list[str]:
    """ComfyUI's arguments for a base directory with its own SQLite database."""
    return ["--base-directory", str(base), "--database-url", f"sqlite:///{base}/user/comfyui.db"]


def server_command(python: Path, port: int, base: Path, extra_args: list[str]) -> list[str]:
    """The command line of a ComfyUI server on loopback (CPU, no browser launched)."""
    return [str(python), str(COMFY / "main.py"), "--cpu",
            "--listen", "127.0.0.1", "--port", str(port), *base_args(base),
            "--disable-auto-launch", *extra_args]


# --------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------


class ComfyError(RuntimeError):
    """A prompt was rejected or failed; the message carries ComfyUI's node error text."""


class ComfyServer:
    """A real ComfyUI server process (the host venv's python running .host/ComfyUI/main.py)."""

    def __init__(self, base: Path, port: int | None = None, log_path: Path | None = None,
                 extra_args: list[str] | None = None, python: Path = VENV_PY):
        self.base = Path(base).resolve()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else self.base / "comfyui.log"
        self.extra_args = list(extra_args or [])
        self.python = python
        self.proc: subprocess.Popen | None = None
        self._log_fh = None

    def command(self) -> list[str]:
        return server_command(self.python, self.port, self.base, self.extra_args)

    def start(self, timeout: float = 300.0) -> "ComfyServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log_path, "wb")
        env = child_env(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", DO_NOT_TRACK="1")
        self.proc = subprocess.Popen(self.command(), cwd=str(COMFY), stdout=self._log_fh,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True, preexec_fn=default_sigint)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.proc.returncode} during start-up:\n"
                                 + self.log_tail())
            try:
                with urllib.request.urlopen(self.url + "/object_info/KSampler", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer within {timeout:.0f} s:\n" + self.log_tail())

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 8000) -> str:
        return self.log_text()[-n:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGINT (ComfyUI's own clean stop), then SIGTERM, then SIGKILL, to its process group."""
        if self.proc is not None and self.proc.poll() is None:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(timeout=timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log_fh:
            self._log_fh.close()
            self._log_fh = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@contextlib.contextmanager
def test_server(base: Path, artifacts: Path, extra_args: list | None = None):
    """Serve ``base`` for a test session: yields ``(server, startup_seconds)``; on exit stops the
    server and copies what it saved to ``artifacts/output``. Start-up failures raise ComfyError."""
    server = ComfyServer(base, log_path=artifacts / "comfyui.log", extra_args=list(extra_args or []))
    t0 = time.time()
    server.start(timeout=300)
    try:
        yield server, time.time() - t0
    finally:
        server.stop()
        out = Path(base) / "output"
        if out.exists():
            shutil.copytree(out, artifacts / "output", dirs_exist_ok=True)


# --------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------


class ComfyClient:
    """Talks to a ComfyUI server over HTTP on loopback (stdlib only)."""

    def __init__(self, url: str, server: ComfyServer | None = None):
        self.url = url.rstrip("/")
        self.server = server
        self.client_id = uuid.uuid4().hex

    # -- raw HTTP
    def get_json(self, path: str, timeout: float = 60):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, path: str, payload, timeout: float = 60):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return json.loads(body) if body else None
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            try:
                data = json.loads(body)
            except ValueError:
                data = {"error": body}
            raise ComfyError(f"POST {path} -> HTTP {e.code}: " + format_prompt_error(data)) from None

    # -- API
    def object_info(self, node_class: str | None = None) -> dict:
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))

    def queue(self, workflow: dict, client_id: str | None = None) -> str:
        res = self.post_json("/prompt", {"prompt": workflow, "client_id": client_id or self.client_id})
        if res.get("node_errors"):
            raise ComfyError("prompt has node errors: " + format_prompt_error(res))
        return res["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.25) -> dict:
        """Wait until the prompt finished; return its history entry or raise ComfyError."""
        deadline = time.time() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None and entry.get("status") is not None:
                status = entry["status"]
                if status.get("status_str") == "success" and status.get("completed"):
                    return entry
                raise ComfyError(format_execution_error(prompt_id, entry))
            if self.server is not None and not self.server.alive():
                raise ComfyError(f"ComfyUI died while running {prompt_id}:\n" + self.server.log_tail())
            if time.time() > deadline:
                with contextlib.suppress(Exception):
                    self.interrupt()
                raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s"
                                 + ("\n" + self.server.log_tail(3000) if self.server else ""))
            time.sleep(poll)

    def run(self, workflow: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.queue(workflow), timeout)

    def interrupt(self, prompt_id: str | None = None) -> None:
        self.post_json("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})


def format_prompt_error(data: dict) -> str:
    parts = []
    err = data.get("error")
    if isinstance(err, dict):
        parts.append(f"{err.get('type')}: {err.get('message')} {err.get('details') or ''}".strip())
    elif err:
        parts.append(str(err))
    for node_id, ne in (data.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            parts.append(f"node {node_id} ({ne.get('class_type')}): {e.get('message')}: "
                         f"{e.get('details')} {e.get('extra_info') or ''}".rstrip())
    return "\n".join(parts) or json.dumps(data)


def format_execution_error(prompt_id: str, entry: dict) -> str:
    status = entry.get("status") or {}
    for event, data in status.get("messages", []):
        if event == "execution_error":
            tb = "".join(data.get("traceback") or [])
            return (f"prompt {prompt_id} failed in node {data.get('node_id')} ({data.get('node_type')}): "
                    f"{data.get('exception_type')}: {data.get('exception_message')}\n{tb}")
        if event == "execution_interrupted":
            return f"prompt {prompt_id} was interrupted in node {data.get('node_id')} ({data.get('node_type')})"
    return f"prompt {prompt_id} ended with status {json.dumps(status)[:2000]}"


def output_files(entry: dict, base: Path, ext: str | None = None) -> list[Path]:
    """Files an executed prompt saved (SaveVideo/SaveImage ... ui results)."""
    found = []
    for node_out in (entry.get("outputs") or {}).values():
        for value in node_out.values():
            if not isinstance(value, list):
                continue
            for item in value:
                if isinstance(item, dict) and "filename" in item:
                    folder = {"output": "output", "temp": "temp", "input": "input"}.get(item.get("type"), "output")
                    p = Path(base) / folder / item.get("subfolder", "") / item["filename"]
                    if ext is None or p.suffix.lower() == ext:
                        found.append(p)
    return found
