"""SampleAttention kernels: Triton on CUDA, PyTorch reference elsewhere."""

from .api import AttentionStats, crossover_tokens, sample_attention
from .backend import KernelBackendError, choose_backend, column_scores, sparse_attention
from .reference import dense_attention
from .selection import Selection, fraction_to_tokens, sample_rows, select_columns, selection_mask

__all__ = [
    "crossover_tokens",
    "AttentionStats",
    "KernelBackendError",
    "Selection",
    "choose_backend",
    "column_scores",
    "dense_attention",
    "fraction_to_tokens",
    "sample_attention",
    "sample_rows",
    "select_columns",
    "selection_mask",
    "sparse_attention",
]
