"""SampleAttention prefill: the three stages composed, with per-head statistics.

1. `column_scores`: exact attention of a sample of query rows (`sample_rows`), accumulated per
   key column outside each row's local window band.
2. `selection_stage`: per head, the fewest columns reaching the cumulative threshold alpha
   (`select_columns` in PyTorch, or one Triton program per head).
3. `sparse_attention`: exact softmax over the window band plus the selected columns.

Every stage runs on the backend chosen by `backend.choose_backend`.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch

from . import backend as _backend
from . import graphs as _graphs
from .reference import check_qkv, dense_attention
from .rules import DEFAULT_SEGMENTS, SegmentConfig, select_adaptive, select_segments
from .selection import Selection, chunk_sample_rows, fraction_to_tokens, sample_rows, stack_chunks


@dataclass
class AttentionStats:
    """What one attention call did.

    routed: "sparse" (SampleAttention), "dense_short" (sequence below the dense threshold) or
            "dense" (exact attention chosen by the caller).
    density: (B, Hq) float32, kept causal entries / all causal entries (1.0 when dense).
    selection: the Selection used by the sparse path, None otherwise.
    """

    routed: str
    density: torch.Tensor
    selection: Selection | None = None

    @property
    def mean_density(self) -> float:
        """Density averaged over batch and heads."""
        return float(self.density.float().mean())

    @classmethod
    def dense(cls, q: torch.Tensor, routed: str = "dense") -> AttentionStats:
        """Stats of exact attention for q (B, Hq, S, D): density 1 everywhere."""
        return cls(routed=routed, density=torch.ones(q.shape[:2], dtype=torch.float32, device=q.device))


# Below these lengths sparse prefill loses to dense attention, so it routes to dense.
# CUDA (H100, bf16, the pipeline replayed as a CUDA graph): one sparse call of the default model
# (9 heads x 64 dims) beats cuDNN SDPA from about 16K tokens (1.30x at 16K summed over six
# layers, 1.35-1.62x on every layer but the densest; 0.73x at 8K), its TTFT from 8-16K (0.92x at
# 8K and 1.14x at 16K with sparse forced, 1.18x at 16K routed); the 8B shape (32 x 128) beats it
# at 16K too (1.4x at 10% density, stages timed one by one) (benchmarks/attention_*.json,
# ttft_default*.json). One threshold, 16K, for both.
# CPU: the gathering reference path, forced sparse, was slower than SDPA at 4K and 8K tokens
# with the default model (benchmarks/cpu_ttft.json), so on the CPU automatic routing always
# chooses dense; dense_below=0 forces the sparse path.
CUDA_CROSSOVER = 16384
GRAPHS_ENV = "SACLI_CUDA_GRAPHS"
CPU_CROSSOVER = sys.maxsize


def crossover_tokens(device: torch.device) -> int:
    """Sequence length from which sparse prefill is expected to beat dense on `device`."""
    return CUDA_CROSSOVER if device.type == "cuda" else CPU_CROSSOVER


def sample_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    alpha: float,
    window: float,
    sample_ratio: float,
    scale: float | None = None,
    dense_below: int | None = 0,
    backend: str | None = None,
    rule: str = "sample",
    segments: SegmentConfig = DEFAULT_SEGMENTS,
    graphs: bool | None = None,
    chunk: int = 0,
) -> tuple[torch.Tensor, AttentionStats]:
    """Causal SampleAttention for a prefill.

    q: (B, Hq, S, D); k, v: (B, Hkv, S, D); same dtype and device, Hq % Hkv == 0.
    alpha: cumulative-attention threshold in [0, 1] for the column selection.
    window: local window as a fraction of S, in (0, 1]; window tokens = ceil(window * S).
    sample_ratio: fraction of query rows sampled for stage 1, in (0, 1].
    scale: softmax scale, default 1/sqrt(D).
    dense_below: sequences shorter than this use exact attention (routed "dense_short");
        None or negative: the measured crossover for the device and head shape (crossover_tokens).
    backend: "torch", "triton", "auto" or None (see kernels/backend.py).
    rule: "sample", the paper's two-stage filtering with residual-aware column scores (stage 1 on
        the chosen backend); or "adaptive", kernels/rules.select_adaptive: per-head windows,
        value-weighted scores, held-out error checks and a dense fallback per head (more faithful,
        denser; its stage 1 is PyTorch on every backend); or "segments", kernels/rules.
        select_segments: per-head windows and, per segment of 128 query rows, its own columns from
        that segment's sampled rows (sparser at equal error on long inputs; stage 1 in PyTorch).
    segments: tuning of the "segments" rule (kernels/rules.SegmentConfig).
    chunk: "sample" rule only. 0: one column list per head, scored by 64-row blocks of sampled
        rows spread over the whole sequence (the paper's first version). A multiple of 128 (the
        sparse kernel's query blocks): every chunk of that many query rows gets its own columns,
        scored by its own sampled rows (sample_ratio of them, on an even stride ending at its
        last row), as in the later version's chunked sampling; a segmented Selection. Sequences
        of at most `chunk` rows use one list.
    graphs: replay the pipeline as a CUDA graph from the second call of a shape on (kernels/
        graphs.py; CUDA tensors only, ignored otherwise); None: on for the "sample" rule on the
        Triton backend, unless the environment sets SACLI_CUDA_GRAPHS=0.
    Returns out (B, Hq, S, D) in q's dtype, and AttentionStats.
    """
    _, _, _, S, D = check_qkv(q, k, v)
    assert q.dtype == k.dtype == v.dtype, f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
    assert 0.0 <= alpha <= 1.0, f"alpha must be in [0, 1], got {alpha}"
    assert 0.0 < window <= 1.0, f"window must be in (0, 1], got {window}"
    assert 0.0 < sample_ratio <= 1.0, f"sample_ratio must be in (0, 1], got {sample_ratio}"
    if dense_below is None or dense_below < 0:
        dense_below = crossover_tokens(q.device)
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    if S < dense_below:
        return dense_attention(q, k, v, scale), AttentionStats.dense(q, routed="dense_short")

    if rule in ("adaptive", "segments"):
        knobs = {"alpha": alpha, "window": window, "sample_ratio": sample_ratio, "scale": scale}
        if rule == "adaptive":
            sel = select_adaptive(q, k, v, **knobs)
        else:
            sel = select_segments(q, k, v, **knobs, config=segments)
        out = _backend.sparse_attention(q, k, v, sel, scale, backend=backend)
        return out, AttentionStats(routed="sparse", density=sel.density().to(torch.float32), selection=sel)
    assert rule == "sample", f"rule must be 'sample', 'adaptive' or 'segments', got {rule!r}"
    assert chunk >= 0 and chunk % 128 == 0, f"chunk must be 0 or a multiple of 128, got {chunk}"
    name = _backend.choose_backend(backend, q, k, v)
    segment = chunk if 0 < chunk < S else 0

    def pipeline(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        window_tokens = fraction_to_tokens(window, S)
        if segment:
            sel, counts, density = _chunked_selection(q, k, window_tokens, scale, alpha, sample_ratio, segment, name)
        else:
            rows = sample_rows(S, sample_ratio, device=q.device)
            scores, window_mass = _backend.column_scores(q, k, rows, window_tokens, scale, backend=name)
            sel, counts, density = _backend.selection_stage(scores, window_mass, alpha, window_tokens, S, backend=name)
        out = _backend.sparse_attention(q, k, v, sel, scale, backend=name, counts=counts, window_hint=window_tokens)
        return out, density, sel.window, sel.cols, sel.ncols

    if graphs is None:
        graphs = name == "triton" and q.is_cuda and os.environ.get(GRAPHS_ENV, "1").strip() != "0"
    if graphs and q.is_cuda:
        key = ("sample", alpha, window, sample_ratio, float(scale), name, segment)
        out, density, win, cols, ncols = _graphs.run_graphed(key, q, k, v, pipeline)
    else:
        out, density, win, cols, ncols = pipeline(q, k, v)
    sel = Selection(window=win, cols=cols, ncols=ncols, seq_len=S, segment=segment)
    return out, AttentionStats(routed="sparse", density=density, selection=sel)


def _chunked_selection(
    q: torch.Tensor, k: torch.Tensor, window_tokens: int, scale: float, alpha: float, sample_ratio: float,
    chunk: int, backend: str,
) -> tuple[Selection, None, torch.Tensor]:
    """Stages 1 and 2 with a column list per chunk of `chunk` query rows: each chunk's sampled
    rows score the columns (one stage-1 launch per chunk), and stage 2 treats every (head,
    chunk) as a head of its own. Returns (segmented sel, None, density (B, Hq) float32); the
    sparse launcher counts each block's columns against its own chunk's list."""
    B, H, S, _ = q.shape
    parts = [_backend.column_scores(q, k, rows, window_tokens, scale, backend=backend)
             for rows in chunk_sample_rows(S, chunk, sample_ratio, device=q.device)]
    N = len(parts)
    scores = torch.stack([sc for sc, _ in parts], 2).view(B, H * N, S)
    window_mass = torch.stack([wm.mean(-1, keepdim=True) for _, wm in parts], 2).view(B, H * N, 1)
    flat, _, _ = _backend.selection_stage(scores, window_mass, alpha, window_tokens, S, backend=backend)
    sel = stack_chunks(flat, H, chunk)
    return sel, None, sel.density().to(torch.float32)
