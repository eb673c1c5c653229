"""Settings: one source of defaults (config.toml == Settings()), precedence, and strict validation."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

import pytest

from sacli.config import Settings, load_settings, user_config_path
from sacli.errors import UsageError

REPO_CONFIG = Path(__file__).resolve().parents[1] / "config.toml"


def write_user_config(text: str) -> Path:
    path = Path(os.environ["SACLI_CONFIG"])
    path.write_text(text, encoding="utf-8")
    return path


def test_repo_config_equals_settings_defaults() -> None:
    with REPO_CONFIG.open("rb") as fh:
        documented = tomllib.load(fh)
    assert documented == dataclasses.asdict(Settings())


def test_every_documented_key_has_a_comment() -> None:
    lines = REPO_CONFIG.read_text(encoding="utf-8").splitlines()
    keys = [i for i, line in enumerate(lines) if line and not line.startswith("#") and "=" in line]
    assert len(keys) == len(dataclasses.fields(Settings))
    for i in keys:
        above = lines[i - 1]
        assert above.startswith("#") or lines[i - 2].startswith("#") and "=" in above, lines[i]


def test_defaults_without_any_configuration() -> None:
    assert load_settings({}, environ={}) == Settings()


def test_precedence_cli_over_env_over_user_file_over_defaults() -> None:
    write_user_config('alpha = 0.5\nwindow = 0.2\nmax_new_tokens = 10\nsystem = "from file"\n')
    env = {"SACLI_WINDOW": "0.3", "SACLI_MAX_NEW_TOKENS": "20"}
    settings = load_settings({"max_new_tokens": 30, "model": None}, environ=env)
    assert settings.alpha == 0.5  # file
    assert settings.window == 0.3  # env over file
    assert settings.max_new_tokens == 30  # CLI over env
    assert settings.system == "from file"
    assert settings.model == Settings().model  # None means "option not given"


def test_user_config_path_follows_xdg_and_sacli_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert user_config_path() == Path(os.environ["SACLI_CONFIG"])
    monkeypatch.delenv("SACLI_CONFIG")
    if os.name == "posix" and not os.uname().sysname == "Darwin":
        assert user_config_path() == Path(os.environ["XDG_CONFIG_HOME"]) / "sacli" / "config.toml"


def test_unknown_key_in_user_file_names_it() -> None:
    path = write_user_config("temperatur = 0.5\n")
    with pytest.raises(UsageError, match=f"{path}: unknown config key 'temperatur'"):
        load_settings({}, environ={})


def test_wrong_types_are_errors() -> None:
    write_user_config("max_new_tokens = 2.5\n")
    with pytest.raises(UsageError, match="'max_new_tokens' must be int"):
        load_settings({}, environ={})
    write_user_config("dense = \"maybe\"\n")
    with pytest.raises(UsageError, match="'dense' must be bool"):
        load_settings({}, environ={})


def test_invalid_toml_is_an_error() -> None:
    write_user_config("alpha = \n")
    with pytest.raises(UsageError, match="invalid TOML"):
        load_settings({}, environ={})


@pytest.mark.parametrize("raw, expected", [("1", True), ("yes", True), ("on", True), ("0", False), ("false", False)])
def test_boolean_environment_values(raw: str, expected: bool) -> None:
    assert load_settings({}, environ={"SACLI_DENSE": raw}).dense is expected


@pytest.mark.parametrize(
    "override, message",
    [
        ({"alpha": 0.0}, "alpha"),
        ({"window": 1.5}, "window"),
        ({"sample_ratio": -0.1}, "sample_ratio"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"rope_scale": "ntk"}, "rope_scale"),
        ({"dtype": "int8"}, "dtype"),
        ({"temperature": -1.0}, "temperature"),
        ({"sampled_levels": -1}, "sampled_levels"),
        ({"chunk": 100}, "chunk"),
        ({"chunk": -128}, "chunk"),
    ],
)
def test_out_of_range_values(override: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_settings(override, environ={})


@pytest.mark.parametrize("levels, expected", [(0, None), (1, 1), (3, 3)])
def test_sampled_levels_reach_the_segments_rule_config(levels: int, expected: int | None) -> None:
    from sacli.kernels.rules import DEFAULT_SEGMENTS

    cfg = load_settings({"sampled_levels": levels}, environ={}).segment_config()
    assert cfg.sampled_levels == expected
    assert cfg == dataclasses.replace(DEFAULT_SEGMENTS, sampled_levels=expected)


def test_chunk_reaches_the_attention_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunk knob set in the environment arrives at sample_attention through the product's
    evaluation rule, like the other knobs."""
    import torch

    from sacli import eval_rules
    from sacli.kernels import api

    seen: list[int] = []
    real = api.sample_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["chunk"])
        return real(*args, **kwargs)

    monkeypatch.setattr("sacli.kernels.sample_attention", spy)
    settings = load_settings({"dense_below": 0}, environ={"SACLI_CHUNK": "256"})
    q = torch.randn(1, 2, 300, 64)
    sel = eval_rules.selector("product", settings)(q, q[:, :1], q[:, :1], 0.125)
    assert seen == [256] and sel.segment == 256
