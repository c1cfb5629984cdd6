"""The training loop: one readable class, its steps called explicitly in order.

shards -> loader (stream, sampler, collate) -> model -> per-task losses -> global
normalisation -> weighted sum -> backward (DDP reduce) -> clip -> optimizer step.
The checkpointer and the metrics logger observe; they never steer.
"""
from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from data_pipelines.label_space import coverage_lines
from data_pipelines.streaming.audit import AuditWriter, cut_audit_trails
from data_pipelines.streaming.loader import build_train_loader
from data_pipelines.schema import Batch
from models import build_model
from trainer.backends import build_backend
from trainer.balancing import LossBalancing
from trainer.checkpoint import Checkpointer, CheckpointLoadError
from trainer.checkpoint.compatibility import check_model_record, model_record
from trainer.checkpoint.parts import DataPosition, RankRNG, TrainProgress, load_parts, parts_state
from trainer.config import JobConfig
from trainer.config_loading import dump_yaml, to_dict
from trainer.distributed import DistInfo
from trainer.evaluation.best_metric import BestMetricTracker, check_best_metric
from trainer.evaluation.evaluator import eval_dir, evaluate
from trainer.garbage_collection import StepGarbageCollection
from trainer.metrics_logger import MetricsLogger
from trainer.preemption import PreemptionFlag, slurm_job_info
from trainer.preflight import eval_source_specs
from trainer.rng_state import seed_everything
from trainer.task_losses import GlobalTaskCounts, local_task_counts, scale_task_losses
from trainer.weights_digest import weights_digest

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training stopped on non-finite losses or gradients (the message names the tasks)."""


def git_commit() -> str | None:
    """The commit of the polytask checkout that runs (recorded with the run), if any."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None




class _LogWindow:
    """Sums over the steps since the last log line; per-task losses are averaged over the
    labelled samples of the whole window (a single step may hold none of a task)."""

    def __init__(self, num_tasks: int, sources: list[str], device: torch.device) -> None:
        self.loss_sum = torch.zeros(num_tasks, device=device)
        # sum over steps of coefficient x loss sum: loss/total weighs each step's losses
        # by that step's coefficients, which dynamic balancers change every step
        self.weighted_loss_sum = torch.zeros(num_tasks, device=device)
        self.count = torch.zeros(num_tasks, device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.sources = sources
        self.images = torch.zeros(len(sources), dtype=torch.float64)  # this rank's, per source
        self.steps = 0
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], *, batches: list[Batch]) -> None:
        # stays on the device: no host sync per step
        self.loss_sum += out["loss_sums"]
        self.weighted_loss_sum += out["coefficients"] * out["loss_sums"]
        self.count += out["global_count"]
        self.grad_norm_sum += out["grad_norm"].detach()
        self.steps += 1
        for batch in batches:
            for source in batch.sources:
                self.images[self.sources.index(source)] += 1
        self.last = out  # coefficients and balancer statistics are logged as of the last step


