"""SampleAttention inside Hugging Face models, through transformers' AttentionInterface.

`register_attention()` adds the attention function under the name "sacli_sample" together with
transformers' own SDPA mask builder, so models keep their own forward code and only the attention
product changes. The mask builder returns None for a plain causal prefill without padding; that
is the one case routed to `sacli.kernels.sample_attention`. Decode steps, padded or otherwise
masked calls (e.g. sliding-window layers past their window) and `Settings.dense` use exact SDPA.

Settings and the statistics collector reach the attention function through a ContextVar set by
`sparse_context()`. Outside such a context every call is exact dense attention and nothing is
recorded, so a model loaded with this attention still works when called directly.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from sacli.config import Settings
from sacli.errors import ModelError

ATTENTION_NAME = "sacli_sample"


@dataclass
class _Call:
    routed: str
    # (B, Hq) float32, kept causal entries / all causal entries
    density: torch.Tensor
    causal_entries: float


@dataclass
class AttentionCollector:
    """Per-layer record of the prefill attention calls (calls with more than one query row)."""

    settings: Settings
    calls: dict[int, list[_Call]] = field(default_factory=dict)

    def record(self, layer: int, routed: str, density: torch.Tensor, q_len: int) -> None:
        entries = q_len * (q_len + 1) / 2
        self.calls.setdefault(layer, []).append(_Call(routed, density.detach(), entries))

    def layers(self) -> list[int]:
        return sorted(self.calls)

    def layer_density(self, layer: int) -> float:
        """Kept / causal entries of one layer, averaged over its heads (1.0 when nothing was recorded)."""
        calls = self.calls.get(layer, [])
        total = sum(c.causal_entries * c.density.numel() for c in calls)
        if total == 0:
            return 1.0
        kept = sum(c.causal_entries * float(c.density.float().sum()) for c in calls)
        return kept / total

    def layer_routes(self, layer: int) -> list[str]:
        return sorted({c.routed for c in self.calls.get(layer, [])})

    def sparsity(self) -> float:
        """1 - kept / causal entries over every recorded layer and head."""
        calls = [c for layer_calls in self.calls.values() for c in layer_calls]
        total = sum(c.causal_entries * c.density.numel() for c in calls)
        if total == 0:
            return 0.0
        kept = sum(c.causal_entries * float(c.density.float().sum()) for c in calls)
        return max(0.0, 1.0 - kept / total)

    def routes(self) -> str:
        """"+"-joined routing modes seen, e.g. "sparse" or "dense_short" or "sparse+dense_masked"."""
        modes = sorted({c.routed for layer_calls in self.calls.values() for c in layer_calls})
        return "+".join(modes) if modes else "none"


_ACTIVE: ContextVar[AttentionCollector | None] = ContextVar("sacli_attention_collector", default=None)


@contextmanager
def sparse_context(settings: Settings) -> Iterator[AttentionCollector]:
    """Make `settings` drive the registered attention for the enclosed forwards; yields the collector."""
    collector = AttentionCollector(settings)
    token = _ACTIVE.set(collector)
    try:
        yield collector
    finally:
        _ACTIVE.reset(token)


def _dense(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    causal: bool,
) -> torch.Tensor:
    # enable_gqa lets SDPA broadcast the kv heads instead of materialising repeated K/V
    gqa = query.shape[1] != key.shape[1]
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=causal, enable_gqa=gqa
    )


def _dense_softcapped(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float | None,
    softcap: float,
    causal: bool,
) -> torch.Tensor:
    """Exact attention with tanh logit soft-capping (Gemma 2), which SDPA cannot express."""
    B, Hq, L, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else D**-0.5
    # group query heads per kv head so K/V broadcast without being repeated
    q = query.view(B, Hkv, Hq // Hkv, L, D).float()
    scores = torch.matmul(q, key.float().unsqueeze(2).transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        m = mask.view(mask.shape[0], Hkv, Hq // Hkv, L, S) if mask.shape[1] == Hq else mask.unsqueeze(2)
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    elif causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=query.device).tril(S - L)
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.matmul(scores.softmax(-1), value.float().unsqueeze(2))
    return out.view(B, Hq, L, D).to(query.dtype)


def sample_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for transformers models.

    query: (B, Hq, q_len, D); key, value: (B, Hkv, kv_len, D), Hq % Hkv == 0, same dtype.
    attention_mask: None (plain causal, or a single decode row) or a (B, 1|Hq, q_len, kv_len)
    bool mask from transformers' SDPA mask builder.
    Returns ((B, q_len, Hq, D) contiguous in query's dtype, None) as transformers expects.
    """
    if kwargs.get("s_aux") is not None:
        raise ModelError("attention sinks (s_aux) are not supported by sacli's attention")
    collector = _ACTIVE.get()
    q_len = query.shape[2]
    causal = bool(getattr(module, "is_causal", True))
    if attention_mask is None and causal and 1 < q_len < key.shape[2]:
        # prefill into a preallocated (static) cache: the keys past q_len are empty slots
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    is_causal = causal and q_len > 1 and attention_mask is None
    softcap = kwargs.get("softcap")

    stats_density: torch.Tensor | None = None
    routed = "dense"
    if softcap is not None:
        out = _dense_softcapped(query, key, value, attention_mask, scaling, float(softcap), is_causal)
        routed = "dense_softcap"
    elif (
        collector is None
        or collector.settings.dense
        or not is_causal
        or dropout > 0.0
        or key.shape[2] != q_len
    ):
        out = _dense(query, key, value, attention_mask, scaling, dropout, is_causal)
        if attention_mask is not None:
            routed = "dense_masked"
    else:
        from sacli.kernels import sample_attention

        s = collector.settings
        out, stats = sample_attention(
            query,
            key,
            value,
            alpha=s.alpha,
            window=s.window,
            sample_ratio=s.sample_ratio,
            scale=scaling,
            dense_below=s.dense_below,
            rule=s.rule,
            segments=s.segment_config(),
            chunk=s.chunk,
        )
        routed, stats_density = stats.routed, stats.density

    if collector is not None and q_len > 1:
        if stats_density is None:
            stats_density = torch.ones(query.shape[:2], dtype=torch.float32, device=query.device)
        layer = getattr(module, "layer_idx", None)
        collector.record(-1 if layer is None else int(layer), routed, stats_density, q_len)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register "sacli_sample" with transformers (idempotent; call before loading a model)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, sample_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
