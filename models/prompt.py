"""Prompt token ids for a question over documents, built without holding the text in memory.

The chat template is rendered once with a unique placeholder where the documents go. The text
before and after the placeholder is tokenized as template text (its special tokens count); each
document is tokenized chunk by chunk as plain text (special-token strings inside a document stay
ordinary text, so a document cannot end the user turn) and its ids are spliced in.

Layout of the user message: the question comes first, so that the model reads the documents
knowing what to look for, and again last, next to where the answer starts (small models lose a
question asked only before thousands of tokens):

    <question>

    === <path> ===
    <document text>
    === <path> ===
    ...

    Question: <question>
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch

from sacli.errors import InputError, ModelError


class DocumentLike(Protocol):
    path: str

    def read_chunks(self) -> Iterator[str]: ...


@dataclass(frozen=True)
class Prompt:
    ids: torch.Tensor  # (1, S) int64 on the CPU
    documents: list[tuple[str, int]]  # (display path, tokens of its text, header excluded)

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])


def document_header(path: str) -> str:
    return f"=== {path} ===\n"


def user_message(placeholder: str, question: str) -> str:
    return f"{question}\n\n{placeholder}\nQuestion: {question}"


def encode(tokenizer: Any, text: str, *, literal: bool) -> list[int]:
    """Token ids of `text` without BOS/EOS; `literal` keeps special-token strings as plain text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=literal))
    if not literal:
        return backend.encode(text, add_special_tokens=False).ids
    before = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return backend.encode(text, add_special_tokens=False).ids
    finally:
        backend.encode_special_tokens = before


def render_template(tokenizer: Any, user: str, system: str = "") -> str:
    """The chat template rendered for one user turn, ready for the assistant's answer.

    Without a chat template (a base model) the turn is plain text ending in "Answer:".
    """
    messages = [{"role": "user", "content": user}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja errors come in many types; all mean a broken template
            raise ModelError(f"the model's chat template failed: {exc}") from None
        if isinstance(text, str):
            return text
        raise ModelError("the model's chat template did not render to text")
    return (f"{system}\n\n" if system else "") + f"{user}\n\nAnswer:"


def template_parts(tokenizer: Any, question: str, system: str = "") -> tuple[str, str]:
    """Template text before and after the documents."""
    placeholder = f"SACLI-DOCUMENTS-{uuid.uuid4().hex}"
    rendered = render_template(tokenizer, user_message(placeholder, question), system)
    parts = rendered.split(placeholder)
    if len(parts) != 2:
        raise ModelError("the model's chat template does not keep the user message intact")
    return parts[0], parts[1]


OnChunk = Callable[[Any], None]  # called with the document after each of its chunks


def _document_ids(
    tokenizer: Any, document: DocumentLike, on_chunk: OnChunk | None
) -> Iterable[tuple[list[int], str]]:
    for chunk in document.read_chunks():
        yield encode(tokenizer, chunk, literal=True), chunk
        if on_chunk is not None:
            on_chunk(document)


def count_tokens(
    tokenizer: Any, documents: Sequence[DocumentLike], *, on_chunk: OnChunk | None = None
) -> list[tuple[str, int]]:
    """Tokens of each document's text, as they would enter a prompt (headers excluded)."""
    counts = []
    for document in documents:
        counts.append((document.path, sum(len(ids) for ids, _ in _document_ids(tokenizer, document, on_chunk))))
    return counts


def build_prompt(
    tokenizer: Any,
    documents: Sequence[DocumentLike],
    question: str,
    *,
    system: str = "",
    on_chunk: OnChunk | None = None,
) -> Prompt:
    """Prompt ids for `question` over `documents`, read and tokenized one chunk at a time.

    `on_chunk(document)` is called after each chunk (for progress). Raises InputError when the documents
    hold no text at all.
    """
    before, after = template_parts(tokenizer, question, system)
    pieces: list[torch.Tensor] = [_tensor(encode(tokenizer, before, literal=False))]
    counts: list[tuple[str, int]] = []
    for document in documents:
        pieces.append(_tensor(encode(tokenizer, document_header(document.path), literal=True)))
        n = 0
        last = ""
        for ids, chunk in _document_ids(tokenizer, document, on_chunk):
            pieces.append(_tensor(ids))
            n += len(ids)
            last = chunk or last
        if not last.endswith("\n"):
            pieces.append(_tensor(encode(tokenizer, "\n", literal=True)))
        counts.append((document.path, n))
    if not any(n for _, n in counts):
        raise InputError("the input holds no text")
    pieces.append(_tensor(encode(tokenizer, after, literal=False)))
    return Prompt(torch.cat(pieces).unsqueeze(0), counts)


def _tensor(ids: list[int]) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long)
