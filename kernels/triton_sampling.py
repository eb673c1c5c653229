"""Stage 1 in Triton: exact attention of the sampled query rows, accumulated per key column.

For sampled rows r (sorted) and band width w, with p_r the exact causal softmax of row r:
    scores[b, h, j]      = (1/R) * sum_r p_r[j] * [j <= r - w]
    window_mass[b, h, i] = sum of p_{rows[i]} over (rows[i] - w, rows[i]]
The sampled score matrix never reaches global memory. Two passes, each one QK^T over the
sampled entries:

1. `_row_stats` (one program per chunk of sampled rows and split of the keys): online max /
   sum over every key j <= r, plus the band's share, giving per row the log2 normaliser
   m + log2(l) and the window mass. When the row chunks alone are too few to fill the GPU
   (short sequences, few heads), the keys are split over several programs whose partial
   (max, sum, band sum) the launcher merges exactly.
2. `_col_scores` (one program per chunk of key columns, the chunk of K loaded once): loops
   over the sampled rows that see the chunk outside their band, recomputes the logits (rows x
   keys, or keys x rows: ROWS_M, an autotuned choice) and adds the normalised probabilities
   elementwise; a single reduction over rows at the end gives the column sums. No atomics:
   each program owns its columns.

Pass 1 reads its key tiles through a host-made tensor descriptor (TMA) where the GPU, the
dtype, the strides and the length allow (as the sparse kernel).

Limits: head_dim 64 or 128; bf16/fp16/fp32 inputs (fp32 with full-precision products); any S,
batch, GQA (K read per KV head). Tested against the PyTorch reference under TRITON_INTERPRET=1
at tiny shapes; the GPU configuration is checked by benchmarks/gpu_check.py on the device.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import tuning
from .triton_common import (
    check_qkv,
    descriptor_rows_hook,
    dot_flags,
    dot_nt,
    interpreter_compat,
    interpreting,
    last_dim_contiguous,
    row_tile,
    use_descriptors,
)

# Tiles under the interpreter: small, so tiny test shapes cross several tiles and edges.
_INTERPRET_TILE = 16


@triton.jit
def _stats_update(m_i, l_i, qk, qk_scale):
    """Online row max and sum of exp2 over one tile of unmasked logits."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    return m_new, l_i * tl.math.exp2(m_i - m_new) + tl.sum(p, 1)


