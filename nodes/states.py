"""AR_STATE files: ``HeadForcingSaveARState`` / ``HeadForcingLoadARState`` (safetensors + JSON metadata)
in ``output/headforcing_states/`` (``nodes/files.py``), to continue a video in a later session with
Head Forcing Continue (``nodes/continuation.py``).
"""
from __future__ import annotations

from comfy_api.latest import io, ui

from headforcing_core.errors import StateError
from headforcing_core.state_file import load_state, save_state

from .comfy_bridge import check_state, wan_backbone
from .files import (file_fingerprint, find_state_file, save_file_inputs, save_named_file, state_file_names,
                    state_folders, state_path)
from .types import AR_STATE

CATEGORY = "sampling/head_forcing/multi-prompt"


class HeadForcingSaveARState(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HeadForcingSaveARState",
            display_name="Head Forcing Save AR State",
            category=CATEGORY,
            description=("Saves an AR_STATE (the run's cache, position, RNG state and settings; safetensors + JSON) "
                         "to output/headforcing_states, where Load AR State finds it, to continue the video "
                         "in a later session."),
            inputs=[
                AR_STATE.Input("ar_state", tooltip="From Head Forcing AR Sampler or Continue."),
                *save_file_inputs("story", "output/headforcing_states"),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the state was written.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, ar_state, filename, overwrite=True) -> io.NodeOutput:
        state = check_state(ar_state)
        folder = state_folders()[0]
        path = state_path(folder, filename)
        rel = save_named_file(folder, path, lambda p: save_state(state, p), overwrite=overwrite, kind="AR_STATE",
                              article="an", error=StateError)
        text = f"saved AR_STATE {rel} ({path.stat().st_size / 2**20:.1f} MiB)\n" + state.describe()
        return io.NodeOutput(str(path), ui=ui.PreviewText(text))


class HeadForcingLoadARState(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HeadForcingLoadARState",
            display_name="Head Forcing Load AR State",
            category=CATEGORY,
            description="Loads an AR_STATE saved by Save AR State, to continue that video with Head Forcing Continue.",
            inputs=[
                io.Combo.Input("state_name", options=state_file_names(),
                               tooltip="A file in output/headforcing_states or its sub-folders (listed as 'sub/name'; "
                                       "refresh the page after saving)."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: check now that the state was made with this model's shape."),
            ],
            outputs=[
                AR_STATE.Output(display_name="ar_state", tooltip="For Head Forcing Continue."),
                io.String.Output(display_name="summary", tooltip="Frames, size, policy and segments so far."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, state_name, model=None):
        try:
            return file_fingerprint(state_name, find_state_file(state_name))
        except StateError:
            return state_name

    @classmethod
    def execute(cls, state_name, model=None) -> io.NodeOutput:
        state = load_state(find_state_file(state_name))
        if model is not None:
            state.check_model(wan_backbone(model)[1])
        return io.NodeOutput(state, state.describe())
