"""The real ComfyUI host for Head Forcing: build it, serve it, run the demo, run the tests.

The command line of ``python3 tools/host.py`` (``build``, ``serve``, ``demo``, ``test``); see
docs/host.md.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from .build import build
from .demo import cmd_demo
from .paths import ARTIFACTS, COMFY, COMFY_VERSION, DEMO_BASE, REPO, VENV_PY
from .proc import child_env, default_sigint, log
from .server import prepare_base, server_command


def cmd_serve(args) -> int:
    build()
    base = prepare_base(Path(args.base_directory or DEMO_BASE), test_nodes=args.with_test_nodes)
    cmd = server_command(VENV_PY, args.port, base, ["--preview-method", "auto", *args.comfy_args])
    log(f"ComfyUI {COMFY_VERSION} with the pack: http://127.0.0.1:{args.port}  (base {base}; Ctrl-C stops)")
    log("$ " + " ".join(cmd))
    try:
        return subprocess.call(cmd, cwd=str(COMFY), env=child_env(), preexec_fn=default_sigint)
    except KeyboardInterrupt:
        return 0


def cmd_test(pytest_args: list[str]) -> int:
    t0 = time.time()
    build()
    log(f"host ready in {time.time() - t0:.0f} s")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    env = child_env()
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
