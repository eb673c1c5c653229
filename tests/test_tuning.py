"""Autotuning choices kept in a file (kernels/tuning.py), with Triton's real autotuner.

The kernel runs in Triton's interpreter; the autotuner's timing function is replaced by one
that counts its calls and makes the second config the fastest, so a test can see whether a
launch timed the configs or took a stored choice, and which config it launched.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from sacli.kernels import tuning  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@triton.jit
def _add_block(X, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    # writes BLOCK into the first element so the test sees which config ran
    tl.store(X + offs, tl.where(offs == 0, BLOCK, tl.load(X + offs, mask=offs < N)), mask=offs < N)


def _tuner(blocks: tuple[int, ...] = (16, 32)):
    """A fresh autotuner (a new process's) over `blocks`; .timed counts configs timed."""
    timed: list[int] = []

    def bench(kernel_call, quantiles):  # type: ignore[no-untyped-def]
        timed.append(1)
        kernel_call()
        return [1.0 / len(timed)] * len(quantiles)  # each later config times faster

    tuner = triton.autotune(
        configs=[triton.Config({"BLOCK": b}) for b in blocks], key=["N"], do_bench=bench
    )(_add_block)
    tuner.timed = timed
    return tuner


def _launch(tuner, n: int = 16) -> int:  # type: ignore[no-untyped-def]
    x = torch.zeros(n, device=DEVICE)
    tuning.launch(tuner, (1,), x, n, device=DEVICE)
    return int(x[0])


@pytest.fixture
def choices(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "home" / "autotune.json"
    tuning.use_file(path)
    yield path
    tuning.use_file(None)


def test_a_new_process_takes_the_stored_choice(choices: Path) -> None:
    first = _tuner()
    assert _launch(first) == 32 and len(first.timed) == 2
    assert _launch(first) == 32 and len(first.timed) == 2  # Triton's own in-memory choice
    stored = json.loads(choices.read_text())
    assert stored["format"] == tuning.FORMAT
    [(context, entries)] = stored["choices"].items()
    assert context.startswith("_add_block | ") and f"torch {torch.__version__}" in context
    assert entries == {json.dumps([16, "torch.float32"]): str(first.configs[1])}

    tuning.use_file(choices)  # what a new process does: read the file again
    second = _tuner()
    assert _launch(second) == 32 and second.timed == []
    # another key (length) is timed and added beside the first
    assert _launch(second, n=8) == 32 and len(second.timed) == 2
    assert len(json.loads(choices.read_text())["choices"][context]) == 2


def test_other_configs_are_timed_again(choices: Path) -> None:
    _launch(_tuner())
    tuning.use_file(choices)
    other = _tuner(blocks=(16, 64))
    assert _launch(other) == 64 and len(other.timed) == 2
    assert len(json.loads(choices.read_text())["choices"]) == 2  # both contexts kept


def test_an_unreadable_file_only_costs_the_timing(choices: Path) -> None:
    choices.parent.mkdir(parents=True)
    choices.write_text("{not json")
    tuner = _tuner()
    assert _launch(tuner) == 32 and len(tuner.timed) == 2
    assert json.loads(choices.read_text())["format"] == tuning.FORMAT  # replaced by a valid file


def test_entries_of_other_processes_are_merged(choices: Path) -> None:
    a = _tuner()
    _launch(a, n=16)
    b = _tuner()  # a process that read the file before `a` wrote...
    tuning.use_file(choices)
    b.cache.clear()
    tuning._store = {}  # ...so its view holds nothing
    _launch(b, n=8)
    [entries] = json.loads(choices.read_text())["choices"].values()
    assert sorted(entries) == sorted(json.dumps([n, "torch.float32"]) for n in (16, 8))


def test_without_a_file_nothing_is_written(tmp_path: Path) -> None:
    tuning.use_file(None)
    tuner = _tuner()
    assert _launch(tuner) == 32 and len(tuner.timed) == 2
    assert list(tmp_path.iterdir()) == []


def test_the_cli_keeps_choices_in_the_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sacli.cli import app

    try:
        assert CliRunner().invoke(app, ["models"]).exit_code == 0
        assert tuning.current_file() is None  # a command that runs no kernel
        assert CliRunner().invoke(app, ["bench", "--help"]).exit_code == 0
        assert tuning.current_file() == Path(os.environ["SACLI_HOME"]) / "autotune.json"
        monkeypatch.setenv("SACLI_AUTOTUNE_FILE", "none")
        assert CliRunner().invoke(app, ["eval", "--help"]).exit_code == 0
        assert tuning.current_file() is None
        monkeypatch.setenv("SACLI_AUTOTUNE_FILE", str(tmp_path / "t.json"))
        assert CliRunner().invoke(app, ["ask", "--help"]).exit_code == 0
        assert tuning.current_file() == tmp_path / "t.json"
    finally:
        tuning.use_file(None)


def test_an_unwritable_home_only_costs_the_timing(tmp_path: Path) -> None:
    blocker = tmp_path / "home"
    blocker.write_text("a file where the directory should be")
    try:
        tuning.use_file(blocker / "autotune.json")
        tuner = _tuner()
        assert _launch(tuner) == 32 and len(tuner.timed) == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == ["home"] and blocker.is_file()
    finally:
        tuning.use_file(None)


def _ship(monkeypatch: pytest.MonkeyPatch, path: Path, tuner, entries: dict[int, int]) -> None:  # type: ignore[no-untyped-def]
    """Ship choices (length -> BLOCK) for `tuner` on this test's device in `path`."""
    by_block = {c.kwargs["BLOCK"]: c for c in tuner.configs}
    context = tuning.portable_context(tuner, tuning.gpu_model(DEVICE))
    path.write_text(json.dumps({"format": tuning.FORMAT, "choices": {context: {
        json.dumps([n, "torch.float32"]): tuning.portable_config(by_block[b]) for n, b in entries.items()}}}))
    monkeypatch.setattr(tuning, "DEFAULTS_FILE", path)


def test_shipped_choices_fill_what_the_file_lacks(
    choices: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tuner = _tuner()
    _ship(monkeypatch, tmp_path / "shipped.json", tuner, {16: 16})  # the slower config, on purpose
    tuning.use_file(choices)
    assert _launch(tuner, n=16) == 16 and tuner.timed == []  # shipped: launched untimed
    assert _launch(tuner, n=8) == 32 and len(tuner.timed) == 2  # not shipped: timed

    tuning.use_file(choices)  # a new process: its own file's choice wins over the shipped one
    again = _tuner()
    _ship(monkeypatch, tmp_path / "shipped.json", again, {8: 16})
    assert _launch(again, n=8) == 32 and again.timed == []


def test_shipped_choices_need_the_same_kernel_source_and_configs(
    choices: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tuner = _tuner()
    _ship(monkeypatch, tmp_path / "shipped.json", tuner, {16: 16})
    other = _tuner(blocks=(16, 64))  # another config list: the shipped entry is not for it
    tuning.use_file(choices)
    assert _launch(other, n=16) == 64 and len(other.timed) == 2


def test_shipped_choices_are_not_used_without_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tuner = _tuner()
    _ship(monkeypatch, tmp_path / "shipped.json", tuner, {16: 16})
    tuning.use_file(None)
    assert _launch(tuner, n=16) == 32 and len(tuner.timed) == 2


def test_the_shipped_file_matches_the_kernels_as_they_are() -> None:
    """kernels/tuned_defaults.json names the current kernels' sources and config lists (a kernel
    change must come with new choices from a GPU run, benchmarks/tuned_defaults.py), and every
    config it names is one of them."""
    tuners = tuning.product_tuners()
    shipped = json.loads(tuning.DEFAULTS_FILE.read_text())
    assert shipped["format"] == tuning.FORMAT and set(shipped["choices"]) and tuning._read(tuning.DEFAULTS_FILE)
    for context, entries in shipped["choices"].items():
        name, _source, _configs, gpu = context.split(" | ")
        assert context == tuning.portable_context(tuners[name], gpu), f"{name}: stale shipped choices"
        portable = {tuning.portable_config(c) for c in tuners[name].configs}
        assert entries and set(entries.values()) <= portable
