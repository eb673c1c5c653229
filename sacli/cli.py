"""The `sacli` command line: parse, call one function, render.

Errors surface here only: our SacliError subclasses and Typer's usage errors become one
`error: <message>` line on stderr and an exit code; a traceback is shown only with --verbose.
"""

from __future__ import annotations

import os
import traceback
from contextvars import ContextVar
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup
from typer.exceptions import TyperException

from sacli import __version__
from sacli import render
from sacli.config import Settings, load_settings
from sacli.errors import SacliError, UsageError

_DEFAULTS = Settings()
# set by a command that was given --verbose, so the error edge knows to show tracebacks
_VERBOSE: ContextVar[bool] = ContextVar("sacli_verbose", default=False)

EXIT_INTERNAL = 1
EXIT_USAGE = 2


class _Group(TyperGroup):
    """Typer group whose failures are single stderr lines."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        token = _VERBOSE.set(False)
        try:
            code = self._run(args, prog_name, complete_var, **extra)
        finally:
            _VERBOSE.reset(token)
        if standalone_mode:
            raise SystemExit(code)
        return code

    def _run(self, args: Any, prog_name: str | None, complete_var: str | None, **extra: Any) -> int:
        console = render.stderr_console()
        try:
            rv = super().main(
                args=args, prog_name=prog_name or "sacli", complete_var=complete_var, standalone_mode=False, **extra
            )
            return rv if isinstance(rv, int) else 0
        except SacliError as exc:
            if _VERBOSE.get():
                console.print(traceback.format_exc(), markup=False, soft_wrap=True)
            render.error(console, str(exc))
            return exc.exit_code
        except TyperException as exc:  # usage errors found while parsing the command line
            hint = ""
            ctx = getattr(exc, "ctx", None)
            if ctx is not None:
                hint = f" (see '{ctx.command_path} --help')"
            text = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            if text.strip():  # empty when the help was shown instead (no arguments given)
                render.error(console, text.rstrip(".") + hint)
            return int(getattr(exc, "exit_code", EXIT_USAGE))
        except typer.Abort:
            render.error(console, "aborted")
            return 130
        except Exception as exc:  # a bug: say so in one line, keep the traceback for --verbose
            if _VERBOSE.get():
                console.print(traceback.format_exc(), markup=False, soft_wrap=True)
                render.error(console, f"internal error: {type(exc).__name__}: {exc}")
            else:
                render.error(
                    console, f"internal error: {type(exc).__name__}: {exc} (run with --verbose for the traceback)"
                )
            return EXIT_INTERNAL


class _AskCommand(TyperCommand):
    """Usage line `sacli ask [OPTIONS] SOURCE... QUESTION`: one list argument holds both."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return ["[OPTIONS]", "SOURCE...", "QUESTION"]


app = typer.Typer(
    cls=_Group,
    name="sacli",
    help="Ask questions about long documents with a local LLM (SampleAttention sparse prefill).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sacli {__version__}")
        raise typer.Exit()


# the commands that may run the GPU kernels (the others start without importing torch)
_KERNEL_COMMANDS = ("ask", "summarize", "bench", "eval")


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit."),
    ] = None,
) -> None:
    """Ask questions about long documents with a local LLM (SampleAttention sparse prefill)."""
    if ctx.invoked_subcommand in _KERNEL_COMMANDS:
        _keep_autotuning()


def _keep_autotuning() -> None:
    """Keep the GPU kernels' autotuning choices in $SACLI_HOME/autotune.json (kernels/tuning.py),
    or in $SACLI_AUTOTUNE_FILE; that variable set to "" or "none" keeps them in memory only."""
    from sacli.kernels import tuning
    from sacli.models.registry import sacli_home

    env = os.environ.get("SACLI_AUTOTUNE_FILE")
    if env is None:
        tuning.use_file(sacli_home() / "autotune.json")
    else:
        tuning.use_file(None if env.strip().lower() in ("", "none") else os.path.expanduser(env))


def _notifier(console: Console) -> Callable[[str], None]:
    def notify(text: str) -> None:
        render.message(console, text)

    return notify


