"""Index structures of SampleAttention: sampled rows, column selection, dense-mask expansion."""

from __future__ import annotations

import math

import pytest
import torch

from sacli.kernels import Selection, fraction_to_tokens, sample_rows, select_columns, selection_mask


# ---------------------------------------------------------------------------------------------
# sample_rows


@pytest.mark.parametrize("seq_len", [1, 63, 64, 97, 1025, 4097, 16384])
@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("block", [16, 64])
def test_sample_rows_properties(seq_len: int, ratio: float, block: int) -> None:
    rows = sample_rows(seq_len, ratio, block)
    expected = min(seq_len, math.ceil(math.ceil(ratio * seq_len) / block) * block)
    assert rows.dtype == torch.int64 and rows.dim() == 1
    assert rows.numel() == expected
    assert bool((rows[1:] > rows[:-1]).all()), "rows must be sorted and unique"
    assert int(rows[-1]) == seq_len - 1, "the tail row must be sampled"
    assert int(rows[0]) >= 0
    if expected == seq_len:
        assert torch.equal(rows, torch.arange(seq_len))
        return
    blocks = rows.view(-1, block)
    consecutive = torch.arange(block).expand_as(blocks)
    assert torch.equal(blocks - blocks[:, :1], consecutive), "blocks of consecutive rows"
    if blocks.shape[0] > 1:
        assert int(rows[0]) == 0, "blocks spread from the first row"
        gaps = blocks[1:, 0] - blocks[:-1, 0]
        # Evenly spread: start gaps differ by at most one row.
        assert int(gaps.max() - gaps.min()) <= 1
    assert torch.equal(rows, sample_rows(seq_len, ratio, block)), "deterministic"


def test_fraction_to_tokens_ignores_float_noise() -> None:
    assert 0.07 * 100 > 7  # the float noise this guards against
    assert fraction_to_tokens(0.07, 100) == 7
    assert fraction_to_tokens(0.05, 4097) == 205
    assert fraction_to_tokens(1e-9, 10) == 1
    assert fraction_to_tokens(1.0, 10) == 10


# ---------------------------------------------------------------------------------------------
# select_columns


def _select_loop(scores: torch.Tensor, window_mass: torch.Tensor, alpha: float, window_tokens: int):
    """Per-head Python reference: list of (window, sorted cols) per (b, h)."""
    B, H, S = scores.shape
    w = min(window_tokens, S)
    result = []
    for b in range(B):
        for h in range(H):
            s = scores[b, h].double().tolist()
            for j in range(S - w, S):
                s[j] = 0.0
            need = alpha - window_mass[b, h].double().mean().item()
            chosen: list[int] = []
            if need > 0:
                total = 0.0
                for j in sorted(range(S), key=lambda j: (-s[j], j)):
                    if s[j] <= 0:
                        break
                    chosen.append(j)
                    total += s[j]
                    if total >= need:
                        break
            result.append((w, sorted(chosen)))
    return result


