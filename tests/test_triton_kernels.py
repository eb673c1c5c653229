"""Triton SampleAttention kernels against float64 / PyTorch references.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below
before the kernel modules are imported), at tiny shapes so the file stays fast. Error bounds
for bf16/fp16 follow the flash-attention tests: the kernel's error against a float64
reference may be at most twice PyTorch's own error when it computes the same attention in the
input dtype, plus a small absolute slack.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# The interpreter flag is read when triton.language is first imported, so it must be set
# before anything imports triton (a conftest.py doing this would cover every test file).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from sacli.kernels import reference  # noqa: E402
from sacli.kernels.selection import Selection, sample_rows, select_columns, selection_mask  # noqa: E402
from sacli.kernels.triton_sampling import column_scores_triton  # noqa: E402
from sacli.kernels.triton_selection import select_columns_triton  # noqa: E402
from sacli.kernels.triton_common import TMA_MIN_ROWS, interpreting, tma_compatible, use_descriptors  # noqa: E402
from sacli.kernels.triton_sparse import sparse_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _qkv(B: int, Hq: int, Hkv: int, S: int, D: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape_q, shape_kv = (B, Hq, S, D), (B, Hkv, S, D)
    # A spread of logit scales so some heads are peaked and some flat.
    q = torch.randn(shape_q, generator=g) * (1.0 + 2.0 * torch.rand(B, Hq, 1, 1, generator=g))
    k = torch.randn(shape_kv, generator=g)
    v = torch.randn(shape_kv, generator=g)
    return (t.to(dtype=dtype, device=DEVICE) for t in (q, k, v))


def _random_selection(B: int, H: int, S: int, seed: int, windows: list[int] | None = None) -> Selection:
    """Random windows (1 .. S, some >= S) and random ascending column sets, padded with S."""
    g = torch.Generator().manual_seed(seed)
    C = max(1, S // 3)
    win = torch.randint(1, S + 2, (B, H), generator=g)
    if windows is not None:
        win = torch.tensor(windows).reshape(B, H)
    cols = torch.full((B, H, C), S, dtype=torch.int32)
    ncols = torch.zeros(B, H, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            n = int(torch.randint(0, C + 1, (1,), generator=g))
            cols[b, h, :n] = torch.randperm(S, generator=g)[:n].sort().values.to(torch.int32)
            ncols[b, h] = n
    return Selection(window=win.to(torch.int32).to(DEVICE), cols=cols.to(DEVICE), ncols=ncols.to(DEVICE), seq_len=S)


def _masked_attention(q, k, v, mask, scale, dtype):
    """Dense attention with a (B, Hq, S, S) mask, computed in `dtype` throughout."""
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, dim=1).to(dtype)
    v = v.repeat_interleave(G, dim=1).to(dtype)
    logits = torch.matmul(q.to(dtype), k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(logits, dim=-1), v)


def _assert_within_torch_error(out, q, k, v, mask, scale):
    ref = _masked_attention(q, k, v, mask, scale, torch.float64)
    torch_err = (_masked_attention(q, k, v, mask, scale, q.dtype).double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert not torch.isnan(out).any(), "output has NaN (unwritten or poisoned entries)"
    assert err <= 2 * torch_err + 1e-5, f"kernel error {err:.3g} > 2 x PyTorch {q.dtype} error {torch_err:.3g}"


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


# (B, Hq, Hkv, S, D, dtype): awkward lengths, GQA ratios 1/3/4, both head dims.
SPARSE_CASES = [
    (1, 2, 2, 97, 64, torch.bfloat16),
    (2, 3, 1, 130, 128, torch.float16),
    (1, 4, 1, 61, 64, torch.bfloat16),
    (1, 1, 1, 1025, 64, torch.bfloat16),
    (1, 2, 1, 77, 128, torch.float32),
]


@pytest.mark.parametrize("B,Hq,Hkv,S,D,dtype", SPARSE_CASES)
def test_sparse_matches_reference(B, Hq, Hkv, S, D, dtype):
    q, k, v = _qkv(B, Hq, Hkv, S, D, dtype, seed=S + D)
    sel = _random_selection(B, Hq, S, seed=S)
    scale = D**-0.5
    out = sparse_attention_triton(q, k, v, sel, scale, out=_poisoned((B, Hq, S, D), dtype))
    _assert_within_torch_error(out, q, k, v, selection_mask(sel), scale)
    # The PyTorch reference backend computes the same function.
    ref = reference.sparse_attention(q, k, v, sel, scale)
    _assert_within_torch_error(ref, q, k, v, selection_mask(sel), scale)


def _random_segmented_selection(B: int, H: int, S: int, segment: int, seed: int) -> Selection:
    """Random windows and, per segment of `segment` query rows, random ascending columns."""
    base = _random_selection(B, H, S, seed)
    g = torch.Generator().manual_seed(seed + 1)
    N, C = -(-S // segment), max(1, S // 3)
    cols = torch.full((B, H, N, C), S, dtype=torch.int32)
    ncols = torch.randint(0, C + 1, (B, H, N), generator=g, dtype=torch.int32)
    for idx in range(B * H * N):
        n = int(ncols.view(-1)[idx])
        cols.view(-1, C)[idx, :n] = torch.randperm(S, generator=g)[:n].sort().values.to(torch.int32)
    return Selection(window=base.window, cols=cols.to(DEVICE), ncols=ncols.to(DEVICE), seq_len=S, segment=segment)


@pytest.mark.parametrize("case,segment", [(SPARSE_CASES[0], 32), (SPARSE_CASES[1], 64), (SPARSE_CASES[3], 128)])
@pytest.mark.parametrize("merged", [False, True], ids=["edges", "merged"])
def test_sparse_segmented_selection_matches_reference(case, segment, merged):
    """A segmented selection: every query block reads its own segment's column list (and never
    the packed buffers); the same function as the reference's masked attention."""
    B, Hq, Hkv, S, D, dtype = case
    if not interpreting():
        segment *= 4  # a multiple of the GPU's 128-row programs
    q, k, v = _qkv(B, Hq, Hkv, S, D, dtype, seed=S + D + 5)
    sel = _random_segmented_selection(B, Hq, S, segment, seed=S + 3)
    scale = D**-0.5
    out = sparse_attention_triton(q, k, v, sel, scale, out=_poisoned((B, Hq, S, D), dtype),
                                  config={"MERGED_EDGES": merged})
    _assert_within_torch_error(out, q, k, v, selection_mask(sel), scale)


