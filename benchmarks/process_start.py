"""TTFT of `sacli ask` in new processes: what compilation and autotuning add to each one.

    python benchmarks/process_start.py OUT.json [--tokens 3600,32000] [--runs first,kept,...] [--commit C]

For each prompt length (the head of a book, cut to about that many tokens), starting from an
empty Triton kernel cache and no autotuning file, runs these `sacli ask --json` processes one
after the other and records their TTFT and wall time:

  first       compiles the kernels and autotunes them (a fresh machine's first ask)
  kept        a second process: compiled kernels from Triton's disk cache, autotuning choices
              from $SACLI_HOME/autotune.json
  untuned     a process with SACLI_AUTOTUNE_FILE=none: compiled kernels, autotunes again
              (what every later process paid before the choices were kept)
  kept_again  `kept` repeated (run-to-run spread)
  no_warmup   as `kept`, with SACLI_KERNEL_WARMUP=0: the kernels are readied inside the prefill
              instead of while the weights load (models/warmup.py)
  dense       `--dense` (dense prefill) for reference
  kept_3, no_warmup_2, dense_2   the last three again

Every process runs with warm-up unless its row says otherwise; `first` and `untuned` overlap
their compiling / autotuning with the weights' loading.

Sparse prefill is forced (--dense-below 0) so that the short prompt runs the kernels too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

QUESTION = "Who is the narrator?"
RUNS = (
    ("first", {}, []),
    ("kept", {}, []),
    ("untuned", {"SACLI_AUTOTUNE_FILE": "none"}, []),
    ("kept_again", {}, []),
    ("no_warmup", {"SACLI_KERNEL_WARMUP": "0"}, []),
    ("dense", {}, ["--dense"]),
    ("kept_3", {}, []),
    ("no_warmup_2", {"SACLI_KERNEL_WARMUP": "0"}, []),
    ("dense_2", {}, ["--dense"]),
)


def head_of_book(book: Path, tokens: int, dest: Path) -> int:
    """Write the first ~`tokens` tokens of `book` to `dest`; returns the token count."""
    from sacli.config import Settings
    from sacli.evaluate import read_text, text_tokens
    from sacli.models.loading import load_tokenizer
    from sacli.models.registry import resolve_model

    tok = load_tokenizer(resolve_model(Settings().model, notify=print))
    ids = text_tokens(tok, read_text(book), tokens, source=str(book))[0].tolist()
    dest.write_text(tok.decode(ids), encoding="utf-8")
    return len(ids)


def ask(source: Path, env: dict[str, str], extra: list[str], tokens: int) -> dict:
    args = [sys.executable, "-m", "sacli", "ask", "--json", "-n", "8", "--dense-below", "0", *extra]
    if tokens > 8192:
        args += ["--rope-scale", "yarn"]
    start = time.perf_counter()
    proc = subprocess.run([*args, str(source), QUESTION], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:], "returncode": proc.returncode, "wall_s": wall}
    out = json.loads(proc.stdout)
    return {
        "ttft_ms": out["ttft_ms"], "warmup_wait_ms": out["warmup_wait_ms"], "wall_s": wall, "prompt_tokens": out["prompt_tokens"],
        "attention": out["attention"], "sparsity": out["sparsity"], "answer": out["answer"],
        "layer_ms": [round(x["ms"], 2) for x in out["layers"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--book", type=Path, default=Path(".dev/bench_data/moby_dick_2701.txt"))
    parser.add_argument("--tokens", default="3600,32000")
    parser.add_argument("--commit", default="")
    parser.add_argument("--runs", default=",".join(r[0] for r in RUNS), help="which of the runs, in their order")
    a = parser.parse_args()
    chosen = set(a.runs.split(","))
    unknown = chosen - {r[0] for r in RUNS}
    if unknown:
        parser.error(f"unknown runs: {sorted(unknown)}")
    runs = [r for r in RUNS if r[0] in chosen]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in a.tokens.split(",")):
            source = Path(tmp) / f"head_{n}.txt"
            head_of_book(a.book, n, source)
            base = {**os.environ, "TRITON_CACHE_DIR": str(Path(tmp) / f"triton_{n}"),
                    "SACLI_AUTOTUNE_FILE": str(Path(tmp) / f"autotune_{n}.json")}
            for name, env, extra in runs:
                row = {"tokens_requested": n, "run": name, **ask(source, {**base, **env}, extra, n)}
                print(json.dumps(row), flush=True)
                results.append(row)
    header = {
        "benchmark": "TTFT of sacli ask in new processes (compilation and autotuning included)",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "commit": a.commit,
        "runs": {name: {"env": env, "options": extra} for name, env, extra in runs},
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({**header, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
