"""``polytask report RUN_DIR``: the run's curves as PNG files, without W&B.

From ``metrics.jsonl`` (one row per logged step) and the evaluation summaries
(``eval/step_<N>/summary.json``):

    losses.png        per-task losses (loss/<task>) over steps; when no task's loss weight
                      varies, one line under the plot says so and names the weights
    weights.png       the loss weights / balancer coefficients (weight/<task>) that vary
    cosine_<N>.png    task-gradient cosine similarity at a few steps (balancer/cos/<ti>/<tj>), when logged
    metrics.png       validation metrics (val/...) over the evaluated steps, each panel's
                      y axis fitted to its values (early APs of 0.01 are not drawn as zero)
    confusion_<source>.png  the last evaluation's classification confusion matrix per source

Every figure is ``FIGSIZE`` at ``DPI``: a known pixel size, for papers and for tests.
Legends sit outside the axes, so that they hide no data. A figure with nothing to show
is not written.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

from matplotlib.figure import Figure


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
MARKERS = ("o", "s", "^", "v", "D", "x", "+")
CONSTANT_TOLERANCE = 1e-9  # relative: a weight that moves less than this is constant

log = logging.getLogger(__name__)


def render_report(run_dir: str | Path, *, out_dir: str | Path | None = None) -> list[Path]:
    """Write the figures; returns their paths. Raises FileNotFoundError without metrics.jsonl."""
    run_dir = Path(run_dir)
    rows = read_rows(run_dir / "metrics.jsonl")
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    weight_keys = _keys(rows, "weight/")
    varying = [k for k in weight_keys if not _is_constant(_series(rows, k)[1])]
    constant = [k for k in weight_keys if k not in varying]
    written = [
        _curves(rows, _keys(rows, "loss/"), prefix="loss/", title="per-task loss", path=out / "losses.png",
                log_scale=True, note=_constant_note(rows, constant) if not varying else None),
        _curves(rows, varying, prefix="weight/", title="per-task loss weight", path=out / "weights.png",
                log_scale=False, note=_constant_note(rows, constant)),
        *_cosine_heatmaps(rows, out),
        _metrics(rows + eval_rows(run_dir / "eval"), out / "metrics.png"),
        *_confusion_matrices(run_dir / "eval", out),
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
    # Constrained layout makes room for legends and notes outside the axes at a fixed size.
    return Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    # No bbox_inches="tight": it would change the pixel size per figure.
    fig.savefig(path, dpi=DPI)
    return path


def _keys(rows: list[dict], prefix: str) -> list[str]:
    return _ordered(list(dict.fromkeys(k for r in rows for k in r if k.startswith(prefix))), prefix)


def _is_constant(values: list[float]) -> bool:
    if not values:
        return True
    scale = max(abs(v) for v in values) or 1.0
    return max(values) - min(values) <= CONSTANT_TOLERANCE * scale


def _constant_note(rows: list[dict], keys: list[str]) -> str | None:
    """One line naming the weights that never change, e.g. ``detection 1, semantic 0.5``."""
    if not keys:
        return None
    values = ", ".join(f"{k.split('/', 1)[1]} {_series(rows, k)[1][0]:g}" for k in keys)
    return f"loss weights constant over the run: {values}"


def _curves(
    rows: list[dict], keys: list[str], *, prefix: str, title: str, path: Path, log_scale: bool, note: str | None
) -> Path | None:
    if not keys:
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    for i, key in enumerate(keys):
        steps, values = _series(rows, key)
        # A marker shape per line: a line lying on another still shows its points.
        ax.plot(steps, values, marker=MARKERS[i % len(MARKERS)], markevery=max(1, len(steps) // 20),
                markersize=4, label=key[len(prefix):], linestyle="--" if key.endswith("/total") else "-")
    if log_scale and all(v > 0 for k in keys for v in _series(rows, k)[1]):
        ax.set_yscale("log")
    ax.set(title=title, xlabel="step")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize="small")
    if note:
        fig.text(0.01, 0.005, note, fontsize="small", ha="left", va="bottom", wrap=True)
        fig.get_layout_engine().set(rect=(0, 0.05, 1, 0.95))  # the note's line stays clear of the x label
    return _save(fig, path)


def _ordered(keys: list[str], prefix: str) -> list[str]:
    """Tasks in the order they were logged (model.tasks order), the total after."""
    return sorted(keys, key=lambda k: k == f"{prefix}total")


def _cosine_heatmaps(rows: list[dict], out: Path) -> list[Path]:
    logged = [r for r in rows if any(_COS_KEY.match(k) for k in r)]
    if not logged:
        return []
    picks = sorted({0, len(logged) // 2, len(logged) - 1})[:COSINE_STEPS]
    return [_cosine_heatmap(logged[i], out / f"cosine_{logged[i]['step']}.png") for i in picks]


def _cosine_heatmap(row: dict, path: Path) -> Path:
    pairs = {m.groups(): v for k, v in row.items() if (m := _COS_KEY.match(k))}
    tasks = list(dict.fromkeys(t for pair in pairs for t in pair))  # logged in model.tasks order
    matrix = [[1.0 if a == b else pairs.get((a, b), pairs.get((b, a), math.nan)) for b in tasks] for a in tasks]
    fig = _new_figure()
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    for i, values in enumerate(matrix):
        for j, value in enumerate(values):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="small",
                        color="white" if abs(value) > 0.6 else "black")
    fig.colorbar(image, ax=ax, label="cosine similarity of task gradients")
    ax.set_title(f"task-gradient cosine similarity, step {row['step']}")
    return _save(fig, path)


def _metrics(rows: list[dict], path: Path) -> Path | None:
    # val/<source>/<task>/<name>, grouped per (source, task): one panel each.
    groups: dict[str, list[str]] = {}
    for key in sorted({k for r in rows for k in r if k.startswith("val/")}):
        parts = key.split("/")
        # A classification metric is keyed by its task's name: known by its stat (top1, top5).
        headline = HEADLINE.get(parts[2], HEADLINE["classification"]) if len(parts) == 4 else ()
        if parts[3:] and parts[3] in headline:
            groups.setdefault("/".join(parts[1:3]), []).append(key)
    if not groups:
        return None
    fig = _new_figure()
    cols = min(3, len(groups))
    grid_rows = math.ceil(len(groups) / cols)
    for i, (group, keys) in enumerate(groups.items()):
        ax = fig.add_subplot(grid_rows, cols, i + 1)
        top = 0.0
        for key in keys:
            steps, values = _series(rows, key)
            ax.plot(steps, values, marker="o", markersize=3, label=key.rsplit("/", 1)[1])
            top = max([top, *values])
        ax.set_title(group, fontsize="small")
        ax.set_ylim(*_metric_limits(top))
        ax.grid(alpha=0.3)
        # Below the panel, in one row: inside, it would cover the points of a rising metric.
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(keys), frameon=False)
        ax.tick_params(labelsize="x-small")
    fig.suptitle("validation metrics over steps")
    return _save(fig, path)


def _metric_limits(top: float) -> tuple[float, float]:
    """y limits for metrics in [0, 1]: from 0 to a little above the best value, so that
    an AP of 0.02 is visibly not 0; never above 1 (plus margin)."""
    upper = min(1.0, max(top * 1.15, 0.01))
    return -0.03 * upper, upper * 1.03


def _confusion_matrices(eval_dir: Path, out: Path) -> list[Path]:
    """The last evaluation's classification confusion matrices, one figure per source and
    classification task."""
    summaries = sorted(eval_dir.glob("step_*/summary.json"), key=lambda p: int(p.parent.name.split("_", 1)[1]))
    if not summaries:
        return []
    last = summaries[-1].parent
    written = []
    for path in sorted(last.glob("*_confusion.json")):  # <source>_<classification task>_confusion.json
        data = json.loads(path.read_text())
        source, task = data["source"], data["task"]
        name = source if task == "classification" else f"{source}_{task}"
        written.append(_confusion_matrix(data, source=name, step=last.name, path=out / f"confusion_{name}.png"))
    return written


def _confusion_matrix(data: dict, *, source: str, step: str, path: Path) -> Path:
    classes, matrix = data["classes"], data["matrix"]
    totals = [sum(row) for row in matrix]
    # Colour by the share of each true class, so a rare class reads like a common one.
    shares = [[count / total if total else 0.0 for count in row] for row, total in zip(matrix, totals)]
    fig = _new_figure()
    ax = fig.add_subplot()
    image = ax.imshow(shares, vmin=0.0, vmax=1.0, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted class (top-1)", ylabel="true class")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", fontsize="small",
                    color="white" if shares[i][j] > 0.6 else "black")
    fig.colorbar(image, ax=ax, label="share of the true class's images")
    correct = sum(matrix[i][i] for i in range(len(matrix)))
    ax.set_title(f"{source}: {data['task']} confusion, {step.replace('_', ' ')} "
                 f"(top-1 {correct}/{sum(totals)})")
    return _save(fig, path)
