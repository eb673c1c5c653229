"""Where does dense's answer in a needle cell start to differ between processes? One process loads
the default model as `sacli eval niah` does, builds the grid cell's prompt, and prints digests of
every parameter and buffer, of every decoder layer's output in one dense prefill (repeated in
the process), and the top-2 next-token logits at the prompt's end and at each greedy step. Run
it in several fresh processes and compare:

    DEVICE=cuda TEXT=book.txt python3 benchmarks/eval/dense_model_repeat.py 16384 17 > a.json

Under torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8, as
`sacli eval` runs.
"""

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
import torch  # noqa: E402

import sacli.evaluate as ev  # noqa: E402
from sacli.models.attention import sparse_context  # noqa: E402
from sacli.models.generate import decoder_layers  # noqa: E402

from dense_kernel_repeat import digest as _digest  # noqa: E402  (this folder)
from niah_dense_repeat import DEPTHS, grid_settings  # noqa: E402  (this folder)


def digest(t: torch.Tensor) -> str:
    return _digest(t, 12)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("length", type=int)
    ap.add_argument("cell", type=int, help="grid index as in niah_dense_repeat.py (16K, depth 0.5: 17)")
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = os.environ.get("DEVICE", "cpu")
    settings = grid_settings(device, dense=True)
    cache = ev.ModelCache(settings, lambda m: print(m, file=sys.stderr))
    book = ev.read_text(Path(os.environ.get("TEXT", "../shared/books/moby_dick_2701.txt")))
    lm = cache.get(args.length + settings.max_new_tokens)
    prompt = ev.niah_prompt(lm.tokenizer, book, args.length, DEPTHS[args.cell % 5], settings, seed=args.cell)
    ids = prompt.ids.to(lm.device)
    model = lm.model
    state = {name: digest(t) for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    layers = decoder_layers(model)
    prefills = []
    for _ in range(2):
        seen: list[str] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: seen.append(digest(o[0] if isinstance(o, tuple) else o)))
                 for m in layers]
        with sparse_context(settings):
            out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
        for h in hooks:
            h.remove()
        top = out.logits[0, -1].float().topk(2)
        prefills.append({"layers": seen, "top2": [[int(i), float(v)] for v, i in zip(top.values, top.indices)]})
    # greedy steps without a cache (each step one full dense forward): top-2 logits per step
    steps = []
    cur = ids
    with sparse_context(settings):
        for _ in range(args.steps):
            logits = model(input_ids=cur, use_cache=False, logits_to_keep=1).logits[0, -1].float()
            top = logits.topk(2)
            steps.append({"token": lm.tokenizer.decode([int(top.indices[0])]), "top2": [[int(i), float(v)] for v, i in zip(top.values, top.indices)]})
            cur = torch.cat([cur, top.indices[:1].view(1, 1)], dim=1)
    json.dump({"command": " ".join(["python3"] + sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "device": ev.device_description(lm.device), "torch": torch.__version__, "prompt_tokens": prompt.length,
               "prompt_digest": digest(prompt.ids), "state": state, "prefills": prefills, "steps": steps},
              sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
