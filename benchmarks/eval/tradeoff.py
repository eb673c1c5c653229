"""Density vs error trade-off of the selection rules on the real model: one command, JSON + PNG.

Every rule variant (the paper's literal rule, the single-window residual rule, and the adaptive
rule of sacli.kernels.rules at several alphas and with parts switched off) selects on the same
captured prefill, layer by layer, and all are measured in one pass over each head's dense
attention (sacli.evaluate.measure_fidelity). With --e2e each variant also runs the whole prefill
and is compared with dense on the last tokens' next-token distributions (sacli.evaluate.measure_ppl).

    python benchmarks/eval/tradeoff.py --text ../shared/books/moby_dick_2701.txt --lengths 8K \\
        --device cpu --out benchmarks/eval/tradeoff_8k_cpu.json

GPU: add --device cuda --lengths 16K,32K,64K --rope-scale yarn. Memory stays O(rows x S) per head.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from sacli import evaluate as ev
from sacli.config import load_settings
from sacli.kernels.rules import DEFAULT_RULE, select_adaptive


def variants(alphas: list[float], window: float, sample_ratio: float) -> dict[str, tuple[str, dict[str, Any]]]:
    """name -> (family, parameters). Families: the paper's literal rule, the single-window residual
    rule, the adaptive rule over alphas, and the adaptive rule with one part switched off."""
    out: dict[str, tuple[str, dict[str, Any]]] = {
        "literal a0.95 w0.08": ("literal", {"alpha": 0.95, "window": 0.08}),
        "residual a0.95 w0.08": ("residual", {"alpha": 0.95, "window": 0.08}),
        "residual a0.95 w0.05": ("residual", {"alpha": 0.95, "window": 0.05}),
    }
    for a in alphas:
        out[f"adaptive a{a}"] = ("adaptive", {"alpha": a, "window": window, "sample_ratio": sample_ratio, "rule": {}})
    ablations = {
        "no value weighting": {"value_weighted": False},
        "no held-out check": {"error_ratio": None},
        "one window": {"window_up": 0, "window_levels": 1},
        "64-row blocks": {"block": 64},
    }
    for name, change in ablations.items():
        out[f"adaptive a0.95, {name}"] = (
            f"adaptive, {name}", {"alpha": 0.95, "window": window, "sample_ratio": sample_ratio, "rule": change}
        )
    return out


def make_selector(family: str, p: dict[str, Any]) -> Callable[..., Any]:
    from sacli.eval_rules import selector

    if family in ("literal", "residual"):
        s = load_settings({"alpha": p["alpha"], "window": p["window"]}, environ={})
        return selector(family, s)
    config = dataclasses.replace(DEFAULT_RULE, **p["rule"])

    def select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Any:
        return select_adaptive(
            q, k, v, alpha=p["alpha"], window=p["window"], sample_ratio=p["sample_ratio"], scale=scale, config=config
        )

    return select


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("err_mean", "mean output error"), ("err_max", "worst head error")]
    if any("kl_mean" in r for r in runs):
        keys.append(("kl_mean", "next-token KL (nats)"))
    lengths = sorted({r["length"] for r in runs})
    fig, axes = plt.subplots(len(lengths), len(keys), figsize=(5 * len(keys), 4 * len(lengths)), squeeze=False)
    for li, S in enumerate(lengths):
        for ki, (key, label) in enumerate(keys):
            ax = axes[li][ki]
            fams: dict[str, list[dict[str, Any]]] = {}
            for r in runs:
                if r["length"] == S and r.get(key) is not None:
                    fams.setdefault(r["family"], []).append(r)
            for fam, rs in fams.items():
                rs.sort(key=lambda r: r["density_mean"])
                ax.plot([r["density_mean"] * 100 for r in rs], [r[key] * (100 if key != "kl_mean" else 1) for r in rs],
                        marker="o", label=fam)
                for r in rs:
                    ax.annotate(str(r["alpha"]), (r["density_mean"] * 100, r[key] * (100 if key != "kl_mean" else 1)),
                                fontsize=6)
            ax.set_xlabel("mean kept density %")
            ax.set_ylabel(label + ("" if key == "kl_mean" else " %"))
            ax.set_yscale("log")
            ax.set_title(f"{S} tokens", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--lengths", default="8K")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--rope-scale", default="yarn")
    ap.add_argument("--layers", default=None, help="e.g. 0-29 (default all)")
    ap.add_argument("--alphas", default="0.9,0.93,0.95,0.97")
    ap.add_argument("--window", type=float, default=0.05, help="the window knob (adaptive: per-head choice around it)")
    ap.add_argument("--sample-ratio", type=float, default=0.05)
    ap.add_argument("--only", default=None, help="comma-separated families to run (default all)")
    ap.add_argument("--extra", default=None,
                    help='JSON: more adaptive variants, {"name": {"alpha": A, "rule": {RuleConfig field: value}}}')
    ap.add_argument("--e2e", action="store_true", help="also perplexity / KL / top-1 of the last --last tokens")
    ap.add_argument("--last", type=int, default=1024)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    settings = load_settings({"device": args.device, "dtype": args.dtype, "rope_scale": args.rope_scale}, environ={})
    lengths = ev.parse_lengths(args.lengths)
    alphas = ev.parse_floats(args.alphas, "--alphas")
    layers = None
    if args.layers:
        a, _, b = args.layers.partition("-")
        layers = list(range(int(a), int(b or a) + 1))
    chosen = variants(alphas, args.window, args.sample_ratio)
    if args.only:
        fams = set(args.only.split(","))
        chosen = {n: v for n, v in chosen.items() if v[0].split(",")[0] in fams}
    for name, spec in json.loads(args.extra or "{}").items():
        assert name not in chosen, f"--extra variant {name!r} clashes with a built-in variant"
        chosen[name] = ("adaptive, " + name, {"alpha": float(spec["alpha"]), "window": args.window,
                                              "sample_ratio": float(spec.get("sample_ratio", args.sample_ratio)),
                                              "rule": dict(spec.get("rule", {}))})
    selectors = {name: make_selector(fam, p) for name, (fam, p) in chosen.items()}
    body = ev.read_text(args.text)
    cache = ev.ModelCache(settings, lambda m: print(m, file=sys.stderr))
    runs: list[dict[str, Any]] = []
    header: dict[str, Any] = {}
    for S in lengths:
        ids = ev.text_tokens(cache.tokenizer, body, S, source=str(args.text))
        lm = cache.get(S)
        header = ev.run_header(settings, lm.device, lm.name)
        t0 = time.perf_counter()
        results = ev.measure_fidelity(
            lm.model, ids, selectors, 0.95, layers=layers,
            on_layer=lambda d, n: print(f"{S}: layer {d}/{n} {time.perf_counter() - t0:.0f}s", file=sys.stderr),
        )
        for name, res in results.items():
            fam, p = chosen[name]
            row = {"length": S, "name": name, "family": fam, "alpha": p["alpha"], "window": p["window"],
                   "rule_config": p.get("rule"), **res.summary()}
            if args.e2e:
                r = ev.measure_ppl(lm, ids, settings, name, args.last, select=selectors[name])
                row.update(kl_mean=r.kl_mean, top1_agreement=r.top1_agreement, ppl_dense=r.ppl_dense,
                           ppl_sparse=r.ppl_sparse, ppl_ratio=r.ppl_ratio, e2e_density=r.density_mean)
            runs.append(row)
            print(json.dumps(ev.rounded(row, 4)), file=sys.stderr)
        ev.write_json(args.out, ev.rounded({**header, "text": args.text.name, "default_rule": dataclasses.asdict(DEFAULT_RULE),
                                            "runs": runs}))
    png = args.out.with_suffix(".png")
    plot(runs, png, f"{header.get('model')} on {args.text.name}, {header.get('device')}")
    print(f"wrote {args.out} and {png}", file=sys.stderr)


if __name__ == "__main__":
    main()
