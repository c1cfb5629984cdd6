"""Training throughput of a config in the real training loop, for several variants in one
process (one start-up, one process group): images/s per rank, ``time/data_wait_frac`` and
peak device memory, from the ``metrics.jsonl`` each variant's run writes.

Each variant is ``NAME`` plus config overrides (added to ``--set``); its run trains
``--steps`` steps, logging every ``--log-every``; the figures are those of the last log
window (the first holds start-up: worker spawn, cuDNN autotuning). Rank 0 prints one JSON
object per variant. Backbone weights: ``--calibrated-weights PATH`` writes (rank 0) a
randomly initialised torchvision trunk whose BN statistics are measured on random images,
so that frozen BN normalises as pretrained weights would (an uncalibrated frozen BN is
the identity, and the activations of a deep trunk grow without bound).

    torchrun --standalone --nproc-per-node 1 -m bench.throughput --config configs/gpu_r50_fpn.yaml \\
        --out /tmp/tp --steps 60 --log-every 20 --calibrated-weights /tmp/tp/r50.pth \\
        --set data.sources.0.path=... --variant ddp --variant zero2 trainer.backend=deepspeed \\
        trainer.deepspeed.zero_stage=2
"""
from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torchvision  # noqa: E402

from trainer.config import JobConfig, load_config  # noqa: E402
from trainer.distributed import init_distributed, setup_rank_logging, shutdown_distributed  # noqa: E402
from trainer.train_loop import Trainer  # noqa: E402


def calibrated_trunk_weights(cfg: JobConfig, path: Path, *, device: torch.device, batches: int = 4) -> None:
    """A random ``cfg.model.backbone`` classification trunk whose BN running statistics are
    the averages over ``batches`` random normalised images, saved as a state_dict."""
    trunk = torchvision.models.get_model(cfg.model.backbone, weights=None).to(device).train()
    for m in trunk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    mean = torch.tensor(cfg.model.norm_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.model.norm_std, device=device).view(1, 3, 1, 1)
    size = min(cfg.data.transforms.image_size, 224)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for _ in range(batches):
            trunk((torch.rand(4, 3, size, size, device=device, generator=generator) - mean) / std)
    torch.save({k: v.cpu() for k, v in trunk.state_dict().items()}, path)


def run_variant(config: str, overrides: list[str], run_dir: Path, dist_info) -> dict[str, float]:
    """Train one variant; its last logged window's figures."""
    cfg = load_config(config, [*overrides, f"run.dir={run_dir}"])
    if dist_info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist_info.device)
    trainer = Trainer(cfg, dist_info)
    try:
        trainer.train()
    finally:
        trainer.close()
    del trainer
    gc.collect()  # the loader's workers and the model's memory go before the next variant
    if dist_info.device.type == "cuda":
        torch.cuda.empty_cache()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if dist_info.is_main else [{}]
    last = rows[-1]
    return {
        "images_per_s_per_rank": last.get("throughput/images_per_s", float("nan")) / dist_info.world_size,
        "data_wait_frac": last.get("time/data_wait_frac", float("nan")),
        "peak_memory_gib": last.get("memory/peak_gib", float("nan")),
        "steps_in_window": cfg.trainer.log_every,
        "windows": len(rows),
    }


def parse_variants(argv: list[list[str]]) -> list[tuple[str, list[str]]]:
    variants = [(v[0], v[1:]) for v in argv]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"--variant names must be unique, got {names}")
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", type=Path, required=True, help="run directories OUT/<variant>")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--calibrated-weights", type=Path, default=None,
                        help="write calibrated random trunk weights here and train from them")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [KEY=VALUE ...]")
    args = parser.parse_args()
    variants = parse_variants(args.variant)

    setup_rank_logging(int(os.environ.get("RANK", 0)))
    common = [*args.set, f"trainer.max_steps={args.steps}", f"trainer.log_every={args.log_every}",
              "checkpoint.resume=never", "wandb.mode=disabled"]
    base = load_config(args.config, common)  # fails here, before any process group, on a bad override
    dist_info = init_distributed(device=base.trainer.device)
    try:
        if args.calibrated_weights is not None:
            if dist_info.is_main:
                args.calibrated_weights.parent.mkdir(parents=True, exist_ok=True)
                calibrated_trunk_weights(base, args.calibrated_weights, device=dist_info.device)
            dist.barrier()
            common.append(f"model.backbone_weights={args.calibrated_weights}")
        for name, overrides in variants:
            result = run_variant(args.config, [*common, *overrides], args.out / name, dist_info)
            if dist_info.is_main:
                print(json.dumps({"variant": name, "world_size": dist_info.world_size, **result}), flush=True)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
