"""Prefill + decode loop with exact timings and per-layer statistics.

Our own loop rather than `model.generate`, so that each phase is timed on its own: the prefill is
one forward over the prompt (per-layer times from forward hooks: CUDA events on the GPU, so the
timing does not stall it), TTFT adds the selection of the first token, and decoding is one forward
per token with the KV cache. SampleAttention applies to the prefill only.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sacli.config import Settings
from sacli.errors import ModelError
from sacli.models.attention import AttentionCollector, sparse_context
from sacli.models.loading import LoadedModel

# End-of-turn markers of common chat templates; a generation_config often lists only the
# end-of-text token, so these are added when the vocabulary has them.
_CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


@dataclass
class LayerStat:
    layer: int
    # prefill wall time of the whole decoder layer (attention + MLP)
    ms: float
    # kept / causal attention entries in the prefill, averaged over heads
    density: float


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    ttft_ms: float
    prefill_ms: float
    prefill_tokens_per_s: float
    # excludes the first token, which belongs to the TTFT
    decode_tokens_per_s: float
    # 1 - kept / causal attention entries over all layers and heads of the prefill; 0.0 when dense
    sparsity: float
    # "dense" (--dense), or the routing modes of the prefill joined by "+": "sparse",
    # "dense_short" (prompt below dense_below), "dense_masked", "dense_softcap"
    attention: str
    layers: list[LayerStat]
    # part of the TTFT spent waiting for the kernels' warm-up (models/warmup.py) to finish
    warmup_wait_ms: float = 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def eos_token_ids(lm: LoadedModel) -> set[int]:
    """Token ids that end an answer: generation config, model config, tokenizer, chat end markers."""
    ids: set[int] = set()
    gen = getattr(lm.model, "generation_config", None)
    ids.update(_ids(getattr(gen, "eos_token_id", None)))
    ids.update(_ids(getattr(lm.model.config, "eos_token_id", None)))
    ids.update(_ids(getattr(lm.tokenizer, "eos_token_id", None)))
    vocab = lm.tokenizer.get_vocab()
    ids.update(vocab[t] for t in _CHAT_END_TOKENS if t in vocab)
    return ids


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder blocks, in order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ModelError(f"cannot find the decoder layers of {type(model).__name__}")
    return list(layers)


class _LayerTimer:
    """Forward hooks timing each decoder layer.

    On CUDA each layer is bracketed by two recorded events, read once the forward is done: a
    synchronisation around every layer would leave the GPU idle while the CPU issues the next
    layer's kernels, which lengthens the prefill it measures (most at short prompts, where a
    layer's GPU time is close to the time to issue it). Each layer's end hook waits for the
    previous layer's end event, so the GPU always has one layer queued while the progress
    callback trails it by at most one layer. Elsewhere the work is synchronous and the hooks
    read the clock."""

    def __init__(self, layers: list[torch.nn.Module], device: torch.device, on_layer: Callable[[int, int], None] | None):
        self.device = device
        self.on_layer = on_layer
        self.ms = [0.0] * len(layers)
        self._cuda = device.type == "cuda"
        self._start = [0.0] * len(layers)
        self._events: list[list[tuple[torch.cuda.Event, torch.cuda.Event]]] = [[] for _ in layers]
        self._last_end: torch.cuda.Event | None = None
        self._done = 0
        self._handles = []
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre(i)))
            self._handles.append(layer.register_forward_hook(self._post(i)))

    def _pre(self, i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if self._cuda:
                start = torch.cuda.Event(enable_timing=True)
                start.record(torch.cuda.current_stream(self.device))
                self._events[i].append((start, start))
            else:
                self._start[i] = time.perf_counter()

        return hook

    def _post(self, i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if self._cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record(torch.cuda.current_stream(self.device))
                start, _ = self._events[i][-1]
                self._events[i][-1] = (start, end)
                previous, self._last_end = self._last_end, end
                if previous is not None:
                    previous.synchronize()
                    self._report(i)
            else:
                self.ms[i] += (time.perf_counter() - self._start[i]) * 1e3
                self._report(i + 1)

        return hook

    def _report(self, done: int) -> None:
        self._done = done
        if self.on_layer is not None:
            self.on_layer(done, len(self.ms))

    def finish(self) -> None:
        """After the forward: waits for the GPU, reads the events, reports every layer done."""
        if self._cuda:
            _sync(self.device)
            for i, pairs in enumerate(self._events):
                self.ms[i] = sum(start.elapsed_time(end) for start, end in pairs)
        if self._done < len(self.ms):
            self._report(len(self.ms))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _select(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Next token (1, 1) from last-position logits (1, V)."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1)


class _TextStream:
    """Emits the decoded text incrementally; holds back an incomplete multi-byte character."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None] | None):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.emitted = ""

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, ids: list[int], final: bool = False) -> None:
        text = self.text(ids)
        if not final and text.endswith("\ufffd"):
            return
        if self.on_text is not None and text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted):])
        if text.startswith(self.emitted):
            self.emitted = text


