"""Selection rules: from the attention of sampled query rows to a per-head Selection.

The rule of the paper (`selection.select_columns`) fixes one window for every head and keeps the
fewest columns whose mean sampled score reaches alpha. `select_adaptive` keeps the knobs' meaning
(alpha: share of the sampled queries' attention the kept entries must reach; window: the local
window as a fraction of S, here the largest window a head may get; sample_ratio: share of query
rows sampled, `selection.sample_rows`) and adapts to each head and input:

- window per head: every candidate window (window, window/2, window/4, ... down to
  `min_window_tokens`) gets its own residual column scores (the attention the band leaves), and
  the head takes the candidate that keeps the fewest entries;
- columns by value per cost: a column j is computed by the S - j - w rows past the band, so
  columns are ranked by sampled score per kept entry, not by score alone;
- alpha per query: columns are added until a share `row_quantile` of the sampled rows each keep
  alpha of their own attention (not just alpha on average), which protects rows whose attention
  differs from the mean;
- sink columns: the first `sink_tokens` keys are always kept (every row attends to them);
- dense fallback: a head whose selection would keep more than `dense_above` of the causal entries
  gains little from sparsity and is computed exactly (window = S).

Plain PyTorch, float32, chunked over sampled rows so memory stays O(rows chunk x S) per KV head.
All inputs are the ones `api.sample_attention` already holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .selection import Selection, fraction_to_tokens

# Upper bound on the float32 elements one chunk of sampled-row probabilities holds (128 MiB).
_CHUNK_ELEMS = 1 << 25


@dataclass(frozen=True)
class RuleConfig:
    """Tuning of `select_adaptive` (defaults chosen from the measured trade-off; docs/FIDELITY.md)."""

    # candidate windows are window * 2**-i for i in range(window_levels), at least min_window_tokens
    window_levels: int = 4
    min_window_tokens: int = 64
    # "score": rank columns by sampled score (paper); "ratio": by score per kept entry
    order: str = "score"
    # share of sampled rows that must each reach alpha; None: the mean over sampled rows must
    row_quantile: float | None = None
    # keys always kept at the start of the sequence
    sink_tokens: int = 4
    # heads whose selection keeps more than this share of the causal entries run dense
    dense_above: float = 0.6
    # weigh each key's attention by the norm of its value vector (what it adds to the output)
    value_weighted: bool = False
    # a column earns credit only from sampled rows at least credit_factor * w tokens past it
    # (attention just beyond the band is row-specific: it does not carry over to unsampled rows)
    credit_factor: float = 1.0
    # cross-check: columns chosen on half of the sampled blocks must reach alpha on the other
    # half; the in-sample mass that takes ("max" or "mean" over the two halves) becomes the
    # head's effective alpha. None: alpha applies to the sampled rows as they are.
    cross_check: str | None = None
    # rows per sampled block (the unit the two halves are made of)
    block: int = 64


DEFAULT_RULE = RuleConfig()


def candidate_windows(window: float, seq_len: int, config: RuleConfig) -> list[int]:
    """Candidate window sizes in tokens, largest first, unique, each in [1, S]."""
    top = fraction_to_tokens(window, seq_len)
    out: list[int] = []
    for i in range(max(1, config.window_levels)):
        w = max(min(top, config.min_window_tokens), math.ceil(top / 2**i))
        if w not in out:
            out.append(w)
    return out


def _credit_distance(w: int, config: RuleConfig) -> int:
    return max(w, math.ceil(config.credit_factor * w))


def _row_weights(
    qh: torch.Tensor, kf: torch.Tensor, vnorm: torch.Tensor | None, r: torch.Tensor, scale: float
) -> torch.Tensor:
    """(G, rc, n) float32 attention of rows r (sorted) over keys 0..n-1, n = r[-1] + 1, rows summing
    to 1: the causal softmax, times the value norms and renormalized when vnorm is given."""
    n = int(r[-1]) + 1
    logits = torch.matmul(qh[:, r].float(), kf[:n].T) * scale
    j = torch.arange(n, device=kf.device)
    logits.masked_fill_(j[None, :] > r[:, None], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    if vnorm is not None:
        p.mul_(vnorm[:n])
        p.div_(p.sum(-1, keepdim=True).clamp_min(1e-30))
    return p


def _value_norms(v: torch.Tensor | None, b: int, g: int) -> torch.Tensor | None:
    return None if v is None else v[b, g].float().norm(dim=-1)


def window_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    windows: list[int],
    scale: float,
    *,
    v: torch.Tensor | None = None,
    credit: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual column scores and band masses of the sampled rows for several windows at once.

    q: (B, Hq, S, D); k: (B, Hkv, S, D); rows: (R,) int64 sorted unique; windows: K sizes >= 1.
    v: (B, Hkv, S, D) to weigh attention by value norms (None: plain attention).
    credit: per window, the least row-to-column distance that earns a column score (>= window;
    default the window itself).
    Returns float32 on q's device, with p_r row r's (weighted) attention:
      scores: (B, Hq, K, S), mean over rows r of p_r[j] * [j <= r - credit[t]]
      band:   (B, Hq, K, R), sum of p_r over r's band (r - windows[t], r]
    (for one window, no weighting and no credit these equal `column_scores`).
    """
    B, Hq, S, _ = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    rows = rows.to(device=q.device, dtype=torch.int64)
    R = rows.numel()
    K = len(windows)
    credit = list(windows) if credit is None else credit
    scores = torch.zeros(B, Hq, K, S, dtype=torch.float32, device=q.device)
    band = torch.empty(B, Hq, K, R, dtype=torch.float32, device=q.device)
    chunk = max(1, _CHUNK_ELEMS // (G * S))
    for b in range(B):
        for g in range(Hkv):
            heads = slice(g * G, (g + 1) * G)
            kf = k[b, g].float()
            vnorm = _value_norms(v, b, g)
            for c0 in range(0, R, chunk):
                r = rows[c0 : c0 + chunk]
                p = _row_weights(q[b, heads], kf, vnorm, r, scale)
                n = p.shape[-1]
                dist = r[:, None] - torch.arange(n, device=q.device)[None, :]
                for t, w in enumerate(windows):
                    # the causal mass is 1, so the band holds whatever lies past it
                    band[b, heads, t, c0 : c0 + r.numel()] = 1.0 - (p * (dist >= w)).sum(-1)
                    scores[b, heads, t, :n] += (p * (dist >= credit[t])).sum(1)
    return scores.div_(R), band


def _rank(score: torch.Tensor, w: int, S: int, order: str, sinks: int) -> torch.Tensor:
    """(..., S) column order, best first; columns inside every band go last with zero value."""
    j = torch.arange(S, device=score.device, dtype=torch.float64)
    value = score.to(torch.float64)
    if order == "ratio":
        rows_using = (S - j - w).clamp(min=1.0)
        value = value / rows_using
    elif order != "score":
        raise ValueError(f"unknown column order {order!r}")
    value = value.clone()
    value[..., S - w :] = -1.0
    value[..., :sinks] = math.inf
    return torch.sort(value, dim=-1, descending=True, stable=True).indices


def _count_for_mean(score: torch.Tensor, ranked: torch.Tensor, need: torch.Tensor, limit: int) -> torch.Tensor:
    """(...,) fewest leading ranked columns whose scores sum to `need` (all `limit` if never)."""
    csum = score.to(torch.float64).gather(-1, ranked).cumsum(-1)
    count = torch.searchsorted(csum, need[..., None].to(torch.float64).contiguous(), side="left")[..., 0] + 1
    count = torch.where(need <= 0, torch.zeros_like(count), count)
    return count.clamp(max=limit)


def _kept_entries(ranked: torch.Tensor, count: torch.Tensor, w: torch.Tensor, S: int) -> torch.Tensor:
    """(...,) float64 causal entries of a band of w (...,) tokens plus the first `count` ranked columns."""
    wf = w.to(torch.float64)
    rows_using = (S - ranked.to(torch.float64) - wf[..., None]).clamp(min=0)
    csum = torch.cat((torch.zeros_like(rows_using[..., :1]), rows_using.cumsum(-1)), dim=-1)
    cols = csum.gather(-1, count[..., None].to(torch.int64))[..., 0]
    return wf * S - wf * (wf - 1) / 2 + cols


def _row_quantile_counts(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    rows: torch.Tensor,
    windows: torch.Tensor,
    credits: torch.Tensor,
    ranked: torch.Tensor,
    alpha: float,
    quantile: float,
    scale: float,
) -> torch.Tensor:
    """(B, Hq) int64: columns (in `ranked` order) needed so that `quantile` of the sampled rows
    each keep alpha of their (weighted) attention with their head's window and credit distance."""
    B, Hq, S, _ = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    rows = rows.to(device=q.device, dtype=torch.int64)
    R = rows.numel()
    need = torch.empty(B, Hq, R, dtype=torch.int64, device=q.device)
    chunk = max(1, _CHUNK_ELEMS // (2 * G * S))
    for b in range(B):
        for g in range(Hkv):
            heads = slice(g * G, (g + 1) * G)
            kf = k[b, g].float()
            vnorm = _value_norms(v, b, g)
            for c0 in range(0, R, chunk):
                r = rows[c0 : c0 + chunk]
                p = _row_weights(q[b, heads], kf, vnorm, r, scale)  # (G, rc, n)
                n = p.shape[-1]
                w = windows[b, heads].to(torch.int64)[:, None, None]  # (G, 1, 1)
                c = credits[b, heads].to(torch.int64)[:, None, None]
                dist = r[None, :, None] - torch.arange(n, device=q.device)[None, None, :]
                bandm = (p * (dist < w)).sum(-1)  # (G, rc)
                far = torch.zeros(G, r.numel(), S, dtype=torch.float32, device=q.device)
                far[..., :n] = p * (dist >= c)
                # mass gained by the ranked columns, in order, per row
                gained = far.gather(-1, ranked[b, heads][:, None, :].expand(-1, r.numel(), -1)).cumsum(-1)
                target = (alpha - bandm)[..., None]
                cnt = (gained < target).sum(-1) + 1
                need[b, heads, c0 : c0 + r.numel()] = torch.where(target[..., 0] <= 0, torch.zeros_like(cnt), cnt)
    q_idx = min(R - 1, max(0, math.ceil(quantile * R) - 1))
    return need.sort(-1).values[..., q_idx]


def _overfit_gap(
    fit_scores: torch.Tensor,
    fit_band: torch.Tensor,
    test_scores: torch.Tensor,
    test_band: torch.Tensor,
    alpha: float,
    w: int,
    S: int,
    order: str,
    sinks: int,
    limit: int,
) -> torch.Tensor:
    """(B, Hq) float64: how much in-sample mass above alpha the `fit` rows need before the columns
    chosen on them give the held-out `test` rows alpha (1 - alpha when no count does).

    scores: (B, Hq, S) mean residual score per column; band: (B, Hq, R_half) band masses.
    """
    ranked = _rank(fit_scores, w, S, order, sinks)
    held = test_band.to(torch.float64).mean(-1)
    held_curve = test_scores.to(torch.float64).gather(-1, ranked).cumsum(-1)
    count = torch.searchsorted(held_curve, (alpha - held)[..., None].contiguous(), side="left")[..., 0] + 1
    count = torch.where(held >= alpha, torch.zeros_like(count), count).clamp(min=min(sinks, limit))
    reachable = (held >= alpha) | (count <= limit)
    fit_curve = torch.cat(
        (torch.zeros_like(held_curve[..., :1]), fit_scores.to(torch.float64).gather(-1, ranked).cumsum(-1)), dim=-1
    )
    in_sample = fit_band.to(torch.float64).mean(-1) + fit_curve.gather(-1, count.clamp(max=S)[..., None])[..., 0]
    gap = (in_sample - alpha).clamp(min=0.0)
    return torch.where(reachable, gap, torch.full_like(gap, 1.0 - alpha))


def select_adaptive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    alpha: float,
    window: float,
    sample_ratio: float,
    scale: float,
    rows: torch.Tensor | None = None,
    config: RuleConfig = DEFAULT_RULE,
) -> Selection:
    """Per-head window and columns from the exact attention of sampled query rows.

    q: (B, Hq, S, D); k, v: (B, Hkv, S, D); any float dtype, Hq % Hkv == 0. v is read only when
    config.value_weighted (its norms weigh the attention).
    alpha, window, sample_ratio, scale: the SampleAttention knobs (see module docstring).
    rows: (R,) sorted unique sampled rows; default `selection.sample_rows(S, sample_ratio)`.
    Returns a Selection (window (B, Hq) int32 per head, cols ascending padded with S); heads
    computed exactly have window = S and no columns.
    """
    from .selection import sample_rows

    assert q.dim() == 4 and k.dim() == 4, f"q, k must be 4-D; got {tuple(q.shape)}, {tuple(k.shape)}"
    B, Hq, S, _ = q.shape
    assert k.shape[0] == B and k.shape[2] == S and Hq % k.shape[1] == 0, (
        f"k {tuple(k.shape)} does not match q {tuple(q.shape)}"
    )
    if config.value_weighted:
        assert v is not None and v.shape[:3] == k.shape[:3], "value_weighted needs v shaped like k"
    else:
        v = None
    dev = q.device
    if rows is None:
        rows = sample_rows(S, sample_ratio, config.block)
    rows = rows.to(device=dev, dtype=torch.int64)
    R = rows.numel()
    wins = candidate_windows(window, S, config)
    credit = [_credit_distance(w, config) for w in wins]
    sinks = min(config.sink_tokens, S)
    fold = (torch.arange(R, device=dev) // config.block) % 2
    cross = config.cross_check is not None and bool(fold.any()) and not bool(fold.all())
    if cross:
        # statistics per half; the whole sample's are their row-weighted mean
        halves = [rows[fold == f] for f in (0, 1)]
        stats = [window_statistics(q, k, r, wins, scale, v=v, credit=credit) for r in halves]
        n0, n1 = halves[0].numel(), halves[1].numel()
        scores = (stats[0][0] * n0 + stats[1][0] * n1) / R
        band_mean = (stats[0][1].sum(-1) + stats[1][1].sum(-1)) / R  # (B, Hq, K)
    else:
        scores, band = window_statistics(q, k, rows, wins, scale, v=v, credit=credit)
        band_mean = band.mean(-1)

    best_cost = torch.full((B, Hq), math.inf, dtype=torch.float64, device=dev)
    best_w = torch.full((B, Hq), wins[0], dtype=torch.int64, device=dev)
    best_c = torch.full((B, Hq), credit[0], dtype=torch.int64, device=dev)
    best_rank = torch.zeros(B, Hq, S, dtype=torch.int64, device=dev)
    best_count = torch.zeros(B, Hq, dtype=torch.int64, device=dev)
    for t, w in enumerate(wins):
        limit = max(0, S - w)
        target = torch.full((B, Hq), alpha, dtype=torch.float64, device=dev)
        if cross:
            gaps = [
                _overfit_gap(stats[f][0][:, :, t], stats[f][1][:, :, t], stats[1 - f][0][:, :, t],
                             stats[1 - f][1][:, :, t], alpha, w, S, config.order, sinks, limit)
                for f in (0, 1)
            ]
            gap = torch.maximum(*gaps) if config.cross_check == "max" else (gaps[0] + gaps[1]) / 2
            target = (target + gap).clamp(max=1.0)
        ranked = _rank(scores[:, :, t], w, S, config.order, sinks)
        need = target - band_mean[:, :, t].to(torch.float64)
        count = _count_for_mean(scores[:, :, t], ranked, need, limit)
        count = torch.where(target >= 1.0, torch.full_like(count, limit), count)
        count = count.clamp(min=min(sinks, limit))
        cost = _kept_entries(ranked, count, torch.full_like(best_w, w), S)
        better = cost < best_cost
        best_cost = torch.where(better, cost, best_cost)
        best_w = torch.where(better, torch.full_like(best_w, w), best_w)
        best_c = torch.where(better, torch.full_like(best_c, credit[t]), best_c)
        best_count = torch.where(better, count, best_count)
        best_rank = torch.where(better[..., None], ranked, best_rank)

    if config.row_quantile is not None:
        qcount = _row_quantile_counts(
            q, k, v, rows, best_w, best_c, best_rank, alpha, config.row_quantile, scale
        )
        limit = (S - best_w).clamp(min=0)
        best_count = torch.maximum(best_count, torch.minimum(qcount, limit))
        best_cost = _kept_entries(best_rank, best_count, best_w, S)

    causal = S * (S + 1) / 2
    dense = best_cost / causal > config.dense_above
    window_out = torch.where(dense, torch.full_like(best_w, S), best_w)
    count = torch.where(dense, torch.zeros_like(best_count), best_count)
    C = int(count.max()) if count.numel() else 0
    taken = best_rank[..., :C]
    valid = torch.arange(C, device=dev) < count[..., None]
    cols = torch.where(valid, taken, torch.full_like(taken, S)).sort(-1).values
    return Selection(
        window=window_out.to(torch.int32), cols=cols.to(torch.int32), ncols=count.to(torch.int32), seq_len=S
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
                p = _row_weights(q[b, heads], kf, None, r, scale)
                total[b, heads, : p.shape[-1]] += p.sum(1)
    w = fraction_to_tokens(window, S)
    ranked, order = torch.sort(total.to(torch.float64), dim=-1, descending=True, stable=True)
    csum = ranked.cumsum(-1)
    target = alpha * csum[..., -1:]
    count = ((csum < target).sum(-1) + 1).clamp(max=S)
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
