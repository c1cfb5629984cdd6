"""Classification evaluation writes per-image predictions and a confusion matrix: a model
that predicts one class for every image (the failure a top-1 number hides) must show up as
one full column, and every line must name its image, its true class and the prediction."""
import json

import torch
import torch.nn.functional as F

from tests.trainer.evaluation.fakes import GroundTruthModel
from tests.trainer.evaluation.tiny_sources import NUM_IMAGES
from trainer.evaluation.evaluator import evaluate

SOURCE = "tiny_classes"


class OneClassModel(GroundTruthModel):
    """The ground truth for every task but classification, where it always says class 0."""

    def _outputs(self, sample: dict) -> dict[str, torch.Tensor]:
        out = super()._outputs(sample)
        for key in [k for k in out if k.startswith("class_logits/")]:
            out[key] = F.one_hot(torch.tensor(0), len(out[key])).float()
        return out


def test_classification_writes_predictions_and_confusion(tiny, tmp_path):
    model = OneClassModel(tiny.manifests, label_space=tiny.label_space, transforms=tiny.transforms)
    metrics = evaluate(
        model, tiny.eval_config(), transforms=tiny.transforms, label_space=tiny.label_space,
        rank=0, world_size=1, device=torch.device("cpu"), out_dir=tmp_path, step=3,
    )
    names = tiny.label_space.classes["classification"]
    summary = json.loads((tmp_path / "summary.json").read_text())["sources"][SOURCE]
    lines = [json.loads(x) for x in (tmp_path / summary["classification_predictions"]).read_text().splitlines()]

    assert len(lines) == NUM_IMAGES
    assert len({line["image_id"] for line in lines}) == NUM_IMAGES
    for line in lines:
        # ImageFolder file names are <class>/<file>: the true class is read from the right image.
        assert line["file_name"].split("/")[0] == line["label"]
        assert line["prediction"] == names[0] and line["top5"][0]["class"] == names[0]
        assert line["correct"] == (line["label"] == names[0])
        assert sorted(p["class"] for p in line["top5"]) == sorted(names)  # 3 classes: all in the top-5
        assert abs(sum(p["score"] for p in line["top5"]) - 1.0) < 1e-6
    correct = sum(line["correct"] for line in lines)
    assert 0 < correct < NUM_IMAGES  # the set holds several classes, so one class is partly right
    assert metrics[f"val/{SOURCE}/classification/top1"] == correct / NUM_IMAGES

    confusion = json.loads((tmp_path / summary["classification_confusion"]).read_text())
    assert sorted(confusion["classes"]) == sorted(names)
    column = confusion["classes"].index(names[0])
    for row, name in zip(confusion["matrix"], confusion["classes"]):
        # Every image of each true class sits in the one predicted column.
        assert row[column] == sum(line["label"] == name for line in lines)
        assert sum(row) == row[column]
