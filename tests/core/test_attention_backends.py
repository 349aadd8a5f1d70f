"""Every attention backend agrees with the per-head reference on random ragged layouts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headforcing_core.attention import (BACKENDS, GroupProblem, flash_varlen_available, reference_attention,
                                        select_backend)


@st.composite
def ragged_layouts(draw):
    batch = draw(st.integers(1, 2))
    queries = draw(st.integers(1, 12))
    dim = draw(st.sampled_from([8, 16, 64]))
    groups = draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 40)), min_size=1, max_size=5))
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, queries, dim, groups, seed


def make_problems(batch, queries, dim, groups, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for heads, length in groups:
        q = torch.randn(batch, queries, heads, dim, generator=g)
        k = torch.randn(batch, length, heads, dim, generator=g)
        v = torch.randn(batch, length, heads, dim, generator=g)
        out.append(GroupProblem(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)))
    return out


@pytest.mark.parametrize("name", ["grouped", "padded"])
@settings(max_examples=60, deadline=None)
@given(layout=ragged_layouts())
def test_cpu_backends_match_reference(name, layout):
    problems = make_problems(*layout)
    ref = reference_attention(problems)
    got = BACKENDS[name](problems)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4)


def test_reference_is_a_real_softmax():
    p = make_problems(1, 3, 8, [(2, 5)], 0)[0]
    p.k[:, 2] = 50 * p.q[:, 0]  # query 0 must attend almost only to key 2
    out = reference_attention([p])[0]
    assert torch.allclose(out[:, 0], p.v[:, 2], atol=1e-4)


def test_auto_falls_back_to_grouped_without_flash():
    name, fn = select_backend("auto", torch.device("cpu"), torch.float32)
    assert name == "grouped" and fn is BACKENDS["grouped"]
    with pytest.raises(ValueError):
        select_backend("flash_varlen", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError):
        select_backend("nope", torch.device("cpu"), torch.float32)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["grouped", "padded", "flash_varlen"])
@settings(max_examples=30, deadline=None)
@given(layout=ragged_layouts())
def test_gpu_backends_match_reference_bf16(name, layout):
    if name == "flash_varlen" and not flash_varlen_available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("flash-attn not installed")
    problems = make_problems(*layout, dtype=torch.bfloat16, device="cuda")
    ref = reference_attention(problems)
    for a, b in zip(BACKENDS[name](problems), ref):
        assert torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2)
