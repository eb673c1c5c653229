"""The selection structure shared by every SampleAttention backend, and its dense-mask expansion.

A selection says, per (batch, query head), which causal entries of the S x S attention are kept:
query row i attends to key j (j <= i) when

    i - window[b, h] < j                 (local window band, `window` tokens including i itself), or
    j in cols[b, h, :ncols[b, h]]        (selected key columns; only used where j <= i - window)

The two parts are disjoint by construction, so no key is counted twice. A head with
window >= S is dense (exact causal attention).

A segmented selection (segment = n > 0) gives every segment of n query rows its own columns:
row i uses cols[b, h, i // n, :ncols[b, h, i // n]]. Attention that varies along the sequence
(a passage whose own far keys matter to it alone) then keeps far fewer entries than one column
set per head must (docs/FIDELITY.md).

Also here, because every backend shares them: `fraction_to_tokens`, `sample_rows` (which query
rows stage 1 samples) and `select_columns` (stage 2, turning column scores into a Selection).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Selection:
    """Kept attention entries per head.

    window: (B, Hq) int32, local window size in tokens (>= 1).
    cols:   (B, Hq, C) int32, selected key columns, ascending within [0, ncols); entries at
            positions >= ncols are padding and hold S (out of range).
    ncols:  (B, Hq) int32, number of valid entries of cols.
    seq_len: S.
    segment: 0 (one column list per head, as above) or n > 0: cols (B, Hq, NSEG, C) and ncols
            (B, Hq, NSEG) with NSEG = ceil(S / n), one list per segment of n query rows.
    """

    window: torch.Tensor
    cols: torch.Tensor
    ncols: torch.Tensor
    seq_len: int
    segment: int = 0

    @property
    def segments(self) -> int:
        """Number of column lists per head (1 unless segmented)."""
        return -(-self.seq_len // self.segment) if self.segment else 1

    def segment_rows(self) -> int:
        """Query rows per column list (S when there is one per head)."""
        return self.segment or self.seq_len

    def per_segment(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cols (B, Hq, NSEG, C), ncols (B, Hq, NSEG)): views with a segment axis (NSEG = 1 for a
        selection with one list per head)."""
        if self.segment:
            return self.cols, self.ncols
        return self.cols[:, :, None], self.ncols[:, :, None]

    def check_shapes(self, B: int, H: int) -> None:
        """Assert the tensors' shapes fit (B, H) query heads and this selection's layout."""
        S = self.seq_len
        assert tuple(self.window.shape) == (B, H), f"sel.window must be ({B}, {H}), got {tuple(self.window.shape)}"
        lead = (B, H, self.segments) if self.segment else (B, H)
        assert self.cols.dim() == len(lead) + 1 and tuple(self.cols.shape[:-1]) == lead, (
            f"sel.cols must be ({', '.join(map(str, lead))}, C), got {tuple(self.cols.shape)}"
        )
        assert tuple(self.ncols.shape) == lead, f"sel.ncols must be {lead}, got {tuple(self.ncols.shape)}"
        assert self.segment >= 0 and S >= 1, f"bad segment {self.segment} or seq_len {S}"

    def kept_entries(self) -> torch.Tensor:
        """(B, Hq) float64: number of causal entries each head computes."""
        S = self.seq_len
        w = self.window.to(torch.float64).clamp(max=S)
        band = w * S - w * (w - 1) / 2  # rows i < w see i+1 keys, rows i >= w see w keys
        cols, ncols = self.per_segment()
        n = self.segment_rows()
        valid = torch.arange(cols.shape[-1], device=cols.device) < ncols[..., None]
        # column j of the segment of rows [s0, s1) is used by its rows i >= j + window
        s0 = torch.arange(cols.shape[2], device=cols.device, dtype=torch.float64)[:, None] * n
        s1 = (s0 + n).clamp(max=S)
        first = torch.maximum(cols.to(torch.float64) + w[..., None, None], s0)
        rows = (s1 - first).clamp(min=0)
        return band + (rows * valid).sum((-1, -2))

    def density(self) -> torch.Tensor:
        """(B, Hq) float64: kept entries / causal entries S(S+1)/2."""
        S = self.seq_len
        return self.kept_entries() / (S * (S + 1) / 2)


