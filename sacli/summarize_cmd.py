"""`sacli summarize`: parse options, run the job (or --merge), report, and exit with a code that
says whether every document succeeded (0), some failed (1), the command was wrong (2) or the model
could not be loaded (4). docs/SUMMARIZE.md has the details."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console

from sacli import render
from sacli.config import Settings
from sacli.errors import SacliError, UsageError

if TYPE_CHECKING:
    from sacli.summarize import JobProgress

_DEFAULTS = Settings()


class _Output:
    """stderr of one invocation: messages, errors and the progress bar share one console."""

    def __init__(self) -> None:
        self.console: Console = render.stderr_console()
        # a sharded run names its worker: several write to one terminal or log
        self.prefix = ""
        self._bar: Any = None
        self._task: Any = None

    def say(self, message: str) -> None:
        render.message(self.console, f"{self.prefix}{message}")

    def error(self, message: str) -> None:
        render.error(self.console, f"{self.prefix}{message}")

    def progress(self, p: JobProgress) -> None:
        """Documents done / total, tokens/s, and an ETA from the bytes left (on a terminal only)."""
        if not self.console.is_terminal or p.total == 0:
            return
        if self._bar is None:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn(f"{self.prefix}summarize"),
                BarColumn(),
                TextColumn("{task.fields[docs]} docs"),
                TextColumn("{task.fields[rate]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._bar.add_task("summarize", total=max(p.bytes_total, 1), docs="", rate="-")
            self._bar.start()
        rate = f"{p.tokens_per_s:,.0f}" if p.done else "-"
        self._bar.update(self._task, completed=p.bytes_done, docs=f"{p.done}/{p.total}", rate=rate)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _job_option(*names: str, help: str) -> Any:
    return typer.Option(*names, help=help, rich_help_panel="Job")


def _model_option(*names: str, help: str) -> Any:
    return typer.Option(*names, help=help, rich_help_panel="Model settings")


def summarize(
    sources: Annotated[
        Optional[list[str]],
        typer.Argument(
            metavar="SOURCE",
            help="Files and directories (every text file under them) to summarize.",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Optional[Path], _job_option("--out", "-o", help="Result file, JSON Lines; rerunning the command resumes it")
    ] = None,
    prompt: Annotated[
        Optional[str],
        _job_option("--prompt", "-p", help="Instruction given with each document [default: a short summary]"),
    ] = None,
    from_stdin: Annotated[
        bool, _job_option("--from-stdin", help="Read paths to summarize from stdin, one per line")
    ] = False,
    null: Annotated[
        bool, _job_option("--null", "-0", help="With --from-stdin: paths are NUL-separated (find -print0)")
    ] = False,
    per_dir: Annotated[
        bool, _job_option("--per-dir", help="One record per directory, its files summarized together")
    ] = False,
    merge: Annotated[
        bool, _job_option("--merge", help="Combine OUT and its per-shard files into OUT, one line per document")
    ] = False,
    shard: Annotated[
        Optional[str],
        _job_option("--shard", help="This worker's share INDEX/COUNT [default: RANK/WORLD_SIZE or Slurm array]"),
    ] = None,
    json_report: Annotated[
        bool, _job_option("--json", help="Print the final report as one JSON object on stdout")
    ] = False,
    verbose: Annotated[bool, _job_option("--verbose", "-v", help="Tracebacks of unexpected failures")] = False,
    model: Annotated[
        Optional[str], _model_option("--model", "-m", help=f"Model name or directory [default: {_DEFAULTS.model}]")
    ] = None,
    max_new_tokens: Annotated[
        Optional[int],
        _model_option("--max-new-tokens", "-n", help=f"Most tokens per summary [default: {_DEFAULTS.max_new_tokens}]"),
    ] = None,
    temperature: Annotated[
        Optional[float],
        _model_option(
            "--temperature", "-t", help=f"Sampling temperature, 0 = greedy [default: {_DEFAULTS.temperature}]"
        ),
    ] = None,
    system: Annotated[
        Optional[str], _model_option("--system", help="System prompt [default: the model's own]")
    ] = None,
    alpha: Annotated[
        Optional[float],
        _model_option("--alpha", help=f"SampleAttention: attention mass to keep [default: {_DEFAULTS.alpha}]"),
    ] = None,
    window: Annotated[
        Optional[float],
        _model_option(
            "--window", help=f"SampleAttention: local window, fraction of length [default: {_DEFAULTS.window}]"
        ),
    ] = None,
    sample_ratio: Annotated[
        Optional[float],
        _model_option(
            "--sample-ratio",
            help=f"SampleAttention: share of query rows sampled [default: {_DEFAULTS.sample_ratio}]",
        ),
    ] = None,
    dense_below: Annotated[
        Optional[int],
        _model_option(
            "--dense-below", help=f"Dense prefill below this many tokens [default: {_DEFAULTS.dense_below}]"
        ),
    ] = None,
    dense: Annotated[
        Optional[bool], _model_option("--dense/--sparse", help="Dense attention in the prefill (for comparison)")
    ] = None,
    rope_scale: Annotated[
        Optional[str],
        _model_option(
            "--rope-scale",
            help=f"Over the trained context: none (error record) or yarn [default: {_DEFAULTS.rope_scale}]",
        ),
    ] = None,
    device: Annotated[
        Optional[str], _model_option("--device", help=f"auto, cpu, cuda, cuda:N [default: {_DEFAULTS.device}]")
    ] = None,
    dtype: Annotated[
        Optional[str],
        _model_option("--dtype", help=f"auto, float32, bfloat16, float16 [default: {_DEFAULTS.dtype}]"),
    ] = None,
    hidden: Annotated[
        Optional[bool], _model_option("--hidden/--no-hidden", help="Read hidden files and directories too")
    ] = None,
    no_gitignore: Annotated[
        Optional[bool], _model_option("--no-gitignore/--gitignore", help="Read files that .gitignore excludes")
    ] = None,
) -> None:
    """Summarize many documents into a JSON Lines file: resumable, one line per document, shardable.

    Examples: sacli summarize reports/ --out summaries.jsonl;
    find . -name '*.md' | sacli summarize --from-stdin --out s.jsonl;
    torchrun --nproc-per-node 2 -m sacli summarize corpus/ --out s.jsonl, then --merge --out s.jsonl
    """
    overrides: dict[str, Any] = {
        "model": model,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "system": system,
        "alpha": alpha,
        "window": window,
        "sample_ratio": sample_ratio,
        "dense_below": dense_below,
        "dense": dense,
        "rope_scale": rope_scale,
        "device": device,
        "dtype": dtype,
        "hidden": hidden,
        "no_gitignore": no_gitignore,
    }
    output = _Output()
    try:
        if out is None:
            raise UsageError("--out FILE is required (the JSON Lines result file)")
        if merge:
            if sources or from_stdin or shard:
                raise UsageError("--merge takes only --out (it combines OUT and its per-shard files)")
            code = _merge(out, json_report, output)
        else:
            if null and not from_stdin:
                raise UsageError("--null/-0 only applies with --from-stdin")
            paths = list(sources or [])
            if from_stdin:
                paths += _paths_from_stdin(null)
            code = _job(paths, out, prompt, per_dir, shard, json_report, verbose, overrides, output)
    except SacliError as exc:
        output.close()
        if verbose:
            output.console.print(traceback.format_exc(), markup=False, soft_wrap=True)
        output.error(str(exc))
        raise typer.Exit(code=exc.exit_code) from None
    except KeyboardInterrupt:
        output.close()
        output.error("interrupted; finished documents are saved: rerun the same command to resume")
        raise typer.Exit(code=130) from None
    raise typer.Exit(code=code)


def _paths_from_stdin(nul: bool) -> list[str]:
    from sacli.summarize import read_path_list

    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("--from-stdin expects paths piped on stdin, e.g. find . -name '*.md' | sacli summarize ...")
    paths = read_path_list(sys.stdin.buffer, nul=nul)
    if not paths:
        raise UsageError("--from-stdin: no paths on stdin")
    return paths


def _job(
    sources: list[str],
    out: Path,
    prompt: str | None,
    per_dir: bool,
    shard: str | None,
    json_report: bool,
    verbose: bool,
    overrides: dict[str, Any],
    output: _Output,
) -> int:
    # the job's modules (and torch, through the model) load only here, not for --merge or --help
    from sacli.config import load_settings
    from sacli.jobs import detect_shard
    from sacli.summarize import DEFAULT_PROMPT, JobOptions, rank_device, run_job

    settings = load_settings(overrides)
    worker = detect_shard(os.environ, shard)
    if worker.count > 1:
        output.prefix = f"[{worker.label}] "
    settings = rank_device(settings, os.environ)
    options = JobOptions(
        prompt=DEFAULT_PROMPT if prompt is None else prompt,
        per_dir=per_dir,
        hidden=settings.hidden,
        use_gitignore=not settings.no_gitignore,
        verbose=verbose,
    )
    try:
        report = run_job(
            sources, out, settings, options, shard=worker, notify=output.say, progress=output.progress
        )
    finally:
        output.close()
    output.say(report.summary_line())
    if report.done_elsewhere or worker.count > 1:
        output.say(f"note: once every worker has finished, `sacli summarize --merge --out {out}` makes one file")
    if json_report:
        typer.echo(json.dumps(report.to_json()))
    return report.exit_code


def _merge(out: Path, json_report: bool, output: _Output) -> int:
    from sacli.jobs import merge

    report = merge(out, output.say)
    output.say(
        f"merged {len(report.inputs)} files into {out}: {report.ok} ok, {report.errors} error, "
        f"{report.dropped} superseded lines dropped"
    )
    if json_report:
        data = {k: v for k, v in vars(report).items() if k not in ("out", "inputs")}
        typer.echo(json.dumps({"out": str(out), "inputs": [str(p) for p in report.inputs], **data}))
    return 1 if report.errors or report.bad_lines else 0
