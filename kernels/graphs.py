"""Replaying the sparse prefill pipeline as one CUDA graph.

A prefill calls SampleAttention once per layer, every time with the same shapes. Launched one
operation at a time, the pipeline (sample rows, two sampling kernels, the selection's sort /
cumsum / scatter, the per-block column counts, the sparse kernel, the density) costs about
1.8 ms of host time per call on an H100 host whatever the length (benchmarks/attention_model.json,
end-to-end at 8K and 16K), more than dense attention itself takes below ~32K tokens for a small
model. Stage 2 never synchronizes with the host, so the whole pipeline can be captured:

- the first call of a shape runs eagerly (the Triton kernels compile and autotune there),
- the second captures a graph on static input buffers and replays it,
- every later call copies its inputs into those buffers and replays.

Outputs are cloned out of the graph's buffers, so callers own what they get. At most
MAX_ENTRIES shapes keep a graph (each holds its inputs, outputs and intermediates); the oldest
is dropped first. Inputs are made contiguous before every run (eager or captured), so the
kernels see one layout and the capture never triggers a compilation.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

MAX_ENTRIES = 2

Pipeline = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


@dataclass
class _Entry:
    calls: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    # why capturing failed (the shape then keeps running eagerly), None when it did not
    error: str | None = None
    inputs: tuple[torch.Tensor, ...] = ()
    outputs: tuple[torch.Tensor, ...] = field(default_factory=tuple)


_CACHE: OrderedDict[Hashable, _Entry] = OrderedDict()


def clear() -> None:
    """Drop every captured graph and its buffers."""
    _CACHE.clear()


def status() -> list[dict[str, object]]:
    """Per cached shape: calls so far, whether a graph is held, and the capture error if any."""
    return [{"calls": e.calls, "graph": e.graph is not None, "error": e.error} for e in _CACHE.values()]


def run_graphed(key: Hashable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pipeline: Pipeline) -> tuple[torch.Tensor, ...]:
    """pipeline(q, k, v) for CUDA tensors, replayed from a CUDA graph from the second call on.

    key: everything besides the inputs' shapes, dtype and device that the pipeline depends on
    (its parameters); calls with equal keys and input shapes share one graph.
    pipeline: a function of contiguous (q, k, v) that never synchronizes with the host and
    returns tensors only. Returns fresh copies of its outputs.
    """
    assert q.is_cuda and k.is_cuda and v.is_cuda, "CUDA graphs need CUDA tensors"
    full_key = (key, tuple(q.shape), tuple(k.shape), q.dtype, q.device, torch.is_inference_mode_enabled())
    entry = _CACHE.get(full_key)
    if entry is None:
        entry = _CACHE[full_key] = _Entry()
        while len(_CACHE) > MAX_ENTRIES:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(full_key)
    entry.calls += 1
    if entry.calls == 1 or entry.error is not None:
        return pipeline(q.contiguous(), k.contiguous(), v.contiguous())
    if entry.graph is None:
        entry.inputs = tuple(t.contiguous().clone() for t in (q, k, v))
        graph = torch.cuda.CUDAGraph()
        try:  # torch.cuda.graph synchronizes before capturing
            with torch.cuda.graph(graph):
                entry.outputs = pipeline(*entry.inputs)
        except RuntimeError as exc:  # e.g. an operation that cannot be captured: stay eager
            entry.error, entry.inputs, entry.outputs = str(exc).splitlines()[0] if str(exc) else type(exc).__name__, (), ()
            return pipeline(q.contiguous(), k.contiguous(), v.contiguous())
        entry.graph = graph
    else:
        for static, t in zip(entry.inputs, (q, k, v)):
            static.copy_(t)
    entry.graph.replay()
    return tuple(t.clone() for t in entry.outputs)