def _check_against_loop(sel: Selection, expected, B: int, H: int, S: int, width: int | None = None) -> None:
    C = max((len(c) for _, c in expected), default=0) if width is None else width
    assert sel.seq_len == S
    assert sel.cols.shape == (B, H, C) and sel.cols.dtype == torch.int32
    assert sel.ncols.dtype == torch.int32 and sel.window.dtype == torch.int32
    cols = torch.full((B, H, C), S, dtype=torch.int32)
    ncols = torch.zeros(B, H, dtype=torch.int32)
    window = torch.zeros(B, H, dtype=torch.int32)
    for idx, (w, chosen) in enumerate(expected):
        b, h = divmod(idx, H)
        cols[b, h, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
        ncols[b, h] = len(chosen)
        window[b, h] = w
    assert torch.equal(sel.cols, cols)
    assert torch.equal(sel.ncols, ncols)
    assert torch.equal(sel.window, window)


@pytest.mark.parametrize("seq_len", [97, 1025])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("window_tokens", [1, 7, 200, 5000])
def test_select_columns_matches_loop_exactly(seq_len: int, alpha: float, window_tokens: int) -> None:
    # Dyadic scores and masses (k / 2^n) make every sum exact, so the comparison can be exact;
    # small integers give many ties and zeros.
    gen = torch.Generator().manual_seed(seq_len * 1000 + window_tokens + int(alpha * 100))
    B, H, R = 2, 3, 8
    scores = torch.randint(0, 8, (B, H, seq_len), generator=gen).float() / (8 * seq_len)
    scores[0, 1] = 0.0  # a head whose sampled rows put everything in the window
    window_mass = torch.randint(0, 64, (B, H, R), generator=gen).float() / 128
    expected = _select_loop(scores, window_mass, alpha, window_tokens)
    sel = select_columns(scores, window_mass, alpha, window_tokens, seq_len)
    _check_against_loop(sel, expected, B, H, seq_len)
    # the untrimmed layout (the default off the CPU): same columns, padding up to C = S
    full = select_columns(scores, window_mass, alpha, window_tokens, seq_len, trim=False)
    _check_against_loop(full, expected, B, H, seq_len, width=seq_len)


def test_select_columns_minimal_prefix_on_continuous_scores() -> None:
    gen = torch.Generator().manual_seed(7)
    B, H, S, R = 2, 4, 1025, 16
    scores = torch.rand(B, H, S, generator=gen) ** 4
    scores = scores / scores.sum(-1, keepdim=True) * 0.7
    window_mass = torch.full((B, H, R), 0.3) + 0.05 * torch.rand(B, H, R, generator=gen) - 0.025
    w = 32
    sel = select_columns(scores, window_mass, 0.9, w, S)
    need = 0.9 - window_mass.double().mean(-1)
    for b in range(B):
        for h in range(H):
            n = int(sel.ncols[b, h])
            chosen = sel.cols[b, h, :n].long()
            assert bool((sel.cols[b, h, n:] == S).all()), "padding holds S"
            assert bool((chosen[1:] > chosen[:-1]).all())
            s = scores[b, h].double()
            s[S - w :] = 0  # inside every row's band: never usable
            got = s[chosen]
            assert got.sum() >= need[b, h], "threshold reached"
            assert got.sum() - got.min() < need[b, h], "no column could be dropped"
            assert got.min() >= s[s.argsort(descending=True)[:n]].min(), "highest scores taken"


def test_select_columns_window_alone_reaches_alpha() -> None:
    scores = torch.rand(1, 2, 97)
    window_mass = torch.ones(1, 2, 4)
    sel = select_columns(scores, window_mass, 0.95, 10, 97)
    assert sel.cols.shape == (1, 2, 0)
    assert torch.equal(sel.ncols, torch.zeros(1, 2, dtype=torch.int32))
    assert torch.equal(sel.window, torch.full((1, 2), 10, dtype=torch.int32))


def test_select_columns_unreachable_alpha_takes_every_usable_column() -> None:
    S, w = 97, 10
    scores = torch.rand(1, 1, S) * 1e-4 + 1e-6
    sel = select_columns(scores, torch.zeros(1, 1, 4), 1.0, w, S)
    # Columns at or after S - w sit inside every row's band and are never taken.
    assert torch.equal(sel.cols[0, 0], torch.arange(S - w, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# Selection.density and selection_mask


def random_selection(B: int, H: int, S: int, gen: torch.Generator) -> Selection:
    """Random valid selection: windows from 1 to beyond S, column counts from 0 to S."""
    windows = []
    col_lists = []
    for idx in range(B * H):
        kind = idx % 5
        w = [1, S, S + 3, 1 + int(torch.randint(0, max(1, S // 4), (1,), generator=gen)), 2][kind]
        n = [0, S, int(torch.randint(0, S + 1, (1,), generator=gen))][idx % 3]
        cols = torch.randperm(S, generator=gen)[:n].sort().values
        windows.append(w)
        col_lists.append(cols)
    C = max(c.numel() for c in col_lists)
    cols = torch.full((B, H, C), S, dtype=torch.int32)
    for idx, c in enumerate(col_lists):
        cols.view(B * H, C)[idx, : c.numel()] = c.to(torch.int32)
    return Selection(
        window=torch.tensor(windows, dtype=torch.int32).view(B, H),
        cols=cols,
        ncols=torch.tensor([c.numel() for c in col_lists], dtype=torch.int32).view(B, H),
        seq_len=S,
    )


@pytest.mark.parametrize("seq_len", [1, 97, 1025])
def test_density_counts_equal_mask_counts(seq_len: int) -> None:
    gen = torch.Generator().manual_seed(seq_len)
    sel = random_selection(2, 5, seq_len, gen)
    mask = selection_mask(sel)
    counts = mask.sum((-1, -2))
    assert torch.equal(sel.kept_entries().to(torch.int64), counts)
    assert torch.equal(sel.kept_entries(), sel.kept_entries().round()), "counts are integers"
    causal = seq_len * (seq_len + 1) // 2
    assert torch.equal(sel.density(), counts.double() / causal)


def test_selection_mask_matches_definition() -> None:
    S = 97
    gen = torch.Generator().manual_seed(3)
    sel = random_selection(1, 5, S, gen)
    mask = selection_mask(sel)
    for h in range(5):
        w = int(sel.window[0, h])
        cols = set(sel.cols[0, h, : int(sel.ncols[0, h])].tolist())
        expected = torch.zeros(S, S, dtype=torch.bool)
        for i in range(S):
            for j in range(i + 1):
                expected[i, j] = (j > i - w) or (j in cols and j <= i - w)
        assert torch.equal(mask[0, h], expected)


# ---------------------------------------------------------------------------------------------
# Segmented selections: one column list per segment of query rows


def random_segmented_selection(B: int, H: int, S: int, segment: int, gen: torch.Generator) -> Selection:
    """Random valid segmented selection: every segment of every head its own columns (0 to S)."""
    base = random_selection(B, H, S, gen)
    N = -(-S // segment)
    lists = []
    for _ in range(B * H * N):
        n = int(torch.randint(0, S + 1, (1,), generator=gen))
        lists.append(torch.randperm(S, generator=gen)[:n].sort().values)
    C = max(c.numel() for c in lists)
    cols = torch.full((B * H * N, C), S, dtype=torch.int32)
    for idx, c in enumerate(lists):
        cols[idx, : c.numel()] = c.to(torch.int32)
    ncols = torch.tensor([c.numel() for c in lists], dtype=torch.int32)
    return Selection(window=base.window, cols=cols.view(B, H, N, C), ncols=ncols.view(B, H, N), seq_len=S,
                     segment=segment)


@pytest.mark.parametrize("seq_len,segment", [(97, 16), (130, 64), (64, 64), (5, 100)])
def test_segmented_density_counts_equal_mask_counts(seq_len: int, segment: int) -> None:
    gen = torch.Generator().manual_seed(seq_len + segment)
    sel = random_segmented_selection(2, 3, seq_len, segment, gen)
    counts = selection_mask(sel).sum((-1, -2))
    assert torch.equal(sel.kept_entries().to(torch.int64), counts)
    assert torch.equal(sel.kept_entries(), sel.kept_entries().round()), "counts are integers"


def test_segmented_mask_matches_definition() -> None:
    S, n = 61, 16
    gen = torch.Generator().manual_seed(5)
    sel = random_segmented_selection(1, 4, S, n, gen)
    mask = selection_mask(sel)
    for h in range(4):
        w = int(sel.window[0, h])
        expected = torch.zeros(S, S, dtype=torch.bool)
        for i in range(S):
            s = i // n
            cols = set(sel.cols[0, h, s, : int(sel.ncols[0, h, s])].tolist())
            for j in range(i + 1):
                expected[i, j] = (j > i - w) or (j in cols and j <= i - w)
        assert torch.equal(mask[0, h], expected)


def test_one_segment_equals_per_head_selection() -> None:
    """A segmented selection whose segment covers S keeps what the per-head one keeps."""
    S = 70
    sel = random_selection(2, 5, S, torch.Generator().manual_seed(1))
    seg = Selection(window=sel.window, cols=sel.cols[:, :, None], ncols=sel.ncols[:, :, None], seq_len=S, segment=S)
    assert seg.segments == 1
    assert torch.equal(selection_mask(seg), selection_mask(sel))
    assert torch.equal(seg.kept_entries(), sel.kept_entries())
    cols, ncols = sel.per_segment()
    assert cols.shape == (2, 5, 1, sel.cols.shape[-1]) and ncols.shape == (2, 5, 1)
