"""Log lines and child processes: how the host prints and how it starts other programs."""
from __future__ import annotations

import os
import signal
import subprocess


def log(msg: str) -> None:
    print(f"[host] {msg}", flush=True)


def run(cmd: list, **kw) -> None:
    """Run a command to completion (stdin closed), logging it first; raise on a non-zero exit."""
    log("$ " + " ".join(str(c) for c in cmd))
    kw.setdefault("stdin", subprocess.DEVNULL)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def child_env(**defaults: str) -> dict:
    """This process's environment for a child, without PYTHONPATH (the host venv's python must not
    see the caller's modules), plus ``defaults`` for the variables that are not set."""
    env = os.environ.copy()
    env.pop("PYTHONPATH", None)
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


def default_sigint() -> None:
    """``preexec_fn`` for ComfyUI: a process started from a non-interactive shell's background job
    inherits SIGINT ignored, and Python then never raises KeyboardInterrupt; restore the default
    so SIGINT stops it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
