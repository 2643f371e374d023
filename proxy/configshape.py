"""The shape of a YAML config checked against typed settings, every problem at once.

Owns what can be said about a config file before any value is resolved: YAML that
repeats a key (refused: the last one would win unseen), and, walking the data beside
the msgspec Struct types, each unknown key (with "did you mean" for a near miss),
each missing required key, each value of the wrong type and each value outside an
allowed set (naming the allowed values). proxy/config.py turns the whole list into
one error; nothing here knows which settings exist.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Any

import msgspec
import yaml

Problem = tuple[str, str]  # (key path, reason)

# Keys that moved: an old config says where they went instead of "unknown key".
MOVED = {"log_level": "logging.level"}

_MSGSPEC_PATH = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")
# A msgspec.Meta bound that failed ("Expected `int` >= 1"), and our words for it.
_BOUND = re.compile(r"^Expected `(?:int|float)` (?P<op>>=|>|<=|<) (?P<limit>-?[0-9.]+)$")
_BOUND_WORDS = {">=": "must be at least", ">": "must be more than", "<=": "must be at most",
                "<": "must be less than"}


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False
                          ) -> dict[Any, Any]:
        seen: dict[tuple[str, str], yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            ident = (key_node.tag, key_node.value)
            first = seen.setdefault(ident, key_node)
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r} (first at line "
                    f"{first.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """safe_load, refusing duplicate keys. Raises yaml.YAMLError."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def explain(err: msgspec.ValidationError) -> Problem:
    """Split a msgspec message into (key path, reason) in our words."""
    m = _MSGSPEC_PATH.match(str(err))
    assert m is not None
    what, path = m.group("what"), (m.group("path") or "").lstrip(".").replace("`", "")
    field = re.search(r"field `([^`]+)`", what)
    if what.startswith("Object missing required field") and field:
        return _join(path, field.group(1)), "required key is missing"
    if what.startswith("Object contains unknown field") and field:
        return _join(path, field.group(1)), "unknown key"
    bound = _BOUND.match(what)
    if bound:
        return path, _bound_words(bound.group("op"), bound.group("limit"))
    if what == "Expected `array` of length >= 1":
        return path, "must list at least one"
    what = what.replace("`", "")
    return path, what[0].lower() + what[1:] if what else "invalid value"


def _bound_words(op: str, limit: str) -> str:
    limit = limit.removesuffix(".0")
    if limit == "0" and op in (">=", ">"):
        return "must not be negative" if op == ">=" else "must be positive"
    return f"{_BOUND_WORDS[op]} {limit}"


def _join(path: str, key: str) -> str:
    if not path:
        return key
    return f"{path}{key}" if key.startswith("[") else f"{path}.{key}"


def problems(data: Any, kind: Any, path: str = "") -> list[Problem]:
    """Every problem of `data` as a value of type `kind` (a Struct, a container of
    them, or a leaf type), in file order."""
    origin = typing.get_origin(kind)
    if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
        return _struct_problems(data, kind, path)
    found = None
    if origin in (types.UnionType, typing.Union):
        found = _union_problems(data, kind, path)
    elif origin in (tuple, dict):
        found = _item_problems(data, kind, path)
    return found if found is not None else _leaf_problems(data, kind, path)


def _union_problems(data: Any, kind: Any, path: str) -> list[Problem] | None:
    """None allowed, or the one Struct of the union walked; None: check as a leaf."""
    members = [a for a in typing.get_args(kind) if a is not type(None)]
    if data is None and len(members) < len(typing.get_args(kind)):
        return []
    structs = [m for m in members if isinstance(m, type) and issubclass(m, msgspec.Struct)]
    if len(structs) == 1 and isinstance(data, dict):
        return problems(data, structs[0], path)
    return None


def _item_problems(data: Any, kind: Any, path: str) -> list[Problem] | None:
    """Each item of a `tuple[X, ...]` list or each value of a dict walked, named by its
    index or key; None: check as a leaf."""
    args = typing.get_args(kind)
    if isinstance(data, list) and len(args) == 2 and args[1] is Ellipsis:
        return [p for i, item in enumerate(data)
                for p in problems(item, args[0], _join(path, f"[{i}]"))]
    if isinstance(data, dict) and typing.get_origin(kind) is dict:
        return [p for key, value in data.items()
                for p in problems(value, args[1], _join(path, str(key)))]
    return None


def _struct_problems(data: Any, kind: type[msgspec.Struct], path: str) -> list[Problem]:
    if not isinstance(data, dict):
        return [(path, f"expected a mapping of settings, got {_kind_of(data)}")]
    fields = {f.encode_name: f for f in msgspec.structs.fields(kind)}
    found: list[Problem] = []
    for key, value in data.items():
        field = fields.get(key) if isinstance(key, str) else None
        if field is None:
            found.append((_join(path, str(key)), "unknown key" + _suggest(str(key), fields)))
        else:
            found += problems(value, field.type, _join(path, key))
    found += [(_join(path, name), "required key is missing")
              for name, f in fields.items() if f.required and name not in data]
    return found


def _suggest(key: str, fields: dict[str, Any]) -> str:
    if key in MOVED:
        return f" (it moved: use {MOVED[key]})"
    close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _leaf_problems(data: Any, kind: Any, path: str) -> list[Problem]:
    try:
        msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        allowed = _allowed(kind)
        if allowed:
            return [(path, f"must be {allowed} (got {data!r})")]
        inner, reason = explain(exc)
        return [(_join(path, inner) if inner else path, reason)]
    return []


def _allowed(kind: Any) -> str:
    """'one of: a, b' for a Literal, 'an int or "auto"' for a union with one; '' for
    a type without listed values."""
    args = typing.get_args(kind) if typing.get_origin(kind) in (
        types.UnionType, typing.Union) else (kind,)
    values: list[str] = []
    others: list[str] = []
    for arg in args:
        if typing.get_origin(arg) is typing.Literal:
            values += [str(v) for v in typing.get_args(arg)]
        elif arg is type(None):
            others.append("null")
        else:
            name = getattr(arg, "__name__", str(arg))
            others.append(f"an {name}" if name[0] in "aeiou" else f"a {name}")
    if not values:
        return ""
    if not others:
        return "one of: " + ", ".join(values)
    return " or ".join([*others, ", ".join(f'"{v}"' for v in values)])


def _kind_of(data: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(data), type(data).__name__)
