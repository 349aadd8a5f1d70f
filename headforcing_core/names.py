"""One name policy for every file a user names: AR states, head profiles, anything saved or loaded.

A *name* is a file name inside the pack's folder for that kind of file, optionally in sub-folders
of it, as ComfyUI's own loaders list models (``wan14b/my_profile``) and its savers take a prefix
(``sub/name`` saves into ``sub``, creating it). It is never a path that leaves the folder:

* parts separated by ``/`` (at most :data:`MAX_FOLDER_DEPTH` folders deep); a backslash is
  refused (it separates folders on Windows only, so a workflow using it would not travel), as
  are a leading ``/`` (an absolute path) and empty parts (``a//b``, a trailing ``/``);
* every part (folder or file) is 1 to :data:`MAX_NAME_CHARS` characters (and at most
  :data:`MAX_NAME_BYTES` bytes in UTF-8, the suffix included): letters and digits of any
  script, spaces, and the punctuation in :data:`ALLOWED_PUNCTUATION`;
* every part starts with a letter or a digit (so never ``.``, ``..``, a hidden file or folder,
  an option-like ``-name``) and does not end with a dot or a space;
* no control characters (newline, tab, NUL …), none of ``: * ? " < > |``;
* no part is a device name Windows reserves (``CON``, ``NUL``, ``COM1`` …).

Spaces around the name are dropped; the suffix (``.safetensors``) is added when missing, in any
case (``story`` and ``story.SAFETENSORS`` name ``story.safetensors`` and
``story.SAFETENSORS`` respectively). A name that breaks a rule is refused with one message
that says which rule and what is allowed (:func:`check_name`). :func:`safe_path` also makes
sure the file — symlinks resolved, a linked sub-folder included — lies inside the folder;
:func:`make_folders` creates a saved name's sub-folders and checks them again; and
:func:`list_names` lists exactly the files under a folder that :func:`safe_path` accepts,
sub-folders included, skipping anything else (odd names, dangling links, links that leave the
folder, unreadable entries) instead of failing.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from .errors import HeadForcingError

MAX_NAME_CHARS = 100
MAX_NAME_BYTES = 200  # well under the 255-byte limit of common file systems, suffix included
MAX_FOLDER_DEPTH = 8  # sub-folders a name may go down
SEPARATOR = "/"  # between sub-folders, on every system (what the name widget and a workflow hold)
ALLOWED_PUNCTUATION = " -_.,+=()[]@#"
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
                     *(f"lpt{i}" for i in range(1, 10))}
DEFAULT_SUFFIX = ".safetensors"


def allowed_text(suffix: str = DEFAULT_SUFFIX) -> str:
    """What a name may be, in one sentence (part of every refusal)."""
    return (f"a name is a file name, optionally in sub-folders separated by '/' (wan14b/my_file): each part "
            f"1-{MAX_NAME_CHARS} letters, digits, spaces and {' '.join(ALLOWED_PUNCTUATION.strip())}, starting with "
            "a letter or digit and not ending with a dot; no '..' or absolute paths"
            + (f"; '{suffix}' is added" if suffix else ""))


def _part_problem(part: str) -> str | None:
    """Why one part of a name (a folder or the file name, without its suffix) breaks the policy, or None."""
    if not part:
        return "it is empty"
    if part in (".", ".."):
        return f"{part!r} is a folder reference (a name stays inside its folder)"
    for ch in part:
        cat = unicodedata.category(ch)
        if cat.startswith("C"):  # Cc control, Cf format, Cs surrogate (undecodable bytes), Co, Cn
            return f"it contains the control or invisible character U+{ord(ch):04X}"
        if not (ch.isalnum() or ch in ALLOWED_PUNCTUATION):
            return f"it contains the character {ch!r}"
    if len(part) > MAX_NAME_CHARS:
        return f"it is {len(part)} characters long (at most {MAX_NAME_CHARS})"
    if not part[0].isalnum():
        return f"it starts with {part[0]!r}"
    if part[-1] in ". ":
        return f"it ends with {part[-1]!r}"
    if part.split(".")[0].strip().lower() in _WINDOWS_RESERVED:
        return f"{part.split('.')[0]!r} is a reserved device name"
    return None


def _problem(stem: str) -> str | None:
    """Why ``stem`` (the name without its suffix, sub-folders included) breaks the policy, or None."""
    if not stem:
        return "it is empty"
    if "\\" in stem:
        return "it contains a backslash (separate sub-folders with '/')"
    if stem.startswith(SEPARATOR):
        return "it is an absolute path (a name is relative to its folder)"
    parts = stem.split(SEPARATOR)
    if len(parts) - 1 > MAX_FOLDER_DEPTH:
        return f"it goes {len(parts) - 1} folders deep (at most {MAX_FOLDER_DEPTH})"
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if not part:
            return "it has no file name after the last '/'" if last else "it has an empty folder name ('//')"
        why = _part_problem(part)
        if why is not None:
            return why if len(parts) == 1 or part in (".", "..") else f"{'the file name' if last else f'folder {part!r}'}: {why}"
    return None


def check_name(name, *, kind: str = "file", suffix: str = DEFAULT_SUFFIX,
               error: type[HeadForcingError] = HeadForcingError) -> str:
    """The relative file name (``sub/name.safetensors``, suffix added) for the user's ``name``; ``error``
    naming the broken rule otherwise."""
    if not isinstance(name, str):
        raise error(f"the {kind} name must be text, got {type(name).__name__}; {allowed_text(suffix)}")
    text = name.strip(" ")
    stem = text[: -len(suffix)] if suffix and text.lower().endswith(suffix.lower()) else text
    why = _problem(stem)
    final = stem + (text[len(stem):] if stem != text else suffix)
    if why is None:
        file_part = final.rsplit(SEPARATOR, 1)[-1]
        size = len(file_part.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_BYTES:
            why = f"the file name is {size} bytes long in UTF-8 (at most {MAX_NAME_BYTES})"
        else:
            size = max((len(p.encode("utf-8", "surrogatepass")) for p in final.split(SEPARATOR)[:-1]), default=0)
            if size > MAX_NAME_BYTES:
                why = f"a folder name is {size} bytes long in UTF-8 (at most {MAX_NAME_BYTES})"
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


def _leaves(kind: str, filename: str, root: str, error: type[HeadForcingError]) -> HeadForcingError:
    return error(f"{kind} {filename!r} is a link (or lies in a linked sub-folder) that points outside its folder "
                 f"{root}; move the file into the folder instead of linking it")


def safe_path(folder, name, *, kind: str = "file", suffix: str = DEFAULT_SUFFIX, must_exist: bool = False,
              error: type[HeadForcingError] = HeadForcingError) -> Path:
    """``folder/<name>`` under the name policy; the real path (symlinks resolved, in the sub-folders too)
    must stay in ``folder``.

    With ``must_exist`` the file must exist (``error`` otherwise). The returned path is the
    resolved one, so a symlink inside the folder to a file inside the folder is followed.
    """
    filename = check_name(name, kind=kind, suffix=suffix, error=error)
    root = os.path.realpath(os.fspath(folder))
    target = os.path.realpath(os.path.join(root, *filename.split(SEPARATOR)))
    if not _inside(root, target):
        raise _leaves(kind, filename, root, error)
    path = Path(target)
    if path.is_dir():
        raise error(f"{kind} {filename!r} in {root} is a folder, not a file")
    if must_exist and not path.is_file():
        raise error(f"no {kind} file {filename!r} in {root}")
    return path


def make_folders(folder, path, *, kind: str = "file", error: type[HeadForcingError] = HeadForcingError) -> None:
    """Create the sub-folders of ``path`` (a :func:`safe_path` of ``folder``) before it is written, as
    ComfyUI's savers create the sub-folders of a ``sub/name`` prefix; ``error`` when a part of the
    way is a file or the folder made is not inside ``folder`` (a link appeared meanwhile)."""
    root = os.path.realpath(os.fspath(folder))
    parent = os.path.dirname(os.fspath(path))
    shown = os.path.relpath(parent, root).replace(os.sep, SEPARATOR)
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise error(f"cannot save the {kind} into the sub-folder {shown!r} of {root}: part of that path is a "
                    "file, not a folder") from None
    except OSError as e:
        raise error(f"cannot make the sub-folder {shown!r} in {root}: {e.strerror or e}") from None
    real = os.path.realpath(parent)
    if real != root and not _inside(root, real):
        raise _leaves(kind, shown, root, error)


def list_names(folder, *, suffix: str = DEFAULT_SUFFIX) -> list[str]:
    """The names of the files under ``folder`` that :func:`safe_path` accepts, sub-folders included
    (``sub/name.safetensors``, at most :data:`MAX_FOLDER_DEPTH` deep, as ComfyUI lists a model
    folder), sorted.

    Never raises for what is in the folder: entries with odd names (files or folders), dangling
    links, links leaving the folder, folders linked into their own ancestors, and unreadable
    entries are skipped. A missing folder lists nothing; listing never opens a file.
    """
    try:
        root = os.path.realpath(os.fspath(folder))
    except (OSError, ValueError):
        return []
    out: list[str] = []

    def walk(path: str, prefix: str, depth: int, ancestors: frozenset) -> None:
        try:
            entries = list(os.scandir(path))
        except OSError:
            return
        for entry in entries:
            try:
                name = entry.name
                rel = prefix + name
                if entry.is_dir():  # follows links
                    if depth >= MAX_FOLDER_DEPTH or _part_problem(name) is not None:
                        continue
                    real = os.path.realpath(entry.path)
                    if _inside(root, real) and real not in ancestors:
                        walk(entry.path, rel + SEPARATOR, depth + 1, ancestors | {real})
                    continue
                if suffix and not name.lower().endswith(suffix.lower()):
                    continue
                if check_name(rel, suffix=suffix) != rel:
                    continue
                if not entry.is_file():  # False for dangling links, FIFOs, sockets
                    continue
                safe_path(root, rel, suffix=suffix)
            except (HeadForcingError, OSError, ValueError):
                continue
            out.append(rel)

    walk(root, "", 0, frozenset({root}))
    return sorted(out)
