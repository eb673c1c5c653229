"""See each layer's attention inputs during a forward pass, through transformers' AttentionInterface.

`capture_attention(model, on_layer)` switches the model to an attention function registered under
its own name ("sacli_capture"), which hands (layer, query, key, value, scale) to `on_layer` and then
returns ordinary SDPA attention, so the forward pass itself stays dense and exact. query is
(B, Hq, S, D) after RoPE, key/value (B, Hkv, S, D). The model's previous attention implementation
is restored on exit. No model code is copied or patched.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

CAPTURE_NAME = "sacli_capture"

OnLayer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], None]


def _register(on_layer: OnLayer) -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def capture_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        # prefill only: decode steps (one query row) have nothing to select
        if query.shape[2] > 1:
            on_layer(int(module.layer_idx), query, key, value, scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    # registering again under the same name replaces the previous callback
    AttentionInterface.register(CAPTURE_NAME, capture_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_NAME, sdpa_mask)


@contextmanager
def capture_attention(model: torch.nn.Module, on_layer: OnLayer) -> Iterator[None]:
    """Within the block, every prefill forward of `model` calls on_layer(layer, q, k, v, scale)."""
    _register(on_layer)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
