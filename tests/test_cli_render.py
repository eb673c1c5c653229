"""What the commands draw on stderr and print on stdout, without a model."""

from __future__ import annotations

import io
import json
import time

import pytest
from rich.console import Console

from sacli import render
from sacli.models.generate import GenerationResult, LayerStat


def console(*, terminal: bool, width: int = 60) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=width, highlight=False), buffer


def result(**overrides) -> GenerationResult:
    values = dict(
        text="Five.", prompt_tokens=3500, new_tokens=3, ttft_ms=812.5, prefill_ms=800.0,
        prefill_tokens_per_s=4375.0, decode_tokens_per_s=31.5, sparsity=0.8125, attention="sparse",
        layers=[LayerStat(0, 20.5, 0.25), LayerStat(1, 19.0, 0.125)],
    )
    values.update(overrides)
    return GenerationResult(**values)


def test_error_is_one_unwrapped_line() -> None:
    out, buffer = console(terminal=False, width=20)
    render.error(out, "a long message that is much wider than the console\nand has a newline")
    assert buffer.getvalue() == "error: a long message that is much wider than the console and has a newline\n"


def test_no_colour_off_a_terminal_and_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    out, buffer = console(terminal=False)
    render.message(out, "warning: careful")
    assert buffer.getvalue() == "warning: careful\n"
    monkeypatch.setenv("NO_COLOR", "1")
    out, buffer = console(terminal=True)
    render.error(out, "bad")
    assert "\x1b[3" not in buffer.getvalue()  # no colour codes; bold is allowed


def test_progress_draws_nothing_off_a_terminal() -> None:
    out, buffer = console(terminal=False)
    with render.StageProgress(out) as progress:
        progress("Reading", 0, 100)
        progress("Reading", 100, 100)
    assert buffer.getvalue() == ""


def test_progress_on_a_terminal_appears_after_the_delay_and_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "PROGRESS_DELAY_S", 0.0)
    out, buffer = console(terminal=True)
    progress = render.StageProgress(out)
    progress("Prefill", 1, 30)
    time.sleep(0.3)  # the display refreshes on its own thread
    progress("Prefill", 30, 30)
    assert progress._progress is None  # taken down once no stage runs
    assert "Prefill" in buffer.getvalue() and "layer 1/30" in buffer.getvalue()


def test_quick_stages_never_show(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "PROGRESS_DELAY_S", 60.0)
    out, buffer = console(terminal=True)
    progress = render.StageProgress(out)
    progress("Reading", 0, 10)
    time.sleep(0.2)
    progress("Reading", 10, 10)
    assert "Reading" not in buffer.getvalue()


def test_answer_json_fields() -> None:
    data = render.answer_json(result(), model="m", device="cpu", documents=[("a.txt", 3400)])
    assert json.loads(json.dumps(data)) == data
    assert data["answer"] == "Five." and data["model"] == "m" and data["device"] == "cpu"
    assert data["layers"] == [{"layer": 0, "ms": 20.5, "density": 0.25}, {"layer": 1, "ms": 19.0, "density": 0.125}]
    assert data["documents"] == [{"path": "a.txt", "tokens": 3400}]
    for key in ("prompt_tokens", "new_tokens", "ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s",
                "sparsity", "attention"):
        assert key in data


def test_summary_line_off_a_terminal_and_verbose_table() -> None:
    out, buffer = console(terminal=False)
    render.summary(out, result(), model="m", device="cpu", verbose=True)
    first, *rest = buffer.getvalue().splitlines()
    assert first == (
        "model m on cpu | TTFT 812 ms | prompt 3500 tokens (4375 tokens/s) | answer 3 tokens (31.5 tokens/s)"
        " | attention sparse, sparsity 81.2%"
    )
    table = "\n".join(rest)
    assert "prefill by layer" in table and "20.50" in table and "0.125" in table


def test_summary_panel_on_a_terminal() -> None:
    out, buffer = console(terminal=True, width=100)
    render.summary(out, result(attention="dense_short", sparsity=0.0), model="m", device="cpu", verbose=False)
    text = buffer.getvalue()
    assert "TTFT" in text and "812 ms" in text and "dense_short" in text and "sparsity" not in text
