"""`sacli eval`: how close SampleAttention stays to dense attention, at three levels.

- fidelity: per layer and head, on one text: kept density, the per-row oracle density at the same
  alpha, kept attention mass per query row, and the relative error of the attention output;
- ppl: perplexity of a text's last tokens after a long prefix, dense vs sparse prefill, with the
  KL divergence and top-1 agreement of the next-token distributions;
- niah: a needle-in-a-haystack grid (lengths x depths), greedy answers dense vs sparse.

Functions here compute and return plain results (and write JSON/PNG when asked); nothing prints.
Progress goes to a callback. Models are loaded through sacli.models (YaRN when settings say so).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from sacli.config import Settings
from sacli.errors import InputError, UsageError
from sacli.eval_metrics import DEFAULT_ROW_CHUNK, HeadSelection, head_fidelity, next_token_comparison

Notify = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


# ----------------------------------------------------------------------------- shared helpers


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@contextmanager
def deterministic() -> Iterator[None]:
    """Within the block torch uses deterministic algorithms (warning, not failing, on an op that
    has none) and cuBLAS a fixed workspace. Without it dense attention's own greedy answers
    changed between repeats of one needle cell on an H100 (benchmarks/eval/niah_dense_repeat.py),
    so a comparison with dense measured kernel noise as well as the selection."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _is_sacli(argv0: str) -> bool:
    path = Path(argv0)
    return path.name == "sacli" or (path.name == "__main__.py" and path.parent.name == "sacli")


def run_header(settings: Settings, device: torch.device, model_name: str) -> dict[str, Any]:
    """Provenance every JSON result carries: command, date, device, model and knobs."""
    return {
        # `python -m sacli ...` is the same command as `sacli ...`
        "command": " ".join(["sacli"] + sys.argv[1:]) if _is_sacli(sys.argv[0]) else " ".join(sys.argv),
        # settings taken from the environment change what runs: record them with the command
        "sacli_environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SACLI_") and k != "SACLI_HOME"},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_description(device),
        "torch": torch.__version__,
        "model": model_name,
        "alpha": settings.alpha,
        "window": settings.window,
        "sample_ratio": settings.sample_ratio,
        "sampled_levels": settings.sampled_levels,
        "chunk": settings.chunk,
        "dense_below": settings.dense_below,
        "rope_scale": settings.rope_scale,
        "dtype": settings.dtype,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None


def text_tokens(tokenizer: Any, text: str, n_tokens: int, *, source: str) -> torch.Tensor:
    """(1, n_tokens) int64: the first n_tokens tokens of `text` (an error if it has fewer)."""
    from sacli.models.prompt import encode

    chars = n_tokens * 6
    while True:
        ids = encode(tokenizer, text[:chars], literal=True)
        if len(ids) > n_tokens or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n_tokens:
        raise InputError(f"{source} has {len(ids)} tokens; {n_tokens} are needed")
    return torch.tensor(ids[:n_tokens], dtype=torch.long)[None]


class ModelCache:
    """Loads the model once per context need: natively up to its trained length, and (with
    settings.rope_scale == "yarn") once per longer length, so YaRN's factor fits each length."""

    def __init__(self, settings: Settings, notify: Notify = _quiet) -> None:
        from sacli.models.loading import context_limit
        from sacli.models.registry import resolve_model

        self.settings = settings
        self.path = resolve_model(settings.model, auto_pull=True, notify=notify)
        self.native = context_limit(self.path)
        self._key: int | None = -1
        self._lm: Any = None
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The tokenizer alone (cheap), for checking inputs before any weights load."""
        if self._tokenizer is None:
            from sacli.models.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.path)
        return self._tokenizer

    def get(self, needed_tokens: int) -> Any:
        from sacli.models.loading import load_model, release_memory

        key = None if needed_tokens <= self.native else needed_tokens
        if self._lm is None or key != self._key:
            if self._lm is not None:
                self._lm = None
                release_memory()
            self._lm = load_model(self.path, self.settings, needed_tokens, tokenizer=self._tokenizer)
            self._key = key
        return self._lm


def parse_lengths(text: str) -> list[int]:
    """"4096,8K,16k" -> [4096, 8192, 16384]."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        try:
            value = int(float(part.rstrip("k")) * mult)
        except ValueError:
            raise UsageError(f"cannot read length {part!r}; use numbers like 4096 or 8K") from None
        if value < 2:
            raise UsageError(f"length must be at least 2 tokens, got {part!r}")
        out.append(value)
    if not out:
        raise UsageError("no lengths given")
    return out


