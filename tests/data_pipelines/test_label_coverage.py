"""Per-source class and keypoint coverage (invariant 7): derived from the manifests, carried
per sample through decode, collate and the worker transport, and bad label spaces stopped
before the ranks start with one line naming the source and the task."""
from __future__ import annotations

import json
import re
import pickle
import shutil

import pytest
import torch

from data_pipelines.label_space import build_label_space, coverage_lines
from data_pipelines.manifest import KeypointSchema, Manifest, ShardInfo, load_manifest
from data_pipelines.streaming.batch_transport import pack, unpack
from data_pipelines.streaming.collate import collate
from data_pipelines.streaming.decode import decode_sample
from data_pipelines.streaming.eval_loader import source_samples
from launcher.cli import main
from tests.conftest import REPO

DEMO = str(REPO / "configs" / "demo_cpu.yaml")
FIGURE = KeypointSchema(names=["head", "left_hand", "right_hand"], flip_map=[["left_hand", "right_hand"]],
                        sigmas=[0.05] * 3)


def _manifest(name: str, tasks: list[str], **fields) -> Manifest:
    return Manifest(name=name, tasks=tasks, shards=[ShardInfo(path="a.tar", num_samples=1)], **fields)


def _categories(*names: str) -> list[dict]:
    return [{"id": 10 + i, "name": n} for i, n in enumerate(names)]


def test_coverage_per_source_and_task(demo_sources):
    manifests = [load_manifest(demo_sources / "train" / s)
                 for s in ("shapes_instances", "shapes_keypoints", "shapes_semantic", "shapes_classes")]
    space = build_label_space(manifests)
    assert space.classes["detection"] == ["circle", "square", "triangle", "figure"]
    assert space.covered("shapes_keypoints", "detection") == [3]
    assert space.covered("shapes_instances", "instance_mask") == [0, 1, 2]
    assert space.covered("shapes_semantic", "detection") is None  # does not label it
    assert space.coverage_table(manifests) == {
        "shapes_instances": {"detection": "3/4", "instance_mask": "3/4"},
        "shapes_keypoints": {"detection": "1/4", "keypoints": "7/7"},
        "shapes_semantic": {"semantic": "4/4"},
        "shapes_classes": {"classification": "3/3"},
    }
    assert coverage_lines(space.coverage_table(manifests))[1] == "shapes_keypoints  detection 1/4, keypoints 7/7"
    # Per sample: a coverage vector only where a source covers part of a task's classes.
    raw = next(source_samples(manifests[1], max_images=1))
    sample = decode_sample(raw, manifest=manifests[1], label_space=space)
    assert sample["thing_coverage"].tolist() == [False, False, False, True]
    assert "semantic_coverage" not in sample and "class_coverage/classification" not in sample
    raw = next(source_samples(manifests[2], max_images=1))
    assert "semantic_coverage" not in decode_sample(raw, manifest=manifests[2], label_space=space)


def test_partial_semantic_and_image_classes_are_covered_by_name():
    space = build_label_space([
        _manifest("city", ["semantic", "classification"], semantic_classes=["road", "car"], classes=["day", "night"]),
        _manifest("indoor", ["semantic", "classification"], semantic_classes=["floor", "car"], classes=["night"]),
    ])
    assert space.classes["semantic"] == ["road", "car", "floor"] and space.classes["classification"] == ["day", "night"]
    coverage = space.sample_coverage("indoor")
    assert coverage["semantic_coverage"].tolist() == [False, True, True]
    assert coverage["class_coverage/classification"].tolist() == [False, True]
    assert space.sample_coverage("city")["semantic_coverage"].tolist() == [True, True, False]
    assert "class_coverage/classification" not in space.sample_coverage("city")  # covers every image class


def test_coverage_travels_through_collate_and_the_worker_transport():
    space = build_label_space([
        _manifest("a", ["detection"], categories=_categories("car", "dog")),
        _manifest("b", ["detection"], categories=_categories("car")),
    ])

    def sample(source: str, i: int) -> dict:
        from torchvision import tv_tensors

        from data_pipelines.schema import TASK_TYPES, task_mask_for

        return {"key": f"{source}/{i}", "source": source, "image": tv_tensors.Image(torch.zeros(3, 4, 4, dtype=torch.uint8)),
                "task_mask": task_mask_for(["detection"], TASK_TYPES), "boxes": torch.zeros(0, 4),
                "labels": torch.zeros(0, dtype=torch.int64), **space.sample_coverage(source)}

    samples = [sample("b", 0), sample("a", 1), sample("b", 2)]
    for batch in (collate(samples), unpack(pickle.loads(pickle.dumps(pack(samples))))):
        assert [t.get("thing_coverage") is None for t in batch.targets] == [False, True, False]
        assert batch.targets[0]["thing_coverage"].tolist() == [True, False]
        assert batch.targets[2]["thing_coverage"].tolist() == [True, False]


