"""Selection rules: from the attention of sampled query rows to a per-head Selection.

The rule of the paper (`selection.select_columns`) gives every head one window and keeps the
fewest key columns whose mean sampled score reaches alpha. `select_adaptive` keeps the knobs'
meaning (alpha: share of the sampled queries' attention the kept entries must reach; window: the
local window as a fraction of S, around which each head picks its own; sample_ratio: share of
query rows sampled) and adapts to each head and input:

- value-weighted attention: a key's attention is weighed by the norm of its value vector, i.e.
  by what it adds to the output. "Sink" keys (the first token, punctuation) take most of the
  probability of many heads but carry near-zero values; alpha then applies to the attention that
  actually forms the output instead of being met by the sink alone;
- window per head: each candidate window (4 x window, 2 x window, window, window / 2, ... down to
  `min_window_tokens`) gets its own residual column scores (the attention its band leaves) and
  the head takes the candidate that keeps the fewest entries;
- sampled rows in short blocks (`block` rows) spread evenly over the sequence, tail included:
  more, smaller blocks see more of the sequence's distinct contexts for the same sample_ratio;
- sink columns: the first `sink_tokens` keys are always kept;
- alpha per head, checked on held-out rows: the sampled blocks are split in two interleaved
  halves; columns chosen on one half are applied to the other, and the exact output error of
  those held-out rows is measured. A head whose held-out relative error exceeds
  `error_ratio` * (1 - alpha) (5% at alpha 0.95) retries with
  a stricter alpha (1 - (1 - alpha) / 2, / 4, ...); a head that fails at every level, or whose
  selection keeps more than `dense_above` of the causal entries, is computed exactly
  (window = S): the sample has shown it unselectable (typically heads whose queries each attend
  to their own far keys, which no column choice covers).

Plain PyTorch, float32, chunked over sampled rows so memory stays O(rows chunk x S) per KV head.
All inputs are ones `api.sample_attention` already holds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .selection import Selection, fraction_to_tokens, sample_rows

# Upper bound on the float32 elements one chunk of sampled-row probabilities holds (128 MiB).
_CHUNK_ELEMS = 1 << 25


@dataclass(frozen=True)
class RuleConfig:
    """Tuning of `select_adaptive` (defaults chosen from the measured trade-off; docs/FIDELITY.md)."""

    # candidate windows: window * 2**(window_up - i) for i < window_levels (capped at S), none
    # below min_window_tokens: with window 0.05, 20% 10% 5% 2.5% ... 0.3% of S
    window_up: int = 2
    window_levels: int = 7
    min_window_tokens: int = 64
    # rows per sampled block
    block: int = 16
    # keys always kept at the start of the sequence
    sink_tokens: int = 4
    # weigh attention by value norms (False: plain attention probabilities, as the paper)
    value_weighted: bool = True
    # held-out output error a head's selection may show, as a multiple of 1 - alpha (alpha 0.95
    # and 1.0: 5% relative error); None skips the check
    error_ratio: float | None = 1.0
    # alphas tried per head: 1 - (1 - alpha) / 2**i for i < alpha_levels
    alpha_levels: int = 3
    # heads whose selection keeps more than this share of the causal entries run dense
    dense_above: float = 0.6


DEFAULT_RULE = RuleConfig()


def candidate_windows(window: float, seq_len: int, config: RuleConfig) -> list[int]:
    """Candidate window sizes in tokens, largest first, unique, each in [1, S]."""
    base = fraction_to_tokens(window, seq_len)
    out: list[int] = []
    for i in range(max(1, config.window_levels)):
        e = config.window_up - i
        w = min(seq_len, base * 2**e) if e >= 0 else math.ceil(base / 2**-e)
        w = max(w, min(base, config.min_window_tokens))
        if w not in out:
            out.append(w)
    return out


def _row_probs(qh: torch.Tensor, kf: torch.Tensor, r: torch.Tensor, scale: float) -> torch.Tensor:
    """(G, rc, n) float32 causal softmax of rows r (sorted) over keys 0..n-1, n = r[-1] + 1."""
    n = int(r[-1]) + 1
    logits = torch.matmul(qh[:, r].float(), kf[:n].T) * scale
    j = torch.arange(n, device=kf.device)
    logits.masked_fill_(j[None, :] > r[:, None], float("-inf"))
    return torch.softmax(logits, dim=-1)


def _weigh(p: torch.Tensor, vnorm: torch.Tensor | None) -> torch.Tensor:
    """Attention times value norms, renormalized per row (p itself when vnorm is None)."""
    if vnorm is None:
        return p
    w = p * vnorm[: p.shape[-1]]
    return w.div_(w.sum(-1, keepdim=True).clamp_min(1e-30))


def window_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    windows: list[int],
    scale: float,
    *,
    v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual column scores and band masses of sampled rows for several windows at once.

    q: (B, Hq, S, D); k: (B, Hkv, S, D); rows: (R,) int64 sorted unique; windows: K sizes >= 1.
    v: (B, Hkv, S, D) to weigh attention by value norms (None: plain attention).
    Returns float32 on q's device, with p_r row r's (weighted) attention, summing to 1:
      scores: (B, Hq, K, S), mean over rows r of p_r[j] * [j <= r - windows[t]]
      band:   (B, Hq, K, R), sum of p_r over r's band (r - windows[t], r]
    (for one window and v None these equal `column_scores`).
    """
    B, Hq, S, _ = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    rows = rows.to(device=q.device, dtype=torch.int64)
    R = rows.numel()
    K = len(windows)
    scores = torch.zeros(B, Hq, K, S, dtype=torch.float32, device=q.device)
    band = torch.empty(B, Hq, K, R, dtype=torch.float32, device=q.device)
    chunk = max(1, _CHUNK_ELEMS // (G * S))
    for b in range(B):
        for g in range(Hkv):
            heads = slice(g * G, (g + 1) * G)
            kf = k[b, g].float()
            vnorm = None if v is None else v[b, g].float().norm(dim=-1)
            for c0 in range(0, R, chunk):
                r = rows[c0 : c0 + chunk]
                p = _weigh(_row_probs(q[b, heads], kf, r, scale), vnorm)
                dist = r[:, None] - torch.arange(p.shape[-1], device=q.device)[None, :]
                for t, w in enumerate(windows):
                    far = p * (dist >= w)
                    scores[b, heads, t, : p.shape[-1]] += far.sum(1)
                    # each row sums to 1, so its band holds whatever lies past it
                    band[b, heads, t, c0 : c0 + r.numel()] = 1.0 - far.sum(-1)
    return scores.div_(R), band


def _rank(score: torch.Tensor, w: torch.Tensor, S: int, sinks: int) -> torch.Tensor:
    """(B, Hq, S) column order, best first: sinks, then by score; columns no row can use
    (j > S - 1 - w, inside every band) last. w: (B, Hq) int64."""
    j = torch.arange(S, device=score.device)
    value = score.to(torch.float64).clone()
    value.masked_fill_(j > (S - 1 - w)[..., None], -1.0)
    value[..., :sinks] = math.inf
    return torch.sort(value, dim=-1, descending=True, stable=True).indices


def _count(score: torch.Tensor, ranked: torch.Tensor, need: torch.Tensor, limit: torch.Tensor, sinks: int) -> torch.Tensor:
    """(B, Hq) fewest leading ranked columns whose scores sum to `need` (all usable if never),
    at least the sinks."""
    csum = score.to(torch.float64).gather(-1, ranked).cumsum(-1)
    count = torch.searchsorted(csum, need[..., None].to(torch.float64).contiguous(), side="left")[..., 0] + 1
    count = torch.where(need <= 0, torch.zeros_like(count), count)
    return torch.maximum(count.minimum(limit), limit.clamp(max=sinks))


def _kept_entries(ranked: torch.Tensor, count: torch.Tensor, w: torch.Tensor, S: int) -> torch.Tensor:
    """(B, Hq) float64 causal entries of a band of w tokens plus the first `count` ranked columns."""
    wf = w.to(torch.float64)
    rows_using = (S - ranked.to(torch.float64) - wf[..., None]).clamp(min=0)
    csum = torch.cat((torch.zeros_like(rows_using[..., :1]), rows_using.cumsum(-1)), dim=-1)
    cols = csum.gather(-1, count[..., None].to(torch.int64))[..., 0]
    return wf * S - wf * (wf - 1) / 2 + cols


def _pick(scores: torch.Tensor, band_mean: torch.Tensor, wins: list[int], alpha: float, S: int, sinks: int):
    """Per head, the window whose residual columns reach alpha with the fewest kept entries.

    scores: (B, Hq, K, S); band_mean: (B, Hq, K). Returns (window (B, Hq) int64, window index,
    ranked columns (B, Hq, S), count (B, Hq), kept entries (B, Hq) float64).
    """
    B, H = scores.shape[:2]
    dev = scores.device
    best = None
    for t, w in enumerate(wins):
        wt = torch.full((B, H), w, dtype=torch.int64, device=dev)
        ranked = _rank(scores[:, :, t], wt, S, sinks)
        limit = (S - wt).clamp(min=0)
        count = _count(scores[:, :, t], ranked, alpha - band_mean[:, :, t].to(torch.float64), limit, sinks)
        cost = _kept_entries(ranked, count, wt, S)
        if best is None:
            best = [wt, torch.zeros_like(wt), ranked, count, cost]
            continue
        better = cost < best[4]
        best[0] = torch.where(better, wt, best[0])
        best[1] = torch.where(better, torch.full_like(wt, t), best[1])
        best[2] = torch.where(better[..., None], ranked, best[2])
        best[3] = torch.where(better, count, best[3])
        best[4] = torch.where(better, cost, best[4])
    assert best is not None
    return tuple(best)


def _marks(ranked: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(B, Hq, S) bool: the first `count` ranked columns."""
    S = ranked.shape[-1]
    taken = torch.arange(S, device=ranked.device) < count[..., None]
    return torch.zeros_like(taken).scatter_(-1, ranked, taken)


def held_out_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    window: torch.Tensor,
    marks: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared output error of rows under a selection, and the squared dense output.

    q: (B, Hq, S, D); k, v: (B, Hkv, S, D); rows: (R,) sorted unique; window: (B, Hq) int64;
    marks: (B, Hq, S) bool selected columns. Returns (err2, out2), each (B, Hq) float64:
    sum over rows of ||O_sparse - O_dense||^2 and ||O_dense||^2 (plain attention, float32 math).
    """
    B, Hq, S, _ = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    rows = rows.to(device=q.device, dtype=torch.int64)
    err2 = torch.zeros(B, Hq, dtype=torch.float64, device=q.device)
    out2 = torch.zeros(B, Hq, dtype=torch.float64, device=q.device)
    chunk = max(1, _CHUNK_ELEMS // (2 * G * S))
    for b in range(B):
        for g in range(Hkv):
            heads = slice(g * G, (g + 1) * G)
            kf, vf = k[b, g].float(), v[b, g].float()
            w = window[b, heads][:, None, None]
            for c0 in range(0, rows.numel(), chunk):
                r = rows[c0 : c0 + chunk]
                p = _row_probs(q[b, heads], kf, r, scale)  # (G, rc, n)
                n = p.shape[-1]
                dense = p @ vf[:n]
                dist = r[:, None] - torch.arange(n, device=q.device)[None, :]
                keep = p * ((dist[None] < w) | marks[b, heads, None, :n])
                sparse = (keep @ vf[:n]) / keep.sum(-1, keepdim=True).clamp_min(1e-30)
                err2[b, heads] += (sparse - dense).square().sum((-1, -2)).double()
                out2[b, heads] += dense.square().sum((-1, -2)).double()
    return err2, out2


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, alpha: float) -> tuple[int, int, int]:
    """Assert a rule's inputs (q (B, Hq, S, D), k and v (B, Hkv, S, D), alpha in [0, 1]); (B, Hq, S)."""
    assert q.dim() == 4 and k.dim() == 4 and v.shape == k.shape, (
        f"q (B, Hq, S, D), k and v (B, Hkv, S, D) expected; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    )
    B, Hq, S, _ = q.shape
    assert k.shape[0] == B and k.shape[2] == S and Hq % k.shape[1] == 0, (
        f"k {tuple(k.shape)} does not match q {tuple(q.shape)}"
    )
    assert 0.0 <= alpha <= 1.0, f"alpha must be in [0, 1], got {alpha}"
    return B, Hq, S


def select_adaptive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    alpha: float,
    window: float,
    sample_ratio: float,
    scale: float,
    config: RuleConfig = DEFAULT_RULE,
) -> Selection:
    """Per-head window, columns and alpha from the exact attention of sampled query rows.

    q: (B, Hq, S, D); k, v: (B, Hkv, S, D); any float dtype, same device, Hq % Hkv == 0.
    alpha, window, sample_ratio, scale: the SampleAttention knobs (see module docstring).
    Returns a Selection (window (B, Hq) int32 per head, cols ascending padded with S); heads
    computed exactly have window = S and no columns.
    """
    B, Hq, S = _check_inputs(q, k, v, alpha)
    dev = q.device
    rows = sample_rows(S, sample_ratio, config.block, device=dev)
    R = rows.numel()
    wins = candidate_windows(window, S, config)
    sinks = min(config.sink_tokens, S)
    vw = v if config.value_weighted else None

    # two interleaved halves of the sampled blocks; the whole sample is their row-weighted mean
    half = (torch.arange(R, device=dev) // config.block) % 2
    check = config.error_ratio is not None and bool(half.any()) and not bool(half.all())
    if check:
        parts = [rows[half == f] for f in (0, 1)]
        stats = [window_statistics(q, k, r, wins, scale, v=vw) for r in parts]
        scores = sum(s * r.numel() for (s, _), r in zip(stats, parts)) / R
        band_mean = sum(bm.sum(-1) for _, bm in stats) / R
    else:
        scores, band = window_statistics(q, k, rows, wins, scale, v=vw)
        band_mean = band.mean(-1)

    out_w = torch.full((B, Hq), S, dtype=torch.int64, device=dev)
    out_rank = torch.zeros(B, Hq, S, dtype=torch.int64, device=dev)
    out_count = torch.zeros(B, Hq, dtype=torch.int64, device=dev)
    open_ = torch.ones(B, Hq, dtype=torch.bool, device=dev)
    levels = [1.0 - (1.0 - alpha) / 2**i for i in range(max(1, config.alpha_levels))]
    causal = S * (S + 1) / 2
    for a in levels:
        w, t, ranked, count, cost = _pick(scores, band_mean, wins, a, S, sinks)
        ok = cost / causal <= config.dense_above
        if check:
            # choose on one half with the head's window, measure the output error on the other
            err2 = torch.zeros(B, Hq, dtype=torch.float64, device=dev)
            out2 = torch.zeros_like(err2)
            for f in (0, 1):
                fs = stats[f][0].gather(2, t[:, :, None, None].expand(-1, -1, 1, S))[:, :, 0]
                fb = stats[f][1].mean(-1).gather(2, t[..., None])[..., 0]
                franked = _rank(fs, w, S, sinks)
                fcount = _count(fs, franked, a - fb.to(torch.float64), (S - w).clamp(min=0), sinks)
                e, o = held_out_error(q, k, v, parts[1 - f], w, _marks(franked, fcount), scale)
                err2 += e
                out2 += o
            ok &= (err2 / out2.clamp_min(1e-30)).sqrt() <= config.error_ratio * (1.0 - alpha)
        take = open_ & ok
        out_w = torch.where(take, w, out_w)
        out_rank = torch.where(take[..., None], ranked, out_rank)
        out_count = torch.where(take, count, out_count)
        open_ &= ~take
        if not bool(open_.any()):
            break

    C = int(out_count.max()) if out_count.numel() else 0
    taken = out_rank[..., :C]
    valid = torch.arange(C, device=dev) < out_count[..., None]
    cols = torch.where(valid, taken, torch.full_like(taken, S)).sort(-1).values
    return Selection(
        window=out_w.clamp(max=S).to(torch.int32), cols=cols.to(torch.int32), ncols=out_count.to(torch.int32), seq_len=S
    )


def select_literal(
    q: torch.Tensor, k: torch.Tensor, *, alpha: float, window: float, stride: int, scale: float
) -> Selection:
    """The paper's first rule, for comparison: one window of ceil(window * S) tokens for every head,
    every `stride`-th query row sampled (the last row included), columns ranked by their summed
    sampled attention over all causal entries (band included) and kept until alpha of the total.

    q: (B, Hq, S, D); k: (B, Hkv, S, D). Returns a Selection (cols ascending, padded with S).
    """
    B, Hq, S, _ = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    dev = q.device
    rows = torch.arange(S - 1, -1, -stride, device=dev).flip(0)
    total = torch.zeros(B, Hq, S, dtype=torch.float32, device=dev)
    chunk = max(1, _CHUNK_ELEMS // (G * S))
    for b in range(B):
        for g in range(Hkv):
            heads = slice(g * G, (g + 1) * G)
            kf = k[b, g].float()
            for c0 in range(0, rows.numel(), chunk):
                r = rows[c0 : c0 + chunk]
                p = _row_probs(q[b, heads], kf, r, scale)
                total[b, heads, : p.shape[-1]] += p.sum(1)
    w = fraction_to_tokens(window, S)
    ranked, order = torch.sort(total.to(torch.float64), dim=-1, descending=True, stable=True)
    csum = ranked.cumsum(-1)
    count = ((csum < alpha * csum[..., -1:]).sum(-1) + 1).clamp(max=S)
    C = int(count.max())
    taken = order[..., :C]
    valid = torch.arange(C, device=dev) < count[..., None]
    cols = torch.where(valid, taken, torch.full_like(taken, S)).sort(-1).values
    return Selection(
        window=torch.full((B, Hq), w, dtype=torch.int32, device=dev),
        cols=cols.to(torch.int32),
        ncols=count.to(torch.int32),
        seq_len=S,
    )


@dataclass(frozen=True)
class SegmentConfig:
    """Tuning of `select_segments` (defaults chosen from the measured trade-off; docs/FIDELITY.md)."""

    # query rows per column list: a multiple of the sparse kernel's 128-row programs
    segment: int = 128
    # weight of each neighbouring segment's sampled rows in a segment's column scores (0: none).
    # None: halo_rows / (rows sampled per segment), i.e. a neighbour's mean counts as halo_rows
    # of the segment's own rows, so a larger sample leans less on its neighbours (0.5 at the
    # default 8 rows, 0.06 at 64; at sample ratio 0.5 a fixed 0.5 was 0.5-1 point denser at
    # equal error than none, docs/FIDELITY.md)
    halo: float | None = None
    halo_rows: float = 4.0
    # candidate windows: powers of two from min_window_tokens up to window_up x the window knob
    min_window_tokens: int = 16
    window_up: int = 4
    # keys always kept at the start of the sequence
    sink_tokens: int = 4
    # weigh attention by value norms (False: plain attention probabilities)
    value_weighted: bool = True
    # held-out output error a head's selection may show (relative, on rows half a stride away
    # from the sampled ones); a head starts at alpha and tightens until it holds. None: no check
    max_error: float | None = 0.08
    # alphas tried per head while the check fails: 1 - (1 - alpha) / 2**i for i < alpha_levels
    # (5 rather than 3 on layers 7/17/18/20/23 at 8K, CPU: one head fewer dense, 40.2% -> 39.1%;
    # benchmarks/eval/segment_levels_8k_cpu.txt)
    alpha_levels: int = 5
    # heads whose selection keeps more than this share of the causal entries run dense
    dense_above: float = 0.6
    # heads left without a selection (check failed at every level, or too dense) are ranked
    # again from every row's exact attention (one full QK^T and softmax for that head, no
    # halo), checked on every row, and take the first level that passes before they run dense
    # (8K, CPU: 20.2% -> 18.0% density at alpha 0.95, 13 -> 5 dense heads; docs/FIDELITY.md)
    exact_fallback: bool = True
    # with exact_fallback: how many of the alpha levels a head tries on its sampled ranking
    # before it is ranked from every row (None: all of them). 1 is sparser at equal error (32K,
    # alpha 0.98: 18.9% / 2.6% against 19.6% / 2.9%) but ranks many more heads from every row:
    # select time x1.6 at 16K and x2.3 at 32K (benchmarks/raw/v13_k1_speed_ab_gpu.json)
    sampled_levels: int | None = None


DEFAULT_SEGMENTS = SegmentConfig()


def segment_rows_sampled(sample_ratio: float, segment: int) -> int:
    """Sampled rows per segment: sample_ratio x segment rounded up to a power of two (<= segment),
    so the rows fall on an even stride."""
    n = max(1, math.ceil(round(sample_ratio * segment, 6)))
    p = 1 << (n - 1).bit_length()
    while segment % p:
        p //= 2
    return max(1, min(p, segment))


def segment_windows(window: float, seq_len: int, config: SegmentConfig) -> list[int]:
    """Candidate windows in tokens, ascending: powers of two from min_window_tokens (or S) up to
    window_up x ceil(window x S), capped at S."""
    top = min(seq_len, config.window_up * fraction_to_tokens(window, seq_len))
    w = min(config.min_window_tokens, seq_len)
    out = [w]
    while w * 2 <= top:
        w *= 2
        out.append(w)
    return out


def _smooth_segments(x: torch.Tensor, halo: float) -> torch.Tensor:
    """x (H, N, ...) averaged with its neighbours along the segment axis 1, weights halo : 1 :
    halo (normalized by the weights present at the ends)."""
    N = x.shape[1]
    if halo <= 0 or N == 1:
        return x
    y = x.clone()
    y[:, 1:] += halo * x[:, :-1]
    y[:, :-1] += halo * x[:, 1:]
    norm = torch.full((N,), 1 + 2 * halo, dtype=x.dtype, device=x.device)
    norm[0] -= halo
    norm[-1] -= halo
    return y / norm.view(1, N, *([1] * (x.dim() - 2)))


@dataclass
class _SegmentCandidate:
    """One window's ranked columns per segment, for H heads at once (what any alpha needs)."""

    w: int
    order: torch.Tensor  # (H, N, S) columns, best first (sinks, then score; unusable last)
    mass: torch.Tensor  # (H, N, S) float64 running score mass in that order
    use: torch.Tensor  # (H, N, S + 1) int32 running kept entries (leading 0)
    band: torch.Tensor  # (H, N) float64 sampled rows' mean mass inside the band
    limit: torch.Tensor  # (H, N) usable columns with a positive score (or a sink)
    sinks: torch.Tensor  # (H, N) usable sink columns


class _SegmentScores:
    """The sampled rows' attention p (H, N * rps, S), rps rows per segment, with what every
    window's column scores share: each segment's mean over its rows (no key excluded) and each
    row's total in float64. A window w only changes a segment's columns from its first row - w
    + 1 up to its last row, so `far` recomputes that slice (w + the rows' span wide) instead of
    the whole row."""

    def __init__(self, p: torch.Tensor, rows: torch.Tensor, n: int, segments: int | None = None) -> None:
        H, R, S = p.shape
        self.N = -(-S // n) if segments is None else segments  # segments: of a chunk of whole segments
        self.rps = R // self.N
        self.p4 = p.view(H, self.N, self.rps, S)
        self.rows = rows.view(self.N, self.rps)
        self.mean = self.p4.mean(2)  # (H, N, S)
        self.total = p.sum(-1, dtype=torch.float64).view(H, self.N, self.rps)
        self.span = int((self.rows[:, -1] - self.rows[:, 0]).max())

    def far(self, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """((H, N, S) float32 mean attention of each segment's rows on keys j <= row - w,
        (H, N, rps) float64 each row's attention on keys row - w < j <= row)."""
        H, N, rps, S = self.p4.shape
        L = w + self.span
        if L >= S:  # the slice would be the whole row
            j = torch.arange(S, device=self.p4.device)
            keep = j[None, None, :] <= (self.rows - w)[..., None]
            far = self.p4 * keep
            near = (self.p4 * ~keep).sum(-1, dtype=torch.float64)
            return far.mean(2), near
        start = (self.rows[:, 0] - w + 1).clamp(min=0, max=S - L)  # (N,)
        cols = start[:, None] + torch.arange(L, device=self.p4.device)  # (N, L), within [0, S)
        g = self.p4.gather(3, cols[None, :, None, :].expand(H, N, rps, L))
        keep = cols[:, None, :] <= (self.rows - w)[..., None]  # (N, rps, L)
        score = self.mean.clone()
        score.scatter_(2, cols[None].expand(H, N, L), (g * keep).mean(2))
        near = (g * ~keep).sum(-1, dtype=torch.float64)
        return score, near


class _ExactSegmentScores:
    """What `_segment_candidate` reads from `_SegmentScores`, computed from every row of H heads
    qh (H, S, D) in chunks of whole segments (no (S, S) matrix is held): per candidate window,
    each segment's mean attention on keys j <= row - w, and each segment's mean band and total
    mass (as one 'row' per segment, which is all `_segment_candidate` averages)."""

    def __init__(self, qh: torch.Tensor, kf: torch.Tensor, scale: float, vnorm: torch.Tensor | None, n: int,
                 wins: list[int]) -> None:
        H, S = qh.shape[0], kf.shape[0]
        N = -(-S // n)
        dev = qh.device
        self.total = torch.zeros(H, N, 1, dtype=torch.float64, device=dev)
        self._far = {w: torch.zeros(H, N, S, dtype=torch.float32, device=dev) for w in wins}
        self._near = {w: torch.zeros(H, N, 1, dtype=torch.float64, device=dev) for w in wins}
        step = max(1, _CHUNK_ELEMS // (H * S * n)) * n  # rows per chunk: whole segments
        for r0 in range(0, N * n, step):
            rows = torch.arange(r0, min(N * n, r0 + step), device=dev).clamp(max=S - 1)  # a short last segment repeats S - 1
            c, s0 = rows.numel() // n, r0 // n
            chunk = _SegmentScores(_probs_rows(qh, kf, rows, scale, vnorm), rows, n, segments=c)
            self.total[:, s0 : s0 + c, 0] = chunk.total.mean(2)
            for w in wins:
                far, near = chunk.far(w)
                self._far[w][:, s0 : s0 + c] = far
                self._near[w][:, s0 : s0 + c, 0] = near.mean(2)

    def far(self, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """((H, N, S) float32 mean far attention per segment, (H, N, 1) float64 mean band mass)."""
        return self._far[w], self._near[w]


def _segment_candidate(sc: _SegmentScores | _ExactSegmentScores, w: int, n: int, halo: float, sinks: int) -> _SegmentCandidate:
    """Rank each segment's columns for window w from the sampled rows' attention sc."""
    mean, near = sc.far(w)
    N, S = mean.shape[1:]
    dev = mean.device
    j = torch.arange(S, device=dev)
    score = _smooth_segments(mean, halo)  # (H, N, S)
    band = _smooth_segments((1.0 - (sc.total - near)).mean(2), halo)
    s0 = torch.arange(N, device=dev)[:, None] * n
    s1 = (s0 + n).clamp(max=S)
    usable = j[None, :] <= s1 - 1 - w  # (N, S): some row of the segment sees the key as a column
    value = torch.where(usable, score, -1.0)
    value[..., :sinks] = torch.where(usable[:, :sinks], math.inf, -1.0)
    ranked, order = torch.sort(value, dim=-1, descending=True, stable=True)
    mass = torch.where(ranked >= 0, score.gather(-1, order), 0.0).double().cumsum(-1)
    # kept entries of a taken column j: the segment's rows i >= j + w
    use = (s1 - torch.maximum(order + w, s0)).clamp(min=0).to(torch.int32).cumsum(-1, dtype=torch.int32)
    use = torch.cat((torch.zeros_like(use[..., :1]), use), dim=-1)
    limit = (ranked > 0).sum(-1)
    return _SegmentCandidate(w, order, mass, use, band, limit, usable[:, :sinks].sum(-1).minimum(limit))


def _segment_count(c: _SegmentCandidate, alpha: float, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((H,) float64 kept entries per head, (H, N) columns per segment) reaching alpha with c."""
    need = (alpha - c.band)[..., None].contiguous()
    count = torch.searchsorted(c.mass, need, side="left")[..., 0] + 1
    count = torch.where(need[..., 0] <= 0, torch.zeros_like(count), count)
    count = torch.maximum(count.minimum(c.limit), c.sinks)
    w = c.w
    cost = w * S - w * (w - 1) / 2 + c.use.gather(-1, count[..., None])[..., 0].double().sum(-1)
    return cost, count


def _segment_marks(order: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(H, N, S) bool: each segment's first `count` ranked columns."""
    S = order.shape[-1]
    taken = torch.arange(S, device=count.device) < count[..., None]
    return torch.zeros_like(taken).scatter_(-1, order, taken)


def _segment_error_norms(pb: torch.Tensor, ob: torch.Tensor, rows: torch.Tensor, vf: torch.Tensor, w: torch.Tensor,
                         marks: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((H,) ||O_sel - O||, (H,) ||O||) over rows (plain attention pb (H, R, S), dense output ob)
    under bands of w (H,) plus their segments' marked columns (H, N, S)."""
    j = torch.arange(pb.shape[-1], device=pb.device)
    dist = (rows[:, None] - j[None, :])[None]  # (1, R, S)
    near = dist < w[:, None, None]
    keep = pb * (near | (marks[:, rows // n] & ~near))
    out = (keep @ vf) / keep.sum(-1, keepdim=True).clamp_min(1e-30)
    return (out - ob).flatten(1).norm(dim=-1), ob.flatten(1).norm(dim=-1)


def _segment_error(pb: torch.Tensor, ob: torch.Tensor, rows: torch.Tensor, vf: torch.Tensor, w: torch.Tensor,
                   marks: torch.Tensor, n: int) -> torch.Tensor:
    """(H,) relative output error of rows under bands of w plus marked columns (see
    _segment_error_norms)."""
    diff, ref = _segment_error_norms(pb, ob, rows, vf, w, marks, n)
    return diff / ref.clamp_min(1e-30)


def _segment_error_on_rows(qh: torch.Tensor, kf: torch.Tensor, vf: torch.Tensor, scale: float, rows: torch.Tensor,
                           w: torch.Tensor, marks: torch.Tensor, n: int) -> torch.Tensor:
    """(H,) relative output error over rows (sorted) of H heads qh (H, S, D) under bands of w
    (H,) plus their segments' marked columns (H, N, S); rows in chunks, so no (S, S) matrix is
    held."""
    H, S = qh.shape[0], kf.shape[0]
    num = torch.zeros(H, dtype=torch.float64, device=qh.device)
    den = torch.zeros(H, dtype=torch.float64, device=qh.device)
    chunk = max(1, _CHUNK_ELEMS // (H * S))
    for r0 in range(0, rows.numel(), chunk):
        r = rows[r0 : r0 + chunk]
        pb = _probs_rows(qh, kf, r, scale, None)
        diff, ref = _segment_error_norms(pb, pb @ vf, r, vf, w, marks, n)
        num += diff.double() ** 2
        den += ref.double() ** 2
    return num.sqrt() / den.sqrt().clamp_min(1e-30)


def _probs_rows(qh: torch.Tensor, kf: torch.Tensor, rows: torch.Tensor, scale: float, vnorm: torch.Tensor | None) -> torch.Tensor:
    """(H, R, S) float32 causal attention of rows (sorted) of H heads qh (H, S, D), weighted by
    vnorm if given."""
    S = kf.shape[0]
    H = qh.shape[0]
    p = torch.zeros(H, rows.numel(), S, dtype=torch.float32, device=kf.device)
    chunk = max(1, _CHUNK_ELEMS // (H * S))
    for c0 in range(0, rows.numel(), chunk):
        r = rows[c0 : c0 + chunk]
        pr = _weigh(_row_probs(qh, kf, r, scale), vnorm)
        p[:, c0 : c0 + r.numel(), : pr.shape[-1]] = pr
    return p


# Bytes of ranked candidates (24 per column, segment, window and head) one batch of heads may
# hold in select_segments: heads of a KV group are ranked together up to this budget.
_SEGMENT_BATCH_BYTES = 8 << 30


def select_segments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    alpha: float,
    window: float,
    sample_ratio: float,
    scale: float,
    config: SegmentConfig = DEFAULT_SEGMENTS,
) -> Selection:
    """Per head a window, and per segment of `config.segment` query rows its own columns.

    Each segment's sampled rows (sample_ratio of its rows, on an even stride ending at its last
    row) give the segment its column scores: their value-weighted attention outside the band,
    averaged with the neighbouring segments' at weight `halo` (a far key that one passage reads
    is usually read by the next one too, and the sample of one segment is small; by default the
    weight is `halo_rows` over the rows sampled per segment, so it shrinks as the sample grows).
    Per segment,
    the fewest columns (sinks first) that bring the sampled rows' mean kept attention to alpha;
    per head, the candidate window whose selection keeps the fewest entries.

    The head's selection is then checked on held-out rows (half a stride from the sampled ones,
    every other stride): if their output error exceeds max_error, the head
    retries with a stricter alpha (1 - (1 - alpha) / 2, / 4, ...). A head failing at every
    level, or keeping more than `dense_above` of the causal entries, is computed exactly
    (window = S): typically heads whose queries each read their own far keys. With
    `config.exact_fallback` (the default) such a head is first ranked again from every row's
    exact attention (no halo) and checked on every row; only if that fails too does it run
    dense.

    q: (B, Hq, S, D); k, v: (B, Hkv, S, D). Returns a segmented Selection (segment =
    config.segment): window (B, Hq) int32, cols (B, Hq, NSEG, C) int32 ascending, padded with S.
    """
    B, Hq, S = _check_inputs(q, k, v, alpha)
    Hkv = k.shape[1]
    assert config.segment >= 1, f"segment must be >= 1, got {config.segment}"
    G = Hq // Hkv
    dev = q.device
    n = config.segment
    N = -(-S // n)
    rps = segment_rows_sampled(sample_ratio, n)
    stride = n // rps
    halo = config.halo_rows / rps if config.halo is None else config.halo
    grid = torch.arange(N, device=dev)[:, None] * n + torch.arange(rps, device=dev)[None, :] * stride
    rows = (grid + stride - 1).clamp(max=S - 1).reshape(-1)  # (N * rps,); a short last segment repeats S - 1
    # held-out rows: half a stride before every other sampled row (distinct rows when stride >= 2)
    held = (grid[:, ::2] + stride // 2 - 1).clamp(min=0).reshape(-1)
    held = held[held < S]
    check = config.max_error is not None and stride >= 2 and held.numel() > 0
    wins = segment_windows(window, S, config)
    sinks = min(config.sink_tokens, S)
    causal = S * (S + 1) / 2
    levels = [1.0 - (1.0 - alpha) / 2**i for i in range(max(1, config.alpha_levels))]

    out_w = torch.full((B, Hq), S, dtype=torch.int64, device=dev)
    out_cols: list[list[torch.Tensor]] = [[torch.empty(N, 0, dtype=torch.int64, device=dev)] * Hq for _ in range(B)]

    def choose(b: int, hs: list[int], cands: list[_SegmentCandidate],
               error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, tries: list[float]) -> torch.Tensor:
        """Give heads hs of batch b the first level whose selection from cands passes the check
        error(windows (H,), marks (H, N, S)) <= max_error (None: no check) and is not too
        dense, trying the alphas `tries` in turn; (len(hs),) bool: which heads got one."""
        open_ = torch.ones(len(hs), dtype=torch.bool, device=dev)
        for a in tries:
            counted = [_segment_count(c, a, S) for c in cands]
            costs = torch.stack([cost for cost, _ in counted])  # (K, H)
            best = costs.argmin(0)  # first window of the least cost, per head
            cost = costs.gather(0, best[None])[0]
            open_ &= cost / causal <= config.dense_above  # denser at every stricter alpha: dense
            if not bool(open_.any()):
                break
            count = torch.stack([cnt for _, cnt in counted]).gather(
                0, best[None, :, None].expand(1, *counted[0][1].shape))[0]  # (H, N)
            wsel = torch.tensor(wins, device=dev)[best]
            order = torch.stack([c.order for c in cands]).gather(
                0, best[None, :, None, None].expand(1, *cands[0].order.shape))[0]
            ok = open_.clone()
            if error is not None:
                ok &= error(wsel, _segment_marks(order, count)) <= config.max_error
            for i in ok.nonzero()[:, 0].tolist():
                C = int(count[i].max())
                taken = order[i, :, :C]
                out_cols[b][hs[i]] = torch.where(torch.arange(C, device=dev)[None, :] < count[i, :, None],
                                                 taken, S).sort(-1).values
                out_w[b, hs[i]] = int(wsel[i])
            open_ &= ~ok
            if not bool(open_.any()):
                break
        return out_w[b, hs] < S

    per_head = 24 * len(wins) * N * (S + 1) + 8 * rows.numel() * S
    batch = max(1, min(G, _SEGMENT_BATCH_BYTES // per_head))
    for b in range(B):
        for g in range(Hkv):
            kf, vf = k[b, g].float(), v[b, g].float()
            vnorm = vf.norm(dim=-1) if config.value_weighted else None
            for h0 in range(g * G, (g + 1) * G, batch):
                hs = list(range(h0, min(h0 + batch, (g + 1) * G)))
                scores = _SegmentScores(_probs_rows(q[b, hs], kf, rows, scale, vnorm), rows, n)
                cands = [_segment_candidate(scores, w, n, halo, sinks) for w in wins]
                del scores
                error = None
                if check:
                    pb = _probs_rows(q[b, hs], kf, held, scale, None)
                    ob = pb @ vf
                    error = functools.partial(_segment_error, pb, ob, held, vf, n=n)
                sampled = levels if not config.exact_fallback or config.sampled_levels is None else levels[: config.sampled_levels]
                placed = choose(b, hs, cands, error, sampled)
                del cands
                if not config.exact_fallback:
                    continue
                every = torch.arange(S, device=dev)
                for i in (~placed).nonzero()[:, 0].tolist():
                    qi = q[b, hs[i : i + 1]]
                    exact = _ExactSegmentScores(qi, kf, scale, vnorm, n, wins)
                    cands = [_segment_candidate(exact, w, n, 0.0, sinks) for w in wins]
                    del exact
                    # knowing every row, check every row: a copy head loses a few rows entirely,
                    # which a sample of rows (even a quarter of them) can miss
                    whole = None
                    if config.max_error is not None:
                        whole = functools.partial(_segment_error_on_rows, qi, kf, vf, scale, every, n=n)
                    choose(b, hs[i : i + 1], cands, whole, levels)
                    del cands
    C = max(c.shape[-1] for per_b in out_cols for c in per_b)
    cols = torch.full((B, Hq, N, C), S, dtype=torch.int64, device=dev)
    for b in range(B):
        for h in range(Hq):
            c = out_cols[b][h]
            cols[b, h, :, : c.shape[-1]] = c
    ncols = (cols < S).sum(-1)
    return Selection(window=out_w.clamp(max=S).to(torch.int32), cols=cols.to(torch.int32),
                     ncols=ncols.to(torch.int32), seq_len=S, segment=n)
