"""The benchmark's pipeline efficiency: the end-to-end loop and the model alone timed in turn."""
from __future__ import annotations

import utils.study.rates as rates
from tests.conftest import tiny_config
from utils.device import detect_env


def test_pipeline_efficiency_takes_the_best_of_rounds_taken_in_turn(tmp_path, monkeypatch):
    """Three rounds, each a span of the real training loop then one model-alone measurement; the
    efficiency is the loop's best rate over the model's best (a slow round of either is dropped)."""
    from utils.study.benchmark import synthetic_study

    cfg = tiny_config(tmp_path)
    state, loop, _ = synthetic_study(cfg, detect_env(cfg), batches=1)
    order, spans = [], []
    real_span = rates.training_span

    def span(*args, **kwargs):
        order.append("loop")
        spans.append(real_span(*args, **kwargs))
        return spans[-1]

    monkeypatch.setattr(rates, "training_span", span)
    alone = iter([40.0, 100.0, 70.0])
    result = rates.pipeline_efficiency(state, loop, lambda: order.append("alone") or next(alone), batches=1)
    assert order == ["loop", "alone"] * 3
    best_loop = max(loop.batch_size / (end - start) for start, end in spans)
    assert result["train_tuples_per_s_end_to_end_best"] == best_loop
    assert result["train_tuples_per_s_model_alone"] == 100.0
    assert abs(result["pipeline_efficiency"] - best_loop / 100.0) < 1e-12
