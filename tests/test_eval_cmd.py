"""`sacli eval` commands end to end on a tiny random Llama model built in a temp directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sacli.eval_cmd import app

BOOK = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness. There were a king with a large jaw and a queen with a plain face, on the throne of England. "
) * 40

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([BOOK, "The magic number is 1234567. What is the magic number?"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture()
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SACLI_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SACLI_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    book = tmp_path / "book.txt"
    book.write_text(BOOK, encoding="utf-8")
    return book


COMMON = ["--device", "cpu", "--dense-below", "0", "--window", "0.1", "--sample-ratio", "0.2"]


def test_fidelity_writes_json_and_png(tiny_model: Path, env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SACLI_TEMPERATURE", "0")
    out = tmp_path / "res" / "fid.json"
    args = ["fidelity", str(env), "--model", str(tiny_model), "--lengths", "300", "--out", str(out), "--json"]
    args += ["--rule", "product", "--rule", "adaptive", "--rule", "literal", "--rule", "segments", *COMMON]
    args += ["--sampled-levels", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert json.loads(out.read_text()) == data
    assert {"device", "date", "command"} <= set(data) and data["sampled_levels"] == 1
    assert data["sacli_environment"]["SACLI_TEMPERATURE"] == "0" and "SACLI_HOME" not in data["sacli_environment"]
    # measured under deterministic algorithms, and the global flag is restored afterwards
    assert data["deterministic"] is True and not torch.are_deterministic_algorithms_enabled()
    assert [r["rule"] for r in data["runs"]] == ["product", "adaptive", "literal", "segments"]
    for run in data["runs"]:
        s = run["summary"]
        for key in ("density_mean", "oracle_density_mean", "mass_mean", "err_mean", "err_max"):
            assert key in s
        assert s["heads"] == 2 * 6 == len(run["heads"])
        assert 0.0 < s["density_mean"] <= 1.0 and 0.0 <= s["err_mean"] <= s["err_max"]
        assert (out.parent / run["png"]).stat().st_size > 0


def test_ppl_dense_rule_equals_dense(tiny_model: Path, env: Path) -> None:
    # window 1.0: every head keeps every causal entry, so sparse must equal dense
    args = ["ppl", str(env), "--model", str(tiny_model), "--lengths", "256", "--last", "64", "--json"]
    args += ["--device", "cpu", "--dense-below", "0", "--window", "1.0", "--rule", "residual"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = json.loads(result.stdout)["runs"][0]
    assert run["positions"] == 64
    assert run["kl_mean"] == pytest.approx(0.0, abs=1e-5)
    assert run["top1_agreement"] == 1.0
    assert run["ppl_sparse"] == pytest.approx(run["ppl_dense"], rel=1e-4)


def test_ppl_exact_rule_is_the_arithmetic_floor(tiny_model: Path, env: Path) -> None:
    # "exact" keeps every entry through the sparse kernel whatever the knobs: in float32 on the
    # CPU the only difference from dense is summation order, so the floor is ~0
    args = ["ppl", str(env), "--model", str(tiny_model), "--lengths", "256", "--last", "64", "--json"]
    args += ["--rule", "exact", "--rule", "residual", *COMMON]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    exact, residual = json.loads(result.stdout)["runs"]
    assert exact["rule"] == "exact" and exact["routed"] == "sparse"
    assert exact["density_mean"] == 1.0
    assert exact["kl_mean"] == pytest.approx(0.0, abs=1e-5) and exact["top1_agreement"] == 1.0
    assert exact["ppl_sparse"] == pytest.approx(exact["ppl_dense"], rel=1e-4)
    assert residual["density_mean"] < 1.0  # same knobs, a real selection


def test_ppl_product_table(tiny_model: Path, env: Path) -> None:
    args = ["ppl", str(env), "--model", str(tiny_model), "--lengths", "256", "--last", "32", *COMMON]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "perplexity of the last 32 tokens" in result.stdout
    assert "product" in result.stdout and "256" in result.stdout


def test_niah_grid(tiny_model: Path, env: Path, tmp_path: Path) -> None:
    out = tmp_path / "niah.json"
    args = ["niah", str(env), "--model", str(tiny_model), "--lengths", "200,300", "--depths", "0,1"]
    args += ["-n", "4", "--rule", "product", "--rule", "exact", "--out", str(out), *COMMON]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["rule"] for r in data["runs"]] == ["product", "exact"]
    for run in data["runs"]:
        summary, cells = run["summary"], run["cells"]
        assert summary["cells"] == 4
        assert summary["retrieval_agreement"] == sum(c["dense_correct"] == c["sparse_correct"] for c in cells) / 4
        assert summary["agreement"] <= summary["retrieval_agreement"]
        assert {(c["length"], c["depth"]) for c in cells} == {(200, 0.0), (200, 1.0), (300, 0.0), (300, 1.0)}
        for c in cells:
            assert abs(c["prompt_tokens"] - c["length"]) <= 8
        assert (tmp_path / run["png"]).stat().st_size > 0
    # dense answers once per cell: every rule is compared with the same answer
    dense = [[c["dense_answer"] for c in run["cells"]] for run in data["runs"]]
    assert dense[0] == dense[1]
    assert data["runs"][1]["summary"]["density_mean"] == 1.0
    assert "exact" in result.stdout and "product" in result.stdout


def test_niah_trials_pool_the_runs_of_consecutive_seeds(tiny_model: Path, env: Path, tmp_path: Path) -> None:
    def grid(out: Path, *extra: str) -> dict:
        args = ["niah", str(env), "--model", str(tiny_model), "--lengths", "200,300", "--depths", "0.5"]
        result = CliRunner().invoke(app, [*args, "-n", "3", "--rule", "product", "--out", str(out), *extra, *COMMON])
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())["runs"][0]

    pooled = grid(tmp_path / "pooled.json", "--seed", "3", "--trials", "2")
    apart = [grid(tmp_path / f"s{s}.json", "--seed", str(s)) for s in (3, 4)]
    key = ("length", "number", "dense_answer", "sparse_answer", "agree")
    # trial t holds exactly the cells of a run with --seed 3 + t
    for t, run in enumerate(apart):
        got = [{k: c[k] for k in key} for c in pooled["cells"] if c["seed"] == 3 + t]
        assert got == [{k: c[k] for k in key} for c in run["cells"]]
        assert {c["seed"] for c in run["cells"]} == {3 + t}
    assert len({c["number"] for c in pooled["cells"]}) == 4, "every cell and trial has its own needle"
    summary = pooled["summary"]
    assert (summary["cells"], summary["trials"]) == (4, 2)
    assert summary["agreement"] == sum(r["summary"]["agreement"] for r in apart) / 2
    assert (tmp_path / pooled["png"]).stat().st_size > 0


def test_bad_inputs_raise_domain_errors(tiny_model: Path, env: Path, tmp_path: Path) -> None:
    from sacli.errors import ContextLimitError, InputError, UsageError

    def run(*args: str) -> BaseException | None:
        return CliRunner().invoke(app, [args[0], str(env), "--model", str(tiny_model), *args[1:]]).exception

    assert isinstance(run("fidelity", "--rule", "nope"), UsageError)
    assert isinstance(run("ppl", "--lengths", "12x"), UsageError)
    assert isinstance(run("niah", "--depths", "0,2"), UsageError)
    assert isinstance(run("niah", "--trials", "0"), UsageError)
    # over the trained context without --rope-scale yarn
    long_text = tmp_path / "long.txt"
    long_text.write_text(BOOK * 4, encoding="utf-8")
    result = CliRunner().invoke(app, ["ppl", str(long_text), "--model", str(tiny_model), "--lengths", "2000"])
    assert isinstance(result.exception, ContextLimitError)
    # the text is shorter than the length asked for
    short = tmp_path / "short.txt"
    short.write_text("Too short.", encoding="utf-8")
    result = CliRunner().invoke(app, ["fidelity", str(short), "--model", str(tiny_model), "--lengths", "200"])
    assert isinstance(result.exception, InputError) and "tokens" in str(result.exception)


def test_capture_is_transparent_and_restores(tiny_model: Path) -> None:
    from sacli.config import Settings
    from sacli.eval_capture import capture_attention
    from sacli.models.loading import load_model

    lm = load_model(tiny_model, Settings(device="cpu"), 64)
    ids = torch.randint(0, 200, (1, 50))
    before = lm.model.config._attn_implementation
    seen: dict[int, tuple[int, ...]] = {}
    with torch.inference_mode():
        ref = lm.model(input_ids=ids).logits
        with capture_attention(lm.model, lambda layer, q, k, v, s: seen.setdefault(layer, tuple(q.shape))):
            got = lm.model(input_ids=ids).logits
    assert torch.allclose(got, ref, atol=1e-5)
    assert seen == {0: (1, 6, 50, 16), 1: (1, 6, 50, 16)}
    assert lm.model.config._attn_implementation == before
