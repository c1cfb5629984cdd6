"""Two classification tasks on the same images: a folder of images with a CSV of two named
labels (one left empty on some images), converted with `polytask data convert imagefolder
--labels`, trained on 2 ranks and evaluated per task."""
import csv
import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, run_polytask

STEPS = 4


def _write_labels(split_dir, path) -> dict[str, dict[str, str]]:
    """shape: the image's class folder; parity: its index's parity, empty on every third image."""
    images = sorted(p for p in split_dir.rglob("*") if p.suffix in (".jpg", ".png"))
    rows = {}
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "shape", "parity"])
        for i, image in enumerate(images):
            name = image.relative_to(split_dir).as_posix()
            rows[name] = {"shape": image.parent.name, "parity": "" if i % 3 == 0 else ("even", "odd")[i % 2]}
            writer.writerow([name, rows[name]["shape"], rows[name]["parity"]])
    return rows


@pytest.fixture(scope="module")
def labelled(demo_sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    raw = demo_sources.parent / "raw" / "shapes_classes"
    sources = {}
    for split in ("train", "val"):
        rows = _write_labels(raw / split, root / f"{split}.csv")
        out = root / split / "tagged"
        proc = run_polytask("data", "convert", "imagefolder", "--root", str(raw / split), "--labels",
                            str(root / f"{split}.csv"), "--out", str(out), "--name", "tagged")
        assert proc.returncode == 0, proc.stderr[-3000:]
        sources[split] = (out, rows)
    return root, sources


def test_the_converter_writes_one_label_per_field_and_leaves_empty_cells_unlabelled(labelled):
    _, sources = labelled
    out, rows = sources["train"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"] == ["classification"] and manifest["classes"] == []
    assert manifest["image_labels"] == {"shape": ["circle", "square", "triangle"], "parity": ["even", "odd"]}
    import webdataset as wds

    seen = 0
    for sample in wds.WebDataset([str(out / s["path"]) for s in manifest["shards"]], shardshuffle=False):
        meta = json.loads(sample["json"])
        want = rows[meta["image"]["file_name"]]
        labels = meta["image_labels"]
        assert manifest["image_labels"]["shape"][labels["shape"]] == want["shape"]
        assert (labels["parity"] is None) == (want["parity"] == "")
        seen += 1
    assert seen == len(rows)


def test_bad_label_files_name_the_file_and_line(labelled, tmp_path, demo_sources):
    raw = demo_sources.parent / "raw" / "shapes_classes" / "train"
    image = sorted(raw.rglob("*.jpg"))[0].relative_to(raw).as_posix()
    for text, message in [
        ("name,shape\n", ":1: the header must be file,<label>"),
        ("file,detection\n", ":1: label name 'detection' must be unique"),
        (f"file,shape\n{image},circle\nmissing.jpg,square\n", ":3: image 'missing.jpg' is not a file inside"),
        (f"file,shape\n{image},circle\n{image},square\n", f":3: image '{image}' is listed twice"),
        (f"file,shape,size\n{image},circle\n", ":2: 2 values for the header's 3 columns"),
    ]:
        labels = tmp_path / "labels.csv"
        labels.write_text(text)
        proc = run_polytask("data", "convert", "imagefolder", "--root", str(raw), "--labels", str(labels),
                            "--out", str(tmp_path / "out"), "--name", "bad")
        assert proc.returncode != 0 and message in proc.stderr, (text, proc.stderr[-2000:])
        assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.fixture(scope="module")
def trained(labelled):
    root, sources = labelled
    cfg = yaml.safe_load((REPO / "configs" / "demo_cpu.yaml").read_text())
    cfg["run"]["dir"] = str(root / "run")
    cfg["data"]["sources"] = [{"path": str(sources["train"][0])}]
    cfg["eval"]["sources"] = [{"path": str(sources["val"][0])}]
    cfg["eval"]["best_metric"] = "val/tagged/shape/top1"
    cfg["eval"]["max_images"] = None
    cfg["trainer"].update(max_steps=STEPS, log_every=STEPS)
    config = root / "tagged.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "launcher", "launch", str(config), "--nproc-per-node", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return root / "run", proc, sources


def test_both_labels_of_the_same_images_train_and_evaluate(trained):
    run_dir, proc, sources = trained
    # The tasks default to one per label field; the start-up coverage shows both.
    assert "tagged  shape 3/3, parity 2/2" in proc.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (train,) = [r for r in rows if "lr" in r]
    assert train["loss/shape"] > 0 and train["loss/parity"] > 0
    # Every sample is labelled for shape; a third of them not for parity: no loss there.
    assert 0 < train["samples/parity"] < train["samples/shape"]
    (evaluation,) = [r for r in rows if "eval/images" in r]
    assert {"val/tagged/shape/top1", "val/tagged/parity/top1"} <= set(evaluation)
    step = run_dir / "eval" / f"step_{STEPS}"
    _, val_rows = sources["val"]
    shape = (step / "tagged_shape_predictions.jsonl").read_text().splitlines()
    parity = [json.loads(x) for x in (step / "tagged_parity_predictions.jsonl").read_text().splitlines()]
    assert len(shape) == len(val_rows)  # every image, scored on the label it has
    assert sorted(p["file_name"] for p in parity) == sorted(f for f, r in val_rows.items() if r["parity"])
    assert all(p["label"] == val_rows[p["file_name"]]["parity"] for p in parity)
    meta = json.loads((run_dir / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["outputs"] == {"shape": ["circle", "square", "triangle"], "parity": ["even", "odd"]}
