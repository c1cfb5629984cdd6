from dataclasses import dataclass
from pathlib import Path

import pytest

from data_pipelines.label_space import LabelSpace, build_label_space
from data_pipelines.streaming.config import SourceConfig
from data_pipelines.manifest import Manifest, load_manifest
from data_pipelines.streaming.config import TransformConfig
from tests.trainer.evaluation.tiny_sources import IMAGE_SIZE, SOURCES, write_tiny_sources
from trainer.evaluation.config import EvalConfig


@dataclass(frozen=True)
class TinySources:
    paths: dict[str, Path]  # source name -> converted directory
    manifests: list[Manifest]
    label_space: LabelSpace  # as training on the same sources would build it
    transforms: TransformConfig

    def eval_config(self, **kwargs) -> EvalConfig:
        sources = [SourceConfig(path=str(self.paths[name])) for name in SOURCES]
        return EvalConfig(sources=sources, **{"batch_size": 2, "num_workers": 0, **kwargs})

    def annotation_file(self, name: str) -> Path:
        """The raw COCO json the source was converted from."""
        return self.paths[name].parent / "raw" / name / "annotations.json"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinySources:
    paths = write_tiny_sources(tmp_path_factory.mktemp("tiny_sources"))
    manifests = [load_manifest(paths[name]) for name in SOURCES]
    return TinySources(paths, manifests, build_label_space(manifests), TransformConfig(image_size=IMAGE_SIZE))
