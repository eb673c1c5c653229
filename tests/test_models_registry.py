"""Model registry: home directory, name/path resolution, refusal of pickle checkpoints, listing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import platformdirs
import pytest
import torch
from safetensors.torch import save_file

from sacli.errors import ModelError
from sacli.models import registry
from sacli.models.registry import ModelInfo, list_models, resolve_model, sacli_home

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 2048,
}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SACLI_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def model_dir(path: Path, weights: str | None = "model.safetensors", config: dict | None = CONFIG) -> Path:
    path.mkdir(parents=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if weights == "model.safetensors":
        save_file({"w": torch.randn(4, 4)}, str(path / weights))
    elif weights is not None:
        (path / weights).write_bytes(b"\x80\x04not really a pickle")
    return path


def no_notify(message: str) -> None:
    raise AssertionError(f"unexpected notification: {message}")


def test_home_from_environment_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("SACLI_HOME", str(tmp_path / "h"))
    assert sacli_home() == tmp_path / "h"
    monkeypatch.delenv("SACLI_HOME")
    assert sacli_home() == Path(platformdirs.user_cache_dir("sacli"))


def test_directory_path_is_validated(tmp_path, home):
    good = model_dir(tmp_path / "good")
    assert resolve_model(str(good), notify=no_notify) == good


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_only_directory_is_refused(tmp_path, home, weights):
    path = model_dir(tmp_path / "pickled", weights=weights)
    with pytest.raises(ModelError, match="pickle checkpoints are refused; convert to safetensors"):
        resolve_model(str(path), notify=no_notify)


def test_directory_without_weights_is_refused(tmp_path, home):
    path = model_dir(tmp_path / "empty", weights=None)
    with pytest.raises(ModelError, match=f"{path} has no model weights"):
        resolve_model(str(path), notify=no_notify)


def test_directory_without_config_is_refused(tmp_path, home):
    path = model_dir(tmp_path / "noconfig", config=None)
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(path), notify=no_notify)


def test_missing_path_and_gguf_file(tmp_path, home):
    with pytest.raises(ModelError, match="model directory not found"):
        resolve_model(str(tmp_path / "nowhere"), notify=no_notify)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="sacli pull"):
        resolve_model(str(gguf), notify=no_notify)


def test_known_names_resolve_to_their_directory(home):
    local = model_dir(home / "models" / "tiny")
    hub = model_dir(home / "models" / "Org--Name")
    assert resolve_model("tiny", notify=no_notify) == local
    assert resolve_model("hf:Org/Name", notify=no_notify) == hub


def test_unknown_name_lists_local_models(home):
    model_dir(home / "models" / "tiny")
    with pytest.raises(ModelError, match=r"unknown model 'nope' \(local models: tiny\); see `sacli models`"):
        resolve_model("nope", notify=no_notify)
    with pytest.raises(ModelError, match="sacli pull hf:a/b"):
        resolve_model("hf:a/b", notify=no_notify)


def test_default_model_is_pulled_once_announced(home, monkeypatch):
    pulled = model_dir(home / "models" / "smollm2-135m-instruct-fake")
    calls: list[tuple] = []

    def fake_pull(spec, *, progress):
        calls.append((spec, progress))
        return pulled

    monkeypatch.setattr("sacli.models.pull.pull", fake_pull)
    with pytest.raises(ModelError, match="run `sacli pull`"):
        resolve_model("smollm2-135m-instruct", auto_pull=False, notify=no_notify)
    assert calls == []
    notes: list[str] = []
    assert resolve_model("smollm2-135m-instruct", notify=notes.append) == pulled
    assert calls == [(None, sys.stderr.isatty())]
    assert notes == ["model smollm2-135m-instruct not found locally; downloading it now (one time, ~100 MB)"]


def test_list_models(home):
    assert list_models() == []
    path = model_dir(home / "models" / "tiny")
    scaled = dict(CONFIG, rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 2048})
    model_dir(home / "models" / "long", config=scaled)
    model_dir(home / "models" / ".tiny.abc123")  # an unfinished pull
    model_dir(home / "models" / "broken", weights="pytorch_model.bin")
    infos = list_models()
    assert [i.name for i in infos] == ["long", "tiny"]
    tiny = infos[1]
    assert isinstance(tiny, ModelInfo)
    assert tiny.path == path
    assert tiny.architecture == "LlamaForCausalLM"
    assert tiny.context == 2048
    assert tiny.size_bytes == sum(p.stat().st_size for p in path.iterdir())
    assert infos[0].context == 4096


def test_hf_local_name():
    assert registry.hf_local_name("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB--SmolLM2-360M-Instruct"
