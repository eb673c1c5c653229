"""SampleAttention inside Hugging Face models: exactness against the models' own attention, the
sparse route, generation, and the context limit, on tiny random-weight models built here."""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from sacli.config import Settings
from sacli.errors import ContextLimitError
from sacli.models.attention import sparse_context
from sacli.models.generate import generate
from sacli.models.loading import context_limit, load_model

VOCAB = 128
SEQ = 97

# (config class, overrides, reference attention). Head counts vary the GQA ratio (4, 2, 1, 3).
# Gemma 2 soft-caps its attention logits, which SDPA ignores, so its reference is eager attention;
# its small sliding window makes half of its layers masked.
ARCHS = {
    "llama": (LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=1), "sdpa"),
    "qwen2": (Qwen2Config, dict(num_attention_heads=4, num_key_value_heads=2), "sdpa"),
    "mistral": (MistralConfig, dict(num_attention_heads=4, num_key_value_heads=4, sliding_window=4096), "sdpa"),
    "phi3": (Phi3Config, dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2), "sdpa"),
    "gemma2": (Gemma2Config, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16),
               "eager"),
}
SPARSE_ARCHS = [a for a in ARCHS if a != "gemma2"]

EXACT = Settings(alpha=1.0, window=1.0, sample_ratio=0.1, dense_below=0)
SPARSE = Settings(alpha=0.6, window=0.05, sample_ratio=0.2, dense_below=0)


def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, VOCAB)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}",
    )


def make_tiny(root: Path, arch: str, **overrides) -> Path:
    """Save a random-weight model of `arch` (2 layers, hidden 64) with a word-level tokenizer."""
    cls, extra, _ = ARCHS[arch]
    params = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=VOCAB,
                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    params.update(extra)
    params.update(overrides)
    torch.manual_seed(zlib.crc32(arch.encode()))
    model = AutoModelForCausalLM.from_config(cls(**params))
    path = root / arch
    model.save_pretrained(str(path))
    _tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = make_tiny(root, arch)
        return made[arch]

    return get


def _reference(path: Path, arch: str):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=ARCHS[arch][2]).eval()


def _ids(seed: int, length: int = SEQ) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, length), generator=gen)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_exact_settings_match_model_attention(tiny, arch):
    path = tiny(arch)
    lm = load_model(path, EXACT, SEQ + 8)
    ids = _ids(1)
    with torch.inference_mode():
        expected = _reference(path, arch)(ids).logits
        with sparse_context(EXACT) as collector:
            got = lm.model(ids).logits
    assert lm.model.config._attn_implementation == "sacli_sample"
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    routes = collector.routes()
    assert routes == ("dense_softcap" if arch == "gemma2" else "sparse")
    assert collector.layers() == [0, 1]
    assert collector.sparsity() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("arch", SPARSE_ARCHS)
def test_sparse_settings_change_logits_and_report_density(tiny, arch):
    path = tiny(arch)
    lm = load_model(path, SPARSE, SEQ + 8)
    ids = _ids(2)
    with torch.inference_mode():
        with sparse_context(EXACT):
            exact = lm.model(ids).logits
        with sparse_context(SPARSE) as collector:
            sparse = lm.model(ids).logits
    assert torch.isfinite(sparse).all()
    assert (sparse - exact).abs().max() > 1e-4
    assert collector.routes() == "sparse"
    assert 0.0 < collector.sparsity() < 1.0
    assert all(collector.layer_density(layer) < 1.0 for layer in collector.layers())


def test_dense_below_routes_short_prompts_to_dense(tiny):
    lm = load_model(tiny("llama"), SPARSE, SEQ + 8)
    settings = dataclasses.replace(SPARSE, dense_below=SEQ + 1)
    with torch.inference_mode(), sparse_context(settings) as collector:
        lm.model(_ids(3))
    assert collector.routes() == "dense_short"
    assert collector.sparsity() == 0.0


