"""``polytask`` command line: ``launch`` (torchrun), ``train`` (one rank), ``eval`` (one rank),
``report``, ``export``, ``predict``, ``data``.

Only what parses arguments is imported here: ``--help`` must not wait for torch (seconds;
tests/launcher/test_cli_imports.py); each command imports what it runs.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from launcher import slurm
from launcher.run_lock import RunDirLocked, RunLock
from launcher.slurm import SlurmJob
from launcher.torchrun import LaunchSpec
from trainer.config_loading import ConfigError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file, e.g. configs/demo_cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="dotted config overrides")


def build_parser() -> argparse.ArgumentParser:
    from launcher.data_cli import add_data_subcommands

    parser = argparse.ArgumentParser(prog="polytask", description="Distributed multi-task vision trainer")
    sub = parser.add_subparsers(dest="command", required=True)

    launch = sub.add_parser("launch", help="start N ranks per node with torchrun")
    _add_config_args(launch)
    launch.add_argument("--nproc-per-node", type=int, default=None,
                        help="ranks per node (default 1; with --slurm: the node's allocated GPUs, else 1)")
    launch.add_argument("--nnodes", type=int, default=1)
    launch.add_argument("--node-rank", type=int, default=None)
    launch.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of the first node (multi-node)")
    launch.add_argument("--rdzv-id", default="polytask")
    launch.add_argument("--max-restarts", type=int, default=0)
    launch.add_argument("--dry-run", action="store_true", help="print the torchrun command and exit")
    launch.add_argument("--slurm", action="store_true",
                        help="inside a Slurm job step (one per node): nodes, rendezvous, ranks per node "
                             "and the default run.dir from SLURM_* (see slurm/README.md)")
    launch.add_argument("--print-run-dir", action="store_true",
                        help="validate the config, print the absolute run directory and exit")

    train = sub.add_parser("train", help="run one rank (torchrun starts this)")
    _add_config_args(train)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint on eval.sources (one rank; torchrun for more)")
    _add_config_args(evaluate)
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint directory, e.g. RUN/checkpoints/latest")

    report = sub.add_parser("report", help="PNG figures of a run from its metrics.jsonl and eval summaries")
    report.add_argument("run_dir", help="the run directory")
    report.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")

    export = sub.add_parser("export", help="a checkpoint's model as safetensors weights + model.json (one process)")
    _add_config_args(export)
    export.add_argument("--checkpoint", required=True, help="checkpoint directory (DDP or DeepSpeed ZeRO 0-3)")
    export.add_argument("--out", required=True, help="output directory for model.safetensors and model.json")

    predict = sub.add_parser("predict", help="draw a checkpoint's predictions on images; predictions.jsonl (one process)")
    predict.add_argument("config", help="YAML config file, e.g. configs/demo_cpu.yaml")
    predict.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIR",
                         help="image files and directories of images (then key.path=value overrides)")
    predict.add_argument("--checkpoint", required=True, help="checkpoint directory (DDP or DeepSpeed ZeRO 0-3)")
    predict.add_argument("--out", required=True, help="output directory for the PNGs and predictions.jsonl")
    predict.set_defaults(overrides=[])

    data = sub.add_parser("data", help="demo data and converters")
    add_data_subcommands(data.add_subparsers(dest="data_command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow the options (`launch CFG --nproc-per-node 2 a.b=1`); argparse
    # leaves such trailing positionals over, so collect them here.
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "launch":
            return _launch(args)
        if args.command == "train":
            return _train(args)
        if args.command == "eval":
            return _eval(args)
        if args.command == "report":
            return _report(args)
        if args.command == "export":
            return _export(args)
        if args.command == "predict":
            return _predict(args)
        from launcher.data_cli import run_data_command

        return run_data_command(args)
    except (ConfigError, FileNotFoundError, RunDirLocked) as e:
        for line in str(e).splitlines():
            print(f"polytask: error: {line}", file=sys.stderr)
        return 2


def _launch(args: argparse.Namespace) -> int:
    from launcher.torchrun import torchrun_command
    from trainer.config import load_config

    overrides = list(args.overrides)
    slurm_job = None
    if args.slurm:
        slurm_job = slurm.SlurmJob.from_env()
        # Every node and the batch shell compute the same overrides and pass them on.
        overrides += slurm.job_overrides(args.config, overrides, slurm_job)
    cfg = load_config(args.config, overrides)  # fail here, before any process is spawned (and torch is imported)
    from trainer.preflight import preflight_problems

    if slurm_job is not None:
        world_size = slurm_job.num_nodes * slurm.ranks_per_node(slurm_job, args.nproc_per_node)
    else:
        world_size = args.nnodes * (args.nproc_per_node or 1)
    problems = preflight_problems(cfg, world_size=world_size)  # data and evaluation, before torchrun
    if problems:
        raise ConfigError("\n".join(f"{args.config}: {p}" for p in problems))
    if args.print_run_dir:
        print(Path(cfg.run.dir).absolute())
        return 0
    try:
        if slurm_job is not None:
            spec = slurm.launch_spec(slurm_job, nproc_per_node=args.nproc_per_node,
                                     rdzv_endpoint=args.rdzv_endpoint, max_restarts=args.max_restarts)
            print(slurm.describe(slurm_job, spec), flush=True)
        else:
            spec = LaunchSpec(
                nproc_per_node=1 if args.nproc_per_node is None else args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
                rdzv_endpoint=args.rdzv_endpoint, rdzv_id=args.rdzv_id, max_restarts=args.max_restarts,
            )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    cmd = torchrun_command(spec, args.config, overrides)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    if not _takes_the_lock(spec, slurm_job):
        return _run_torchrun(cmd)
    with RunLock.acquire(cfg.run.dir):  # a second launch into the run directory fails here
        return _run_torchrun(cmd)


def _takes_the_lock(spec: LaunchSpec, slurm_job: SlurmJob | None) -> bool:
    """One launcher per job holds the run directory's lock: the only one, the one started
    with ``--node-rank 0``, or on Slurm node 0's."""
    if slurm_job is not None:
        return slurm_job.node_id in (0, None)
    if spec.nnodes == 1 or spec.node_rank == 0:
        return True
    if spec.node_rank is None:
        print("polytask launch: warning: run.dir is not locked (several nodes and no --node-rank: "
              "no launcher knows it is the first)", file=sys.stderr, flush=True)
    return False


