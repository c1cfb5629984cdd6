"""Loss balancing: step time of every method, and quality of the demo task set per method.

``speed``: one process (world size 1, gloo), the demo model and data of
``configs/demo_cpu.yaml``, the same pre-fetched batches and the same initial model,
optimizer and LR-schedule state for every method. Each method runs ``Trainer.train_step``
with ``trainer.balancing`` swapped for that method (a fresh balancer, and the initial state
restored, at the start of every round); rounds go round-robin over the methods (the order
rotated each round) so that machine noise hits all alike; the median (and the fastest) of
the rounds' ms/step is reported. Ratios are medians ÷ the median of balancer ``equal`` run
through the balanced path (``_balanced_step``: what every dynamic method pays besides its
own statistics); ``static`` is the static path (``_static_step``) with equal weights, shown
beside it. Targets (issue "Speed and quality"): gradient methods in ``representation`` mode
≤ 1.15×, FAMO / uncertainty / DWA ≤ 1.03×; ``parameters`` mode is reported only. One torch
thread by default (``--threads``): see the note at the option.

``quality``: per (method, seed), the demo task set trained in-process for ``--steps``
steps (``polytask train`` equivalent: a :class:`Trainer`, ``train()``, ``finish()`` with
its end-of-run evaluation on the demo validation split: all of it by default;
``--eval-images`` takes that many per source, spread evenly over it);
then the per-task validation *loss* of the final model, averaged over the labelled samples
of the same fixed validation batches for every method. Δm relative to equal weighting
(Maninis et al. 2019; Liu et al. 2021):
    Δm = (1/T) Σ_t (-1)^{l_t} (M_t − M_eq,t) / M_eq,t × 100 %,   l_t = 1 when higher is better,
over the per-task validation losses (lower is better) and, separately, over the headline
metrics (bbox AP, segm AP, keypoints AP, semantic mIoU, classification top-1; higher is
better). Negative Δm = better than equal weighting. Each (method, seed) result is written to
``<out>/<method>_<seed>.json`` and skipped when present, so the study can run in pieces; the
table covers every result in ``--out`` with the same ``--steps`` and ``--mode``.

    .venv/bin/python bench/balancing.py speed [--steps 4] [--rounds 6] [--methods equal famo ...]
    .venv/bin/python bench/balancing.py quality [--steps 300] [--seeds 0 1] \\
        [--methods equal gradnorm pcgrad mgda nash_mtl famo] [--out runs/bench_balancing]

In pieces: ``quality --methods equal gradnorm``, then ``--methods pcgrad mgda`` ...; each
prints the table of everything in ``--out`` so far (``equal`` first: it is the reference).
"""
from __future__ import annotations

import argparse
import copy
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipelines.convert import convert_demo  # noqa: E402
from data_pipelines.loader import DataConfig, SourceConfig, build_train_loader  # noqa: E402
from data_pipelines.schema import Batch  # noqa: E402
from data_pipelines.synthetic import generate_demo_data  # noqa: E402
from data_pipelines.transforms import TransformConfig  # noqa: E402
from trainer.balancing import BalancerConfig, LossBalancing  # noqa: E402
from trainer.config import JobConfig, load_config  # noqa: E402
from trainer.distributed import DistInfo, init_distributed, shutdown_distributed  # noqa: E402
from trainer.train_loop import Trainer  # noqa: E402