@pytest.mark.parametrize("case", [SPARSE_CASES[0], SPARSE_CASES[1], SPARSE_CASES[3]])
def test_sparse_merged_edges_match_reference(case):
    """Both band edges' masked tiles in one loop after the unmasked tiles (the structure for
    short bands): the same function as one loop per edge."""
    B, Hq, Hkv, S, D, dtype = case
    q, k, v = _qkv(B, Hq, Hkv, S, D, dtype, seed=S + D + 2)
    sel = _random_selection(B, Hq, S, seed=S + 1)
    scale = D**-0.5
    out = sparse_attention_triton(q, k, v, sel, scale, out=_poisoned((B, Hq, S, D), dtype),
                                  config={"MERGED_EDGES": True})
    _assert_within_torch_error(out, q, k, v, selection_mask(sel), scale)


def test_merged_edges_only_for_short_bands():
    """The host picks the band's loop structure from the window it knows: merged edges below
    EDGE_MERGE_MAX_TILES tiles of 128 keys; separate edges for long or unknown windows."""
    import sacli.kernels.triton_sparse as tsp

    S = 131072
    limit = tsp.EDGE_MERGE_MAX_TILES * 128
    assert tsp.merged_edges(987, S) and tsp.merged_edges(limit - 128, S)
    assert not tsp.merged_edges(limit, S) and not tsp.merged_edges(3319, S)
    assert not tsp.merged_edges(None, S) and not tsp.merged_edges(0, S)
    assert tsp.merged_edges(10**6, 1000)  # a window past S spans S keys


