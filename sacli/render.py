"""Everything the commands show: stderr messages, progress, summaries, JSON and tables.

stdout carries only the product (the answer, or one JSON object, or a listing); all else goes to a
stderr rich Console, which adds colour and live progress only on a terminal and honours NO_COLOR.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from rich import box, filesize
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from sacli.models.generate import GenerationResult
    from sacli.models.registry import ModelInfo

# Stages quicker than this never show a progress bar.
PROGRESS_DELAY_S = 0.5


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


def error(console: Console, message: str) -> None:
    """One line, never wrapped: `error: <message>`."""
    line = " ".join(message.split())
    console.print(Text("error: ", style="bold red") + Text(line), soft_wrap=True)


def message(console: Console, text: str) -> None:
    """A note or warning from the application, as one unwrapped line."""
    style = "yellow" if text.startswith("warning:") else "dim"
    console.print(Text(text, style=style), soft_wrap=True)


class StageProgress:
    """Progress callback (stage, completed, total) drawn with rich.progress on a terminal.

    A bar appears only once its stage has run for PROGRESS_DELAY_S, and the display is taken down
    as soon as no stage is running, so the streamed answer never mixes with it. Off a terminal it
    draws nothing.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.enabled = console.is_terminal
        self._progress: _DelayedProgress | None = None
        self._tasks: dict[str, Any] = {}

    def __call__(self, stage: str, completed: float, total: float | None) -> None:
        if not self.enabled:
            return
        finished = total is not None and completed >= total
        if stage not in self._tasks:
            if finished:
                return
            if self._progress is None:
                self._progress = _DelayedProgress(
                    SpinnerColumn(),
                    TextColumn("{task.description}"),
                    BarColumn(),
                    TextColumn("{task.fields[detail]}"),
                    TimeElapsedColumn(),
                    console=self.console,
                    transient=True,
                )
                self._progress.start()
            self._tasks[stage] = self._progress.add_task(stage, total=total, detail="")
        task = self._tasks[stage]
        assert self._progress is not None
        if finished:
            self._progress.remove_task(task)
            del self._tasks[stage]
            if not self._tasks:
                self.close()
            return
        self._progress.update(task, completed=completed, total=total, detail=_detail(stage, completed, total))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._tasks.clear()

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _DelayedProgress(Progress):
    def get_renderables(self) -> Iterable[Any]:
        if not hasattr(self, "get_time"):
            return  # rich asks once from inside Progress.__init__, before it sets get_time
        now = self.get_time()
        shown = [t for t in self.tasks if t.start_time is not None and now - t.start_time >= PROGRESS_DELAY_S]
        yield self.make_tasks_table(shown)


def _detail(stage: str, completed: float, total: float | None) -> str:
    if total is None:
        return ""
    if stage == "Reading":
        return f"{filesize.decimal(int(completed))}/{filesize.decimal(int(total))}"
    if stage == "Prefill":
        return f"layer {int(completed)}/{int(total)}"
    return f"{int(completed)}/{int(total)}"