CONFIG = ROOT / "configs" / "demo_cpu.yaml"
SOURCES = ["shapes_instances", "shapes_keypoints", "shapes_semantic", "shapes_classes"]
LOSS_METHODS = ["uncertainty", "dwa", "famo"]  # loss-based: no gradient statistics
GRADIENT_METHODS = ["gradnorm", "mgda", "pcgrad", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl"]
ALL_METHODS = ["static", "equal", *LOSS_METHODS, *GRADIENT_METHODS]
QUALITY_METHODS = ["equal", "gradnorm", "pcgrad", "mgda", "nash_mtl", "famo"]
# Task -> the headline validation metric it is judged by (higher is better).
HEADLINE = {
    "detection": "val/shapes_instances/bbox/AP",
    "instance_mask": "val/shapes_instances/segm/AP",
    "keypoints": "val/shapes_keypoints/keypoints/AP",
    "semantic": "val/shapes_semantic/semantic/mIoU",
    "classification": "val/shapes_classes/classification/top1",
}


# --- shared set-up ----------------------------------------------------------------------
def make_demo_data(root: Path) -> Path:
    """Generate and convert the demo sources under ``root``; returns the shard root
    (``<shards>/<split>/<source>``). Byte-identical for every call (seed 0)."""
    convert_demo(generate_demo_data(root / "raw", seed=0), root / "shards")
    return root / "shards"


def base_overrides(shards: Path, run_dir: Path) -> list[str]:
    overrides = [f"data.sources.{i}.path={shards / 'train' / s}" for i, s in enumerate(SOURCES)]
    return overrides + [f"run.dir={run_dir}", "wandb.mode=disabled", "data.num_workers=0",
                        "checkpoint.resume=never", "eval.best_metric=null"]


def start_process_group() -> DistInfo:
    """World size 1 on gloo, once per process; every trainer of this process shares it."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(key, None)
    return init_distributed(device="cpu")


def method_configs(methods: list[str]) -> list[tuple[str, str]]:
    """(method, mode) pairs to time: every method in representation mode (the mode is
    irrelevant for the loss-based ones and for the static path), gradient methods also in
    parameters mode."""
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; expected some of {ALL_METHODS}")
    methods = ["static", "equal", *methods]  # the denominators: in every run
    ordered = [m for m in ALL_METHODS if m in methods]
    pairs = [(m, "representation") for m in ordered]
    pairs += [(m, "parameters") for m in ordered if m in GRADIENT_METHODS]
    return pairs


# --- speed ------------------------------------------------------------------------------
def speed_target(method: str, mode: str) -> float | None:
    if method in LOSS_METHODS:
        return 1.03
    if method in GRADIENT_METHODS and mode == "representation":
        return 1.15
    return None


def run_speed(args: argparse.Namespace) -> None:
    configs = method_configs(args.methods)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards = make_demo_data(root)
        overrides = base_overrides(shards, root / "run") + ["trainer.max_steps=100000", "eval.sources=[]"]
        cfg = load_config(CONFIG, overrides)
        dist_info = start_process_group()
        try:
            trainer = Trainer(cfg, dist_info)
            it = iter(trainer.loader)
            batches = [next(it) for _ in range(args.steps)]
            backend = trainer.backend
            initial_model = copy.deepcopy(backend.module.state_dict())
            initial_optim = copy.deepcopy(backend.optimizer.state_dict())
            initial_sched = copy.deepcopy(backend.scheduler.state_dict())

            def timed_round(method: str, mode: str, steps: list[Batch]) -> float:
                """Initial state and a fresh balancer, then ``len(steps)`` train steps: s/step."""
                backend.module.load_state_dict(initial_model)
                backend.optimizer.load_state_dict(copy.deepcopy(initial_optim))
                backend.scheduler.load_state_dict(copy.deepcopy(initial_sched))
                backend.optimizer.zero_grad(set_to_none=True)
                trainer.balancing = LossBalancing(BalancerConfig(name=method, mode=mode), trainer.tasks,
                                                  static_weights=trainer.loss_weights, world_size=1)
                t0 = time.perf_counter()
                for b in steps:
                    trainer.train_step([b])
                return (time.perf_counter() - t0) / len(steps)

            for method, mode in configs:  # warm-up: first-call costs, allocator, solver set-up
                timed_round(method, mode, batches[:2])
            times: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
            for r in range(args.rounds):
                shift = r % len(configs)
                for method, mode in configs[shift:] + configs[:shift]:
                    times[(method, mode)].append(timed_round(method, mode, batches))
                    print(f"round {r + 1}/{args.rounds} {method:12s} {mode:15s} "
                          f"{times[(method, mode)][-1] * 1000:8.1f} ms/step", file=sys.stderr, flush=True)
            trainer.metrics.close()
        finally:
            shutdown_distributed()

    median = {c: statistics.median(t) for c, t in times.items()}
    fastest = {c: min(t) for c, t in times.items()}
    equal, static = ("equal", "representation"), ("static", "representation")
    print(f"\nStep time per method: median (and min, max) over {args.rounds} rounds of {args.steps} steps; same "
          f"batches and initial state; {args.threads} thread(s), world size 1 (gloo).")
    print("/equal = median / median of balancer `equal` through the balanced path (_balanced_step): the "
          "denominator of the targets; /equal(min) = the same with the fastest rounds; /static = median / "
          "median of the static path (_static_step, equal weights).")
    print(f"{'method':12s} {'mode':15s} {'ms/step':>8s} {'min':>7s} {'max':>7s} {'/equal':>7s} {'/equal(min)':>11s} "
          f"{'/static':>7s} {'target':>7s}  ok")
    for method, mode in configs:
        c = (method, mode)
        ratio = median[c] / median[equal]
        target = speed_target(method, mode)
        verdict = "" if target is None else ("yes" if ratio <= target else "NO")
        target_text = f"<={target:.2f}" if target else ("report" if mode == "parameters" else "-")
        print(f"{method:12s} {mode if method in GRADIENT_METHODS else '-':15s} {median[c] * 1000:8.1f} "
              f"{fastest[c] * 1000:7.1f} {max(times[c]) * 1000:7.1f} {ratio:7.3f} {fastest[c] / fastest[equal]:11.3f} "
              f"{median[c] / median[static]:7.3f} {target_text:>7s}  {verdict}")


# --- quality ----------------------------------------------------------------------------
def quality_overrides(shards: Path, run_dir: Path, *, method: str, mode: str, seed: int, steps: int,
                      eval_images: int | None) -> list[str]:
    overrides = base_overrides(shards, run_dir)
    overrides += [f"eval.sources.{i}.path={shards / 'val' / s}" for i, s in enumerate(SOURCES)]
    return overrides + [f"balancer.name={method}", f"balancer.mode={mode}", f"run.seed={seed}",
                        f"data.seed={seed}", f"trainer.max_steps={steps}", f"trainer.log_every={steps}",
                        f"eval.max_images={'null' if eval_images is None else eval_images}",
                        "eval.num_workers=0", "checkpoint.every=0"]


def validation_batches(shards: Path, cfg: JobConfig, trainer: Trainer, *, count: int, batch_size: int
                       ) -> tuple[list[Batch], str]:
    """The first ``count`` batches of a fixed-seed stream over the validation split (no
    flip, plain resize), and a digest of their sample keys (the same for every run)."""
    data_cfg = DataConfig(
        sources=[SourceConfig(path=str(shards / "val" / s)) for s in SOURCES], seed=123, num_workers=0,
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
    cfg = load_config(CONFIG, quality_overrides(shards, run_dir, method=method, mode=mode, seed=seed,
                                                steps=steps, eval_images=eval_images))
    started = time.perf_counter()
    trainer = Trainer(cfg, dist_info)
    trainer.train()
    train_s = time.perf_counter() - started
    summary = trainer.finish()  # end-of-run evaluation happened in train(); closes the logger
    batches, digest = validation_batches(shards, cfg, trainer, count=val_count, batch_size=val_batch_size)
    val_loss = validation_losses(trainer, batches)
    metrics = {k: v for k, v in trainer._last_eval.items() if k != "step"}
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
    methods = [m for m in ALL_METHODS if m in results] + sorted(set(results) - set(ALL_METHODS))
    seeds_eq = sorted(results["equal"])
    digests = {r["val_batches"]["keys_sha256"] for per in results.values() for r in per.values()}
    print(f"\nQuality after {steps} steps (balancer.mode={mode}), mean ± std over seeds; Δm vs equal "
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
    unknown = sorted(set(args.methods) - set(ALL_METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; expected some of {ALL_METHODS}")
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
            shards = make_demo_data(root)
            dist_info = start_process_group()
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
    suffix = "" if args.mode == "representation" else f"_{args.mode}"
    return out / f"{method}_{seed}{suffix}.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # One thread: on a shared, loaded machine two OpenMP threads on two cores stall each other
    # (a descheduled thread holds up every parallel region), which swamps the differences
    # measured here; pass --threads N on a quiet machine.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    sub = parser.add_subparsers(dest="command", required=True)
    speed = sub.add_parser("speed", help="step time of each method vs equal weighting")
    speed.add_argument("--steps", type=int, default=4, help="steps per round")
    speed.add_argument("--rounds", type=int, default=6)
    speed.add_argument("--methods", nargs="+", default=ALL_METHODS, metavar="METHOD")
    quality = sub.add_parser("quality", help="per-task validation loss / metrics and Δm vs equal")
    quality.add_argument("--steps", type=int, default=300, help="training steps (the demo's own length: 300)")
    quality.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    quality.add_argument("--methods", nargs="+", default=QUALITY_METHODS, metavar="METHOD")
    quality.add_argument("--mode", choices=["representation", "parameters"], default="representation")
    quality.add_argument("--out", default="runs/bench_balancing")
    quality.add_argument("--eval-images", type=int, default=None,
                         help="eval.max_images per source (default: all)")
    quality.add_argument("--val-batches", type=int, default=10, help="validation batches for the losses")
    quality.add_argument("--val-batch-size", type=int, default=8)
    quality.add_argument("--metric-floor", type=float, default=0.02,
                         help="leave a metric out of Δm when equal weighting scores <= this (relative noise)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "speed":
        run_speed(args)
    else:
        run_quality(args)


if __name__ == "__main__":
    main()
