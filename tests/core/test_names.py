"""One name policy for every user-named file; folder listings survive any bad entry."""

import os

import pytest

from headforcing_core import ProfileError, StateError
from headforcing_core.names import MAX_NAME_CHARS, check_name, list_names, safe_path


@pytest.mark.parametrize("name, why", [
    ("", "it is empty"), ("   ", "it is empty"), (".", "folder reference"), ("..", "folder reference"),
    ("..safetensors", "folder reference"), (".safetensors", "it is empty"), ("sub/", "path separator"),
    ("sub/x", "path separator"), ("a\\b", "path separator"), ("../x", "path separator"), ("/etc/passwd", "separator"),
    ("C:\\x", "character ':'"), ("a\nb", "U+000A"), ("story\n", "U+000A"), ("a\x00b", "U+0000"),
    ("tab\there", "U+0009"), ("zero\u200bwidth", "U+200B"), ("x" * (MAX_NAME_CHARS + 1), "characters long"),
    ("é" * 99 + "x", "bytes long"), (".hidden", "it starts with '.'"), ("-rf", "it starts with '-'"),
    ("ends.", "it ends with '.'"), ("con", "reserved device name"), ("LPT1.txt", "reserved device name"),
    ("preset: x", "character ':'"), ("a*b", "character '*'"), ("a?b", "character '?'"), ('a"b', "character"),
    ("a<b>", "character '<'"), ("a|b", "character '|'"), ("\udcff", "U+DCFF"), (None, "must be text"),
    (42, "must be text"),
])
def test_bad_names_are_refused_saying_why_and_what_is_allowed(tmp_path, name, why):
    for kind, error in (("AR_STATE", StateError), ("head profile", ProfileError)):
        with pytest.raises(error) as e:
            safe_path(tmp_path, name, kind=kind, error=error)
        msg = str(e.value)
        assert why in msg and "letters, digits, spaces" in msg and "no folders" in msg, msg
        assert msg.startswith(f"{kind} name") or msg.startswith(f"the {kind} name"), msg
        assert not any((tmp_path / p).exists() for p in os.listdir(tmp_path))  # nothing created


@pytest.mark.parametrize("name, file", [
    ("story", "story.safetensors"), ("story.safetensors", "story.safetensors"), ("Story.SAFETENSORS", "Story.SAFETENSORS"),
    ("  story  ", "story.safetensors"), ("my story (v2) [final] #3", "my story (v2) [final] #3.safetensors"),
    ("füchse_über_schnee", "füchse_über_schnee.safetensors"), ("狐狸", "狐狸.safetensors"), ("a.b.c", "a.b.c.safetensors"),
    ("x" * MAX_NAME_CHARS, "x" * MAX_NAME_CHARS + ".safetensors"), ("1", "1.safetensors"),
])
def test_good_names(tmp_path, name, file):
    assert check_name(name) == file
    assert safe_path(tmp_path, name) == tmp_path.resolve() / file


def test_links_leaving_the_folder_are_refused_links_inside_are_followed(tmp_path):
    folder, outside = tmp_path / "f", tmp_path / "o"
    folder.mkdir()
    outside.mkdir()
    (outside / "x.safetensors").write_bytes(b"x")
    (folder / "ok.safetensors").write_bytes(b"x")
    os.symlink(outside / "x.safetensors", folder / "out.safetensors")
    os.symlink(folder / "ok.safetensors", folder / "alias.safetensors")
    with pytest.raises(StateError, match="points outside its folder"):
        safe_path(folder, "out", kind="AR_STATE", error=StateError)
    assert safe_path(folder, "alias") == (folder / "ok.safetensors").resolve()
    with pytest.raises(StateError, match="no AR_STATE file 'missing.safetensors'"):
        safe_path(folder, "missing", kind="AR_STATE", error=StateError, must_exist=True)
    (folder / "dir.safetensors").mkdir()
    with pytest.raises(StateError, match="is a folder"):
        safe_path(folder, "dir", kind="AR_STATE", error=StateError)


def test_listing_survives_any_bad_entry(tmp_path):
    folder = tmp_path / "states"
    folder.mkdir()
    good = ["a.safetensors", "story (2).safetensors", "ok.SAFETENSORS"]
    for n in good:
        (folder / n).write_bytes(b"not even a safetensors file")  # listing never opens files
    bad = ["new\nline.safetensors", ".hidden.safetensors", "-x.safetensors", "sp ace .safetensors",
           "x" * 150 + ".safetensors"]
    for n in bad:
        (folder / n).write_bytes(b"x")
    os.mkdir(folder / "dir.safetensors")
    os.symlink(tmp_path / "nowhere", folder / "dangling.safetensors")
    os.symlink(folder / "loop.safetensors", folder / "loop.safetensors")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "secret.safetensors", folder / "escape.safetensors")
    os.mkfifo(folder / "fifo.safetensors")
    raw = os.fsencode(folder) + b"/bad\xff.safetensors"  # not UTF-8
    with open(raw, "wb") as f:
        f.write(b"x")
    (folder / "notes.txt").write_text("x")
    (folder / "sub").mkdir()
    (folder / "sub" / "nested.safetensors").write_bytes(b"x")
    assert list_names(folder) == sorted(good)
    assert list_names(tmp_path / "missing") == []
    assert list_names(folder / "a.safetensors") == []  # a file, not a folder
