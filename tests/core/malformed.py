"""Generators of malformed AR_STATE and head profile files: every field wrong in turn.

Used by the core tests (every variant through ``load_state`` / ``load_profile``) and the
end-to-end tests (a selection through the real server). A *variant* is
``(label, metadata, tensors)``; ``label`` says what was broken (``"meta.steps=str"``,
``"tensor tail: shape"``), ``metadata`` is the safetensors header (a dict of strings) and
``tensors`` the tensors to write.

Per JSON field the generator drops it (inside objects), sets it to another type (text, a
bool, null, a list, an object) and to out-of-range numbers (0, -1, 10^12 and 1e12, a
fraction), and shortens / lengthens lists. Per tensor it drops it, changes its dtype, its
shape and its values (NaN), and it adds an unknown tensor. Nothing here knows what a valid
value is: the loader must refuse a variant with its own error class or accept it, and an
accepted variant must still be usable (the tests check that part).
"""

from __future__ import annotations

import copy
import json
from typing import Iterator

import torch

BAD_VALUES = {
    "str": "abc", "bool": True, "null": None, "list": [1], "object": {"x": 1}, "zero": 0, "negative": -1,
    "huge_int": 10**12, "huge_float": 1e12, "fraction": 0.5,
}


def _paths(node, prefix=()) -> Iterator[tuple]:
    """Every key path of a JSON document (objects and lists), parents before children."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def _name(path) -> str:
    return ".".join(str(p) for p in path)


def json_variants(doc: dict, *, skip_under: tuple = (), sample_under: dict | None = None) -> Iterator[tuple[str, dict]]:
    """(label, broken copy of ``doc``) for every field of ``doc``.

    ``sample_under``: ``{top-level key: n}`` keeps only every n-th path below that key (big
    bookkeeping subtrees such as a cache map); ``skip_under`` leaves subtrees alone.
    """
    counters: dict = {}
    for path in _paths(doc):
        top = path[0]
        if top in skip_under and len(path) > 1:
            continue
        if sample_under and top in sample_under and len(path) > 1:
            counters[top] = counters.get(top, -1) + 1
            if counters[top] % sample_under[top]:
                continue
        parent_path, key = path[:-1], path[-1]
        value = _get(doc, path)
        if isinstance(key, str):
            d = copy.deepcopy(doc)
            del _get(d, parent_path)[key]
            yield f"{_name(path)}=missing", d
        for tag, bad in BAD_VALUES.items():
            if type(bad) is type(value) and bad == value:
                continue
            d = copy.deepcopy(doc)
            _get(d, parent_path)[key] = copy.deepcopy(bad)
            yield f"{_name(path)}={tag}", d
        if isinstance(value, list):
            d = copy.deepcopy(doc)
            _get(d, path).append(copy.deepcopy(value[-1]) if value else "x")
            yield f"{_name(path)}=longer", d
            if value:
                d = copy.deepcopy(doc)
                _get(d, path).pop()
                yield f"{_name(path)}=shorter", d
        elif isinstance(value, int) and not isinstance(value, bool):
            d = copy.deepcopy(doc)
            _get(d, parent_path)[key] = value + 1
            yield f"{_name(path)}=plus_one", d


def tensor_variants(tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, dict]]:
    for name, t in tensors.items():
        rest = {k: v for k, v in tensors.items() if k != name}
        yield f"tensor {name}=missing", rest
        other = torch.float64 if t.dtype != torch.float64 else torch.float32
        if t.dtype.is_floating_point:
            yield f"tensor {name}=dtype", {**rest, name: t.to(other)}
            if t.numel():
                nan = t.clone()
                nan.view(-1)[0] = float("nan")
                yield f"tensor {name}=nan", {**rest, name: nan}
        else:
            yield f"tensor {name}=dtype", {**rest, name: t.to(torch.float32)}
        yield f"tensor {name}=extra_dim", {**rest, name: t.unsqueeze(0).contiguous()}
        if t.ndim and t.shape[-1] > 1:
            yield f"tensor {name}=shorter", {**rest, name: t[..., :-1].contiguous()}
        if t.ndim:
            yield f"tensor {name}=longer", {**rest, name: torch.cat([t, t[..., -1:]], dim=-1).contiguous()}
    yield "tensor unknown=extra", {**tensors, "something_else": torch.zeros(2)}


def state_variants(meta_json: str, tensors: dict[str, torch.Tensor], *, cache_sample: int = 7
                   ) -> Iterator[tuple[str, dict, dict]]:
    """Malformed AR_STATE files (header key ``headforcing_state``) from a good state."""
    meta = json.loads(meta_json)
    for label, doc in json_variants(meta, sample_under={"cache": cache_sample}):
        yield "meta." + label, {"headforcing_state": json.dumps(doc)}, tensors
    for label, ts in tensor_variants(dict(tensors)):
        yield label, {"headforcing_state": meta_json}, ts
    yield "meta=not_json", {"headforcing_state": "{not json"}, tensors
    yield "meta=deep_json", {"headforcing_state": "[" * 100000 + "]" * 100000}, tensors
    yield "meta=list", {"headforcing_state": "[]"}, tensors
    yield "meta=absent", {"format": "pt"}, tensors


def profile_variants(header: dict, tensors: dict[str, torch.Tensor]) -> Iterator[tuple[str, dict, dict]]:
    """Malformed head profile files from a good one's header (``format``, ``format_version``,
    ``headforcing`` JSON) and tensors."""
    meta = json.loads(header["headforcing"])
    for label, doc in json_variants(meta):
        yield "meta." + label, {**header, "headforcing": json.dumps(doc)}, tensors
    for key in ("format", "format_version", "headforcing"):
        h = dict(header)
        del h[key]
        yield f"header.{key}=missing", h, tensors
        for tag, bad in (("str", "abc"), ("empty", ""), ("huge", "9" * 30), ("negative", "-1")):
            yield f"header.{key}={tag}", {**header, key: bad}, tensors
    for label, ts in tensor_variants({k: v for k, v in tensors.items() if not k.startswith("summary.")}):
        yield label, header, {**ts, **{k: v for k, v in tensors.items() if k.startswith("summary.")}}
    for name, t in tensors.items():
        if name.startswith("labels."):
            yield f"tensor {name}=codes", header, {**tensors, name: torch.full_like(t, 7)}
            yield f"tensor {name}=negative_codes", header, {**tensors, name: torch.full_like(t, -1)}
    yield "header.headforcing=deep_json", {**header, "headforcing": "[" * 100000 + "]" * 100000}, tensors
