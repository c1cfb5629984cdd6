"""The packages form layers and every import points down:

    launcher  ->  trainer  ->  models  ->  data_pipelines

(bench/ and tests/ sit on top and may import anything). ``models/`` holds architectures
only: no distributed code, so it never imports ``torch.distributed``. Imports inside
functions count too: they are how layering is usually broken quietly."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

LAYERS = ["data_pipelines", "models", "trainer", "launcher"]  # bottom to top


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, relative imports resolved."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def layering_violations(root: Path = REPO) -> list[str]:
    problems = []
    for rank, layer in enumerate(LAYERS):
        above = LAYERS[rank + 1:]
        for path in sorted((root / layer).rglob("*.py")):
            where = path.relative_to(root)
            for line, module in _imports(path, root):
                top = module.split(".")[0]
                if top in above or top in ("bench", "tests"):
                    problems.append(f"{where}:{line}: {layer} imports {module} (upward)")
                if layer == "models" and (module == "torch.distributed" or module.startswith("torch.distributed.")):
                    problems.append(f"{where}:{line}: models imports {module} (distributed code)")
    return problems


def test_every_import_between_packages_points_down():
    assert layering_violations() == []


@pytest.mark.parametrize("layer, line, expected", [
    ("data_pipelines", "from trainer.config import JobConfig", "data_pipelines imports trainer.config"),
    ("models", "import launcher.cli", "models imports launcher.cli"),
    ("models", "import torch.distributed as dist", "models imports torch.distributed"),
    ("models", "from torch.distributed import all_reduce", "models imports torch.distributed"),
    ("trainer", "def f():\n    from launcher import cli", "trainer imports launcher"),
])
def test_the_check_catches_upward_and_distributed_imports(tmp_path, layer, line, expected):
    for name in LAYERS:
        (tmp_path / name).mkdir()
    (tmp_path / layer / "bad.py").write_text(line + "\n")
    problems = layering_violations(tmp_path)
    assert len(problems) >= 1 and any(expected in p for p in problems), problems
