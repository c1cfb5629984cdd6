"""YAML + dotted ``key=value`` overrides -> typed dataclass configs, checked against the types.

A typo is an error, never a default: unknown keys, wrong types and missing files raise
:class:`ConfigError` with a one-line message naming the key path and what was expected.
"""
from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file, key or value the user must fix."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


class OverrideText(str):
    """The text of a ``key=value`` override, kept as typed until the field it lands in is
    known: :func:`_convert` reads it as that field's type (see :func:`_from_text`).

    Parsing it as YAML up front did not know the field: ``run.dir=/x/a #b`` lost ``#b`` as a
    comment, ``run.dir=`` became the current directory and ``optim.lr=1e-3`` a string."""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides in place; each value stays an :class:`OverrideText`
    that the typed conversion (:func:`from_dict`) reads as its field's type.

    Paths are not checked here (the typed conversion does that, naming the full path);
    an index into a list (``data.sources.0.weight=2``) must exist.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        value = OverrideText(raw)
        parts = key.split(".")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                index = _list_index(node, part, where)
                node[index] = _container(node[index], where)
                node = node[index]
            else:
                nxt = _container(node.get(part), where)
                if not isinstance(nxt, (dict, list)):
                    nxt = {}
                node[part] = nxt
                node = nxt
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, key)] = value
        else:
            node[last] = value
    return data


def _container(node: Any, where: str) -> Any:
    """An earlier override's text that a later one indexes into (``data.sources=[...]``, then
    ``data.sources.0.path=x``) is a container: parse it now."""
    return _yaml_text(node, where) if isinstance(node, OverrideText) else node


def _yaml_text(text: str, path: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {str(text)!r} is not valid YAML ({str(e).splitlines()[0]})") from None


_NULL_WORDS = ("null", "none", "~", "")
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _from_text(tp: Any, text: OverrideText, path: str) -> Any:
    """Override text read as a (non-union) field of type ``tp`` expects: str fields take it
    verbatim (``#`` included), numbers go through int()/float(), bools take true/false
    words, containers and nested configs are YAML. Text that does not parse is returned as
    is, so that the type check names the key and the value."""
    plain = str(text)
    if tp is str:
        if plain == "":
            raise ConfigError(f"{path}: empty value; give one, or leave the key out for its default")
        return plain
    if tp is Any:
        return _any_from_text(plain, path)
    if tp is bool:
        return _BOOL_WORDS.get(plain.strip().lower(), plain)
    if tp in (int, float):
        try:
            return tp(plain.strip())
        except ValueError:
            return plain
    if get_origin(tp) is Literal:
        return next((c for c in get_args(tp) if str(c) == plain), plain)
    if get_origin(tp) in (list, tuple, dict) or dataclasses.is_dataclass(tp):
        return _yaml_text(plain, path)
    return plain


def _any_from_text(plain: str, path: str) -> Any:
    """An untyped value (``balancer.options.<name>``, ``trainer.deepspeed.extra``): a number,
    a bool or null word, a YAML list/mapping, else the text verbatim."""
    for number in (int, float):
        try:
            return number(plain)
        except ValueError:
            pass
    word = plain.strip().lower()
    if word in _BOOL_WORDS and not word.isdigit():
        return _BOOL_WORDS[word]
    if word in _NULL_WORDS and word:
        return None
    if plain.lstrip().startswith(("[", "{")):
        return _yaml_text(plain, path)
    return plain


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{where}: expected a list index below {len(node)}, got {part!r}")
    return int(part)


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking every key and type."""
    label = path or "<root>"
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping for {cls.__name__}, got {_describe(data)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        renamed = getattr(cls, "RENAMED_KEYS", {})  # old key -> what to write instead
        if unknown[0] in renamed:
            raise ConfigError(f"{where}: renamed; {renamed[unknown[0]]}")
        raise ConfigError(f"{where}: unknown key; expected one of {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{path}.{name}" if path else name)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"{path}.{missing[0]}" if path else missing[0]
        raise ConfigError(f"{where}: required key missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{label}: {e}") from None


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        if isinstance(value, OverrideText) and type(None) in options and value.strip().lower() in _NULL_WORDS:
            return None  # `key=`, `key=null`: unset an optional field
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _convert(opt, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
    if isinstance(value, OverrideText):
        value = _from_text(tp, value, path)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: expected one of {list(choices)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(item_tp, v, f"{path}.{i}") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        key_tp, val_tp = get_args(tp) or (Any, Any)
        return {_convert(key_tp, k, path): _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp!r}")  # a bug in a config class


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    if isinstance(value, OverrideText):
        value = str(value)
    return f"{value!r} ({type(value).__name__})"


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form of a config (what ``config.yaml`` in the run directory holds)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = ["ConfigError", "OverrideText", "read_yaml", "apply_overrides", "from_dict", "to_dict", "dump_yaml"]
