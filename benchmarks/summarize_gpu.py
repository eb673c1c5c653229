"""Batch summarization, dense vs SampleAttention prefill: a job of N documents of T tokens each.

Writes one JSON file (device, date, command, settings, per-mode results) and prints it last on
stdout; a human table goes to stderr. Run on the GPU machine, e.g.

    SACLI_HOME=/path/to/home python benchmarks/summarize_gpu.py --out benchmarks/summarize_gpu.json

Method. The documents are cut from Python's own standard-library sources (real text, the same on
every machine with the same Python) to T tokens of the model's tokenizer. For each mode a Session
is created and warmed up on a slightly longer document and on the first job document, so model
loading, kernel compilation and (with YaRN) the context size are settled before the clock starts;
the measured job is then `sacli.summarize.run_job` over all N documents with that Session, exactly
what `sacli summarize` runs. TTFT comes from each record (synchronised prefill + first token);
documents/min and tokens/s from the job's wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

WARMUP_EXTRA_TOKENS = 64


_said: set[str] = set()


def _notify(message: str) -> None:
    # the same note comes for every document of a job: show it once
    if message not in _said:
        _said.add(message)
        print(message, file=sys.stderr)


def _source_text(min_chars: int) -> str:
    """Standard-library source files, concatenated in name order, at least `min_chars` long."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= min_chars:
            break
    if total < min_chars:
        raise SystemExit(f"not enough standard-library text under {root} for the documents")
    return "".join(parts)


