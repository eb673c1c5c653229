"""Autotuning choices kept in a file, so that a new process does not autotune again.

Triton's autotuner times every config of a kernel the first time a process launches it for a
key (length bucket, head dim, dtypes, ...). Its own on-disk record of those timings skips
kernels whose configs have pre-launch hooks, and ours have them (they set the tile rows of the
host-made tensor descriptors). So every new `sacli` process timed every config again, seconds
that a user waits for the first token of every `sacli ask`.

`use_file(path)` names a JSON file; `launch(tuner, grid, ...)` then fills the tuner's in-memory
choices from it before launching and writes new ones back after. An entry is found again only
for the same kernel source, config list, GPU, and Triton / PyTorch / CUDA versions; anything
else (a missing or unreadable file included) falls back to timing, as before. Writes replace
the file atomically after merging with what other processes wrote meanwhile. Without a file
(the default, e.g. for library use and the tests' kernels) nothing is read or written.

A machine's first process still had to time every config, and Triton compiles each config it
times: most of the 16-19.5 s TTFT of the first `sacli ask` on a fresh H100. So choices made on an
H100 ship with sacli (`tuned_defaults.json` beside this module, made by
benchmarks/tuned_defaults.py from a GPU run's file) and fill in what the file lacks, so that only
the chosen variants compile. They are matched on the kernel's own source, its config list and the
GPU model only, not on the Triton / PyTorch / CUDA versions: a choice can only make a kernel
faster or slower, never wrong. Keys they do not cover (another GPU, head dim, dtype, ...) are
timed as before. They are used only where a file is (not with SACLI_AUTOTUNE_FILE=none).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = 1

DEFAULTS_FILE = Path(__file__).with_name("tuned_defaults.json")

_path: Path | None = None
_store: dict[str, dict[str, str]] | None = None  # context -> {key as JSON: config as str}
_defaults: dict[str, dict[str, str]] | None = None  # portable context -> {key as JSON: portable config}
_seen: dict[tuple[int, str], int] = {}  # (id(tuner), context) -> size of tuner.cache when last synced
_contexts: dict[tuple[int, torch.device], str] = {}


def use_file(path: Path | str | None) -> None:
    """Keep choices in `path` from now on (None: in memory only, Triton's default)."""
    global _path, _store, _defaults
    _path = Path(path) if path is not None else None
    _store = _defaults = None
    _seen.clear()
    _contexts.clear()


def current_file() -> Path | None:
    return _path


def _read(path: Path) -> dict[str, dict[str, str]]:
    """The choices of a file in this module's format; {} for a missing or unreadable one."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("choices"), dict):
        return {}
    return {c: dict(e) for c, e in data["choices"].items() if isinstance(e, dict)}


def _source_digest(tuner: Any) -> str:
    key = getattr(tuner.fn, "cache_key", None)  # a JITFunction's: its source and its callees'
    if key is None:  # the interpreter's functions have none
        key = hashlib.sha256(inspect.getsource(tuner.base_fn).encode()).hexdigest()
    return str(key)


def gpu_model(device: torch.device) -> str:
    """The GPU's name and compute capability ("NVIDIA H100 80GB HBM3 sm90"), or the device type."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} sm{major}{minor}"


def _device_name(device: torch.device) -> str:
    return f"{gpu_model(device)} cuda {torch.version.cuda}" if device.type == "cuda" else device.type


def context(tuner: Any, device: torch.device) -> str:
    """What a stored choice is valid for: kernel, its source, its configs, GPU and versions."""
    import triton

    configs = hashlib.sha256("\n".join(str(c) for c in tuner.configs).encode()).hexdigest()[:16]
    return " | ".join((
        tuner.base_fn.__name__, _source_digest(tuner)[:16], configs, _device_name(device),
        f"triton {triton.__version__}", f"torch {torch.__version__}",
    ))


def product_tuners() -> dict[str, Any]:
    """The autotuned kernels of the sparse prefill, by name (what tuned_defaults.json covers)."""
    from sacli.kernels import triton_sampling, triton_sparse

    tuners = (triton_sampling._row_stats_tuned, triton_sampling._col_scores_tuned, triton_sparse._sparse_attn_fwd_tuned)
    return {t.base_fn.__name__: t for t in tuners}


def portable_config(config: Any) -> str:
    """A config as shipped choices name it: its parameters, warps and stages."""
    params = " ".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    return f"{params} warps={config.num_warps} stages={config.num_stages}"


def portable_context(tuner: Any, gpu: str) -> str:
    """What a shipped choice is valid for: the kernel's name and source (its own function's),
    its config list, and the GPU model (`gpu`, as gpu_model() gives it)."""
    source = hashlib.sha256(inspect.getsource(tuner.base_fn).encode()).hexdigest()[:16]
    configs = hashlib.sha256("\n".join(portable_config(c) for c in tuner.configs).encode()).hexdigest()[:16]
    return " | ".join((tuner.base_fn.__name__, source, configs, gpu))


def _plain(key: tuple) -> bool:
    return all(isinstance(x, (bool, int, float, str)) or x is None for x in key)


def _fill(tuner: Any, entries: dict[str, str], configs: dict[str, Any]) -> None:
    for key_json, config in entries.items():
        try:
            key = tuple(json.loads(key_json))
        except ValueError:
            continue
        if config in configs:
            tuner.cache.setdefault(key, configs[config])


def _restore(tuner: Any, ctx: str, device: torch.device) -> None:
    global _store, _defaults
    assert _path is not None
    if _store is None:
        _store = _read(_path)
    if _defaults is None:
        _defaults = _read(DEFAULTS_FILE)
    _fill(tuner, _store.get(ctx, {}), {str(c): c for c in tuner.configs})
    shipped = _defaults.get(portable_context(tuner, gpu_model(device)), {})  # only what the file lacks
    _fill(tuner, shipped, {portable_config(c): c for c in tuner.configs})
    _seen[id(tuner), ctx] = len(tuner.cache)


def _save(tuner: Any, ctx: str) -> None:
    assert _path is not None
    new = {json.dumps(list(k)): str(c) for k, c in tuner.cache.items() if _plain(k)}
    merged = _read(_path)  # other processes may have written since
    merged.setdefault(ctx, {}).update(new)
    tmp = None
    try:
        _path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=_path.parent, prefix=_path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT, "choices": merged}, f, indent=1, sort_keys=True)
        os.replace(tmp, _path)
    except OSError:  # a read-only home only costs the timing next time
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    _seen[id(tuner), ctx] = len(tuner.cache)


def launch(tuner: Any, grid: Any, *args: Any, device: torch.device, **kwargs: Any) -> Any:
    """tuner[grid](*args, **kwargs), with its choices read from and written to the file."""
    if _path is None:
        return tuner[grid](*args, **kwargs)
    ctx = _contexts.get((id(tuner), device))
    if ctx is None:
        ctx = _contexts[id(tuner), device] = context(tuner, device)
    if (id(tuner), ctx) not in _seen:
        _restore(tuner, ctx, device)
    result = tuner[grid](*args, **kwargs)
    if len(tuner.cache) != _seen[id(tuner), ctx]:
        _save(tuner, ctx)
    return result
