"""The `sacli` command driven through its real entry point, with a tiny local model.

Every bad input must give exactly one `error: ...` line on stderr, a non-zero exit code and no
traceback (unless --verbose); stdout must carry only the answer or the JSON object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sacli.cli import app
from sacli.errors import ContextLimitError, InputError, ModelError, UsageError

from conftest import TINY_CONTEXT

ANSWER_KEYS = {
    "answer", "model", "device", "prompt_tokens", "new_tokens", "ttft_ms", "prefill_tokens_per_s",
    "decode_tokens_per_s", "sparsity", "attention", "layers",
}


def invoke(runner, args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def assert_one_error(result, code: int, *fragments: str) -> str:
    """Exit `code`, stdout empty, stderr exactly one `error:` line containing `fragments`."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture()
def doc(tmp_path: Path) -> Path:
    path = tmp_path / "doc.txt"
    path.write_text("The lighthouse keeper is named Ada.\nShe keeps the lamp lit.\n", encoding="utf-8")
    return path


# ---- the entry point --------------------------------------------------------------------------

def test_python_m_sacli_help_and_error_line(tmp_path: Path) -> None:
    env = {**os.environ, "NO_COLOR": "1"}
    ok = subprocess.run([sys.executable, "-m", "sacli", "--help"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0
    for command in ("ask", "pull", "models"):
        assert command in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "sacli", "ask", str(tmp_path / "missing.txt"), "q"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == InputError.exit_code
    assert bad.stdout == ""
    assert bad.stderr == f"error: no such file or directory: {tmp_path / 'missing.txt'}\n"


def test_version(runner) -> None:
    result = invoke(runner, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("sacli ")


def test_ask_help_lists_the_options(runner) -> None:
    result = invoke(runner, ["ask", "--help"])
    assert result.exit_code == 0
    for option in ("--model", "--max-new-tokens", "--system", "--alpha", "--window", "--sample-ratio", "--dense",
                   "--json", "--count-tokens", "--no-stream", "--verbose", "--rope-scale", "--device",
                   "--temperature", "--hidden", "--no-gitignore"):
        assert option in result.stdout, option


# ---- usage errors -------------------------------------------------------------------------------

def test_unknown_option_is_one_line(runner, doc: Path) -> None:
    assert_one_error(invoke(runner, ["ask", doc, "q", "--frobnicate"]), 2, "--frobnicate", "sacli ask --help")


def test_question_missing(runner, doc: Path) -> None:
    assert_one_error(invoke(runner, ["ask", doc]), UsageError.exit_code, "missing QUESTION")


def test_source_missing(runner) -> None:
    assert_one_error(invoke(runner, ["ask", "what is this?"]), UsageError.exit_code, "missing SOURCE")


def test_no_arguments(runner) -> None:
    assert_one_error(invoke(runner, ["ask"]), 2, "Missing argument")


def test_empty_question(runner, doc: Path) -> None:
    assert_one_error(invoke(runner, ["ask", doc, "  "]), UsageError.exit_code, "question is empty")


def test_bad_option_value(runner, doc: Path) -> None:
    assert_one_error(invoke(runner, ["ask", doc, "q", "--alpha", "1.5"]), UsageError.exit_code, "alpha")
    assert_one_error(invoke(runner, ["ask", doc, "q", "--rope-scale", "ntk"]), UsageError.exit_code, "rope_scale")
    assert_one_error(invoke(runner, ["ask", doc, "q", "--max-new-tokens", "many"]), 2, "--max-new-tokens")


def test_unknown_config_key_names_the_key(runner, doc: Path, isolated_home: Path) -> None:
    Path(os.environ["SACLI_CONFIG"]).write_text('alpha = 0.9\nmax_tokens = 10\n', encoding="utf-8")
    assert_one_error(invoke(runner, ["ask", doc, "q"]), UsageError.exit_code, "unknown config key 'max_tokens'")


def test_bad_environment_value(runner, doc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SACLI_MAX_NEW_TOKENS", "lots")
    assert_one_error(invoke(runner, ["ask", doc, "q"]), UsageError.exit_code, "SACLI_MAX_NEW_TOKENS")


# ---- input errors -------------------------------------------------------------------------------

def test_missing_path(runner, tmp_path: Path) -> None:
    assert_one_error(invoke(runner, ["ask", tmp_path / "nope.txt", "q"]), InputError.exit_code, "no such file")


def test_unreadable_file(runner, tmp_path: Path) -> None:
    path = tmp_path / "locked.txt"
    path.write_text("secret\n")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("this user can read files with mode 000 (root)")
        assert_one_error(invoke(runner, ["ask", path, "q"]), InputError.exit_code, "Permission denied")
    finally:
        path.chmod(0o644)


def test_unreadable_file_even_as_root(runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same check as above where mode 000 does not stop the user: the read fails as it would."""
    path = tmp_path / "locked.txt"
    path.write_text("secret\n")
    real_open = open

    def guarded_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("sacli.inputs.open", guarded_open, raising=False)
    assert_one_error(invoke(runner, ["ask", path, "q"]), InputError.exit_code, "cannot read", "Permission denied")


def test_empty_file(runner, tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("")
    assert_one_error(invoke(runner, ["ask", path, "q"]), InputError.exit_code, "empty.txt is empty")


def test_empty_stdin(runner) -> None:
    assert_one_error(invoke(runner, ["ask", "-", "q"], input=""), InputError.exit_code, "stdin is empty")


def test_directory_of_only_binaries(runner, tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"\x00\x01" * 50)
    (tmp_path / "b.so").write_bytes(b"\x7fELF\x00" * 50)
    assert_one_error(invoke(runner, ["ask", tmp_path, "q"]), InputError.exit_code, "no text files", "2 binary")


def test_verbose_shows_the_traceback(runner, tmp_path: Path) -> None:
    result = invoke(runner, ["ask", tmp_path / "nope.txt", "q", "--verbose"])
    assert result.exit_code == InputError.exit_code
    assert "Traceback" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: no such file")


# ---- model errors -------------------------------------------------------------------------------

def test_model_directory_without_weights(runner, doc: Path, tmp_path: Path, tiny_model: Path) -> None:
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_model / "config.json").read_text())
    assert_one_error(invoke(runner, ["ask", doc, "q", "--model", empty]), ModelError.exit_code, "no model weights")


def test_pickle_checkpoint_is_refused(runner, doc: Path, tmp_path: Path, tiny_model: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_model / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    assert_one_error(invoke(runner, ["ask", doc, "q", "--model", pickled]), ModelError.exit_code, "pickle")


def test_unknown_model_name(runner, doc: Path) -> None:
    assert_one_error(invoke(runner, ["ask", doc, "q", "--model", "no-such-model"]), ModelError.exit_code, "no-such-model")


def test_input_over_the_context_limit(runner, tmp_path: Path, tiny_model: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_text("word " * TINY_CONTEXT, encoding="utf-8")  # one token per byte: 5x the context
    line = assert_one_error(
        invoke(runner, ["ask", big, "q", "--model", tiny_model]), ContextLimitError.exit_code, str(TINY_CONTEXT)
    )
    assert "--rope-scale yarn" in line


# ---- answers with the tiny model ------------------------------------------------------------------

def test_json_answer(runner, doc: Path, tiny_model: Path) -> None:
    result = invoke(runner, ["ask", doc, "Who keeps the lamp?", "--model", tiny_model, "--json", "-n", "4"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # exactly one JSON document on stdout
    assert ANSWER_KEYS <= set(data)
    assert data["model"] == tiny_model.name and data["device"] == "cpu"
    assert 0 < data["new_tokens"] <= 4
    # one token per byte: the document's tokens are its UTF-8 bytes
    assert data["documents"] == [{"path": str(doc), "tokens": len(doc.read_bytes())}]
    assert data["prompt_tokens"] > len(doc.read_bytes()) + 2 * len("Who keeps the lamp?")
    assert data["attention"] == "dense_short"  # far below dense_below
    assert [layer["layer"] for layer in data["layers"]] == [0, 1]
    assert all(layer["ms"] > 0 and layer["density"] == 1.0 for layer in data["layers"])
    assert data["ttft_ms"] > 0 and data["prefill_tokens_per_s"] > 0
    assert data["stopped_at_limit"] == (data["new_tokens"] == 4)


def test_streamed_answer_and_summary(runner, doc: Path, tiny_model: Path) -> None:
    result = invoke(runner, ["ask", doc, "q", "--model", tiny_model, "-n", "3", "--temperature", "0"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith("\n")
    assert "TTFT" in result.stderr and "prompt" in result.stderr
    as_json = json.loads(invoke(runner, ["ask", doc, "q", "--model", tiny_model, "-n", "3", "--json"]).stdout)
    assert ("stopped at the limit of 3 new tokens" in result.stderr) == as_json["stopped_at_limit"]
    no_stream = invoke(runner, ["ask", doc, "q", "--model", tiny_model, "-n", "3", "--no-stream"])
    assert no_stream.stdout == result.stdout  # greedy: the same answer either way


def test_verbose_layer_table(runner, doc: Path, tiny_model: Path) -> None:
    result = invoke(runner, ["ask", doc, "q", "--model", tiny_model, "-n", "2", "--verbose"])
    assert result.exit_code == 0, result.stderr
    assert "prefill by layer" in result.stderr and "density" in result.stderr


def test_dense_flag(runner, doc: Path, tiny_model: Path) -> None:
    result = invoke(runner, ["ask", doc, "q", "--model", tiny_model, "-n", "2", "--json", "--dense"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["attention"] == "dense" and data["sparsity"] == 0.0


def test_stdin_source(runner, tiny_model: Path) -> None:
    result = invoke(runner, ["ask", "-", "q", "--model", tiny_model, "-n", "2", "--json"], input="piped text\n")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["documents"] == [{"path": "<stdin>", "tokens": len("piped text\n")}]


def test_model_from_user_config(runner, doc: Path, tiny_model: Path) -> None:
    Path(os.environ["SACLI_CONFIG"]).write_text(f'model = "{tiny_model}"\nmax_new_tokens = 2\n', encoding="utf-8")
    result = invoke(runner, ["ask", doc, "q", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"] == tiny_model.name and data["new_tokens"] <= 2


# ---- --count-tokens -----------------------------------------------------------------------------

def test_count_tokens_directory_with_binaries(runner, tmp_path: Path, tiny_model: Path) -> None:
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.md").write_text("beta beta\n")
    (root / "logo.png").write_bytes(b"\x89PNG\x00\x00" + bytes(range(256)))
    result = invoke(runner, ["ask", root, "--count-tokens", "--model", tiny_model])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split("\n")[:3] == [f"     6  {root}/a.txt", f"    10  {root}/sub/b.md", "    16  total"]
    assert "logo.png" in result.stderr and "binary" in result.stderr
    with_question = invoke(runner, ["ask", root, "what is here?", "--count-tokens", "--model", tiny_model])
    assert with_question.exit_code == 0 and with_question.stdout == result.stdout
    as_json = invoke(runner, ["ask", root, "--count-tokens", "--json", "--model", tiny_model])
    data = json.loads(as_json.stdout)
    assert data["files"] == [{"path": f"{root}/a.txt", "tokens": 6}, {"path": f"{root}/sub/b.md", "tokens": 10}]
    assert data["total"] == 16 and data["context_limit"] == TINY_CONTEXT


def test_count_tokens_non_utf8_warns(runner, tmp_path: Path, tiny_model: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("na\u00efve caf\u00e9\n".encode("latin-1"))
    result = invoke(runner, ["ask", path, "--count-tokens", "--json", "--model", tiny_model])
    assert result.exit_code == 0, result.stderr
    assert "warning:" in result.stderr and "latin.txt" in result.stderr and "UTF-8" in result.stderr
    # each bad byte becomes U+FFFD, three bytes in UTF-8: three byte-level tokens
    assert json.loads(result.stdout)["total"] == len("na\ufffdve caf\ufffd\n".encode())


def test_count_tokens_over_the_context_warns(runner, tmp_path: Path, tiny_model: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_text("x" * (TINY_CONTEXT + 1))
    result = invoke(runner, ["ask", big, "--count-tokens", "--model", tiny_model])
    assert result.exit_code == 0
    assert "exceed" in result.stderr


# ---- models / pull --------------------------------------------------------------------------------

def test_models_lists_the_store(runner, tiny_model: Path, isolated_home: Path) -> None:
    import shutil

    empty = invoke(runner, ["models", "--json"])
    assert empty.exit_code == 0 and json.loads(empty.stdout) == []
    store = Path(os.environ["SACLI_HOME"]) / "models"
    shutil.copytree(tiny_model, store / "tiny")
    listed = invoke(runner, ["models", "--json"])
    assert [m["name"] for m in json.loads(listed.stdout)] == ["tiny"]
    assert json.loads(listed.stdout)[0]["context"] == TINY_CONTEXT
    by_name = invoke(runner, ["ask", "--count-tokens", "--model", "tiny", "-"], input="abc")
    assert by_name.exit_code == 0 and by_name.stdout.splitlines()[-1].split() == ["3", "total"]


def test_pull_missing_gguf_file(runner, tmp_path: Path) -> None:
    result = invoke(runner, ["pull", tmp_path / "missing.gguf"])
    assert result.exit_code != 0
    assert_one_error(result, result.exit_code, "missing.gguf")


def test_rope_scale_yarn_extends_the_context(runner, tmp_path: Path, tiny_model: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_text("word " * 120, encoding="utf-8")  # 600 tokens: over the tiny model's 512
    args = ["ask", big, "q", "--model", tiny_model, "--json", "-n", "2"]
    result = invoke(runner, [*args, "--rope-scale", "yarn"])
    assert result.exit_code == 0, result.stderr
    assert "context extended" in result.stderr and "YaRN" in result.stderr
    assert json.loads(result.stdout)["prompt_tokens"] > TINY_CONTEXT
