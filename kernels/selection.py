"""The selection structure shared by every SampleAttention backend, and its dense-mask expansion.

A selection says, per (batch, query head), which causal entries of the S x S attention are kept:
query row i attends to key j (j <= i) when

    i - window[b, h] < j                 (local window band, `window` tokens including i itself), or
    j in cols[b, h, :ncols[b, h]]        (selected key columns; only used where j <= i - window)

The two parts are disjoint by construction, so no key is counted twice. A head with
window >= S is dense (exact causal attention).
"""

from __future__ import annotations

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
    """

    window: torch.Tensor
    cols: torch.Tensor
    ncols: torch.Tensor
    seq_len: int

    def kept_entries(self) -> torch.Tensor:
        """(B, Hq) float64: number of causal entries each head computes."""
        S = self.seq_len
        w = self.window.to(torch.float64).clamp(max=S)
        band = w * S - w * (w - 1) / 2  # rows i < w see i+1 keys, rows i >= w see w keys
        valid = torch.arange(self.cols.shape[-1], device=self.cols.device) < self.ncols[..., None]
        # column j is used by rows i >= j + window: S - j - window rows
        rows = (S - self.cols.to(torch.float64) - w[..., None]).clamp(min=0)
        return band + (rows * valid).sum(-1)

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
    B, H, C = sel.cols.shape
    colmark = torch.zeros(B, H, S + 1, dtype=torch.bool, device=dev)
    valid = torch.arange(C, device=dev) < sel.ncols[..., None]
    idx = torch.where(valid, sel.cols.to(torch.int64), torch.full_like(sel.cols, S, dtype=torch.int64))
    colmark.scatter_(-1, idx, True)
    colmark = colmark[..., :S]
    cols = colmark[..., None, :] & (j <= i - w)
    return band | cols