def _split_args(args: list[str], *, count_only: bool) -> tuple[list[str], str]:
    """SOURCE... and QUESTION from the positional arguments.

    With --count-tokens the question may be left out: a last argument that names no path is
    taken for the (unused) question.
    """
    if count_only:
        if len(args) >= 2 and args[-1] != "-" and not os.path.exists(args[-1]):
            return args[:-1], args[-1]
        return args, ""
    if len(args) >= 2:
        return args[:-1], args[-1]
    if args and (args[0] == "-" or os.path.exists(args[0])):
        raise UsageError("missing QUESTION: sacli ask SOURCE... QUESTION")
    raise UsageError("missing SOURCE (a file, a directory, or - for stdin): sacli ask SOURCE... QUESTION")


@app.command(cls=_AskCommand)
def ask(
    args: Annotated[
        list[str],
        typer.Argument(
            metavar="SOURCE... QUESTION",
            help="Files, directories (read recursively) or - for stdin, then the question.",
            show_default=False,
        ),
    ],
    model: Annotated[
        Optional[str], typer.Option("--model", "-m", help=f"Model name or directory (default: {_DEFAULTS.model})")
    ] = None,
    max_new_tokens: Annotated[
        Optional[int],
        typer.Option("--max-new-tokens", "-n", help=f"Most tokens to generate (default: {_DEFAULTS.max_new_tokens})"),
    ] = None,
    system: Annotated[
        Optional[str], typer.Option("--system", help="System prompt (default: the model's own)")
    ] = None,
    temperature: Annotated[
        Optional[float],
        typer.Option("--temperature", "-t", help=f"Sampling temperature, 0 = greedy (default: {_DEFAULTS.temperature})"),
    ] = None,
    alpha: Annotated[
        Optional[float],
        typer.Option("--alpha", help=f"SampleAttention: attention mass to keep (default: {_DEFAULTS.alpha})"),
    ] = None,
    window: Annotated[
        Optional[float],
        typer.Option("--window", help=f"SampleAttention: local window, fraction of length (default: {_DEFAULTS.window})"),
    ] = None,
    sample_ratio: Annotated[
        Optional[float],
        typer.Option(
            "--sample-ratio", help=f"SampleAttention: share of query rows sampled (default: {_DEFAULTS.sample_ratio})"
        ),
    ] = None,
    dense_below: Annotated[
        Optional[int],
        typer.Option("--dense-below", help="Dense prefill below this many tokens; -1: the measured crossover for the device (default)"),
    ] = None,
    rule: Annotated[
        Optional[str],
        typer.Option("--rule", help=f"SampleAttention selection: sample, adaptive or segments (default: {_DEFAULTS.rule})"),
    ] = None,
    sampled_levels: Annotated[
        Optional[int],
        typer.Option("--sampled-levels", help="Rule segments: alpha levels tried on sampled rows before exact ranking; 0 all (default: 0)"),
    ] = None,
    chunk: Annotated[
        Optional[int],
        typer.Option("--chunk", help="Rule sample: query rows per column list, 0 one per head or a multiple of 128 (default: 0)"),
    ] = None,
    dense: Annotated[
        Optional[bool], typer.Option("--dense/--sparse", help="Dense attention in the prefill (for comparison)")
    ] = None,
    rope_scale: Annotated[
        Optional[str],
        typer.Option("--rope-scale", help=f"Over the trained context: none (refuse) or yarn (default: {_DEFAULTS.rope_scale})"),
    ] = None,
    device: Annotated[
        Optional[str], typer.Option("--device", help=f"auto, cpu, cuda, cuda:N (default: {_DEFAULTS.device})")
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option("--dtype", help=f"auto, float32, bfloat16, float16 (default: {_DEFAULTS.dtype})"),
    ] = None,
    hidden: Annotated[
        Optional[bool], typer.Option("--hidden/--no-hidden", help="Read hidden files and directories too")
    ] = None,
    no_gitignore: Annotated[
        Optional[bool], typer.Option("--no-gitignore/--gitignore", help="Read files that .gitignore excludes")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (answer and statistics)")] = False,
    count_tokens: Annotated[
        bool, typer.Option("--count-tokens", help="Only count tokens per file (loads just the tokenizer)")
    ] = False,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the answer when complete")] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Per-layer table; tracebacks on errors")
    ] = False,
) -> None:
    """Answer QUESTION from the SOURCE documents.

    Examples: sacli ask book.txt "Who is Mr. Darcy?";  cat notes.txt | sacli ask - "Summarize"
    """
    _VERBOSE.set(verbose)
    from sacli.app import Session
    from sacli.inputs import collect_documents

    console = render.stderr_console()
    notify = _notifier(console)
    overrides = dict(
        model=model,
        max_new_tokens=max_new_tokens,
        system=system,
        temperature=temperature,
        alpha=alpha,
        window=window,
        sample_ratio=sample_ratio,
        dense_below=dense_below,
        rule=rule,
        sampled_levels=sampled_levels,
        chunk=chunk,
        dense=dense,
        rope_scale=rope_scale,
        device=device,
        dtype=dtype,
        hidden=hidden,
        no_gitignore=no_gitignore,
    )
    settings = load_settings(overrides)
    sources, question = _split_args(list(args), count_only=count_tokens)
    if not count_tokens and not question.strip():
        raise UsageError("the question is empty")
    documents = collect_documents(
        sources, hidden=settings.hidden, use_gitignore=not settings.no_gitignore, notify=notify
    )
    with render.StageProgress(console) as progress:
        session = Session(settings, notify, progress=progress)
        if count_tokens:
            counts = session.count_tokens(documents)
            progress.close()
            render.token_counts(
                console, counts, model=session.model_path.name, context_limit=session.context_limit(), as_json=as_json
            )
            return
        stream = not (as_json or no_stream)
        writer = render.AnswerWriter() if stream else None
        result = session.answer(documents, question, on_text=writer)
    assert session.lm is not None and session.last_prompt is not None
    name, where = session.lm.name, str(session.lm.device)
    if as_json:
        data = render.answer_json(
            result,
            model=name,
            device=where,
            documents=session.last_prompt.documents,
            stopped_at_limit=session.stopped_at_limit(result),
        )
        render.print_json(data)
        return
    if writer is not None:
        writer.finish()
    else:
        render.print_answer(result.text)
    if session.stopped_at_limit(result):
        notify(
            f"note: the answer stopped at the limit of {settings.max_new_tokens} new tokens "
            "(raise it with --max-new-tokens)"
        )
    render.summary(console, result, model=name, device=where, verbose=verbose)