def _run_torchrun(cmd: list[str]) -> int:
    """torchrun as our child, dying with us (launcher/parent_death.py); SIGTERM is passed on
    so that it stops its ranks and we release the run directory's lock."""
    import functools
    import signal

    from launcher.parent_death import LAUNCHER_PID_ENV, torchrun_preexec

    # One OpenMP thread per rank unless the user chose: 2 ranks x 1 thread was the fastest
    # layout on small CPU machines, and GPUs need none.
    env = {**os.environ, LAUNCHER_PID_ENV: str(os.getpid())}
    env.setdefault("OMP_NUM_THREADS", "1")
    # preexec_fn: the launcher runs no threads of its own, and the function makes one libc call.
    proc = subprocess.Popen(cmd, env=env, preexec_fn=functools.partial(torchrun_preexec, os.getpid()))
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signum))
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:  # torchrun got the terminal's SIGINT too; let it stop its ranks
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(args: argparse.Namespace) -> int:
    from launcher.parent_death import die_with_parent

    die_with_parent()  # first thing: a rank never outlives its torchrun agent
    from trainer.config import load_config

    cfg = load_config(args.config, args.overrides)
    from trainer.main import run_training

    return run_training(cfg)


def _eval(args: argparse.Namespace) -> int:
    from launcher.parent_death import die_with_parent

    die_with_parent()
    from trainer.config import load_config

    cfg = load_config(args.config, args.overrides)
    from trainer.main import run_eval

    return run_eval(cfg, checkpoint=args.checkpoint)


def _export(args: argparse.Namespace) -> int:
    from trainer.config import load_config

    cfg = load_config(args.config, args.overrides)
    from trainer.export import export_model

    for path in export_model(cfg, args.checkpoint, args.out):
        print(path)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from trainer.config import load_config

    # Positionals after CONFIG are images unless they are overrides (key=value, not a file).
    items = [*args.inputs, *args.overrides]
    overrides = [x for x in items if "=" in x and not os.path.exists(x)]
    inputs = [x for x in items if x not in overrides]
    if not inputs:
        raise ConfigError("predict: no images given (IMAGES_OR_DIR)")
    cfg = load_config(args.config, overrides)
    from trainer.predict import image_files, predict_images

    try:
        image_files(inputs)  # a file that is not an image: one line, before the model loads
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for path in predict_images(cfg, args.checkpoint, inputs, args.out):
        print(path)
    return 0


def _report(args: argparse.Namespace) -> int:
    from launcher.report import render_report

    for path in render_report(args.run_dir, out_dir=args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