def selection_mask(sel: Selection) -> torch.Tensor:
    """(B, Hq, S, S) bool dense mask of the kept entries (for tests and small references)."""
    S = sel.seq_len
    dev = sel.cols.device
    i = torch.arange(S, device=dev)[:, None]
    j = torch.arange(S, device=dev)[None, :]
    w = sel.window.to(torch.int64)[..., None, None]
    band = (j <= i) & (j > i - w)
    cols, ncols = sel.per_segment()
    B, H, N, C = cols.shape
    colmark = torch.zeros(B, H, N, S + 1, dtype=torch.bool, device=dev)
    valid = torch.arange(C, device=dev) < ncols[..., None]
    idx = torch.where(valid, cols.to(torch.int64), torch.full_like(cols, S, dtype=torch.int64))
    colmark.scatter_(-1, idx, True)
    rowmark = colmark[:, :, torch.arange(S, device=dev) // sel.segment_rows(), :S]  # (B, H, S, S)
    return band | (rowmark & (j <= i - w))


def fraction_to_tokens(fraction: float, seq_len: int) -> int:
    """ceil(fraction * seq_len), clamped to [1, seq_len].

    The product is rounded to 6 decimals first so that float noise (0.07 * 100 ==
    7.000000000000001) does not add a token.
    """
    assert seq_len >= 1, f"seq_len must be >= 1, got {seq_len}"
    assert fraction > 0, f"fraction must be > 0, got {fraction}"
    return max(1, min(seq_len, math.ceil(round(fraction * seq_len, 6))))


def sample_rows(
    seq_len: int, sample_ratio: float, block: int = 64, device: torch.device | str | None = None
) -> torch.Tensor:
    """Query rows sampled by stage 1: (R,) int64, sorted, unique, built on `device` (default CPU)
    so that no host-to-device copy (which waits for the device's queue) is needed.

    R = ceil(sample_ratio * seq_len) rounded up to whole blocks of `block` consecutive rows,
    clamped to seq_len (then every row is sampled). The blocks are spread evenly over the
    sequence, the first starting at row 0 and the last ending at row seq_len - 1: the tail rows
    see the most keys, so they are always part of the sample. Deterministic.
    """
    assert seq_len >= 1, f"seq_len must be >= 1, got {seq_len}"
    assert 0 < sample_ratio <= 1, f"sample_ratio must be in (0, 1], got {sample_ratio}"
    assert block >= 1, f"block must be >= 1, got {block}"
    n = fraction_to_tokens(sample_ratio, seq_len)
    n = -(-n // block) * block
    if n >= seq_len:
        return torch.arange(seq_len, dtype=torch.int64, device=device)
    nblocks = n // block
    if nblocks == 1:
        starts = torch.full((1,), seq_len - block, dtype=torch.int64, device=device)
    else:
        # Spacing (S - block) / (nblocks - 1) >= block because nblocks * block <= S, and flooring
        # keeps consecutive starts at least floor(spacing) apart: blocks never overlap.
        starts = torch.arange(nblocks, dtype=torch.int64, device=device) * (seq_len - block) // (nblocks - 1)
    return (starts[:, None] + torch.arange(block, dtype=torch.int64, device=device)).reshape(-1)


def chunk_sample_rows(
    seq_len: int, chunk: int, sample_ratio: float, device: torch.device | str | None = None, tail: int = 64
) -> list[torch.Tensor]:
    """Query rows stage 1 samples for chunked selection: per chunk of `chunk` consecutive rows
    (the last one may be shorter), ceil(sample_ratio x its rows) rows on an even stride ending
    at its last row. The last chunk also takes the sequence's last `tail` rows, as `sample_rows`
    does: in a prompt they hold the question, whose far keys (the passage it asks about) no
    other row may read. A list of (R_c,) int64 tensors, sorted, unique, built on `device` (no
    host-to-device copy, so the pipeline stays capturable).
    """
    assert seq_len >= 1 and chunk >= 1, f"seq_len and chunk must be >= 1, got {seq_len}, {chunk}"
    assert 0 < sample_ratio <= 1, f"sample_ratio must be in (0, 1], got {sample_ratio}"
    assert tail >= 0, f"tail must be >= 0, got {tail}"
    out = []
    for s0 in range(0, seq_len, chunk):
        n_rows = min(chunk, seq_len - s0)
        n = fraction_to_tokens(sample_ratio, n_rows)
        # stride rows s0 + n_rows - 1 - floor(i * n_rows / n), i = n-1 .. 0: ascending, and
        # unique because n_rows >= n; the last chunk leaves its last t rows to the tail block
        t = min(tail, n_rows) if s0 + chunk >= seq_len else 0
        first = -(-t * n // n_rows)  # the smallest i whose row lies before the last t rows
        i = torch.arange(n - 1, first - 1, -1, dtype=torch.int64, device=device)
        rows = s0 + n_rows - 1 - (i * n_rows) // n
        if t:
            rows = torch.cat((rows, torch.arange(seq_len - t, seq_len, dtype=torch.int64, device=device)))
        out.append(rows)
    return out


def stack_chunks(sel: Selection, heads: int, chunk: int) -> Selection:
    """A Selection made for B x (heads * N) 'heads' (head-major: every chunk of a head in turn)
    as one segmented Selection of `heads` heads with a column list per chunk (segment = chunk).
    Every chunk of a head must have the same window."""
    B, HN = sel.window.shape
    N = HN // heads
    assert HN == heads * N and not sel.segment, f"expected B x {heads} * N one-list heads, got {tuple(sel.window.shape)}"
    C = sel.cols.shape[-1]
    return Selection(
        window=sel.window.view(B, heads, N)[:, :, 0].contiguous(),
        cols=sel.cols.view(B, heads, N, C),
        ncols=sel.ncols.view(B, heads, N),
        seq_len=sel.seq_len,
        segment=chunk,
    )


def select_columns(
    scores: torch.Tensor,
    window_mass: torch.Tensor,
    alpha: float,
    window_tokens: int,
    seq_len: int,
    *,
    trim: bool | None = None,
) -> Selection:
    """Stage 2: per head, the fewest key columns whose score reaches the attention threshold.

    scores:      (B, Hq, S) float, mean attention the sampled rows give each key column outside
                 their window band (from `column_scores`); non-negative.
    window_mass: (B, Hq, R) float, attention mass inside each sampled row's band.
    alpha:       cumulative-attention threshold.
    window_tokens: band width in tokens (>= 1); heads get window = min(window_tokens, S).

    Per (b, h), columns are taken by descending score (ties: lower index first) until
    mean(window_mass) + sum(scores[taken]) >= alpha. No column is taken when the window alone
    reaches alpha. Columns with zero score are never taken, nor are columns j >= S - window,
    which lie inside every row's band; if alpha is out of reach every remaining column is taken.
    Returns a Selection whose cols (B, Hq, C) int32 are ascending and padded with S. With trim
    (default: on the CPU) C is the largest count over heads (possibly 0); without it (default on
    other devices) C = S, so that no count has to travel to the host: the whole stage stays
    queued on the device, without a synchronization.
    """
    assert scores.dim() == 3, f"scores must be (B, Hq, S), got shape {tuple(scores.shape)}"
    B, H, S = scores.shape
    assert S == seq_len, f"scores cover {S} columns but seq_len is {seq_len}"
    assert window_mass.dim() == 3 and window_mass.shape[:2] == (B, H), (
        f"window_mass must be (B, Hq, R) = ({B}, {H}, R), got {tuple(window_mass.shape)}"
    )
    assert window_mass.shape[2] >= 1, "window_mass needs at least one sampled row"
    assert window_tokens >= 1, f"window_tokens must be >= 1, got {window_tokens}"
    dev = scores.device
    w = min(window_tokens, S)
    window = torch.full((B, H), w, dtype=torch.int32, device=dev)

    s = scores.to(torch.float32, copy=True)
    s[..., S - w :] = 0
    need = alpha - window_mass.to(torch.float64).mean(-1)  # (B, H)
    ranked, order = torch.sort(s, dim=-1, descending=True, stable=True)
    # float64 so the running sum does not drift over long rows of tiny scores.
    reached = ranked.to(torch.float64).cumsum(-1)
    # First position where the running sum reaches `need`; +1 turns it into a count.
    count = torch.searchsorted(reached, need[..., None].contiguous(), side="left")[..., 0] + 1
    count = torch.minimum(count, (s > 0).sum(-1))
    count = torch.where(need <= 0, torch.zeros_like(count), count)

    # Mark the taken columns in column order, then compact them (ascending) by their running
    # count; untaken columns go to a spare slot S that is cut off.
    rank = torch.arange(S, device=dev)
    keep = torch.empty((B, H, S), dtype=torch.bool, device=dev)
    keep.scatter_(-1, order, (rank < count[..., None]))
    dest = torch.where(keep, keep.cumsum(-1, dtype=torch.int64) - 1, S)
    cols = torch.full((B, H, S + 1), S, dtype=torch.int32, device=dev)
    cols.scatter_(-1, dest, rank.to(torch.int32).expand(B, H, S))
    cols = cols[..., :S]
    if trim if trim is not None else dev.type == "cpu":
        cols = cols[..., : int(count.max()) if count.numel() else 0]
    return Selection(window=window, cols=cols.contiguous(), ncols=count.to(torch.int32), seq_len=S)
