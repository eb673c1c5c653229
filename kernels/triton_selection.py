"""Stage 2 in Triton: from column scores to the Selection, the sparse kernel's per-block column
counts and the per-head density, in one program per head after one sort.

Same result as `selection.select_columns` (the PyTorch reference) followed by the sparse
launcher's `column_counts` and `Selection.density`, which on the GPU take ~80 small kernel
launches: per (b, h), with s the scores and the last w columns (inside every row's band) dropped,

    count = fewest columns by descending score (ties: lower index first) whose float64 running
            sum reaches need = alpha - mean(window_mass); 0 when need <= 0; at most #(s > 0).

The program never needs the sort's permutation: with tau the count-th largest score, a column is
taken when s_j > tau, or s_j == tau and fewer than count - #(s > tau) tied columns precede it.
One pass in column order then writes the taken columns ascending (stable positions from a running
count), pads the rest with S, and sums each column's rows for the density.

Passes per head over S (in BLOCK-wide chunks): running sum of the sorted scores, #(s > tau),
the column-order pass, and the padding; then a binary search per query block for the counts.
Only the float64 running sum's rounding order differs from torch.cumsum's, so a count can differ
only when `need` lies within rounding (~1e-16 relative) of a partial sum.

Limits: float32 scores; any B, H, S; one program per head (the work is O(S) per head). Tested
against the reference under TRITON_INTERPRET=1 at tiny shapes; GPU timing in
benchmarks/profile_pipeline.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .selection import Selection
from .triton_common import interpreter_compat, interpreting

# Elements per chunk: 8 warps x 32 lanes x 8 values on the GPU; small under the interpreter so
# tiny test shapes cross several chunks.
_BLOCK = 2048
_INTERPRET_BLOCK = 16
_BLOCK_Q = 256  # query blocks per step of the counts' binary search


@triton.jit
def _select_kernel(
    SCORES, RANKED, NEED, WIN, COLS, NCOLS, CNT, DENS,
    S, W, L, N_MBLK, SEARCH_STEPS,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    bh = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    s_base = SCORES + bh.to(tl.int64) * S
    r_base = RANKED + bh.to(tl.int64) * L
    c_base = COLS + bh.to(tl.int64) * S
    need = tl.load(NEED + bh)

    # 1. the first position where the running sum of the sorted scores reaches `need`, and the
    #    number of positive scores (L = S - w sorted values; the dropped tail is all zeros)
    carry = tl.zeros([], dtype=tl.float64)
    first = tl.zeros([], dtype=tl.int32) + L
    nnz = tl.zeros([], dtype=tl.int32)
    for j0 in range(0, L, BLOCK):
        o = j0 + offs
        v = tl.load(r_base + o, mask=o < L, other=0.0).to(tl.float64)
        run = tl.cumsum(v, 0) + carry
        first = tl.minimum(first, tl.min(tl.where((run >= need) & (o < L), o, L), 0))
        nnz += tl.sum((v > 0).to(tl.int32), 0)
        carry = tl.max(run, 0)  # the chunk's last partial sum: the values are >= 0
    count = tl.minimum(first + 1, nnz)
    count = tl.where(need <= 0, 0, count)

    # 2. the threshold and how many of its ties are taken
    tau = tl.load(r_base + tl.maximum(count - 1, 0), mask=count > 0, other=float("inf"))
    above = tl.zeros([], dtype=tl.int32)
    for j0 in range(0, L, BLOCK):
        o = j0 + offs
        v = tl.load(r_base + o, mask=o < L, other=0.0)
        above += tl.sum((v > tau).to(tl.int32), 0)
    ties_taken = count - above

    # 3. column order: taken columns to their ascending positions, and their rows for the density
    taken = tl.zeros([], dtype=tl.int32)
    ties = tl.zeros([], dtype=tl.int32)
    rows = tl.zeros([], dtype=tl.int64)
    for j0 in range(0, S, BLOCK):
        o = j0 + offs
        s = tl.load(s_base + o, mask=o < L, other=0.0)
        eq = (s == tau).to(tl.int32)
        take = (s > tau) | ((eq != 0) & (tl.cumsum(eq, 0) - eq + ties < ties_taken))
        t32 = take.to(tl.int32)
        tl.store(c_base + tl.cumsum(t32, 0) - t32 + taken, o, mask=take)
        rows += tl.sum(tl.where(take, S - o - W, 0).to(tl.int64), 0)  # column o serves rows i >= o + w
        taken += tl.sum(t32, 0)
        ties += tl.sum(eq, 0)
    for j0 in range(0, S, BLOCK):
        o = j0 + offs
        tl.store(c_base + o, S, mask=(o >= taken) & (o < S))
    tl.store(NCOLS + bh, taken)
    tl.store(WIN + bh, W)
    s64 = S.to(tl.int64)
    w64 = tl.zeros([], dtype=tl.int64) + W
    band = w64 * s64 - w64 * (w64 - 1) // 2
    tl.store(DENS + bh, ((band + rows).to(tl.float64) / (s64 * (s64 + 1) // 2).to(tl.float64)).to(tl.float32))

    # 4. per query block [m0, m1): taken columns <= m0 - w and <= m1 - 1 - w (binary search)
    tl.debug_barrier()  # the columns written above are read back by other threads
    for q0 in range(0, N_MBLK, BLOCK_Q):
        mb = q0 + tl.arange(0, BLOCK_Q)
        m0 = mb * BLOCK_M
        m1 = tl.minimum(m0 + BLOCK_M, S)
        for side in tl.static_range(2):
            if side == 0:
                x = m0 - W
            else:
                x = m1 - 1 - W
            lo = tl.zeros([BLOCK_Q], dtype=tl.int32)
            hi = tl.zeros([BLOCK_Q], dtype=tl.int32) + taken
            for _ in range(SEARCH_STEPS):
                open_ = lo < hi
                mid = (lo + hi) // 2
                c = tl.load(c_base + mid, mask=open_, other=0)
                right = open_ & (c <= x)
                lo = tl.where(right, mid + 1, lo)
                hi = tl.where(open_ & ~right, mid, hi)
            tl.store(CNT + (bh * N_MBLK + mb) * 2 + side, lo, mask=mb < N_MBLK)


def select_columns_triton(
    scores: torch.Tensor,
    window_mass: torch.Tensor,
    alpha: float,
    window_tokens: int,
    seq_len: int,
    block_m: int,
) -> tuple[Selection, torch.Tensor, torch.Tensor]:
    """Stage 2 (Triton), plus what the sparse kernel and the statistics need from it.

    scores: (B, Hq, S) float32 contiguous, non-negative column scores (stage 1).
    window_mass: (B, Hq, R) float, band mass of each sampled row.
    alpha, window_tokens, seq_len: as `selection.select_columns`.
    block_m: query rows per block of the sparse kernel the counts are for.
    Returns (sel, counts, density):
      sel: the Selection of `select_columns(..., trim=False)`: window (B, Hq) int32, cols
           (B, Hq, S) int32 ascending then padded with S, ncols (B, Hq) int32;
      counts: (B*Hq, ceil(S / block_m), 2) int32, per query block [m0, m1) the number of
           selected columns <= m0 - w and <= m1 - 1 - w (the sparse launcher's column_counts);
      density: (B, Hq) float32, sel.density().
    """
    assert scores.dim() == 3, f"scores must be (B, Hq, S), got shape {tuple(scores.shape)}"
    B, H, S = scores.shape
    assert S == seq_len, f"scores cover {S} columns but seq_len is {seq_len}"
    assert scores.dtype == torch.float32, f"scores must be float32, got {scores.dtype}"
    assert window_mass.dim() == 3 and window_mass.shape[:2] == (B, H) and window_mass.shape[2] >= 1, (
        f"window_mass must be (B, Hq, R >= 1) = ({B}, {H}, R), got {tuple(window_mass.shape)}"
    )
    assert window_tokens >= 1, f"window_tokens must be >= 1, got {window_tokens}"
    assert block_m >= 1, f"block_m must be >= 1, got {block_m}"
    dev = scores.device
    w = min(window_tokens, S)
    L = S - w
    scores = scores.contiguous()
    need = (alpha - window_mass.to(torch.float64).mean(-1)).contiguous()
    # the sorted scores outside every band; the last w columns (all inside) are left out
    ranked = torch.sort(scores[..., :L], dim=-1, descending=True).values.contiguous() if L > 0 else scores
    n_mblk = triton.cdiv(S, block_m)
    window = torch.empty((B, H), dtype=torch.int32, device=dev)
    cols = torch.empty((B, H, S), dtype=torch.int32, device=dev)
    ncols = torch.empty((B, H), dtype=torch.int32, device=dev)
    counts = torch.empty((B * H, n_mblk, 2), dtype=torch.int32, device=dev)
    density = torch.empty((B, H), dtype=torch.float32, device=dev)
    interp = interpreting()
    if interp:
        interpreter_compat()
    _select_kernel[(B * H,)](
        scores, ranked, need, window, cols, ncols, counts, density,
        S, w, L, n_mblk, max(S, 1).bit_length() + 1,
        BLOCK=_INTERPRET_BLOCK if interp else _BLOCK, BLOCK_M=block_m,
        BLOCK_Q=_INTERPRET_BLOCK if interp else _BLOCK_Q,
        **({} if interp else {"num_warps": 8}),
    )
    return Selection(window=window, cols=cols, ncols=ncols, seq_len=S), counts, density
