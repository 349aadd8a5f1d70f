"""Head Forcing for ComfyUI: head-aware KV caches for autoregressive video diffusion.

ComfyUI entry point (V3 route): ``comfy_entrypoint`` registers the pack's HTTP routes
(``nodes/routes.py``) and returns the extension that registers the nodes of ``nodes/``;
``WEB_DIRECTORY`` serves the frontend extension in ``web/``.
This module deliberately exports no ``NODE_CLASS_MAPPINGS``: ComfyUI 0.3.75 would then
register those and ignore ``comfy_entrypoint``.

The pure-PyTorch core ``headforcing_core`` is importable on its own (``import
headforcing_core``); the folder of this file is appended to ``sys.path`` so the nodes
import it by that name (appended, so nothing here shadows ComfyUI's own modules).

Outside ComfyUI (e.g. pytest, which imports this folder as a package because it holds an
``__init__.py``) ``comfy_api`` is missing and this module defines no entry point.
"""
from __future__ import annotations

import os
import sys

_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

WEB_DIRECTORY = "./web"

try:
    from comfy_api.latest import ComfyExtension, io
except ImportError:  # not running inside ComfyUI: nothing to register
    ComfyExtension = None

if ComfyExtension is not None:
    from typing_extensions import override

    from .nodes import NODE_LIST
    from .nodes.routes import register_routes

    class HeadForcingExtension(ComfyExtension):
        @override
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return list(NODE_LIST)

    async def comfy_entrypoint() -> HeadForcingExtension:
        register_routes()  # GET /headforcing/estimate: the policy node's memory figure for the browser
        return HeadForcingExtension()

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
