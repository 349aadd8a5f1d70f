"""One name policy for every file a user names: AR states, head profiles, anything saved or loaded.

A *name* is one plain file name inside the pack's folder for that kind of file (never a path):

* 1 to :data:`MAX_NAME_CHARS` characters (and at most :data:`MAX_NAME_BYTES` bytes in UTF-8),
  not counting the suffix;
* letters and digits of any script, spaces, and the punctuation in :data:`ALLOWED_PUNCTUATION`;
* it starts with a letter or a digit (so never ``.``, ``..``, a hidden file or an option-like
  ``-name``) and does not end with a dot or a space;
* no path separators, no control characters (newline, tab, NUL …), none of ``: * ? " < > |``;
* not a device name Windows reserves (``CON``, ``NUL``, ``COM1`` …).

Spaces around the name are dropped; the suffix (``.safetensors``) is added when missing, in any
case (``story`` and ``story.SAFETENSORS`` name ``story.safetensors`` and
``story.SAFETENSORS`` respectively). A name that breaks a rule is refused with one message
that says which rule and what is allowed (:func:`check_name`). :func:`safe_path` also makes
sure the file — symlinks resolved — lies inside the folder, and :func:`list_names` lists exactly
the files of a folder that :func:`safe_path` accepts, skipping anything else (odd names,
dangling links, sub-folders, unreadable entries) instead of failing.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from .errors import HeadForcingError

MAX_NAME_CHARS = 100
MAX_NAME_BYTES = 200  # well under the 255-byte limit of common file systems, suffix included
ALLOWED_PUNCTUATION = " -_.,+=()[]@#"
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                     *(f"lpt{i}" for i in range(1, 10))}
DEFAULT_SUFFIX = ".safetensors"


def allowed_text(suffix: str = DEFAULT_SUFFIX) -> str:
    """What a name may be, in one sentence (part of every refusal)."""
    return (f"a name is one file name (no folders): 1-{MAX_NAME_CHARS} letters, digits, spaces and "
            f"{' '.join(ALLOWED_PUNCTUATION.strip())}, starting with a letter or digit and not ending with a dot"
            + (f"; '{suffix}' is added" if suffix else ""))


def _problem(stem: str) -> str | None:
    """Why ``stem`` (the name without its suffix) breaks the policy, or None."""
    if not stem:
        return "it is empty"
    if stem in (".", ".."):
        return f"{stem!r} is a folder reference"
    for ch in stem:
        if ch in "/\\":
            return "it contains a path separator (sub-folders and paths are not allowed)"
        cat = unicodedata.category(ch)
        if cat.startswith("C"):  # Cc control, Cf format, Cs surrogate (undecodable bytes), Co, Cn
            return f"it contains the control or invisible character U+{ord(ch):04X}"
        if not (ch.isalnum() or ch in ALLOWED_PUNCTUATION):
            return f"it contains the character {ch!r}"
    if len(stem) > MAX_NAME_CHARS:
        return f"it is {len(stem)} characters long (at most {MAX_NAME_CHARS})"
    if not stem[0].isalnum():
        return f"it starts with {stem[0]!r}"
    if stem[-1] in ". ":
        return f"it ends with {stem[-1]!r}"
    if stem.split(".")[0].strip().lower() in _WINDOWS_RESERVED:
        return f"{stem.split('.')[0]!r} is a reserved device name"
    return None


def check_name(name, *, kind: str = "file", suffix: str = DEFAULT_SUFFIX,
               error: type[HeadForcingError] = HeadForcingError) -> str:
    """The file name (suffix added) for the user's ``name``; ``error`` naming the broken rule otherwise."""
    if not isinstance(name, str):
        raise error(f"the {kind} name must be text, got {type(name).__name__}; {allowed_text(suffix)}")
    text = name.strip(" ")
    stem = text[: -len(suffix)] if suffix and text.lower().endswith(suffix.lower()) else text
    why = _problem(stem)
    final = stem + (text[len(stem):] if stem != text else suffix)
    if why is None and len(final.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        why = f"it is {len(final.encode('utf-8', 'surrogatepass'))} bytes long in UTF-8 (at most {MAX_NAME_BYTES})"
    if why is not None:
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise error(f"{kind} name {shown!r} is not allowed: {why}. {allowed_text(suffix)[0].upper()}"
                    f"{allowed_text(suffix)[1:]}.")
    return final


def _inside(root: str, target: str) -> bool:
    try:
        return os.path.commonpath([root, target]) == root and target != root
    except ValueError:  # another drive
        return False


def safe_path(folder, name, *, kind: str = "file", suffix: str = DEFAULT_SUFFIX, must_exist: bool = False,
              error: type[HeadForcingError] = HeadForcingError) -> Path:
    """``folder/<name>`` under the name policy; the real path (symlinks resolved) must stay in ``folder``.

    With ``must_exist`` the file must exist (``error`` otherwise). The returned path is the
    resolved one, so a symlink inside the folder to a file inside the folder is followed.
    """
    filename = check_name(name, kind=kind, suffix=suffix, error=error)
    root = os.path.realpath(os.fspath(folder))
    target = os.path.realpath(os.path.join(root, filename))
    if not _inside(root, target):
        raise error(f"{kind} {filename!r} is a link that points outside its folder {root}; move the file into "
                    "the folder instead of linking it")
    path = Path(target)
    if path.is_dir():
        raise error(f"{kind} {filename!r} in {root} is a folder, not a file")
    if must_exist and not path.is_file():
        raise error(f"no {kind} file {filename!r} in {root}")
    return path


def list_names(folder, *, suffix: str = DEFAULT_SUFFIX) -> list[str]:
    """The names of the files directly in ``folder`` that :func:`safe_path` accepts, sorted.

    Never raises for what is in the folder: entries with odd names, dangling or escaping
    links, sub-folders and unreadable entries are skipped. A missing folder lists nothing.
    """
    root = os.fspath(folder)
    out = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    for entry in entries:
        try:
            name = entry.name
            if suffix and not name.lower().endswith(suffix.lower()):
                continue
            if check_name(name, suffix=suffix) != name:
                continue
            if not entry.is_file():  # follows links; False for dangling ones and folders
                continue
            safe_path(root, name, suffix=suffix)
        except (HeadForcingError, OSError, ValueError):
            continue
        out.append(name)
    return sorted(out)
