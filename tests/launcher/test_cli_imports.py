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
