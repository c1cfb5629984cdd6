"""Loss balancing: quality of the demo task set per balancer, as Δm vs equal weighting.

Per (method, seed), the demo task set trained in-process for ``--steps`` steps (``polytask
train`` equivalent: a :class:`Trainer`, ``train()``, ``finish()`` with its end-of-run
evaluation on the demo validation split: all of it by default; ``--eval-images`` takes that
many per source, spread evenly over it); then the per-task validation *loss* of the final
model, averaged over the labelled samples of the same fixed validation batches for every
method. Δm relative to equal weighting (Maninis et al. 2019; Liu et al. 2021):
    Δm = (1/T) Σ_t (-1)^{l_t} (M_t − M_eq,t) / M_eq,t × 100 %,   l_t = 1 when higher is better,
over the per-task validation losses (lower is better) and, separately, over the headline
metrics (bbox AP, segm AP, keypoints AP, semantic mIoU, classification top-1; higher is
better). Negative Δm = better than equal weighting. Each (method, seed) result is written to
``<out>/<method>_<seed>.json`` and skipped when present, so the study can run in pieces; the
table covers every result in ``--out`` with the same ``--steps`` and ``--mode``.

    .venv/bin/python -m bench.balancing_quality [--steps 300] [--seeds 0 1] \\
        [--methods equal gradnorm pcgrad mgda nash_mtl famo] [--out runs/bench_balancing]

In pieces: ``--methods equal gradnorm``, then ``--methods pcgrad mgda`` ...; each prints the
table of everything in ``--out`` so far (``equal`` first: it is the reference).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars in the tables' way

import torch  # noqa: E402

from bench.demo_job import DEMO_CONFIG, demo_overrides, single_process_group  # noqa: E402
from data_pipelines.demo.shards import demo_source_paths, make_demo_shards  # noqa: E402
from data_pipelines.schema import Batch  # noqa: E402
from data_pipelines.streaming.loader import build_train_loader  # noqa: E402
from data_pipelines.streaming.config import DataConfig, SourceConfig  # noqa: E402
from data_pipelines.streaming.config import TransformConfig  # noqa: E402
from trainer.balancers import balancer_class, balancer_names  # noqa: E402
from models.trunk_cut import CUTS  # noqa: E402
from trainer.config import JobConfig, load_config  # noqa: E402
from trainer.distributed import DistInfo, shutdown_distributed  # noqa: E402
from trainer.train_loop import Trainer  # noqa: E402

QUALITY_METHODS = ["equal", "gradnorm", "pcgrad", "mgda", "nash_mtl", "famo"]
# Task -> the headline validation metric it is judged by (higher is better).
HEADLINE = {
    "detection": "val/shapes_instances/bbox/AP",
    "instance_mask": "val/shapes_instances/segm/AP",
    "keypoints": "val/shapes_keypoints/keypoints/AP",
    "semantic": "val/shapes_semantic/semantic/mIoU",
    "classification": "val/shapes_classes/classification/top1",
}


def quality_overrides(shards: Path, run_dir: Path, *, method: str, mode: str, seed: int, steps: int,
                      eval_images: int | None) -> list[str]:
    # A mode is an error for a method without gradient statistics (it would be ignored).
    mode_override = [f"balancer.statistics={mode}"] if balancer_class(method).needs_gram else []
    return demo_overrides(shards, run_dir, evaluate=True) + [
        f"balancer.name={method}", *mode_override, f"run.seed={seed}", f"data.seed={seed}",
        f"trainer.max_steps={steps}", f"trainer.log_every={steps}",
        f"eval.max_images={'null' if eval_images is None else eval_images}", "eval.num_workers=0",
        "checkpoint.every=0"]


def validation_batches(shards: Path, cfg: JobConfig, trainer: Trainer, *, count: int, batch_size: int
                       ) -> tuple[list[Batch], str]:
    """The first ``count`` batches of a fixed-seed stream over the validation split (no
    flip, plain resize), and a digest of their sample keys (the same for every run)."""
    data_cfg = DataConfig(
        sources=[SourceConfig(path=p) for p in demo_source_paths(shards, split="val")], seed=123, num_workers=0,
        batch_size=batch_size, transforms=TransformConfig(image_size=cfg.data.transforms.image_size, hflip_prob=0.0),
    )
    loader, label_space, _ = build_train_loader(data_cfg, rank=0, world_size=1)
    if label_space != trainer.label_space:
        raise RuntimeError("the validation split's label space differs from the training one")
    it = iter(loader)
    batches = [next(it) for _ in range(count)]
    digest = hashlib.sha256("\n".join(k for b in batches for k in b.keys).encode()).hexdigest()[:16]
    return batches, digest


def validation_losses(trainer: Trainer, batches: list[Batch]) -> dict[str, float]:
    """Per task: the model's loss averaged over every labelled sample of ``batches``."""
    model = trainer.backend.module
    sums = {t: 0.0 for t in trainer.tasks}
    counts = {t: 0 for t in trainer.tasks}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                out = model(batch.to(trainer.device))
                for t in trainer.tasks:
                    n = int(out.counts[t])
                    if n > 0:
                        sums[t] += float(out.losses[t]) * n
                        counts[t] += n
    finally:
        model.train(was_training)
    return {t: sums[t] / counts[t] for t in trainer.tasks if counts[t] > 0}


