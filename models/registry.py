"""Where models live and how a name or a path becomes a model directory.

Every model is a standard Hugging Face directory (config.json, *.safetensors, tokenizer files) under
<sacli home>/models/<name>. Pickle checkpoints are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import platformdirs

from sacli.config import DEFAULT_MODEL
from sacli.errors import ModelError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    size_bytes: int
    architecture: str
    # trained context in tokens (after any RoPE scaling already in the model's config)
    context: int


def sacli_home() -> Path:
    """$SACLI_HOME, else the platform cache directory (models are re-creatable downloads)."""
    env = os.environ.get("SACLI_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("sacli"))


def models_dir() -> Path:
    return sacli_home() / "models"


def hf_local_name(repo_id: str) -> str:
    """Directory name of a Hub model: "ORG/NAME" -> "ORG--NAME"."""
    return repo_id.replace("/", "--")


def validate_model_dir(path: Path) -> Path:
    """Check that `path` is a loadable Hugging Face directory with safetensors weights."""
    if not path.is_dir():
        raise ModelError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
    if any(path.glob("*.safetensors")):
        return path
    if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir() if p.is_file()):
        raise ModelError(f"{path}: pickle checkpoints are refused; convert to safetensors")
    raise ModelError(f"{path} has no model weights (*.safetensors)")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "~")) or os.sep in spec or (os.altsep is not None and os.altsep in spec)


def _local_name(spec: str) -> str:
    if spec.startswith(HF_PREFIX):
        return hf_local_name(spec[len(HF_PREFIX):])
    return spec


def resolve_model(name_or_path: str, *, auto_pull: bool = True, notify: Callable[[str], None]) -> Path:
    """Turn a model name (as listed by `sacli models`) or a directory path into a model directory.

    The default model is pulled on first use when `auto_pull` is set, after announcing it through
    `notify`; every other missing model is an error naming `sacli models` / `sacli pull`.
    """
    spec = name_or_path.strip()
    if not spec:
        raise ModelError("no model given; see `sacli models`")
    hub = spec.startswith(HF_PREFIX)
    if not hub and _looks_like_path(spec):
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            raise ModelError(f"{spec} is a GGUF file; import it once with `sacli pull {spec}`")
        return validate_model_dir(path)

    local = models_dir() / _local_name(spec)
    if local.is_dir():
        return validate_model_dir(local)
    if not hub and Path(spec).is_dir():
        return validate_model_dir(Path(spec))

    if spec == DEFAULT_MODEL:
        if not auto_pull:
            raise ModelError(f"model {spec} is not downloaded; run `sacli pull`")
        notify(f"model {spec} not found locally; downloading it now (one time, ~100 MB)")
        from sacli.models.pull import pull

        return pull(None, progress=sys.stderr.isatty())
    if hub:
        raise ModelError(f"model {spec} is not downloaded; run `sacli pull {spec}`")
    known = ", ".join(info.name for info in list_models()) or "none downloaded yet"
    raise ModelError(f"unknown model {spec!r} (local models: {known}); see `sacli models`")


def _architecture(config: dict) -> str:
    archs = config.get("architectures") or []
    if archs:
        return str(archs[0])
    return str(config.get("model_type", "unknown"))


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# RoPE types whose `factor` stretches the trained positions over `original_max_position_embeddings`.
STRETCHING_ROPE = ("yarn", "linear", "dynamic")


def config_context(config: dict) -> int | None:
    """The context length that a model's config.json states plainly, as loading.context_limit
    reads it through transformers (a stretching RoPE scaling counts); None when the file alone
    does not say (no top-level max_position_embeddings, an unexpected RoPE entry), so that the
    caller asks transformers, which fills in defaults and per-architecture names."""
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        return None
    params = config.get("rope_parameters", config.get("rope_scaling"))
    if params is None or (isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values())):
        return limit  # no scaling, or one RoPE per layer type (loading reads no global factor then)
    if not isinstance(params, dict):
        return None
    factor = params.get("factor")
    if params.get("rope_type", params.get("type")) in STRETCHING_ROPE and factor:
        if not isinstance(factor, (int, float)):
            return None
        original = params.get("original_max_position_embeddings") or limit
        return max(limit, int(original * float(factor)))
    return limit


def list_models() -> list[ModelInfo]:
    """Every valid model directory under <sacli home>/models, sorted by name.

    Directories starting with "." are temporaries of an unfinished pull and are skipped. The
    context comes from config.json where it says it plainly (config_context), so that listing
    does not import transformers and torch (seconds: 4.8 s against 0.24 s on a 2-core machine,
    benchmarks/raw/v21_cli_models_cpu_*.json).
    """
    root = models_dir()
    if not root.is_dir():
        return []
    infos = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            validate_model_dir(path)
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            context = config_context(config) if isinstance(config, dict) else None
            if context is None:
                from sacli.models.loading import context_limit

                context = context_limit(path)
        except (ModelError, OSError, ValueError):
            continue
        infos.append(ModelInfo(path.name, path, _dir_size(path), _architecture(config), context))
    return infos
