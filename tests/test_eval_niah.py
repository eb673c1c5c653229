"""Needle insertion and answer checking."""

from __future__ import annotations

import pytest

from sacli.errors import InputError
from sacli.eval_niah import Needle, answer_correct, haystack_text, insert_needle, make_needle

TEXT = "Call me Ishmael. Some years ago, never mind how long. Whenever I find myself grim! It is a way I have."


def test_needle_is_deterministic_and_seeded() -> None:
    assert make_needle(3) == make_needle(3)
    assert make_needle(3) != make_needle(4)
    assert len(make_needle(5).number) == 7


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_insert_needle_at_sentence_boundary(depth: float) -> None:
    needle = Needle("1234567")
    out, at = insert_needle(TEXT, needle, depth)
    assert out[at:].startswith(needle.sentence)
    # the book text is kept whole, in order, around the needle
    assert out.replace(needle.sentence, "").replace("  ", " ").strip() == TEXT
    if depth == 0.0:
        assert at == 0
    elif depth == 1.0:
        assert out.endswith(needle.sentence)
    else:
        # inserted right after a sentence end
        assert out[:at].rstrip()[-1] in ".!?"
        assert abs(at - depth * len(TEXT)) < 40


def test_insert_needle_rejects_bad_depth() -> None:
    with pytest.raises(ValueError):
        insert_needle(TEXT, Needle("1"), 1.5)


@pytest.mark.parametrize(
    "answer, ok",
    [
        ("1234567", True),
        ("The magic number is 1234567.", True),
        ("1,234,567", True),
        ("12345678", False),
        ("7654321", False),
        ("The number is 123 4567", True),
        ("", False),
    ],
)
def test_answer_correct(answer: str, ok: bool) -> None:
    assert answer_correct(answer, Needle("1234567")) is ok


class _CharTokenizer:
    """One token per character."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def _encode(tok: object, text: str) -> list[int]:
    return [ord(c) for c in text]


def test_haystack_text_cuts_to_budget() -> None:
    assert haystack_text(_CharTokenizer(), TEXT, 20, _encode) == TEXT[:20]
    with pytest.raises(InputError):
        haystack_text(_CharTokenizer(), TEXT, len(TEXT) + 1, _encode)


def test_niah_grids_average_the_trials_of_each_cell() -> None:
    import math

    from sacli.evaluate import NiahCell, niah_grids

    def cell(length: int, depth: float, seed: int, dense: bool, sparse: bool) -> NiahCell:
        answer = "7" if dense else "1"
        return NiahCell(length=length, prompt_tokens=length, depth=depth, number="7", dense_answer=answer,
                        sparse_answer="7" if sparse else "1", dense_correct=dense, sparse_correct=sparse,
                        agree=dense == sparse, density=0.5, seed=seed)

    cells = [
        cell(200, 0.5, 0, True, True), cell(200, 0.5, 1, True, False), cell(200, 0.5, 2, False, False),
        cell(300, 0.1, 0, True, False),  # (200, 0.1) and (300, 0.5) have no cell
    ]
    lengths, depths, grids = niah_grids(cells)
    assert (lengths, depths) == ([200, 300], [0.1, 0.5])
    # rows are depths, columns lengths
    assert grids["dense"][1, 0].item() == pytest.approx(2 / 3)
    assert grids["sparse"][1, 0].item() == pytest.approx(1 / 3)
    assert grids["agree"][1, 0].item() == pytest.approx(2 / 3)
    assert (grids["dense"][0, 1].item(), grids["sparse"][0, 1].item(), grids["agree"][0, 1].item()) == (1.0, 0.0, 0.0)
    for key in grids:
        assert math.isnan(grids[key][0, 0].item()) and math.isnan(grids[key][1, 1].item())
