"""Fidelity metrics against brute-force float32 references on small inputs."""

from __future__ import annotations

import math

import pytest
import torch

from sacli.eval_metrics import (
    HeadSelection,
    head_fidelity,
    next_token_comparison,
    oracle_row_counts,
    selection_kept_entries,
    selection_row_mask,
)
from sacli.kernels.selection import Selection, selection_mask


def _dense_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    S = q.shape[0]
    logits = (q.double() @ k.double().T) * scale
    logits.masked_fill_(torch.ones(S, S, dtype=torch.bool).triu(1), -math.inf)
    return logits.softmax(-1)


def test_oracle_counts_known_rows() -> None:
    probs = torch.tensor([[0.2, 0.5, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    assert oracle_row_counts(probs, 0.8).tolist() == [2, 4, 1]
    assert oracle_row_counts(probs, 0.81).tolist() == [3, 4, 1]
    # the fully sorted fallback (top smaller than needed) gives the same counts
    assert oracle_row_counts(probs, 0.81, top=1).tolist() == [3, 4, 1]


@pytest.mark.parametrize("S", [97, 300])
def test_head_fidelity_matches_bruteforce(S: int) -> None:
    torch.manual_seed(S)
    D = 64
    q, k, v = torch.randn(S, D), torch.randn(S, D) * 2.0, torch.randn(S, D)
    scale = D**-0.5
    sels = [
        HeadSelection(7, torch.tensor([0, 3, S // 2, S - 1])),
        HeadSelection(S // 3, torch.tensor([], dtype=torch.int64)),
        HeadSelection(S, torch.tensor([1, 2])),  # dense head
    ]
    fids, oracle = head_fidelity(q, k, v, sels, scale=scale, oracle_alphas=(0.9, 0.5), row_chunk=40)
    P = _dense_probs(q, k, scale)
    dense = P @ v.double()
    for sel, fid in zip(sels, fids):
        M = selection_row_mask(sel, 0, S, S, torch.device("cpu"))
        kept = P * M
        mass = kept.sum(-1)
        out = (kept @ v.double()) / mass[:, None]
        err = float((out - dense).norm() / dense.norm())
        assert torch.allclose(fid.mass.double(), mass, atol=1e-5)
        assert fid.err == pytest.approx(err, abs=1e-5)
        assert fid.density == pytest.approx(float(M.sum()) / (S * (S + 1) / 2), abs=1e-12)
        assert selection_kept_entries(sel, S) == int(M.sum())
    assert fids[2].err == 0.0 and float(fids[2].mass.min()) == 1.0
    for a in (0.9, 0.5):
        srt = P.sort(-1, descending=True).values.cumsum(-1)
        want = ((srt < a).sum(-1) + 1).clamp(max=S)
        assert oracle[a] == pytest.approx(float(want.sum()) / (S * (S + 1) / 2), abs=1e-12)


def test_row_mask_equals_selection_mask() -> None:
    S, C = 97, 5
    torch.manual_seed(1)
    cols = torch.randperm(S)[:C].sort().values
    sel = Selection(
        window=torch.tensor([[9]], dtype=torch.int32),
        cols=cols.view(1, 1, C).to(torch.int32),
        ncols=torch.tensor([[C]], dtype=torch.int32),
        seq_len=S,
    )
    want = selection_mask(sel)[0, 0]
    got = selection_row_mask(HeadSelection(9, cols), 0, S, S, torch.device("cpu"))
    assert torch.equal(got, want)
    assert selection_kept_entries(HeadSelection(9, cols), S) == pytest.approx(float(sel.kept_entries()[0, 0]))


def test_next_token_comparison_identical_and_known() -> None:
    torch.manual_seed(2)
    logits = torch.randn(50, 11)
    targets = torch.randint(0, 11, (50,))
    same = next_token_comparison(logits, logits.clone(), targets)
    assert same.kl_mean == pytest.approx(0.0, abs=1e-6)
    assert same.top1_agreement == 1.0
    assert same.ppl_dense == pytest.approx(same.ppl_sparse)

    # uniform over V: perplexity V; KL(p || uniform) = log V - H(p)
    V = 4
    p = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    cmp = next_token_comparison(p.log(), torch.zeros(1, V), torch.tensor([0]))
    assert cmp.ppl_sparse == pytest.approx(V)
    assert cmp.ppl_dense == pytest.approx(1 / 0.7)
    entropy = -(p * p.log()).sum()
    assert cmp.kl_mean == pytest.approx(float(math.log(V) - entropy), rel=1e-5)
    # argmax of uniform logits is index 0, same as p's
    assert cmp.top1_agreement == 1.0
    flipped = next_token_comparison(p.log(), torch.tensor([[0.0, 1.0, 0.0, 0.0]]), torch.tensor([0]))
    assert flipped.top1_agreement == 0.0


@pytest.mark.parametrize("S,segment", [(97, 16), (300, 128)])
def test_head_fidelity_segmented_matches_selection_mask(S: int, segment: int) -> None:
    """A segmented head (its columns per segment of rows, padded with S): masses, error and
    density as the brute force over the Selection's own mask."""
    from test_selection import random_segmented_selection

    torch.manual_seed(S)
    D = 64
    q, k, v = torch.randn(S, D), torch.randn(S, D) * 2.0, torch.randn(S, D)
    scale = D**-0.5
    sel = random_segmented_selection(1, 3, S, segment, torch.Generator().manual_seed(S))
    masks = selection_mask(sel)[0]
    heads = [HeadSelection(int(sel.window[0, h]), sel.cols[0, h].to(torch.int64), segment) for h in range(3)]
    fids, _ = head_fidelity(q, k, v, heads, scale=scale, row_chunk=40)
    P = _dense_probs(q, k, scale)
    dense = P @ v.double()
    for h, (hs, fid) in enumerate(zip(heads, fids)):
        M = masks[h]
        assert torch.equal(selection_row_mask(hs, 0, S, S, torch.device("cpu")), M)
        kept = P * M
        mass = kept.sum(-1)
        out = (kept @ v.double()) / mass[:, None]
        assert torch.allclose(fid.mass.double(), mass, atol=1e-5)
        assert fid.err == pytest.approx(float((out - dense).norm() / dense.norm()), abs=1e-5)
        assert selection_kept_entries(hs, S) == int(M.sum()) == int(sel.kept_entries()[0, h])
        assert fid.density == pytest.approx(float(M.sum()) / (S * (S + 1) / 2), abs=1e-12)
