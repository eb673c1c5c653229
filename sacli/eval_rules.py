"""Selection rules the evaluation can compare, and an attention function that runs any of them.

A rule maps one layer's prefill (q, k, v, scale) and the SampleAttention knobs to a Selection:

- "product":  whatever `sacli.kernels.sample_attention` selects with the settings' rule (what
              `sacli ask` runs);
- "literal":  the paper's first rule: window of `window` * S, every 20th query row sampled,
              columns by summed sampled attention (band included) until alpha of the total;
- "residual": one window, 64-row sampled blocks spread over the sequence, columns scored by the
              mass the window leaves, fewest columns so the mean sampled kept mass reaches alpha
              (`sample_rows` + `column_scores` + `select_columns`);
- "adaptive": `sacli.kernels.rules.select_adaptive` (window per head, ratio-ranked columns,
              per-query alpha, sinks, dense fallback);
- "segments": `sacli.kernels.rules.select_segments` (window per head, columns per segment of
              128 query rows from that segment's sampled rows and its neighbours');
- "exact":    every causal entry, through the same sparse kernel: no entry is dropped, only the
              arithmetic differs from dense attention. Its KL and top-1 against dense are the
              floor that every other rule's comparison includes.

`rule_attention(model, rule, settings)` makes a model's prefill use a rule through transformers'
AttentionInterface (registered as "sacli_eval"), for end-to-end comparisons of rules that
sacli itself does not run. Decode steps and masked calls stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from sacli.config import Settings
from sacli.errors import UsageError

RULES = ("product", "literal", "residual", "adaptive", "segments", "exact")
EVAL_ATTENTION = "sacli_eval"

Rule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, Settings], "object"]


def _literal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, s: Settings):
    from sacli.kernels.rules import select_literal

    return select_literal(q, k, alpha=s.alpha, window=s.window, stride=20, scale=scale)


def _residual(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, s: Settings):
    from sacli.kernels import (
        column_scores,
        fraction_to_tokens,
        sample_rows,
        select_columns,
    )

    S = q.shape[2]
    w = fraction_to_tokens(s.window, S)
    rows = sample_rows(S, s.sample_ratio, device=q.device)
    scores, window_mass = column_scores(q, k, rows, w, scale)
    return select_columns(scores, window_mass, s.alpha, w, S)


def _adaptive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, s: Settings):
    from sacli.kernels.rules import select_adaptive

    return select_adaptive(q, k, v, alpha=s.alpha, window=s.window, sample_ratio=s.sample_ratio, scale=scale)


def every_entry(q: torch.Tensor):
    """A Selection keeping every causal entry of q's heads (window = S, no columns)."""
    from sacli.kernels import Selection

    B, H, S, _ = q.shape
    return Selection(
        window=torch.full((B, H), S, dtype=torch.int32, device=q.device),
        cols=torch.empty(B, H, 0, dtype=torch.int32, device=q.device),
        ncols=torch.zeros(B, H, dtype=torch.int32, device=q.device),
        seq_len=S,
    )


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, s: Settings):
    return every_entry(q)


def _product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, s: Settings):
    from sacli.kernels import sample_attention

    _, stats = sample_attention(
        q, k, v, alpha=s.alpha, window=s.window, sample_ratio=s.sample_ratio, scale=scale,
        dense_below=s.dense_below, rule=s.rule, segments=s.segment_config(), chunk=s.chunk,
    )
    if stats.selection is not None:
        return stats.selection
    return every_entry(q)  # routed dense: every head keeps every causal entry


def _segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, s: Settings):
    from sacli.kernels.rules import select_segments

    return select_segments(q, k, v, alpha=s.alpha, window=s.window, sample_ratio=s.sample_ratio, scale=scale,
                           config=s.segment_config())


_RULES: dict[str, Rule] = {
    "product": _product, "literal": _literal, "residual": _residual, "adaptive": _adaptive, "segments": _segments,
    "exact": _exact,
}


def get_rule(name: str) -> Rule:
    if name not in _RULES:
        raise UsageError(f"unknown rule {name!r}; choose from {', '.join(RULES)}")
    return _RULES[name]


Selector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], "object"]


def selector(name: str, settings: Settings) -> Selector:
    """The rule `name` with the knobs of `settings` bound: (q, k, v, scale) -> Selection."""
    rule = get_rule(name)
    return lambda q, k, v, scale: rule(q, k, v, scale, settings)


def _register(select: Selector, dense_below: int, densities: list[torch.Tensor]) -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    from sacli.kernels import sparse_attention

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        S = query.shape[2]
        plain = attention_mask is None and S > 1 and key.shape[2] == S and dropout == 0.0
        if not plain or 0 <= S < dense_below:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        sel = select(query, key, value, scale)
        densities.append(sel.density().float())
        out = sparse_attention(query, key, value, sel, scale)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(EVAL_ATTENTION, forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(EVAL_ATTENTION, sdpa_mask)


@contextmanager
def rule_attention(model: torch.nn.Module, select: Selector, dense_below: int) -> Iterator[list[torch.Tensor]]:
    """Within the block the model's prefills of at least `dense_below` tokens use `select`
    (q, k, v, scale) -> Selection and exact attention over it; yields the list that collects each
    sparse call's (B, Hq) densities."""
    densities: list[torch.Tensor] = []
    _register(select, dense_below, densities)
    previous = model.config._attn_implementation
    model.set_attn_implementation(EVAL_ATTENTION)
    try:
        yield densities
    finally:
        model.set_attn_implementation(previous)
