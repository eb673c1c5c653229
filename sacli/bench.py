"""`sacli bench`: attention kernel and time-to-first-token benchmarks (GPU).

Commands (a Typer sub-app, mounted as `sacli bench`; also runnable as `python -m sacli.bench`):

- `attention --workload synthetic`: an 8B-class attention shape (32 query heads, 8 KV heads,
  head_dim 128, bf16) with random Q/K/V and a given selection at fixed densities (window band +
  uniformly scattered columns), against dense SDPA (flash and cuDNN backends) and
  FlexAttention; SampleAttention is split into sampling / selection / sparse kernel / total.
- `attention --workload model`: Q/K/V captured from the default model reading a long text
  (its own head shapes), run through the SampleAttention pipeline with its per-head column
  selection, so the density is what the selection really yields.
- `ttft`: time to first token of the default model, dense vs SampleAttention, per-layer
  attention times; `--shape llama-8b` projects the same for an 8B-class model with random
  weights and a fixed selection at given densities (labelled as a projection).

Timing (`time_ms`): CUDA events around each call, median of >= 3 repetitions after a warm-up
call (compilation and autotuning excluded); fresh random inputs. Every run writes JSON with
device, versions, date and the command line; a PNG plot accompanies the attention benchmark.
Human-readable tables go to stdout, progress lines to stderr.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer

from sacli.errors import UsageError

if TYPE_CHECKING:
    import torch

app = typer.Typer(help="Benchmarks of the attention kernels and of time to first token (GPU).", no_args_is_help=True)

DEFAULT_LENGTHS = "8192,16384,32768,65536,131072"
DEFAULT_DENSITIES = "0.03,0.05,0.1,0.2,0.4"
# The peer measurement quoted in the issue (MInference vertical-slash kernel on an H100):
# a local band of 6096 diagonals plus 1000 columns. Benchmarked here at the same shape.
PEER_WINDOW = 6096
PEER_COLUMNS = 1000


# ----------------------------------------------------------------------------- timing


def _sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], *, budget_ms: float = 300.0, min_reps: int = 3, max_reps: int = 100) -> float:
    """Median milliseconds of fn() after one warm-up call (compilation, autotuning, plans).

    CUDA events around each call on a GPU, wall clock elsewhere. Our own loop rather than
    triton.testing.do_bench because do_bench runs a single repetition once a call exceeds its
    budget; at 128K tokens dense attention takes ~0.3 s and we want a median of at least three.
    """
    import torch
    fn()
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    estimate = (time.perf_counter() - t0) * 1e3
    reps = int(min(max_reps, max(min_reps, budget_ms / max(estimate, 1e-3))))
    samples = []
    if torch.cuda.is_available():
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        samples = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _try(fn: Callable[[], float]) -> tuple[float | None, str | None]:
    """Run a measurement; a backend that is unavailable here gives (None, reason) instead of failing."""
    try:
        return fn(), None
    except Exception as exc:  # the reason goes into the JSON next to the missing number
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def environment(command: list[str]) -> dict[str, Any]:
    """Device, versions, date and command line for a results file."""
    import torch
    # `python -m sacli.bench ...` is the same command as `sacli bench ...`
    words = ["sacli", "bench", *command[1:]] if command and command[0].endswith("bench.py") else list(command)
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(words),
        # settings taken from the environment change what runs: record them with the command
        "sacli_environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("SACLI_") and k != "SACLI_HOME"},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["sm_count"] = props.multi_processor_count
        info["cuda"] = torch.version.cuda
    return info


# ----------------------------------------------------------------------------- selections


def window_for_band_density(S: int, density: float) -> int:
    """Window w whose band alone keeps `density` of the S(S+1)/2 causal entries."""
    total = S * (S + 1) / 2
    b = 2 * S + 1
    disc = max(b * b - 8 * density * total, 0.0)
    return max(1, min(S, round((b - math.sqrt(disc)) / 2)))


def synthetic_selection(
    B: int,
    H: int,
    S: int,
    *,
    density: float | None = None,
    window: int | None = None,
    ncols: int | None = None,
    device: torch.device | str,
    seed: int = 0,
) -> Any:
    """A Selection of a band plus uniformly scattered columns, different per head.

    Either `density` (half of it from the band, the rest from random columns before the band,
    added until the kept entries reach it), or an explicit `window` and `ncols`.
    """
    import torch
    from sacli.kernels.selection import Selection

    total = S * (S + 1) / 2
    if density is not None:
        w = window_for_band_density(S, density / 2)
    else:
        assert window is not None and ncols is not None, "give density, or window and ncols"
        w = min(window, S)
    band = w * S - w * (w - 1) / 2
    g = torch.Generator(device="cpu").manual_seed(seed)
    heads = []
    for _ in range(B * H):
        pool = torch.randperm(max(S - w, 0), generator=g)
        if density is not None:
            gain = (S - w - pool).to(torch.float64).cumsum(0)
            n = int(torch.searchsorted(gain, torch.tensor([density * total - band], dtype=torch.float64))[0]) + 1
            n = min(max(n, 0), pool.numel()) if density * total > band else 0
        else:
            n = min(int(ncols or 0), pool.numel())
        heads.append(pool[:n].sort().values)
    C = max((h.numel() for h in heads), default=0)
    cols = torch.full((B * H, C), S, dtype=torch.int32)
    for i, h in enumerate(heads):
        cols[i, : h.numel()] = h.to(torch.int32)
    counts = torch.tensor([h.numel() for h in heads], dtype=torch.int32)
    return Selection(
        window=torch.full((B, H), w, dtype=torch.int32, device=device),
        cols=cols.reshape(B, H, C).to(device),
        ncols=counts.reshape(B, H).to(device),
        seq_len=S,
    )


# ----------------------------------------------------------------------------- attention


def _dense_runners(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, flex: bool) -> dict[str, Callable[[], float]]:
    """Timers of the dense causal baselines; K/V are expanded to the query heads beforehand
    (outside the timing) so every backend runs its plain MHA path."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    G = q.shape[1] // k.shape[1]
    kx = k.repeat_interleave(G, dim=1) if G > 1 else k
    vx = v.repeat_interleave(G, dim=1) if G > 1 else v

    def sdpa(backend: Any) -> float:
        def run() -> Any:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kx, vx, is_causal=True, scale=scale)

        return time_ms(run)

    runners: dict[str, Callable[[], float]] = {
        "sdpa_flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": lambda: sdpa(SDPBackend.CUDNN_ATTENTION),
    }
    if flex:

        def run_flex() -> float:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            S = q.shape[2]
            # _compile builds the block mask block by block; the eager path materialises S x S
            # (out of memory at 128K). torch marks the flag deprecated but keeps it working.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, S, S, device=q.device, _compile=True)
            compiled = torch.compile(flex_attention, dynamic=False)
            return time_ms(lambda: compiled(q, kx, vx, block_mask=mask, scale=scale))

        runners["flex_causal"] = run_flex
    return runners


