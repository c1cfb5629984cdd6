"""`polytask --help` and `polytask data ... --help` must not import torch (about 5 s on a
small machine): the parser and the modules it needs stay torch-free; torch is imported
by the command that runs."""
import subprocess
import sys

import pytest

from tests.conftest import REPO

# Runs the CLI's parser in a fresh interpreter, then reports which heavy modules got imported.
_PROBE = """
import sys
from launcher.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "torchvision", "webdataset", "deepspeed", "matplotlib") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


@pytest.mark.parametrize(
    "args",
    [["--help"], ["data", "--help"], ["data", "convert", "coco", "--help"], ["data", "demo", "--help"],
     ["report", "--help"], ["export", "--help"], ["predict", "--help"]],
)
def test_help_does_not_import_torch(args):
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: polytask" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY=", proc.stdout[-300:]


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, launcher.cli; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# A config error is found and reported by the launcher's own process before torch is
# imported: each command reads its config first (issue 16: errors answer in under a second).
_CONFIG_ERRORS = [
    (["balancer.name=pcgradd"], "balancer.name: unknown 'pcgradd'"),
    (["model.backbone=resnet19"], "backbone: unknown 'resnet19'"),
    (["model.tasks=[detection,depth]"], "tasks: 'depth' is not a task type"),
    (["data.shuffle=sorted"], "DataConfig.shuffle must be one of"),
    (["data.transforms.hue=0.9"], "TransformConfig.hue"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["checkpoint.format=zip"], "checkpoint.format must be one of"),
    (["trainer.backend=deepspeed", "trainer.deepspeed.zero_stage=3", "balancer.name=pcgrad"], "ZeRO stage 3"),
    (["balancer.statistics=layer9", "balancer.name=pcgrad"], "balancer.statistics: unknown 'layer9'"),
    (["model.no_such_knob=1"], "no_such_knob"),
]
_COMMAND_ARGS = {
    "launch": ["launch", "configs/demo_cpu.yaml", "--nproc-per-node", "2"],
    "train": ["train", "configs/demo_cpu.yaml"],
    "eval": ["eval", "configs/demo_cpu.yaml", "--checkpoint", "runs/none"],
    "export": ["export", "configs/demo_cpu.yaml", "--checkpoint", "runs/none", "--out", "runs/none-export"],
    "predict": ["predict", "configs/demo_cpu.yaml", "README.md", "--checkpoint", "runs/none", "--out", "runs/none-out"],
}
_ERROR_PROBE = """
import sys
from launcher.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "torchvision", "webdataset", "deepspeed", "wandb") if m in sys.modules)
print("RC=%s HEAVY=%s" % (rc, ",".join(heavy)))
"""


def _probe_config_error(command: str, overrides: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _ERROR_PROBE, *_COMMAND_ARGS[command], *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "RC=2 HEAVY=", (proc.stdout[-500:], proc.stderr[-2000:])
    assert "polytask: error: configs/demo_cpu.yaml:" in proc.stderr and message in proc.stderr, proc.stderr


@pytest.mark.parametrize("overrides,message", _CONFIG_ERRORS, ids=[o[0][-1] for o in _CONFIG_ERRORS])
def test_launch_reports_a_config_error_before_torch_is_imported(overrides, message):
    _probe_config_error("launch", overrides, message)


@pytest.mark.parametrize("command", [c for c in _COMMAND_ARGS if c != "launch"])
def test_every_command_reports_a_config_error_before_torch_is_imported(command):
    _probe_config_error(command, *_CONFIG_ERRORS[0])


def test_every_registered_balancer_and_backbone_is_listed_for_the_config():
    """The config checks names against torch-free lists. A built-in balancer missing there
    would be refused by the config although it exists (registration adds it, in-process only,
    hence the fresh interpreter); one listed but not registered would pass the config and fail
    on every rank after start-up."""
    code = """
from trainer.config import BALANCER_KINDS
listed = dict(BALANCER_KINDS)
from trainer.balancers import balancer_class, balancer_names
from trainer.config import BalancerConfig
from models.backbone import backbone_names
from models.config import BACKBONES
assert BALANCER_KINDS == listed, sorted(set(BALANCER_KINDS) - set(listed))
assert sorted(balancer_names()) == sorted(listed), (balancer_names(), listed)
assert backbone_names() == sorted(BACKBONES), (backbone_names(), BACKBONES)
for name in listed:
    cls, cfg = balancer_class(name), BalancerConfig(name=name)
    assert (cfg.fixed, cfg.needs_gram) == (cls.fixed, cls.needs_gram), name
print("OK")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "OK", proc.stderr[-2000:]


def test_a_balancer_registered_in_process_is_listed_with_its_kind():
    from trainer.balancers import Balancer, register_balancer
    from trainer.config import BALANCER_KINDS, BalancerConfig

    class LossOnly(Balancer):  # needs no gradients: kind "loss"
        needs_gram = False

        def _solve(self, gram, losses, present):
            return losses

    with pytest.raises(ValueError, match="balancer.name: unknown 'loss_only_test'"):
        BalancerConfig(name="loss_only_test")
    try:
        register_balancer("loss_only_test")(LossOnly)
        assert BALANCER_KINDS["loss_only_test"] == "loss"
        assert not BalancerConfig(name="loss_only_test").needs_gram
        BALANCER_KINDS["loss_again_test"] = "gradient"  # listed with another kind than the class has
        with pytest.raises(ValueError, match="'loss_again_test' .* is of kind 'loss', but .* lists it as 'gradient'"):
            register_balancer("loss_again_test")(LossOnly)
    finally:  # leave the registry as the other tests expect it
        from trainer.balancers import registry

        for name in ("loss_only_test", "loss_again_test"):
            BALANCER_KINDS.pop(name, None)
            registry._BALANCERS.pop(name, None)