def test_sparse_window_one_without_columns_copies_v():
    """Each row keeps only its diagonal entry: the output is exactly that row of V."""
    B, Hq, Hkv, S, D = 1, 2, 1, 70, 64
    q, k, v = _qkv(B, Hq, Hkv, S, D, torch.float32, seed=1)
    sel = Selection(
        window=torch.ones(B, Hq, dtype=torch.int32, device=DEVICE),
        cols=torch.empty(B, Hq, 0, dtype=torch.int32, device=DEVICE),
        ncols=torch.zeros(B, Hq, dtype=torch.int32, device=DEVICE),
        seq_len=S,
    )
    out = sparse_attention_triton(q, k, v, sel, D**-0.5, out=_poisoned((B, Hq, S, D), torch.float32))
    torch.testing.assert_close(out, v.expand(B, Hq, S, D), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["window_covers_all", "all_columns"])
def test_sparse_dense_selection_equals_causal_attention(layout):
    B, Hq, Hkv, S, D = 1, 3, 1, 90, 128
    q, k, v = _qkv(B, Hq, Hkv, S, D, torch.bfloat16, seed=2)
    if layout == "window_covers_all":
        sel = Selection(
            window=torch.full((B, Hq), S, dtype=torch.int32, device=DEVICE),
            cols=torch.full((B, Hq, 3), S, dtype=torch.int32, device=DEVICE),
            ncols=torch.zeros(B, Hq, dtype=torch.int32, device=DEVICE),
            seq_len=S,
        )
    else:
        sel = Selection(
            window=torch.full((B, Hq), 5, dtype=torch.int32, device=DEVICE),
            cols=torch.arange(S, dtype=torch.int32, device=DEVICE).expand(B, Hq, S).contiguous(),
            ncols=torch.full((B, Hq), S, dtype=torch.int32, device=DEVICE),
            seq_len=S,
        )
    causal = torch.ones(S, S, dtype=torch.bool, device=DEVICE).tril().expand(B, Hq, S, S)
    assert torch.equal(selection_mask(sel), causal)
    out = sparse_attention_triton(q, k, v, sel, D**-0.5)
    _assert_within_torch_error(out, q, k, v, causal, D**-0.5)


def test_sparse_accepts_strided_inputs():
    """q/k/v as Hugging Face hands them over: (B, S, H, D) storage viewed as (B, H, S, D)."""
    B, Hq, Hkv, S, D = 2, 4, 2, 50, 64
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, S, Hq, D, generator=g).to(torch.bfloat16).to(DEVICE).transpose(1, 2)
    k = torch.randn(B, S, Hkv, D, generator=g).to(torch.bfloat16).to(DEVICE).transpose(1, 2)
    v = torch.randn(B, S, Hkv, D, generator=g).to(torch.bfloat16).to(DEVICE).transpose(1, 2)
    sel = _random_selection(B, Hq, S, seed=4)
    out = sparse_attention_triton(q, k, v, sel, D**-0.5)
    _assert_within_torch_error(out, q, k, v, selection_mask(sel), D**-0.5)


def _descriptors_built(monkeypatch, module) -> list:
    """Record the tensor descriptors a launcher module makes (so a TMA test cannot pass on a
    silent fallback to ordinary loads)."""
    made: list = []
    original = module.TensorDescriptor.from_tensor

    def spy(tensor, block_shape, *args, **kwargs):
        made.append(list(block_shape))
        return original(tensor, block_shape, *args, **kwargs)

    monkeypatch.setattr(module.TensorDescriptor, "from_tensor", staticmethod(spy))
    return made


def _tma_applies(S: int, *tensors: torch.Tensor) -> bool:
    """Whether the launchers use descriptors here (on a GPU also: 16-bit dtype, S >= one tile)."""
    return use_descriptors(True, S, *tensors)