def test_keypoint_subset_is_remapped_by_name_and_flip_pairs_must_agree():
    upper = KeypointSchema(names=["right_hand", "left_hand"], flip_map=[["right_hand", "left_hand"]], sigmas=[0.1] * 2)
    space = build_label_space([_manifest("hands", ["keypoints"], keypoints=upper),
                               _manifest("figures", ["keypoints"], keypoints=FIGURE)])
    assert space.keypoint_schemas["keypoints"] == FIGURE and space.keypoint_remap == {"hands": [2, 1], "figures": [0, 1, 2]}
    assert space.coverage_table([_manifest("hands", ["keypoints"], keypoints=upper)]) == {"hands": {"keypoints": "2/3"}}
    no_pair = KeypointSchema(names=["left_hand", "right_hand"], sigmas=[0.1] * 2)
    with pytest.raises(ValueError, match=r"source 'hands': keypoint schema of task 'keypoints': lacks the unified "
                                         r"schema's flip pair \['left_hand', 'right_hand'\]"):
        build_label_space([_manifest("figures", ["keypoints"], keypoints=FIGURE),
                           _manifest("hands", ["keypoints"], keypoints=no_pair)])
    odd_pair = KeypointSchema(names=["head", "left_hand"], flip_map=[["head", "left_hand"]], sigmas=[0.1] * 2)
    with pytest.raises(ValueError, match=r"source 'odd': .*flip pair \['head', 'left_hand'\] is not a flip pair"):
        build_label_space([_manifest("figures", ["keypoints"], keypoints=FIGURE),
                           _manifest("odd", ["keypoints"], keypoints=odd_pair)])


@pytest.mark.parametrize(("manifests", "message"), [
    ([_manifest("figures", ["keypoints"], keypoints=FIGURE),
      _manifest("tails", ["keypoints"], keypoints=KeypointSchema(names=["head", "tail"], sigmas=[0.1] * 2))],
     "source 'tails': keypoint schema of task 'keypoints': keypoint name(s) ['tail'] are not in the unified schema"),
    ([_manifest("coco", ["detection"], categories=_categories("person", "person"))],
     "source 'coco', task 'detection': categories names 'person' twice"),
    ([_manifest("coco", ["detection", "instance_mask"], categories=_categories("traffic light")),
      _manifest("city", ["instance_mask"], categories=_categories("Traffic_Light"))],
     "source 'city', task 'instance_mask': categories 'Traffic_Light' differs from the class 'traffic light'"),
    ([_manifest("ade", ["semantic"], semantic_classes=["wall", "Wall"])],
     "source 'ade', task 'semantic': semantic_classes 'wall' and 'Wall' differ only in case"),
    ([_manifest("tags", ["classification"], classes=["day", ""])],
     "source 'tags', task 'classification': classes has an empty or non-text name ''"),
])
def test_bad_label_spaces_name_the_source_and_task(manifests, message):
    with pytest.raises(ValueError) as error:
        build_label_space(manifests)
    assert message in str(error.value)


