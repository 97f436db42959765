"""On Apple silicon the engine wires the recommended working set while it runs and restores the limit after."""

from __future__ import annotations

import logging

import mlx.core as mx

from apertus_mlx import Engine, residency
from apertus_mlx.load import DEMO_MODEL, load_model


def fake_metal(monkeypatch, working_set: int) -> list[int]:
    limits = [7]  # the limit before: what must come back

    def set_limit(value: int) -> int:
        limits.append(value)
        return limits[-2]

    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": working_set})
    monkeypatch.setattr(mx, "set_wired_limit", set_limit)
    return limits


def test_engine_wires_the_working_set_and_restores_it(monkeypatch):
    limits = fake_metal(monkeypatch, working_set=12 << 30)
    engine = Engine(DEMO_MODEL).wait_ready()
    assert limits == [7, 12 << 30]
    engine.close()
    assert limits == [7, 12 << 30, 7]


def test_a_model_filling_the_working_set_is_warned_about(monkeypatch, caplog):
    model = load_model(DEMO_MODEL)
    fake_metal(monkeypatch, working_set=1 << 20)  # 1 MiB: the demo model's 6.6 MB do not fit
    with caplog.at_level(logging.WARNING, logger="apertus_mlx.residency"):
        assert residency.wire(model) == 7
    assert "nearly fill the GPU's working set" in caplog.text


def test_nothing_is_wired_without_metal(monkeypatch):
    calls = []
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx, "set_wired_limit", calls.append)
    assert residency.wire(load_model(DEMO_MODEL)) is None
    residency.unwire(None)
    assert calls == []
