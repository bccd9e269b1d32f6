"""The control protocol's codec: payload dataclasses to and from JSON values.

Every result, progress report and statistics object of safefs.control.protocol is a frozen
dataclass; `to_wire` turns one into its JSON object and `from_wire` rebuilds it, and these two
are the only code that spells a key of the contract. They know no payload class: the rules
of the mapping are read off the fields and their metadata:
- a field's key is its name;
- a field with OMIT_NONE metadata is left out of the object while it is None (the key's
  absence is what older clients and the `--json` output have always seen);
- a field with FLAT metadata (a nested payload) has its keys merged into the parent's object;
  a FLAT field that may be None is present when any of its keys is;
- `extra` (FLAT) keeps the keys this side does not know (a newer daemon's), so that they are
  shown and passed on, never dropped;
- a key that is missing decodes as the field's default (nearly every field has one: an older
  daemon, or a partial status in a test, is still readable); a missing key without a default,
  or a value of the wrong type, is a ProtocolError. Numbers are not converted: 5 stays 5 and
  5.0 stays 5.0, so a decoded result encodes to the same JSON.

Invariants: `from_wire` returns a well-formed payload or raises `ProtocolError`, nothing else;
a key it does not know is kept in `extra`, or refused by a class without one: never dropped.

Threading: pure functions, no I/O, safe from any thread; the only state is the cache of each
class's type hints (`functools.cache`, which is thread-safe).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, TypeVar

from safefs.errors import ProtocolError

_T = TypeVar("_T")

OMIT_NONE: dict[str, bool] = {"omit_none": True}
FLAT: dict[str, bool] = {"flat": True}


def to_wire(payload: Any) -> Any:
    """The JSON value of a payload dataclass (or of lists and dicts of them, or a plain value)."""
    if dataclasses.is_dataclass(payload) and not isinstance(payload, type):
        obj: dict[str, Any] = {}
        for field in dataclasses.fields(payload):
            value = getattr(payload, field.name)
            if field.metadata.get("flat"):
                if value is not None:
                    obj.update(to_wire(value))
            elif value is not None or not field.metadata.get("omit_none"):
                obj[field.name] = to_wire(value)
        return obj
    if isinstance(payload, (list, tuple)):
        return [to_wire(item) for item in payload]
    if isinstance(payload, dict):
        return {key: to_wire(value) for key, value in payload.items()}
    return payload


def from_wire(cls: type[_T], data: Any) -> _T:
    """The `cls` payload in the JSON object `data`. Raises ProtocolError if it is malformed."""
    if not isinstance(data, dict):
        raise ProtocolError(f"malformed {cls.__name__}: not a JSON object")
    value: _T
    value, used = _decode_object(cls, data)
    if data.keys() - used:
        # Only a class without `extra`, which is merged into another (FlushStatistics): a key it
        # does not know would vanish from that one's JSON, so it is refused, loudly.
        raise ProtocolError(f"{cls.__name__} has no field for {sorted(data.keys() - used)}")
    return value



def _keys(cls: Any) -> set[str]:
    """Every key an object of `cls` may hold, its FLAT fields' included (not `extra`'s)."""
    keys = set()
    hints = _hints(cls)
    for field in dataclasses.fields(cls):
        if field.metadata.get("flat"):
            if field.name != "extra":
                keys |= _keys(_payload_class(hints[field.name]))
        else:
            keys.add(field.name)
    return keys


def _decode_object(cls: Any, data: dict[str, Any]) -> tuple[Any, set[str]]:
    """(the `cls` payload in `data`, the keys it used)."""
    hints = _hints(cls)
    values: dict[str, Any] = {}
    used: set[str] = set()
    for field in dataclasses.fields(cls):
        if field.name == "extra" and field.metadata.get("flat"):
            continue
        hint = hints[field.name]
        if field.metadata.get("flat"):
            sub = _payload_class(hint)
            if _optional(hint) and not (_keys(sub) & data.keys()):
                values[field.name] = None
                continue
            values[field.name], sub_used = _decode_object(sub, data)
            used |= sub_used
        elif field.name in data:
            values[field.name] = _decode_value(hint, data[field.name], f"{cls.__name__}.{field.name}")
            used.add(field.name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"malformed {cls.__name__}: no {field.name!r}")
    if any(f.name == "extra" for f in dataclasses.fields(cls)):
        values["extra"] = {key: value for key, value in data.items() if key not in _keys(cls)}
        used |= values["extra"].keys()
    return cls(**values), used


def _decode_value(hint: Any, value: Any, where: str) -> Any:
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        arms = typing.get_args(hint)
        if value is None and type(None) in arms:
            return None
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return _decode_value(arm, value, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"malformed {where}: {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(f"malformed {where}: not a list")
        (item,) = typing.get_args(hint)
        return [_decode_value(item, v, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ProtocolError(f"malformed {where}: not an object")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ProtocolError(f"malformed {where}: not an object")
        return _decode_object(hint, value)[0]
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ProtocolError(f"malformed {where}: {value!r} is not a {hint.__name__}")
    return value


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (types.UnionType, typing.Union) and type(None) in typing.get_args(hint)


def _payload_class(hint: Any) -> type:
    """The dataclass of a FLAT field's hint (`X` or `X | None`)."""
    if _optional(hint):
        (hint,) = (arm for arm in typing.get_args(hint) if arm is not type(None))
    assert dataclasses.is_dataclass(hint), hint
    return hint  # type: ignore[return-value]
