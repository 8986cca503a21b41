"""
Server-side printing (``Accept: application/json;as=Table;g=meta.k8s.io;v=v1``).

kubectl asks for Tables in ``kubectl get``; with them, custom resources show
their CRD's ``additionalPrinterColumns`` exactly as with a real apiserver.
Built-in kinds only get the generic Name + Age columns (the real apiserver
has kind-specific columns, e.g. TYPE/CLUSTER-IP for services).
"""
from __future__ import annotations

import datetime
import json
import re
from typing import Any

Obj = dict[str, Any]

_DEFAULT_COLUMNS = [
    {'name': 'Name', 'type': 'string', 'format': 'name', 'priority': 0,
     'description': 'Name must be unique within a namespace.', 'jsonPath': '.metadata.name'},
    {'name': 'Age', 'type': 'date', 'format': '', 'priority': 0,
     'description': 'CreationTimestamp is a timestamp representing the server time when this object was created.',
     'jsonPath': '.metadata.creationTimestamp'},
]


def wants_table(accept: str) -> bool:
    return 'as=Table' in accept


def human_duration(seconds: float) -> str:
    """Like k8s.io/apimachinery/pkg/util/duration.HumanDuration (the AGE column)."""
    s = int(seconds)
    if s < 0:
        return '<invalid>'
    if s < 120:
        return f'{s}s'
    m = s // 60
    if m < 10:
        return f'{m}m{s % 60}s' if s % 60 else f'{m}m'
    if m < 180:
        return f'{m}m'
    h = s // 3600
    if h < 8:
        return f'{h}h{m % 60}m' if m % 60 else f'{h}h'
    if h < 48:
        return f'{h}h'
    d = h // 24
    if h < 24 * 8:
        return f'{d}d{h % 24}h' if h % 24 else f'{d}d'
    if d < 365 * 2:
        return f'{d}d'
    return f'{d // 365}y'


_TOKEN_RE = re.compile(r'''\.([A-Za-z0-9_\-/]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_.\-]+)\s*==\s*["']([^"']*)["']\)\]|\[\*\]''')


def jsonpath(obj: Any, path: str) -> list[Any]:
    """A small JSONPath subset: .a.b, [0], [*], [?(@.type=="Ready")] (enough for printer columns)."""
    path = path.strip()
    if path.startswith('{') and path.endswith('}'):
        path = path[1:-1]
    path = path.lstrip('$')
    values = [obj]
    pos = 0
    while pos < len(path):
        m = _TOKEN_RE.match(path, pos)
        if not m:
            return []
        pos = m.end()
        key, index, filter_key, filter_value = m.groups()
        next_values: list[Any] = []
        for value in values:
            if key is not None and isinstance(value, dict) and key in value:
                next_values.append(value[key])
            elif index is not None and isinstance(value, list) and int(index) < len(value):
                next_values.append(value[int(index)])
            elif filter_key is not None and isinstance(value, list):
                for item in value:
                    found = jsonpath(item, '.' + filter_key)
                    if found and str(found[0]) == filter_value:
                        next_values.append(item)
            elif m.group(0) == '[*]' and isinstance(value, list):
                next_values.extend(value)
        values = next_values
    return values


def _cell(obj: Obj, column: dict[str, Any], now: datetime.datetime) -> Any:
    values = jsonpath(obj, column.get('jsonPath', ''))
    if not values:
        return None
    value = values[0]
    if column.get('type') == 'date' and isinstance(value, str):
        try:
            ts = datetime.datetime.strptime(value, '%Y-%m-%dT%H:%M:%SZ').replace(tzinfo=datetime.timezone.utc)
            return human_duration((now - ts).total_seconds())
        except ValueError:
            return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(',', ':'))
    return value


def columns_for(printer_columns: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Name + the CRD's additionalPrinterColumns, or Name + Age if there are none."""
    if not printer_columns:
        return _DEFAULT_COLUMNS
    return [_DEFAULT_COLUMNS[0]] + [
        {'name': c['name'], 'type': c.get('type', 'string'), 'format': c.get('format', ''),
         'description': c.get('description', ''), 'priority': c.get('priority', 0), 'jsonPath': c['jsonPath']}
        for c in printer_columns
    ]


def render(objs: list[Obj], columns: list[dict[str, Any]], resource_version: str) -> Obj:
    now = datetime.datetime.now(tz=datetime.timezone.utc)
    return {
        'kind': 'Table',
        'apiVersion': 'meta.k8s.io/v1',
        'metadata': {'resourceVersion': resource_version},
        'columnDefinitions': [{k: v for k, v in c.items() if k != 'jsonPath'} for c in columns],
        'rows': [
            {
                'cells': [_cell(obj, c, now) for c in columns],
                'object': {
                    'kind': 'PartialObjectMetadata',
                    'apiVersion': 'meta.k8s.io/v1',
                    'metadata': obj.get('metadata', {}),
                },
            }
            for obj in objs
        ],
    }
