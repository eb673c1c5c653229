"""The sparse prefill's GPU kernels made ready while the model's weights load.

A new process pays, at its first sparse prefill, for what Triton does once per process:
starting its driver, hashing its own sources for the kernel cache, loading every kernel
(compiling and autotuning it the first time on a machine). On an H100 that made the first
decoder layer of a new `sacli ask` take 0.91-0.95 s at 32K tokens, against 0.20-0.22 s with
this warm-up, and the whole TTFT 1.16-1.21 s against 0.38-0.43 s (dense: 0.48-1.10 s;
benchmarks/raw/v20_process_start.json, docs/BENCHMARKS.md "A new process").

`prepare()` starts Triton's set-up in a thread as soon as the input's size says the prompt may
reach the sparse prefill (while the tokenizer loads). `start()` then runs one sparse attention
call of the prompt's length and the model's head shape on random data, in a thread on its own
CUDA stream, while `load_model` reads the weights.
`Warmup.wait()` (called by `generate` inside the timed prefill) joins it, so the part not
hidden behind loading still counts in TTFT. Only the kernels are warmed: the call runs
without CUDA graphs, and nothing of it is kept but Triton's own caches. A failure here is
ignored: the prefill then does the same work itself, as before.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from sacli.config import Settings

ENV_VAR = "SACLI_KERNEL_WARMUP"  # "0": no warm-up (the prefill readies its kernels itself)


class Warmup:
    """`target()` running in a daemon thread; an exception it raises is kept in `error`."""

    def __init__(self, target: Any, name: str = "sacli-warmup") -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target,), name=name, daemon=True)
        self._thread.start()

    def _run(self, target: Any) -> None:
        try:
            target()
        except Exception as exc:  # the prefill will do (and report) the same work itself
            self.error = exc

    def wait(self) -> None:
        self._thread.join()


_prepared: Warmup | None = None


def _sparse_path(settings: Settings, device: torch.device, tokens: int) -> bool:
    """Whether a prefill of `tokens` tokens runs the Triton pipeline (as models/attention.py
    routes it) and the warm-up is wanted."""
    from sacli.kernels.api import crossover_tokens
    from sacli.kernels.backend import triton_available

    if os.environ.get(ENV_VAR, "1").strip() == "0":
        return False
    threshold = settings.dense_below if settings.dense_below >= 0 else crossover_tokens(device)
    if device.type != "cuda" or settings.dense or settings.rule != "sample" or tokens < max(threshold, 2):
        return False
    return triton_available()


def _prepare() -> None:
    import triton
    from triton.runtime.cache import triton_key

    from sacli.kernels import triton_sampling, triton_selection, triton_sparse  # noqa: F401

    triton.runtime.driver.active.get_current_target()
    triton_key()


def prepare(settings: Settings, text_bytes: int) -> None:
    """Start Triton's once-per-process set-up (its driver, the hash of its sources that keys its
    kernel cache, the kernel modules) in a thread, while the tokenizer loads and the text is read,
    when a prompt of `text_bytes` bytes may reach the sparse prefill (a token spans at least one
    byte; 4096 tokens of slack for the template and the question)."""
    global _prepared
    if _prepared is not None or not settings.device.startswith(("auto", "cuda")) or not torch.cuda.is_available():
        return
    if _sparse_path(settings, torch.device("cuda"), text_bytes + 4096):
        _prepared = Warmup(_prepare, name="sacli-triton-setup")


def head_shape(config: Any) -> tuple[int, int, int]:
    """(query heads, key-value heads, head dim) of a transformers config."""
    hq = int(config.num_attention_heads)
    hkv = int(getattr(config, "num_key_value_heads", None) or hq)
    d = int(getattr(config, "head_dim", None) or config.hidden_size // hq)
    return hq, hkv, d


def start(settings: Settings, config: Any, device: torch.device, dtype: torch.dtype, tokens: int) -> Warmup | None:
    """Warm the kernels a prefill of `tokens` tokens will run, or None when it runs none of
    them (CPU, dense, a rule whose stage 1 is PyTorch, a prompt routed to dense) or
    $SACLI_KERNEL_WARMUP is 0."""
    if not _sparse_path(settings, device, tokens):
        return None
    hq, hkv, d = head_shape(config)
    if device.index is None:  # the thread's set_device needs the index
        device = torch.device("cuda", torch.cuda.current_device())

    def run() -> None:
        from sacli.kernels import sample_attention

        if _prepared is not None:
            _prepared.wait()
        torch.cuda.set_device(device)
        stream = torch.cuda.Stream(device)
        with torch.inference_mode(), torch.cuda.stream(stream):
            # the layouts the model passes: queries a view of the projection's (B, S, H, D)
            # output, keys and values contiguous (B, H, S, D) from the cache
            q = torch.randn(1, tokens, hq, d, device=device, dtype=dtype).transpose(1, 2)
            k = torch.randn(1, hkv, tokens, d, device=device, dtype=dtype)
            v = torch.randn(1, hkv, tokens, d, device=device, dtype=dtype)
            out, stats = sample_attention(
                q, k, v, alpha=settings.alpha, window=settings.window, sample_ratio=settings.sample_ratio,
                scale=d**-0.5, dense_below=0, rule="sample", graphs=False, chunk=settings.chunk,
            )
            del q, k, v, out, stats
        stream.synchronize()
        # the caching allocator keeps freed blocks for the stream that allocated them: hand them
        # back, or the prefill (on the default stream) could not use that memory
        torch.cuda.empty_cache()

    return Warmup(run)
