"""Which dense kernel gives different bits in different processes? One process computes, on fixed
random bf16 inputs of the default model's shapes, causal SDPA under each backend torch offers
(and under its own dispatch) plus the model's matmul shapes, and prints a digest of each output.
Run it in several fresh processes and compare the digests:

    python3 benchmarks/eval/dense_kernel_repeat.py 16384 > a.json; python3 ... > b.json

Under torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8 (what
`sacli eval` runs under), unless --free.
"""

import argparse
import hashlib
import json
import os
import sys
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def digest(t: torch.Tensor, chars: int = 16) -> str:
    """The first `chars` hex digits of the SHA-256 of the tensor's bytes."""
    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()[:chars]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("length", type=int)
    ap.add_argument("--free", action="store_true", help="without deterministic algorithms")
    args = ap.parse_args()
    if not args.free:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    S, H, Hkv, D = args.length, 9, 3, 64  # SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64
    q = torch.randn(1, H, S, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, Hkv, S, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, Hkv, S, D, device=dev, dtype=torch.bfloat16, generator=g)
    out: dict[str, str] = {}
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    for name, be in backends.items():
        for phase, (qq, causal) in {"prefill": (q, True), "decode": (q[:, :, -1:], False)}.items():
            try:
                if be is None:
                    o = F.scaled_dot_product_attention(qq, k, v, is_causal=causal, enable_gqa=True)
                else:
                    with sdpa_kernel([be]):
                        o = F.scaled_dot_product_attention(qq, k, v, is_causal=causal, enable_gqa=True)
                torch.cuda.synchronize()
                out[f"sdpa_{phase}_{name}"] = digest(o)
            except RuntimeError as e:
                out[f"sdpa_{phase}_{name}"] = f"unavailable: {str(e).splitlines()[0][:80]}"
    x = torch.randn(S, 576, device=dev, dtype=torch.bfloat16, generator=g)
    for name, (n_in, n_out) in {"qkv": (576, 960), "mlp_up": (576, 1536), "mlp_down": (1536, 576), "lm_head": (576, 49152)}.items():
        w = torch.randn(n_out, n_in, device=dev, dtype=torch.bfloat16, generator=g) / n_in**0.5
        xi = x if n_in == 576 else torch.randn(S, n_in, device=dev, dtype=torch.bfloat16, generator=g)
        out[f"linear_{name}"] = digest(F.linear(xi, w))
        out[f"linear_{name}_row"] = digest(F.linear(xi[-1:], w))
    json.dump({"command": " ".join(["python3"] + sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "device": torch.cuda.get_device_name(dev), "torch": torch.__version__,
               "deterministic": not args.free, "digests": out}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