def _copy_source(src, dst, **changes):
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for key, change in changes.items():
        manifest[key] = change(manifest[key]) if callable(change) else change
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize("case", ["keypoint_name", "class_collision", "wrong_task_type"])
def test_launcher_stops_bad_label_spaces_before_the_ranks(demo_sources, tmp_path, capsys, case):
    train = demo_sources / "train"
    if case == "keypoint_name":
        renamed = lambda k: {**k, "names": ["skull", *k["names"][1:]]}  # noqa: E731
        bad = _copy_source(train / "shapes_keypoints", tmp_path / "bad", name="other_figures", keypoints=renamed)
        paths, expected = [train / "shapes_keypoints", bad], ("source 'other_figures'", "['skull']", "'keypoints'")
    elif case == "class_collision":
        bad = _copy_source(train / "shapes_instances", tmp_path / "bad", name="more_shapes",
                           categories=lambda cats: [{**c, "name": c["name"].upper()} for c in cats])
        paths, expected = [train / "shapes_instances", bad], ("source 'more_shapes'", "task 'detection'", "'CIRCLE'")
    else:  # an ImageFolder source mapped to detection: it has no boxes or categories
        bad = _copy_source(train / "shapes_classes", tmp_path / "bad", tasks=["classification", "detection"])
        paths, expected = [bad], ("source 'shapes_classes'", "task 'detection'", "no 'categories'")
    sources = "[" + ", ".join("{path: %s}" % p for p in paths) + "]"
    code = main(["launch", DEMO, "--nproc-per-node=2", "--dry-run", f"run.dir={tmp_path}/run",
                 f"data.sources={sources}", "eval.sources=[]", "eval.best_metric=null"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(errors) == 1, errors
    assert all(part in errors[0] for part in expected), errors
    assert not (tmp_path / "run").exists()


# Named tasks (data_pipelines/tasks.py): several tasks of one type, each with its own label space.

def _tasks(**types) -> list:
    from data_pipelines.tasks import parse_tasks

    return parse_tasks(types)


HANDS = KeypointSchema(names=["thumb", "index"], sigmas=[0.1] * 2)
HAND = KeypointSchema(names=["thumb"], sigmas=[0.1])


def test_several_tasks_of_one_type_have_their_own_label_spaces():
    tasks = _tasks(coco="detection", driving="detection", people={"type": "keypoints", "boxes_from": "coco"},
                   hands={"type": "keypoints", "boxes_from": "coco"}, weather="classification",
                   daytime="classification")
    manifests = [
        _manifest("coco", ["detection", "keypoints"], categories=_categories("person", "dog"), keypoints=FIGURE),
        _manifest("cars", ["detection"], categories=_categories("car", "person")),
        _manifest("hands_a", ["keypoints"], keypoints=HANDS),
        _manifest("hands_b", ["keypoints"], keypoints=HAND),
        _manifest("sky", ["classification"], classes=["sun", "rain"]),
        _manifest("clock", ["classification"], classes=["day", "night"]),
    ]
    space = build_label_space(manifests, tasks, [{"detection": "coco", "keypoints": "people"},
                                                 {"detection": "driving"}, {"keypoints": "hands"},
                                                 {"keypoints": "hands"}, {"classification": "weather"},
                                                 {"classification": "daytime"}])
    # "person" in two detection tasks is two outputs, one per head: label spaces do not merge across tasks.
    assert space.classes["coco"] == ["person", "dog"] and space.classes["driving"] == ["car", "person"]
    assert space.classes["people"] == FIGURE.names and space.classes["hands"] == ["thumb", "index"]
    assert space.classes["weather"] == ["sun", "rain"] and space.classes["daytime"] == ["day", "night"]
    assert space.category_to_index["cars"] == {10: 0, 11: 1}
    assert space.keypoint_remap["hands_b"] == [0]  # into its own task's unified schema, not the figure's
    assert space.task_mask("coco").tolist() == [True, False, True, False, False, False]
    assert space.task_mask("clock").tolist() == [False, False, False, False, False, True]
    assert space.coverage_table(manifests)["hands_b"] == {"hands": "1/2"}
    assert space.num_classes() == {"coco": 2, "driving": 2, "people": 3, "hands": 2, "weather": 2, "daytime": 2}


def test_a_source_type_goes_to_the_task_named_after_it_else_the_only_one_of_its_type():
    tasks = _tasks(detection="detection", things="detection", weather="classification")
    space = build_label_space([_manifest("coco", ["detection"], categories=_categories("dog")),
                               _manifest("cars", ["detection"], categories=_categories("car")),
                               _manifest("sky", ["classification", "semantic"], classes=["sun"],
                                         semantic_classes=["cloud"])], tasks, [None, {"detection": "things"}, None])
    assert space.source_tasks == {"coco": {"detection": "detection"}, "cars": {"detection": "things"},
                                  "sky": {"classification": "weather"}}
    # A type no task has (semantic) is not trained: a task without any source is an error.
    with pytest.raises(ValueError, match=r"no source in data\.sources feeds task\(s\) \['things'\]"):
        build_label_space([_manifest("coco", ["detection"], categories=_categories("dog"))],
                          _tasks(detection="detection", things="detection"))


@pytest.mark.parametrize(("tasks", "mappings", "message"), [
    ({"coco": "detection", "cars": "detection"}, [None],
     "data.sources[0].tasks: source 'coco' has 'detection' annotations and there are several detection tasks "
     "['coco', 'cars']; map it to one"),
    ({"things": "detection", "weather": "classification"}, [{"detection": "weather"}],
     "data.sources[0].tasks: source 'coco' maps its 'detection' annotations to task 'weather', which is a "
     "'classification' task"),
    ({"things": "detection"}, [{"detection": "stuff"}],
     "data.sources[0].tasks: source 'coco' maps 'detection' to task 'stuff', which model.tasks does not name"),
    ({"things": "detection"}, [{"semantic": "things"}],
     "data.sources[0].tasks: source 'coco' has no 'semantic' annotations"),
    ({"a": "detection", "b": "detection", "masks": {"type": "instance_mask", "boxes_from": "a"}},
     [{"detection": "b", "instance_mask": "masks"}],
     "data.sources[0].tasks: source 'coco' feeds detection task 'b' but instance_mask task 'masks', which takes "
     "its boxes from 'a'"),
])
def test_bad_task_mappings_name_the_source_and_task(tasks, mappings, message):
    from data_pipelines.tasks import parse_tasks

    manifest = _manifest("coco", ["detection", "instance_mask"], categories=_categories("dog"))
    with pytest.raises(ValueError) as error:
        build_label_space([manifest], parse_tasks(tasks), mappings)
    assert message in str(error.value)


def test_image_label_fields_feed_a_classification_task_each():
    tagged = _manifest("tagged", ["classification"], image_labels={"weather": ["sun", "rain"], "daytime": ["day"]})
    plain = _manifest("plain", ["classification"], classes=["rain", "snow"])
    space = build_label_space([tagged, plain], _tasks(weather="classification", daytime="classification"),
                              [None, {"classification": "weather"}])
    # Fields go to the tasks named after them; the plain source's one label is mapped.
    assert space.source_tasks == {"tagged": {"weather": "weather", "daytime": "daytime"},
                                  "plain": {"classification": "weather"}}
    assert space.classes == {"weather": ["sun", "rain", "snow"], "daytime": ["day"]}
    assert space.class_remap == {"tagged": {"weather": [0, 1], "daytime": [0]}, "plain": {"classification": [1, 2]}}
    assert space.task_mask("tagged").tolist() == [True, True]
    assert space.sample_coverage("tagged")["class_coverage/weather"].tolist() == [True, True, False]
    assert "class_coverage/daytime" not in space.sample_coverage("tagged")
    assert space.coverage_table([tagged, plain]) == {"tagged": {"weather": "2/3", "daytime": "1/1"},
                                                     "plain": {"weather": "2/3"}}
    # Derived tasks: one per field (the plain source's is "classification").
    derived = build_label_space([tagged, plain])
    assert derived.task_names == ["weather", "daytime", "classification"]


@pytest.mark.parametrize(("tasks", "mapping", "message"), [
    ({"a": "classification", "b": "classification"}, None,
     "data.sources[0].tasks: source 'tagged' has image label 'weather' and there are several classification tasks"),
    ({"a": "classification", "b": "classification"}, {"weather": "a", "daytime": "a"},
     "data.sources[0].tasks: source 'tagged' feeds task(s) ['a'] from more than one annotation"),
    ({"a": "classification", "things": "detection"}, {"weather": "things", "daytime": "a"},
     "source 'tagged' maps its 'weather' annotations to task 'things', which is a 'detection' task"),
    ({"a": "classification"}, {"season": "a"},
     "data.sources[0].tasks: 'season' is not an annotation type or image-label field of source 'tagged'"),
])
def test_bad_image_label_mappings_name_the_source_and_task(tasks, mapping, message):
    from data_pipelines.tasks import parse_tasks

    tagged = _manifest("tagged", ["classification"], image_labels={"weather": ["sun"], "daytime": ["day"]})
    with pytest.raises(ValueError) as error:
        build_label_space([tagged], parse_tasks(tasks), [mapping])
    assert message in str(error.value)


@pytest.mark.parametrize(("fields", "message"), [
    ({"classes": ["a"], "image_labels": {"w": ["x"]}}, "has both 'classes' and 'image_labels'"),
    ({"image_labels": {"semantic": ["x"]}}, "image_labels field 'semantic' must be a name without '/' and not a task"),
    ({"image_labels": {"w": []}}, "image_labels['w'] must list its class names"),
])
def test_bad_image_labels_in_a_manifest_are_refused(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _manifest("tagged", ["classification"], **fields).validate("manifest.json")
