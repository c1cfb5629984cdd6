"""``polytask report RUN_DIR``: the run's curves as PNG files, without W&B.

From ``metrics.jsonl`` (one row per logged step) and the evaluation summaries
(``eval/step_<N>/summary.json``):

    losses.png        per-task losses (loss/<task>) over steps
    weights.png       per-task loss weights / balancer coefficients (weight/<task>)
    cosine_<N>.png    task-gradient cosine similarity at a few steps (balancer/cos/<ti>/<tj>), when logged
    metrics.png       validation metrics (val/...) over the evaluated steps

Every figure is ``FIGSIZE`` at ``DPI``: a known pixel size, for papers and for tests.
A figure with nothing to show is not written.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from matplotlib.figure import Figure

from data_pipelines.schema import TASKS

FIGSIZE = (8.0, 5.0)  # inches
DPI = 100  # -> 800 x 500 pixels
COSINE_STEPS = 3  # heatmaps at the first, middle and last step that logged cosines
# Headline metrics per evaluated task in metrics.png; summaries hold all of them.
HEADLINE = {
    "bbox": ("AP", "AP50", "AP75"),
    "segm": ("AP", "AP50", "AP75"),
    "keypoints": ("AP", "AP50", "AP75"),
    "semantic": ("mIoU", "pixel_acc"),
    "classification": ("top1", "top5"),
}
_COS_KEY = re.compile(r"^balancer/cos/([^/]+)/([^/]+)$")

log = logging.getLogger(__name__)


def render_report(run_dir: str | Path, *, out_dir: str | Path | None = None) -> list[Path]:
    """Write the figures; returns their paths. Raises FileNotFoundError without metrics.jsonl."""
    run_dir = Path(run_dir)
    rows = read_rows(run_dir / "metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _curves(rows, prefix="loss/", title="per-task loss", path=out / "losses.png", log_scale=True),
        _curves(rows, prefix="weight/", title="per-task loss weight", path=out / "weights.png", log_scale=False),
        *_cosine_heatmaps(rows, out),
        _metrics(rows + eval_rows(run_dir / "eval"), out / "metrics.png"),
    ]
    return [p for p in written if p is not None]


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is this a run directory?)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a torn last line (and a resumed run appends after
            # it); the rows around it are whole.
            log.warning("%s:%d: skipped a torn line (not valid JSON): %.60r", path, number, line)
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        else:
            log.warning("%s:%d: skipped a line that is not a metrics row: %.60r", path, number, line)
    return rows


def eval_rows(eval_dir: Path) -> list[dict]:
    """One row per evaluation summary: ``{"step": N, "val/...": value}``."""
    rows = []
    for path in sorted(eval_dir.glob("step_*/summary.json")):
        summary = json.loads(path.read_text())
        if summary.get("step") is not None:
            rows.append({"step": summary["step"], **summary["metrics"]})
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = sorted({r["step"]: r[key] for r in rows if key in r}.items())
    return [s for s, _ in points], [v for _, v in points]


def _new_figure() -> Figure:
    return Figure(figsize=FIGSIZE, dpi=DPI)


def _save(fig: Figure, path: Path) -> Path:
    # No bbox_inches="tight": it would change the pixel size per figure.
    fig.savefig(path, dpi=DPI)
    return path


def _curves(rows: list[dict], *, prefix: str, title: str, path: Path, log_scale: bool) -> Path | None:
    keys = _ordered(sorted({k for r in rows for k in r if k.startswith(prefix)}), prefix)
    if not keys:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    for key in keys:
        steps, values = _series(rows, key)
        ax.plot(steps, values, marker="." if len(steps) < 20 else None, label=key[len(prefix):],
                linestyle="--" if key.endswith("/total") else "-")
    if log_scale and all(v > 0 for k in keys for v in _series(rows, k)[1]):
        ax.set_yscale("log")
    ax.set(title=title, xlabel="step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)


def _ordered(keys: list[str], prefix: str) -> list[str]:
    """Tasks in TASKS order, anything else (loss/total) after."""
    rank = {f"{prefix}{t}": i for i, t in enumerate(TASKS)}
    return sorted(keys, key=lambda k: (rank.get(k, len(TASKS)), k))


def _cosine_heatmaps(rows: list[dict], out: Path) -> list[Path]:
    logged = [r for r in rows if any(_COS_KEY.match(k) for k in r)]
    if not logged:
        return []
    picks = sorted({0, len(logged) // 2, len(logged) - 1})[:COSINE_STEPS]
    return [_cosine_heatmap(logged[i], out / f"cosine_{logged[i]['step']}.png") for i in picks]


def _cosine_heatmap(row: dict, path: Path) -> Path:
    pairs = {m.groups(): v for k, v in row.items() if (m := _COS_KEY.match(k))}
    names = {t for pair in pairs for t in pair}
    tasks = [t for t in TASKS if t in names] + sorted(names - set(TASKS))
    matrix = [[1.0 if a == b else pairs.get((a, b), pairs.get((b, a), math.nan)) for b in tasks] for a in tasks]
    fig = _new_figure()
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    for i, values in enumerate(matrix):
        for j, value in enumerate(values):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small")
    fig.colorbar(image, ax=ax, label="cosine similarity of task gradients")
    ax.set_title(f"task-gradient cosine similarity, step {row['step']}")
    fig.tight_layout()
    return _save(fig, path)


def _metrics(rows: list[dict], path: Path) -> Path | None:
    # val/<source>/<task>/<name>, grouped per (source, task): one panel each.
    groups: dict[str, list[str]] = {}
    for key in sorted({k for r in rows for k in r if k.startswith("val/")}):
        parts = key.split("/")
        if len(parts) == 4 and parts[3] in HEADLINE.get(parts[2], ()):
            groups.setdefault("/".join(parts[1:3]), []).append(key)
    if not groups:
        return None
    fig = _new_figure()
    cols = min(3, len(groups))
    grid_rows = math.ceil(len(groups) / cols)
    for i, (group, keys) in enumerate(groups.items()):
        ax = fig.add_subplot(grid_rows, cols, i + 1)
        for key in keys:
            steps, values = _series(rows, key)
            ax.plot(steps, values, marker="o", label=key.rsplit("/", 1)[1])
        ax.set_title(group, fontsize="small")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
        ax.tick_params(labelsize="x-small")
    fig.suptitle("validation metrics over steps")
    fig.tight_layout()
    return _save(fig, path)
