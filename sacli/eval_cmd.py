"""`sacli eval fidelity | ppl | niah`: parse options, run one measurement, print a table or JSON.

Results go to stdout (a table, or one JSON object with --json); progress notes go to stderr.
`--out FILE.json` also writes the JSON (with device, date and command) and PNG heatmaps beside it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from sacli import render
from sacli.config import Settings, load_settings
from sacli.errors import UsageError

_DEFAULTS = Settings()

app = typer.Typer(
    help="Measure how close sparse prefill stays to dense: attention fidelity, perplexity, needle retrieval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help=f"Model name or directory [default: {_DEFAULTS.model}]")]
AlphaOpt = Annotated[Optional[float], typer.Option("--alpha", help=f"Attention mass to keep [default: {_DEFAULTS.alpha}]")]
WindowOpt = Annotated[
    Optional[float], typer.Option("--window", help=f"Local window, fraction of length [default: {_DEFAULTS.window}]")
]
SampleOpt = Annotated[
    Optional[float], typer.Option("--sample-ratio", help=f"Share of query rows sampled [default: {_DEFAULTS.sample_ratio}]")
]
LevelsOpt = Annotated[
    Optional[int],
    typer.Option("--sampled-levels", help="Rule segments: alpha levels tried on sampled rows before exact ranking; 0 all [default: 0]"),
]
ChunkOpt = Annotated[
    Optional[int],
    typer.Option("--chunk", help="Rule sample: query rows per column list, 0 one per head or a multiple of 128 [default: 0]"),
]
DenseBelowOpt = Annotated[
    Optional[int], typer.Option("--dense-below", help="Dense prefill below this many tokens; -1 automatic [default: 0]")
]
RopeOpt = Annotated[
    Optional[str], typer.Option("--rope-scale", help="Past the trained context: none (refuse) or yarn [default: none]")
]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:N [default: auto]")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="auto, float32, bfloat16, float16 [default: auto]")]
RuleOpt = Annotated[
    list[str],
    typer.Option(
        "--rule",
        help="Selection rule(s): product (what sacli runs), literal, residual, adaptive, segments, exact (every entry: the arithmetic floor); repeatable",
    ),
]
LengthsOpt = Annotated[str, typer.Option("--lengths", help="Comma-separated prompt lengths in tokens, e.g. 4K,8K")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Also write JSON here, and PNGs beside it")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Tracebacks on errors")]


@app.callback()
def _evaluation(ctx: typer.Context) -> None:
    # dense and sparse runs must differ by the selection alone, not by kernels' run-to-run noise
    from sacli import evaluate as ev

    ctx.with_resource(ev.deterministic())


def _settings(**overrides: Any) -> Settings:
    # measuring sparse against dense needs the sparse path at every length: unless asked
    # otherwise, no automatic dense routing of short prompts
    if overrides.get("dense_below") is None:
        overrides["dense_below"] = 0
    return load_settings(overrides)


def _console() -> Console:
    return render.stderr_console()


def _model_cache(settings: Settings, *, one_token: bool) -> tuple[Callable[[str], None], Any]:
    """A notifier writing to stderr and a model cache that reports through it (one_token: the
    runs only score prompts, so only the prompt must fit the context)."""
    from sacli import evaluate as ev

    console = _console()
    notify = lambda m: render.message(console, m)  # noqa: E731
    return notify, ev.ModelCache(replace(settings, max_new_tokens=1) if one_token else settings, notify)


def _stdout_table(table: Table) -> None:
    Console(highlight=False).print(table)


def _check_rules(rules: list[str]) -> list[str]:
    from sacli.eval_rules import RULES

    rules = rules or ["product"]
    for r in rules:
        if r not in RULES:
            raise UsageError(f"unknown rule {r!r}; choose from {', '.join(RULES)}")
    return list(dict.fromkeys(rules))


def _parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise UsageError(f"cannot read --layers {text!r}; use e.g. 0-5,17") from None
    return sorted(set(out))


def _set_verbose(verbose: bool) -> None:
    # the main CLI shows tracebacks only when the command asked for them
    try:
        from sacli.cli import _VERBOSE

        _VERBOSE.set(verbose)
    except ImportError:
        pass


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


@app.command()
def fidelity(
    text: Annotated[Path, typer.Argument(help="Text file; its first LENGTH tokens are the prompt")],
    lengths: LengthsOpt = "8K",
    rule: RuleOpt = [],
    layers: Annotated[Optional[str], typer.Option("--layers", help="Only these layers, e.g. 0-5,17 [default: all]")] = None,
    oracle: Annotated[bool, typer.Option("--oracle/--no-oracle", help="Also compute the per-row oracle density")] = True,
    row_chunk: Annotated[int, typer.Option("--row-chunk", help="Query rows per block in the measurement")] = 1024,
    model: ModelOpt = None,
    alpha: AlphaOpt = None,
    window: WindowOpt = None,
    sample_ratio: SampleOpt = None,
    sampled_levels: LevelsOpt = None,
    chunk: ChunkOpt = None,
    dense_below: DenseBelowOpt = None,
    rope_scale: RopeOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Per layer and head: kept density, oracle density, kept mass per row, output error vs dense."""
    _set_verbose(verbose)
    from sacli import evaluate as ev

    settings = _settings(
        model=model, alpha=alpha, window=window, sample_ratio=sample_ratio, sampled_levels=sampled_levels, chunk=chunk,
        dense_below=dense_below, rope_scale=rope_scale, device=device, dtype=dtype,
    )
    rules = _check_rules(rule)
    lens = ev.parse_lengths(lengths)
    layer_list = _parse_layers(layers)
    if row_chunk < 1:
        raise UsageError("--row-chunk must be at least 1")
    body = ev.read_text(text)
    notify, cache = _model_cache(settings, one_token=True)
    runs: list[dict[str, Any]] = []
    header: dict[str, Any] = {}
    inputs = {S: ev.text_tokens(cache.tokenizer, body, S, source=str(text)) for S in lens}
    for S, ids in inputs.items():
        lm = cache.get(S)
        header = ev.run_header(settings, lm.device, lm.name)
        notify(f"fidelity at {S} tokens on {lm.device} ({', '.join(rules)})")
        from sacli.eval_rules import selector

        selectors = {name: selector(name, settings) for name in rules}
        results = ev.measure_fidelity(
            lm.model, ids, selectors, settings.alpha, layers=layer_list, oracle=oracle, row_chunk=row_chunk,
            on_layer=lambda d, n: notify(f"  layer {d}/{n}") if verbose else None,
        )
        for name, res in results.items():
            entry = {"length": S, "rope_scaled": lm.rope_scaled, **res.to_json()}
            runs.append(entry)
            if out is not None:
                png = out.with_name(f"{out.stem}_{name}_{S}.png")
                ev.fidelity_heatmap(res, png, f"{lm.name} {S} tokens, rule {name}, alpha {settings.alpha}")
                entry["png"] = png.name
    data = ev.rounded({**header, "text": text.name, "runs": runs})
    if out is not None:
        ev.write_json(out, data)
    if as_json:
        render.print_json(data)
        return
    table = Table(title="attention fidelity (means over layers x heads)")
    for col in ("length", "rule", "density", "oracle", "mass", "mass p01", "err mean", "err max", "worst", "dense heads"):
        table.add_column(col, justify="right")
    for r in runs:
        s = r["summary"]
        table.add_row(
            str(r["length"]), r["rule"], _pct(s["density_mean"]), _pct(s["oracle_density_mean"]),
            f"{s['mass_mean']:.4f}", f"{s['mass_p01_mean']:.4f}", _pct(s["err_mean"]), _pct(s["err_max"]),
            s["worst_head"], f"{s['dense_heads']}/{s['heads']}",
        )
    _stdout_table(table)


