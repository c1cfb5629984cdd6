"""DeepSpeed ZeRO (stage 0-3) behind the same loop, started by our launcher through torchrun.

We generate the DeepSpeed config from our YAML (micro-batch, accumulation, clipping,
ZeRO stage, bf16); ``trainer.deepspeed.extra`` is merged over it for anything else.
The loop's own state (step, RNG, data positions) goes next to DeepSpeed's files via DCP.
"""
from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.backends.base import TrainBackend
from trainer.backends.deepspeed_checkpoint import TAG as _TAG
from trainer.backends.deepspeed_checkpoint import load_file
from trainer.backends.deepspeed_universal import UNIVERSAL_DIR, saved_world_size, universal_copy, universal_load
from trainer.config import DeepSpeedConfig
from trainer.checkpoint import CheckpointLoadError, mismatch_error, read_dcp, write_dcp
from trainer.optim import build_optimizer, build_scheduler
from trainer.config import OptimConfig


def deepspeed_config(cfg: DeepSpeedConfig, *, micro_batch_size: int, grad_accum_steps: int,
                     grad_clip: float, bf16: bool) -> dict[str, Any]:
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        # bf16 = torch autocast with fp32 master weights, the same numerics as under DDP.
        # DeepSpeed's own "bf16" section casts the weights to bf16 and then wants bf16 inputs
        # (with it our fp32 image batch failed in the first conv on an H100).
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        "steps_per_print": 2**31 - 1,  # our logger reports; keep DeepSpeed quiet
    }
    return _merge(generated, cfg.extra)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedBackend(TrainBackend):
    def __init__(self, model: nn.Module, *, cfg: DeepSpeedConfig, optim: OptimConfig, max_steps: int,
                 micro_batch_size: int, grad_accum_steps: int, bf16: bool) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        import deepspeed
        import deepspeed.ops

        # The shared-memory CPU collective would be compiled (~40 s) on first use; gloo is
        # what we run on CPU anyway (measured, env notes).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # A torch optimizer, not DeepSpeed's fused/CPU Adam: no C++ build on first run.
        optimizer = build_optimizer(model, optim)
        scheduler = build_scheduler(optimizer, optim, max_steps=max_steps)
        config = deepspeed_config(cfg, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                                  grad_clip=optim.grad_clip, bf16=bf16)
        # ZeRO-3 partitions the parameters, and its forward all-gathers them module by module:
        # evaluation (ranks with different images and heads) cannot run on it. A storage-free
        # (meta) copy of the model is filled from one gather when whole parameters are needed.
        self._device = next(model.parameters()).device
        self._shell = copy.deepcopy(model).to("meta") if cfg.zero_stage == 3 else None
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False,
        )
        self.model.checkpoint_engine = _weights_only_checkpoint_engine(self.model)
        self._last_micro_batch = True

    @property
    def module(self) -> nn.Module:
        return self.model.module

    @contextlib.contextmanager
    def full_parameters(self) -> Iterator[nn.Module]:
        if self._shell is None:
            yield self.module
            return
        import deepspeed

        module, shell = self.model.module, self._shell.to_empty(device=self._device)
        with torch.no_grad():
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                for (name, whole), (shell_name, q) in zip(module.named_parameters(), shell.named_parameters()):
                    assert name == shell_name, (name, shell_name)
                    q.copy_(whole)
            for (_, b), (_, q) in zip(module.named_buffers(), shell.named_buffers()):
                q.copy_(b)
        shell.train(module.training)
        try:
            yield shell
        finally:
            self._shell = shell.to("meta")  # frees the whole copy again

    def micro_batch_context(self, *, last: bool) -> contextlib.AbstractContextManager:
        self._last_micro_batch = last  # DeepSpeed decides on syncing from its own counter
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # Our per-task normalisation already spans the step's micro-batches.
        self.model.backward(loss, scale_wrt_gas=False)
        if not self._last_micro_batch:
            self.model.step()  # advances DeepSpeed's micro-step counter; no optimizer step

    def optimizer_step(self) -> torch.Tensor:
        self.model.step()
        # ZeRO-1/2/3 skip an update whose gradients overflow (not finite) on their own;
        # ZeRO-0 with a torch optimizer does not, and the trainer then stops.
        self.last_step_applied = self.model.was_step_applied()
        if not self.last_step_applied:
            return torch.tensor(float("nan"))
        norm = self.model.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else float(norm))

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        self.model.save_checkpoint(str(directory / "deepspeed"), tag=_TAG, save_latest=False)
        write_dcp(extra, directory / "extra")

    @staticmethod
    def load_model_weights(model: nn.Module, directory: Path) -> None:
        """Only the model's weights, consolidated from DeepSpeed's files of any ZeRO stage
        and world size; every rank reads them itself (weights-only)."""
        from trainer.backends.deepspeed_checkpoint import zero_model_state_dict

        load_full_state_dict(model, zero_model_state_dict(directory), directory)

    def load(self, directory: Path, extra: dict[str, Any]) -> None:
        """Same world size: DeepSpeed's own files. Another one (ZeRO-1/2/3): their universal
        conversion, made once by rank 0 (see deepspeed_universal)."""
        if not (directory / "deepspeed").is_dir():
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint (written by another backend?)")
        saved = saved_world_size(directory)
        if saved is None or saved == dist.get_world_size():
            path, _ = self.model.load_checkpoint(str(directory / "deepspeed"), tag=_TAG,
                                                 load_optimizer_states=True, load_lr_scheduler_states=True)
        else:
            error = None
            if dist.get_rank() == 0:
                try:
                    universal_copy(directory)
                except CheckpointLoadError as e:  # every rank raises it, none waits forever
                    error = str(e)
            box = [error]
            dist.broadcast_object_list(box, src=0)
            if box[0] is not None:
                raise CheckpointLoadError(box[0])
            with universal_load(self.model):
                path, _ = self.model.load_checkpoint(str(directory / UNIVERSAL_DIR), tag=_TAG,
                                                     load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint (written by another backend?)")
        read_dcp(extra, directory / "extra")


def load_full_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """``model.load_state_dict(state)``, with one error listing every mismatching key first."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    shape = sorted(
        f"{k}: checkpoint {list(state[k].shape)} vs job {list(v.shape)}"
        for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
    )
    if missing or unexpected or shape:
        raise mismatch_error(path, missing=missing, shape=shape, unexpected=unexpected)
    model.load_state_dict(state)


def _weights_only_checkpoint_engine(engine: Any) -> Any:
    """DeepSpeed's TorchCheckpointEngine loads with ``weights_only=False``; ours does not
    run code from a checkpoint file (allow-list: ``deepspeed_checkpoint.safe_globals``)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return load_file(path, map_location=map_location)

    return WeightsOnlyCheckpointEngine(engine._config)
