"""Which implementation runs stage 1 and stage 3: Triton kernels or the PyTorch reference.

Order of precedence, decided on every call:
1. the `backend` argument ("torch", "triton" or "auto"),
2. the environment variable SACLI_KERNEL_BACKEND (same values), read at call time so tests
   can switch paths with monkeypatch,
3. auto: Triton when every tensor is on CUDA and `triton` imports, the reference otherwise.

Asking for "triton" explicitly also works on CPU tensors under TRITON_INTERPRET=1, which is
how tests compare the two paths without a GPU. The Triton modules are imported only when
chosen, so this module (and the package) import without Triton installed.
Stage 2 (`selection_stage`) is `select_columns` (PyTorch) on the torch backend and one Triton
program per head on the Triton backend, which also hands the sparse kernel its per-block column
counts (`sparse_attention(..., counts=)`) and the density.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Callable

import torch

from . import reference
from .selection import Selection, select_columns

ENV_VAR = "SACLI_KERNEL_BACKEND"
BACKENDS = ("torch", "triton")


class KernelBackendError(RuntimeError):
    """The requested kernel backend is unknown or cannot be loaded."""


@functools.cache
def triton_available() -> bool:
    """True when `import triton` succeeds (checked once per process)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Resolve the backend for a call on `tensors`: "torch" or "triton"."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "")
    name = name.strip().lower() or "auto"
    if name == "auto":
        if tensors and all(t.is_cuda for t in tensors) and triton_available():
            return "triton"
        return "torch"
    if name not in BACKENDS:
        source = "backend argument" if backend is not None else f"${ENV_VAR}"
        raise KernelBackendError(
            f"unknown kernel backend {name!r} from {source}; expected torch, triton or auto"
        )
    return name


def _triton_function(module: str, function: str) -> Callable[..., Any]:
    try:
        mod = importlib.import_module(f"sacli.kernels.{module}")
    except ImportError as exc:
        raise KernelBackendError(
            f"kernel backend 'triton' was requested but sacli.kernels.{module} cannot be imported: {exc}"
        ) from exc
    try:
        return getattr(mod, function)
    except AttributeError:
        raise KernelBackendError(f"sacli.kernels.{module} has no {function}()") from None


def column_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    window_tokens: int,
    scale: float,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 on the chosen backend; shapes and semantics as `reference.column_scores`."""
    if choose_backend(backend, q, k) == "triton":
        return _triton_function("triton_sampling", "column_scores_triton")(q, k, rows, window_tokens, scale)
    return reference.column_scores(q, k, rows, window_tokens, scale)


def selection_stage(
    scores: torch.Tensor,
    window_mass: torch.Tensor,
    alpha: float,
    window_tokens: int,
    seq_len: int,
    *,
    backend: str | None = None,
) -> tuple[Selection, torch.Tensor | None, torch.Tensor]:
    """Stage 2 on the chosen backend: (sel, counts, density).

    sel as `select_columns(scores, window_mass, alpha, window_tokens, seq_len)`; density
    (B, Hq) float32 = sel.density(). counts: on the Triton backend the sparse kernel's per-block
    column counts (pass them to `sparse_attention`), None on the torch backend.
    """
    if choose_backend(backend, scores, window_mass) == "triton":
        count_rows = _triton_function("triton_sparse", "count_block")()
        return _triton_function("triton_selection", "select_columns_triton")(
            scores, window_mass, alpha, window_tokens, seq_len, count_rows
        )
    sel = select_columns(scores, window_mass, alpha, window_tokens, seq_len)
    return sel, None, sel.density().to(torch.float32)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: Selection,
    scale: float,
    *,
    backend: str | None = None,
    counts: torch.Tensor | None = None,
    window_hint: int | None = None,
) -> torch.Tensor:
    """Stage 3 on the chosen backend; shapes and semantics as `reference.sparse_attention`.
    counts: the Triton backend's per-block column counts from `selection_stage` (optional; the
    launcher computes them when absent); window_hint: the window in tokens where the host knows
    it (it picks the Triton kernel's loop structure for the band); both ignored by the torch
    backend."""
    if choose_backend(backend, q, k, v) == "triton":
        return _triton_function("triton_sparse", "sparse_attention_triton")(q, k, v, sel, scale, counts=counts,
                                                                            window_hint=window_hint)
    return reference.sparse_attention(q, k, v, sel, scale)