def _layer_stats(timer: _LayerTimer, collector: AttentionCollector, layers: list[torch.nn.Module]) -> list[LayerStat]:
    stats = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        idx = getattr(attn, "layer_idx", i)
        stats.append(LayerStat(layer=i, ms=timer.ms[i], density=collector.layer_density(idx)))
    return stats


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which the model's forward takes its KV cache: `cache` in newer
    transformers (which warn on every call given the old name), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    settings: Settings,
    *,
    on_text: Callable[[str], None] | None = None,
    on_layer: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Answer the prompt `input_ids` (1, S) int64; stops at an end token or settings.max_new_tokens."""
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (1, S), got {tuple(input_ids.shape)}")
    model, device = lm.model, lm.device
    ids = input_ids.to(device)
    prompt_tokens = ids.shape[1]
    eos = eos_token_ids(lm)
    layers = decoder_layers(model)
    stream = _TextStream(lm.tokenizer, on_text)

    with sparse_context(settings) as collector:
        cache = DynamicCache(config=model.config)
        with_cache = {cache_argument(model): cache, "use_cache": True}
        timer = _LayerTimer(layers, device, on_layer)
        try:
            _sync(device)
            t0 = time.perf_counter()
            if lm.warmup is not None:  # what loading the weights did not hide counts here
                lm.warmup.wait()
            t_wait = time.perf_counter()
            out = model(input_ids=ids, **with_cache, logits_to_keep=1)
            _sync(device)
            t1 = time.perf_counter()
            timer.finish()
        finally:
            timer.remove()
        token = _select(out.logits[:, -1, :], settings.temperature)
        _sync(device)
        t2 = time.perf_counter()
        # the prefill statistics are complete; decode calls (one query row) are not recorded
        layer_stats = _layer_stats(timer, collector, layers)
        sparsity = 0.0 if settings.dense else collector.sparsity()
        attention = "dense" if settings.dense else collector.routes()

        generated: list[int] = []
        decode_steps = 0
        t_decode = time.perf_counter()
        while True:
            tok = int(token.item())
            if tok in eos:
                break
            generated.append(tok)
            stream.update(generated)
            if len(generated) >= settings.max_new_tokens:
                break
            out = model(input_ids=token.view(1, 1), **with_cache)
            token = _select(out.logits[:, -1, :], settings.temperature)
            decode_steps += 1
        _sync(device)
        decode_s = time.perf_counter() - t_decode

    stream.update(generated, final=True)
    prefill_s = t1 - t0
    return GenerationResult(
        text=stream.text(generated),
        prompt_tokens=prompt_tokens,
        new_tokens=len(generated),
        ttft_ms=(t2 - t0) * 1e3,
        prefill_ms=prefill_s * 1e3,
        prefill_tokens_per_s=prompt_tokens / prefill_s if prefill_s > 0 else 0.0,
        decode_tokens_per_s=decode_steps / decode_s if decode_steps and decode_s > 0 else 0.0,
        sparsity=sparsity,
        attention=attention,
        layers=layer_stats,
        warmup_wait_ms=(t_wait - t0) * 1e3,
    )
