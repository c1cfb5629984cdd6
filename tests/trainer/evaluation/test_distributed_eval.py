"""2 ranks (torchrun, gloo), 25 images: each image is predicted by exactly one rank,
counted once on rank 0, and every rank returns rank 0's metrics."""
import json

import pytest

from tests.conftest import REPO, SCRIPTS, run_torchrun
from tests.trainer.evaluation.tiny_sources import NUM_IMAGES, SOURCES

pytestmark = pytest.mark.distributed


def test_two_ranks_evaluate_each_image_exactly_once(tiny, tmp_path):
    root = tiny.paths[SOURCES[0]].parent
    proc = run_torchrun(
        [str(SCRIPTS / "eval_gather_worker.py"), str(root), str(tmp_path / "eval")],
        nproc=2, timeout=180, env={"PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result_rank*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1]
    served = [r["served"] for r in results]
    total = NUM_IMAGES * len(SOURCES)  # odd
    assert sorted(len(s) for s in served) == [total // 2, total // 2 + 1]
    assert not set(served[0]) & set(served[1])
    assert len(set(served[0]) | set(served[1])) == total

    assert results[0]["metrics"] == results[1]["metrics"]
    metrics = results[0]["metrics"]
    assert metrics["eval/images"] == total
    for key in ("val/tiny_instances/segm/AP", "val/tiny_people/keypoints/AP", "val/tiny_semantic/semantic/mIoU"):
        assert metrics[key] == pytest.approx(1.0, abs=1e-12)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert all(summary["sources"][name]["num_images"] == NUM_IMAGES for name in SOURCES)
