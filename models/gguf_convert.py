"""One-time conversion of a GGUF file into a standard Hugging Face directory (bf16 safetensors).

transformers reads the GGUF (weights dequantized to fp32, tokenizer and chat template rebuilt from
the GGUF metadata); we drop the GGUF quantization record so the model saves as an ordinary dense
checkpoint, set the special tokens from the GGUF metadata ids, and check that the saved directory
reloads without the GGUF and predicts the same tokens.
"""

from __future__ import annotations

import io
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from sacli.errors import ModelError
from sacli.models.loading import no_transformers_bars

# Greedy tokens compared between the GGUF model and the reloaded bf16 directory.
_CHECK_TOKENS = 8
_CHECK_PROMPT = "What is the capital of France?"


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' bars and warnings; the caller's progress display is the one shown.

    The GGUF reader draws a plain tqdm bar that no transformers switch turns off, so stderr is
    captured while it runs; errors still surface as exceptions.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with no_transformers_bars(), redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _fix_special_tokens(tokenizer: Any, model: Any) -> None:
    # transformers' GGUF tokenizer conversion can mislabel the special tokens (eos read as
    # <|im_start|> for SmolLM2) while the model config carries the GGUF metadata ids correctly;
    # the ids are authoritative.
    vocab_size = len(tokenizer)
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(model.config, f"{role}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
            if role != "unk":
                setattr(model.generation_config, f"{role}_token_id", token_id)
    # clean-up of tokenization spaces is meant for WordPiece and corrupts BPE output
    tokenizer.clean_up_tokenization_spaces = False


def _drop_quantization(model: Any) -> None:
    """Make the dequantized model an ordinary dense one, so save_pretrained accepts it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for name, param in model.named_parameters():
        if not param.dtype.is_floating_point or type(param.data) is not torch.Tensor:
            raise ModelError(f"GGUF conversion left {name} packed ({param.dtype}); cannot save it as safetensors")


def _greedy(model: Any, input_ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy continuation; the plain SDPA path, independent of sacli's attention."""
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=steps,
                         do_sample=False, pad_token_id=model.config.eos_token_id)
    return out[0, input_ids.shape[1]:].tolist()


def _check_prompt(tokenizer: Any) -> torch.Tensor:
    messages = [{"role": "user", "content": _CHECK_PROMPT}]
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    else:
        ids = tokenizer(_CHECK_PROMPT)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def convert_gguf(gguf_path: Path, dest: Path, *, step: Callable[[str], None] = lambda _: None) -> None:
    """Write a Hugging Face directory for `gguf_path` into the existing empty directory `dest`.

    dest receives config.json, generation_config.json, model.safetensors (bfloat16) and the
    tokenizer files (tokenizer.json, tokenizer_config.json with the chat template).
    `step(description)` is called as each stage starts.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    with _quiet_transformers(), torch.inference_mode():
        step("reading GGUF")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                gguf_file=name,
                dtype=torch.float32,
                # unpack every block now: the directory we write holds plain dense weights
                quantization_config=GgufConfig(dequantize=True),
                attn_implementation="sdpa",
                local_files_only=True,
            )
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
            raise ModelError(f"cannot read {gguf_path}: {str(exc).strip().splitlines()[0]}") from None
        _drop_quantization(model)
        _fix_special_tokens(tokenizer, model)
        model.eval()

        step("checking GGUF model")
        prompt = _check_prompt(tokenizer)
        expected = _greedy(model, prompt, _CHECK_TOKENS)

        step("writing safetensors")
        model.to(torch.bfloat16)
        model.config.dtype = torch.bfloat16
        model.save_pretrained(str(dest))
        tokenizer.save_pretrained(str(dest))
        del model

        step("verifying converted model")
        reloaded = AutoModelForCausalLM.from_pretrained(
            str(dest), dtype=torch.float32, use_safetensors=True, local_files_only=True,
            trust_remote_code=False, attn_implementation="sdpa",
        ).eval()
        got = _greedy(reloaded, prompt, _CHECK_TOKENS)
    if got != expected:
        raise ModelError(
            f"converted model of {gguf_path.name} disagrees with the GGUF (greedy tokens {got} vs {expected})"
        )