class AnswerWriter:
    """Streams answer text to stdout as it is generated, flushing each piece."""

    def __init__(self) -> None:
        self.last = ""

    def __call__(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.last = text

    def finish(self) -> None:
        if not self.last.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()


def print_answer(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()


def answer_json(
    result: GenerationResult,
    *,
    model: str,
    device: str,
    documents: Sequence[tuple[str, int]],
    stopped_at_limit: bool = False,
) -> dict[str, Any]:
    layers = [asdict(layer) if is_dataclass(layer) else dict(layer) for layer in result.layers]
    return {
        "answer": result.text,
        "model": model,
        "device": device,
        "prompt_tokens": result.prompt_tokens,
        "new_tokens": result.new_tokens,
        # the answer was cut by --max-new-tokens rather than ended by the model
        "stopped_at_limit": stopped_at_limit,
        "ttft_ms": result.ttft_ms,
        # part of ttft_ms spent waiting for the GPU kernels readied while the model loaded
        "warmup_wait_ms": result.warmup_wait_ms,
        "prefill_ms": result.prefill_ms,
        "prefill_tokens_per_s": result.prefill_tokens_per_s,
        "decode_tokens_per_s": result.decode_tokens_per_s,
        "sparsity": result.sparsity,
        "attention": result.attention,
        "documents": [{"path": path, "tokens": tokens} for path, tokens in documents],
        "layers": layers,
    }


def summary(console: Console, result: GenerationResult, *, model: str, device: str, verbose: bool) -> None:
    """Timing and sparsity of one answer: a panel on a terminal, one plain line elsewhere."""
    attention = result.attention
    if "sparse" in attention.split("+"):
        attention = f"{attention}, sparsity {result.sparsity:.1%}"
    if console.is_terminal:
        body = Table.grid(padding=(0, 2))
        body.add_column(style="bold")
        body.add_column()
        body.add_row("model", Text(f"{model} on {device}"))
        body.add_row("TTFT", f"{result.ttft_ms:,.0f} ms")
        body.add_row(
            "prompt",
            f"{result.prompt_tokens:,} tokens, prefill {result.prefill_ms:,.0f} ms "
            f"({result.prefill_tokens_per_s:,.0f} tokens/s)",
        )
        body.add_row("answer", f"{result.new_tokens:,} tokens ({result.decode_tokens_per_s:,.1f} tokens/s)")
        body.add_row("attention", attention)
        console.print(Panel(body, title="sacli", title_align="left", expand=False, box=box.ROUNDED))
    else:
        console.print(
            f"model {model} on {device} | TTFT {result.ttft_ms:.0f} ms | "
            f"prompt {result.prompt_tokens} tokens ({result.prefill_tokens_per_s:.0f} tokens/s) | "
            f"answer {result.new_tokens} tokens ({result.decode_tokens_per_s:.1f} tokens/s) | "
            f"attention {attention}",
            soft_wrap=True,
            markup=False,
        )
    if verbose and result.layers:
        table = Table("layer", "ms", "density", box=box.SIMPLE, title="prefill by layer")
        for layer in result.layers:
            table.add_row(str(layer.layer), f"{layer.ms:.2f}", f"{layer.density:.3f}")
        console.print(table)


def token_counts(
    console: Console, counts: Sequence[tuple[str, int]], *, model: str, context_limit: int, as_json: bool
) -> None:
    """Per-document token counts and their total, on stdout."""
    total = sum(n for _, n in counts)
    if as_json:
        print_json(
            {
                "model": model,
                "context_limit": context_limit,
                "files": [{"path": path, "tokens": n} for path, n in counts],
                "total": total,
            }
        )
        return
    width = max(len(f"{total:,}"), 6)
    for path, n in counts:
        sys.stdout.write(f"{n:>{width},}  {path}\n")
    sys.stdout.write(f"{total:>{width},}  total\n")
    sys.stdout.flush()
    if total > context_limit:
        message(
            console,
            f"warning: {total:,} tokens exceed the {context_limit:,}-token context of {model} "
            "(--rope-scale yarn extends it)",
        )


def models_listing(console: Console, infos: Sequence[ModelInfo], *, as_json: bool) -> None:
    if as_json:
        print_json(
            [
                {
                    "name": i.name,
                    "path": str(i.path),
                    "size_bytes": i.size_bytes,
                    "architecture": i.architecture,
                    "context": i.context,
                }
                for i in infos
            ]
        )
        return
    if not infos:
        message(console, "no models yet; `sacli pull` fetches the default one")
        return
    out = Console(highlight=False, soft_wrap=True)
    table = Table("name", "architecture", "context", "size", "path", box=box.SIMPLE_HEAD)
    for i in infos:
        table.add_row(Text(i.name), i.architecture, f"{i.context:,}", f"{i.size_bytes / 1e6:,.0f} MB", Text(str(i.path)))
    out.print(table)
