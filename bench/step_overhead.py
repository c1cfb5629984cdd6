"""Trainer step time vs a bare PyTorch loop: same model, batches and optimizer.

Both run the same optimisation recipe: (DDP-wrapped when there are several ranks) model
-> losses -> backward -> gradient clipping (``optim.grad_clip``) -> AdamW step -> LR
schedule; the bare loop sums the losses as they come. What the trainer adds is its own
machinery: the per-task global normalisation (an all-reduce of a [T] tensor overlapped
with the forward), masks, per-step loss bookkeeping, the backend indirection. Rounds alternate between the two so that
machine noise hits both alike; the ratio of medians is printed by rank 0.

    .venv/bin/python -m bench.step_overhead [--steps 20] [--rounds 5]        # one process
    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 -m bench.step_overhead --threads 1
    python -m bench.step_overhead --device cuda --precision bf16            # one GPU, NCCL
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from bench.demo_job import DEMO_CONFIG, demo_overrides
from data_pipelines.demo.shards import make_demo_shards
from models import build_model
from trainer.backends.ddp import forward_buffer_sync
from trainer.config import load_config
from trainer.distributed import init_distributed, shutdown_distributed
from trainer.optim import build_optimizer, build_scheduler
from trainer.rng_state import seed_everything
from trainer.train_loop import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bare-sync-buffers", choices=["on", "off"], default="on",
                        help="the bare loop's DDP forward_sync_buffers (on: DDP's default; the trainer turns it off)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: both loops run their forward under bf16 autocast")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides for both loops, e.g. data.batch_size=16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # Every rank makes the same demo data in its own directory (deterministic, seconds).
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        overrides = demo_overrides(make_demo_shards(root), root / "run") + [
            "trainer.max_steps=100000", f"trainer.device={args.device}", f"trainer.precision={args.precision}",
            *args.set]
        cfg = load_config(DEMO_CONFIG, overrides)

        dist_info = init_distributed(device=args.device)
        device = dist_info.device
        trainer = Trainer(cfg, dist_info)
        it = iter(trainer.loader)
        batches = [next(it).to(device) for _ in range(args.steps)]

        seed_everything(0)
        bare = build_model(cfg.model, num_classes=trainer.label_space.num_classes(), tasks=trainer.label_space.tasks)
        bare.load_state_dict(trainer.backend.module.state_dict())
        bare.to(device)
        bare_opt = build_optimizer(bare, cfg.optim)
        bare_sched = build_scheduler(bare_opt, cfg.optim, max_steps=cfg.trainer.max_steps)
        if dist_info.world_size > 1:
            bare = DistributedDataParallel(bare, device_ids=[device.index] if device.type == "cuda" else None,
                                           **forward_buffer_sync(args.bare_sync_buffers == "on"))
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" \
            else contextlib.nullcontext

        def synchronize() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        def bare_round() -> float:
            synchronize()
            t0 = time.perf_counter()
            for b in batches:
                with autocast():
                    losses = bare(b).losses
                total = sum(losses.values())
                bare_opt.zero_grad(set_to_none=True)
                total.backward()
                if cfg.optim.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(bare.parameters(), cfg.optim.grad_clip)
                bare_opt.step()
                bare_sched.step()
            synchronize()
            return (time.perf_counter() - t0) / len(batches)

        def trainer_round() -> float:
            synchronize()
            t0 = time.perf_counter()
            for b in batches:
                trainer.train_step([b])
            synchronize()
            return (time.perf_counter() - t0) / len(batches)

        bare_round(), trainer_round()  # warm-up: allocator, first-call costs
        bare_t, trainer_t = [], []
        for r in range(args.rounds):
            # ABBA order: whichever runs second in a round finds the other's memory in the caches
            if r % 2 == 0:
                bare_t.append(bare_round())
                trainer_t.append(trainer_round())
            else:
                trainer_t.append(trainer_round())
                bare_t.append(bare_round())
        trainer.close()
        shutdown_distributed()

    if dist_info.rank != 0:
        return
    b, t = statistics.median(bare_t), statistics.median(trainer_t)
    print(f"world size {dist_info.world_size}, {device.type} {args.precision}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''};"
          f" bare loop DDP forward_sync_buffers {args.bare_sync_buffers}")
    print(f"bare loop    : {b * 1000:8.1f} ms/step (median of {args.rounds} rounds x {args.steps} steps)")
    print(f"trainer step : {t * 1000:8.1f} ms/step")
    target = 1.05 if dist_info.world_size > 1 else 1.10
    print(f"ratio trainer/bare: {t / b:.3f}  (target <= {target:.2f})")


if __name__ == "__main__":
    main()