def test_padded_batch_uses_the_mask(tiny):
    # a padding mask is materialised by transformers' SDPA mask builder and must be honoured
    path = tiny("qwen2")
    lm = load_model(path, SPARSE, SEQ + 8)
    ids = _ids(4).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    with torch.inference_mode():
        expected = _reference(path, "qwen2")(ids, attention_mask=mask).logits
        with sparse_context(SPARSE) as collector:
            got = lm.model(ids, attention_mask=mask).logits
    assert collector.routes() == "dense_masked"
    torch.testing.assert_close(got[:, 10:], expected[:, 10:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_generate_matches_model_generate(tiny, arch):
    path = tiny(arch)
    settings = dataclasses.replace(EXACT, max_new_tokens=12)
    lm = load_model(path, settings, SEQ + 12)
    ids = _ids(5)
    chunks: list[str] = []
    layers_seen: list[tuple[int, int]] = []
    result = generate(lm, ids, settings, on_text=chunks.append, on_layer=lambda i, n: layers_seen.append((i, n)))
    with torch.inference_mode():
        ref = _reference(path, arch).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                             do_sample=False)
    expected = lm.tokenizer.decode(ref[0, SEQ:], skip_special_tokens=True)
    assert result.text == expected
    assert "".join(chunks) == result.text
    assert result.prompt_tokens == SEQ
    assert 1 <= result.new_tokens <= 12
    assert layers_seen == [(1, 2), (2, 2)]
    assert [s.layer for s in result.layers] == [0, 1]
    assert all(s.ms > 0 and s.density == pytest.approx(1.0) for s in result.layers)
    assert result.ttft_ms >= result.prefill_ms > 0
    assert result.prefill_tokens_per_s > 0
    assert result.attention == "sparse"
    assert result.sparsity == pytest.approx(0.0, abs=1e-9)


def test_generate_sparse_and_dense_modes(tiny):
    lm = load_model(tiny("mistral"), SPARSE, SEQ + 8)
    ids = _ids(6)
    sparse = generate(lm, ids, dataclasses.replace(SPARSE, max_new_tokens=4))
    assert sparse.attention == "sparse"
    assert 0.0 < sparse.sparsity < 1.0
    assert all(s.density < 1.0 for s in sparse.layers)
    dense = generate(lm, ids, dataclasses.replace(SPARSE, max_new_tokens=4, dense=True))
    assert dense.attention == "dense"
    assert dense.sparsity == 0.0
    assert all(s.density == 1.0 for s in dense.layers)


def test_generate_passes_the_cache_under_the_models_own_name(tiny):
    import inspect
    import warnings

    from sacli.models.generate import cache_argument

    lm = load_model(tiny("llama"), EXACT, SEQ + 8)
    assert cache_argument(lm.model) in inspect.signature(lm.model.forward).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # newer transformers warn on the old name
        result = generate(lm, _ids(3), dataclasses.replace(EXACT, max_new_tokens=3))
    assert 1 <= result.new_tokens <= 3


def test_generate_with_temperature_samples(tiny):
    lm = load_model(tiny("llama"), EXACT, SEQ + 8)
    result = generate(lm, _ids(7), dataclasses.replace(EXACT, temperature=1.0, max_new_tokens=6))
    assert result.new_tokens <= 6
    assert result.decode_tokens_per_s >= 0.0


def test_context_limit_error_and_yarn(tmp_path):
    path = make_tiny(tmp_path, "llama", max_position_embeddings=64)
    settings = dataclasses.replace(EXACT, max_new_tokens=10)
    with pytest.raises(ContextLimitError, match=r"prompt needs 100 tokens \(90 prompt \+ 10 new\) but llama "
                                                r"was trained for 64; use --rope-scale yarn"):
        load_model(path, settings, 100)
    lm = load_model(path, dataclasses.replace(settings, rope_scale="yarn"), 100)
    assert lm.rope_scaled and lm.context_limit == 100
    rope = lm.model.config.rope_parameters
    assert rope["rope_type"] == "yarn"
    assert rope["factor"] == pytest.approx(100 / 64)
    assert rope["original_max_position_embeddings"] == 64
    with torch.inference_mode(), sparse_context(settings):
        logits = lm.model(_ids(8, 90)).logits
    assert torch.isfinite(logits).all()
    # within the limit nothing changes
    plain = load_model(path, settings, 64)
    assert not plain.rope_scaled and plain.context_limit == 64


def test_context_limit_honours_rope_scaling_in_config(tmp_path):
    path = make_tiny(tmp_path, "llama", max_position_embeddings=128)
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                 "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(config))
    assert context_limit(path) == 512


_ROPES = [
    None,
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0},
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"type": "dynamic", "factor": 3.0},  # the older key and name
]


# Phi-3's config accepts only its own (longrope) scaling: transformers refuses the others
@pytest.mark.parametrize("arch, rope", [(a, r) for a in sorted(ARCHS) for r in _ROPES if r is None or a != "phi3"])
def test_the_listing_reads_the_context_as_loading_does(tmp_path, arch, rope):
    """`sacli models` reads the context from config.json without transformers; where it gives a
    number, it is the one transformers' reading gives (a None makes the listing ask transformers)."""
    from sacli.models.registry import config_context

    path = make_tiny(tmp_path, arch, max_position_embeddings=128)
    config = json.loads((path / "config.json").read_text())
    if rope is not None:
        config.pop("rope_parameters", None)
        config["rope_scaling" if "type" in rope else "rope_parameters"] = rope
        (path / "config.json").write_text(json.dumps(config))
    plain = config_context(json.loads((path / "config.json").read_text()))
    assert plain is not None
    assert plain == context_limit(path)


