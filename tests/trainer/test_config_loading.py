"""Config loading: typed, validated, overrides checked; errors name the key path."""
from dataclasses import dataclass, field
from typing import Literal

import pytest

from trainer.config_loading import ConfigError, apply_overrides, from_dict, read_yaml


@dataclass(kw_only=True)
class Inner:
    lr: float = 0.1
    steps: int = 3
    mode: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)
    name: str | None = None


@dataclass(kw_only=True)
class Item:
    path: str
    weight: float = 1.0


@dataclass(kw_only=True)
class Root:
    inner: Inner = field(default_factory=Inner)
    items: list[Item] = field(default_factory=list)
    flag: bool = False


def test_nested_values_are_typed_and_ints_widen_to_float():
    cfg = from_dict(Root, {"inner": {"lr": 1, "steps": 7, "tags": ["x"]}, "items": [{"path": "p"}]})
    assert cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    assert cfg.inner.steps == 7 and cfg.items[0].path == "p" and cfg.items[0].weight == 1.0


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"lrr": 1}}, "inner.lrr: unknown key"),
        ({"inner": {"steps": "many"}}, "inner.steps: expected an integer, got 'many'"),
        ({"inner": {"steps": 1.5}}, "inner.steps: expected an integer"),
        ({"inner": {"mode": "c"}}, "inner.mode: expected one of ['a', 'b']"),
        ({"flag": "yes"}, "flag: expected true/false"),
        ({"items": [{"weight": 2}]}, "items.0.path: required key missing"),
        ({"items": [{"path": 3}]}, "items.0.path: expected a string"),
        ({"inner": {"tags": "x"}}, "inner.tags: expected a list"),
        ({"inner": {"name": 3}}, "inner.name: expected str or null"),
    ],
)
def test_errors_name_the_key_path(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(Root, data)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_overrides_parse_yaml_values_and_index_lists():
    data = {"inner": {"lr": 0.1}, "items": [{"path": "a"}, {"path": "b"}]}
    apply_overrides(data, ["inner.lr=0.5", "inner.steps=10", "items.1.weight=3", "flag=true", "inner.tags=[u, v]"])
    cfg = from_dict(Root, data)
    assert cfg.inner.lr == 0.5 and cfg.inner.steps == 10 and cfg.items[1].weight == 3.0
    assert cfg.flag is True and cfg.inner.tags == ["u", "v"]


def test_override_typo_is_an_error_not_a_default():
    data = apply_overrides({}, ["inner.setps=10"])
    with pytest.raises(ConfigError, match=r"inner\.setps: unknown key"):
        from_dict(Root, data)


@pytest.mark.parametrize("bad", ["novalue", "=3", "items.5.weight=1"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError):
        apply_overrides({"items": [{"path": "a"}]}, [bad])


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        read_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        read_yaml(lst)


@dataclass(kw_only=True)
class Typed:
    dir: str = "runs/x"
    lr: float = 0.1
    steps: int = 3
    flag: bool = False
    betas: list[float] = field(default_factory=list)
    note: str | None = "n"
    limit: int | None = 5
    options: dict[str, int] = field(default_factory=dict)


def _typed(*overrides):
    return from_dict(Typed, apply_overrides({}, list(overrides)))


def test_override_values_are_read_as_the_field_expects():
    cfg = _typed("dir=/x/a #b", "lr=1e-3", "steps=12", "flag=false", "betas=[0.9, 0.99]", "options={a: 1}")
    assert cfg.dir == "/x/a #b"  # str fields take the text verbatim: no YAML comment
    assert cfg.lr == 1e-3 and cfg.steps == 12 and cfg.flag is False and cfg.betas == [0.9, 0.99]
    assert cfg.options == {"a": 1}
    assert _typed("dir=null", "note=123").dir == "null" and _typed("note=123").note == "123"
    assert _typed("note=", "limit=null").note is None and _typed("limit=").limit is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("dir=", "dir: empty value"),  # not the current directory
        ("steps=1.5", "steps: expected an integer, got '1.5'"),
        ("steps=1e3", "steps: expected an integer"),
        ("lr=fast", "lr: expected a number, got 'fast'"),
        ("flag=maybe", "flag: expected true/false"),
        ("betas=[0.9", "betas: '[0.9' is not valid YAML"),
    ],
)
def test_bad_override_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        _typed(override)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_job_config_overrides_keep_hashes_and_parse_exponents(tmp_path):
    from trainer.config import load_config

    config = tmp_path / "job.yaml"
    config.write_text("data:\n  sources:\n    - path: a\n")
    cfg = load_config(config, ["run.dir=/x/a #b", "optim.lr=1e-3", "data.sources=[{path: b}]", "data.sources.0.path=c #d"])
    assert cfg.run.dir == "/x/a #b" and cfg.optim.lr == 1e-3 and cfg.data.sources[0].path == "c #d"
    with pytest.raises(ConfigError, match=r"run\.dir: empty value"):
        load_config(config, ["run.dir="])
    config.write_text("run:\n  dir: ''\ndata:\n  sources:\n    - path: a\n")
    with pytest.raises(ConfigError, match=r"run\.dir is empty"):
        load_config(config)