@triton.jit(do_not_specialize=["S_BUCKET"])
def _row_stats(
    Q, K, KD, ROWS, BIAS, WMASS, PART,
    qk_scale, S, R, W, H_Q, GROUP, N_CHUNK, KEYS_PER_SPLIT,
    s_qb, s_qh, s_qs, s_kb, s_kh, s_ks,
    S_BUCKET,  # unused in the body: the autotuner's length key
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, PIPE: tl.constexpr, SPLIT: tl.constexpr, TMA: tl.constexpr,
):
    bh = tl.program_id(0)
    chunk = N_CHUNK - 1 - tl.program_id(1)  # rows are sorted: the longest rows first
    split = tl.program_id(2)
    b = bh // H_Q
    h = bh % H_Q
    hk = h // GROUP
    offs_i = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    i_ok = offs_i < R
    rows = tl.load(ROWS + offs_i, mask=i_ok, other=0)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    k_base = K + b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh
    q = tl.load(q_base + rows[:, None] * s_qs + offs_d[None, :], mask=i_ok[:, None], other=0.0)
    r_min = tl.min(tl.where(i_ok, rows, S), 0)
    r_max = tl.max(rows, 0)

    # This program's keys: [k_lo, k_hi), one split of KEYS_PER_SPLIT (a multiple of BLOCK_N,
    # so tiles never straddle two splits) cut at the chunk's last row.
    k_lo = split * KEYS_PER_SPLIT
    k_hi = tl.minimum(k_lo + KEYS_PER_SPLIT, r_max + 1)
    m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)
    l_all = tl.zeros([BLOCK_R], dtype=tl.float32)
    l_band = tl.zeros([BLOCK_R], dtype=tl.float32)
    # Whole tiles of keys j <= r_min - W are causal and outside the band for every row: no mask.
    # The band mass stays 0 over them, so it needs no rescaling either.
    clear_end = (tl.maximum(r_min - W + 1, 0) // BLOCK_N) * BLOCK_N
    clear_hi = tl.maximum(tl.minimum(clear_end, k_lo + KEYS_PER_SPLIT), k_lo)
    if PIPE:
        # Software-pipelined: the next tile's QK^T is issued before this tile's exp and sums.
        if clear_hi > k_lo:
            k = row_tile(k_base, KD, b, hk, k_lo, offs_n, offs_d, S, s_ks, False, TMA)
            qk = dot_nt(q, k, UPCAST, PREC)
            for start in range(k_lo + BLOCK_N, clear_hi, BLOCK_N):
                k = row_tile(k_base, KD, b, hk, start, offs_n, offs_d, S, s_ks, False, TMA)
                qk_next = dot_nt(q, k, UPCAST, PREC)
                m_i, l_all = _stats_update(m_i, l_all, qk, qk_scale)
                qk = qk_next
            m_i, l_all = _stats_update(m_i, l_all, qk, qk_scale)
    else:
        for start in range(k_lo, clear_hi, BLOCK_N):
            k = row_tile(k_base, KD, b, hk, start, offs_n, offs_d, S, s_ks, False, TMA)
            m_i, l_all = _stats_update(m_i, l_all, dot_nt(q, k, UPCAST, PREC), qk_scale)
    for start in range(clear_hi, k_hi, BLOCK_N):
        offs_j = start + offs_n
        k = row_tile(k_base, KD, b, hk, start, offs_n, offs_d, S, s_ks, True, TMA)
        qk = dot_nt(q, k, UPCAST, PREC)
        qk = tl.where(offs_j[None, :] <= rows[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        in_band = offs_j[None, :] > rows[:, None] - W
        l_all = l_all * alpha + tl.sum(p, 1)
        l_band = l_band * alpha + tl.sum(tl.where(in_band, p, 0.0), 1)
        m_i = m_new
    if SPLIT:
        # Partial statistics of this split, (3, B*Hq, n_split, R); the launcher combines them.
        n_split = tl.num_programs(2)
        part = PART + (bh * n_split + split) * R + offs_i
        step = tl.num_programs(0) * n_split * R
        tl.store(part, m_i, mask=i_ok)
        tl.store(part + step, l_all, mask=i_ok)
        tl.store(part + 2 * step, l_band, mask=i_ok)
    else:
        tl.store(BIAS + bh * R + offs_i, m_i + tl.math.log2(l_all), mask=i_ok)
        tl.store(WMASS + bh * R + offs_i, l_band / l_all, mask=i_ok)


@triton.jit
def _logits(k, q, UPCAST: tl.constexpr, PREC: tl.constexpr, ROWS_M: tl.constexpr):
    """Logits of sampled rows q [R, D] against the columns k [N, D]: [R, N] where ROWS_M (rows as
    the MMA's M dimension, the chunk of K its B operand), else [N, R]."""
    if ROWS_M:
        s = dot_nt(q, k, UPCAST, PREC)
    else:
        s = dot_nt(k, q, UPCAST, PREC)
    return s


@triton.jit
def _per_row(x, ROWS_M: tl.constexpr):
    """A per-row vector broadcast along the columns of a _logits tile."""
    if ROWS_M:
        y = x[:, None]
    else:
        y = x[None, :]
    return y


@triton.jit
def _per_col(x, ROWS_M: tl.constexpr):
    """A per-column vector broadcast along the rows of a _logits tile."""
    if ROWS_M:
        y = x[None, :]
    else:
        y = x[:, None]
    return y


@triton.jit
def _masked_rows_step(acc, k, q_base, ROWS, bias_base, i0, offs_r, offs_d, offs_j, s_qs, R, W, qk_scale,
                      UPCAST: tl.constexpr, PREC: tl.constexpr, ROWS_M: tl.constexpr):
    """Add the probabilities of sampled rows i0 .. i0 + BLOCK_R (those < R) for this chunk's
    columns, keeping only columns outside each row's band (j <= r - W)."""
    idx = i0 + offs_r
    ok = idx < R
    rows = tl.load(ROWS + idx, mask=ok, other=0)
    q = tl.load(q_base + rows[:, None] * s_qs + offs_d[None, :], mask=ok[:, None], other=0.0)
    bias = tl.load(bias_base + idx, mask=ok, other=0.0)
    p = tl.math.exp2(_logits(k, q, UPCAST, PREC, ROWS_M) * qk_scale - _per_row(bias, ROWS_M))
    keep = _per_row(ok, ROWS_M) & (_per_col(offs_j, ROWS_M) <= _per_row(rows - W, ROWS_M))
    return acc + tl.where(keep, p, 0.0)


@triton.jit(do_not_specialize=["S_BUCKET"])
def _col_scores(
    Q, K, ROWS, BIAS, FIRST, SCORES,
    qk_scale, inv_r, S, R, W, H_Q, GROUP,
    s_qb, s_qh, s_qs, s_kb, s_kh, s_ks,
    S_BUCKET,  # unused in the body: the autotuner's length key
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, PIPE: tl.constexpr, ROWS_M: tl.constexpr = False,
):
    bh = tl.program_id(0)
    cblk = tl.program_id(1)
    b = bh // H_Q
    h = bh % H_Q
    hk = h // GROUP
    offs_j = cblk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_r = tl.arange(0, BLOCK_R)
    q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    k_base = K + b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh
    k = tl.load(k_base + offs_j[:, None] * s_ks + offs_d[None, :], mask=(offs_j < S)[:, None], other=0.0)
    bias_base = BIAS + bh * R

    # Sampled rows [first, full) see part of this chunk outside their band (masked steps);
    # rows from `full` on see all of it. Both bounds come from a searchsorted on the host.
    first = tl.load(FIRST + cblk * 2)
    full = tl.load(FIRST + cblk * 2 + 1)
    mid = first + tl.cdiv(full - first, BLOCK_R) * BLOCK_R
    end = mid + (tl.maximum(R - mid, 0) // BLOCK_R) * BLOCK_R
    acc = tl.zeros([BLOCK_R, BLOCK_N] if ROWS_M else [BLOCK_N, BLOCK_R], dtype=tl.float32)
    for i0 in range(first, mid, BLOCK_R):
        acc = _masked_rows_step(acc, k, q_base, ROWS, bias_base, i0, offs_r, offs_d, offs_j, s_qs, R, W,
                                qk_scale, UPCAST, PREC, ROWS_M)
    if PIPE:
        # Software-pipelined: the next step's logits are issued before this step's exp.
        if end > mid:
            rows = tl.load(ROWS + mid + offs_r)
            s_cur = _logits(k, tl.load(q_base + rows[:, None] * s_qs + offs_d[None, :]), UPCAST, PREC, ROWS_M)
            bias = tl.load(bias_base + mid + offs_r)
            for i0 in range(mid + BLOCK_R, end, BLOCK_R):
                rows = tl.load(ROWS + i0 + offs_r)
                s_next = _logits(k, tl.load(q_base + rows[:, None] * s_qs + offs_d[None, :]), UPCAST, PREC, ROWS_M)
                acc += tl.math.exp2(s_cur * qk_scale - _per_row(bias, ROWS_M))
                bias = tl.load(bias_base + i0 + offs_r)
                s_cur = s_next
            acc += tl.math.exp2(s_cur * qk_scale - _per_row(bias, ROWS_M))
    else:
        for i0 in range(mid, end, BLOCK_R):
            idx = i0 + offs_r
            rows = tl.load(ROWS + idx)
            q = tl.load(q_base + rows[:, None] * s_qs + offs_d[None, :])
            bias = tl.load(bias_base + idx)
            acc += tl.math.exp2(_logits(k, q, UPCAST, PREC, ROWS_M) * qk_scale - _per_row(bias, ROWS_M))
    for i0 in range(end, R, BLOCK_R):  # the partial last step, if any
        # its rows see the whole chunk: the band test only drops columns past S, never stored
        acc = _masked_rows_step(acc, k, q_base, ROWS, bias_base, i0, offs_r, offs_d, offs_j, s_qs, R, W,
                                qk_scale, UPCAST, PREC, ROWS_M)
    tl.store(SCORES + bh * S + offs_j, tl.sum(acc, 0 if ROWS_M else 1) * inv_r, mask=offs_j < S)


# Tile shapes on the GPU. Pass 1: one program per block of 64 sampled rows (the sampled blocks
# are 64 consecutive rows, so the masked band region stays one window wide). Pass 2: 128 key
# columns per program, 64 sampled rows per step.
ROWS_PER_PROGRAM = 64
COLS_PER_PROGRAM = 128
ROWS_PER_STEP = 64

# Each pass is autotuned over a few configs (it is idempotent: pass 1 writes its row statistics,
# pass 2 its columns, nothing accumulates across launches). PIPE: software-pipelined loop.
# ROWS_M (pass 2): the sampled rows as the MMA's M dimension and the chunk of K as its B operand,
# instead of the columns as M with K in registers. With PIPE and 2 stages it was the fastest pass
# 2 on an H100 (8B shape, interleaved: 6.73 vs 7.39 ms at 128K, 0.482 vs 0.549 ms at 32K;
# benchmarks/raw/v8_gpu_check_rows_m.json); the columns-as-M PIPE kernel spills (255 registers).
# The 8-warp PIPE config, never picked, made room for it.
_PASS1_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "PIPE": pipe}, num_warps=nw, num_stages=ns, pre_hook=descriptor_rows_hook(KD="BLOCK_N"))
    for bn, pipe, nw, ns in [(128, False, 4, 3), (128, True, 4, 3), (64, True, 4, 3), (128, True, 8, 3)]
]
_PASS2_CONFIGS = [
    triton.Config({"PIPE": pipe, "ROWS_M": rows_m}, num_warps=nw, num_stages=ns)
    for pipe, rows_m, nw, ns in [(False, False, 4, 3), (True, False, 4, 3), (True, False, 4, 2), (True, True, 4, 2),
                                 (True, True, 4, 3)]
]
_row_stats_tuned = triton.autotune(configs=_PASS1_CONFIGS, key=["HEAD_DIM", "S_BUCKET", "PREC", "TMA"])(_row_stats)
_col_scores_tuned = triton.autotune(configs=_PASS2_CONFIGS, key=["HEAD_DIM", "S_BUCKET", "PREC"])(_col_scores)

# A fixed launch (benchmarks compare configs with `config=`; the interpreter uses small tiles).
DEFAULT_CONFIG: dict[str, int] = {
    "rows_per_program": ROWS_PER_PROGRAM,
    "keys_per_tile": 128,
    "warps1": 4,
    "stages1": 3,
    "pipe1": 0,
    "keys_per_split": 0,
    "cols_per_program": COLS_PER_PROGRAM,
    "rows_per_step": ROWS_PER_STEP,
    "warps2": 4,
    "stages2": 3,
    "pipe2": 0,
    "tma1": -1,
    "rows_m2": 0,
}
# Pass 1's key tiles through a host-made tensor descriptor (the copy engine) where the GPU, the
# dtype (16-bit), the strides and the length (S >= 128) allow (tma1 -1: this default; 0 / 1
# turn it off / on, still subject to those conditions). 4-6% faster pass 1 on an H100 at 128K.
USE_TMA = True


# Pass 1 runs one program per chunk of 64 sampled rows. When those are too few to fill the GPU
# (short sequences, few heads), the keys are split so that there are about this many programs
# per SM. Measured on an H100 with the default model's shape (9 x 64, 5% of rows), as a replayed
# CUDA graph (the product path): 0.112 vs 0.143 ms at 16K, 0.293 vs 0.337 ms at 32K, split in 4
# vs whole (benchmarks/raw/v4_gpu_check_graph.json, v4_gpu_check_final.json). Launched eagerly the split is slower
# (0.68 vs 0.42 ms: the merge's launches), but eager launches are not the product path.
_PROGRAMS_PER_SM = 4
# Shortest split: below it merging costs more than the parallelism gains.
_MIN_KEYS_PER_SPLIT = 1024


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _keys_per_split(requested: int, programs: int, S: int, device: torch.device, interp: bool) -> int:
    """Keys per pass-1 program, a multiple of 128 (of the interpreter's tile while interpreting):
    `requested` if > 0; else, on CUDA, enough splits for _PROGRAMS_PER_SM programs per SM given
    `programs` row chunks; elsewhere all keys (no split)."""
    unit = _INTERPRET_TILE if interp else 128
    if requested <= 0:
        requested = S
        if device.type == "cuda" and not interp:
            index = device.index if device.index is not None else torch.cuda.current_device()
            n_split = max(1, min(-(-_PROGRAMS_PER_SM * _sm_count(index) // programs), S // _MIN_KEYS_PER_SPLIT))
            requested = -(-S // n_split)
    return -(-requested // unit) * unit


def column_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    window_tokens: int,
    scale: float,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: attention of sampled query rows accumulated per key column (Triton).

    q: (B, Hq, S, D) bf16/fp16/fp32, last dim contiguous; k: (B, Hkv, S, D), same dtype,
       Hq % Hkv == 0; D in (64, 128).
    rows: (R,) int64 (any int dtype), sorted unique sampled query rows in [0, S), R >= 1.
    window_tokens: band width w >= 1; row r's band is keys (r - w, r].
    scale: softmax scale (> 0).
    out: optional (scores, window_mass) float32 contiguous tensors to write into.
    config: optional fixed launch config overriding DEFAULT_CONFIG's keys, instead of the
        autotuned launches (benchmarks compare configs with it); rows_m2 1 runs pass 2 with the
        sampled rows as the MMA's M dimension (ROWS_M); keys_per_split > 0 fixes
        pass 1's split of the keys (0: automatic, see _keys_per_split); tma1 1 / 0 asks for pass
        1's key tiles through a tensor descriptor or not (-1: USE_TMA on a GPU, never under the
        interpreter); descriptors stay off where `tma_compatible` says no (no copy engine,
        32-bit dtype, unaligned strides) or, on the GPU, for S < 128.
    Returns, float32 contiguous on q's device:
      scores (B, Hq, S): mean over sampled rows r of p_r[j] * [j <= r - w];
      window_mass (B, Hq, R): per sampled row, the softmax mass of its band.
    """
    B, Hq, Hkv, S, D = check_qkv(q, k)
    assert rows.dim() == 1 and rows.numel() >= 1, f"rows must be a non-empty (R,) tensor, got {tuple(rows.shape)}"
    assert window_tokens >= 1, f"window_tokens must be >= 1, got {window_tokens}"
    assert scale > 0, f"scale must be > 0, got {scale}"
    rows = rows.to(device=q.device, dtype=torch.int32).contiguous()
    R = rows.numel()
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    upcast, precision = dot_flags(q.dtype)
    qk_scale = float(scale) * 1.4426950408889634
    interp = interpreting()
    if interp:
        interpreter_compat()
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    if interp:
        cfg.update(rows_per_program=_INTERPRET_TILE, keys_per_tile=_INTERPRET_TILE,
                   cols_per_program=_INTERPRET_TILE, rows_per_step=_INTERPRET_TILE)
    block_r1, block_n1 = cfg["rows_per_program"], cfg["keys_per_tile"]
    block_n2, block_r2 = cfg["cols_per_program"], cfg["rows_per_step"]
    assert S * max(q.stride(2), k.stride(2)) < 2**31, "rows too far apart for int32 offsets"

    if out is None:
        out = (
            torch.empty((B, Hq, S), dtype=torch.float32, device=q.device),
            torch.empty((B, Hq, R), dtype=torch.float32, device=q.device),
        )
    scores, window_mass = out
    assert tuple(scores.shape) == (B, Hq, S) and scores.dtype == torch.float32 and scores.is_contiguous(), (
        f"out scores must be contiguous float32 ({B}, {Hq}, {S})"
    )
    assert tuple(window_mass.shape) == (B, Hq, R) and window_mass.dtype == torch.float32 and window_mass.is_contiguous(), (
        f"out window_mass must be contiguous float32 ({B}, {Hq}, {R})"
    )
    bias = torch.empty((B, Hq, R), dtype=torch.float32, device=q.device)
    tuned = config is None and not interp
    s_bucket = max(S - 1, 1).bit_length()
    n_chunk = triton.cdiv(R, block_r1)
    keys_per_split = _keys_per_split(cfg["keys_per_split"], B * Hq * n_chunk, S, q.device, interp)
    n_split = triton.cdiv(S, keys_per_split)
    part = torch.empty((3, B * Hq, n_split, R), dtype=torch.float32, device=q.device) if n_split > 1 else bias
    tma = use_descriptors(USE_TMA and not interp if cfg["tma1"] < 0 else cfg["tma1"], S, k)
    kd = TensorDescriptor.from_tensor(k, [1, 1, block_n1, D]) if tma else None
    args1 = (
        q, k, kd, rows, bias, window_mass, part,
        qk_scale, S, R, window_tokens, Hq, Hq // Hkv, n_chunk, keys_per_split,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), s_bucket,
    )
    grid1 = (B * Hq, n_chunk, n_split)
    if tuned:
        tuning.launch(
            _row_stats_tuned, grid1, *args1, device=q.device,
            HEAD_DIM=D, BLOCK_R=block_r1, UPCAST=upcast, PREC=precision, SPLIT=n_split > 1, TMA=tma,
        )
    else:
        _row_stats[grid1](
            *args1, HEAD_DIM=D, BLOCK_R=block_r1, BLOCK_N=block_n1, UPCAST=upcast, PREC=precision,
            PIPE=bool(cfg["pipe1"]), SPLIT=n_split > 1, TMA=tma,
            **({} if interp else {"num_warps": cfg["warps1"], "num_stages": cfg["stages1"]}),
        )
    if n_split > 1:
        # Merge the splits' online-softmax states: rescale each to the common max.
        m_part, l_part, band_part = part.view(3, B, Hq, n_split, R).unbind(0)
        m_all = m_part.amax(2, keepdim=True)
        f = torch.exp2(m_part - m_all)
        l_sum = (l_part * f).sum(2)
        torch.add(m_all[:, :, 0], torch.log2(l_sum), out=bias)
        torch.div((band_part * f).sum(2), l_sum, out=window_mass)

    n_cblk = triton.cdiv(S, block_n2)
    j0 = torch.arange(n_cblk, device=q.device, dtype=torch.int32) * block_n2
    # First sampled row that sees any column of the chunk outside its band (r >= j0 + w), and
    # first that sees all of them (r >= j0 + BLOCK_N - 1 + w).
    thresholds = torch.stack((j0 + window_tokens, j0 + block_n2 - 1 + window_tokens), dim=-1)
    first = torch.searchsorted(rows, thresholds.reshape(-1).contiguous(), side="left").to(torch.int32)
    args2 = (
        q, k, rows, bias, first, scores,
        qk_scale, 1.0 / R, S, R, window_tokens, Hq, Hq // Hkv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), s_bucket,
    )
    if tuned:
        tuning.launch(_col_scores_tuned, (B * Hq, n_cblk), *args2, device=q.device,
                      HEAD_DIM=D, BLOCK_N=block_n2, BLOCK_R=block_r2, UPCAST=upcast, PREC=precision)
    else:
        _col_scores[(B * Hq, n_cblk)](
            *args2, HEAD_DIM=D, BLOCK_N=block_n2, BLOCK_R=block_r2, UPCAST=upcast, PREC=precision,
            PIPE=bool(cfg["pipe2"]), ROWS_M=bool(cfg["rows_m2"]),
            **({} if interp else {"num_warps": cfg["warps2"], "num_stages": cfg["stages2"]}),
        )
    return scores, window_mass