def parse_floats(text: str, name: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"cannot read {name} {text!r}; use comma-separated numbers") from None


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- fidelity


@dataclass
class HeadRecord:
    layer: int
    head: int
    window: int  # tokens; >= seq_len means the head ran dense
    ncols: int
    density: float
    oracle_density: float | None
    mass_min: float
    mass_p01: float
    mass_mean: float
    err: float


@dataclass
class FidelityResult:
    rule: str
    seq_len: int
    alpha: float
    heads: list[HeadRecord] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        h = self.heads
        if not h:
            return {}
        worst = max(h, key=lambda r: r.err)
        oracle = [r.oracle_density for r in h if r.oracle_density is not None]
        return {
            "density_mean": sum(r.density for r in h) / len(h),
            "oracle_density_mean": sum(oracle) / len(oracle) if oracle else None,
            "mass_mean": sum(r.mass_mean for r in h) / len(h),
            "mass_p01_mean": sum(r.mass_p01 for r in h) / len(h),
            "mass_min": min(r.mass_min for r in h),
            "err_mean": sum(r.err for r in h) / len(h),
            "err_max": worst.err,
            "worst_head": f"L{worst.layer}.H{worst.head}",
            "heads_over_15pct_err": sum(r.err > 0.15 for r in h),
            "dense_heads": sum(r.window >= self.seq_len for r in h),
            "heads": len(h),
        }

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "seq_len": self.seq_len, "summary": self.summary(), "heads": [asdict(r) for r in self.heads]}


class _Enough(Exception):
    """Raised inside the forward pass once every requested layer has been measured."""


