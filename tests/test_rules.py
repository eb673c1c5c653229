"""Selection rules produce valid Selections and keep the promises their docstrings make."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from sacli.kernels import column_scores, sample_rows, select_columns, selection_mask
from sacli.kernels.rules import (
    RuleConfig,
    SegmentConfig,
    candidate_windows,
    held_out_error,
    segment_rows_sampled,
    segment_windows,
    select_adaptive,
    select_literal,
    select_segments,
    window_statistics,
)
from sacli.kernels.selection import Selection

PAPER_LIKE = RuleConfig(
    window_up=0,
    window_levels=1, block=64, sink_tokens=0, value_weighted=False, error_ratio=None, alpha_levels=1, dense_above=1.0
)


def _qkv(B: int, Hq: int, Hkv: int, S: int, D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, k, v with attention-like structure: a few strong keys and a sink."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, S, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    heavy = torch.randint(0, S, (max(1, S // 50),), generator=g)
    k[:, :, heavy] *= 3.0
    k[:, :, :2] += q.mean(2).view(B, Hkv, Hq // Hkv, D).mean(2)[:, :, None] * 2
    v[:, :, :2] *= 0.05
    return q, k, v


def _check_valid(sel: Selection, B: int, H: int, S: int, segment: int = 0) -> None:
    """A valid Selection for (B, H) heads and length S; segment > 0: one list per segment."""
    lead = (B, H, -(-S // segment)) if segment else (B, H)
    assert sel.seq_len == S and sel.segment == segment and sel.segments == (lead[2] if segment else 1)
    assert sel.window.shape == (B, H) and sel.window.dtype == torch.int32
    assert sel.ncols.shape == lead and sel.ncols.dtype == torch.int32
    assert sel.cols.dim() == len(lead) + 1 and sel.cols.shape[:-1] == lead and sel.cols.dtype == torch.int32
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
    q, k, v = _qkv(2 if S < 500 else 1, Hq, Hkv, S, D, seed=S)
    B = q.shape[0]
    sel = select_adaptive(q, k, v, alpha=0.95, window=0.08, sample_ratio=0.1, scale=D**-0.5)
    _check_valid(sel, B, Hq, S)


def test_window_statistics_match_column_scores() -> None:
    S, D = 513, 64
    q, k, v = _qkv(1, 6, 2, S, D, seed=3)
    rows = sample_rows(S, 0.1)
    scale = D**-0.5
    scores, band = window_statistics(q, k, rows, [41, 7], scale)
    for t, w in enumerate([41, 7]):
        ref_scores, ref_mass = column_scores(q, k, rows, w, scale)
        assert torch.allclose(scores[:, :, t], ref_scores, atol=1e-6)
        assert torch.allclose(band[:, :, t], ref_mass, atol=1e-5)
    # value weighting: p * |v| renormalized per row (brute force)
    scores_v, band_v = window_statistics(q, k, rows, [41], scale, v=v)
    kk, vv = k.repeat_interleave(3, 1).double(), v.repeat_interleave(3, 1).double()
    logits = (q.double() @ kk.transpose(-1, -2)) * scale
    logits.masked_fill_(torch.ones(S, S, dtype=torch.bool).triu(1), -math.inf)
    p = logits.softmax(-1)[:, :, rows] * vv.norm(dim=-1)[:, :, None, :]
    p = p / p.sum(-1, keepdim=True)
    far = (rows[:, None] - torch.arange(S)[None, :]) >= 41
    assert torch.allclose(scores_v[:, :, 0].double(), (p * far).mean(2), atol=1e-6)
    assert torch.allclose(band_v[:, :, 0].double(), (p * ~far).sum(-1), atol=1e-5)


def test_paper_like_config_equals_select_columns() -> None:
    S, D = 1025, 64
    q, k, v = _qkv(1, 6, 2, S, D, seed=4)
    scale = D**-0.5
    rows = sample_rows(S, 0.05)
    w = math.ceil(0.08 * S)
    ref = select_columns(*column_scores(q, k, rows, w, scale), 0.9, w, S)
    got = select_adaptive(q, k, v, alpha=0.9, window=0.08, sample_ratio=0.05, scale=scale, config=PAPER_LIKE)
    assert torch.equal(got.window, ref.window)
    assert torch.equal(got.ncols, ref.ncols)
    assert torch.equal(got.cols, ref.cols)


def _dense_out_err(q, k, v, sel: Selection, rows: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hq) squared error and squared norm of the rows' outputs under sel (float64 brute force)."""
    B, Hq, S, _ = q.shape
    G = Hq // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1).double(), v.repeat_interleave(G, 1).double()
    logits = (q.double() @ kk.transpose(-1, -2)) * scale
    logits.masked_fill_(torch.ones(S, S, dtype=torch.bool).triu(1), -math.inf)
    dense = logits.softmax(-1) @ vv
    sparse = logits.masked_fill(~selection_mask(sel), -math.inf).softmax(-1) @ vv
    return (sparse - dense)[:, :, rows].square().sum((-1, -2)), dense[:, :, rows].square().sum((-1, -2))


