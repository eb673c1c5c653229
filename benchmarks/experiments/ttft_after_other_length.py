"""Does a sparse prefill at one length slow later prefills at another, in the same process?

    python3 benchmarks/experiments/ttft_after_other_length.py OUT.json [--text BOOK]

On one H100 (2026-11-25, docs/BENCHMARKS.md "Time to first token") forced-sparse 16K prefills
of the default model ran at 0.89-0.98x of dense in processes that had run a sparse 8K prefill
first, 1.17x otherwise. This runs, in one process, the model loaded as `bench ttft` loads it
(YaRN stretched to the length, reloaded per length), sparse prefill forced:
  16K x 9  ->  8K x 4 (another model object)  ->  16K x 9 (reloaded)   (--long, --short, --repeats)
(--collect: collecting each dropped model before the next loads) and records per run: TTFT, the CPU time the process spent in it, the sum of the layers' GPU
times (CUDA events) and whether the sparse pipeline replayed a CUDA graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--text", type=Path, default=Path(".dev/bench_data/moby_dick_2701.txt"))
    parser.add_argument("--long", type=int, default=16384)
    parser.add_argument("--short", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--collect", action="store_true",
                        help="gc.collect() and torch.cuda.empty_cache() after each model is dropped")
    a = parser.parse_args()

    from sacli.bench import _load_default_model, _text_ids
    from sacli.kernels import graphs
    from sacli.models.generate import generate

    rows = []
    for phase, S, n in (("long", a.long, a.repeats), ("short", a.short, max(1, a.repeats // 2)),
                        ("long after short", a.long, a.repeats)):
        lm, settings = _load_default_model(S, None)
        ids = _text_ids(lm, a.text, S)
        s = dataclasses.replace(settings, dense_below=0, max_new_tokens=1)
        generate(lm, ids[:, :S], s)  # warm-up, as bench ttft does
        for mode in ("dense", "sparse") * n:
            run = dataclasses.replace(s, dense=mode == "dense")
            cpu0 = time.process_time()
            res = generate(lm, ids[:, :S], run)
            cpu = (time.process_time() - cpu0) * 1e3
            rows.append({"phase": phase, "seq_len": S, "mode": mode, "ttft_ms": round(res.ttft_ms, 2),
                         "cpu_ms": round(cpu, 2), "layers_gpu_ms": round(sum(x.ms for x in res.layers), 2),
                         "graphs": graphs.status()})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "graphs"}), file=sys.stderr, flush=True)
        del lm
        if a.collect:
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    a.out.write_text(json.dumps({
        "experiment": "TTFT of a sparse 16K prefill before and after a sparse 8K one, one process",
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