def measure_fidelity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    selectors: Mapping[str, Callable[..., Any]],
    alpha: float,
    *,
    layers: Sequence[int] | None = None,
    oracle: bool = True,
    row_chunk: int = DEFAULT_ROW_CHUNK,
    on_layer: Callable[[int, int], None] | None = None,
) -> dict[str, FidelityResult]:
    """Per layer and head fidelity of each selector's Selection on one prefill of input_ids (1, S).

    selectors: name -> (q, k, v, scale) -> Selection (see sacli.eval_rules.selector).
    alpha: the mass share of the per-row oracle density reported beside them.
    The forward pass is dense; each layer's (q, k, v) is taken as it passes, every selector runs
    on it, and all selections plus the oracle are measured in one pass over each head's dense
    probabilities (float32, one head at a time, `row_chunk` rows at once).
    """
    from sacli.eval_capture import capture_attention

    S = int(input_ids.shape[1])
    results = {name: FidelityResult(rule=name, seq_len=S, alpha=alpha) for name in selectors}
    n_layers = int(getattr(model.config, "num_hidden_layers", 0)) or None
    wanted = set(layers) if layers is not None else None
    last = max(wanted) if wanted else None
    done = 0

    def on_capture(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
        nonlocal done
        if wanted is not None and layer not in wanted:
            return
        Hq, Hkv = q.shape[1], k.shape[1]
        sels = {name: fn(q, k, v, scale) for name, fn in selectors.items()}
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            heads = [
                HeadSelection(int(sel.window[0, h]), sel.cols[0, h].to(torch.int64), sel.segment)
                if sel.segment
                else HeadSelection(int(sel.window[0, h]), sel.cols[0, h, : int(sel.ncols[0, h])].to(torch.int64))
                for sel in sels.values()
            ]
            # columns per list: per head, or the mean over the head's segments
            ncols = [round(float(sel.ncols[0, h].float().mean())) for sel in sels.values()]
            fids, orc = head_fidelity(
                q[0, h],
                k[0, kv],
                v[0, kv],
                heads,
                scale=scale,
                oracle_alphas=(alpha,) if oracle else (),
                row_chunk=row_chunk,
            )
            for (name, _), hs, f, nc in zip(sels.items(), heads, fids, ncols):
                results[name].heads.append(
                    HeadRecord(
                        layer=layer,
                        head=h,
                        window=hs.window,
                        ncols=nc,
                        density=f.density,
                        oracle_density=orc.get(alpha),
                        mass_min=f.mass_min,
                        mass_p01=f.mass_p01,
                        mass_mean=f.mass_mean,
                        err=f.err,
                    )
                )
        done += 1
        if on_layer is not None:
            on_layer(done, len(wanted) if wanted is not None else (n_layers or done))
        if last is not None and layer >= last:
            raise _Enough

    device = next(model.parameters()).device
    with torch.inference_mode(), capture_attention(model, on_capture):
        try:
            model(input_ids=input_ids.to(device), use_cache=False, logits_to_keep=1)
        except _Enough:
            pass
    return results


def fidelity_heatmap(result: FidelityResult, path: Path, title: str) -> None:
    """PNG: layers x heads heatmaps of output error and kept density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r.layer for r in result.heads})
    heads = sorted({r.head for r in result.heads})
    li = {l: i for i, l in enumerate(layers)}
    err = torch.full((len(layers), len(heads)), float("nan"))
    dens = torch.full((len(layers), len(heads)), float("nan"))
    for r in result.heads:
        err[li[r.layer], r.head] = r.err * 100
        dens[li[r.layer], r.head] = r.density * 100
    fig, axes = plt.subplots(1, 2, figsize=(2.4 + 0.55 * len(heads) * 2, 1.6 + 0.22 * len(layers)))
    for ax, data, label, cmap in ((axes[0], err, "output error %", "magma_r"), (axes[1], dens, "kept density %", "viridis")):
        im = ax.imshow(data.numpy(), aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(len(heads)), [str(h) for h in heads])
        step = max(1, len(layers) // 15)
        ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
        ax.set_title(label)
        fig.colorbar(im, ax=ax)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- perplexity


@dataclass
class PplResult:
    rule: str
    seq_len: int
    positions: int
    ppl_dense: float
    ppl_sparse: float
    ppl_ratio: float
    kl_mean: float
    top1_agreement: float
    density_mean: float
    routed: str


@torch.inference_mode()
def _last_logits(model: torch.nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False, logits_to_keep=n + 1)
    # the final position predicts a token past the text
    return out.logits[0, :-1].float()


def measure_ppl(
    lm: Any, input_ids: torch.Tensor, settings: Settings, rule: str, last: int, select: Callable[..., Any] | None = None
) -> PplResult:
    """Perplexity of the last `last` tokens of input_ids (1, S), dense vs the rule's sparse prefill.

    rule "product" runs sacli's own attention path with `settings`; any other name runs
    `select` (default: the named rule with settings' knobs) through `rule_attention`.
    """
    from sacli.eval_rules import rule_attention, selector
    from sacli.models.attention import sparse_context

    S = int(input_ids.shape[1])
    if not 0 < last < S:
        raise UsageError(f"--last must be between 1 and the length - 1 ({S - 1}), got {last}")
    ids = input_ids.to(lm.device)
    targets = input_ids[0, S - last :].to(lm.device)
    with sparse_context(replace(settings, dense=True)):
        dense = _last_logits(lm.model, ids, last)
    if rule == "product":
        with sparse_context(replace(settings, dense=False)) as collector:
            sparse = _last_logits(lm.model, ids, last)
        density, routed = 1.0 - collector.sparsity(), collector.routes()
    else:
        fn = select or selector(rule, settings)
        with rule_attention(lm.model, fn, settings.dense_below) as densities:
            sparse = _last_logits(lm.model, ids, last)
        density = float(torch.stack([d.mean() for d in densities]).mean()) if densities else 1.0
        routed = "sparse" if densities else "dense_short"
    cmp = next_token_comparison(dense, sparse, targets)
    return PplResult(
        rule=rule,
        seq_len=S,
        positions=cmp.positions,
        ppl_dense=cmp.ppl_dense,
        ppl_sparse=cmp.ppl_sparse,
        ppl_ratio=cmp.ppl_sparse / cmp.ppl_dense,
        kl_mean=cmp.kl_mean,
        top1_agreement=cmp.top1_agreement,
        density_mean=density,
        routed=routed,
    )


# ----------------------------------------------------------------------------- needle in a haystack


@dataclass
class NiahCell:
    length: int  # requested prompt tokens
    prompt_tokens: int
    depth: float
    number: str
    dense_answer: str
    sparse_answer: str
    dense_correct: bool
    sparse_correct: bool
    agree: bool
    density: float
    seed: int = 0  # the needle set (`sacli eval niah --seed`) this cell's number comes from


def niah_summary(cells: Sequence[NiahCell]) -> dict[str, Any]:
    n = len(cells)
    if not n:
        return {}
    return {
        "cells": n,
        "trials": len({c.seed for c in cells}),
        "agreement": sum(c.agree for c in cells) / n,
        # both find the needle or both miss it: answers that differ only in wording, or in
        # which wrong number they give, count here
        "retrieval_agreement": sum(c.dense_correct == c.sparse_correct for c in cells) / n,
        "dense_accuracy": sum(c.dense_correct for c in cells) / n,
        "sparse_accuracy": sum(c.sparse_correct for c in cells) / n,
        "density_mean": sum(c.density for c in cells) / n,
    }


def _answer(lm: Any, ids: torch.Tensor, settings: Settings, rule: str, dense: bool) -> tuple[str, float]:
    from sacli.eval_rules import rule_attention, selector
    from sacli.models.generate import generate

    if dense or rule == "product":
        res = generate(lm, ids, replace(settings, dense=dense))
        return res.text.strip(), 1.0 - res.sparsity
    with rule_attention(lm.model, selector(rule, settings), settings.dense_below) as densities:
        res = generate(lm, ids, replace(settings, dense=True))
    density = float(torch.stack([d.mean() for d in densities]).mean()) if densities else 1.0
    return res.text.strip(), density


def niah_prompt(tok: Any, book: str, length: int, depth: float, settings: Settings, seed: int) -> Any:
    """A grid cell's Prompt: about `length` tokens of the book with needle `seed` at `depth`."""
    from sacli.eval_niah import QUESTION, TextDocument, haystack_text, insert_needle, make_needle
    from sacli.models.prompt import build_prompt, encode

    needle = make_needle(seed)
    empty = build_prompt(tok, [TextDocument("haystack.txt", needle.sentence)], QUESTION, system=settings.system)
    text = haystack_text(tok, book, length - empty.length, lambda t, s: encode(t, s, literal=True))
    text, _ = insert_needle(text, needle, depth)
    return build_prompt(tok, [TextDocument("haystack.txt", text)], QUESTION, system=settings.system)


def niah_cells(lm: Any, book: str, length: int, depth: float, settings: Settings, rules: Sequence[str],
               seed: int) -> list[NiahCell]:
    """One grid cell, a prompt of about `length` tokens with the needle at `depth`: dense's answer
    once, then one NiahCell per rule."""
    from sacli.eval_niah import answer_correct, make_needle

    needle = make_needle(seed)
    prompt = niah_prompt(lm.tokenizer, book, length, depth, settings, seed)
    dense_answer, _ = _answer(lm, prompt.ids, settings, "product", dense=True)
    dense_correct = answer_correct(dense_answer, needle)
    cells = []
    for rule in rules:
        sparse_answer, density = _answer(lm, prompt.ids, settings, rule, dense=False)
        cells.append(NiahCell(
            length=length,
            prompt_tokens=prompt.length,
            depth=depth,
            number=needle.number,
            dense_answer=dense_answer,
            sparse_answer=sparse_answer,
            dense_correct=dense_correct,
            sparse_correct=answer_correct(sparse_answer, needle),
            agree=dense_answer == sparse_answer,
            density=density,
        ))
    return cells


def niah_grids(cells: Sequence[NiahCell]) -> tuple[list[int], list[float], dict[str, torch.Tensor]]:
    """Lengths, depths and (depths x lengths) grids of dense retrieval, sparse retrieval and
    agreement, each the share of a cell's trials; NaN where the grid has no cell."""
    lengths = sorted({c.length for c in cells})
    depths = sorted({c.depth for c in cells})
    sums = {k: torch.zeros(len(depths), len(lengths)) for k in ("dense", "sparse", "agree")}
    count = torch.zeros(len(depths), len(lengths))
    for c in cells:
        i, j = depths.index(c.depth), lengths.index(c.length)
        sums["dense"][i, j] += float(c.dense_correct)
        sums["sparse"][i, j] += float(c.sparse_correct)
        sums["agree"][i, j] += float(c.agree)
        count[i, j] += 1
    return lengths, depths, {k: torch.where(count > 0, v / count.clamp(min=1), float("nan")) for k, v in sums.items()}


def niah_heatmap(cells: Sequence[NiahCell], path: Path, title: str) -> None:
    """PNG: lengths x depths grids of dense retrieval, sparse retrieval and agreement (the share
    of a cell's trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths, depths, grids = niah_grids(cells)
    fig, axes = plt.subplots(1, 3, figsize=(3 + 1.1 * len(lengths) * 3, 1.5 + 0.4 * len(depths)))
    names = {"dense": "dense answer correct", "sparse": "sparse answer correct", "agree": "sparse == dense"}
    for ax, (key, grid) in zip(axes, grids.items()):
        ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(lengths)), [f"{l // 1024}K" if l % 1024 == 0 else str(l) for l in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
        ax.set_title(names[key], fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rounded(value: Any, digits: int = 5) -> Any:
    """Floats rounded for JSON readability (recursively)."""
    if isinstance(value, float):
        return round(value, digits) if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value
