"""Loading a model directory for inference: device, dtype, context check, optional YaRN extension.

Only safetensors weights and the model classes shipped with transformers are accepted
(`trust_remote_code=False`); nothing is fetched from the network here.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from sacli.config import Settings
from sacli.errors import ContextLimitError, ModelError, UsageError
from sacli.models.attention import ATTENTION_NAME, register_attention
from sacli.models import warmup
from sacli.models.registry import STRETCHING_ROPE, validate_model_dir

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    name: str
    path: Path
    device: torch.device
    dtype: torch.dtype
    # usable context in tokens, after any RoPE scaling applied at load time
    context_limit: int
    rope_scaled: bool
    # the sparse kernels being readied for the first prompt while the weights loaded (warmup.py)
    warmup: warmup.Warmup | None = None


def _load_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot read the config of {path}: {_first_line(exc)}") from None


@contextmanager
def no_transformers_bars() -> Iterator[None]:
    """Hide transformers' tqdm bars (weight loading) for the enclosed calls; the caller owns stderr."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _rope_params(config: Any) -> dict | None:
    """The global RoPE parameter dict, or None when the config has none (or one per layer type)."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        return None
    if all(isinstance(v, dict) for v in params.values()):
        return None
    return params


def _config_limit(config: Any) -> int:
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        raise ModelError("the model config has no max_position_embeddings; cannot tell its context length")
    params = _rope_params(config)
    if params and params.get("rope_type") in STRETCHING_ROPE and params.get("factor"):
        original = params.get("original_max_position_embeddings") or limit
        limit = max(limit, int(original * float(params["factor"])))
    return limit


def context_limit(path: Path) -> int:
    """Context length the model supports as configured, in tokens (a stretching RoPE scaling counts)."""
    return _config_limit(_load_config(path))


def load_tokenizer(path: Path) -> Any:
    """The model's fast tokenizer, with its chat template when the directory has one."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot load the tokenizer of {path}: {_first_line(exc)}") from None


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise UsageError(f"unknown device {setting!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {setting!r} requested but CUDA is not available")
    return device


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        # bf16 halves memory traffic on GPUs; CPUs lack fast bf16 matmuls, so they stay in fp32
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if setting not in _DTYPES:
        raise UsageError(f"unknown dtype {setting!r}; use auto, float32, bfloat16 or float16")
    return _DTYPES[setting]


def apply_yarn(config: Any, needed_tokens: int, limit: int) -> int:
    """Extend `config` in place by YaRN so that `needed_tokens` fit; returns the new limit."""
    params = _rope_params(config)
    if params is None:
        raise ContextLimitError("this model has no single RoPE configuration; --rope-scale yarn cannot extend it")
    rope_type = params.get("rope_type", "default")
    if rope_type == "yarn":
        # already YaRN: stretch further from the same pre-training length
        original = int(params.get("original_max_position_embeddings") or config.max_position_embeddings)
    elif rope_type == "default":
        original = limit
    else:
        raise ContextLimitError(
            f"this model already uses {rope_type} RoPE scaling up to {limit} tokens; "
            "--rope-scale yarn cannot extend it further"
        )
    factor = needed_tokens / original
    kept = {k: v for k, v in params.items() if k in ("rope_theta", "partial_rotary_factor")}
    config.rope_parameters = {
        **kept,
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": original,
    }
    new_limit = math.ceil(original * factor)
    config.max_position_embeddings = new_limit
    return new_limit


class _Float32Linear(torch.nn.Linear):
    """A Linear whose forward returns float32 whatever the weights' dtype (no float32 weight copy
    on CUDA: the GEMM accumulates in float32 anyway and here also stores float32). Swapped in as
    the head's class: a bound method set on the instance instead made a reference cycle that kept
    the head and its weight (often the tied embedding) alive after its model was dropped, until
    Python's next full garbage collection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.is_cuda:
            out = torch.mm(x2, self.weight.t(), out_dtype=torch.float32)
        else:
            out = x2.float() @ self.weight.float().t()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.view(*x.shape[:-1], out.shape[-1])


def float32_logits(model: torch.nn.Module) -> bool:
    """Make the output head return float32 logits when its weights are half precision; True if
    it did. In bfloat16, logits around 20 are 0.125 apart, so the top two tokens often tie
    exactly and greedy decoding picks by index (measured: a 16K needle prompt whose answer
    hinged on such a tie, docs/FIDELITY.md); dense and sparse share the head, so comparisons
    stay like for like."""
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.weight.dtype == torch.float32:
        return False
    if head.weight.is_cuda:
        try:  # torch.mm's out_dtype: CUDA builds of torch >= 2.8
            torch.mm(head.weight[:1], head.weight[:1].t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            return False
    head.__class__ = _Float32Linear
    return True


def release_memory() -> None:
    """Free what dropped models still hold. A model whose last reference is gone can live on in
    reference cycles (transformers' loading leaves one through a frame of the first load) until
    Python's next full collection, with its GPU memory. Call it after dropping a model when
    another one loads in the same process (bench, eval). Whether lingering models slow later
    prefills was measured twice without a clear answer (docs/BENCHMARKS.md, "Time to first
    token")."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_model(
    path: Path, settings: Settings, needed_tokens: int, *, tokenizer: Any = None, prompt_tokens: int | None = None
) -> LoadedModel:
    """Load the model at `path` for a prompt of `needed_tokens` (prompt + max new tokens).

    tokenizer: the model's tokenizer when the caller already loaded it (load_tokenizer(path));
    None loads it here.
    prompt_tokens: the length of the first prompt, when known: the sparse prefill's GPU kernels
    for it are readied while the weights load (warmup.py; `generate` waits for them).

    Raises ContextLimitError when the tokens do not fit and settings.rope_scale == "none"; with
    "yarn" the RoPE is stretched by factor needed / limit instead.
    """
    from transformers import AutoModelForCausalLM

    path = validate_model_dir(Path(path))
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    config = _load_config(path)
    limit = _config_limit(config)
    rope_scaled = False
    if needed_tokens > limit:
        if settings.rope_scale != "yarn":
            new = min(settings.max_new_tokens, needed_tokens)
            raise ContextLimitError(
                f"prompt needs {needed_tokens} tokens ({needed_tokens - new} prompt + {new} new) but "
                f"{path.name} was trained for {limit}; use --rope-scale yarn to extend, or shorten the input"
            )
        limit = apply_yarn(config, needed_tokens, limit)
        rope_scaled = True

    register_attention()
    warm = warmup.start(settings, config, device, dtype, prompt_tokens) if prompt_tokens else None
    try:
        with no_transformers_bars():
            model = AutoModelForCausalLM.from_pretrained(
                str(path),
                config=config,
                dtype=dtype,
                device_map=str(device),
                use_safetensors=True,
                trust_remote_code=False,
                local_files_only=True,
                attn_implementation=ATTENTION_NAME,
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot load {path}: {_first_line(exc)}") from None
    model.eval()
    float32_logits(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer if tokenizer is not None else load_tokenizer(path),
        name=path.name,
        path=path,
        device=device,
        dtype=dtype,
        context_limit=limit,
        rope_scaled=rope_scaled,
        warmup=warm,
    )
