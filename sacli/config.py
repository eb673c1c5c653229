"""Settings: one dataclass holds every default; config.toml at the repo root documents the same values.

Precedence, lowest to highest: these defaults (== repo config.toml), the user config file
(<platform config dir>/sacli/config.toml, or $SACLI_CONFIG), environment variables SACLI_<KEY>
(upper case), then command-line options.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import platformdirs

from sacli.errors import UsageError

if TYPE_CHECKING:
    from sacli.kernels.rules import SegmentConfig

DEFAULT_MODEL = "smollm2-135m-instruct"


# the selection rules sacli runs (kernels/api.sample_attention)
RULES = ("sample", "adaptive", "segments")

@dataclass(frozen=True)
class Settings:
    # model: a name known to `sacli models` (pulled into the cache) or a local HF directory
    model: str = DEFAULT_MODEL
    # "auto" picks cuda when available, else cpu
    device: str = "auto"
    # "auto": bfloat16 on cuda, float32 on cpu
    dtype: str = "auto"
    max_new_tokens: int = 256
    # empty: the model's own default system prompt, if its chat template has one
    system: str = ""
    # 0 means greedy decoding
    temperature: float = 0.0
    # SampleAttention: share of sampled attention mass the kept entries must reach
    alpha: float = 0.96
    # SampleAttention: local window as a fraction of the sequence length
    window: float = 0.05
    # SampleAttention: fraction of query rows sampled to score columns
    sample_ratio: float = 0.02
    # prefill shorter than this many tokens uses dense attention (sparse does not pay off);
    # negative: automatic, the measured crossover for the device
    dense_below: int = -1
    # selection rule: "sample" (the paper's, residual-aware), "adaptive" (per-head windows and
    # checks, dense fallback for unselectable heads: more faithful, denser) or "segments"
    # (per-head windows, columns per segment of 128 query rows)
    rule: str = "sample"
    # "segments" rule only: how many of its alpha levels a head tries on its sampled rows before
    # it is ranked from every row's exact attention; 0: all of them
    sampled_levels: int = 0
    # "sample" rule only: query rows per column list. 0: one list per head (the paper's first
    # version); a multiple of 128: each chunk of that many rows gets its own columns from its own
    # sampled rows (the later version's chunked sampling)
    chunk: int = 0
    # always use dense attention (for comparison)
    dense: bool = False
    # "none" refuses prompts over the trained context; "yarn" extends it by YaRN RoPE scaling
    rope_scale: str = "none"
    # directory walking: include hidden files and directories / ignore .gitignore rules
    hidden: bool = False
    no_gitignore: bool = False

    def segment_config(self) -> SegmentConfig:
        """The "segments" rule's tuning with these settings' knobs applied."""
        from sacli.kernels.rules import DEFAULT_SEGMENTS

        return dataclasses.replace(DEFAULT_SEGMENTS, sampled_levels=self.sampled_levels or None)


def _coerce(name: str, kind: type, raw: Any, origin: str) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(raw)
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError(raw)
        return kind(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{origin}: '{name}' must be {kind.__name__}, got {raw!r}") from None


def _types() -> dict[str, type]:
    return {f.name: type(f.default) for f in fields(Settings)}


def validate_mapping(data: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """Check keys and types of a config mapping; unknown keys are an error that names the key."""
    kinds = _types()
    out: dict[str, Any] = {}
    for key, raw in data.items():
        if key not in kinds:
            raise UsageError(f"{origin}: unknown config key '{key}'")
        out[key] = _coerce(key, kinds[key], raw, origin)
    return out


def user_config_path() -> Path:
    env = os.environ.get("SACLI_CONFIG")
    if env:
        return Path(env)
    return Path(platformdirs.user_config_dir("sacli")) / "config.toml"


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read config: {exc.strerror}") from None


def from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    kinds = _types()
    out: dict[str, Any] = {}
    for name, kind in kinds.items():
        raw = environ.get(f"SACLI_{name.upper()}")
        if raw is not None:
            out[name] = _coerce(name, kind, raw, f"environment SACLI_{name.upper()}")
    return out


def load_settings(cli: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Merge defaults < user config < environment < CLI options (None values in `cli` are unset)."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    path = user_config_path()
    if path.is_file():
        merged.update(validate_mapping(read_toml(path), str(path)))
    merged.update(from_environment(environ))
    if cli:
        merged.update(validate_mapping({k: v for k, v in cli.items() if v is not None}, "option"))
    settings = dataclasses.replace(Settings(), **merged)
    check(settings)
    return settings


def check(s: Settings) -> None:
    if not 0.0 < s.alpha <= 1.0:
        raise UsageError(f"alpha must be in (0, 1], got {s.alpha}")
    if not 0.0 < s.window <= 1.0:
        raise UsageError(f"window must be in (0, 1], got {s.window}")
    if not 0.0 < s.sample_ratio <= 1.0:
        raise UsageError(f"sample_ratio must be in (0, 1], got {s.sample_ratio}")
    if s.max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be at least 1, got {s.max_new_tokens}")
    if s.rule not in RULES:
        raise UsageError(f"rule must be one of {', '.join(RULES)}; got {s.rule!r}")
    if s.sampled_levels < 0:
        raise UsageError(f"sampled_levels must be >= 0 (0: all levels), got {s.sampled_levels}")
    if s.chunk < 0 or s.chunk % 128:
        raise UsageError(f"chunk must be 0 or a multiple of 128, got {s.chunk}")
    if s.rope_scale not in {"none", "yarn"}:
        raise UsageError(f"rope_scale must be 'none' or 'yarn', got {s.rope_scale!r}")
    if s.dtype not in {"auto", "float32", "bfloat16", "float16"}:
        raise UsageError(f"dtype must be auto, float32, bfloat16 or float16, got {s.dtype!r}")
    if s.temperature < 0:
        raise UsageError(f"temperature must be >= 0, got {s.temperature}")