@pytest.mark.parametrize("case", [SPARSE_CASES[0], SPARSE_CASES[1], SPARSE_CASES[3], SPARSE_CASES[4], "hf_layout"])
def test_sparse_tma_path_equals_pointer_path(case, monkeypatch):
    """Q, the band and O through tensor descriptors: the same output as ordinary loads, bit for
    bit (same tiles, same order), including rows past S that the copy engine zero-fills."""
    import sacli.kernels.triton_sparse as tsp

    if case == "hf_layout":  # (B, S, H, D) storage viewed as (B, H, S, D)
        B, Hq, Hkv, S, D, dtype = 2, 4, 2, 50, 64, torch.bfloat16
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(B, Hq, Hkv, S, D, dtype, seed=9))
    else:
        B, Hq, Hkv, S, D, dtype = case
        q, k, v = _qkv(B, Hq, Hkv, S, D, dtype, seed=S + D + 1)
    if not _tma_applies(S, q, k, v):
        pytest.skip("the launcher uses ordinary loads for this case on this device")
    sel = _random_selection(B, Hq, S, seed=S + 1)
    packs = interpreting() or sel.cols.shape[-1] >= TMA_MIN_ROWS
    made = _descriptors_built(monkeypatch, tsp)
    a = sparse_attention_triton(q, k, v, sel, D**-0.5, tma=True, out=_poisoned((B, Hq, S, D), dtype))
    assert len(made) == (6 if packs else 4), made  # Q, K, V, O (+ the packed columns' K and V)
    b = sparse_attention_triton(q, k, v, sel, D**-0.5, tma=True, packed=False)
    assert len(made) == (10 if packs else 8), made
    c = sparse_attention_triton(q, k, v, sel, D**-0.5, tma=False)
    assert len(made) == (10 if packs else 8), "tma=False must not build descriptors"
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    torch.testing.assert_close(b, c, rtol=0, atol=0)
    _assert_within_torch_error(a, q, k, v, selection_mask(sel), D**-0.5)


