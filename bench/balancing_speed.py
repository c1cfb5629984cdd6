"""Loss balancing: step time of every balancer on the demo job.

One process (world size 1, gloo), or each rank under torchrun, the demo model and data of
``configs/demo_cpu.yaml``, the same pre-fetched batches and the same initial model, optimizer and LR-schedule state for
every method. Each method runs ``Trainer.train_step`` with ``trainer.balancing`` swapped for
that method (a fresh balancer, and the initial state restored, at the start of every round);
rounds go round-robin over the methods (the order rotated each round) so that machine noise
hits all alike; the median (and the fastest) of the rounds' ms/step is reported.

Ratios are medians ÷ the median of the reference ``equal_balanced``: equal weighting taken
through the balanced path (statistics all-reduced, coefficients computed every step), i.e.
what every dynamic method pays besides its own statistics; the fixed balancers (``static``,
``equal``) take the fixed path, shown beside it. Targets (issue "Speed and quality"):
gradient methods with ``balancer.statistics=features`` ≤ 1.10× (issue 19; was 1.15×), at the
FPN cut ≤ 1.20×, loss-based methods (FAMO, uncertainty, DWA) ≤ 1.03×; other cuts and
whole-trunk ``parameters`` are reported only. One torch thread by default (``--threads``):
see the note at the option. The extra bytes each statistics mode exchanges per step are
printed beside the model's gradient all-reduce.

    .venv/bin/python -m bench.balancing_speed [--steps 4] [--rounds 6] [--methods famo pcgrad ...]
        [--statistics features fpn layer4 parameters]
    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 -m bench.balancing_speed --methods pcgrad
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars in the table's way

import torch  # noqa: E402

from bench.demo_job import DEMO_CONFIG, demo_overrides, single_process_group  # noqa: E402
from data_pipelines.demo.shards import make_demo_shards  # noqa: E402
from data_pipelines.schema import Batch  # noqa: E402
from trainer.balancers import balancer_class, balancer_names, register_balancer  # noqa: E402
from trainer.balancers.static import Equal  # noqa: E402
from models.trunk_cut import CUTS, segment_parameters  # noqa: E402
from trainer.balancing import LossBalancing  # noqa: E402
from trainer.config import BalancerConfig  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.distributed import init_distributed, shutdown_distributed  # noqa: E402
from trainer.train_loop import Trainer  # noqa: E402

REFERENCE = "equal_balanced"


@register_balancer(REFERENCE)
class EqualBalanced(Equal):
    """``equal``'s coefficients through the balanced path: the denominator of the targets."""

    fixed = False


def methods_to_time() -> list[str]:
    """Every registered method except the reference: fixed, then loss-based, then gradient ones."""
    names = [n for n in balancer_names() if n != REFERENCE]
    return sorted(names, key=lambda n: (not balancer_class(n).fixed, balancer_class(n).needs_gram))


def method_configs(methods: list[str], statistics: list[str], grams: list[str] = ("exact",)) -> list[tuple[str, str]]:
    """(method, statistics) pairs to time: every method at ``features`` (the setting is
    irrelevant for the others), gradient methods also at the other ``statistics``, once per
    ``balancer.gram`` in ``grams`` (written ``fpn+sketch``; exact is plain ``fpn``);
    ``static`` and the reference always (the denominators)."""
    known = methods_to_time()
    unknown = sorted(set(methods) - set(known))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; expected some of {known}")
    wanted = {"static", REFERENCE, *methods}
    ordered = [m for m in dict.fromkeys(["static", REFERENCE, *known]) if m in wanted]
    pairs = [(m, "features") for m in ordered]
    pairs += [(m, where if gram == "exact" else f"{where}+{gram}") for where in statistics if where != "features"
              for gram in grams for m in ordered if balancer_class(m).needs_gram]
    return pairs


def speed_target(method: str, mode: str) -> float | None:
    cls = balancer_class(method)
    if method == REFERENCE or cls.fixed:
        return None
    if not cls.needs_gram:
        return 1.03
    return {"features": 1.10, "fpn": 1.20}.get(mode)


def run_speed(args: argparse.Namespace) -> None:
    configs = method_configs(args.methods, args.statistics, args.gram)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = load_config(DEMO_CONFIG, demo_overrides(make_demo_shards(root), root / "run")
                          + ["trainer.max_steps=100000", f"trainer.device={args.device}", *args.set])
        dist_info = (init_distributed(device=args.device) if "WORLD_SIZE" in os.environ
                     else single_process_group(args.device))
        world = dist_info.world_size
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
                weights = cfg.trainer.loss_weights if method == "static" else {}
                where, _, gram = mode.partition("+")
                gradients = balancer_class(method).needs_gram
                balancer = BalancerConfig(name=method, statistics=where if gradients else None, gram=gram or "exact")
                trainer.balancing = LossBalancing(balancer,
                                                  trainer.tasks,
                                                  static_weights=weights, world_size=world)
                synchronize()
                t0 = time.perf_counter()
                for b in steps:
                    trainer.train_step([b])
                synchronize()
                return (time.perf_counter() - t0) / len(steps)

            def synchronize() -> None:  # a GPU step is timed when its kernels are done
                if dist_info.device.type == "cuda":
                    torch.cuda.synchronize(dist_info.device)

            for method, mode in configs:  # warm-up: first-call costs, allocator, solver set-up
                timed_round(method, mode, batches[:2])
            times: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
            for r in range(args.rounds):
                shift = r % len(configs)
                for method, mode in configs[shift:] + configs[:shift]:
                    times[(method, mode)].append(timed_round(method, mode, batches))
                    if dist_info.rank == 0:
                        print(f"round {r + 1}/{args.rounds} {method:14s} {mode:15s} "
                              f"{times[(method, mode)][-1] * 1000:8.1f} ms/step", file=sys.stderr, flush=True)
            traffic = statistics_traffic(trainer, args.statistics, world)
            trainer.close()
        finally:
            shutdown_distributed()
    if dist_info.rank == 0:
        print_speed(times, configs, args, world)
        print_traffic(traffic, world)


