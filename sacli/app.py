"""Application logic behind the commands: documents + question -> answer, with progress hooks.

Nothing here prints; messages go to `notify` and progress to a `Progress` callback, both supplied
by the caller (the CLI renders them on stderr).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from sacli.config import Settings
from sacli.errors import UsageError
from sacli.inputs import Document

if TYPE_CHECKING:
    from sacli.models.generate import GenerationResult
    from sacli.models.loading import LoadedModel
    from sacli.models.prompt import Prompt

Notify = Callable[[str], None]


class Progress(Protocol):
    def __call__(self, stage: str, completed: float, total: float | None) -> None:
        """Report `completed` of `total` units for `stage` (None total: unknown length)."""


def _no_progress(stage: str, completed: float, total: float | None) -> None:
    return None


STAGE_READ = "Reading"
STAGE_LOAD = "Loading model"
STAGE_PREFILL = "Prefill"


class Session:
    """One model for many prompts: the tokenizer is loaded on demand, the weights on first answer.

    The weights are loaded for the first prompt's length; a later prompt that needs more context is
    served by reloading (with YaRN when settings.rope_scale allows, else ContextLimitError).
    """

    def __init__(self, settings: Settings, notify: Notify, *, progress: Progress | None = None) -> None:
        from sacli.models.registry import resolve_model

        self.settings = settings
        self._notify = notify
        self._progress = progress or _no_progress
        self.model_path = resolve_model(settings.model, auto_pull=True, notify=notify)
        self._tokenizer: Any = None
        self.lm: LoadedModel | None = None
        self.last_prompt: Prompt | None = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from sacli.models.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_path)
        return self._tokenizer

    def context_limit(self) -> int:
        """Tokens the model takes as configured (before any --rope-scale extension)."""
        from sacli.models.loading import context_limit

        return context_limit(self.model_path)

    def _reader(self, documents: Sequence[Document]) -> Callable[[Document], None]:
        """Chunk callback that reports bytes read over all documents."""
        offsets: dict[int, int] = {}
        total = 0
        for document in documents:
            offsets[id(document)] = total
            total += document.size

        def on_chunk(document: Document) -> None:
            self._progress(STAGE_READ, offsets[id(document)] + document.bytes_read, total)

        self._progress(STAGE_READ, 0, total)
        return on_chunk

    def count_tokens(self, documents: Sequence[Document]) -> list[tuple[str, int]]:
        """Tokens of each document's text under this model's tokenizer (no weights are loaded)."""
        from sacli.models.prompt import count_tokens

        tokenizer = self.tokenizer
        on_chunk = self._reader(documents)
        try:
            return count_tokens(tokenizer, documents, on_chunk=on_chunk)
        finally:
            self._progress(STAGE_READ, 1, 1)

    def build_prompt(self, documents: Sequence[Document], question: str) -> Prompt:
        from sacli.models.prompt import build_prompt

        if not question.strip():
            raise UsageError("the question is empty")
        if self.lm is None:
            from sacli.models import warmup

            warmup.prepare(self.settings, sum(d.size for d in documents))
        tokenizer = self.tokenizer
        on_chunk = self._reader(documents)
        try:
            prompt = build_prompt(
                tokenizer, documents, question, system=self.settings.system, on_chunk=on_chunk
            )
        finally:
            self._progress(STAGE_READ, 1, 1)
        self.last_prompt = prompt
        return prompt

    def _model_for(self, needed_tokens: int, prompt_tokens: int | None = None) -> LoadedModel:
        from sacli.models.loading import load_model

        if self.lm is not None and needed_tokens <= self.lm.context_limit:
            return self.lm
        if self.settings.rope_scale == "yarn":
            self.lm = None  # free the old weights before loading stretched ones
        # without YaRN, load_model refuses the prompt before loading anything: the model in use stays
        self._progress(STAGE_LOAD, 0, None)
        try:
            self.lm = load_model(
                self.model_path, self.settings, needed_tokens, tokenizer=self._tokenizer, prompt_tokens=prompt_tokens
            )
        finally:
            self._progress(STAGE_LOAD, 1, 1)
        if self.lm.rope_scaled:
            self._notify(
                f"note: context extended to {self.lm.context_limit} tokens by YaRN RoPE scaling; "
                "answers may degrade past the trained length"
            )
        return self.lm

    def answer(
        self,
        documents: Sequence[Document],
        question: str,
        *,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Read the documents, load the model if needed, and generate the answer."""
        from sacli.models.generate import generate

        prompt = self.build_prompt(documents, question)
        lm = self._model_for(prompt.length + self.settings.max_new_tokens, prompt.length)

        def on_layer(done: int, total: int) -> None:
            self._progress(STAGE_PREFILL, done, total)

        try:
            result = generate(lm, prompt.ids, self.settings, on_text=on_text, on_layer=on_layer)
        finally:
            self._progress(STAGE_PREFILL, 1, 1)
        return result

    def stopped_at_limit(self, result: GenerationResult) -> bool:
        """True when --max-new-tokens, not the model, ended the answer."""
        return result.new_tokens >= self.settings.max_new_tokens