def test_held_out_error_matches_bruteforce() -> None:
    S, D = 300, 64
    q, k, v = _qkv(1, 4, 2, S, D, seed=5)
    scale = D**-0.5
    g = torch.Generator().manual_seed(9)
    marks = torch.rand(1, 4, S, generator=g) < 0.2
    window = torch.tensor([[5, 17, 40, 300]])
    cols = [marks[0, h].nonzero()[:, 0] for h in range(4)]
    C = max(c.numel() for c in cols)
    sel = Selection(
        window=window.to(torch.int32),
        cols=torch.stack([torch.cat((c, torch.full((C - c.numel(),), S))) for c in cols])[None].to(torch.int32),
        ncols=torch.tensor([[c.numel() for c in cols]], dtype=torch.int32),
        seq_len=S,
    )
    rows = sample_rows(S, 0.2, 16)
    err2, out2 = held_out_error(q, k, v, rows, window, marks, scale)
    ref_err2, ref_out2 = _dense_out_err(q, k, v, sel, rows, scale)
    assert torch.allclose(err2, ref_err2, rtol=1e-4, atol=1e-6)
    assert torch.allclose(out2, ref_out2, rtol=1e-5)
    assert float(err2[0, 3]) == pytest.approx(0.0, abs=1e-8)  # window = S: dense


def test_held_out_check_bounds_sampled_error() -> None:
    S, D = 1025, 64
    q, k, v = _qkv(1, 6, 2, S, D, seed=6)
    scale = D**-0.5
    cfg = RuleConfig(error_ratio=0.5, dense_above=1.0)
    sel = select_adaptive(q, k, v, alpha=0.9, window=0.1, sample_ratio=0.1, scale=scale, config=cfg)
    _check_valid(sel, 1, 6, S)
    # the check ran on halves of the sample; the final selection (chosen on all of it) must do
    # at least about as well on the sampled rows themselves
    rows = sample_rows(S, 0.1, cfg.block)
    err2, out2 = _dense_out_err(q, k, v, sel, rows, scale)
    assert bool(((err2 / out2).sqrt() <= 0.05 * 1.5).all()), (err2 / out2).sqrt()


def test_dense_fallback_and_sinks() -> None:
    S, D = 400, 64
    g = torch.Generator().manual_seed(6)
    # near-uniform attention: no small set of columns holds the mass
    q = torch.randn(1, 2, S, D, generator=g) * 0.01
    k = torch.randn(1, 1, S, D, generator=g)
    v = torch.randn(1, 1, S, D, generator=g)
    sel = select_adaptive(q, k, v, alpha=0.95, window=0.05, sample_ratio=0.1, scale=D**-0.5)
    assert bool((sel.window == S).all()) and bool((sel.ncols == 0).all())
    assert torch.allclose(sel.density(), torch.ones(1, 2, dtype=torch.float64))

    q, k, v = _qkv(1, 2, 1, S, D, seed=7)
    sel = select_adaptive(
        q, k, v, alpha=0.5, window=0.05, sample_ratio=0.1, scale=D**-0.5,
        config=RuleConfig(sink_tokens=3, dense_above=1.0, error_ratio=None),
    )
    for h in range(2):
        assert sel.cols[0, h, :3].tolist() == [0, 1, 2]


def test_candidate_windows() -> None:
    cfg = RuleConfig(window_up=0, window_levels=4, min_window_tokens=64)
    assert candidate_windows(0.08, 8192, cfg) == [656, 328, 164, 82]
    assert candidate_windows(0.08, 1000, cfg) == [80, 64]
    assert candidate_windows(0.01, 100, cfg) == [1]
    up = RuleConfig(window_up=2, window_levels=7, min_window_tokens=64)
    assert candidate_windows(0.05, 8192, up) == [1640, 820, 410, 205, 103, 64]
    assert candidate_windows(0.5, 100, up) == [100, 50]


def test_literal_rule() -> None:
    S, D = 500, 64
    q, k, _ = _qkv(1, 3, 1, S, D, seed=8)
    sel = select_literal(q, k, alpha=0.9, window=0.08, stride=20, scale=D**-0.5)
    _check_valid(sel, 1, 3, S)
    assert bool((sel.window == math.ceil(0.08 * S)).all())


# ---------------------------------------------------------------------------------------------
# select_segments: columns per segment of query rows


