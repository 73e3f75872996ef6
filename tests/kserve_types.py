"""KServe's API types, as the kserve package's generated models define them: reads a manifest
(JSON) on stdin and prints, as a JSON list, what in it the type named on the command line does
not define or types otherwise. Run by tests/test_kserve_runtime.py in a process of its own."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import kserve
import kubernetes.client

_GENERIC = re.compile(r"^(?:list|List)\[(.+)\]$|^(?:dict|Dict)\(?\[?str, (.+?)[)\]]$")
_PRIMITIVE = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def problems(value: Any, kind: str, where: str = "") -> list[str]:
    """What in `value` the API type `kind` (an openapi type name of KServe's or Kubernetes'
    Python models) does not define, or defines with another type."""
    if kind in ("object", "datetime"):
        return []
    if kind in _PRIMITIVE:
        ok = isinstance(value, _PRIMITIVE[kind]) and not (kind != "bool" and value is True)
        return [] if ok else [f"{where}: {value!r} is not {kind}"]
    generic = _GENERIC.match(kind)
    if generic is not None:
        items, values = generic.groups()
        if items is not None:
            if not isinstance(value, list):
                return [f"{where}: not a list"]
            return [p for i, v in enumerate(value) for p in problems(v, items, f"{where}[{i}]")]
        if not isinstance(value, dict):
            return [f"{where}: not a mapping"]
        return [p for k, v in value.items() for p in problems(v, values, f"{where}.{k}")]
    model = getattr(kserve, kind, None) or getattr(kubernetes.client, kind)
    if not isinstance(value, dict):
        return [f"{where}: not a {kind}"]
    fields = {key: name for name, key in model.attribute_map.items()}
    found = []
    for key, item in value.items():
        if key not in fields:
            found.append(f"{where}.{key}: no such field in {kind}")
        else:
            found += problems(item, model.openapi_types[fields[key]], f"{where}.{key}")
    return found


if __name__ == "__main__":
    print(json.dumps(problems(json.load(sys.stdin), sys.argv[1])))
