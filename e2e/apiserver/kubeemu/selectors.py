"""
Label and field selectors, as accepted in ``?labelSelector=`` and ``?fieldSelector=``.

Label selectors support the full set-based syntax of the apiserver::

    app=web, tier!=db, env in (prod,stage), env notin (dev), canary, !legacy

Field selectors support ``=``, ``==`` and ``!=`` on any dotted path
(``metadata.name``, ``metadata.namespace``, ``spec.type``, ``status.phase``...).
The real apiserver only allows a per-kind whitelist of fields; we are lenient.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from .errors import bad_request

Predicate = Callable[[Mapping[str, Any]], bool]


def _split_top_level(text: str) -> list[str]:
    """Split by commas, but not by the commas inside ``in (a,b)`` parentheses."""
    parts: list[str] = []
    depth = 0
    current = ''
    for char in text:
        if char == '(':
            depth += 1
        elif char == ')':
            depth -= 1
        if char == ',' and depth == 0:
            parts.append(current)
            current = ''
        else:
            current += char
    parts.append(current)
    return [part.strip() for part in parts if part.strip()]


_SET_RE = re.compile(r'^([^\s!=()]+)\s+(in|notin)\s*\(([^)]*)\)$')
_CMP_RE = re.compile(r'^([^\s!=()]+)\s*(==|=|!=)\s*([^\s!=()]*)$')
_EXISTS_RE = re.compile(r'^(!?)\s*([^\s!=()]+)$')


def parse_label_selector(text: str | None) -> Predicate:
    """Compile a label selector into a predicate on the labels dict."""
    if not text:
        return lambda labels: True
    checks: list[Predicate] = []
    for term in _split_top_level(text):
        if m := _SET_RE.match(term):
            key, op, values_text = m.group(1), m.group(2), m.group(3)
            values = {v.strip() for v in values_text.split(',') if v.strip()}
            if op == 'in':
                checks.append(lambda labels, k=key, vs=values: k in labels and labels[k] in vs)
            else:  # notin also matches the objects without the label at all (as in the apiserver)
                checks.append(lambda labels, k=key, vs=values: k not in labels or labels[k] not in vs)
        elif m := _CMP_RE.match(term):
            key, op, value = m.group(1), m.group(2), m.group(3)
            if op == '!=':  # like the apiserver: "!=" matches the objects without that label too
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: k in labels and labels[k] == v)
        elif m := _EXISTS_RE.match(term):
            negated, key = m.group(1) == '!', m.group(2)
            if negated:
                checks.append(lambda labels, k=key: k not in labels)
            else:
                checks.append(lambda labels, k=key: k in labels)
        else:
            raise bad_request(f'unable to parse requirement: invalid label selector: {term!r}')
    return lambda labels: all(check(labels) for check in checks)


def _lookup(obj: Mapping[str, Any], path: str) -> str | None:
    value: Any = obj
    for part in path.split('.'):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool):
        return 'true' if value else 'false'
    return None if value is None else str(value)


def parse_field_selector(text: str | None) -> Predicate:
    """Compile a field selector into a predicate on the whole object."""
    if not text:
        return lambda obj: True
    checks: list[Predicate] = []
    for term in _split_top_level(text):
        m = _CMP_RE.match(term)
        if not m:
            raise bad_request(f'invalid field selector: {term!r}')
        path, op, value = m.group(1), m.group(2), m.group(3)
        if op == '!=':
            checks.append(lambda obj, p=path, v=value: (_lookup(obj, p) or '') != v)
        else:
            checks.append(lambda obj, p=path, v=value: (_lookup(obj, p) or '') == v)
    return lambda obj: all(check(obj) for check in checks)

