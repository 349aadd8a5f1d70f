"""The node reference (docs/nodes.md, linked from the README) covers every node the server registers,
with every input and output by name; the README's browser section shows images that exist."""
from __future__ import annotations

import re

import pytest

from .conftest import REPO

pytestmark = pytest.mark.browser


def _section(doc: str, node_id: str) -> str | None:
    m = re.search(r"^#+ .*`%s`.*$" % re.escape(node_id), doc, re.M)
    if not m:
        return None
    rest = doc[m.end():]
    nxt = re.search(r"^#{2,3} ", rest, re.M)
    return rest[:nxt.start()] if nxt else rest


def test_node_reference_lists_every_node(ui_server):
    doc = (REPO / "docs" / "nodes.md").read_text()
    info = ui_server.object_info()
    ours = sorted(k for k in info if k.startswith("HeadForcing"))
    assert len(ours) >= 11, ours
    problems = []
    for node_id in ours:
        sec = _section(doc, node_id)
        if sec is None:
            problems.append(f"{node_id}: no section")
            continue
        names = [n for g in ("required", "optional") for n in (info[node_id]["input"].get(g) or {})]
        missing = [n for n in names + list(info[node_id].get("output_name") or []) if f"`{n}`" not in sec]
        if missing:
            problems.append(f"{node_id}: {missing} not described")
    assert not problems, "docs/nodes.md is incomplete:\n" + "\n".join(problems)
    readme = (REPO / "README.md").read_text()
    assert "docs/nodes.md" in readme


def test_readme_browser_section_images_exist():
    readme = (REPO / "README.md").read_text()
    assert "## In the browser" in readme
    section = readme.split("## In the browser", 1)[1].split("\n## ", 1)[0]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section)
    assert images, "the browser section shows screenshots"
    for rel in images:
        path = REPO / rel
        assert path.exists(), rel
        assert path.stat().st_size < 400_000, f"{rel} is large; keep docs images small"
