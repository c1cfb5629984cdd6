"""MetricsLogger with the real wandb client: a W&B failure warns once and metrics.jsonl
keeps every row; the API key never reaches our logs."""
import json
import logging
import time

from trainer.metrics_logger import MetricsLogger, WandbConfig
from trainer.wandb_records import find_run_file, read_history


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "trainer.metrics_logger"]


def test_bad_api_key_warns_once_and_metrics_jsonl_continues(tmp_path, monkeypatch, caplog):
    key = "not-a-real-key"
    monkeypatch.setenv("WANDB_API_KEY", key)
    caplog.set_level(logging.WARNING)
    logger = MetricsLogger(run_dir=tmp_path, cfg=WandbConfig(mode="online"), config={"a": 1}, enabled=True)
    for step in range(1, 6):
        logger.log(step, {"loss/total": 1.0 / step})
    logger.close()
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5]
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "W&B disabled" in warnings[0].getMessage()
    assert key not in caplog.text


def test_wandb_failing_mid_run_warns_once_and_metrics_jsonl_continues(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    logger = MetricsLogger(run_dir=tmp_path, cfg=WandbConfig(mode="offline"), config={}, enabled=True)
    assert logger.wandb_started(timeout=120) and logger._wandb_run is not None
    logger.log(1, {"loss/total": 1.0})
    logger.log(2, {"loss/total": 0.5})  # W&B commits a row with an explicit step when the next one comes
    logger._wandb_run.finish()  # the W&B run dies under us (its service gone): log() now raises
    for step in range(3, 6):
        logger.log(step, {"loss/total": 1.0 / step})
    logger.close()
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5]
    assert len(_warnings(caplog)) == 1
    # what W&B got before it failed is still in its offline file (the last row it got may
    # be lost with the run: seen once in 20 runs on a loaded machine)
    history = [row["_step"] for row in read_history(find_run_file(tmp_path))]
    assert history in ([1], [1, 2]), history


def test_wandb_online_without_a_network_never_holds_up_training(tmp_path, monkeypatch, caplog):
    """W&B starts beside training: rank 0 reaches its first collective at once instead of
    after wandb.init's timeout, and rows logged meanwhile are kept."""
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://10.255.255.1:9")  # unroutable: connects never answer
    caplog.set_level(logging.WARNING)
    started = time.perf_counter()
    logger = MetricsLogger(run_dir=tmp_path, cfg=WandbConfig(mode="online", init_timeout_s=4), config={},
                           enabled=True)
    for step in range(1, 4):
        logger.log(step, {"loss/total": 1.0 / step})
    assert time.perf_counter() - started < 1.5  # not blocked on W&B
    assert logger.run_id and len(logger.run_id) == 8  # known at once, for the first checkpoint
    logger.close()
    assert time.perf_counter() - started < 4 + 30
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3]
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "W&B disabled" in warnings[0].getMessage()


def test_rows_logged_while_wandb_starts_reach_it(tmp_path):
    logger = MetricsLogger(run_dir=tmp_path, cfg=WandbConfig(mode="offline"), config={}, enabled=True)
    for step in range(1, 4):
        logger.log(step, {"loss/total": 1.0 / step})
    logger.close()
    # The W&B service process writes the run file; once (rarely) CI read it before the rows
    # had landed, so give it a few seconds.
    deadline = time.monotonic() + 10
    while True:
        history = read_history(find_run_file(tmp_path))
        if len(history) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [row["_step"] for row in history] == [1, 2, 3]
    assert history[2]["loss/total"] == 1.0 / 3
