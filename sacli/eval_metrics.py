"""Fidelity metrics of sparse attention against dense, as plain tensor functions.

Everything here is computed in float32 from the exact dense attention probabilities, so a
selection's quality is measured apart from any kernel's rounding: the sparse output of a selection
is the softmax over its kept entries, i.e. the dense probabilities restricted to them and
renormalized. One head at a time, query rows in chunks, so memory stays O(chunk x S) whatever S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Rows per chunk: a (chunk, S) float32 block is 256 MiB at S = 64K.
DEFAULT_ROW_CHUNK = 1024


@dataclass
class HeadSelection:
    """One head's kept entries in the Selection convention (see sacli.kernels.selection).

    window: band size in tokens (>= S means the head is dense).
    cols: 1-D int64 tensor of selected key columns (any order; entries >= S are ignored), or for
          a segmented selection (segment > 0) a 2-D (NSEG, C) tensor: row i uses cols[i // segment].
    segment: 0, or the query rows per column list.
    """

    window: int
    cols: torch.Tensor
    segment: int = 0


@dataclass
class HeadFidelity:
    """Fidelity of one selection on one head (rows: every query row 0..S-1)."""

    density: float  # kept causal entries / S(S+1)/2
    mass: torch.Tensor  # (S,) float32: dense attention probability each row keeps
    err: float  # ||O_sparse - O_dense||_F / ||O_dense||_F over the whole head

    @property
    def mass_mean(self) -> float:
        return float(self.mass.mean())

    @property
    def mass_min(self) -> float:
        return float(self.mass.min())

    @property
    def mass_p01(self) -> float:
        return float(torch.quantile(self.mass.double(), 0.01))


def causal_entries(seq_len: int) -> int:
    return seq_len * (seq_len + 1) // 2


def oracle_row_counts(probs: torch.Tensor, alpha: float, top: int = 1024) -> torch.Tensor:
    """Per row, the fewest entries whose probabilities sum to at least alpha of the row.

    probs: (R, N) float, non-negative rows (masked entries 0). Returns (R,) int64.
    The largest `top` entries answer most rows; only the rows they leave short are fully sorted.
    """
    total = probs.sum(-1, keepdim=True)
    target = alpha * total
    n = probs.shape[-1]
    need = torch.full((probs.shape[0],), n, dtype=torch.int64, device=probs.device)
    head = torch.topk(probs, min(top, n), dim=-1, sorted=True).values
    csum = torch.cumsum(head, dim=-1)
    done = csum[:, -1:] >= target
    # entries strictly below the target are all needed, plus the one that crosses it
    need = torch.where(done[:, 0], (csum < target).sum(-1) + 1, need)
    rest = (~done[:, 0]).nonzero()[:, 0]
    if rest.numel():
        p = torch.sort(probs[rest], dim=-1, descending=True).values
        c = torch.cumsum(p, dim=-1)
        need[rest] = (c < target[rest]).sum(-1) + 1
    return need.clamp(max=n)


def _colmark(sel: HeadSelection, seq_len: int, device: torch.device) -> torch.Tensor:
    """(NSEG, S) float32 (NSEG = 1 unless segmented): 1 at the selected columns, 0 elsewhere."""
    cols = sel.cols if sel.segment else sel.cols[None]
    cols = cols.to(device=device, dtype=torch.int64).clamp(min=0, max=seq_len)
    mark = torch.zeros(cols.shape[0], seq_len + 1, dtype=torch.float32, device=device)
    mark.scatter_(-1, cols, 1.0)
    return mark[:, :seq_len]


def _rows_mark(mark: torch.Tensor, sel: HeadSelection, row0: int, row1: int) -> torch.Tensor:
    """(row1 - row0, S) or (1, S): the column marks rows row0..row1-1 use."""
    if not sel.segment:
        return mark
    seg = torch.arange(row0, row1, device=mark.device) // sel.segment
    return mark[seg.clamp(max=mark.shape[0] - 1)]


def _band_restore(kept: torch.Tensor, probs: torch.Tensor, r0: int, window: int) -> None:
    """In place: rows r0.. of `kept` get back their band entries (r - window, r] from probs."""
    r1 = r0 + kept.shape[0]
    lo = max(0, r0 - window + 1)
    d = torch.arange(r0, r1, device=kept.device)[:, None] - torch.arange(lo, r1, device=kept.device)[None, :]
    inband = (d >= 0) & (d < window)
    kept[:, lo:r1] = torch.where(inband, probs[:, lo:r1], kept[:, lo:r1])


def selection_row_mask(sel: HeadSelection, row0: int, row1: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """(row1 - row0, S) bool: the kept entries of rows row0..row1-1 (causal band | selected columns)."""
    i = torch.arange(row0, row1, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    causal = j <= i
    if sel.window >= seq_len:
        return causal.expand(row1 - row0, seq_len)
    colmark = _rows_mark(_colmark(sel, seq_len, device).bool(), sel, row0, row1)
    # a selected column inside the band is already kept, so band | column needs no disjointness fix
    return causal & ((j > i - sel.window) | colmark)


def selection_kept_entries(sel: HeadSelection, seq_len: int) -> int:
    """Causal entries kept by one head's selection (band plus columns before the band)."""
    S = seq_len
    w = min(int(sel.window), S)
    band = w * S - w * (w - 1) // 2
    if w >= S:
        return band
    if sel.segment:
        mark = _colmark(sel, S, torch.device("cpu")).bool()  # (NSEG, S)
        s0 = torch.arange(mark.shape[0])[:, None] * sel.segment
        s1 = (s0 + sel.segment).clamp(max=S)
        rows = (s1 - torch.maximum(torch.arange(S)[None, :] + w, s0)).clamp(min=0)
        return band + int((rows * mark).sum())
    cols = torch.unique(sel.cols.to(torch.int64))
    cols = cols[(cols >= 0) & (cols < S)]
    rows = (S - cols - w).clamp(min=0)
    return band + int(rows.sum())


def head_fidelity(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selections: list[HeadSelection],
    *,
    scale: float,
    oracle_alphas: tuple[float, ...] = (),
    row_chunk: int = DEFAULT_ROW_CHUNK,
    chunk_stride: int = 1,
) -> tuple[list[HeadFidelity], dict[float, float]]:
    """Measure several selections of one head in a single pass over the dense probabilities.

    q, k, v: (S, D) any float dtype (one query head and its key/value head); computed in float32.
    Returns one HeadFidelity per selection and {alpha: oracle density} where the oracle keeps,
    per row, its own largest entries up to alpha of the row's mass.
    chunk_stride > 1 measures only every chunk_stride-th block of rows (a quick estimate: the
    masses of the other rows are NaN, the error and oracle cover the measured rows only; the
    density is always exact).
    """
    assert q.dim() == 2 and k.shape == q.shape and v.shape[0] == q.shape[0], (
        f"expected q, k, v (S, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    )
    S = q.shape[0]
    dev = q.device
    qf, kf, vf = q.float(), k.float(), v.float()
    masses = [torch.full((S,), math.nan, dtype=torch.float32, device=dev) for _ in selections]
    marks = [_colmark(sel, S, dev) if sel.window < S else None for sel in selections]
    err_num = [0.0 for _ in selections]
    den = 0.0
    oracle = {a: 0 for a in oracle_alphas}
    measured = 0
    for r0 in range(0, S, row_chunk * chunk_stride):
        r1 = min(S, r0 + row_chunk)
        measured += (r1 - r0) * (r0 + r1 + 1) // 2
        # rows r0..r1-1 see no key past r1 - 1
        logits = torch.matmul(qf[r0:r1], kf[:r1].T).mul_(scale)
        d = torch.arange(r0, r1, device=dev)[:, None] - torch.arange(r1, device=dev)[None, :]
        logits.masked_fill_(d < 0, -math.inf)
        probs = torch.softmax(logits, dim=-1)
        del logits
        dense = probs @ vf[:r1]
        den += float(dense.square().sum())
        for a in oracle_alphas:
            oracle[a] += int(oracle_row_counts(probs, a).sum())
        for n, sel in enumerate(selections):
            mark = marks[n]
            if mark is None:
                masses[n][r0:r1] = 1.0
                continue
            kept = probs * _rows_mark(mark, sel, r0, r1)[:, :r1]
            _band_restore(kept, probs, r0, int(sel.window))
            m = kept.sum(-1)
            masses[n][r0:r1] = m
            out = (kept @ vf[:r1]).div_(m[:, None])
            err_num[n] += float((out - dense).square().sum())
            del kept
        del probs
    total = causal_entries(S)
    norm = math.sqrt(den) if den > 0 else 1.0
    results = [
        HeadFidelity(
            density=selection_kept_entries(sel, S) / total,
            mass=masses[n] if chunk_stride == 1 else masses[n][~masses[n].isnan()],
            err=math.sqrt(err_num[n]) / norm,
        )
        for n, sel in enumerate(selections)
    ]
    return results, {a: c / measured for a, c in oracle.items()}


def log_softmax32(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


@dataclass
class NextTokenComparison:
    """Dense vs sparse next-token distributions over the same positions."""

    ppl_dense: float
    ppl_sparse: float
    kl_mean: float  # mean over positions of KL(dense || sparse), nats
    top1_agreement: float  # share of positions where both argmaxes agree
    positions: int


def next_token_comparison(
    logits_dense: torch.Tensor, logits_sparse: torch.Tensor, targets: torch.Tensor
) -> NextTokenComparison:
    """Compare next-token predictions position by position.

    logits_dense, logits_sparse: (N, V) any float dtype, the logits that predict targets;
    targets: (N,) int64 token ids. Perplexity is exp(mean negative log-likelihood).
    """
    assert logits_dense.shape == logits_sparse.shape and logits_dense.dim() == 2, (
        f"logits must be equal (N, V); got {tuple(logits_dense.shape)}, {tuple(logits_sparse.shape)}"
    )
    assert targets.shape == logits_dense.shape[:1], f"targets must be (N,); got {tuple(targets.shape)}"
    ld = log_softmax32(logits_dense)
    ls = log_softmax32(logits_sparse)
    t = targets.to(device=ld.device, dtype=torch.int64)[:, None]
    nll_d = -ld.gather(-1, t).mean()
    nll_s = -ls.gather(-1, t).mean()
    kl = (ld.exp() * (ld - ls)).sum(-1).clamp(min=0).mean()
    top1 = (ld.argmax(-1) == ls.argmax(-1)).float().mean()
    return NextTokenComparison(
        ppl_dense=math.exp(float(nll_d)),
        ppl_sparse=math.exp(float(nll_s)),
        kl_mean=float(kl),
        top1_agreement=float(top1),
        positions=int(targets.shape[0]),
    )
