"""Selection rules produce valid Selections and keep the promises their docstrings make."""

from __future__ import annotations

import math

import pytest
import torch

from sacli.kernels import column_scores, sample_rows, select_columns, selection_mask
from sacli.kernels.rules import RuleConfig, candidate_windows, select_adaptive, select_literal, window_statistics
from sacli.kernels.selection import Selection

PAPER_LIKE = RuleConfig(window_levels=1, order="score", row_quantile=None, sink_tokens=0, dense_above=1.0)


def _qk(B: int, Hq: int, Hkv: int, S: int, D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random q, k with attention-like structure: a few strong keys and a local bias."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, S, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    heavy = torch.randint(0, S, (max(1, S // 50),), generator=g)
    k[:, :, heavy] *= 3.0
    k[:, :, :2] += q.mean(2).view(B, Hkv, Hq // Hkv, D).mean(2)[:, :, None] * 2
    return q, k


def _check_valid(sel: Selection, B: int, H: int, S: int) -> None:
    assert sel.seq_len == S
    assert sel.window.shape == (B, H) and sel.window.dtype == torch.int32
    assert sel.ncols.shape == (B, H) and sel.ncols.dtype == torch.int32
    assert sel.cols.dim() == 3 and sel.cols.shape[:2] == (B, H) and sel.cols.dtype == torch.int32
    assert bool((sel.window >= 1).all()) and bool((sel.window <= S).all())
    C = sel.cols.shape[-1]
    assert bool((sel.ncols >= 0).all()) and bool((sel.ncols <= C).all())
    valid = torch.arange(C) < sel.ncols[..., None]
    assert bool((sel.cols[~valid] == S).all()), "padding must hold S"
    assert bool(((sel.cols >= 0) & (sel.cols < S))[valid].all())
    if C > 1:
        rising = sel.cols[..., 1:] > sel.cols[..., :-1]
        assert bool((rising | ~valid[..., 1:]).all()), "cols must be strictly ascending"
    causal = S * (S + 1) / 2
    mask = selection_mask(sel)
    assert not bool((mask & ~torch.ones(S, S, dtype=torch.bool).tril()).any())
    assert torch.allclose(mask.sum((-1, -2)).double() / causal, sel.density(), atol=1e-12)


@pytest.mark.parametrize("S, D, Hq, Hkv", [(97, 64, 3, 1), (1025, 64, 6, 2), (600, 128, 4, 1), (333, 64, 4, 4)])
def test_adaptive_selection_is_valid(S: int, D: int, Hq: int, Hkv: int) -> None:
    q, k = _qk(2 if S < 500 else 1, Hq, Hkv, S, D, seed=S)
    B = q.shape[0]
    sel = select_adaptive(q, k, alpha=0.95, window=0.08, sample_ratio=0.1, scale=D**-0.5)
    _check_valid(sel, B, Hq, S)


def test_window_statistics_match_column_scores() -> None:
    S, D = 513, 64
    q, k = _qk(1, 6, 2, S, D, seed=3)
    rows = sample_rows(S, 0.1)
    scale = D**-0.5
    scores, band = window_statistics(q, k, rows, [41, 7], scale)
    for t, w in enumerate([41, 7]):
        ref_scores, ref_mass = column_scores(q, k, rows, w, scale)
        assert torch.allclose(scores[:, :, t], ref_scores, atol=1e-6)
        assert torch.allclose(band[:, :, t], ref_mass, atol=1e-5)


def test_paper_like_config_equals_select_columns() -> None:
    S, D = 1025, 64
    q, k = _qk(1, 6, 2, S, D, seed=4)
    scale = D**-0.5
    rows = sample_rows(S, 0.05)
    w = math.ceil(0.08 * S)
    ref = select_columns(*column_scores(q, k, rows, w, scale), 0.9, w, S)
    got = select_adaptive(q, k, alpha=0.9, window=0.08, sample_ratio=0.05, scale=scale, config=PAPER_LIKE)
    assert torch.equal(got.window, ref.window)
    assert torch.equal(got.ncols, ref.ncols)
    assert torch.equal(got.cols, ref.cols)


def _sampled_row_mass(q: torch.Tensor, k: torch.Tensor, sel: Selection, rows: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, Hq, R) float64: attention mass each sampled row keeps under sel (brute force)."""
    B, Hq, S, _ = q.shape
    G = Hq // k.shape[1]
    kk = k.repeat_interleave(G, dim=1).double()
    logits = (q.double() @ kk.transpose(-1, -2)) * scale
    logits.masked_fill_(torch.ones(S, S, dtype=torch.bool).triu(1), -math.inf)
    P = logits.softmax(-1)
    return (P * selection_mask(sel))[:, :, rows].sum(-1)


def test_row_quantile_rows_reach_alpha() -> None:
    S, D = 700, 64
    q, k = _qk(1, 3, 1, S, D, seed=5)
    scale = D**-0.5
    rows = sample_rows(S, 0.2)
    cfg = RuleConfig(row_quantile=0.9, dense_above=1.0, sink_tokens=0)
    sel = select_adaptive(q, k, alpha=0.9, window=0.1, sample_ratio=0.2, scale=scale, config=cfg)
    mass = _sampled_row_mass(q, k, sel, rows, scale)
    share = (mass >= 0.9 - 1e-6).double().mean(-1)
    assert bool((share >= 0.9).all()), share
    mean_cfg = RuleConfig(row_quantile=None, dense_above=1.0, sink_tokens=0)
    sel_mean = select_adaptive(q, k, alpha=0.9, window=0.1, sample_ratio=0.2, scale=scale, config=mean_cfg)
    assert bool((_sampled_row_mass(q, k, sel_mean, rows, scale).mean(-1) >= 0.9 - 1e-6).all())


def test_dense_fallback_and_sinks() -> None:
    S, D = 400, 64
    g = torch.Generator().manual_seed(6)
    # near-uniform attention: no small set of columns holds the mass
    q = torch.randn(1, 2, S, D, generator=g) * 0.01
    k = torch.randn(1, 1, S, D, generator=g)
    sel = select_adaptive(q, k, alpha=0.95, window=0.05, sample_ratio=0.1, scale=D**-0.5)
    assert bool((sel.window == S).all()) and bool((sel.ncols == 0).all())
    assert torch.allclose(sel.density(), torch.ones(1, 2, dtype=torch.float64))

    q, k = _qk(1, 2, 1, S, D, seed=7)
    sel = select_adaptive(
        q, k, alpha=0.5, window=0.05, sample_ratio=0.1, scale=D**-0.5, config=RuleConfig(sink_tokens=3, dense_above=1.0)
    )
    for h in range(2):
        assert sel.cols[0, h, :3].tolist() == [0, 1, 2]


def test_candidate_windows() -> None:
    cfg = RuleConfig(window_levels=4, min_window_tokens=64)
    assert candidate_windows(0.08, 8192, cfg) == [656, 328, 164, 82]
    assert candidate_windows(0.08, 1000, cfg) == [80, 64]
    assert candidate_windows(0.01, 100, cfg) == [1]


def test_literal_rule() -> None:
    S, D = 500, 64
    q, k = _qk(1, 3, 1, S, D, seed=8)
    sel = select_literal(q, k, alpha=0.9, window=0.08, stride=20, scale=D**-0.5)
    _check_valid(sel, 1, 3, S)
    assert bool((sel.window == math.ceil(0.08 * S)).all())
