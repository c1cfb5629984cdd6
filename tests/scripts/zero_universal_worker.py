"""torchrun worker: DeepSpeedBackend.load of a ZeRO checkpoint written by another world size
(through DeepSpeed's universal conversion) restores exactly the saved fp32 weights, Adam
moments and steps and the LR schedule. The reference is every saved rank's partition put
back together with DeepSpeed's zero_to_fp32 layout logic, from weights-only loads.

    zero_universal_worker.py CHECKPOINT_DIR   (the run's config.yaml is two levels up)
"""
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipelines.label_space import build_label_space
from data_pipelines.streaming.loader import load_manifests
from models import build_model
from trainer.backends import build_backend
from trainer.backends.deepspeed_checkpoint import load_file, state_dir
from trainer.backends.deepspeed_universal import UNIVERSAL_DIR
from trainer.config import load_config
from trainer.distributed import init_distributed

STATES = ("fp32", "exp_avg", "exp_avg_sq")


def rank_files(directory: Path, kind: str) -> list[Path]:
    pattern = re.compile(rf"^zero_pp_rank_(\d+)_mp_rank_00_{kind}_states\.pt$")
    found = {int(m.group(1)): p for p in directory.iterdir() if (m := pattern.match(p.name))}
    return [found[r] for r in sorted(found)]


def saved_states(checkpoint: Path) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """{state: {parameter: full tensor}} of the trainable parameters, and the Adam step."""
    from deepspeed.utils import zero_to_fp32

    directory = state_dir(checkpoint)
    optim = [load_file(p)["optimizer_state_dict"] for p in rank_files(directory, "optim")]
    stage = int(optim[0]["zero_stage"])
    model_file = directory / "mp_rank_00_model_states.pt" if stage <= 2 else rank_files(directory, "model")[0]
    shapes = load_file(model_file)["param_shapes"]
    layout = [zero_to_fp32.zero_model_state(buffers={}, param_shapes=shapes, shared_params=[], ds_version=None,
                                            frozen_param_shapes=None, frozen_param_fragments=None)]
    out = {}
    with torch.no_grad():
        for key in STATES:
            if stage <= 2:  # every state is flat per param group, in the fp32 partitions' layout
                flat = [[o["single_partition_of_fp32_groups"][g] if key == "fp32" else o["base_optimizer_state"]["state"][g][key]
                         for g in range(len(shapes))] for o in optim]
                merged = zero_to_fp32._get_fp32_state_dict_from_zero2_checkpoint(
                    len(optim), flat, layout, True, optim[0]["param_alignment_paddings"])
            else:
                flat = [[o["fp32_flat_groups"][g] if key == "fp32" else o["optimizer_state_dict"]["state"][g][key]
                         for g in range(len(o["fp32_flat_groups"]))] for o in optim]
                merged = zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(len(optim), flat, layout, True)
            out[key] = {k: v.contiguous().clone() for k, v in zero_to_fp32.to_torch_tensor(merged).items()}
    state0 = optim[0]["base_optimizer_state" if stage <= 2 else "optimizer_state_dict"]["state"][0]
    return out, int(state0["step"])


checkpoint = Path(sys.argv[1])
cfg = load_config(str(checkpoint.parents[1] / "config.yaml"), [])
info = init_distributed(device="cpu")
assert info.world_size == 1
model = build_model(cfg.model, num_classes=build_label_space(load_manifests(cfg.data)).num_classes())
backend = build_backend(cfg.trainer, model, optim=cfg.optim, device=info.device, micro_batch_size=cfg.data.batch_size)
assert not (checkpoint / UNIVERSAL_DIR).exists()
extra = {"train": {"step": -1}}
backend.load(checkpoint, extra)
assert (checkpoint / UNIVERSAL_DIR / "state").is_dir()
saved_step = int(checkpoint.name.removeprefix("step_"))
assert extra["train"]["step"] == saved_step, extra

from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

expected, adam_step = saved_states(checkpoint)
assert adam_step == saved_step
trainable = [(n, p) for n, p in backend.module.named_parameters() if p.requires_grad]
assert sorted(n for n, _ in trainable) == sorted(expected["fp32"])
for name, p in trainable:
    assert torch.equal(safe_get_full_fp32_param(p), expected["fp32"][name]), name
    if p.numel():  # the module's own copy too, where it is not a ZeRO-3 partition placeholder
        assert torch.equal(p.detach(), expected["fp32"][name]), name
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(safe_get_full_optimizer_state(p, key), expected[key][name]), (key, name)
steps = {int(s["step"]) for s in backend.optimizer.optimizer.state.values()}
assert steps == {saved_step}, steps
assert backend.scheduler.last_epoch == saved_step, backend.scheduler.state_dict()
print(f"ok: {len(trainable)} parameters, fp32 weights, Adam moments and step {saved_step} as saved by 2 ranks")
dist.destroy_process_group()
