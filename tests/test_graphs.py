"""CUDA graph replay of the sparse pipeline gives the eager pipeline's results (CUDA only)."""

from __future__ import annotations

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_graphs_flag_is_ignored_off_cuda() -> None:
    from sacli.kernels import graphs, sample_attention

    graphs.clear()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, h, 300, 64, generator=g) for h in (2, 1, 1))
    kw = dict(alpha=0.9, window=0.05, sample_ratio=0.1, dense_below=0, backend="torch")
    a, sa = sample_attention(q, k, v, graphs=True, **kw)
    b, sb = sample_attention(q, k, v, graphs=False, **kw)
    assert torch.equal(a, b) and torch.equal(sa.selection.cols, sb.selection.cols)
    assert graphs.status() == [], "nothing cached for CPU tensors"


@needs_cuda
def test_graph_replay_equals_eager_on_fresh_inputs() -> None:
    pytest.importorskip("triton")
    from sacli.kernels import graphs, sample_attention

    graphs.clear()
    B, Hq, Hkv, S, D = 1, 4, 2, 2048, 64
    g = torch.Generator(device="cuda").manual_seed(3)
    kw = dict(alpha=0.9, window=0.05, sample_ratio=0.05, dense_below=0, backend="triton")
    for call in range(4):  # eager, capture + replay, replay, replay
        q, k, v = (torch.randn(B, h, S, D, device="cuda", generator=g).to(torch.bfloat16) for h in (Hq, Hkv, Hkv))
        got, st = sample_attention(q, k, v, graphs=True, **kw)
        ref, sr = sample_attention(q, k, v, graphs=False, **kw)
        assert torch.equal(got, ref), f"call {call}: graph output differs"
        assert torch.equal(st.selection.cols, sr.selection.cols) and torch.equal(st.density, sr.density)
    assert graphs.status()[0]["graph"] and graphs.status()[0]["error"] is None
