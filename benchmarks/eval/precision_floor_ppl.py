"""How far next-token distributions move when only the arithmetic changes, never the kept
entries: the default model's dense prefill (SDPA's default backend, bf16 on CUDA) against
(a) each other SDPA backend, (b) sacli's sparse kernel given every entry (window = S, every
layer), (c) the same model in float32 (up to 16K on CUDA). KL, top-1 agreement and perplexity of the last 1024
tokens, as `sacli eval ppl` reports them.

    DEVICE=cuda TEXT=book.txt OUT=results.json python3 benchmarks/eval/precision_floor_ppl.py 8192,16384

YaRN past the trained 8K.
"""

import os
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from sacli.models.attention import sparse_context
from torch.nn.attention import SDPBackend, sdpa_kernel

import sacli.evaluate as ev
from sacli.config import load_settings
from sacli.eval_metrics import next_token_comparison
from sacli.eval_rules import every_entry, rule_attention

torch.set_grad_enabled(False)
lengths = [int(x) for x in sys.argv[1].split(",")]
device = os.environ.get("DEVICE", "cpu")
settings = load_settings({"device": device, "dtype": "auto", "rope_scale": "yarn", "dense_below": 0}, environ={})
text = Path(os.environ.get("TEXT", "../shared/books/moby_dick_2701.txt"))
LAST = 1024


def logits(lm, ids, backend=None):
    with sparse_context(replace(settings, dense=True)):
        if backend is None:
            return ev._last_logits(lm.model, ids, LAST)
        with sdpa_kernel([backend]):
            return ev._last_logits(lm.model, ids, LAST)


def compare(ref, other, targets):
    c = next_token_comparison(ref, other, targets)
    return {"kl_mean": round(c.kl_mean, 7), "top1_agreement": round(c.top1_agreement, 7),
            "ppl_ratio": round(c.ppl_sparse / c.ppl_dense, 7)}


runs = []
cache = ev.ModelCache(settings, lambda m: print(m, file=sys.stderr))
cache32 = ev.ModelCache(replace(settings, dtype="float32"), lambda m: print(m, file=sys.stderr))
for S in lengths:
    ids_cpu = ev.text_tokens(cache.tokenizer, ev.read_text(text), S, source=str(text))
    targets = ids_cpu[0, S - LAST:]
    lm = cache.get(S)
    ids = ids_cpu.to(lm.device)
    ref = logits(lm, ids)
    t = targets.to(ref.device)
    backends = [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_math", SDPBackend.MATH)]
    for name, be in backends if device == "cuda" else backends[-1:]:
        if be == SDPBackend.MATH and S > 16384:  # it materializes the (Hq, S, S) scores: 36 GiB at 32K
            continue
        try:
            row = {"seq_len": S, "vs_default_dense": name, **compare(ref, logits(lm, ids, be), t)}
        except (RuntimeError, torch.OutOfMemoryError) as e:  # a backend that does not take this input
            row = {"seq_len": S, "vs_default_dense": name, "error": str(e).splitlines()[0][:200]}
        runs.append(row)
        print(row, flush=True)
    with rule_attention(lm.model, lambda q, k, v, scale: every_entry(q), 0):
        kern = ev._last_logits(lm.model, ids, LAST)
    runs.append({"seq_len": S, "vs_default_dense": "sparse_kernel_every_entry", **compare(ref, kern, t)})
    print(runs[-1], flush=True)
    del lm
    if S > 16384 and device == "cuda":  # float32 SDPA takes its memory-heavy paths: out of memory on 80 GB at 32K
        continue
    lm32 = cache32.get(S)
    ref32 = logits(lm32, ids_cpu.to(lm32.device))
    runs.append({"seq_len": S, "vs_default_dense": "float32_dense (reference: float32)", **compare(ref32, ref, t)})
    print(runs[-1], flush=True)
    del lm32
    cache._lm = cache32._lm = None
    if device == "cuda":
        torch.cuda.empty_cache()
if os.environ.get("OUT"):
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    ev.write_json(Path(os.environ["OUT"]), {"command": " ".join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "device": ev.device_description(dev), "torch": torch.__version__, "text": text.name, "runs": runs})
