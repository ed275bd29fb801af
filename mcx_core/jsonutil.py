"""Strict JSON: what every `--json` output and JSON artifact is written with. NaN and ±Infinity are not
JSON (RFC 8259), so an undefined number is written as `null`; numpy scalars and arrays, paths, tuples,
sets and dataclasses become their plain JSON form; anything else is refused rather than stringified
behind the reader's back (pass `default=str` to `dumps_strict` to stringify it)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import decimal
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any


def to_jsonable(obj: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """`obj` as plain JSON values (dict with str keys, list, str, int, float, bool, None); non-finite
    floats become None. `default` converts what is not otherwise known (TypeError without it)."""
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, decimal.Decimal):  # DuckDB's DECIMAL
        return float(obj) if obj.is_finite() else None
    if isinstance(obj, Mapping):
        return {_key(k): to_jsonable(v, default) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        items = sorted(obj, key=repr) if isinstance(obj, set | frozenset) else obj
        return [to_jsonable(v, default) for v in items]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj), default)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, _dt.datetime | _dt.date):
        return obj.isoformat()
    # numpy / torch scalars and arrays, without importing either.
    tolist = getattr(obj, "tolist", None)
    if callable(tolist) and type(obj).__module__.split(".")[0] in ("numpy", "torch"):
        return to_jsonable(tolist(), default)
    item = getattr(obj, "item", None)
    if callable(item) and type(obj).__module__.split(".")[0] in ("numpy", "torch"):
        return to_jsonable(item(), default)
    if default is not None:
        return to_jsonable(default(obj), None)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def _key(k: Any) -> str:
    if isinstance(k, str):
        return k
    if k is None or isinstance(k, bool | int | float):
        return json.dumps(to_jsonable(k))
    return str(k)


def dumps_strict(obj: Any, *, default: Callable[[Any], Any] | None = None, **kwargs: Any) -> str:
    """`json.dumps` of `to_jsonable(obj)` with `allow_nan=False`: always valid JSON."""
    kwargs.pop("allow_nan", None)
    return json.dumps(to_jsonable(obj, default), allow_nan=False, **kwargs)


def loads_strict(text: str) -> Any:
    """`json.loads` that refuses NaN / Infinity / -Infinity (Python's default accepts them)."""

    def _refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=_refuse)