def _causal_flops(B: int, H: int, S: int, D: int) -> float:
    # QK^T and PV over the causal half: 2 matmuls x 2 flops x D per kept entry
    return 4.0 * D * B * H * S * (S + 1) / 2


@dataclass
class StageTimes:
    sampling_ms: float
    selection_ms: float


def _time_stages(q: torch.Tensor, k: torch.Tensor, *, alpha: float, window: float, sample_ratio: float, scale: float) -> StageTimes:
    """Time stage 1 (column scores) and stage 2 (selection, with the sparse kernel's per-block
    column counts and the density) as the pipeline runs them."""
    from sacli.kernels import backend as kb
    from sacli.kernels.selection import fraction_to_tokens, sample_rows

    S = q.shape[2]
    w = fraction_to_tokens(window, S)
    rows = sample_rows(S, sample_ratio, device=q.device)
    sampling = time_ms(lambda: kb.column_scores(q, k, rows, w, scale))
    scores, mass = kb.column_scores(q, k, rows, w, scale)
    selection = time_ms(lambda: kb.selection_stage(scores, mass, alpha, w, S))
    return StageTimes(sampling, selection)


def _sparse_row(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: Any, scale: float, stages: StageTimes, dense: dict[str, float | None], label: str
) -> dict[str, Any]:
    from sacli.kernels import backend as kb

    B, H, S, D = q.shape
    counts = None
    if kb.choose_backend(None, q, k, v) == "triton":
        # stage 2 hands these to the kernel in the pipeline; here they are made outside the timing
        from sacli.kernels.triton_sparse import column_counts, count_block

        counts = column_counts(sel, count_block())
    hint = int(sel.window.max())  # on the host, as the pipeline knows its window (outside the timing)
    kernel = time_ms(lambda: kb.sparse_attention(q, k, v, sel, scale, counts=counts, window_hint=hint))
    kept = float(sel.kept_entries().sum())
    total = stages.sampling_ms + stages.selection_ms + kernel
    row: dict[str, Any] = {
        "label": label,
        "density": kept / (B * H * S * (S + 1) / 2),
        "window": int(sel.window.float().mean()),
        "mean_columns": float(sel.ncols.float().mean()),
        "sampling_ms": stages.sampling_ms,
        "selection_ms": stages.selection_ms,
        "sparse_kernel_ms": kernel,
        "total_ms": total,
        "kernel_tflops": 4.0 * D * kept / (kernel * 1e-3) / 1e12,
    }
    row.update(_speedups("total", total, dense))
    row.update(_speedups("kernel", kernel, dense))
    # the kernel's FLOP rate on the entries it computes, as a share of each dense baseline's rate
    row.update({f"kernel_rate_vs_{name}": row["density"] * base / kernel for name, base in dense.items() if base is not None})
    return row


