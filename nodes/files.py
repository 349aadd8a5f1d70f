"""The pack's user-named files in ComfyUI's folders: where they live, which names a node lists, how a
Save node writes one.

* head profiles — ``models/headforcing`` (ComfyUI's models folder, under ``--base-directory`` when
  given; extra_model_paths.yaml may add more), registered when this module is imported, first in
  the list so saves land there; plus the shipped read-only presets (``preset: …``);
* AR states — ``output/headforcing_states``, registered on first use.

Names follow the pack's one name policy (:mod:`headforcing_core.names`): a name may go into
sub-folders as ComfyUI's own loaders list them and its savers take them (``wan14b/my_profile``:
listed with its sub-folder, saved into it, the sub-folder created), but a node never reaches outside
these folders.
"""
from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from headforcing_core.errors import HeadForcingError, StateError
from headforcing_core.names import list_names, make_folders, safe_path
from headforcing_core.profiling import FOLDER_NAME, list_profiles

log = logging.getLogger("headforcing")

STATES_FOLDER = "headforcing_states"

folder_paths.add_model_folder_path(FOLDER_NAME, os.path.join(folder_paths.models_dir, FOLDER_NAME), is_default=True)


# ---------------------------------------------------------------------------------------------
# head profiles


def profile_folders() -> list[str]:
    return folder_paths.get_folder_paths(FOLDER_NAME)


def profile_file_names() -> list[str]:
    """Profile files Load Head Profile offers: the names in the profile folder(s) the name policy accepts."""
    names: set[str] = set()
    for folder in profile_folders():
        names.update(list_profiles(folder))
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# AR states


def _register_states_folder() -> None:
    if STATES_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(
            STATES_FOLDER, os.path.join(folder_paths.get_output_directory(), STATES_FOLDER), is_default=True)
    exts = folder_paths.folder_names_and_paths[STATES_FOLDER][1]
    if isinstance(exts, set):
        exts.add(".safetensors")


def state_folders() -> list[str]:
    _register_states_folder()
    return folder_paths.get_folder_paths(STATES_FOLDER)


def state_file_names() -> list[str]:
    """AR_STATE files Load AR State offers: the names in the states folder(s) the name policy accepts."""
    names: set[str] = set()
    for folder in state_folders():
        names.update(list_names(folder, suffix=".safetensors"))
    return sorted(names)


def state_path(folder, name: str):
    """``folder/<name>`` under the pack's one name policy (headforcing_core.names)."""
    return safe_path(folder, name, kind="AR_STATE", error=StateError)


def find_state_file(name: str):
    for folder in state_folders():
        path = state_path(folder, name)
        if path.is_file():
            return path
    raise StateError(f"no AR_STATE file {name!r} in {', '.join(state_folders())}")


# ---------------------------------------------------------------------------------------------
# what Save and Load nodes share


def save_named_file(folder, path, write, *, overwrite: bool, kind: str, article: str,
                    error: type[HeadForcingError]) -> str:
    """Save nodes: ``write(path)`` (its sub-folders made first) unless ``path`` exists and ``overwrite`` is off
    (``error``: "``article kind`` 'name' already exists ..."); returns the path relative to ``folder``
    (``sub/name.safetensors``)."""
    rel = path.relative_to(os.path.realpath(folder)).as_posix()
    if path.exists() and not overwrite:
        raise error(f"{article} {kind} {rel!r} already exists in {folder}; turn on overwrite or pick another "
                    "filename")
    make_folders(folder, path, kind=kind, error=error)
    write(path)
    log.info("headforcing: saved %s to %s", kind, path)
    return rel


def file_fingerprint(name: str, path) -> str:
    """Load nodes' ``fingerprint_inputs``: the name with the file's modification time and size (a re-saved
    file is reloaded), or the name alone when there is no such file."""
    if path is None:
        return name
    st = path.stat()
    return f"{name}:{st.st_mtime_ns}:{st.st_size}"


def save_file_inputs(default: str, folder: str) -> list:
    """Save nodes' ``filename`` and ``overwrite`` inputs (``folder``: where the file lands, as the user sees it)."""
    return [
        io.String.Input("filename", default=default,
                        tooltip=f"File name inside {folder}, optionally in sub-folders ('wan14b/{default}' saves "
                                "into wan14b, creating it): letters, digits, spaces and - _ . , + = ( ) [ ] @ #, up "
                                "to 100 characters a part, no '..'; '.safetensors' is added."),
        io.Boolean.Input("overwrite", default=True, optional=True,
                         tooltip="Replace an existing file of that name (off: refuse)."),
    ]