@pytest.mark.parametrize("D", [64, 128])
def test_sparse_packed_columns(D, monkeypatch):
    """Many whole column tiles before small bands (GQA, batch 2, columns padded past ncols):
    the packed columns read through descriptors give the gathered path's output bit for bit."""
    import sacli.kernels.triton_sparse as tsp

    B, Hq, Hkv, S = 2, 4, 2, 300
    q, k, v = _qkv(B, Hq, Hkv, S, D, torch.bfloat16, seed=D)
    if not _tma_applies(S, q, k, v):
        pytest.skip("the launcher uses ordinary loads for this case on this device")
    g = torch.Generator().manual_seed(D)
    C = 160
    cols = torch.full((B, Hq, C), S, dtype=torch.int32)
    ncols = torch.tensor([[150, 0, 97, 33], [160, 64, 1, 120]], dtype=torch.int32)
    for b in range(B):
        for h in range(Hq):
            n = int(ncols[b, h])
            cols[b, h, :n] = torch.randperm(S - 8, generator=g)[:n].sort().values.to(torch.int32)
    win = torch.tensor([[4, 9, 1, 40], [2, 300, 7, 5]], dtype=torch.int32)
    sel = Selection(window=win.to(DEVICE), cols=cols.to(DEVICE), ncols=ncols.to(DEVICE), seq_len=S)
    made = _descriptors_built(monkeypatch, tsp)
    a = sparse_attention_triton(q, k, v, sel, D**-0.5, tma=True, packed=True, out=_poisoned((B, Hq, S, D), torch.bfloat16))
    assert len(made) == 6, made
    b = sparse_attention_triton(q, k, v, sel, D**-0.5, tma=True, packed=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    _assert_within_torch_error(a, q, k, v, selection_mask(sel), D**-0.5)


def test_tma_needs_16_byte_strides(monkeypatch):
    """A row stride that is not a multiple of 16 bytes, or a base address off by a few bytes,
    falls back to ordinary loads: no descriptor is built, and the output is still right."""
    import sacli.kernels.triton_sparse as tsp

    base = torch.zeros(2, 3, 10, 64 + 8, dtype=torch.bfloat16, device=DEVICE)
    assert tma_compatible(base) == _tma_applies(128, base)
    assert not tma_compatible(base[..., 2:66])  # base address off by 4 bytes
    odd = torch.zeros(2, 3, 10, 67, dtype=torch.bfloat16, device=DEVICE)[..., :64]  # row stride 134 bytes
    assert not tma_compatible(odd)
    B, Hq, Hkv, S, D = 1, 2, 1, 150, 64
    q, k, v = _qkv(B, Hq, Hkv, S, D + 3, torch.bfloat16, seed=8)
    q, k, v = (t[..., :D] for t in (q, k, v))  # row stride 134 bytes
    sel = _random_selection(B, Hq, S, seed=8)
    made = _descriptors_built(monkeypatch, tsp)
    out = sparse_attention_triton(q, k, v, sel, D**-0.5, tma=True)
    assert made == []
    _assert_within_torch_error(out, q, k, v, selection_mask(sel), D**-0.5)


def test_sparse_autotune_candidates_by_head_dim():
    """64-row programs are autotuning candidates for head_dim 64 only (measured slower with 128);
    every candidate's BLOCK_M is a multiple of the column counts' block."""
    import sacli.kernels.triton_sparse as tsp

    def rows(head_dim: int) -> list[int]:
        return sorted({c.kwargs["BLOCK_M"] for c in tsp._prune_configs(tsp._CONFIGS, {}, HEAD_DIM=head_dim)})

    assert rows(64) == [64, 128]
    assert rows(128) == [128]
    assert all(c.kwargs["BLOCK_M"] % tsp.COUNT_BLOCK == 0 for c in tsp._CONFIGS)


def test_sparse_rejects_bad_input():
    q, k, v = _qkv(1, 2, 1, 16, 64, torch.bfloat16, seed=5)
    sel = _random_selection(1, 2, 16, seed=5)
    with pytest.raises(AssertionError, match="head_dim"):
        sparse_attention_triton(q[..., :48], k[..., :48], v[..., :48], sel, 0.1)
    with pytest.raises(AssertionError, match="seq_len"):
        sparse_attention_triton(q[:, :, :8], k[:, :, :8], v[:, :, :8], sel, 0.1)


def _column_scores_f64(q, k, rows, w, scale):
    """float64 scores (B, Hq, S) and band masses (B, Hq, R) straight from the definition."""
    G = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(G, dim=1)
    S = q.shape[2]
    logits = torch.matmul(q.double()[:, :, rows], kk.transpose(-1, -2)) * scale  # (B, Hq, R, S)
    j = torch.arange(S, device=q.device)
    r = rows.to(q.device)[:, None]
    p = torch.softmax(logits.masked_fill(j > r, float("-inf")), dim=-1)
    before = j <= r - w
    return (p * before).sum(2) / rows.numel(), (p * ~before).sum(-1)


# (B, Hq, Hkv, S, D, dtype, window_tokens, sample_ratio, row_block)
SAMPLING_CASES = [
    (1, 2, 2, 97, 64, torch.bfloat16, 7, 0.3, 16),
    (2, 3, 1, 150, 128, torch.float16, 20, 0.25, 16),
    (1, 4, 1, 120, 64, torch.bfloat16, 1, 0.5, 32),
    (1, 2, 1, 64, 64, torch.float32, 80, 1.0, 64),  # window beyond S: no column scores
    (1, 1, 1, 1025, 64, torch.bfloat16, 52, 0.05, 16),
]


@pytest.mark.parametrize("B,Hq,Hkv,S,D,dtype,w,ratio,block", SAMPLING_CASES)
@pytest.mark.parametrize("pipe", [0, 1], ids=["plain", "pipelined"])
@pytest.mark.parametrize("split", [0, 32], ids=["whole", "split"])
@pytest.mark.parametrize("rows_m", [0, 1], ids=["cols_m", "rows_m"])
def test_column_scores_match_reference(B, Hq, Hkv, S, D, dtype, w, ratio, block, pipe, split, rows_m):
    if (pipe or split or rows_m) and S > 500:
        pytest.skip("the pipelined, split and rows-first loops are covered by the shorter cases")
    if rows_m and split:
        pytest.skip("pass 2's orientation is independent of pass 1's key split")
    q, k, _ = _qkv(B, Hq, Hkv, S, D, dtype, seed=S + w)
    rows = sample_rows(S, ratio, block=block).to(DEVICE)
    scale = D**-0.5
    R = rows.numel()
    out = (_poisoned((B, Hq, S), torch.float32), _poisoned((B, Hq, R), torch.float32))
    scores, mass = column_scores_triton(q, k, rows, w, scale, out=out, config={"pipe1": pipe, "pipe2": pipe, "keys_per_split": split,
                                                                   "rows_m2": rows_m})
    ref_scores, ref_mass = reference.column_scores(q, k, rows, w, scale)
    exact_scores, exact_mass = _column_scores_f64(q, k, rows, w, scale)
    for got, ref, exact, name in ((scores, ref_scores, exact_scores, "scores"), (mass, ref_mass, exact_mass, "window_mass")):
        assert not torch.isnan(got).any(), f"{name} has unwritten entries"
        torch_err = (ref.double() - exact).abs().max().item()
        err = (got.double() - exact).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, f"{name}: kernel error {err:.3g} > 2 x PyTorch float32 error {torch_err:.3g}"
    # Mass conservation: band + residual = 1 per row, so mean(band) + sum(scores) = 1.
    total = mass.double().mean(-1) + scores.double().sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", [SAMPLING_CASES[0], SAMPLING_CASES[1], SAMPLING_CASES[3], SAMPLING_CASES[4], "hf_layout"])
@pytest.mark.parametrize("split", [0, 32], ids=["whole", "split"])
@pytest.mark.parametrize("pipe", [0, 1], ids=["plain", "pipelined"])
def test_column_scores_tma_keys_equal_pointer_keys(case, split, pipe, monkeypatch):
    """Pass 1's key tiles through a tensor descriptor: the same scores and masses as ordinary
    loads, bit for bit, including the zero-filled rows past S of the last tile."""
    import sacli.kernels.triton_sampling as ts

    if case == "hf_layout":  # (B, S, H, D) storage viewed as (B, H, S, D)
        B, Hq, Hkv, S, D, dtype, w, ratio, block = 2, 4, 2, 90, 64, torch.bfloat16, 9, 0.4, 16
        q, k, _ = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(B, Hq, Hkv, S, D, dtype, seed=3))
    else:
        B, Hq, Hkv, S, D, dtype, w, ratio, block = case
        q, k, _ = _qkv(B, Hq, Hkv, S, D, dtype, seed=S + w + 1)
    if not _tma_applies(S, k):
        pytest.skip("the launcher uses ordinary loads for this case on this device")
    rows = sample_rows(S, ratio, block=block).to(DEVICE)
    scale = D**-0.5
    made = _descriptors_built(monkeypatch, ts)
    cfg = {"keys_per_split": split, "pipe1": pipe}
    got = [column_scores_triton(q, k, rows, w, scale, config={**cfg, "tma1": t}) for t in (1, 0)]
    assert len(made) == 1, made  # K, for the descriptor run only
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_selection_from_kernel_scores_matches_reference_selection():
    """Stage 2 is shared PyTorch code: the kernel's scores lead to the reference's columns."""
    B, Hq, Hkv, S, D, w = 1, 2, 1, 200, 64, 10
    q, k, _ = _qkv(B, Hq, Hkv, S, D, torch.bfloat16, seed=9)
    rows = sample_rows(S, 0.2, block=16).to(DEVICE)
    scores, mass = column_scores_triton(q, k, rows, w, D**-0.5)
    ref_scores, ref_mass = reference.column_scores(q, k, rows, w, D**-0.5)
    mine = select_columns(scores, mass, 0.9, w, S)
    ref = select_columns(ref_scores, ref_mass, 0.9, w, S)
    assert int(ref.ncols.min()) > 0, "the case should select some columns"
    assert torch.equal(mine.ncols, ref.ncols) and torch.equal(mine.cols, ref.cols)


