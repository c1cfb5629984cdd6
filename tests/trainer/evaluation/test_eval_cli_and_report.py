"""A real 2-step training run on the tiny sources, `polytask eval` on its checkpoint, then
`polytask report` on the run directory."""
import json

import pytest
from PIL import Image, ImageStat

from launcher.cli import main as polytask
from tests.conftest import run_polytask, sources_list
from tests.trainer.evaluation.tiny_sources import SOURCES
from launcher.report import DPI, FIGSIZE, _metric_limits, render_report

STEPS = 2
PNG_SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    sources = sources_list(tiny.paths[name] for name in SOURCES)
    overrides = [
        f"run.dir={run_dir}", f"data.sources={sources}", f"eval.sources={sources}", "eval.num_workers=0",
        "data.num_workers=0", "data.transforms.image_size=64", f"trainer.max_steps={STEPS}", "trainer.log_every=1",
        "wandb.mode=disabled", "checkpoint.resume=never", "eval.best_metric=val/tiny_instances/bbox/AP",
    ]
    proc = run_polytask("train", "configs/demo_cpu.yaml", *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    checkpoint = str(run_dir / "checkpoints" / "latest")
    proc = run_polytask("eval", "configs/demo_cpu.yaml", "--checkpoint", checkpoint, *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return run_dir, json.loads(proc.stdout)


def test_eval_writes_summary_and_results_for_the_checkpoint_step(run):
    run_dir, printed = run
    out = run_dir / "eval" / f"step_{STEPS}"
    summary = json.loads((out / "summary.json").read_text())
    assert printed == {"step": STEPS, **summary["metrics"]}
    for key in ("val/tiny_instances/segm/AP", "val/tiny_people/keypoints/AP", "val/tiny_classes/classification/top1"):
        assert 0.0 <= summary["metrics"][key] <= 1.0
    assert (out / "tiny_instances_bbox_results.json").is_file()


def test_report_renders_pngs_of_the_expected_size(run, capsys):
    run_dir, _ = run
    assert polytask(["report", str(run_dir)]) == 0
    written = capsys.readouterr().out.split()
    names = {p.rsplit("/", 1)[1] for p in written}
    # Static loss weights: no weights.png (losses.png says they are constant); the classification
    # source's confusion matrix from the last evaluation.
    assert {"losses.png", "metrics.png", "confusion_tiny_classes.png"} <= names
    assert "weights.png" not in names
    assert all(n.startswith("cosine_") for n in names - {"losses.png", "metrics.png", "confusion_tiny_classes.png"})
    for path in written:
        with Image.open(path) as image:
            assert image.size == PNG_SIZE
            # Not blank: a plot has many grey levels, a blank canvas one.
            assert len(image.convert("L").getcolors(maxcolors=256 * 256)) > 10
            assert ImageStat.Stat(image.convert("L")).stddev[0] > 5


def test_report_draws_cosine_heatmaps_when_logged(tmp_path):
    rows = [
        {"step": step, "loss/detection": 1.0 / step, "weight/detection": 1.0,
         "balancer/cos/detection/semantic": 0.1 * step, "balancer/cos/detection/classification": -0.2,
         "balancer/cos/semantic/classification": 0.5}
        for step in (10, 20, 30, 40)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert polytask(["report", str(tmp_path), "--out", str(tmp_path / "figs")]) == 0
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["cosine_10.png", "cosine_30.png", "cosine_40.png", "losses.png"]
    with Image.open(tmp_path / "figs" / "cosine_30.png") as image:
        assert image.size == PNG_SIZE


def test_report_skips_a_torn_last_line_with_a_warning(tmp_path, caplog):
    # A run killed mid-write: the last metrics line stops half way.
    rows = [{"step": step, "loss/detection": 1.0 / step, "weight/detection": 1.0} for step in (10, 20, 30)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"step": 40, "loss/detection": 0.2})[:17]
    (tmp_path / "metrics.jsonl").write_text(text)
    assert polytask(["report", str(tmp_path), "--out", str(tmp_path / "figs")]) == 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["losses.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"{tmp_path / 'metrics.jsonl'}:4: skipped a torn line" in warnings[0], warnings


def test_report_plots_weights_only_when_they_vary(tmp_path):
    def report(weights):
        run = tmp_path / str(len(list(tmp_path.iterdir())))
        run.mkdir()
        rows = [{"step": s, "loss/detection": 1.0 / s, **{f"weight/{t}": w(s) for t, w in weights.items()}}
                for s in (10, 20, 30)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return sorted(p.name for p in render_report(run))

    assert report({"detection": lambda s: 1.0, "semantic": lambda s: 0.5}) == ["losses.png"]
    assert report({"detection": lambda s: 1.0, "semantic": lambda s: 1.0 / s}) == ["losses.png", "weights.png"]


def test_metric_axes_fit_small_values():
    # An AP of 0.02 must fill a visible part of its panel, not lie on the zero line of a 0-1 axis.
    low, high = _metric_limits(0.02)
    assert low < 0 < 0.02 / high > 0.8
    assert _metric_limits(0.9)[1] <= 1.05
    assert _metric_limits(0.0)[1] > 0  # all zeros: still an axis
