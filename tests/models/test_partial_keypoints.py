"""Two keypoint sources whose schemas differ, one a named subset of the other (in another
order), train together: the subset's keypoints land on their unified indices by name, and
the unified keypoints it lacks carry no loss."""
from __future__ import annotations

import json

import pytest
import torch

from data_pipelines.conversion import convert_coco
from data_pipelines.label_space import build_label_space
from data_pipelines.manifest import load_manifest
from data_pipelines.streaming.decode import decode_sample
from data_pipelines.streaming.eval_loader import source_samples
from data_pipelines.streaming.loader import build_train_loader
from data_pipelines.streaming.config import DataConfig, SourceConfig
from data_pipelines.streaming.config import TransformConfig
from models import build_model
from models.config import ModelConfig

# A named subset of the demo figures' keypoints, in its own order (neck and feet missing).
SUBSET = ["right_hand", "head", "left_hand", "pelvis"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sources(demo_sources, tmp_path_factory):
    """(full source dir, subset source dir): the demo keypoint images, converted once more
    with only ``SUBSET``'s keypoints annotated."""
    raw = demo_sources.parent / "raw" / "shapes_keypoints" / "train"
    coco = json.loads((raw / "annotations.json").read_text())
    (category,) = coco["categories"]
    picked = [category["keypoints"].index(name) for name in SUBSET]
    for ann in coco["annotations"]:
        values = [v for i in picked for v in ann["keypoints"][3 * i : 3 * i + 3]]
        ann.update(keypoints=values, num_keypoints=sum(v > 0 for v in values[2::3]))
    category.update(keypoints=SUBSET, skeleton=[[2, 4]], flip_map=[["left_hand", "right_hand"]],
                    sigmas=[category["sigmas"][i] for i in picked])
    out = tmp_path_factory.mktemp("subset")
    (out / "annotations.json").write_text(json.dumps(coco))
    convert_coco(raw / "images", out / "annotations.json", out / "figures_upper", name="figures_upper",
                 tasks=["detection", "keypoints"], shard_max_samples=8, workers=1)
    return demo_sources / "train" / "shapes_keypoints", out / "figures_upper"


def test_subset_keypoints_land_on_their_unified_indices(sources):
    full, subset = (load_manifest(s) for s in sources)
    # The subset first: the unified schema is still the larger one.
    space = build_label_space([subset, full])
    assert space.keypoint_schemas["keypoints"].names == full.keypoints.names
    unified = space.keypoint_schemas["keypoints"].names
    assert [unified[i] for i in space.keypoint_remap["figures_upper"]] == SUBSET
    assert space.coverage_table([subset, full])["figures_upper"] == {"detection": "1/1", "keypoints": "4/7"}
    missing = [unified.index(n) for n in unified if n not in SUBSET]
    kept = [unified.index(n) for n in SUBSET]
    checked = 0
    for raw_full, raw_subset in zip(source_samples(full, max_images=8), source_samples(subset, max_images=8)):
        a = decode_sample(raw_full, manifest=full, label_space=space)
        b = decode_sample(raw_subset, manifest=subset, label_space=space)
        assert b["keypoints"].shape == a["keypoints"].shape  # [N, 7, 2]
        assert torch.equal(b["keypoint_visibility"][:, kept], a["keypoint_visibility"][:, kept])
        assert torch.equal(b["keypoints"][:, kept], a["keypoints"][:, kept])
        assert not b["keypoint_visibility"][:, missing].any()  # not labelled: no loss
        checked += int(a["keypoint_visibility"][:, missing].any())
    assert checked  # the full source does label the keypoints the subset lacks


def test_sources_train_together_and_missing_keypoints_carry_no_loss(sources):
    cfg = DataConfig(sources=[SourceConfig(path=str(s)) for s in sources], batch_size=4, num_workers=0,
                     readers_per_rank=1, transforms=TransformConfig(image_size=128))
    loader, space, _ = build_train_loader(cfg, rank=0, world_size=1)
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(tasks=["detection", "keypoints"], fpn_channels=64, fcos_num_convs=1, keypoint_head_convs=1,
                    max_rois_per_image=4, backbone_norm="group_norm"),
        num_classes=space.num_classes(),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    missing = [i for i, n in enumerate(space.keypoint_schemas["keypoints"].names) if n not in SUBSET]
    heatmaps: list[torch.Tensor] = []

    def keep_grad(_module, _inputs, output: torch.Tensor) -> None:
        output.register_hook(heatmaps.append)

    model.heads["keypoints"].predictor.register_forward_hook(keep_grad)
    seen = {"shapes_keypoints": 0, "figures_upper": 0}
    checked = 0
    for _, batch in zip(range(6), loader):
        heatmaps.clear()
        out = model(batch)
        loss = out.losses["detection"] + out.losses["keypoints"]
        assert torch.isfinite(loss), out.losses
        optimizer.zero_grad()
        # The keypoint loss alone on the subset source's samples: its missing keypoints' heatmaps
        # get exactly zero gradient, the ones it has a non-zero one.
        only_subset = batch.task_mask.clone()
        only_subset[[s != "figures_upper" for s in batch.sources], space.task_names.index("keypoints")] = False
        subset_loss, count = model.heads["keypoints"].loss(
            out.features, model.padded_size(batch.images), batch.targets, only_subset[:, space.task_names.index("keypoints")])
        if count:
            heatmaps.clear()
            subset_loss.backward(retain_graph=True)
            (grad,) = heatmaps
            if grad.shape[0]:
                assert torch.count_nonzero(grad[:, missing]) == 0
                assert grad[:, [i for i in range(grad.shape[1]) if i not in missing]].abs().sum() > 0
                checked += 1
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for source in batch.sources:
            seen[source] += 1
    assert all(seen.values()) and checked, (seen, checked)


def test_a_subset_source_is_evaluated_on_its_own_keypoints(sources, tmp_path):
    # The model predicts the unified keypoints; the subset source is scored against its own
    # json (4 keypoints, its order, its sigmas), so a perfect prediction must score 1.
    from tests.trainer.evaluation.fakes import GroundTruthModel
    from trainer.evaluation.config import EvalConfig
    from trainer.evaluation.evaluator import evaluate

    full, subset = (load_manifest(s) for s in sources)
    space = build_label_space([full, subset])
    transforms = TransformConfig(image_size=128)
    eval_cfg = EvalConfig(sources=[SourceConfig(path=str(sources[1]))], num_workers=0, max_images=8)
    model = GroundTruthModel([subset], label_space=space, transforms=transforms)
    metrics = evaluate(model, eval_cfg, transforms=transforms, label_space=space, rank=0, world_size=1,
                       device=torch.device("cpu"), out_dir=tmp_path, step=1)
    assert metrics["val/figures_upper/keypoints/AP"] == pytest.approx(1.0, abs=1e-12)
    results = json.loads((tmp_path / "figures_upper_keypoints_results.json").read_text())
    assert results and all(len(r["keypoints"]) == 3 * len(SUBSET) for r in results)