def make_documents(tokenizer: Any, folder: Path, count: int, tokens: int) -> list[Path]:
    """`count` different documents of `tokens` tokens each (document i starts i windows in)."""
    text = _source_text(min_chars=(count + 2) * tokens * 6)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stride = max(1, (len(ids) - tokens) // max(count, 1))
    if len(ids) < tokens:
        raise SystemExit(f"source text has only {len(ids)} tokens, need {tokens}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        start = min(i * stride, len(ids) - tokens)
        path = folder / f"doc{i:02d}.txt"
        path.write_text(tokenizer.decode(ids[start : start + tokens]), encoding="utf-8")
        paths.append(path)
    return paths


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_mode(mode: str, settings: Any, docs_dir: Path, warmup: Path, out: Path, prompt: str) -> dict[str, Any]:
    import torch

    from sacli.app import Session
    from sacli.inputs import collect_documents
    from sacli.jobs import Shard, iter_lines
    from sacli.summarize import JobOptions, run_job

    session = Session(settings, _notify)
    # The longer document sizes the model (and a YaRN context) for every document of the job; the
    # first job document then runs once more at the job's own length, so compilation and
    # autotuning for that shape happen outside the measurement too.
    first = sorted(docs_dir.iterdir())[0]
    for path in (warmup, first):
        session.answer(collect_documents([str(path)], hidden=False, use_gitignore=False, notify=_notify), prompt)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if out.exists():
        out.unlink()
    report = run_job(
        [str(docs_dir)],
        out,
        settings,
        JobOptions(prompt=prompt),
        shard=Shard(),
        notify=_notify,
        engine_factory=lambda *_: session,
    )
    records = list(iter_lines(out))
    ok = [r for r in records if r["status"] == "ok"]
    ttft = [r["ttft_ms"] for r in ok]
    assert session.lm is not None
    result = {
        "documents": len(records),
        "ok": len(ok),
        "failed": report.failed,
        "job_s": round(report.elapsed_s, 3),
        "docs_per_min": round(report.docs_per_min, 2),
        "tokens_per_s": round(report.tokens_per_s, 1),
        "prompt_tokens_mean": round(statistics.mean(r["tokens"] for r in ok), 1) if ok else None,
        "new_tokens_mean": round(statistics.mean(r["new_tokens"] for r in ok), 1) if ok else None,
        "ttft_ms_median": round(statistics.median(ttft), 2) if ttft else None,
        "ttft_ms_mean": round(statistics.mean(ttft), 2) if ttft else None,
        "sparsity_mean": round(statistics.mean(r["sparsity"] for r in ok), 4) if ok else None,
        "attention": sorted({r["attention"] for r in ok}),
        # one value when no document made the Session reload the model for a longer context
        "context_limits": sorted({r.get("context_limit") for r in ok}),
        "rope_scaled": session.lm.rope_scaled,
        "device": _device_name(session.lm.device),
        "dtype": str(session.lm.dtype).removeprefix("torch."),
        "errors": [r["error"] for r in records if r["status"] != "ok"],
        "_summaries": {r["path"]: r["summary"] for r in ok},
    }
    del session
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model name or directory [default: config]")
    parser.add_argument("--docs", type=int, default=20, help="documents in the job [20]")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per document [16384]")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per summary [128]")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda[:N] [default: config]")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/summarize_gpu.json"))
    parser.add_argument("--workdir", type=Path, default=None, help="where documents and results go [temp dir]")
    args = parser.parse_args()

    import torch
    import transformers

    from sacli.config import load_settings
    from sacli.models.loading import context_limit, load_tokenizer
    from sacli.models.registry import resolve_model
    from sacli.summarize import DEFAULT_PROMPT

    base = load_settings({"model": args.model, "max_new_tokens": args.max_new_tokens, "device": args.device})
    model_path = resolve_model(base.model, auto_pull=True, notify=_notify)
    tokenizer = load_tokenizer(model_path)
    limit = context_limit(model_path)
    # headers, chat template and prompt add a few hundred tokens to each document
    needed = args.tokens + WARMUP_EXTRA_TOKENS + 512 + args.max_new_tokens
    if needed > limit and base.rope_scale == "none":
        base = dataclasses.replace(base, rope_scale="yarn")
        _notify(f"documents exceed the trained context of {limit} tokens: using --rope-scale yarn")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sacli-bench-"))
    docs_dir = workdir / "docs"
    make_documents(tokenizer, docs_dir, args.docs, args.tokens)
    (warmup,) = make_documents(tokenizer, workdir / "warmup", 1, args.tokens + WARMUP_EXTRA_TOKENS)

    modes: dict[str, Any] = {}
    for mode in ("dense", "sparse"):
        settings = dataclasses.replace(base, dense=mode == "dense")
        _notify(f"{mode}: warming up, then summarizing {args.docs} documents of {args.tokens} tokens")
        modes[mode] = run_mode(mode, settings, docs_dir, warmup, workdir / f"{mode}.jsonl", DEFAULT_PROMPT)

    dense, sparse = modes["dense"], modes["sparse"]
    same = sum(
        1 for path, text in dense.pop("_summaries").items() if sparse["_summaries"].get(path) == text
    )
    sparse.pop("_summaries")

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    result = {
        "benchmark": "summarize_gpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("SACLI_", "TRITON_"))},
        "git_commit": _git_commit(),
        "device": sparse["device"],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
        },
        "model": base.model,
        "model_trained_context": limit,
        "documents": args.docs,
        "tokens_per_document": args.tokens,
        "settings": {k: v for k, v in dataclasses.asdict(base).items() if k not in ("hidden", "no_gitignore", "dense")},
        "dense": dense,
        "sparse": sparse,
        "speedup": {
            "ttft_median": ratio(dense["ttft_ms_median"], sparse["ttft_ms_median"]),
            "job_time": ratio(dense["job_s"], sparse["job_s"]),
        },
        "identical_summaries": same,
    }
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")

    _notify(f"\n{'mode':8} {'docs/min':>9} {'tok/s':>9} {'TTFT med ms':>12} {'sparsity':>9} {'job s':>8}")
    for mode, r in modes.items():
        _notify(
            f"{mode:8} {r['docs_per_min']:>9} {r['tokens_per_s']:>9} {r['ttft_ms_median']!s:>12} "
            f"{r['sparsity_mean']!s:>9} {r['job_s']:>8}"
        )
    _notify(f"TTFT speedup {result['speedup']['ttft_median']}x, job {result['speedup']['job_time']}x; "
            f"identical summaries {same}/{args.docs}; written to {args.out}")
    print(text)


if __name__ == "__main__":
    main()
