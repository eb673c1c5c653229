"""PyTorch SampleAttention reference: stages 1 and 3 against dense fp32 math, the composed API,
and backend dispatch."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch

from sacli.kernels import (
    AttentionStats,
    KernelBackendError,
    Selection,
    choose_backend,
    column_scores,
    dense_attention,
    sample_attention,
    sample_rows,
    selection_mask,
    sparse_attention,
)
from sacli.kernels import reference

from test_selection import random_segmented_selection, random_selection


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fill fresh float buffers with NaN, so an output element the kernel forgets shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poisoned(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poisoned(empty_like(*a, **kw)))


def rand_qkv(B: int, Hq: int, Hkv: int, S: int, D: int, dtype: torch.dtype, seed: int, spread: float = 1.0):
    """Random q, k, v; `spread` > 1 sharpens the attention distributions."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, S, D, generator=gen) * spread).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    return q, k, v


def masked_attention(q, k, v, mask: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32):
    """Dense softmax attention restricted to `mask` (B, Hq, S, S), computed in `dtype`."""
    B, Hq, S, _ = q.shape
    G = Hq // k.shape[1]
    out = torch.empty(q.shape, dtype=dtype)
    for b in range(B):
        for h in range(Hq):
            logits = (q[b, h].to(dtype) @ k[b, h // G].to(dtype).T) * scale
            p = torch.softmax(logits.masked_fill(~mask[b, h], float("-inf")), dim=-1)
            out[b, h] = p @ v[b, h // G].to(dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Stage 3: sparse_attention


def _sparse_cases():
    """(S, B, Hkv, D, G, dtype): every combination at S=97 and 1025; edge lengths; at 4097 (one
    batch and one KV head, to stay fast) a subset that still covers each head_dim, GQA ratio
    and dtype."""
    cases = [
        (S, B, Hkv, D, G, dtype)
        for S, B, Hkv in ((97, 2, 2), (1025, 1, 2))
        for D in (64, 128)
        for G in (1, 3, 4)
        for dtype in (torch.float32, torch.bfloat16)
    ]
    cases += [
        (1, 1, 2, 64, 3, torch.float32),
        (256, 1, 1, 64, 4, torch.float32),  # a whole number of row blocks
        (4097, 1, 1, 64, 1, torch.float32),
        (4097, 1, 1, 128, 4, torch.float32),
        (4097, 1, 1, 64, 3, torch.bfloat16),
        (4097, 1, 1, 128, 1, torch.bfloat16),
    ]
    return cases


@pytest.mark.parametrize("S,B,Hkv,D,G,dtype", _sparse_cases())
def test_sparse_attention_matches_masked_dense(poison, S, B, Hkv, D, G, dtype) -> None:
    Hq = Hkv * G
    seed = S * 7 + D + G
    q, k, v = rand_qkv(B, Hq, Hkv, S, D, dtype, seed, spread=2.0)
    sel = random_selection(B, Hq, S, torch.Generator().manual_seed(seed))
    scale = 1.0 / math.sqrt(D)
    out = sparse_attention(q, k, v, sel, scale, backend="torch")
    assert out.dtype == dtype and out.shape == q.shape
    assert not out.isnan().any(), "every output element must be written"

    mask = selection_mask(sel)
    ref = masked_attention(q, k, v, mask, scale)
    err = (out.float() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 2e-5, err
    else:
        # PyTorch's own bf16 computation of the same attention sets the bar.
        torch_err = (masked_attention(q, k, v, mask, scale, torch.bfloat16).float() - ref).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, (err, torch_err)


@pytest.mark.parametrize("S,segment,G,dtype", [(97, 16, 3, torch.float32), (300, 128, 1, torch.float32),
                                               (1025, 256, 4, torch.bfloat16), (50, 64, 2, torch.float32)])
def test_segmented_sparse_attention_matches_masked_dense(poison, S, segment, G, dtype) -> None:
    """Every segment of query rows attends to its own columns (plus the head's band)."""
    B, Hkv, D = 2, 1, 64
    Hq = Hkv * G
    q, k, v = rand_qkv(B, Hq, Hkv, S, D, dtype, S + segment, spread=2.0)
    sel = random_segmented_selection(B, Hq, S, segment, torch.Generator().manual_seed(S))
    out = sparse_attention(q, k, v, sel, 0.125, backend="torch")
    assert not out.isnan().any(), "every output element must be written"
    mask = selection_mask(sel)
    ref = masked_attention(q, k, v, mask, 0.125)
    err = (out.float() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 2e-5, err
    else:
        torch_err = (masked_attention(q, k, v, mask, 0.125, torch.bfloat16).float() - ref).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, (err, torch_err)


def test_sparse_attention_all_window_heads_equal_dense(poison) -> None:
    q, k, v = rand_qkv(2, 6, 2, 300, 64, torch.float32, 11)
    S = q.shape[2]
    sel = Selection(
        window=torch.full((2, 6), S, dtype=torch.int32),
        cols=torch.empty(2, 6, 0, dtype=torch.int32),
        ncols=torch.zeros(2, 6, dtype=torch.int32),
        seq_len=S,
    )
    out = sparse_attention(q, k, v, sel, 0.125, backend="torch")
    torch.testing.assert_close(out, dense_attention(q, k, v, 0.125), atol=1e-5, rtol=1e-5)


def test_sparse_attention_rejects_mismatched_selection() -> None:
    q, k, v = rand_qkv(1, 2, 1, 97, 64, torch.float32, 0)
    sel = random_selection(1, 2, 96, torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="seq_len"):
        sparse_attention(q, k, v, sel, 0.125, backend="torch")


# ---------------------------------------------------------------------------------------------
# Stage 1: column_scores


def brute_force_scores(q, k, rows, window_tokens: int, scale: float):
    """Full causal softmax over every row, then restricted to the sampled ones (fp64)."""
    B, Hq, S, _ = q.shape
    G = Hq // k.shape[1]
    kk = k.double().repeat_interleave(G, dim=1)
    p = torch.softmax(
        (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(
            ~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf")
        ),
        dim=-1,
    )[:, :, rows]  # (B, Hq, R, S)
    j = torch.arange(S)[None, :]
    r = rows[:, None]
    before = j <= r - window_tokens
    band = (j <= r) & ~before
    return (p * before).mean(2), (p * band).sum(-1)


@pytest.mark.parametrize("S", [97, 1025])
@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("window_tokens", [1, 20, 2000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_scores_match_brute_force(poison, monkeypatch, S, G, window_tokens, dtype) -> None:
    # A small chunk forces several row chunks per head, as on long sequences.
    monkeypatch.setattr(reference, "_STAGE1_CHUNK_ELEMS", 40 * G * S)
    B, Hkv, D = 2, 2, 64
    q, k, v = rand_qkv(B, Hkv * G, Hkv, S, D, dtype, S + G + window_tokens, spread=2.0)
    rows = sample_rows(S, 0.1, block=16)
    scores, window_mass = column_scores(q, k, rows, window_tokens, 0.125, backend="torch")
    assert scores.dtype == torch.float32 and scores.shape == (B, Hkv * G, S)
    assert window_mass.dtype == torch.float32 and window_mass.shape == (B, Hkv * G, rows.numel())
    ref_scores, ref_mass = brute_force_scores(q, k, rows, window_tokens, 0.125)
    torch.testing.assert_close(scores.double(), ref_scores, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(window_mass.double(), ref_mass, atol=1e-6, rtol=1e-5)
    # The two parts split each sampled row's probability mass.
    total = window_mass.double().mean(-1) + scores.double().sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# The composed API


@pytest.mark.parametrize("S", [97, 1025])
@pytest.mark.parametrize("G", [1, 3])
def test_full_window_and_alpha_one_equal_dense(S: int, G: int) -> None:
    q, k, v = rand_qkv(2, 2 * G, 2, S, 64, torch.float32, S + G)
    out, stats = sample_attention(q, k, v, alpha=1.0, window=1.0, sample_ratio=0.1, backend="torch")
    assert stats.routed == "sparse"
    assert torch.equal(stats.density, torch.ones(2, 2 * G))
    torch.testing.assert_close(out, dense_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_alpha_one_with_small_window_is_dense_up_to_rounding() -> None:
    q, k, v = rand_qkv(1, 3, 1, 1025, 64, torch.float32, 5)
    out, stats = sample_attention(q, k, v, alpha=1.0, window=0.02, sample_ratio=0.1, backend="torch")
    assert stats.mean_density > 0.999
    torch.testing.assert_close(out, dense_attention(q, k, v), atol=1e-4, rtol=1e-4)


def test_short_sequences_route_to_dense() -> None:
    q, k, v = rand_qkv(1, 4, 2, 97, 64, torch.float32, 1)
    out, stats = sample_attention(q, k, v, alpha=0.9, window=0.05, sample_ratio=0.1, dense_below=98)
    assert stats.routed == "dense_short"
    assert stats.selection is None
    assert torch.equal(stats.density, torch.ones(1, 4))
    assert stats.mean_density == 1.0
    assert torch.equal(out, dense_attention(q, k, v))


def structured_qkv(B: int, Hq: int, Hkv: int, S: int, D: int, seed: int):
    """Random q, k, v plus a direction shared by all queries and 2% of the keys, so those key
    columns draw attention from every row, the structure column selection relies on."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = rand_qkv(B, Hq, Hkv, S, D, torch.float32, seed)
    u = torch.randn(D, generator=gen)
    u = u / u.norm() * 4 * D**0.25
    hot = torch.randperm(S, generator=gen)[: S // 50]
    k[:, :, hot] += u
    return q + u, k, v


def test_sparse_route_density_and_fidelity() -> None:
    S, G = 1025, 3
    q, k, v = structured_qkv(1, 2 * G, 2, S, 64, 9)
    dense = dense_attention(q, k, v)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    probs = torch.softmax(
        (q @ k.repeat_interleave(G, 1).transpose(-1, -2) / 8).masked_fill(~causal, float("-inf")), dim=-1
    )
    rows = sample_rows(S, 0.1)
    errors = {}
    for alpha in (0.5, 0.9, 0.99):
        out, stats = sample_attention(q, k, v, alpha=alpha, window=0.05, sample_ratio=0.1, dense_below=512)
        assert stats.routed == "sparse"
        assert isinstance(stats, AttentionStats) and stats.selection is not None
        assert stats.density.shape == (1, 2 * G) and stats.density.dtype == torch.float32
        assert bool(((stats.density > 0) & (stats.density <= 1)).all())
        assert torch.equal(stats.density, stats.selection.density().float())
        assert stats.mean_density < 0.5, "structured attention should not need most entries"
        kept = (probs * selection_mask(stats.selection)).sum(-1)  # (1, Hq, S) attention mass kept
        # By construction the sampled rows keep at least alpha of their mass on average.
        assert bool((kept[..., rows].mean(-1) >= alpha - 1e-5).all()), kept[..., rows].mean(-1)
        if alpha == 0.99:
            assert kept.mean() > 0.95, "the selection generalizes to the rows not sampled"
        errors[alpha] = (out - dense).abs().mean().item()
    assert errors[0.99] < errors[0.9] < errors[0.5], errors


def test_sample_attention_bf16_output_dtype() -> None:
    q, k, v = rand_qkv(1, 3, 1, 300, 128, torch.bfloat16, 4)
    out, stats = sample_attention(q, k, v, alpha=0.95, window=0.1, sample_ratio=0.2)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert not out.isnan().any()


def test_sample_attention_rejects_bad_input() -> None:
    q, k, v = rand_qkv(1, 4, 3, 64, 64, torch.float32, 0)
    with pytest.raises(AssertionError, match="multiple"):
        sample_attention(q, k, v, alpha=0.9, window=0.1, sample_ratio=0.1)
    q, k, v = rand_qkv(1, 4, 2, 64, 64, torch.float32, 0)
    with pytest.raises(AssertionError, match="alpha"):
        sample_attention(q, k, v, alpha=1.5, window=0.1, sample_ratio=0.1)
    with pytest.raises(AssertionError, match=r"\(B, Hq, S, D\)"):
        sample_attention(q[0], k, v, alpha=0.9, window=0.1, sample_ratio=0.1)


# ---------------------------------------------------------------------------------------------
# Backend dispatch


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1)
    monkeypatch.delenv("SACLI_KERNEL_BACKEND", raising=False)
    assert choose_backend(None, x) == "torch", "CPU tensors use the reference"
    monkeypatch.setenv("SACLI_KERNEL_BACKEND", "triton")
    assert choose_backend(None, x) == "triton", "the environment is read at call time"
    assert choose_backend("torch", x) == "torch", "the argument wins over the environment"
    monkeypatch.setenv("SACLI_KERNEL_BACKEND", "auto")
    assert choose_backend(None, x) == "torch"
    with pytest.raises(KernelBackendError, match="cuda-graphs"):
        choose_backend("cuda-graphs", x)


def test_missing_triton_module_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail, whether or not the module exists.
    monkeypatch.setitem(sys.modules, "sacli.kernels.triton_sparse", None)
    monkeypatch.setitem(sys.modules, "sacli.kernels.triton_sampling", None)
    q, k, v = rand_qkv(1, 2, 1, 64, 64, torch.float32, 0)
    sel = random_selection(1, 2, 64, torch.Generator().manual_seed(0))
    with pytest.raises(KernelBackendError, match="triton_sparse"):
        sparse_attention(q, k, v, sel, 0.125, backend="triton")
    with pytest.raises(KernelBackendError, match="triton_sampling"):
        column_scores(q, k, sample_rows(64, 0.5), 8, 0.125, backend="triton")


def test_sample_attention_adaptive_rule_matches_sparse_reference_on_its_selection() -> None:
    """rule="adaptive" routes through rules.select_adaptive and then the same exact sparse stage."""
    from sacli.kernels import sample_attention
    from sacli.kernels.reference import sparse_attention as sparse_ref
    from sacli.kernels.rules import select_adaptive

    torch.manual_seed(7)
    q = torch.randn(1, 6, 300, 64)
    k = torch.randn(1, 2, 300, 64)
    v = torch.randn(1, 2, 300, 64)
    out, stats = sample_attention(
        q, k, v, alpha=0.9, window=0.1, sample_ratio=0.2, scale=0.125, rule="adaptive", backend="torch"
    )
    sel = select_adaptive(q, k, v, alpha=0.9, window=0.1, sample_ratio=0.2, scale=0.125)
    assert stats.routed == "sparse"
    assert torch.equal(stats.selection.window, sel.window) and torch.equal(stats.selection.cols, sel.cols)
    torch.testing.assert_close(out, sparse_ref(q, k, v, sel, 0.125), rtol=1e-5, atol=1e-5)
    assert 0.0 < stats.mean_density <= 1.0


@pytest.mark.parametrize("sampled_levels", [None, 1])
def test_sample_attention_segments_rule_matches_sparse_reference_on_its_selection(sampled_levels: int | None) -> None:
    """rule="segments" routes through rules.select_segments, with the given tuning, and then the
    same exact sparse stage."""
    from sacli.kernels import sample_attention
    from sacli.kernels.reference import sparse_attention as sparse_ref
    from sacli.kernels.rules import DEFAULT_SEGMENTS, select_segments

    torch.manual_seed(8)
    q = torch.randn(1, 6, 300, 64)
    k = torch.randn(1, 2, 300, 64)
    v = torch.randn(1, 2, 300, 64)
    cfg = dataclasses.replace(DEFAULT_SEGMENTS, sampled_levels=sampled_levels)
    out, stats = sample_attention(
        q, k, v, alpha=0.9, window=0.1, sample_ratio=0.1, scale=0.125, rule="segments", segments=cfg, backend="torch"
    )
    sel = select_segments(q, k, v, alpha=0.9, window=0.1, sample_ratio=0.1, scale=0.125, config=cfg)
    assert stats.routed == "sparse" and stats.selection.segment == sel.segment == 128
    assert torch.equal(stats.selection.window, sel.window) and torch.equal(stats.selection.cols, sel.cols)
    torch.testing.assert_close(out, sparse_ref(q, k, v, sel, 0.125), rtol=1e-5, atol=1e-5)
    assert 0.0 < stats.mean_density <= 1.0


@pytest.mark.parametrize("S,chunk,ratio", [(700, 256, 0.05), (512, 128, 0.02), (1000, 384, 0.5), (130, 128, 1.0)])
def test_chunk_sample_rows_cover_every_chunk(S: int, chunk: int, ratio: float) -> None:
    """Per chunk: ceil(ratio x its rows) rows inside it, sorted and unique, on an even stride
    that ends at its last row (the short last chunk included); the last chunk also holds the
    sequence's last 64 rows."""
    import math

    from sacli.kernels.selection import chunk_sample_rows

    parts = chunk_sample_rows(S, chunk, ratio)
    assert len(parts) == -(-S // chunk)
    for c, r in enumerate(parts):
        s0, s1 = c * chunk, min(S, (c + 1) * chunk)
        n = math.ceil(round(ratio * (s1 - s0), 6))
        assert r.dtype == torch.int64 and int(r.min()) >= s0 and int(r[-1]) == s1 - 1
        assert bool((r[1:] > r[:-1]).all())
        stride = r if s1 < S else r[r < S - min(64, s1 - s0)]
        gaps = (stride[1:] - stride[:-1]).tolist()
        assert not gaps or max(gaps) - min(gaps) <= 1
        if s1 < S:
            assert r.numel() == n
        else:
            tail = min(64, s1 - s0)
            assert torch.equal(r[-tail:], torch.arange(S - tail, S))
            # the stride rows of the last chunk outside its tail are kept, the rest fall in it
            full = (s0 + (s1 - s0) - 1 - (torch.arange(n) * (s1 - s0)) // n).flip(0)
            assert torch.equal(stride, full[full < S - tail])


def test_sample_attention_chunked_selection_is_each_chunks_own() -> None:
    """chunk > 0: every chunk of query rows gets the columns that select_columns picks from that
    chunk's own sampled rows alone; the output is exact attention over that segmented
    selection, and the density is the selection's."""
    from sacli.kernels import column_scores, sample_attention, select_columns
    from sacli.kernels.reference import sparse_attention as sparse_ref
    from sacli.kernels.selection import chunk_sample_rows

    torch.manual_seed(9)
    S, chunk, w = 700, 256, 35
    q = 0.1 * torch.randn(1, 4, S, 64)
    k = 0.1 * torch.randn(1, 2, S, 64)
    v = torch.randn(1, 2, S, 64)
    # every row reads key 0 (a sink); the second chunk's rows read key 40 even more
    k[0, 0, 0, 0] += 1.0
    k[0, 0, 40, 1] += 1.0
    q[0, :, :, 0] += 8.0
    q[0, :, 256:512, 1] += 9.0
    alpha, scale = 0.5, 1.0
    out, stats = sample_attention(q, k, v, alpha=alpha, window=0.05, sample_ratio=0.05, scale=scale,
                                  chunk=chunk, backend="torch")
    sel = stats.selection
    assert stats.routed == "sparse" and sel.segment == chunk and sel.cols.shape[:3] == (1, 4, 3)
    assert bool((sel.window == w).all())
    for c, rows in enumerate(chunk_sample_rows(S, chunk, 0.05)):
        scores, mass = column_scores(q, k, rows, w, scale)
        own = select_columns(scores, mass, alpha, w, S)
        for h in range(4):
            n = int(own.ncols[0, h])
            assert int(sel.ncols[0, h, c]) == n
            assert torch.equal(sel.cols[0, h, c, :n], own.cols[0, h, :n])
    lists = [sel.cols[0, 0, c, : int(sel.ncols[0, 0, c])].tolist() for c in range(3)]
    assert lists == [[0], [40], [0]], lists
    torch.testing.assert_close(out, sparse_ref(q, k, v, sel, scale), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.density, sel.density().float())


def test_sample_attention_chunk_covering_the_sequence_is_one_list() -> None:
    """A chunk at least as long as the sequence leaves the one-list-per-head path unchanged."""
    from sacli.kernels import sample_attention

    torch.manual_seed(10)
    q, k, v = torch.randn(1, 2, 300, 64), torch.randn(1, 1, 300, 64), torch.randn(1, 1, 300, 64)
    knobs = {"alpha": 0.9, "window": 0.05, "sample_ratio": 0.05, "backend": "torch"}
    out0, st0 = sample_attention(q, k, v, **knobs)
    out1, st1 = sample_attention(q, k, v, chunk=384, **knobs)
    assert st1.selection.segment == 0
    assert torch.equal(out0, out1) and torch.equal(st0.selection.cols, st1.selection.cols)
    with pytest.raises(AssertionError, match="chunk"):
        sample_attention(q, k, v, chunk=100, **knobs)