def statistics_traffic(trainer: Trainer, where: list[str], world: int) -> dict[str, int]:
    """Bytes each rank sends per step for the gradient statistics (ring collectives:
    all-reduce 2(W-1)/W × size, reduce-scatter (W-1)/W × size), and for the model's own
    gradient all-reduce, the baseline."""
    model = trainer.backend.module
    tasks = len(trainer.tasks)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ring_all_reduce = 2 * (world - 1) / world
    packed = (tasks * tasks + 2 * tasks) * 8  # the one float64 all-reduce every dynamic step has
    out = {"model gradient all-reduce": int(ring_all_reduce * sum(p.numel() * p.element_size() for p in trainable))}
    for w in where:
        shared = (0 if w == "features" else sum(p.numel() for p in (
            segment_parameters(model.backbone, w) if w != "parameters" else model.backbone.parameters())
            if p.requires_grad))
        out[f"statistics={w}, gram=exact"] = int(ring_all_reduce * packed + (world - 1) / world * tasks * shared * 4)
    out["statistics=<cut>, gram=sketch (k=1024)"] = int(ring_all_reduce * (tasks * 1024 + 2 * tasks) * 8)
    return out


def print_traffic(traffic: dict[str, int], world: int) -> None:
    base = traffic["model gradient all-reduce"]
    print(f"\nBytes sent per rank per step (world size {world}; ring collectives):")
    for name, size in traffic.items():
        # One rank sends nothing: no ratio to print.
        ratio = f"{size / base:7.3f} x the gradient all-reduce" if base else ""
        print(f"  {name:40s} {size / 1e6:10.3f} MB  {ratio}")


def print_speed(times: dict[tuple[str, str], list[float]], configs: list[tuple[str, str]],
                args: argparse.Namespace, world: int) -> None:
    median = {c: statistics.median(t) for c, t in times.items()}
    fastest = {c: min(t) for c, t in times.items()}
    ref, static = (REFERENCE, "features"), ("static", "features")
    print(f"\nStep time per method: median (and min, max) over {args.rounds} rounds of {args.steps} steps; same "
          f"batches and initial state; {args.threads} thread(s), world size {world} (gloo).")
    print(f"/ref = median / median of {REFERENCE} (equal weighting through the balanced path): the denominator "
          "of the targets; /ref(min) = the same with the fastest rounds; /static = median / median of the fixed "
          "path (static, the demo's weights).")
    print(f"{'method':14s} {'statistics':15s} {'ms/step':>8s} {'min':>7s} {'max':>7s} {'/ref':>7s} {'/ref(min)':>9s} "
          f"{'/static':>7s} {'target':>7s}  ok")
    for method, mode in configs:
        c = (method, mode)
        ratio = median[c] / median[ref]
        target = speed_target(method, mode)
        verdict = "" if target is None else ("yes" if ratio <= target else "NO")
        target_text = f"<={target:.2f}" if target else ("report" if mode != "features" else "-")
        needs_gram = balancer_class(method).needs_gram
        print(f"{method:14s} {mode if needs_gram else '-':15s} {median[c] * 1000:8.1f} "
              f"{fastest[c] * 1000:7.1f} {max(times[c]) * 1000:7.1f} {ratio:7.3f} {fastest[c] / fastest[ref]:9.3f} "
              f"{median[c] / median[static]:7.3f} {target_text:>7s}  {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # One thread: on a shared, loaded machine two OpenMP threads on two cores stall each other
    # (a descheduled thread holds up every parallel region), which swamps the differences
    # measured here; pass --threads N on a quiet machine.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--steps", type=int, default=4, help="steps per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--methods", nargs="+", default=methods_to_time(), metavar="METHOD")
    parser.add_argument("--statistics", nargs="+", default=["features", "fpn", "parameters"], choices=CUTS,
                        help="where gradient methods take their statistics (balancer.statistics)")
    parser.add_argument("--gram", nargs="+", default=["exact"], choices=["exact", "sketch"],
                        help="balancer.gram at the cuts other than features (sketch: sketch_dim 1024)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides of the demo job, e.g. model.backbone=resnet50 trainer.precision=bf16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_speed(args)


if __name__ == "__main__":
    main()
