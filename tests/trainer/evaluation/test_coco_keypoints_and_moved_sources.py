"""A COCO person-keypoints source scores exactly what plain pycocotools scores (COCO's own
OKS sigmas, though its json carries none), and a converted source holds its ground truth:
moved elsewhere, with the original json gone, it still evaluates."""
import json
import shutil

import pytest
import torch
from pycocotools.cocoeval import COCOeval

from data_pipelines.label_space import build_label_space
from data_pipelines.manifest import load_manifest
from data_pipelines.streaming.config import SourceConfig
from tests.trainer.evaluation.fakes import GroundTruthModel
from tests.trainer.evaluation.pycocotools_reference import pycocotools_stats
from tests.trainer.evaluation.tiny_sources import IMAGE_SIZE, write_coco_person_source
from data_pipelines.streaming.config import TransformConfig
from trainer.evaluation.coco_metrics import STAT_NAMES
from trainer.evaluation.config import EvalConfig
from trainer.evaluation.evaluator import evaluate
from trainer.preflight import eval_source_specs

NAME = "coco_people"
TRANSFORMS = TransformConfig(image_size=IMAGE_SIZE)


def _evaluate(source_dir, out_dir) -> dict[str, float]:
    manifests = [load_manifest(source_dir)]
    label_space = build_label_space(manifests)
    model = GroundTruthModel(manifests, label_space=label_space, transforms=TRANSFORMS, noise=0.5)
    cfg = EvalConfig(sources=[SourceConfig(path=str(source_dir))], batch_size=2, num_workers=0)
    # The ranks' start-up check (and the launcher's) finds the ground truth too.
    eval_source_specs(cfg, label_space=label_space)
    return evaluate(model, cfg, transforms=TRANSFORMS, label_space=label_space, rank=0, world_size=1,
                    device=torch.device("cpu"), out_dir=out_dir)


@pytest.fixture(scope="module")
def people(tmp_path_factory):
    raw_json, source_dir = write_coco_person_source(tmp_path_factory.mktemp("people"), name=NAME)
    out_dir = tmp_path_factory.mktemp("eval")
    return raw_json, source_dir, out_dir, _evaluate(source_dir, out_dir)


def test_keypoint_ap_of_a_coco_person_source_is_pycocotools_default(people):
    raw_json, _, out_dir, metrics = people
    results = out_dir / f"{NAME}_keypoints_results.json"
    expected = pycocotools_stats(raw_json, results, "keypoints")
    ours = [metrics[f"val/{NAME}/keypoints/{name}"] for name in STAT_NAMES["keypoints"]]
    assert ours == expected
    assert 0.0 < ours[0] < 1.0  # a real mix of hits and misses
    # The test can tell: one sigma for every joint (the old default) scores otherwise.
    assert pycocotools_stats(raw_json, results, "keypoints", sigmas=[0.05] * 17)[0] != expected[0]


def test_summary_records_the_sigmas_used(people):
    _, _, out_dir, _ = people
    source = json.loads((out_dir / "summary.json").read_text())["sources"][NAME]
    defaults = COCOeval(iouType="keypoints").params.kpt_oks_sigmas.tolist()
    assert source["kpt_oks_sigmas"] == defaults
    assert source["cocoeval_params"]["keypoints"]["kpt_oks_sigmas"] == defaults


def test_a_moved_source_evaluates_without_its_original_json(tmp_path):
    raw_json, source_dir = write_coco_person_source(tmp_path / "here", name=NAME)
    before = _evaluate(source_dir, tmp_path / "eval_before")
    moved = tmp_path / "cluster" / "data" / NAME
    moved.parent.mkdir(parents=True)
    shutil.move(source_dir, moved)
    shutil.rmtree(tmp_path / "here")  # the raw json and images are gone
    assert not raw_json.exists()

    after = _evaluate(moved, tmp_path / "eval_after")
    assert {k: v for k, v in after.items() if k.startswith("val/")} == \
        {k: v for k, v in before.items() if k.startswith("val/")}
    summary = json.loads((tmp_path / "eval_after" / "summary.json").read_text())
    assert summary["sources"][NAME]["ground_truth"]["keypoints"] == str(moved / "annotations.json")


def test_start_up_names_a_missing_or_old_style_ground_truth(tmp_path):
    _, source_dir = write_coco_person_source(tmp_path, name=NAME)
    label_space = build_label_space([load_manifest(source_dir)])  # as the training sources give it
    cfg = EvalConfig(sources=[SourceConfig(path=str(source_dir))])

    def specs():
        return eval_source_specs(cfg, label_space=label_space)

    manifest_path = source_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    # Written by an older converter: the original json's absolute path.
    manifest_path.write_text(json.dumps({**manifest, "annotation_file": str(tmp_path / "raw" / "x.json")}))
    with pytest.raises(ValueError, match=r"^eval\.sources\[0\]\.path: .*manifest\.json: annotation_file .* is "
                                         r"absolute.* re-run `polytask data convert coco`"):
        specs()
    manifest_path.write_text(json.dumps(manifest))
    (source_dir / "annotations.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"^eval\.sources\[0\]\.path: validation source '{NAME}' .* "
                                                rf"{source_dir / 'annotations.json'}, which does not exist"):
        specs()
