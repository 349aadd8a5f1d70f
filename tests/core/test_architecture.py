"""The house rules: no import cycles inside the pack's packages, and the core never imports ComfyUI.

Imports are read with the standard library's ``ast`` (module-level and function-level ones alike:
a lazy import is still a dependency), resolved to the pack's own modules.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFY = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "execution", "latent_preview", "nodes")


def modules(package: str) -> dict[str, Path]:
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path, known: set[str]) -> tuple[set[str], set[str]]:
    """(the pack's modules this one imports, the top-level names of everything it imports)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    internal, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
                external.add(name.split(".")[0])
            for cand in [name] + [f"{name}.{a.name}" for a in node.names]:
                if cand in known:
                    internal.add(cand)
        elif isinstance(node, ast.Import):
            for a in node.names:
                external.add(a.name.split(".")[0])
                if a.name in known:
                    internal.add(a.name)
    internal.discard(module)
    return internal, external


def cycles(package: str) -> list[list[str]]:
    known = modules(package)
    graph = {m: imports_of(m, p, set(known))[0] for m, p in known.items()}
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


@pytest.mark.parametrize("package", ["headforcing_core", "nodes", "tools"])
def test_no_import_cycles(package):
    assert cycles(package) == [], "\n".join(" -> ".join(c) for c in cycles(package))


def test_the_core_never_imports_comfyui():
    known = modules("headforcing_core")
    offenders = {m: sorted(set(imports_of(m, p, set(known))[1]) & set(COMFY)) for m, p in known.items()}
    assert {m: v for m, v in offenders.items() if v} == {}


def test_the_cycle_finder_finds_cycles(tmp_path, monkeypatch):
    """The test above can fail: a planted two-module loop (one import inside a function) is reported."""
    import sys
    pkg = tmp_path / "loopy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert cycles("loopy") == [["loopy.a", "loopy.b", "loopy.a"]]
