"""
Patch semantics: JSON merge patch, (simplified) strategic merge patch,
JSON patch, and (simplified) server-side apply.

All functions are pure: they return new structures and never modify inputs.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import jsonpatch

from .errors import ApiError, bad_request

# ---------------------------------------------------------------------------
# JSON merge patch (RFC 7386): dicts merge recursively, null deletes, the rest replaces.
# ---------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# ---------------------------------------------------------------------------
# Strategic merge patch (simplified).
#
# The real apiserver uses the Go struct tags (patchStrategy/patchMergeKey) of
# built-in types. We do not have those, so lists are merged by a well-known key
# when the list's field name is known to use one (containers by name, service
# ports by port...); all other lists are replaced, as in a merge patch.
# The directives that kubectl emits are understood: $patch (delete/replace/merge),
# $retainKeys, $setElementOrder/<field>, $deleteFromPrimitiveList/<field>.
# (Real apiservers reject strategic merge patches for custom resources with 415;
# kubectl does not send them for CRs, so we do not bother rejecting them.)
# ---------------------------------------------------------------------------

# field name -> merge key candidates (first one present in the list items wins).
_MERGE_KEYS: dict[str, tuple[str, ...]] = {
    'containers': ('name',),
    'initContainers': ('name',),
    'ephemeralContainers': ('name',),
    'env': ('name',),
    'volumes': ('name',),
    'volumeMounts': ('mountPath',),
    'volumeDevices': ('devicePath',),
    'imagePullSecrets': ('name',),
    'ports': ('containerPort', 'port'),  # container ports vs. service ports
    'conditions': ('type',),
    'ownerReferences': ('uid',),
    'hostAliases': ('ip',),
    'topologySpreadConstraints': ('topologyKey',),
    'resourceClaims': ('name',),
}
# Lists of primitives that are merged as sets (patchStrategy=merge) rather than replaced.
_MERGED_PRIMITIVE_LISTS = {'finalizers'}


def _strip_directives(value: Any) -> Any:
    """Remove any leftover strategic-merge directives from a value being inserted as a whole."""
    if isinstance(value, dict):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith('$')}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value if not (isinstance(v, dict) and v.get('$patch') == 'delete')]
    return value


def _merge_key(field: str, items: Iterable[Any]) -> str | None:
    items = list(items)
    if not items or not all(isinstance(item, dict) for item in items):
        return None
    for key in _MERGE_KEYS.get(field, ()):
        if all(key in item for item in items if item.get('$patch') != 'replace'):
            return key
    return None


def _strategic_list(field: str, target: Any, patch: list[Any]) -> list[Any]:
    target_list = target if isinstance(target, list) else []
    if any(isinstance(item, dict) and item.get('$patch') == 'replace' for item in patch):
        return [_strip_directives(item) for item in patch if not (isinstance(item, dict) and '$patch' in item)]
    if field in _MERGED_PRIMITIVE_LISTS and all(not isinstance(item, (dict, list)) for item in patch):
        return copy.deepcopy(target_list) + [item for item in patch if item not in target_list]
    key = _merge_key(field, patch)
    if key is None or not all(isinstance(item, dict) for item in target_list):
        return _strip_directives(patch)
    result = copy.deepcopy(target_list)
    for item in patch:
        index = next((i for i, old in enumerate(result) if old.get(key) == item.get(key)), None)
        if item.get('$patch') == 'delete':
            if index is not None:
                del result[index]
        elif index is None:
            result.append(_strip_directives(item))
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return _strip_directives(patch)
    if patch.get('$patch') == 'replace':
        return _strip_directives(patch)
    if patch.get('$patch') == 'delete':
        return None
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    retain = patch.get('$retainKeys')
    for key, value in patch.items():
        if key.startswith('$deleteFromPrimitiveList/'):
            field = key.split('/', 1)[1]
            if isinstance(result.get(field), list):
                result[field] = [item for item in result[field] if item not in value]
        elif key.startswith('$'):
            continue  # $patch, $retainKeys, $setElementOrder/...: no state of their own
        elif value is None:
            result.pop(key, None)
        elif isinstance(value, list):
            result[key] = _strategic_list(key, result.get(key), value)
        else:
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


# ---------------------------------------------------------------------------
# JSON patch (RFC 6902).
# ---------------------------------------------------------------------------


def json_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, list):
        raise bad_request('json patch must be a list of operations')
    try:
        return jsonpatch.apply_patch(target, patch, in_place=False)
    except jsonpatch.JsonPatchTestFailed as e:
        raise ApiError(422, 'Invalid', f'the server rejected our request due to an error in our request: {e}')
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
        raise ApiError(422, 'Invalid', f'the server rejected our request due to an error in our request: {e}')


# ---------------------------------------------------------------------------
# Server-side apply (simplified).
#
# Real SSA tracks field ownership per manager in metadata.managedFields and
# detects conflicts between managers. We keep a private record of which leaf
# paths each manager applied last time, so that a field that a manager stops
# applying is removed (the essential SSA behaviour for controllers that apply
# their status). Dicts merge recursively; lists are atomic (replaced whole).
# No conflicts are ever reported, so `force` has no effect.
# ---------------------------------------------------------------------------

Path = tuple[str, ...]


def leaf_paths(value: Any, prefix: Path = ()) -> set[Path]:
    """All paths to non-dict values (lists count as leaves), e.g. ('status', 'ready')."""
    if isinstance(value, dict) and value:
        paths: set[Path] = set()
        for key, sub in value.items():
            paths |= leaf_paths(sub, prefix + (key,))
        return paths
    return {prefix} if prefix else set()


def _deep_merge(target: Any, applied: Any) -> Any:
    if isinstance(target, dict) and isinstance(applied, dict):
        result = copy.deepcopy(target)
        for key, value in applied.items():
            result[key] = _deep_merge(result.get(key), value)
        return result
    return copy.deepcopy(applied)


def _remove_path(obj: dict[str, Any], path: Path) -> None:
    """Remove a leaf and then any dicts that became empty on the way up."""
    stack: list[tuple[dict[str, Any], str]] = []
    node: Any = obj
    for part in path[:-1]:
        if not isinstance(node, dict) or part not in node:
            return
        stack.append((node, part))
        node = node[part]
    if isinstance(node, dict):
        node.pop(path[-1], None)
        while stack and isinstance(node, dict) and not node:
            parent, key = stack.pop()
            parent.pop(key, None)
            node = parent


def server_side_apply(target: dict[str, Any], applied: dict[str, Any],
                      previously_owned: set[Path], owned_by_others: set[Path]) -> dict[str, Any]:
    """Apply `applied` onto `target`; drop the fields this manager owned before but no longer applies."""
    result = copy.deepcopy(target)
    newly_owned = leaf_paths(applied)
    for path in sorted(previously_owned - newly_owned - owned_by_others, key=len, reverse=True):
        _remove_path(result, path)
    return _deep_merge(result, applied)
