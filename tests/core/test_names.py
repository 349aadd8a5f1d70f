"""One name policy for every user-named file (sub-folders as ComfyUI's loaders and savers have them, never
leaving the folder); folder listings survive any bad entry."""

import os

import pytest

from headforcing_core import ProfileError, StateError
from headforcing_core.names import MAX_FOLDER_DEPTH, MAX_NAME_CHARS, check_name, list_names, make_folders, safe_path


@pytest.mark.parametrize("name, why", [
    ("", "it is empty"), ("   ", "it is empty"), (".", "folder reference"), ("..", "folder reference"),
    ("..safetensors", "folder reference"), (".safetensors", "it is empty"),
    # paths that leave the folder or are not relative names
    ("../x", "'..' is a folder reference"), ("a/../../x", "'..' is a folder reference"),
    ("a/..", "'..' is a folder reference"), ("./x", "'.' is a folder reference"), ("a/./b", "'.' is a folder reference"),
    ("/etc/passwd", "absolute path"), ("/tmp/x.safetensors", "absolute path"), ("//server/share/x", "absolute path"),
    ("a\\b", "backslash"), ("..\\x", "backslash"), ("C:\\x", "backslash"), ("C:/x", "folder 'C:': it contains the character ':'"),
    ("sub/", "no file name after the last '/'"), ("sub/.safetensors", "no file name after the last '/'"),
    ("a//b", "empty folder name"), ("/".join(["d"] * (MAX_FOLDER_DEPTH + 1)) + "/x", "folders deep"),
    # folder parts follow the same rules as file names
    (".git/x", "folder '.git': it starts with '.'"), (".hidden/x", "it starts with '.'"), ("-rf/x", "it starts with '-'"),
    ("dir./x", "it ends with '.'"), ("con/x", "reserved device name"), ("a\nb/x", "U+000A"), ("x" * 101 + "/y", "characters long"),
    ("ok/" + "é" * 99 + "x", "bytes long"), ("狐" * 100 + "/ok", "a folder name is 300 bytes"),
    ("sub/a*b", "the file name: it contains the character '*'"), ("sub/.hidden", "the file name: it starts with '.'"),
    # one part
    ("a\nb", "U+000A"), ("story\n", "U+000A"), ("a\x00b", "U+0000"),
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
        assert why in msg and "letters, digits, spaces" in msg and "sub-folders separated by '/'" in msg, msg
        assert msg.startswith(f"{kind} name") or msg.startswith(f"the {kind} name"), msg
        assert os.listdir(tmp_path) == []  # nothing created


@pytest.mark.parametrize("name, file", [
    ("story", "story.safetensors"), ("story.safetensors", "story.safetensors"), ("Story.SAFETENSORS", "Story.SAFETENSORS"),
    ("  story  ", "story.safetensors"), ("my story (v2) [final] #3", "my story (v2) [final] #3.safetensors"),
    ("füchse_über_schnee", "füchse_über_schnee.safetensors"), ("狐狸", "狐狸.safetensors"), ("a.b.c", "a.b.c.safetensors"),
    ("x" * MAX_NAME_CHARS, "x" * MAX_NAME_CHARS + ".safetensors"), ("1", "1.safetensors"),
    ("wan14b/x", "wan14b/x.safetensors"), ("headforcing/wan14b/x.safetensors", "headforcing/wan14b/x.safetensors"),
    ("Runs 2026/story (1)", "Runs 2026/story (1).safetensors"), ("v1.2/x", "v1.2/x.safetensors"),
    ("/".join(["d"] * MAX_FOLDER_DEPTH) + "/x", "/".join(["d"] * MAX_FOLDER_DEPTH) + "/x.safetensors"),
])
def test_good_names(tmp_path, name, file):
    assert check_name(name) == file
    assert safe_path(tmp_path, name) == tmp_path.resolve().joinpath(*file.split("/"))
    assert os.listdir(tmp_path) == []  # checking a name creates nothing


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
    good.append("sub/nested.safetensors")
    for odd in (".git", "-x", "bad\nfolder", "dot."):  # folders the name policy refuses are not entered
        (folder / odd).mkdir()
        (folder / odd / "hidden.safetensors").write_bytes(b"x")
    (folder / "sub" / "nested.txt").write_text("x")
    os.mkfifo(folder / "sub" / "fifo.safetensors")
    assert list_names(folder) == sorted(good)
    assert list_names(tmp_path / "missing") == []
    assert list_names(folder / "a.safetensors") == []  # a file, not a folder


def test_sub_folders_list_save_and_load_like_comfyui(tmp_path):
    """`sub/name` in the list and in the name; saving creates the sub-folder (as ComfyUI's savers do)."""
    folder = tmp_path / "headforcing"
    path = safe_path(folder, "wan14b/x", kind="head profile", error=ProfileError)
    assert path == (folder / "wan14b" / "x.safetensors").resolve() and not (folder / "wan14b").exists()
    make_folders(folder, path, kind="head profile", error=ProfileError)
    assert (folder / "wan14b").is_dir()
    path.write_bytes(b"x")
    (folder / "top.safetensors").write_bytes(b"x")
    (folder / "a" / "b" / "c").mkdir(parents=True)
    (folder / "a" / "b" / "c" / "deep.safetensors").write_bytes(b"x")
    assert list_names(folder) == ["a/b/c/deep.safetensors", "top.safetensors", "wan14b/x.safetensors"]
    assert safe_path(folder, "wan14b/x", must_exist=True) == path
    with pytest.raises(ProfileError, match="no head profile file 'wan14b/y.safetensors'"):
        safe_path(folder, "wan14b/y", kind="head profile", error=ProfileError, must_exist=True)


def test_saving_under_a_file_says_so(tmp_path):
    folder = tmp_path / "states"
    folder.mkdir()
    (folder / "taken").write_bytes(b"x")
    path = safe_path(folder, "taken/x", kind="AR_STATE", error=StateError)
    with pytest.raises(StateError, match="part of that path is a file"):
        make_folders(folder, path, kind="AR_STATE", error=StateError)


def test_linked_sub_folders_that_leave_the_folder_are_refused(tmp_path):
    folder, outside = tmp_path / "f", tmp_path / "o"
    (folder / "inner").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"x")
    (folder / "inner" / "ok.safetensors").write_bytes(b"x")
    os.symlink(outside, folder / "escape")                 # a sub-folder that points outside
    os.symlink(folder / "inner", folder / "alias")         # a sub-folder linked inside: followed
    os.symlink(folder, folder / "inner" / "loop")          # a folder linked into its own ancestor
    os.symlink("../../o", folder / "inner" / "rel_escape")  # a relative link out of the folder
    for name in ("escape/secret", "inner/rel_escape/secret", "alias/../escape/secret"):
        with pytest.raises(StateError) as e:
            safe_path(folder, name, kind="AR_STATE", error=StateError)
        assert "points outside its folder" in str(e.value) or "folder reference" in str(e.value), str(e.value)
    assert safe_path(folder, "alias/ok") == (folder / "inner" / "ok.safetensors").resolve()
    # saving into a linked sub-folder that leaves: refused before anything is written
    with pytest.raises(StateError, match="points outside its folder"):
        safe_path(folder, "escape/new", kind="AR_STATE", error=StateError)
    # a link that appears between the check and the save is caught when the folders are made
    path = safe_path(folder, "later/new", kind="AR_STATE", error=StateError)
    os.symlink(outside, folder / "later")
    with pytest.raises(StateError, match="points outside its folder"):
        make_folders(folder, path, kind="AR_STATE", error=StateError)
    assert not (outside / "new.safetensors").exists()
    # the listing follows links inside, never the ones that leave, and stops at the loop
    assert list_names(folder) == ["alias/ok.safetensors", "inner/ok.safetensors"]
    assert safe_path(folder, "inner/loop/inner/ok") == (folder / "inner" / "ok.safetensors").resolve()


def test_listing_stops_at_the_depth_limit(tmp_path):
    deep = tmp_path.joinpath(*["d"] * (MAX_FOLDER_DEPTH + 1))
    deep.mkdir(parents=True)
    (deep / "too_deep.safetensors").write_bytes(b"x")
    (deep.parent / "deepest.safetensors").write_bytes(b"x")
    assert list_names(tmp_path) == ["/".join(["d"] * MAX_FOLDER_DEPTH) + "/deepest.safetensors"]