SELECT_CASES = [
    # B, H, S, w, alpha, R, ties
    (1, 3, 97, 10, 0.9, 8, False),
    (2, 2, 200, 1, 0.95, 5, True),  # many exact ties: scores on a coarse grid
    (1, 4, 131, 40, 0.5, 3, True),
    (1, 2, 64, 64, 0.95, 4, False),  # window covers everything: nothing to select
    (1, 3, 150, 7, 1.0, 6, False),  # alpha 1: every positive column
    (1, 2, 120, 12, 0.0, 6, False),  # alpha 0: the window suffices
]


@pytest.mark.parametrize("B,H,S,w,alpha,R,ties", SELECT_CASES)
@pytest.mark.parametrize("block_m", [32, 128])
def test_triton_selection_equals_reference(B, H, S, w, alpha, R, ties, block_m):
    """Stage 2 in one Triton program per head: the reference's columns, counts and density exactly."""
    from sacli.kernels.triton_sparse import column_counts

    g = torch.Generator().manual_seed(S + w)
    raw = torch.rand(B, H, S, generator=g) ** 4  # skewed, like attention
    raw[raw < 0.05] = 0.0  # some columns no sampled row attends to
    if ties:
        raw = (raw * 8).round() / 8
    mass = torch.rand(B, H, R, generator=g) * 0.6
    # scale so the window mass and the scores sum to about 1, as stage 1 produces
    scores = (raw / raw.sum(-1, keepdim=True).clamp(min=1e-9) * (1 - mass.mean(-1, keepdim=True))).float()
    scores, mass = scores.to(DEVICE), mass.to(DEVICE)
    ref = select_columns(scores, mass, alpha, w, S, trim=False)
    sel, counts, density = select_columns_triton(scores, mass, alpha, w, S, block_m)
    assert torch.equal(sel.ncols, ref.ncols), f"{sel.ncols.tolist()} != {ref.ncols.tolist()}"
    assert torch.equal(sel.cols, ref.cols) and torch.equal(sel.window, ref.window)
    assert torch.equal(counts, column_counts(ref, block_m))
    assert torch.equal(density, ref.density().to(torch.float32))
    if ties and alpha < 1:
        assert int(ref.ncols.min()) > 0, "the tie cases should select columns"


