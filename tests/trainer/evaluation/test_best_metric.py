import pytest

from data_pipelines.streaming.config import SourceConfig
from trainer.evaluation.best_metric import BestMetricTracker
from trainer.evaluation.config import EvalConfig

KEY = "val/src/bbox/AP"


def _cfg(mode: str) -> EvalConfig:
    return EvalConfig(sources=[SourceConfig(path="unused")], best_metric=KEY, best_mode=mode)


@pytest.mark.parametrize("mode, values, expected", [("max", [0.2, 0.5, 0.4], [True, True, False]),
                                                    ("min", [0.2, 0.5, 0.1], [True, False, True])])
def test_best_step_follows_the_mode_and_survives_a_restart(tmp_path, mode, values, expected):
    tracker = BestMetricTracker(_cfg(mode), run_dir=tmp_path, is_main=True)
    assert [tracker.update(step, {KEY: v}) for step, v in zip((10, 20, 30), values)] == expected
    best_step = 20 if mode == "max" else 30
    assert tracker.best_step == best_step
    assert BestMetricTracker(_cfg(mode), run_dir=tmp_path, is_main=True).best_step == best_step


def test_unknown_metric_names_the_known_ones(tmp_path):
    tracker = BestMetricTracker(_cfg("max"), run_dir=tmp_path, is_main=True)
    with pytest.raises(KeyError, match="val/src/segm/AP"):
        tracker.update(1, {"val/src/segm/AP": 0.3})