def train_one(shards: Path, tmp: Path, dist_info: DistInfo, *, method: str, mode: str, seed: int, steps: int,
              eval_images: int | None, val_count: int, val_batch_size: int) -> dict[str, Any]:
    run_dir = tmp / f"{method}_{seed}"
    cfg = load_config(DEMO_CONFIG, quality_overrides(shards, run_dir, method=method, mode=mode, seed=seed,
                                                steps=steps, eval_images=eval_images))
    started = time.perf_counter()
    trainer = Trainer(cfg, dist_info)
    trainer.train()
    train_s = time.perf_counter() - started
    summary = trainer.finish()  # its "eval": the end-of-run evaluation of train(); closes the logger
    batches, digest = validation_batches(shards, cfg, trainer, count=val_count, batch_size=val_batch_size)
    val_loss = validation_losses(trainer, batches)
    metrics = {k: v for k, v in summary["eval"].items() if k != "step"}
    return {
        "method": method, "mode": mode, "seed": seed, "steps": trainer.step, "eval_max_images": eval_images,
        "val_loss": val_loss, "val_batches": {"count": val_count, "batch_size": val_batch_size, "keys_sha256": digest},
        "metrics": {task: metrics.get(key) for task, key in HEADLINE.items()},
        "eval": metrics, "train_losses": summary["losses"], "seconds": time.perf_counter() - started,
        "train_seconds": train_s,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def delta_m(values: dict[str, float | None], reference: dict[str, float | None], *, higher_is_better: bool,
            floor: float = 0.0) -> tuple[float, list[str]]:
    """Δm in % over the tasks both have whose reference is above ``floor`` (a relative change
    from a reference near 0 is noise: AP 0.001 -> 0.004 would count as +300 %); and those tasks."""
    terms, used = [], []
    for task, ref in reference.items():
        value = values.get(task)
        if value is None or ref is None or not math.isfinite(ref) or abs(ref) <= floor:
            continue
        sign = -1.0 if higher_is_better else 1.0
        terms.append(sign * (value - ref) / abs(ref))
        used.append(task)
    return (100.0 * statistics.fmean(terms) if terms else float("nan")), used


def load_results(out: Path, *, steps: int, mode: str, eval_images: int | None) -> dict[str, dict[int, dict[str, Any]]]:
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for path in sorted(out.glob("*.json")):
        r = json.loads(path.read_text())
        if (r.get("steps"), r.get("mode"), r.get("eval_max_images")) == (steps, mode, eval_images):
            results.setdefault(r["method"], {})[int(r["seed"])] = r
    return results


def print_quality(results: dict[str, dict[int, dict[str, Any]]], tasks: list[str], *, steps: int, mode: str,
                  metric_floor: float) -> None:
    if "equal" not in results:
        print("no `equal` results yet: nothing to compare against")
        return
    known = list(dict.fromkeys(["equal", *balancer_names()]))  # the reference first
    methods = [m for m in known if m in results] + sorted(set(results) - set(known))
    seeds_eq = sorted(results["equal"])
    digests = {r["val_batches"]["keys_sha256"] for per in results.values() for r in per.values()}
    print(f"\nQuality after {steps} steps (balancer.statistics={mode}), mean ± std over seeds; Δm vs equal "
          f"weighting in % (negative = better), from the seed means; per-seed Δm (paired seeds) in [].")
    print(f"Validation batches: {'identical for every run' if len(digests) == 1 else 'DIFFER: ' + str(digests)}.")
    short = {"detection": "det", "instance_mask": "mask", "keypoints": "kpt", "semantic": "sem",
             "classification": "cls"}

    def table(kind: str, higher: bool, fmt: str, floor: float) -> None:
        head = " ".join(f"{short.get(t, t):>15s}" for t in tasks)
        print(f"{'method':12s} {'seeds':>6s} {head}  {'Δm %':>7s}  per-seed Δm")
        means_eq = {}
        for t in tasks:
            ref = [results["equal"][s][kind][t] for s in seeds_eq if results["equal"][s][kind].get(t) is not None]
            if ref:
                means_eq[t] = statistics.fmean(ref)
        for m in methods:
            per = results[m]
            cells, means = [], {}
            for t in tasks:
                vals = [r[kind][t] for r in per.values() if r[kind].get(t) is not None]
                if vals:
                    mu, sd = mean_std(vals)
                    means[t] = mu
                    cells.append(f"{mu:{fmt}}±{sd:<{fmt}}".rstrip().rjust(15))
                else:
                    cells.append(f"{'-':>15s}")
            dm, used = delta_m(means, means_eq, higher_is_better=higher, floor=floor)
            # per seed: over the same tasks as the mean's Δm, the floor applied to that seed's reference
            paired = [delta_m({t: per[s][kind].get(t) for t in used},
                              {t: results["equal"][s][kind].get(t) for t in used}, higher_is_better=higher,
                              floor=floor)[0]
                      for s in sorted(per) if s in results["equal"]]
            note = "" if len(used) == len(tasks) else f" (over {', '.join(short.get(t, t) for t in used) or 'no task'})"
            print(f"{m:12s} {','.join(map(str, sorted(per))):>6s} {' '.join(cells)}  {dm:+7.2f}  "
                  f"[{', '.join(f'{d:+.1f}' for d in paired)}]{note}")

    print("\nval_loss (lower is better): per-task loss of the final model over the labelled samples of the fixed "
          "validation batches")
    table("val_loss", False, ".3f", 0.0)
    images = next(iter(next(iter(results.values())).values())).get("eval_max_images")
    print(f"\nmetrics (higher is better): end-of-run evaluation on {'all' if images is None else f'the first {images}'} validation "
          f"images per source; a task whose equal-weighting score is <= {metric_floor} is left out of Δm "
          f"(of the seed mean, and per seed)")
    table("metrics", True, ".3f", metric_floor)
    print("\ncolumns: " + ", ".join(f"{short[t]} = {HEADLINE[t]}" for t in tasks if t in HEADLINE))
    seconds = {m: statistics.fmean(r["train_seconds"] / max(r["steps"], 1) for r in per.values())
               for m, per in results.items()}
    print("wall s/step of train() incl. data, end-of-run eval and checkpoint (loaded machine): "
          + ", ".join(f"{m} {seconds[m]:.2f}" for m in methods))


def run_quality(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(args.methods) - set(balancer_names()))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; expected some of {balancer_names()}")
    todo = []
    for m in args.methods:
        for s in args.seeds:
            path = _result_path(out, m, s, args)
            if not path.exists():
                todo.append((m, s))
            else:
                done = json.loads(path.read_text())
                if (done.get("steps"), done.get("eval_max_images")) != (args.steps, args.eval_images):
                    raise SystemExit(f"{path} holds a run of another --steps or --eval-images: use another --out")
    for m in args.methods:
        for s in args.seeds:
            if (m, s) not in todo:
                print(f"{m} seed {s}: present in {out}, skipped", file=sys.stderr)
    tasks = list(HEADLINE)
    if todo:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            shards = make_demo_shards(root)
            dist_info = single_process_group()
            try:
                for method, seed in todo:
                    print(f"{method} seed {seed}: training {args.steps} steps ...", file=sys.stderr, flush=True)
                    result = train_one(shards, root, dist_info, method=method, mode=args.mode, seed=seed,
                                       steps=args.steps, eval_images=args.eval_images, val_count=args.val_batches,
                                       val_batch_size=args.val_batch_size)
                    path = _result_path(out, method, seed, args)
                    path.with_suffix(".tmp").write_text(json.dumps(result, indent=2))
                    path.with_suffix(".tmp").replace(path)  # complete or absent
                    print(f"{method} seed {seed}: {result['seconds']:.0f} s, val loss "
                          + ", ".join(f"{t} {v:.3f}" for t, v in result["val_loss"].items()),
                          file=sys.stderr, flush=True)
                    tasks = list(result["val_loss"])
            finally:
                shutdown_distributed()
    print_quality(load_results(out, steps=args.steps, mode=args.mode, eval_images=args.eval_images), tasks,
                  steps=args.steps, mode=args.mode, metric_floor=args.metric_floor)


def _result_path(out: Path, method: str, seed: int, args: argparse.Namespace) -> Path:
    # <method>_<seed>.json for the default mode; parameters mode gets a suffix, so the two never mix.
    suffix = "" if args.mode == "features" else f"_{args.mode}"
    return out / f"{method}_{seed}{suffix}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # One thread: on a shared, loaded machine two OpenMP threads on two cores stall each other
    # (a descheduled thread holds up every parallel region); pass --threads N on a quiet machine.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=300, help="training steps (the demo's own length: 300)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=QUALITY_METHODS, metavar="METHOD")
    parser.add_argument("--mode", choices=list(CUTS), default="features",
                        help="balancer.statistics of the gradient methods")
    parser.add_argument("--out", default="runs/bench_balancing")
    parser.add_argument("--eval-images", type=int, default=None, help="eval.max_images per source (default: all)")
    parser.add_argument("--val-batches", type=int, default=10, help="validation batches for the losses")
    parser.add_argument("--val-batch-size", type=int, default=8)
    parser.add_argument("--metric-floor", type=float, default=0.02,
                        help="leave a metric out of Δm when equal weighting scores <= this (relative noise)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_quality(args)


if __name__ == "__main__":
    main()