def test_sparse_kernel_same_on_untrimmed_selection():
    """Off the CPU, selections keep cols padded to S (no host sync); the kernel must not care."""
    B, Hq, Hkv, S, D, w = 1, 3, 1, 150, 64, 12
    q, k, v = _qkv(B, Hq, Hkv, S, D, torch.bfloat16, seed=21)
    rows = sample_rows(S, 0.2, block=16, device=DEVICE)
    scores, mass = reference.column_scores(q, k, rows, w, D**-0.5)
    trimmed = select_columns(scores, mass, 0.8, w, S, trim=True)
    full = select_columns(scores, mass, 0.8, w, S, trim=False)
    assert full.cols.shape[-1] == S and trimmed.cols.shape[-1] < S, "the case should trim"
    a = sparse_attention_triton(q, k, v, trimmed, D**-0.5)
    b = sparse_attention_triton(q, k, v, full, D**-0.5, out=_poisoned((B, Hq, S, D), torch.bfloat16))
    assert torch.equal(a, b), "padding changed the output"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sample_attention_alpha_one_is_dense(dtype):
    """Through the public API on the Triton backend: alpha = 1 keeps every column."""
    from sacli.kernels import sample_attention

    B, Hq, Hkv, S, D = 1, 2, 1, 100, 64
    q, k, v = _qkv(B, Hq, Hkv, S, D, dtype, seed=11)
    out, stats = sample_attention(q, k, v, alpha=1.0, window=0.1, sample_ratio=0.5, backend="triton")
    causal = torch.ones(S, S, dtype=torch.bool, device=DEVICE).tril().expand(B, Hq, S, S)
    assert stats.routed == "sparse"
    _assert_within_torch_error(out, q, k, v, causal, D**-0.5)


