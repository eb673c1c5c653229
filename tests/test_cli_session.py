"""sacli.app.Session with the tiny model: lazy loading, reuse, context handling, progress stages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from sacli.app import STAGE_LOAD, STAGE_PREFILL, STAGE_READ, Session
from sacli.config import Settings
from sacli.errors import ContextLimitError, UsageError
from sacli.inputs import collect_documents

from conftest import TINY_CONTEXT


def docs_of(tmp_path: Path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return collect_documents([str(path)], hidden=False, use_gitignore=True, notify=lambda _: None)


@pytest.fixture()
def settings(tiny_model: Path) -> Settings:
    return Settings(model=str(tiny_model), max_new_tokens=2)


def test_count_tokens_loads_no_weights(settings: Settings, tmp_path: Path) -> None:
    session = Session(settings, notify=lambda _: None)
    assert session.count_tokens(docs_of(tmp_path, "a.txt", "hello\n")) == [(str(tmp_path / "a.txt"), 6)]
    assert session.lm is None
    assert session.context_limit() == TINY_CONTEXT


def test_model_is_loaded_once_and_kept_after_a_refused_prompt(settings: Settings, tmp_path: Path) -> None:
    calls: list[tuple[str, float, float | None]] = []
    session = Session(settings, notify=lambda _: None, progress=lambda *a: calls.append(a))
    short = docs_of(tmp_path, "short.txt", "short text\n")
    first = session.answer(short, "q")
    lm = session.lm
    assert lm is not None and first.prompt_tokens == session.last_prompt.length
    stages = [c[0] for c in calls]
    assert stages.index(STAGE_READ) < stages.index(STAGE_LOAD) < stages.index(STAGE_PREFILL)
    assert (STAGE_LOAD, 0, None) in calls
    assert [c[1] for c in calls if c[0] == STAGE_PREFILL][:2] == [1, 2]  # one report per layer

    with pytest.raises(ContextLimitError, match=str(TINY_CONTEXT)):
        session.answer(docs_of(tmp_path, "long.txt", "x" * TINY_CONTEXT), "q")
    assert session.lm is lm  # the refused prompt did not cost the loaded model
    session.answer(short, "another question")
    assert session.lm is lm


def test_yarn_reloads_for_a_longer_prompt(settings: Settings, tmp_path: Path) -> None:
    notes: list[str] = []
    session = Session(dataclasses.replace(settings, rope_scale="yarn"), notify=notes.append)
    session.answer(docs_of(tmp_path, "short.txt", "short\n"), "q")
    assert session.lm is not None and not session.lm.rope_scaled
    result = session.answer(docs_of(tmp_path, "long.txt", "y" * TINY_CONTEXT), "q")
    assert session.lm.rope_scaled and session.lm.context_limit >= result.prompt_tokens + settings.max_new_tokens
    assert any("YaRN" in n for n in notes)


def test_empty_question(settings: Settings, tmp_path: Path) -> None:
    session = Session(settings, notify=lambda _: None)
    with pytest.raises(UsageError, match="question is empty"):
        session.answer(docs_of(tmp_path, "a.txt", "text\n"), " ")


def test_stopped_at_limit(settings: Settings, tmp_path: Path) -> None:
    session = Session(settings, notify=lambda _: None)
    result = session.answer(docs_of(tmp_path, "a.txt", "text\n"), "q")
    assert session.stopped_at_limit(result) == (result.new_tokens == settings.max_new_tokens)
