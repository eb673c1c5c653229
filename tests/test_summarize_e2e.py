"""`sacli summarize` end to end through the real model path, in subprocesses.

The model is a tiny random-weight Llama built here (2 layers, a 300-token byte-level BPE vocabulary
with a ChatML template), loaded from its directory with --model PATH: the real Session, prompt
building, attention and generation loop run, just fast. Its end-of-turn logits are zeroed so that
every summary runs to --max-new-tokens, which keeps each document's time predictable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sacli.jobs import shard_of

_SHARD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
              "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP")

# Runs the command function through a one-command Typer app, for when `summarize` is not yet
# registered in sacli.cli.
_RUNNER = (
    "import typer; from sacli.summarize_cmd import summarize; "
    "app = typer.Typer(); app.command()(summarize); app.command('x')(lambda: None); app()"
)

WORDS = ("report quarter revenue growth market customer product team launch risk plan budget "
         "review result target region supply forecast margin hiring policy audit contract").split()


def _command() -> list[str]:
    """`python -m sacli summarize` once the command is wired into the main app."""
    try:
        from sacli.cli import app

        names = {c.name or c.callback.__name__ for c in app.registered_commands}
    except ImportError:
        names = set()
    if "summarize" in names:
        return [sys.executable, "-m", "sacli", "summarize"]
    return [sys.executable, "-c", _RUNNER, "summarize"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-llama")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(WORDS)] * 8, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
        eos_token_id=tok.token_to_id("<|im_end|>"), bos_token_id=tok.token_to_id("<|im_start|>"),
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for token in specials:
            model.lm_head.weight[tok.token_to_id(token)] = 0.0
    model.save_pretrained(out)
    return out


def _environment(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SHARD_ENV and not k.startswith("SACLI_")}
    env.update(
        SACLI_HOME=str(tmp / "home"), SACLI_CONFIG=str(tmp / "no-config.toml"), HF_HUB_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="error", SACLI_DEVICE="cpu", **extra,
    )
    return env


def _write_docs(folder: Path, sizes: list[int]) -> list[str]:
    folder.mkdir()
    paths = []
    for i, n in enumerate(sizes):
        words = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n))
        (folder / f"doc{i}.txt").write_text(f"Document {i}.\n{words}\n")
        paths.append(f"{folder.name}/doc{i}.txt")
    return paths


def _lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "the result file ends in a torn line"
    return [json.loads(line) for line in data.splitlines()]


def _ok_count(records: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        if r["status"] == "ok":
            counts[r["path"]] = counts.get(r["path"], 0) + 1
    return counts


def test_sigkill_mid_job_then_rerun_gives_exactly_one_ok_line_each(tmp_path, tiny_model):
    docs = _write_docs(tmp_path / "docs", [40, 60, 80, 100, 120, 140])
    out = tmp_path / "s.jsonl"
    cmd = [*_command(), "docs", "--out", "s.jsonl", "--model", str(tiny_model), "--max-new-tokens", "48"]
    env = _environment(tmp_path)

    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and b'"status": "ok"' in out.read_bytes():
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"job ended before it could be killed: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    first = _lines(out)
    done = _ok_count(first)
    assert 1 <= len(done) < len(docs), "the kill should land mid-job"
    # a crash in the middle of writing the next record leaves half a line
    pending = next(p for p in docs if p not in done)
    with out.open("ab") as fh:
        fh.write(json.dumps({"path": pending, "sha256": "0" * 64, "status": "ok"}).encode()[:30])

    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr.decode()
    stderr = rerun.stderr.decode()
    assert "incomplete last line" in stderr
    assert f"{len(done)} of {len(docs)} documents already done" in stderr

    records = _lines(out)
    assert _ok_count(records) == {p: 1 for p in docs}
    assert records[: len(first)] == first  # nothing written before the crash was rewritten
    for r in records:
        assert r["model"] == str(tiny_model) and r["new_tokens"] == 48 and r["stopped_at_limit"]
        assert r["tokens"] > 40 and r["ttft_ms"] > 0 and 0.0 <= r["sparsity"] <= 1.0
        assert isinstance(r["summary"], str) and r["summary"]

    # a third run finds everything done and does not touch the file
    before = out.read_bytes()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, timeout=120)
    assert again.returncode == 0 and out.read_bytes() == before, again.stderr.decode()


def test_two_ranks_then_merge(tmp_path, tiny_model):
    sizes = [30, 40, 50, 60, 70, 80]
    docs = _write_docs(tmp_path / "corpus", sizes)
    # an over-long document (more than the model's 2048 positions) becomes an error record
    long_doc = tmp_path / "corpus" / "huge.txt"
    long_doc.write_text(" ".join(WORDS[j % len(WORDS)] + str(j) for j in range(3000)) + "\n")
    assert {shard_of(p, 2) for p in docs} == {0, 1}, "the corpus should give both ranks work"
    cmd = [*_command(), "corpus", "--out", "s.jsonl", "--model", str(tiny_model), "--max-new-tokens", "8"]

    procs = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=_environment(tmp_path, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for r in range(2)
    ]
    results = [(p.wait(timeout=180), p.stderr.read().decode()) for p in procs]
    huge_rank = shard_of("corpus/huge.txt", 2)
    for rank, (code, stderr) in enumerate(results):
        assert code == (1 if rank == huge_rank else 0), stderr

    per_rank = []
    for rank in range(2):
        records = _lines(tmp_path / f"s.rank{rank}-of-2.jsonl")
        assert all(shard_of(r["path"], 2) == rank and r["shard"] == f"{rank}/2" for r in records)
        per_rank.append({r["path"] for r in records if r["status"] == "ok"})
    assert per_rank[0].isdisjoint(per_rank[1])
    assert per_rank[0] | per_rank[1] == set(docs)

    merged = subprocess.run(
        [*_command(), "--merge", "--out", "s.jsonl"], cwd=tmp_path, env=_environment(tmp_path),
        capture_output=True, timeout=60,
    )
    assert merged.returncode == 1, merged.stderr.decode()  # the over-long document failed
    records = _lines(tmp_path / "s.jsonl")
    assert _ok_count(records) == {p: 1 for p in docs}
    (error,) = [r for r in records if r["status"] == "error"]
    assert error["path"] == "corpus/huge.txt" and error["error_type"] == "ContextLimitError"
    assert "2048" in error["error"] and "--rope-scale yarn" in error["error"]