@pytest.mark.parametrize("density", [0.03, 0.1, 0.4])
def test_benchmark_selection_has_requested_density(density):
    """The fixed selections of `sacli bench attention --workload synthetic` keep what they claim."""
    from sacli.bench import synthetic_selection

    S = 600
    sel = synthetic_selection(1, 3, S, density=density, device=DEVICE, seed=1)
    mask = selection_mask(sel)
    kept = mask.sum(dim=(-1, -2)).double()
    assert torch.equal(kept, sel.kept_entries()), "kept_entries disagrees with the dense mask"
    measured = kept / (S * (S + 1) / 2)
    assert (measured - density).abs().max().item() < 0.01, f"density {measured.tolist()} != {density}"
    valid = torch.arange(sel.cols.shape[-1], device=DEVICE) < sel.ncols[..., None]
    assert bool(((sel.cols[..., 1:] > sel.cols[..., :-1]) | ~valid[..., 1:]).all()), "columns not ascending"
    assert bool((sel.cols[~valid] == S).all()), "padding must hold S"


@pytest.mark.parametrize("programs,S,splits", [(117, 16384, 5), (234, 32768, 3), (3296, 131072, 1), (10, 1500, 1)])
def test_pass1_key_split_fills_the_gpu(monkeypatch, programs, S, splits):
    """On CUDA, pass 1 splits its keys until ~4 programs per SM exist (132 SMs as on an H100),
    never below 1024 keys a split, in multiples of 128 keys."""
    from sacli.kernels import triton_sampling as ts

    monkeypatch.setattr(ts, "_sm_count", lambda index: 132)
    keys = ts._keys_per_split(0, programs, S, torch.device("cuda", 0), interp=False)
    n_split = -(-S // keys)
    assert keys % 128 == 0 and n_split * keys >= S
    assert n_split == splits, f"{n_split} splits"
    # an explicit request wins; off CUDA there is no split
    assert ts._keys_per_split(1000, programs, S, torch.device("cuda", 0), interp=False) == 1024
    assert ts._keys_per_split(0, programs, S, torch.device("cpu"), interp=False) >= S


def test_sample_attention_chunked_triton_equals_torch():
    """chunk > 0 on the Triton backend: the same segmented selection as the PyTorch path (each
    chunk's own stage 1 and stage 2), and its output within bf16 error of masked attention."""
    from sacli.kernels import sample_attention

    B, Hq, Hkv, S, D = 1, 4, 2, 300, 64
    q, k, v = _qkv(B, Hq, Hkv, S, D, torch.float32, seed=12)
    knobs = {"alpha": 0.9, "window": 0.05, "sample_ratio": 0.1, "chunk": 128, "dense_below": 0}
    out_t, st_t = sample_attention(q, k, v, backend="triton", **knobs)
    out_r, st_r = sample_attention(q.cpu(), k.cpu(), v.cpu(), backend="torch", **knobs)
    a, b = st_t.selection, st_r.selection
    assert a.segment == b.segment == 128 and torch.equal(a.ncols.cpu(), b.ncols)
    for c in range(a.segments):
        for h in range(Hq):
            n = int(b.ncols[0, h, c])
            assert torch.equal(a.cols[0, h, c, :n].cpu(), b.cols[0, h, c, :n])
    torch.testing.assert_close(st_t.density.cpu(), st_r.density)
    torch.testing.assert_close(out_t.cpu(), out_r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("S,segment,block_m", [(300, 64, 16), (257, 128, 32), (100, 32, 32)])
def test_segmented_column_counts_against_brute_force(S, segment, block_m):
    """Per query block [m0, m1): its own segment's columns <= m0 - w and <= m1 - 1 - w, with
    several blocks per segment and a short last segment."""
    from sacli.kernels.triton_sparse import column_counts

    sel = _random_segmented_selection(2, 3, S, segment, seed=S + segment)
    counts = column_counts(sel, block_m).cpu()
    n_mblk = -(-S // block_m)
    assert tuple(counts.shape) == (6, n_mblk, 2)
    cols, ncols, win = sel.cols.cpu(), sel.ncols.cpu(), sel.window.cpu()
    for b in range(2):
        for h in range(3):
            w = int(win[b, h])
            for m in range(n_mblk):
                m0, m1 = m * block_m, min(S, (m + 1) * block_m)
                n = m0 // segment
                listed = cols[b, h, n, : int(ncols[b, h, n])]
                expect = [int((listed <= m0 - w).sum()), int((listed <= m1 - 1 - w).sum())]
                assert counts[b * 3 + h, m].tolist() == expect, (b, h, m)