@app.command()
def ppl(
    text: Annotated[Path, typer.Argument(help="Text file; its first LENGTH tokens are read")],
    lengths: LengthsOpt = "8K",
    last: Annotated[int, typer.Option("--last", help="Score the last N tokens of each length")] = 1024,
    rule: RuleOpt = [],
    model: ModelOpt = None,
    alpha: AlphaOpt = None,
    window: WindowOpt = None,
    sample_ratio: SampleOpt = None,
    sampled_levels: LevelsOpt = None,
    chunk: ChunkOpt = None,
    dense_below: DenseBelowOpt = None,
    rope_scale: RopeOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Perplexity of the last tokens after a long prefix, dense vs sparse prefill, with KL and top-1."""
    _set_verbose(verbose)
    from dataclasses import asdict

    from sacli import evaluate as ev

    settings = _settings(
        model=model, alpha=alpha, window=window, sample_ratio=sample_ratio, sampled_levels=sampled_levels, chunk=chunk,
        dense_below=dense_below, rope_scale=rope_scale, device=device, dtype=dtype,
    )
    rules = _check_rules(rule)
    lens = ev.parse_lengths(lengths)
    body = ev.read_text(text)
    notify, cache = _model_cache(settings, one_token=True)
    rows = []
    header: dict[str, Any] = {}
    inputs = {S: ev.text_tokens(cache.tokenizer, body, S, source=str(text)) for S in lens}
    for S, ids in inputs.items():
        lm = cache.get(S)
        header = ev.run_header(settings, lm.device, lm.name)
        for name in rules:
            notify(f"perplexity at {S} tokens, rule {name}, on {lm.device}")
            res = ev.measure_ppl(lm, ids, settings, name, last)
            rows.append({**asdict(res), "rope_scaled": lm.rope_scaled})
    data = ev.rounded({**header, "text": text.name, "last": last, "runs": rows})
    if out is not None:
        ev.write_json(out, data)
    if as_json:
        render.print_json(data)
        return
    table = Table(title=f"perplexity of the last {last} tokens, sparse vs dense prefill")
    for col in ("length", "rule", "density", "PPL dense", "PPL sparse", "ratio", "KL (nats)", "top-1 agree"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["seq_len"]), r["rule"], _pct(r["density_mean"]), f"{r['ppl_dense']:.3f}", f"{r['ppl_sparse']:.3f}",
            f"{r['ppl_ratio']:.4f}", f"{r['kl_mean']:.4f}", _pct(r["top1_agreement"]),
        )
    _stdout_table(table)


@app.command()
def niah(
    books: Annotated[list[Path], typer.Argument(help="Haystack text file(s); cells cycle through them")],
    lengths: LengthsOpt = "2K,4K,8K",
    depths: Annotated[str, typer.Option("--depths", help="Needle depths in [0, 1], comma-separated")] = "0,0.25,0.5,0.75,1",
    rule: RuleOpt = [],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most answer tokens")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the needle numbers")] = 0,
    trials: Annotated[int, typer.Option(
        "--trials", help="Needles per cell: trial t uses the needles of --seed SEED+t; the summary pools them")] = 1,
    model: ModelOpt = None,
    alpha: AlphaOpt = None,
    window: WindowOpt = None,
    sample_ratio: SampleOpt = None,
    sampled_levels: LevelsOpt = None,
    chunk: ChunkOpt = None,
    dense_below: DenseBelowOpt = None,
    rope_scale: RopeOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    out: OutOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Needle in a haystack over lengths x depths: greedy answers dense vs sparse, and retrieval."""
    _set_verbose(verbose)
    from dataclasses import asdict, replace

    from sacli import evaluate as ev

    settings = _settings(
        model=model, alpha=alpha, window=window, sample_ratio=sample_ratio, sampled_levels=sampled_levels, chunk=chunk,
        dense_below=dense_below, rope_scale=rope_scale, device=device, dtype=dtype, max_new_tokens=max_new_tokens, temperature=0.0,
    )
    rules = _check_rules(rule)
    lens = ev.parse_lengths(lengths)
    deps = ev.parse_floats(depths, "--depths")
    if not deps or any(not 0.0 <= d <= 1.0 for d in deps):
        raise UsageError("--depths must be numbers in [0, 1]")
    if trials < 1:
        raise UsageError(f"--trials must be at least 1, got {trials}")
    texts = [ev.read_text(b) for b in books]
    notify, cache = _model_cache(settings, one_token=False)
    cells: dict[str, list] = {r: [] for r in rules}
    header: dict[str, Any] = {}
    n = 0
    for S in lens:
        lm = cache.get(S + max_new_tokens)
        header = ev.run_header(settings, lm.device, lm.name)
        for d in deps:
            # trial t holds the needles a separate run with --seed seed + t would use;
            # dense answers once per cell and trial, each rule beside it
            for t in range(seed, seed + trials):
                trial = f", seed {t}" if trials > 1 else ""
                for r, cell in zip(rules, ev.niah_cells(lm, texts[n % len(texts)], S, d, settings, rules, seed=t * 100_003 + n)):
                    cells[r].append(replace(cell, seed=t))
                    notify(
                        f"{S} tokens, depth {d:.0%}{trial}, {r}: dense {'ok' if cell.dense_correct else 'miss'}, "
                        f"sparse {'ok' if cell.sparse_correct else 'miss'}, {'same' if cell.agree else 'DIFFERENT'} answer"
                    )
            n += 1
    runs = [{"rule": r, "summary": ev.niah_summary(cells[r]), "cells": [asdict(c) for c in cells[r]]} for r in rules]
    if out is not None:
        for r, run in zip(rules, runs):
            png = out.with_name(f"{out.stem}_{r}.png")
            ev.niah_heatmap(cells[r], png, f"needle in a haystack, rule {r}, alpha {settings.alpha}")
            run["png"] = png.name
    data = ev.rounded({**header, "books": [b.name for b in books], "runs": runs})
    if out is not None:
        ev.write_json(out, data)
    if as_json:
        render.print_json(data)
        return
    table = Table(title="needle in a haystack: sparse vs dense greedy answers")
    for col in ("rule", "cells", "answers equal", "same retrieval", "dense correct", "sparse correct", "density"):
        table.add_column(col, justify="right")
    for run in runs:
        s = run["summary"]
        table.add_row(
            run["rule"], str(s["cells"]), _pct(s["agreement"]), _pct(s["retrieval_agreement"]),
            _pct(s["dense_accuracy"]), _pct(s["sparse_accuracy"]), _pct(s["density_mean"]),
        )
    _stdout_table(table)