def test_the_listing_asks_transformers_when_the_file_does_not_say():
    from sacli.models.registry import config_context

    assert config_context({"n_positions": 1024}) is None  # another name for it: transformers maps it
    assert config_context({"max_position_embeddings": 128, "rope_scaling": "yarn"}) is None
    assert config_context({"max_position_embeddings": 128, "rope_parameters": {"rope_type": "yarn", "factor": "4"}}) is None
    assert config_context({"max_position_embeddings": 128, "rope_parameters": {"rope_type": "default"}}) == 128


class _ByteTokenizer:
    """Each token is one UTF-8 byte, so multi-byte characters span several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_partial_characters():
    from sacli.models.generate import _TextStream

    text = "naïve 😀 café"
    data = list(text.encode("utf-8"))
    chunks: list[str] = []
    stream = _TextStream(_ByteTokenizer(), chunks.append)
    for n in range(1, len(data) + 1):
        stream.update(data[:n])
    stream.update(data, final=True)
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)


def test_half_precision_head_returns_float32_logits_that_break_bfloat16_ties():
    from sacli.models.loading import float32_logits

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = torch.nn.Linear(2, 3, bias=False, dtype=torch.bfloat16)

        def get_output_embeddings(self) -> torch.nn.Module:
            return self.lm_head

    m = Tiny()
    with torch.no_grad():
        # logits 20, 20.0625, 1: the first two round to the same bfloat16 (spacing 0.125 there)
        m.lm_head.weight.copy_(torch.tensor([[20.0, 0.0], [20.0, 0.0625], [1.0, 0.0]]))
    x = torch.tensor([[[1.0, 1.0]]], dtype=torch.bfloat16)
    tied = m.lm_head(x)
    assert tied[0, 0, 0] == tied[0, 0, 1] and int(tied.argmax(-1)) == 0
    assert float32_logits(m)
    logits = m.lm_head(x)
    assert logits.dtype == torch.float32 and logits.shape == (1, 1, 3)
    assert torch.equal(logits, x.float() @ m.lm_head.weight.float().t())
    assert int(logits.argmax(-1)) == 1


def test_the_float32_head_is_freed_with_its_model(tiny):
    """The float32 head makes no reference cycle (a bound method set on the head did, which kept
    the head and its weight, the tied embedding, alive until a garbage collection)."""
    import gc
    import weakref

    lm = load_model(tiny("llama"), dataclasses.replace(EXACT, dtype="bfloat16"), SEQ + 8)
    head = lm.model.get_output_embeddings()
    assert head(torch.zeros(1, 1, 64, dtype=torch.bfloat16)).dtype == torch.float32
    ref = weakref.ref(head)
    gc.disable()
    try:
        del lm, head
        assert ref() is None
    finally:
        gc.enable()


def test_release_memory_frees_a_model_kept_by_a_cycle(tiny):
    import gc
    import weakref

    from sacli.models.loading import release_memory

    lm = load_model(tiny("llama"), EXACT, SEQ + 8)
    ref = weakref.ref(lm.model)
    gc.disable()
    try:
        lm.model.keep = [lm.model]  # a cycle, as transformers' loading can leave one
        del lm
        assert ref() is not None
        release_memory()
        assert ref() is None
    finally:
        gc.enable()


def test_float32_logits_leaves_float32_heads_alone(tiny):
    from sacli.models.loading import float32_logits

    model = AutoModelForCausalLM.from_pretrained(str(tiny("llama")), dtype=torch.float32)
    forward = model.lm_head.forward
    assert not float32_logits(model)
    assert model.lm_head.forward == forward


def test_bfloat16_model_gives_float32_logits(tiny):
    settings = dataclasses.replace(EXACT, dtype="bfloat16", device="cpu")
    lm = load_model(tiny("llama"), settings, SEQ)
    ids = _ids(5)
    with torch.no_grad():
        hidden = lm.model.model(input_ids=ids).last_hidden_state
        logits = lm.model(input_ids=ids).logits
    assert logits.dtype == torch.float32
    assert torch.equal(logits, hidden.float() @ lm.model.lm_head.weight.float().t())