class Trainer:
    def __init__(self, cfg: JobConfig, dist_info: DistInfo) -> None:
        self.cfg = cfg
        self.dist = dist_info
        self.device = dist_info.device
        self.run_dir = Path(cfg.run.dir)
        # Same seed on every rank: identical initial weights (DDP also broadcasts them).
        seed_everything(cfg.run.seed)

        self.loader, self.label_space, self.manifests = build_train_loader(
            cfg.data, tasks=cfg.model.task_specs, rank=dist_info.rank, world_size=dist_info.world_size, device=self.device
        )
        coverage = coverage_lines(self.label_space.coverage_table(self.manifests))
        if dist_info.is_main:
            log.info("label coverage, source: task covered/label-space size (what a source does not annotate "
                     "gets no loss on its samples):\n  %s", "\n  ".join(coverage))
        model = build_model(cfg.model, num_classes=self.label_space.num_classes(),
                            tasks=self.label_space.tasks).to(self.device)
        self.tasks: list[str] = self.label_space.task_names
        self.balancing = LossBalancing(cfg.balancer, self.tasks, static_weights=cfg.trainer.loss_weights,
                                       world_size=dist_info.world_size,
                                       source_tasks={m.name: self.label_space.fed_tasks(m.name)
                                                     for m in self.manifests})
        self.backend = build_backend(cfg.trainer, model, optim=cfg.optim, device=self.device,
                                     micro_batch_size=cfg.data.batch_size, async_save=cfg.checkpoint.async_save,
                                     checkpoint_format=cfg.checkpoint.format)
        self.progress = TrainProgress()
        # What a checkpoint holds beside the backend's model, optimizer and schedule.
        self.parts = {
            "train": self.progress,
            "balancer": self.balancing,
            "rng": RankRNG(rank=dist_info.rank, world_size=dist_info.world_size, seed=cfg.run.seed,
                           progress=self.progress),
            "data": DataPosition(self.loader, rank=dist_info.rank, world_size=dist_info.world_size,
                                 readers_per_rank=cfg.data.readers_per_rank),
        }
        self.skipped_steps = 0  # non-finite gradient norm: no update (see _check_finite)
        self._bad_steps_in_a_row = 0
        self._data_iter: Iterator[Batch] | None = None
        self._loss_rows: list[tuple[int, dict[str, float]]] = []  # (step, loss/*) per log line
        self._last_eval: dict[str, float] = {}

        self.checkpointer = Checkpointer(run_dir=self.run_dir, cfg=cfg.checkpoint, is_main=dist_info.is_main)
        wandb_run_id = self._maybe_resume()
        if dist_info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Coverage is derived from the manifests, not a setting: comments keep the file a loadable config.
            coverage_note = "".join(f"#   {line}\n" for line in coverage)
            (self.run_dir / "config.yaml").write_text(
                f"{dump_yaml(cfg)}# label coverage (source: task covered/label-space size; derived from the "
                f"manifests):\n{coverage_note}"
            )
        if dist_info.is_main:  # the steps a resume discards leave the trail too (audit off or on)
            cut_audit_trails(self.run_dir, after_step=self.step)
        dist.barrier()  # cut before any rank appends
        self.audit = AuditWriter(self.run_dir, dist_info.rank) if cfg.data.audit else None
        # The launcher's checks (trainer/preflight.py), for ranks started without it: now, not
        # after hours of training.
        eval_specs = (eval_source_specs(cfg.eval, label_space=self.label_space)
                      if cfg.eval.enabled else {})
        check_best_metric(cfg.eval, eval_specs)
        self.best = None
        if cfg.eval.best_metric:
            self.best = BestMetricTracker(cfg.eval, run_dir=self.run_dir, is_main=dist_info.is_main)
        # Slurm (slurm/train.sbatch): which job and restart this is, and the checkpoint-now flag.
        self.slurm = slurm_job_info()
        if self.slurm and dist_info.is_main:
            log.info("Slurm job %s, SLURM_RESTART_COUNT=%s, nodes %s", self.slurm["job_id"],
                     self.slurm["restart_count"], self.slurm["nodelist"])
        self.preemption = PreemptionFlag(self.run_dir, local_rank=dist_info.local_rank)
        self.preempted = False
        wandb_config = {**to_dict(cfg), "git_commit": git_commit(), **({"slurm": self.slurm} if self.slurm else {})}
        self.metrics = MetricsLogger(
            run_dir=self.run_dir, cfg=cfg.wandb, config=wandb_config,
            enabled=dist_info.is_main, run_id=wandb_run_id,
        )

    @property
    def step(self) -> int:
        return self.progress.step

    @step.setter
    def step(self, value: int) -> None:
        self.progress.step = value

    # --- checkpoint state -------------------------------------------------------------
    def _maybe_resume(self) -> str | None:
        path = self.checkpointer.resume_path()
        if path is None:
            return None
        meta = self.checkpointer.read_meta(path)
        old_world = int(meta.get("world_size", self.dist.world_size))
        same_world = old_world == self.dist.world_size
        backend = self.cfg.trainer.backend
        if meta.get("backend", "ddp") != backend:
            raise CheckpointLoadError(f"{path}: written by the {meta.get('backend')!r} backend, this job uses {backend!r}")
        check_model_record(path, meta, label_space=self.label_space, model_cfg=self.cfg.model)
        self._warn_batch_change(path, meta)
        load_parts(self.parts, lambda templates: self.backend.load(path, templates), saved_world_size=old_world)
        if not same_world:
            log.warning("checkpoint %s was written by %d ranks, this job has %d: model and optimizer "
                        "resharded, data positions remapped (the interrupted epochs finish first)",
                        path, old_world, self.dist.world_size)
        log.info("resumed from %s at step %d", path, self.step)
        return meta.get("wandb_run_id")

    def _batch_layout(self) -> dict[str, int]:
        """What makes one optimizer step's batch; saved in meta.json, compared on resume."""
        return {"batch_size": self.cfg.data.batch_size, "grad_accum_steps": self.cfg.trainer.grad_accum_steps,
                "world_size": self.dist.world_size}

    def _warn_batch_change(self, path: Path, meta: dict[str, Any]) -> None:
        """Resuming with another per-rank batch or accumulation works (data positions are per
        sample), but each step then sees another number of samples while the LR schedule
        and optimizer state go on per step: say so, with the old and new values."""
        if "batch_size" not in meta or "grad_accum_steps" not in meta:
            log.info("checkpoint %s does not record its batch size (an older polytask); not compared", path)
            return
        old, new = {**meta, "world_size": meta.get("world_size", self.dist.world_size)}, self._batch_layout()
        if (old["batch_size"], old["grad_accum_steps"]) == (new["batch_size"], new["grad_accum_steps"]):
            return

        def describe(b: dict[str, Any]) -> str:
            return (f"data.batch_size={b['batch_size']} x trainer.grad_accum_steps={b['grad_accum_steps']} x "
                    f"{b['world_size']} ranks = {b['batch_size'] * b['grad_accum_steps'] * b['world_size']} samples per step")

        log.warning("batch size changed on resume: checkpoint %s was trained with %s, this job uses %s; "
                    "the LR schedule and optimizer state continue per step, not per sample",
                    path, describe(old), describe(new))

    def save_checkpoint(self) -> Path:
        self._check_weights_finite()  # checkpoints/latest never points at NaN weights
        meta = {"wandb_run_id": self.metrics.run_id, "backend": self.cfg.trainer.backend, **self._batch_layout(),
                **model_record(self.label_space, self.cfg.model)}
        extra = parts_state(self.parts)
        return self.checkpointer.save(self.step, lambda d: self.backend.save(d, extra), meta)

    def _check_weights_finite(self) -> None:
        """(Collective) raise on every rank when any rank holds a non-finite parameter."""
        with torch.no_grad():  # one host sync, not one per parameter
            finite = torch.stack([torch.isfinite(p).all() for p in self.backend.module.parameters()]).all()
        bad = torch.tensor(0.0 if bool(finite) else 1.0)
        if self.dist.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise NonFiniteTrainingError(f"step {self.step}: the weights are not finite; not saving a checkpoint "
                                         f"of them (checkpoints/latest is unchanged)")

    # --- one step ---------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.trainer.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _next_batch(self) -> Batch:
        if self._data_iter is None:
            self._data_iter = iter(self.loader)
        return next(self._data_iter)

    def train_step(self, batches: list[Batch]) -> dict[str, Any]:
        """One optimizer step over ``batches`` (the micro-batches of gradient accumulation)."""
        batches = [b.to(self.device) for b in batches]
        if self.balancing.fixed:
            out = self._fixed_step(batches)
        else:
            (batch,) = batches  # dynamic balancing takes one micro-batch per step (config checks it)
            out = self._balanced_step(batch)
        out["grad_norm"] = self.backend.optimizer_step()
        self.step += 1
        self._check_finite(out)
        return out

    def _check_finite(self, out: dict[str, Any]) -> None:
        """A step whose global gradient norm is not finite was skipped by the backend (no
        update): warn naming the tasks, stop after ``trainer.max_bad_steps`` in a row. The
        norm is global, so every rank decides alike (this reads it: one host sync per step)."""
        if bool(torch.isfinite(out["grad_norm"])):
            self._bad_steps_in_a_row = 0
            return
        self._bad_steps_in_a_row += 1
        self.skipped_steps += 1
        tasks = self._nonfinite_tasks(out["loss_sums"])
        what = (f"non-finite loss in task(s) {', '.join(tasks)}" if tasks
                else "finite losses but non-finite gradients")
        limit = self.cfg.trainer.max_bad_steps
        if self.backend.last_step_applied:
            raise NonFiniteTrainingError(
                f"step {self.step}: {what}, and the {self.cfg.trainer.backend} backend applied the update: "
                f"the weights are no longer finite; stopping (checkpoints/latest is unchanged)")
        if self._bad_steps_in_a_row > limit:
            raise NonFiniteTrainingError(
                f"step {self.step}: {what}; {self._bad_steps_in_a_row} steps in a row skipped, more than "
                f"trainer.max_bad_steps={limit}; stopping (lower optim.lr or check the data of those tasks; "
                f"checkpoints/latest is unchanged)")
        log.warning("step %d: %s; step skipped, no update (%d in a row, trainer.max_bad_steps=%d)",
                    self.step, what, self._bad_steps_in_a_row, limit)
        # The window then averages the good steps only.
        out["loss_sums"] = torch.zeros_like(out["loss_sums"])
        out["global_count"] = torch.zeros_like(out["global_count"])
        out["grad_norm"] = torch.zeros_like(out["grad_norm"])

    def _nonfinite_tasks(self, loss_sums: torch.Tensor) -> list[str]:
        """Tasks with a non-finite loss on any rank (collective: every rank saw the bad norm)."""
        flags = (~torch.isfinite(loss_sums)).float()
        if self.dist.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return [t for t, bad in zip(self.tasks, flags.tolist()) if bad]

    def _fixed_step(self, batches: list[Batch]) -> dict[str, Any]:
        """Coefficients known before the step (static, equal): micro-batches accumulate."""
        coefficients = self.balancing.fixed_coefficients(self.device)
        weights = coefficients.tolist()
        pending_counts = GlobalTaskCounts(batches, self.tasks, world_size=self.dist.world_size)
        loss_sums = torch.zeros(len(self.tasks), device=self.device)
        for i, batch in enumerate(batches):
            with self.backend.micro_batch_context(last=i == len(batches) - 1):
                with self._autocast():
                    losses = self.backend.model(batch).losses
                global_counts = pending_counts.wait()  # in flight during the first forward
                local_counts = local_task_counts(batch, self.tasks)
                scaled = scale_task_losses(losses, local_counts, global_counts, world_size=self.dist.world_size)
                self.backend.backward(sum(weights[i] * scaled[t] for i, t in enumerate(self.tasks)))
            loss_sums += torch.stack([losses[t].detach().float() for t in self.tasks]) * local_counts
        # Local sums; the window all-reduces them once per log line, not per step.
        return {"loss_sums": loss_sums, "global_count": global_counts, "coefficients": coefficients}

    def _balanced_step(self, batch: Batch) -> dict[str, Any]:
        with self.backend.micro_batch_context(last=True):
            with self._autocast():
                out = self.backend.model(batch, detach_features=self.balancing.detach_features)
            local_counts = local_task_counts(batch, self.tasks)
            balanced = self.balancing.balanced_loss(out, batch, local_counts, trunk=self.backend.module.backbone,
                                                    heads=self.backend.module.heads)
            self.backend.backward(balanced.total)
        loss_sums = torch.stack([out.losses[t].detach().float() for t in self.tasks]) * local_counts
        return {"loss_sums": loss_sums, "global_count": balanced.stats.counts.float(),
                "coefficients": balanced.coefficients.detach().float(), "balanced": balanced}

    # --- the loop ---------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg.trainer
        if self.step >= cfg.max_steps:
            log.info("nothing to do: step %d >= trainer.max_steps %d", self.step, cfg.max_steps)
            return
        self.backend.model.train()
        progress = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.dist.is_main,
                        desc="train", dynamic_ncols=True)
        collector = StepGarbageCollection(cfg.gc_every)
        try:
            self._train_until_done(progress, collector)
        finally:
            collector.close()
        self.checkpointer.finish()  # the last checkpoint is complete before we return
        progress.close()

    def _train_until_done(self, progress: tqdm, collector: StepGarbageCollection) -> None:
        cfg = self.cfg.trainer
        window = self._new_window()
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            batches = [self._next_batch() for _ in range(cfg.grad_accum_steps)]
            window.data_wait += time.perf_counter() - t0
            out = self.train_step(batches)
            if self.audit is not None:
                self.audit.write(self.step, [k for b in batches for k in b.keys])
            window.add(out, batches=batches)
            progress.update(1)
            last = self.step == cfg.max_steps
            if self.step % cfg.log_every == 0 or last:
                row = self._metrics_row(window)
                self.metrics.log(self.step, row)
                self._loss_rows.append((self.step, {k: v for k, v in row.items() if k.startswith("loss/")}))
                progress.set_postfix({k[5:]: f"{v:.3f}" for k, v in row.items() if k.startswith("loss/")})
                window = self._new_window()
            self.checkpointer.poll(wait=last)  # finalise a background save once all ranks wrote it
            if self.checkpointer.should_save(self.step, last=last):
                self.save_checkpoint()
            if self.cfg.eval.due(self.step, last=last):
                self.evaluate()
            if not last and self.preemption.requested():  # collective: every rank stops here
                self._checkpoint_and_stop()
                break
            collector.step(self.step)

    def _new_window(self) -> _LogWindow:
        return _LogWindow(len(self.tasks), [m.name for m in self.manifests], self.device)

    def _checkpoint_and_stop(self) -> None:
        """Slurm asked for a checkpoint (time limit or preemption, see trainer/preemption.py):
        save this step unless the loop just did, then tell the batch script."""
        if not self.checkpointer.should_save(self.step, last=False):
            self.save_checkpoint()
        self.checkpointer.finish()  # on disk before the batch script may requeue
        self.preemption.acknowledge(self.step)
        self.preempted = True
        log.info("checkpointed at step %d on request (%s); stopping for a requeue", self.step, self.preemption.request)

    def evaluate(self) -> dict[str, float]:
        """Evaluate on ``eval.sources`` (collective), log the metrics, track the best step."""
        with self.backend.full_parameters() as model:
            metrics = evaluate(
                model, self.cfg.eval, transforms=self.cfg.data.transforms, label_space=self.label_space,
                rank=self.dist.rank, world_size=self.dist.world_size, device=self.device,
                out_dir=eval_dir(self.run_dir, self.step), step=self.step,
            )
        self.metrics.log(self.step, metrics)
        self._last_eval = {"step": self.step, **metrics}
        if self.best is not None and self.best.update(self.step, metrics):
            if not self.checkpointer.has_step(self.step):
                self.save_checkpoint()  # the best step must have a checkpoint to point at
            self.checkpointer.poll(wait=True)
            self.checkpointer.mark_best(self.step)
        return metrics

    def _metrics_row(self, window: _LogWindow) -> dict[str, float]:
        num_tasks = len(self.tasks)
        # One all-reduce per log line (every rank logs at the same steps: same collectives),
        # in float64 so that the data streams' bad/read sample counts add up exactly.
        bad_counts = self.loader.bad_sample_counts()  # this rank's, [2, sources]
        sums = torch.cat([window.loss_sum.double(), window.weighted_loss_sum.double(), window.images.to(self.device),
                          bad_counts.flatten().to(self.device)])
        if self.dist.world_size > 1:
            dist.all_reduce(sums)
        loss_sum, weighted_sum, images, bad_counts = sums.split([num_tasks, num_tasks, len(window.sources),
                                                                 bad_counts.numel()])
        loss_sum, weighted_sum = loss_sum.float(), weighted_sum.float()
        # Same sums on every rank: all raise here at once, or none does.
        bad_samples = self.loader.check_bad_samples(bad_counts.cpu())
        counts = window.count.tolist()
        clamped = window.count.clamp(min=1)
        means = (loss_sum / clamped).tolist()
        coefficients = window.last["coefficients"].tolist()
        row: dict[str, float] = {}
        for i, t in enumerate(self.tasks):
            if counts[i] > 0:  # no labelled sample of this task in the window: no loss to show
                row[f"loss/{t}"] = means[i]
            row[f"weight/{t}"] = coefficients[i]
            row[f"samples/{t}"] = counts[i]
        row["loss/total"] = float((weighted_sum / clamped).sum())
        if "balanced" in window.last:
            row.update(self.balancing.metrics(window.last["balanced"]))
        row["lr"] = self.backend.lr()
        row["grad_norm"] = float(window.grad_norm_sum) / max(window.steps, 1)
        row["train/skipped_steps"] = self.skipped_steps  # non-finite steps since this process started
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        row["throughput/images_per_s"] = float(images.sum()) / elapsed  # all ranks
        for name, n in zip(window.sources, images.tolist()):
            row[f"throughput/{name}/images_per_s"] = n / elapsed
        row["time/data_wait_frac"] = window.data_wait / elapsed
        if self.device.type == "cuda":  # this rank's peak since the start (bench/gpu_check.sh reports it)
            row["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.dist.is_main:  # rank 0's own stream: consumed samples, epochs, realised mix; bad ones of all ranks
            row.update(self.loader.data_metrics(bad_samples=bad_samples))
        if self.slurm:
            row["slurm/restart_count"] = self.slurm["restart_count"]
        return row

    # --- end of run -------------------------------------------------------------------
    def replica_digests(self) -> list[str]:
        """sha256 of every rank's parameters; DDP replicas must be bit-identical."""
        with self.backend.full_parameters() as model:  # ZeRO-3: gathered, not placeholders
            digest = weights_digest(model.state_dict())
        digests: list[str] = [""] * self.dist.world_size
        dist.all_gather_object(digests, digest)
        return digests

    def _loss_trend(self) -> dict[str, dict[str, float]]:
        """Per loss: first and last value this process logged (what `make demo` shows)."""
        trend: dict[str, dict[str, float]] = {}
        for step, losses in self._loss_rows:
            for name, value in losses.items():
                entry = trend.setdefault(name, {"first": value, "first_step": step})
                entry.update(last=value, last_step=step)
        return trend

    def finish(self) -> dict[str, Any]:
        digests = self.replica_digests()
        summary = {"step": self.step, "world_size": self.dist.world_size, "replica_digests": digests,
                   "replicas_in_sync": len(set(digests)) == 1, "wandb_run_id": self.metrics.run_id,
                   "losses": self._loss_trend(), "eval": self._last_eval, "git_commit": git_commit()}
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            for name, trend in summary["losses"].items():
                log.info("%-22s first logged %.4f (step %d) -> last %.4f (step %d)", name,
                         trend["first"], trend["first_step"], trend["last"], trend["last_step"])
            headline = {k: v for k, v in self._last_eval.items() if k.endswith(("/AP", "/AP50", "/mIoU", "/top1"))}
            for name, value in headline.items():
                log.info("%-44s %.3f (step %d)", name, value, self._last_eval["step"])
        if not summary["replicas_in_sync"]:
            log.error("DDP replicas diverged: %s", digests)
        self.close()
        return summary

    def close(self) -> None:
        """Flush and close what the run writes beside checkpoints (metrics, W&B, audit)."""
        self.metrics.close()
        if self.audit is not None:
            self.audit.close()
