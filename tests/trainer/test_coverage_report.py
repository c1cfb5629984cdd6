"""The run shows what each source annotates: the start-up log (rank 0) and the run's
config.yaml list source x task x classes covered; config.yaml stays a loadable config."""
import logging

import pytest

from tests.conftest import REPO, demo_source_overrides
from trainer.config import load_config
from trainer.distributed import init_distributed, shutdown_distributed
from trainer.train_loop import Trainer

DEMO = REPO / "configs" / "demo_cpu.yaml"
COVERAGE = [
    "shapes_instances  detection 3/4, instance_mask 3/4",
    "shapes_keypoints  detection 1/4, keypoints 7/7",
    "shapes_semantic   semantic 4/4",
    "shapes_classes    classification 3/3",
]


@pytest.fixture
def single_process_group(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    dist_info = init_distributed(device="cpu")
    try:
        yield dist_info
    finally:
        shutdown_distributed()


def test_coverage_in_the_start_up_log_and_config_yaml(demo_sources, single_process_group, tmp_path, caplog):
    overrides = [*demo_source_overrides(demo_sources), "eval.sources=[]", "eval.best_metric=null",
                 "wandb.mode=disabled", "data.num_workers=0", f"run.dir={tmp_path}"]
    with caplog.at_level(logging.INFO, logger="trainer.train_loop"):
        trainer = Trainer(load_config(DEMO, overrides), single_process_group)
    trainer.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert all(line in logged for line in COVERAGE), logged
    text = (tmp_path / "config.yaml").read_text()
    assert all(f"#   {line}\n" in text for line in COVERAGE), text
    assert load_config(str(tmp_path / "config.yaml"), []) == load_config(DEMO, overrides)