@app.command()
def pull(
    spec: Annotated[
        Optional[str],
        typer.Argument(
            metavar="[SPEC]",
            help="Nothing for the default model, hf:ORG/NAME for a Hub model, or a local .gguf file.",
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks on errors")] = False,
) -> None:
    """Download or import a model into the local model store; prints its directory."""
    _VERBOSE.set(verbose)
    from sacli.models.pull import pull as pull_model

    console = render.stderr_console()
    path = pull_model(spec, progress=console.is_terminal)
    typer.echo(str(path))


@app.command()
def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks on errors")] = False,
) -> None:
    """List the models available locally."""
    _VERBOSE.set(verbose)
    from sacli.models.registry import list_models, models_dir

    console = render.stderr_console()
    render.models_listing(console, list_models(), as_json=as_json)
    if not as_json:
        render.message(console, f"model store: {models_dir()}")


def _register_subcommands() -> None:
    # Imported here, after `app` exists: these modules reach back for the error edge's state.
    from sacli.bench import app as bench_app
    from sacli.eval_cmd import app as eval_app
    from sacli.summarize_cmd import summarize

    app.command()(summarize)
    app.add_typer(bench_app, name="bench")
    app.add_typer(eval_app, name="eval")


_register_subcommands()


def main() -> None:
    """Console entry point (`sacli`, `python -m sacli`); exits with the command's status."""
    typer.main.get_command(app).main(prog_name="sacli")
