"""End-to-end counterpart of segment_error_target.py: perplexity of the last 1024 tokens, KL and
top-1 agreement vs dense, for segments configs named a<alpha>_e<max_error>_l<levels>[_s<sample_ratio>][_b<boost_rows>][_k<sampled_levels>][_exact][_h<halo>],
at one or more lengths (comma-separated), YaRN past the trained 8K. (_b<boost_rows> needs
benchmarks/experiments/v12_segments_boost_rows.patch.)

    SACLI_HOME=... python benchmarks/eval/segment_error_target_ppl.py 8192 a0.95_e0.08_l5 a0.9_e0.06_l7 ...
    DEVICE=cuda OUT=results.json python benchmarks/eval/segment_error_target_ppl.py 8192,16384 CONFIG...

On the CPU the model runs in fp32, on CUDA in bf16 (dtype "auto"). With OUT, the results and
the run's device, versions, date and command go there as JSON.
"""

import os
import re
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from sacli.kernels.rules import SegmentConfig, select_segments

import sacli.evaluate as ev
from sacli.config import load_settings

torch.set_grad_enabled(False)
lengths = [int(x) for x in sys.argv[1].split(",")]
device = os.environ.get("DEVICE", "cpu")
settings = load_settings({"device": device, "dtype": "auto", "rope_scale": "yarn", "dense_below": 0}, environ={})
cache = ev.ModelCache(settings, lambda m: print(m, file=sys.stderr))
text = Path(os.environ.get("TEXT", "../shared/books/moby_dick_2701.txt"))
runs = []
for S, name in [(S, name) for S in lengths for name in sys.argv[2:]]:
    ids = ev.text_tokens(cache.tokenizer, ev.read_text(text), S, source=str(text))
    lm = cache.get(S)
    m = re.fullmatch(r"a([0-9.]+)_e([0-9.]+)_l([0-9]+)(?:_s([0-9.]+))?(?:_b([0-9]+))?(?:_k([0-9]+))?(_exact)?(?:_h([0-9.]+))?", name)
    assert m, f"config name a<alpha>_e<max_error>_l<levels>[_s<sample_ratio>][_b<boost_rows>][_k<sampled_levels>][_exact][_h<halo>] expected, got {name}"
    alpha, err, levels = float(m[1]), float(m[2]), int(m[3])
    sr = float(m[4]) if m[4] else 0.05
    cfg = SegmentConfig(max_error=err, alpha_levels=levels, exact_fallback=bool(m[7]), **({"halo": float(m[8])} if m[8] else {}),
                        sampled_levels=int(m[6]) if m[6] else None, **({"boost_rows": int(m[5])} if m[5] else {}))
    sel = lambda q, k, v, scale, a=alpha, c=cfg, r=sr: select_segments(q, k, v, alpha=a, window=0.05, sample_ratio=r, scale=scale, config=c)
    res = ev.measure_ppl(lm, ids, replace(settings, alpha=alpha), "segments", 1024, select=sel)
    row = {k: ev.rounded(v) for k, v in vars(res).items() if k != "rule"}
    runs.append({"config": name, **row})
    print(name, row, flush=True)
    if os.environ.get("OUT"):  # after every run, so a run cut short keeps what it measured
        dev = torch.device("cuda" if device == "cuda" else "cpu")
        ev.write_json(Path(os.environ["OUT"]), {"command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "device": ev.device_description(dev), "torch": torch.__version__, "text": text.name, "runs": runs})
