"""Stage 3 in Triton: exact attention over a Selection (window band + gathered key columns).

One program owns a block of BLOCK_M query rows of one (batch, query head) and runs an online
softmax (FlashAttention style: fp32 max/sum/accumulator, bf16/fp16 matrix products) over

(a) the head's selected columns that precede the block's band, gathered by index from K/V in
    BLOCK_N-row tiles: columns <= m0 - w are visible to every row and run unmasked; the few
    between m0 - w and m1 - 1 - w get the per-row mask j <= i - w;
(b) the contiguous band [m0 - w + 1, m1) with the mask i - w < j <= i applied only on the tiles
    that cross one of its two edges.

Every kept key is visited exactly once and no unkept key is read: the two parts are disjoint
by the Selection's definition. A segmented selection (a column list per segment of query rows, a
multiple of BLOCK_M) gives each program its segment's list; such lists are gathered, not packed. GQA reads K/V of head h // (Hq // Hkv) directly. Programs run
heaviest first (last query blocks first) so the tail of the grid is short.

On Hopper-class GPUs, for 16-bit dtypes with 16-byte aligned strides and S >= 128, Q, the
band's K/V tiles and O move through the copy engine (TMA, descriptors made once on the host).
There, each query head's selected K/V rows are first packed in column order by a small gather
kernel (`_gather_columns`), so the whole column tiles load through descriptors as well; only the
one partial column tile per program gathers rows by index. Elsewhere every column tile is
gathered by index.

Limits: head_dim 64 or 128; q/k/v of one dtype (bf16, fp16, or fp32 with full-precision
products); any length and batch. Tested against the PyTorch reference under TRITON_INTERPRET=1
at tiny shapes; the GPU paths (autotuned configs, software pipelining) are checked by
benchmarks/gpu_check.py on the device, not by CI.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import tuning
from .selection import Selection
from .triton_common import (
    check_qkv,
    descriptor_rows_hook,
    dot_flags,
    dot_nt,
    interpreter_compat,
    interpreting,
    last_dim_contiguous,
    row_tile,
    TMA_MIN_ROWS,
    use_descriptors,
)

# Query rows per program (a launch parameter, BLOCK_M in the configs): 128 rows fill a Hopper
# warpgroup MMA twice. Stage 2 precomputes, per block of COUNT_BLOCK query rows, how many selected
# columns precede the block's band; a program of BLOCK_M rows (a multiple of COUNT_BLOCK) reads
# the counts of its first and last such block.
BLOCK_M = 128
COUNT_BLOCK = 64
# Small tiles under the interpreter, so tiny test shapes still cross several tiles and edges
# (and each program spans two count blocks).
_INTERPRET_BLOCK_M = 32
_INTERPRET_COUNT_BLOCK = 16
_INTERPRET_BLOCK_N = 16


@triton.jit
def _softmax_pv(acc, l_i, m_i, qk, v, qk_scale, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax update with the logits of one tile and its [BLOCK_N, D] values."""
    # m_i starts finite, so a fully masked row keeps alpha = 1 and p = 0 (no NaN).
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    pv = p.to(v.dtype)
    if UPCAST:
        acc = tl.dot(pv.to(tl.float32), v.to(tl.float32), acc, input_precision=PREC)
    else:
        acc = tl.dot(pv, v, acc, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _online_tile(acc, l_i, m_i, q, k, v, qk_scale, mask,
                 MASKED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step over a [BLOCK_N, D] key/value tile."""
    qk = dot_nt(q, k, UPCAST, PREC)
    if MASKED:
        qk = tl.where(mask, qk, float("-inf"))
    return _softmax_pv(acc, l_i, m_i, qk, v, qk_scale, UPCAST, PREC)


@triton.jit
def _band_tile(acc, l_i, m_i, q, k_base, v_base, KD, VD, b, hk, j0, offs_n, offs_d, offs_m, w, S, s_ks, s_vs,
               qk_scale, MASKED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr):
    """One online-softmax step over the band's keys [j0, j0 + BLOCK_N); MASKED on the tiles that
    cross an edge of the band (i - w < j <= i) or S."""
    offs_j = j0 + offs_n
    k = row_tile(k_base, KD, b, hk, j0, offs_n, offs_d, S, s_ks, MASKED, TMA)
    v = row_tile(v_base, VD, b, hk, j0, offs_n, offs_d, S, s_vs, MASKED, TMA)
    mask = (offs_j[None, :] > offs_m[:, None] - w) & (offs_j[None, :] <= offs_m[:, None])
    return _online_tile(acc, l_i, m_i, q, k, v, qk_scale, mask, MASKED, UPCAST, PREC)


@triton.jit
def _gather_columns(
    K, V, COLS, NCOLS, KC, VC, H_Q, GROUP, C,
    s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_cb, s_ch,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    """KC[b, h, j] = K[b, h // GROUP, cols[b, h, j]] (and V likewise) for j < ncols[b, h]: each
    query head's selected key/value rows, packed in column order ((B, Hq, C, D) contiguous)."""
    bh = tl.program_id(0)
    j0 = tl.program_id(1) * BLOCK
    n = tl.minimum(tl.load(NCOLS + bh), C)
    if j0 < n:
        b = bh // H_Q
        h = bh % H_Q
        hk = h // GROUP
        offs = j0 + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        ok = (offs < n)[:, None]
        idx = tl.load(COLS + b.to(tl.int64) * s_cb + h.to(tl.int64) * s_ch + offs, mask=offs < n, other=0)
        k = tl.load(K + b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh + idx[:, None] * s_ks + offs_d[None, :],
                    mask=ok, other=0.0)
        v = tl.load(V + b.to(tl.int64) * s_vb + hk.to(tl.int64) * s_vh + idx[:, None] * s_vs + offs_d[None, :],
                    mask=ok, other=0.0)
        dst = (bh.to(tl.int64) * C + offs)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(KC + dst, k, mask=ok)
        tl.store(VC + dst, v, mask=ok)


@triton.jit(do_not_specialize=["S_BUCKET"])
def _sparse_attn_fwd(
    Q, K, V, O, QD, KD, VD, OD, KCD, VCD, WIN, COLS, CNT,
    qk_scale, S, H_Q, GROUP, N_CBLK,
    s_qb, s_qh, s_qs,
    s_kb, s_kh, s_ks,
    s_vb, s_vh, s_vs,
    s_ob, s_oh, s_os,
    s_cb, s_ch, s_cs, SEG_ROWS,
    S_BUCKET,  # unused in the body: the autotuner's length key
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, COUNT_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr, PACKED: tl.constexpr,
    MERGED_EDGES: tl.constexpr = False,
):
    bh = tl.program_id(0)
    mblk = tl.num_programs(1) - 1 - tl.program_id(1)  # heaviest (last) query blocks first
    b = bh // H_Q
    h = bh % H_Q
    hk = h // GROUP
    m0 = mblk * BLOCK_M
    m1 = m0 + BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    k_base = K + b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + hk.to(tl.int64) * s_vh
    row_ok = offs_m < S
    # TMA: contiguous tiles (Q, the band's K/V, O) through the copy engine, with descriptors QD..OD
    # made on the host over the whole (B, H, S, D) tensors; the gathered columns use ordinary loads.
    if TMA:
        q = QD.load([b, h, m0, 0]).reshape(BLOCK_M, HEAD_DIM)
    else:
        q = tl.load(q_base + offs_m[:, None] * s_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    w = tl.load(WIN + bh)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # (a) selected columns before the band: n_all of them are <= m0 - w (seen by every row; the
    # first count block's first count), n_any <= min(m1, S) - 1 - w (seen by at least the last
    # row; the last count block's second count).
    cnt_base = CNT + bh * N_CBLK * 2
    n_all = tl.load(cnt_base + (m0 // COUNT_BLOCK) * 2)
    n_any = tl.load(cnt_base + tl.minimum((m1 - 1) // COUNT_BLOCK, N_CBLK - 1) * 2 + 1)
    # a segmented selection: the column list of the block's segment (s_cs = 0 with one per head)
    c_base = COLS + b.to(tl.int64) * s_cb + h.to(tl.int64) * s_ch + (m0 // SEG_ROWS).to(tl.int64) * s_cs
    n_all_tiles = (n_all // BLOCK_N) * BLOCK_N
    # The partial and masked column tiles [n_all_tiles, n_any) come first, then the whole tiles
    # before them (any order gives the same softmax). In the other order ptxas serialises every
    # wgmma of the kernel (warning C7515: non-wgmma instructions define accumulator registers
    # inside a pipeline stage) and on an H100 the kernel ran 1-3% slower with packed columns,
    # 5-11% slower with gathered ones (benchmarks/raw/v8_gpu_sparse_loop_order*.json).
    for start in range(n_all_tiles, n_any, BLOCK_N):
        valid = (start + offs_n) < n_any
        idx = tl.load(c_base + start + offs_n, mask=valid, other=0)
        k = tl.load(k_base + idx[:, None] * s_ks + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + idx[:, None] * s_vs + offs_d[None, :], mask=valid[:, None], other=0.0)
        mask = valid[None, :] & (idx[None, :] <= offs_m[:, None] - w)
        acc, l_i, m_i = _online_tile(acc, l_i, m_i, q, k, v, qk_scale, mask, True, UPCAST, PREC)
    for start in range(0, n_all_tiles, BLOCK_N):
        if PACKED:  # the head's selected rows packed beforehand: whole tiles through the copy engine
            k = row_tile(k_base, KCD, b, h, start, offs_n, offs_d, S, s_ks, False, True)
            v = row_tile(v_base, VCD, b, h, start, offs_n, offs_d, S, s_vs, False, True)
        else:
            idx = tl.load(c_base + start + offs_n)
            k = tl.load(k_base + idx[:, None] * s_ks + offs_d[None, :])
            v = tl.load(v_base + idx[:, None] * s_vs + offs_d[None, :])
        acc, l_i, m_i = _online_tile(acc, l_i, m_i, q, k, v, qk_scale, None, False, UPCAST, PREC)

    # (b) the band [lo, hi) in tiles starting at lo. Tiles before t_a cross the lower edge
    # (some row excludes a key j <= i - w), tiles from t_b cross the diagonal (or S).
    lo = tl.maximum(m0 - w + 1, 0)
    hi = tl.minimum(m1, S)
    n_tiles = tl.cdiv(hi - lo, BLOCK_N)
    t_a = tl.minimum(tl.cdiv(tl.maximum(m1 - w - lo, 0), BLOCK_N), n_tiles)
    t_b = tl.maximum(tl.minimum((m0 + 1 - lo) // BLOCK_N, n_tiles), t_a)
    if MERGED_EDGES:
        # the unmasked tiles, then both edges' masked tiles in one loop: one software pipeline
        # fewer to fill per program (faster for short bands only, see EDGE_MERGE_MAX_TILES)
        for t in range(t_a, t_b):
            acc, l_i, m_i = _band_tile(acc, l_i, m_i, q, k_base, v_base, KD, VD, b, hk, lo + t * BLOCK_N, offs_n,
                                       offs_d, offs_m, w, S, s_ks, s_vs, qk_scale, False, UPCAST, PREC, TMA)
        for u in range(0, t_a + n_tiles - t_b):
            t = tl.where(u < t_a, u, u - t_a + t_b)
            acc, l_i, m_i = _band_tile(acc, l_i, m_i, q, k_base, v_base, KD, VD, b, hk, lo + t * BLOCK_N, offs_n,
                                       offs_d, offs_m, w, S, s_ks, s_vs, qk_scale, True, UPCAST, PREC, TMA)
    else:
        for t in range(0, t_a):
            acc, l_i, m_i = _band_tile(acc, l_i, m_i, q, k_base, v_base, KD, VD, b, hk, lo + t * BLOCK_N, offs_n,
                                       offs_d, offs_m, w, S, s_ks, s_vs, qk_scale, True, UPCAST, PREC, TMA)
        for t in range(t_a, t_b):
            acc, l_i, m_i = _band_tile(acc, l_i, m_i, q, k_base, v_base, KD, VD, b, hk, lo + t * BLOCK_N, offs_n,
                                       offs_d, offs_m, w, S, s_ks, s_vs, qk_scale, False, UPCAST, PREC, TMA)
        for t in range(t_b, n_tiles):
            acc, l_i, m_i = _band_tile(acc, l_i, m_i, q, k_base, v_base, KD, VD, b, hk, lo + t * BLOCK_N, offs_n,
                                       offs_d, offs_m, w, S, s_ks, s_vs, qk_scale, True, UPCAST, PREC, TMA)

    # Rows past S (last block only) may have seen no key; they are not stored.
    out = acc / tl.where(row_ok, l_i, 1.0)[:, None]
    o_base = O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh
    if TMA:
        OD.store([b, h, m0, 0], out.to(O.dtype.element_ty).reshape(1, 1, BLOCK_M, HEAD_DIM))
    else:
        tl.store(o_base + offs_m[:, None] * s_os + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])


# Few configs, keyed on head_dim, precision, the power-of-two length bucket and the loop
# structure (MERGED_EDGES). On an H100 with hd 128, BLOCK_N 128 / 8 warps / 3 stages won everywhere
# from 32K to 128K; BLOCK_N 64 / 4 warps ran at half its speed and 2 stages 13-27% slower
# (docs/KERNEL_NOTES.md). The 64-wide config stays for head_dim 64 and short sequences, where it
# has not been measured to lose; 64-row programs (two resident per SM) join for head_dim 64 only
# (_prune_configs).
_ROWS_HOOK = descriptor_rows_hook(QD="BLOCK_M", KD="BLOCK_N", VD="BLOCK_N", OD="BLOCK_M", KCD="BLOCK_N", VCD="BLOCK_N")
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns, pre_hook=_ROWS_HOOK)
    for bm, bn, nw, ns in [(128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)]
]


def _prune_configs(configs: list, nargs: dict, **kwargs) -> list:  # type: ignore[type-arg]
    """64-row programs only for head_dim 64. On an H100 they were 2-24% faster than the
    128-row ones for the default model's shape (9 x 64) at 16K-64K and 10-20% density, but with
    head_dim 128 10-22% slower at 10-40% density at 128K (KERNEL_NOTES.md v7)."""
    if kwargs.get("HEAD_DIM") == 64:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] == 128]


# Base of a fixed launch (`config=`): the config the autotuner chose on an H100 (KERNEL_NOTES.md).
# Warp-specializing the band's unmasked loop (tl.range(..., warp_specialize=True)) measured no
# gain on the H100 (35.96 vs 36.11 ms at 10%, 134.4 vs 133.0 ms at 40%, 128K; KERNEL_NOTES.md v4).
FIXED_CONFIG: dict[str, int] = {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
# Both band edges' masked tiles in one loop, after the unmasked tiles (MERGED_EDGES; one software
# pipeline fewer to fill per program) where the window is shorter than this many 128-key tiles.
# Interleaved on an H100 (KERNEL_NOTES.md v9, raw/v9_gpu_sparse_edge_loop.json): 2% faster at
# 128K / 3% density (8 tiles), 6% at 32K / 3% (2 tiles), 4-6% for the default model's 5% window
# at 16K (7 tiles), 1-4% at 32K (13 tiles); equal at 128K / 5% (13 tiles); 1% slower at 10%
# (26 tiles), 7-11% slower at 20-40% (53-109 tiles). The window is known on the host for the
# "sample" rule (a share of S): the caller passes it as window_hint.
EDGE_MERGE_MAX_TILES = 16
# Q, O and the band's tiles through the copy engine (descriptors made once on the host) where the
# GPU, the dtype and the strides allow: 6-10% faster on an H100 at 32K-128K (KERNEL_NOTES.md v6;
# descriptors made by each program cost ~1.7 us per program and were dropped).
USE_TMA = True
# With descriptors, the selected columns' K/V rows are first packed per query head (one small
# gather kernel) so that the column loop's whole tiles also go through the copy engine instead of
# being gathered row by row in every query block's program: 8-25% faster on an H100 at 128K,
# 3-40% density, gather kernel included (KERNEL_NOTES.md v7).
USE_PACKED = True
# Rows per program of the packing kernel.
_PACK_BLOCK = 64

_sparse_attn_fwd_tuned = triton.autotune(
    configs=_CONFIGS, key=["HEAD_DIM", "S_BUCKET", "PREC", "TMA", "PACKED", "MERGED_EDGES"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_sparse_attn_fwd)


def _pack_columns(
    k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor, ncols: torch.Tensor, Hq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query head's selected K/V rows in column order: (B, Hq, C, D) buffers for k/v
    (B, Hkv, S, D), cols (B, Hq, C) int32 contiguous, ncols (B, Hq); rows past ncols unwritten."""
    B, Hkv, _, D = k.shape
    C = cols.shape[-1]
    kc = torch.empty((B, Hq, C, D), dtype=k.dtype, device=k.device)
    vc = torch.empty_like(kc)
    block = _INTERPRET_BLOCK_N if interpreting() else _PACK_BLOCK
    _gather_columns[(B * Hq, triton.cdiv(C, block))](
        k, v, cols, ncols.to(torch.int32).contiguous(), kc, vc, Hq, Hq // Hkv, C,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        cols.stride(0), cols.stride(1), HEAD_DIM=D, BLOCK=block,
    )
    return kc, vc


def count_block() -> int:
    """Query rows per block of the sparse kernel's column counts in this process (small under
    the interpreter); every launch's BLOCK_M is a multiple of it."""
    return _INTERPRET_COUNT_BLOCK if interpreting() else COUNT_BLOCK


def merged_edges(window: int | None, S: int) -> bool:
    """Whether the band's two masked edges run as one loop for a window of `window` tokens
    (None: not known on the host, the structure for long bands)."""
    return window is not None and 0 < window and triton.cdiv(min(window, S), 128) < EDGE_MERGE_MAX_TILES


def column_counts(sel: Selection, block_m: int) -> torch.Tensor:
    """(B*Hq, n_mblk, 2) int32: per query block [m0, m1), selected columns (of the block's
    segment, for a segmented selection) <= m0 - w and <= m1 - 1 - w. A segmented selection's
    segment must be a multiple of block_m."""
    B, H = sel.window.shape
    S = sel.seq_len
    cols, ncols = sel.per_segment()
    N, C = cols.shape[2], cols.shape[3]
    seg = sel.segment_rows()
    dev = cols.device
    n_mblk = triton.cdiv(S, block_m)
    if C == 0:
        return torch.zeros(B * H, n_mblk, 2, dtype=torch.int32, device=dev)
    assert sel.segment == 0 or sel.segment % block_m == 0, f"segment {sel.segment} is not a multiple of {block_m}"
    m0 = torch.arange(n_mblk, device=dev, dtype=torch.int64) * block_m
    m1 = (m0 + block_m).clamp(max=S)
    w = sel.window.reshape(B * H, 1).to(torch.int64)
    thresholds = torch.stack((m0[None, :] - w + 1, m1[None, :] - w), dim=-1)  # (B*H, n_mblk, 2)
    if N == 1:
        flat = cols.reshape(B * H, C).to(torch.int64).contiguous()
        counts = torch.searchsorted(flat, thresholds.reshape(B * H, 2 * n_mblk).contiguous(), side="left")
        counts = torch.minimum(counts, ncols.reshape(B * H, 1).to(torch.int64)).reshape(B * H, n_mblk, 2)
    else:
        # each segment's list searched once for the thresholds of all its blocks (consecutive,
        # since the segment is a multiple of block_m); the list is not copied per block
        per = seg // block_m
        pad = N * per - n_mblk  # the last segment may be short
        if pad:
            thresholds = torch.cat((thresholds, thresholds[:, -1:].expand(B * H, pad, 2)), dim=1)
        flat = cols.reshape(B * H * N, C).contiguous()
        counts = torch.searchsorted(flat, thresholds.reshape(B * H * N, 2 * per).to(flat.dtype).contiguous(),
                                    side="left")
        counts = torch.minimum(counts, ncols.reshape(B * H * N, 1).to(counts.dtype))
        counts = counts.reshape(B * H, N * per, 2)[:, :n_mblk]
    return counts.to(torch.int32).contiguous()


def sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: Selection,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
    counts: torch.Tensor | None = None,
    tma: bool | None = None,
    packed: bool | None = None,
    window_hint: int | None = None,
) -> torch.Tensor:
    """Exact softmax attention over the entries kept by `sel` (Triton).

    q: (B, Hq, S, D) bf16/fp16/fp32, last dim contiguous (other strides free);
    k, v: (B, Hkv, S, D), same dtype, Hq % Hkv == 0; D in (64, 128).
    sel: Selection for (B, Hq) and seq_len S: window (B, Hq) int32 >= 1, cols (B, Hq, C) int32
         ascending within ncols (B, Hq) int32, padded with S.
    scale: softmax scale (> 0).
    out: optional (B, Hq, S, D) tensor of q's dtype, last dim contiguous, to write into.
    config: optional fixed launch config {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages",
        "MERGED_EDGES"}
        (missing keys from FIXED_CONFIG; BLOCK_M a multiple of count_block()) instead of the
        autotuned one; benchmarks compare configs with it. Ignored under the interpreter,
        which uses small tiles.
    counts: optional (B*Hq, ceil(S / count_block()), 2) int32, per block [m0, m1) of
        count_block() query rows the number of selected columns <= m0 - w and <= m1 - 1 - w,
        as stage 2 on the Triton backend produces them (triton_selection); computed here when
        absent.
    tma: read Q, the band and write O through host-made tensor descriptors (None: USE_TMA,
        never under the interpreter); falls back to ordinary loads where `tma_compatible` says
        no (no copy engine, 32-bit dtype, unaligned strides) or S is shorter than one tile.
    packed: with descriptors, pack each head's selected K/V rows first ((B, Hq, C, D) buffers,
        C = sel.cols.shape[-1]) so whole column tiles load through descriptors too (None:
        USE_PACKED); off without descriptors and, on the GPU, when C < 128 (the regime checked
        there).
    window_hint: the heads' (typical) window in tokens, when the caller knows it on the host
        (the "sample" rule's window is a fixed share of S); it picks the band's loop structure
        (merged_edges), never which keys are computed. None: the structure for long bands.
    Returns out (B, Hq, S, D), q's dtype: row i of head h is the softmax-weighted
    sum over keys j <= i with i - window < j, or j a selected column with j <= i - window.
    """
    B, Hq, Hkv, S, D = check_qkv(q, k, v)
    assert scale > 0, f"scale must be > 0, got {scale}"
    assert sel.seq_len == S, f"selection is for seq_len {sel.seq_len}, inputs have S={S}"
    sel.check_shapes(B, Hq)
    assert sel.window.device == q.device and sel.cols.device == q.device, "selection must be on q's device"
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    window = sel.window.to(torch.int32).contiguous()
    seg_cols, seg_ncols = sel.per_segment()
    cols = seg_cols.to(torch.int32)
    if cols.shape[-1] == 0:  # keep a valid pointer for the (never executed) column loads
        cols = torch.full((*cols.shape[:3], 1), S, dtype=torch.int32, device=q.device)
    cols = cols.contiguous()  # (B, Hq, NSEG, C)
    if out is None:
        out = torch.empty((B, Hq, S, D), dtype=q.dtype, device=q.device)
    assert tuple(out.shape) == (B, Hq, S, D) and out.dtype == q.dtype and out.stride(-1) == 1, (
        f"out must be ({B}, {Hq}, {S}, {D}) {q.dtype} with a contiguous last dim"
    )
    assert S * max(q.stride(2), k.stride(2), v.stride(2), out.stride(2)) < 2**31, "rows too far apart for int32 offsets"
    upcast, precision = dot_flags(q.dtype)
    qk_scale = float(scale) * 1.4426950408889634  # exp(x) = exp2(x * log2(e))

    interp = interpreting()
    cb = count_block()
    n_cblk = triton.cdiv(S, cb)
    if counts is None:
        counts = column_counts(sel, cb)
    assert tuple(counts.shape) == (B * Hq, n_cblk, 2) and counts.dtype == torch.int32 and counts.is_contiguous(), (
        f"counts must be contiguous int32 ({B * Hq}, {n_cblk}, 2), got {tuple(counts.shape)} {counts.dtype}"
    )
    # the tiles of a fixed launch (the autotuned one sets its descriptors' rows in a pre-hook)
    if interp:
        tiles = {"BLOCK_M": _INTERPRET_BLOCK_M, "BLOCK_N": _INTERPRET_BLOCK_N}
    else:
        tiles = {**FIXED_CONFIG, **(config or {})}
    merged = bool((config or {}).get("MERGED_EDGES", merged_edges(window_hint, S)))
    assert tiles["BLOCK_M"] % cb == 0, f"BLOCK_M {tiles['BLOCK_M']} must be a multiple of {cb}"
    assert sel.segment % tiles["BLOCK_M"] == 0, (
        f"segment {sel.segment} must be a multiple of the kernel's {tiles['BLOCK_M']}-row blocks"
    )
    if tma is None:
        tma = USE_TMA and not interp
    tma = use_descriptors(tma, S, q, k, v, out)
    # (on the GPU only where the packed rows fill a tile: the regime checked there; never for a
    # segmented selection, whose packed rows would take NSEG times the memory)
    packed = (tma and not sel.segment and (USE_PACKED if packed is None else bool(packed))
              and (interp or cols.shape[-1] >= TMA_MIN_ROWS))
    kc, vc = _pack_columns(k, v, cols[:, :, 0], sel.ncols, Hq) if packed else (None, None)
    descs = tuple(
        TensorDescriptor.from_tensor(t, [1, 1, tiles[rows], D]) if tma and t is not None else None
        for t, rows in ((q, "BLOCK_M"), (k, "BLOCK_N"), (v, "BLOCK_N"), (out, "BLOCK_M"), (kc, "BLOCK_N"), (vc, "BLOCK_N"))
    )
    args = (
        q, k, v, out, *descs, window, cols, counts,
        qk_scale, S, Hq, Hq // Hkv, n_cblk,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        cols.stride(0), cols.stride(1), cols.stride(2) if sel.segment else 0, sel.segment or S,
    )
    if interp or config is not None:
        if interp:
            interpreter_compat()
        launch = {} if interp else {"num_warps": tiles["num_warps"], "num_stages": tiles["num_stages"]}
        _sparse_attn_fwd[(B * Hq, triton.cdiv(S, tiles["BLOCK_M"]))](
            *args, S_BUCKET=0, HEAD_DIM=D, BLOCK_M=tiles["BLOCK_M"], BLOCK_N=tiles["BLOCK_N"], COUNT_BLOCK=cb,
            UPCAST=upcast, PREC=precision, TMA=tma, PACKED=packed, MERGED_EDGES=merged, **launch,
        )
    else:
        tuning.launch(
            _sparse_attn_fwd_tuned, lambda meta: (B * Hq, triton.cdiv(S, meta["BLOCK_M"])), *args, device=q.device,
            S_BUCKET=max(S - 1, 1).bit_length(), HEAD_DIM=D, COUNT_BLOCK=cb,
            UPCAST=upcast, PREC=precision, TMA=tma, PACKED=packed, MERGED_EDGES=merged,
        )
    return out