@pytest.mark.parametrize("S, D, Hq, Hkv, segment", [(97, 64, 3, 1, 32), (1025, 64, 6, 2, 128), (600, 128, 4, 1, 64),
                                                     (40, 64, 2, 2, 64)])
def test_segments_selection_is_valid(S: int, D: int, Hq: int, Hkv: int, segment: int) -> None:
    q, k, v = _qkv(2 if S < 500 else 1, Hq, Hkv, S, D, seed=S)
    B = q.shape[0]
    cfg = SegmentConfig(segment=segment)
    sel = select_segments(q, k, v, alpha=0.95, window=0.08, sample_ratio=0.1, scale=D**-0.5, config=cfg)
    _check_valid(sel, B, Hq, S, segment)


def test_segments_reach_alpha_on_sampled_rows() -> None:
    """Without halo, value weights or sinks, every segment's sampled rows keep at least alpha of
    their attention (band plus the segment's columns) on average, with the head's window."""
    S, D, n, alpha = 512, 64, 64, 0.9
    q, k, v = _qkv(1, 2, 1, S, D, seed=11)
    cfg = SegmentConfig(segment=n, halo=0.0, sink_tokens=0, value_weighted=False, dense_above=1.0)
    sel = select_segments(q, k, v, alpha=alpha, window=0.05, sample_ratio=0.125, scale=D**-0.5, config=cfg)
    rps = segment_rows_sampled(0.125, n)
    stride = n // rps
    mask = selection_mask(sel)[0]
    for h in range(2):
        logits = (q[0, h] @ k[0, 0].T) * D**-0.5
        p = torch.softmax(logits.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), -math.inf), -1)
        for seg in range(S // n):
            rows = seg * n + torch.arange(rps) * stride + stride - 1
            kept = (p[rows] * mask[h, rows]).sum(-1).mean()
            assert float(kept) >= alpha - 1e-6, (h, seg, float(kept))


def _two_halves(S: int, D: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (1, 1, S, D) whose first half of queries reads key 10 and second half key 20."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 1, S, D, generator=g) * 0.1
    v = torch.randn(1, 1, S, D, generator=g)
    a, b = torch.zeros(D), torch.zeros(D)
    a[0], b[1] = 1.0, 1.0
    k[0, 0, 10] = a * 40
    k[0, 0, 20] = b * 40
    q = torch.randn(1, 1, S, D, generator=g) * 0.1
    q[0, 0, : S // 2] += a * 4
    q[0, 0, S // 2 :] += b * 4
    return q, k, v


def test_segments_adapt_along_the_sequence() -> None:
    """Two halves whose queries read different far keys get different columns: each segment
    keeps its own key and not the other half's."""
    S, n = 512, 128
    q, k, v = _two_halves(S, 64)
    cfg = SegmentConfig(segment=n, sink_tokens=0, halo=0.0, min_window_tokens=16, window_up=1)
    sel = select_segments(q, k, v, alpha=0.9, window=0.03, sample_ratio=0.0625, scale=1.0, config=cfg)
    cols = [set(sel.cols[0, 0, s, : int(sel.ncols[0, 0, s])].tolist()) for s in range(S // n)]
    assert 10 in cols[0] and 10 in cols[1] and 20 not in cols[0] and 20 not in cols[1]
    assert 20 in cols[2] and 20 in cols[3] and 10 not in cols[2] and 10 not in cols[3]


def test_segments_dense_fallback_and_sinks() -> None:
    S, D = 400, 64
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, S, D, generator=g) * 0.01
    k = torch.randn(1, 1, S, D, generator=g)
    v = torch.randn(1, 1, S, D, generator=g)
    sel = select_segments(q, k, v, alpha=0.95, window=0.05, sample_ratio=0.1, scale=D**-0.5,
                          config=SegmentConfig(segment=64))
    assert bool((sel.window == S).all()) and bool((sel.ncols == 0).all())
    assert torch.allclose(sel.density(), torch.ones(1, 2, dtype=torch.float64))

    q, k, v = _qkv(1, 2, 1, S, D, seed=7)
    sel = select_segments(q, k, v, alpha=0.5, window=0.05, sample_ratio=0.1, scale=D**-0.5,
                          config=SegmentConfig(segment=64, sink_tokens=3, dense_above=1.0))
    for h in range(2):
        w = int(sel.window[0, h])
        for s in range(sel.segments):
            if min(S, (s + 1) * 64) - 1 - w >= 2:  # the segment's last row sees the sinks as columns
                assert sel.cols[0, h, s, :3].tolist() == [0, 1, 2], (h, s)


def test_segment_sampling_and_windows() -> None:
    assert segment_rows_sampled(0.05, 128) == 8
    assert segment_rows_sampled(0.125, 128) == 16
    assert segment_rows_sampled(1.0, 128) == 128
    assert segment_rows_sampled(0.05, 96) == 8
    assert segment_rows_sampled(0.05, 40) == 2
    cfg = SegmentConfig(min_window_tokens=16, window_up=4)
    assert segment_windows(0.05, 8192, cfg) == [16, 32, 64, 128, 256, 512, 1024]
    assert segment_windows(0.05, 100, cfg) == [16]
    assert segment_windows(0.5, 10, cfg) == [10]


def _copy_head(S: int, D: int = 64, seed: int = 9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(1, 1, S, D) q, k, v of a copy head: every query reads its own far key (unit keys, each
    query 30x the key it reads, scale 1)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 1, S, D, generator=g)
    k = k / k.norm(dim=-1, keepdim=True)
    v = torch.randn(1, 1, S, D, generator=g)
    target = torch.randint(0, 32, (S,), generator=g) + (torch.arange(S) // 2).clamp(min=0)
    target = torch.minimum(target, torch.arange(S))
    return k[0, 0, target][None, None] * 30.0, k, v


def test_segments_held_out_check_runs_unselectable_heads_dense() -> None:
    """A head whose every query reads its own far key (a copy head): the sampled rows' columns
    miss the other rows' keys, the held-out rows show it, and the head runs dense; without the
    check it keeps its few columns."""
    S = 512
    q, k, v = _copy_head(S)
    kw = dict(alpha=0.95, window=0.02, sample_ratio=0.0625, scale=1.0)
    checked = select_segments(q, k, v, **kw, config=SegmentConfig(segment=64, dense_above=1.0, exact_fallback=False))
    unchecked = select_segments(q, k, v, **kw, config=SegmentConfig(segment=64, dense_above=1.0, max_error=None,
                                                                      exact_fallback=False))
    assert int(checked.window[0, 0]) == S and int(checked.ncols.sum()) == 0
    assert int(unchecked.window[0, 0]) < S and float(unchecked.density()) < 0.5


@pytest.mark.parametrize("sampled_levels", [None, 1])
def test_segments_exact_fallback_selects_copy_heads_sparsely(sampled_levels: int | None) -> None:
    """The copy head above, with exact_fallback (the default): ranked again from every row's
    attention, it keeps few entries instead of running dense, and its output over every row
    stays within the check's bound."""
    S = 512
    q, k, v = _copy_head(S)
    cfg = SegmentConfig(segment=64, dense_above=1.0, exact_fallback=True, sampled_levels=sampled_levels)
    sel = select_segments(q, k, v, alpha=0.95, window=0.02, sample_ratio=0.0625, scale=1.0, config=cfg)
    _check_valid(sel, 1, 1, S, 64)
    assert int(sel.window[0, 0]) < S and float(sel.density()) < 0.5
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    logits = q[0, 0] @ k[0, 0].T
    dense = torch.softmax(logits.masked_fill(~causal, -math.inf), -1) @ v[0, 0]
    sparse = torch.softmax(logits.masked_fill(~selection_mask(sel)[0, 0], -math.inf), -1) @ v[0, 0]
    assert float((sparse - dense).norm() / dense.norm()) <= cfg.max_error



@pytest.mark.parametrize("sample_ratio, rows, borrowed", [(0.0625, 8, True), (0.5, 64, False)])
def test_segments_default_halo_counts_neighbours_as_halo_rows(sample_ratio: float, rows: int, borrowed: bool) -> None:
    """halo None weighs each neighbouring segment as halo_rows of the segment's own sampled rows:
    with 8 rows sampled (weight 0.5) the segments next to the halves' border also keep the other
    half's key; with 64 (weight 1/16) they keep only their own."""
    S, n = 512, 128
    q, k, v = _two_halves(S, 64)
    base = SegmentConfig(segment=n, sink_tokens=0, min_window_tokens=16, window_up=1, max_error=None)
    assert segment_rows_sampled(sample_ratio, n) == rows
    kw = {"alpha": 0.9, "window": 0.03, "sample_ratio": sample_ratio, "scale": 1.0}
    auto = select_segments(q, k, v, **kw, config=replace(base, halo=None, halo_rows=4.0))
    fixed = select_segments(q, k, v, **kw, config=replace(base, halo=4.0 / rows))
    for f in ("window", "cols", "ncols"):
        assert torch.equal(getattr(auto, f), getattr(fixed, f))
    cols = [set(auto.cols[0, 0, s, : int(auto.ncols[0, 0, s])].tolist()) for s in range(S // n)]
    assert cols[0] == {10} and cols[3] == {20}
    assert (20 in cols[1] and 10 in cols[2]) is borrowed
