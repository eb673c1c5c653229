"""Shared fixtures: an isolated home for every test, and a tiny random-weight chat model.

The tiny model is a 2-layer Llama with a byte-level tokenizer (one token per byte, no merges) and a
ChatML template, saved as safetensors in a temporary directory: every CLI path that needs a model
runs in seconds without a download.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import os

import pytest
import torch

from sacli.config import Settings

# Triton reads this flag when triton.language is first imported, so it must be set before any test
# module imports triton: on a machine without CUDA the kernels run in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_CONTEXT = 512
TINY_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME, config, cache and model store of each test live in a fresh temporary directory."""
    home = tmp_path_factory.mktemp("home")
    for var in ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME"):
        monkeypatch.setenv(var, str(home / var.lower()) if var != "HOME" else str(home))
    monkeypatch.setenv("SACLI_HOME", str(home / "sacli"))
    monkeypatch.setenv("SACLI_CONFIG", str(home / "sacli-config.toml"))
    # settings from the developer's environment must not leak into tests
    for f in fields(Settings):
        monkeypatch.delenv(f"SACLI_{f.name.upper()}", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    return home


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=TINY_TEMPLATE,
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a random-weight Llama (context TINY_CONTEXT tokens) with the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_CONTEXT,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert any(path.glob("*.safetensors")), "tiny model must be saved as safetensors"
    return path


@pytest.fixture()
def runner():
    from typer.testing import CliRunner

    return CliRunner()