def _speedups(what: str, ms: float, dense: dict[str, float | None]) -> dict[str, float]:
    """{"speedup_<what>_vs_<baseline>": baseline ms / ms} for each timed dense baseline."""
    return {f"speedup_{what}_vs_{name}": base / ms for name, base in dense.items() if base is not None}


def _dense_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, flex: bool) -> tuple[dict[str, float | None], dict[str, Any]]:
    B, H, S, D = q.shape
    times: dict[str, float | None] = {}
    out: dict[str, Any] = {}
    for name, runner in _dense_runners(q, k, v, scale, flex).items():
        ms, err = _try(runner)
        times[name] = ms
        out[name] = {"ms": ms, "tflops": _causal_flops(B, H, S, D) / (ms * 1e-3) / 1e12 if ms else None}
        if err:
            out[name]["error"] = err
    return times, out


def bench_synthetic(
    lengths: list[int],
    densities: list[float],
    *,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    alpha: float,
    window: float,
    sample_ratio: float,
    flex: bool | list[int] = True,
    peer: bool = True,
    log: Callable[[str], None] = lambda _: None,
    checkpoint: Callable[[list[dict[str, Any]]], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Workload (b): random Q/K/V of an 8B-class shape, fixed selections at `densities`.

    flex: time FlexAttention at every length (True), none (False) or the listed lengths.
    """
    import torch
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    results = []
    for S in lengths:
        g = torch.Generator(device=dev).manual_seed(S)
        q = torch.randn(1, heads, S, head_dim, device=dev, dtype=dtype, generator=g)
        k = torch.randn(1, kv_heads, S, head_dim, device=dev, dtype=dtype, generator=g)
        v = torch.randn(1, kv_heads, S, head_dim, device=dev, dtype=dtype, generator=g)
        scale = head_dim**-0.5
        dense, dense_out = _dense_block(q, k, v, scale, flex if isinstance(flex, bool) else S in flex)
        log(f"S={S} dense " + ", ".join(f"{n}={t:.2f} ms" for n, t in dense.items() if t is not None))
        stages = _time_stages(q, k, alpha=alpha, window=window, sample_ratio=sample_ratio, scale=scale)
        log(f"S={S} sampling {stages.sampling_ms:.2f} ms, selection {stages.selection_ms:.2f} ms")
        rows = []
        cases: list[tuple[str, dict[str, Any]]] = [(f"{d:g}", {"density": d}) for d in densities]
        if peer and S > PEER_WINDOW:
            cases.append(("peer", {"window": PEER_WINDOW, "ncols": PEER_COLUMNS}))
        for i, (label, spec) in enumerate(cases):
            sel = synthetic_selection(1, heads, S, device=dev, seed=S + i, **spec)
            row = _sparse_row(q, k, v, sel, scale, stages, dense, label)
            log(
                f"S={S} {label}: density {row['density']:.3f} kernel {row['sparse_kernel_ms']:.2f} ms "
                f"({row['kernel_tflops']:.0f} TFLOP/s) total {row['total_ms']:.2f} ms"
            )
            rows.append(row)
        results.append({"seq_len": S, "dense": dense_out, "sparse": rows})
        checkpoint(results)
        del q, k, v
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return results


# ----------------------------------------------------------------------------- model capture


def _load_default_model(max_tokens: int, model: str | None) -> Any:
    """The default (or named) model with YaRN stretched to max_tokens when needed."""
    import dataclasses

    from sacli.config import load_settings
    from sacli.models.loading import load_model
    from sacli.models.registry import resolve_model

    settings = dataclasses.replace(load_settings(), rope_scale="yarn", max_new_tokens=1)
    if model:
        settings = dataclasses.replace(settings, model=model)
    path = resolve_model(settings.model, auto_pull=True, notify=lambda m: print(m, file=sys.stderr))
    return load_model(path, settings, max_tokens + 1), settings


def _text_ids(lm: Any, text_path: Path, n: int) -> torch.Tensor:
    text = text_path.read_text(encoding="utf-8", errors="replace")
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    if ids.shape[1] < n:
        raise UsageError(f"{text_path} has {ids.shape[1]} tokens; the benchmark needs {n}")
    return ids[:, :n]


def capture_qkv(lm: Any, ids: torch.Tensor, layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """Post-RoPE (q, k, v, scale) of the given layers for one dense prefill of `ids` (1, S)."""
    import torch
    import torch.nn.functional as F
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    from sacli.models.attention import ATTENTION_NAME

    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}

    def capture(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
        layer = int(getattr(module, "layer_idx", -1))
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if layer in layers:
            captured[layer] = (query.detach().clone(), key.detach().clone(), value.detach().clone(), float(scale))
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, is_causal=attention_mask is None, scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("sacli_bench_capture", capture)
    AttentionMaskInterface.register("sacli_bench_capture", sdpa_mask)
    lm.model.set_attn_implementation("sacli_bench_capture")
    try:
        with torch.inference_mode():
            lm.model(input_ids=ids.to(lm.device), use_cache=False, logits_to_keep=1)
    finally:
        lm.model.set_attn_implementation(ATTENTION_NAME)
    return captured


def bench_model(
    lengths: list[int],
    text: Path,
    *,
    layers: list[int] | None,
    alpha: float,
    window: float,
    sample_ratio: float,
    flex: bool,
    model: str | None = None,
    log: Callable[[str], None] = lambda _: None,
    checkpoint: Callable[[list[dict[str, Any]]], None] = lambda _: None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Workload (a): Q/K/V of the real model on `text`, adaptive selection at each length."""
    from sacli.kernels import sample_attention
    from sacli.models.loading import release_memory

    lm, _ = _load_default_model(max(lengths), model)
    n_layers = lm.model.config.num_hidden_layers
    use = layers if layers is not None else sorted({round(i * (n_layers - 1) / 5) for i in range(6)})
    ids = _text_ids(lm, text, max(lengths))
    captured = capture_qkv(lm, ids, use)
    q0 = next(iter(captured.values()))[0]
    shape = {"model": lm.name, "heads": q0.shape[1], "kv_heads": captured[use[0]][1].shape[1], "head_dim": q0.shape[3],
             "layers": use, "rope_scaled": lm.rope_scaled, "text": text.name}
    del lm
    release_memory()
    results = []
    for S in lengths:
        per_layer = []
        for layer in use:
            qf, kf, vf, scale = captured[layer]
            q, k, v = (t[:, :, :S].contiguous() for t in (qf, kf, vf))
            dense, dense_out = _dense_block(q, k, v, scale, flex)
            stages = _time_stages(q, k, alpha=alpha, window=window, sample_ratio=sample_ratio, scale=scale)
            _, stats = sample_attention(q, k, v, alpha=alpha, window=window, sample_ratio=sample_ratio, scale=scale)
            row = _sparse_row(q, k, v, stats.selection, scale, stages, dense, f"layer{layer}")
            row["end_to_end_ms"] = time_ms(
                lambda: sample_attention(q, k, v, alpha=alpha, window=window, sample_ratio=sample_ratio, scale=scale)
            )
            row.update(_speedups("end_to_end", row["end_to_end_ms"], dense))
            row["layer"] = layer
            row["dense"] = dense_out
            per_layer.append(row)
            log(f"S={S} layer {layer}: density {row['density']:.3f} total {row['total_ms']:.2f} ms, "
                + ", ".join(f"{n} {t:.2f} ms" for n, t in dense.items() if t is not None))
        results.append({"seq_len": S, "layers": per_layer, "mean_density": statistics.fmean(r["density"] for r in per_layer)})
        checkpoint(results)
    return results, shape


# ----------------------------------------------------------------------------- TTFT


class _AttentionTimer:
    """Forward hooks timing each layer's self-attention module (synchronised)."""

    def __init__(self, layers: list[torch.nn.Module]):
        self.ms = [0.0] * len(layers)
        self._t = [0.0] * len(layers)
        self._handles = []
        for i, layer in enumerate(layers):
            attn = getattr(layer, "self_attn")
            self._handles.append(attn.register_forward_pre_hook(self._pre(i)))
            self._handles.append(attn.register_forward_hook(self._post(i)))

    def _pre(self, i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            _sync()
            self._t[i] = time.perf_counter()

        return hook

    def _post(self, i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            _sync()
            self.ms[i] += (time.perf_counter() - self._t[i]) * 1e3

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _attention_ms(layers: list[torch.nn.Module], forward: Callable[[], Any]) -> list[float]:
    """Milliseconds each layer's attention took during forward() (hooks synchronise around it)."""
    timer = _AttentionTimer(layers)
    try:
        forward()
    finally:
        timer.remove()
    return timer.ms


def _add_speedups(row: dict[str, Any]) -> None:
    """Dense over sparse TTFT and attention time, for a row holding both modes."""
    row["speedup_ttft"] = row["dense"]["ttft_ms"] / row["sparse"]["ttft_ms"]
    row["speedup_attention"] = row["dense"]["attention_ms_total"] / row["sparse"]["attention_ms_total"]


def _median_runs(
    runs: dict[str, tuple[Callable[[], tuple[float, float, str]], Callable[[], list[float]]]], repeats: int
) -> dict[str, dict[str, Any]]:
    """Per mode, medians over `repeats` runs after one warm-up each (Triton compilation and
    autotuning, CUDA graph capture, cuDNN plans). runs: mode -> (ttft_run, attention_run).
    The modes take turns run by run, so slow drifts of the machine (clocks, other processes)
    fall on every mode alike. TTFT comes from runs without attention hooks; the per-layer
    attention times from separate runs whose hooks synchronise around every attention call
    (which would inflate TTFT)."""
    for ttft_run, _ in runs.values():
        ttft_run()
    samples: dict[str, list[tuple[float, float, str]]] = {mode: [] for mode in runs}
    attn: dict[str, list[list[float]]] = {mode: [] for mode in runs}
    for _ in range(repeats):
        for mode, (ttft_run, _) in runs.items():
            samples[mode].append(ttft_run())
    for _ in range(repeats):
        for mode, (_, attention_run) in runs.items():
            attn[mode].append(attention_run())
    out = {}
    for mode in runs:
        per_layer = [statistics.median(a[i] for a in attn[mode]) for i in range(len(attn[mode][0]))]
        ttft = [s[0] for s in samples[mode]]
        out[mode] = {
            "ttft_ms": statistics.median(ttft),
            "ttft_ms_runs": ttft,
            "attention_ms_total": sum(per_layer),
            "attention_ms_per_layer": per_layer,
            "density": statistics.median(s[1] for s in samples[mode]),
            "routed": samples[mode][-1][2],
        }
    return out


def bench_ttft_default(
    lengths: list[int], text: Path, *, repeats: int, model: str | None = None, log: Callable[[str], None] = lambda _: None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """TTFT of the default model vs input length, dense SDPA vs SampleAttention."""
    import dataclasses

    from sacli.models.generate import decoder_layers, generate
    from sacli.models.loading import release_memory

    results = []
    lm: Any = None
    for S in lengths:
        # Loaded per length: past the trained context YaRN is stretched to the prompt, as
        # `sacli ask` does, so each length runs the model a user would get at that length.
        del lm
        release_memory()
        lm, settings = _load_default_model(S, model)
        ids = _text_ids(lm, text, S)
        layers = decoder_layers(lm.model)
        row: dict[str, Any] = {"seq_len": S, "rope_scaled": lm.rope_scaled}
        runs = {}
        for mode in ("dense", "sparse"):
            s = dataclasses.replace(settings, dense=mode == "dense", max_new_tokens=1)

            def run(s: Any = s) -> tuple[float, float, str]:
                res = generate(lm, ids[:, :S], s)
                return res.ttft_ms, 1.0 - res.sparsity, res.attention

            runs[mode] = (run, lambda s=s: _attention_ms(layers, lambda: generate(lm, ids[:, :S], s)))
        row.update(_median_runs(runs, repeats))
        _add_speedups(row)
        log(f"S={S}: TTFT dense {row['dense']['ttft_ms']:.1f} ms, sparse {row['sparse']['ttft_ms']:.1f} ms "
            f"(density {row['sparse']['density']:.3f})")
        results.append(row)
    shape = {"model": lm.name, "layers": len(layers), "text": text.name, "yarn": "stretched to each length",
             "rule": settings.rule, "alpha": settings.alpha, "window": settings.window,
             "sample_ratio": settings.sample_ratio, "sampled_levels": settings.sampled_levels,
             "chunk": settings.chunk}
    return results, shape


LLAMA_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0,
}


def bench_ttft_projection(
    lengths: list[int], densities: dict[int, float], *, repeats: int, sample_ratio: float, window: float, alpha: float,
    layers: int | None = None, log: Callable[[str], None] = lambda _: None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Projection for an 8B-class Llama shape with random weights.

    Random weights give meaningless attention, so the sparse path runs the real stage 1 and
    stage 2 on the model's Q/K (their cost) but attends with a fixed synthetic selection whose
    density is `densities[S]` (measured on the real model by `attention --workload model`).
    """
    import torch
    from transformers import AttentionInterface, AttentionMaskInterface, LlamaConfig, LlamaForCausalLM
    from transformers.masking_utils import sdpa_mask
    import torch.nn.functional as F

    from sacli.kernels import backend as kb
    from sacli.kernels.selection import fraction_to_tokens, sample_rows

    dev = torch.device("cuda")
    cfg = dict(LLAMA_8B)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    config = LlamaConfig(**cfg, max_position_embeddings=max(lengths) + 1)
    state: dict[str, Any] = {"mode": "dense", "sel": None, "window": None}

    def attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if state["mode"] == "dense" or attention_mask is not None:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=attention_mask is None,
                                                 scale=scale, enable_gqa=query.shape[1] != key.shape[1])
        else:
            S = query.shape[2]
            w = fraction_to_tokens(window, S)
            rows = sample_rows(S, sample_ratio, device=query.device)
            scores, mass = kb.column_scores(query, key, rows, w, scale)
            kb.selection_stage(scores, mass, alpha, w, S)  # its cost; the fixed selection replaces it
            out = kb.sparse_attention(query, key, value, state["sel"], scale, window_hint=state["window"])
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("sacli_bench_projection", attention)
    AttentionMaskInterface.register("sacli_bench_projection", sdpa_mask)
    config._attn_implementation = "sacli_bench_projection"
    with torch.device(dev):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.eval()
    layer_mods = list(model.model.layers)
    results = []
    for S in lengths:
        ids = torch.randint(0, cfg["vocab_size"], (1, S), device=dev)
        state["sel"] = synthetic_selection(1, cfg["num_attention_heads"], S, density=densities[S], device=dev, seed=S)
        state["window"] = int(state["sel"].window.max())
        row: dict[str, Any] = {"seq_len": S, "density": float(state["sel"].density().mean())}

        def prefill() -> float:
            with torch.inference_mode():
                _sync()
                t0 = time.perf_counter()
                out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
                out.logits[:, -1].argmax(-1).item()
                return (time.perf_counter() - t0) * 1e3

        def run(mode: str) -> tuple[float, float, str]:
            state["mode"] = mode
            return prefill(), row["density"] if mode == "sparse" else 1.0, mode

        def attention_run(mode: str) -> list[float]:
            state["mode"] = mode
            return _attention_ms(layer_mods, prefill)

        row.update(_median_runs({m: (lambda m=m: run(m), lambda m=m: attention_run(m)) for m in ("dense", "sparse")}, repeats))
        _add_speedups(row)
        log(f"S={S}: projected TTFT dense {row['dense']['ttft_ms']:.0f} ms, sparse {row['sparse']['ttft_ms']:.0f} ms "
            f"(density {row['density']:.3f})")
        results.append(row)
        del ids
    shape = {"model": "llama-8b-shape (random weights)", **cfg, "projection": True}
    return results, shape


# ----------------------------------------------------------------------------- output


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{name} must be a comma-separated list of numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"--{name} needs positive values, got {text!r}")
    return values


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{name} must be a comma-separated list of numbers, got {text!r}") from None
    if not values or not all(0 < x <= 1 for x in values):
        raise UsageError(f"--{name} needs values in (0, 1], got {text!r}")
    return values


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def render_attention(payload: dict[str, Any]) -> str:
    """Plain-text table of an attention benchmark."""
    lines = []
    if payload["workload"] == "synthetic":
        lines.append(f"{'S':>7} {'density':>8} {'flash':>8} {'cuDNN':>8} {'flex':>8} {'sample':>7} {'select':>7} "
                     f"{'kernel':>8} {'total':>8} {'TFLOP/s':>7} {'% cuDNN':>7} {'x cuDNN':>7}")
        for res in payload["results"]:
            d = res["dense"]
            for row in res["sparse"]:
                lines.append(
                    f"{res['seq_len']:>7} {row['label']:>8} {_fmt(d['sdpa_flash']['ms']):>8} {_fmt(d['sdpa_cudnn']['ms']):>8} "
                    f"{_fmt(d.get('flex_causal', {}).get('ms')):>8} {row['sampling_ms']:>7.2f} {row['selection_ms']:>7.2f} "
                    f"{row['sparse_kernel_ms']:>8.2f} {row['total_ms']:>8.2f} {row['kernel_tflops']:>7.0f} "
                    f"{_pct(row.get('kernel_rate_vs_sdpa_cudnn')):>7} {_fmt(row.get('speedup_total_vs_sdpa_cudnn')):>7}"
                )
    else:
        lines.append(f"{'S':>7} {'layer':>5} {'density':>8} {'flash':>8} {'cuDNN':>8} {'sample':>7} {'select':>7} "
                     f"{'kernel':>8} {'total':>8} {'x cuDNN':>7} {'e2e':>8} {'x cuDNN':>7}")
        for res in payload["results"]:
            for row in res["layers"]:
                d = row["dense"]
                lines.append(
                    f"{res['seq_len']:>7} {row['layer']:>5} {row['density']:>8.3f} {_fmt(d['sdpa_flash']['ms']):>8} "
                    f"{_fmt(d['sdpa_cudnn']['ms']):>8} {row['sampling_ms']:>7.2f} {row['selection_ms']:>7.2f} "
                    f"{row['sparse_kernel_ms']:>8.2f} {row['total_ms']:>8.2f} {_fmt(row.get('speedup_total_vs_sdpa_cudnn')):>7} "
                    f"{_fmt(row.get('end_to_end_ms')):>8} {_fmt(row.get('speedup_end_to_end_vs_sdpa_cudnn')):>7}"
                )
        lines.append("total: the stages timed one by one; e2e: one sample_attention call as the model makes it "
                     "(CUDA graph replay on CUDA)")
    return "\n".join(lines)


def plot_attention(payload: dict[str, Any], path: Path) -> None:
    """Latency vs length (log-log): dense baselines and SampleAttention totals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    res = payload["results"]
    Ls = [r["seq_len"] for r in res]
    if payload["workload"] == "synthetic":
        dense_of = lambda r, n: (r["dense"].get(n) or {}).get("ms")  # noqa: E731
        labels = [row["label"] for row in res[-1]["sparse"]]
        series = {f"SampleAttention total, density {lab}": [next((x["total_ms"] for x in r["sparse"] if x["label"] == lab), None) for r in res] for lab in labels}
    else:
        dense_of = lambda r, n: sum((x["dense"].get(n) or {}).get("ms") or 0 for x in r["layers"]) or None  # noqa: E731
        series = {"SampleAttention stages (sum over layers)": [sum(x["total_ms"] for x in r["layers"]) for r in res],
                  "SampleAttention end to end (sum over layers)": [sum(x.get("end_to_end_ms") or 0 for x in r["layers"]) or None for r in res]}
    for name, style in (("sdpa_flash", "k--"), ("sdpa_cudnn", "k-"), ("flex_causal", "k:")):
        ys = [dense_of(r, name) for r in res]
        if any(y is not None for y in ys):
            ax.plot([L for L, y in zip(Ls, ys) if y], [y for y in ys if y], style, label=f"dense {name}")
    for name, ys in series.items():
        pts = [(L, y) for L, y in zip(Ls, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"Attention prefill latency, {payload['env']['device']} ({payload['workload']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- commands


@app.command()
def attention(
    workload: str = typer.Option("synthetic", help="synthetic (8B-class shape, fixed densities) or model (captured Q/K/V)."),
    lengths: str = typer.Option(DEFAULT_LENGTHS, help="Comma-separated sequence lengths."),
    densities: str = typer.Option(DEFAULT_DENSITIES, help="Synthetic workload: kept fractions of the causal entries."),
    text: Optional[Path] = typer.Option(None, help="Model workload: a long UTF-8 text file to read."),
    layers: Optional[str] = typer.Option(None, help="Model workload: layers to capture (default: 6 spread over the model)."),
    model: Optional[str] = typer.Option(None, help="Model workload: model name or path (default: the configured model)."),
    flex: bool = typer.Option(True, help="Also time FlexAttention (compiles once per length)."),
    flex_lengths: Optional[str] = typer.Option(None, help="Synthetic workload: time FlexAttention only at these lengths."),
    out: Path = typer.Option(Path("benchmarks/attention.json"), help="JSON results file."),
    plot: Optional[Path] = typer.Option(None, help="PNG plot (default: the JSON path with .png)."),
) -> None:
    """Attention latency: dense SDPA (flash, cuDNN), FlexAttention, SampleAttention stages."""
    from sacli.config import load_settings

    settings = load_settings()
    Ls = _ints(lengths, "lengths")
    env = environment(sys.argv)
    common = {"alpha": settings.alpha, "window": settings.window, "sample_ratio": settings.sample_ratio}

    def checkpoint(partial: list[dict[str, Any]]) -> None:  # keep finished lengths if a later one fails
        _write_json(out, {"benchmark": "attention", "workload": workload, "env": env, "settings": common,
                          "partial": True, "results": partial})

    if workload == "synthetic":
        use_flex: bool | list[int] = _ints(flex_lengths, "flex-lengths") if flex and flex_lengths else flex
        results = bench_synthetic(Ls, _floats(densities, "densities"), flex=use_flex, log=_log, checkpoint=checkpoint,
                                  **common)
        shape: dict[str, Any] = {"heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16", "batch": 1}
    elif workload == "model":
        if text is None:
            raise UsageError("--workload model needs --text FILE (a long document)")
        use = _ints(layers, "layers") if layers else None
        results, shape = bench_model(Ls, text, layers=use, flex=flex, model=model, log=_log, checkpoint=checkpoint,
                                     **common)
    else:
        raise UsageError(f"--workload must be synthetic or model, got {workload!r}")
    payload = {"benchmark": "attention", "workload": workload, "env": env, "shape": shape, "settings": common,
               "results": results}
    _write_json(out, payload)
    plot_attention(payload, plot or out.with_suffix(".png"))
    print(render_attention(payload))


@app.command()
def ttft(
    shape: str = typer.Option("default", help="default (the configured model) or llama-8b (random weights, projection)."),
    lengths: str = typer.Option(DEFAULT_LENGTHS, help="Comma-separated input lengths in tokens."),
    text: Optional[Path] = typer.Option(None, help="Default shape: a long UTF-8 text file for the prompt."),
    densities: Optional[str] = typer.Option(None, help="llama-8b: densities per length (comma list, one per length)."),
    densities_from: Optional[Path] = typer.Option(None, help="llama-8b: take densities from an `attention --workload model` JSON."),
    repeats: int = typer.Option(5, min=1, help="Timed runs per point and mode (median), after one warm-up; the modes alternate."),
    model: Optional[str] = typer.Option(None, help="Default shape: model name or path."),
    out: Path = typer.Option(Path("benchmarks/ttft.json"), help="JSON results file."),
) -> None:
    """Time to first token vs input length, dense SDPA vs SampleAttention."""
    import torch
    from sacli.config import load_settings

    settings = load_settings()
    Ls = _ints(lengths, "lengths")
    env = environment(sys.argv)
    if shape == "default":
        if text is None:
            raise UsageError("ttft needs --text FILE (a long document) for the prompt")
        results, info = bench_ttft_default(Ls, text, repeats=repeats, model=model, log=_log)
    elif shape == "llama-8b":
        if not torch.cuda.is_available():
            raise UsageError("--shape llama-8b needs a CUDA GPU")
        per_len = _density_map(Ls, densities, densities_from)
        results, info = bench_ttft_projection(Ls, per_len, repeats=repeats, sample_ratio=settings.sample_ratio,
                                              window=settings.window, alpha=settings.alpha, log=_log)
    else:
        raise UsageError(f"--shape must be default or llama-8b, got {shape!r}")
    payload = {"benchmark": "ttft", "shape": info, "env": env, "results": results}
    _write_json(out, payload)
    head = "PROJECTION (random weights, fixed selection)\n" if shape == "llama-8b" else ""
    lines = [f"{'S':>7} {'dense TTFT':>11} {'sparse TTFT':>12} {'speed-up':>9} {'attn dense':>11} {'attn sparse':>12} {'density':>8}"]
    for r in results:
        lines.append(f"{r['seq_len']:>7} {r['dense']['ttft_ms']:>11.1f} {r['sparse']['ttft_ms']:>12.1f} {r['speedup_ttft']:>9.2f} "
                     f"{r['dense']['attention_ms_total']:>11.1f} {r['sparse']['attention_ms_total']:>12.1f} {r['sparse']['density']:>8.3f}")
    print(head + "\n".join(lines))


def _density_map(lengths: list[int], densities: str | None, source: Path | None) -> dict[int, float]:
    if source is not None:
        data = json.loads(source.read_text(encoding="utf-8"))
        measured = {int(r["seq_len"]): float(r["mean_density"]) for r in data.get("results", []) if "mean_density" in r}
        if not measured:
            raise UsageError(f"{source} holds no model-workload densities")
        # lengths not measured take the density of the nearest measured length
        return {L: measured[min(measured, key=lambda m: abs(math.log(m / L)))] for L in lengths}
    if densities is None:
        raise UsageError("--shape llama-8b needs --densities or --densities-from")
    values = _floats(densities, "densities")
    if len(values) != len(lengths):
        raise UsageError(f"--densities has {len(values)} values for {len(lengths)} lengths")
    return dict(zip(lengths, values))


if __name__ == "__main__":
    app()
