"""Needle-in-a-haystack prompts: a fact hidden at a chosen depth of book text, and answer checking.

The haystack is the start of a public-domain book cut to a token budget; the needle is one short
sentence holding a random number, inserted at a sentence boundary near the requested depth
(0.0 = the start of the text, 1.0 = its end). The answer is right when it contains the number.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from sacli.errors import InputError

QUESTION = "What is the magic number mentioned in the text above? Answer with the number only."


@dataclass(frozen=True)
class Needle:
    number: str

    @property
    def sentence(self) -> str:
        return f"The magic number is {self.number}."


def make_needle(seed: int) -> Needle:
    """A 7-digit number, distinct per seed, that no book is likely to contain."""
    return Needle(str(random.Random(seed).randrange(1_000_000, 10_000_000)))


def answer_correct(answer: str, needle: Needle) -> bool:
    """True when the needle's number appears in the answer as a whole number (commas allowed)."""
    digits = [re.sub(r"[,\s]", "", m) for m in re.findall(r"\d[\d,\s]*\d|\d", answer)]
    return needle.number in digits


def insert_needle(text: str, needle: Needle, depth: float) -> tuple[str, int]:
    """`text` with the needle sentence inserted after the sentence end nearest to depth * len(text).

    Returns the new text and the character offset where the needle starts.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    target = round(depth * len(text))
    if target <= 0:
        cut = 0
    elif target >= len(text):
        cut = len(text)
    else:
        ends = [m.end() for m in re.finditer(r"[.!?][\"'\u201d\u2019)]?\s+", text)]
        cut = min(ends, key=lambda e: abs(e - target)) if ends else target
    before, after = text[:cut], text[cut:]
    sep_before = "" if not before or before.endswith((" ", "\n")) else " "
    sep_after = "" if not after or after.startswith((" ", "\n")) else " "
    return f"{before}{sep_before}{needle.sentence}{sep_after}{after}", cut + len(sep_before)


@dataclass
class TextDocument:
    """A document held in memory, with the interface prompts are built from."""

    path: str
    text: str

    def read_chunks(self) -> Iterator[str]:
        yield self.text


def haystack_text(tokenizer: Any, book: str, n_tokens: int, encode: Callable[[Any, str], list[int]]) -> str:
    """The start of `book` cut to `n_tokens` tokens (decoded back to text)."""
    if n_tokens < 1:
        raise InputError(f"the haystack budget is {n_tokens} tokens; use a longer length")
    # ~4 characters per token in English prose; read a margin and grow if the book is denser
    chars = n_tokens * 6
    while True:
        ids = encode(tokenizer, book[:chars])
        if len(ids) > n_tokens or chars >= len(book):
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise InputError(f"the haystack text has only {len(ids)} tokens; {n_tokens} are needed")
    return tokenizer.decode(ids[:n_tokens])
