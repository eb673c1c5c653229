"""The evaluation's rule selectors bind the settings' knobs, the segments rule's tuning included."""

from __future__ import annotations

import pytest
import torch

from sacli.config import Settings


@pytest.mark.parametrize("name", ["segments", "product"])
def test_selectors_pass_the_segments_tuning(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from sacli.kernels import api, rules

    from sacli.eval_rules import selector

    seen = []
    real = rules.select_segments

    def recording(*args, **kwargs):
        seen.append(kwargs["config"])
        return real(*args, **kwargs)

    monkeypatch.setattr(rules, "select_segments", recording)
    monkeypatch.setattr(api, "select_segments", recording)
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 260, 32), torch.randn(1, 2, 260, 32), torch.randn(1, 2, 260, 32)
    settings = Settings(rule="segments", sampled_levels=2, dense_below=0, sample_ratio=0.1)
    sel = selector(name, settings)(q, k, v, 32**-0.5)
    assert [c.sampled_levels for c in seen] == [2]
    assert sel.segment == 128 and sel.seq_len == 260
