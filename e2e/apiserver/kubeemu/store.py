"""
The in-memory object store: the "etcd + generic registry" part of the emulator.

It owns everything that real clients rely on for correctness:

* a single global, monotonically increasing ``resourceVersion`` (like etcd's
  revision), stamped on every write and reported on lists;
* ``uid``, ``creationTimestamp``, ``generation`` (bumped only when anything
  other than ``metadata``/``status`` changes), and no-op detection (an update
  that changes nothing keeps the resourceVersion and emits no watch event —
  important for controllers that re-apply their status on every reconcile);
* status-subresource isolation (writes to the main resource keep the old
  status, writes to ``/status`` change only the status);
* optimistic concurrency (a stale ``metadata.resourceVersion`` → 409 Conflict);
* finalizers (delete sets ``deletionTimestamp``; removing the last finalizer deletes);
* a bounded per-resource event history for watches resumed from a resourceVersion,
  and fan-out queues for live watchers.

Objects are stored per (group, plural), regardless of the API version they were
written with (no conversion: multi-version resources just get ``apiVersion``
rewritten on the way out). Everything runs in one asyncio thread and no method
here awaits, so every operation is atomic without locks.
"""
from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import random
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import errors
from .patching import Path

Obj = dict[str, Any]


@dataclass(frozen=True)
class ResourceType:
    """What the store needs to know about a resource (derived from discovery info)."""
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    has_status: bool

    @property
    def api_version(self) -> str:
        return f'{self.group}/{self.version}' if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)


@dataclass
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj
    old: Obj | None  # the previous state for MODIFIED (to re-evaluate selectors)


@dataclass
class Bucket:
    """All objects of one resource, plus their recent watch events and live watchers."""
    objects: dict[tuple[str | None, str], Obj] = field(default_factory=dict)
    history: collections.deque[Event] = field(default_factory=collections.deque)
    compacted_rv: int = 0  # events with rv <= this one may be gone from the history
    watchers: set[asyncio.Queue[Event | None]] = field(default_factory=set)


def now_rfc3339() -> str:
    return datetime.datetime.now(tz=datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')


def _spec_part(obj: Obj) -> Obj:
    """Everything whose change bumps metadata.generation: all but metadata & status."""
    return {k: v for k, v in obj.items() if k not in ('metadata', 'status', 'apiVersion', 'kind')}


# Metadata fields that clients cannot change through updates/patches.
_SYSTEM_META = ('uid', 'creationTimestamp', 'generation', 'resourceVersion',
                'deletionTimestamp', 'deletionGracePeriodSeconds', 'name', 'namespace')


class Store:
    def __init__(self, history_size: int = 1000) -> None:
        self.rv = 0
        self.history_size = history_size
        self.buckets: dict[tuple[str, str], Bucket] = collections.defaultdict(Bucket)
        # Server-side-apply ownership: (group, plural, ns, name) -> (manager, subresource) -> leaf paths.
        self.owners: dict[tuple[str, str, str | None, str], dict[tuple[str, str], set[Path]]] = {}
        # Called after every committed change (used to register CRDs in discovery).
        self.listeners: list[Callable[[ResourceType, Event], None]] = []

    # -- reading ---------------------------------------------------------------------------

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> Obj | None:
        obj = self.buckets[rt.key].objects.get((namespace if rt.namespaced else None, name))
        return copy.deepcopy(obj) if obj is not None else None

    def require(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        obj = self.get(rt, namespace, name)
        if obj is None:
            raise errors.not_found(rt.group, rt.plural, name)
        return obj

    def list(self, rt: ResourceType, namespace: str | None) -> list[Obj]:
        return [copy.deepcopy(obj) for (ns, _), obj in sorted(self.buckets[rt.key].objects.items(),
                                                             key=lambda kv: (kv[0][0] or '', kv[0][1]))
                if namespace is None or ns == namespace]

    # -- watching --------------------------------------------------------------------------

    def subscribe(self, rt: ResourceType) -> asyncio.Queue[Event | None]:
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self.buckets[rt.key].watchers.add(queue)
        return queue

    def wake_watchers(self) -> None:
        """Wake all watchers up (with a None instead of an event), e.g. to notice a shutdown."""
        for bucket in self.buckets.values():
            for queue in bucket.watchers:
                queue.put_nowait(None)

    def unsubscribe(self, rt: ResourceType, queue: asyncio.Queue[Event | None]) -> None:
        self.buckets[rt.key].watchers.discard(queue)

    def events_since(self, rt: ResourceType, rv: int) -> list[Event]:
        """The events newer than `rv`, or 410 Gone if some of them were already forgotten."""
        bucket = self.buckets[rt.key]
        if rv < bucket.compacted_rv:
            raise errors.gone(str(rv))
        return [event for event in bucket.history if event.rv > rv]

    # -- writing ---------------------------------------------------------------------------

    def _next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def _emit(self, rt: ResourceType, type_: str, obj: Obj, old: Obj | None) -> None:
        bucket = self.buckets[rt.key]
        event = Event(rv=int(obj['metadata']['resourceVersion']), type=type_, obj=copy.deepcopy(obj), old=old)
        bucket.history.append(event)
        while len(bucket.history) > self.history_size:
            bucket.compacted_rv = bucket.history.popleft().rv
        for queue in bucket.watchers:
            queue.put_nowait(event)
        for listener in self.listeners:
            listener(rt, event)

    def _key(self, rt: ResourceType, obj: Obj) -> tuple[str | None, str]:
        return (obj['metadata'].get('namespace') if rt.namespaced else None, obj['metadata']['name'])

    def create(self, rt: ResourceType, namespace: str | None, body: Obj, dry_run: bool = False) -> Obj:
        obj = copy.deepcopy(body)
        if not isinstance(obj, dict):
            raise errors.bad_request('the request body must be a JSON object')
        meta = obj.setdefault('metadata', {})
        if not isinstance(meta, dict):
            raise errors.bad_request('metadata must be an object')
        if obj.get('kind') not in (None, rt.kind):
            raise errors.bad_request(f'the kind of the provided object ({obj["kind"]}) does not match the URL ({rt.kind})')
        # The usual key order (apiVersion, kind, metadata, ...) keeps dumps readable.
        obj = {'apiVersion': rt.api_version, 'kind': rt.kind, 'metadata': meta,
               **{k: v for k, v in obj.items() if k not in ('apiVersion', 'kind', 'metadata')}}

        # Name & namespace.
        if not meta.get('name') and meta.get('generateName'):
            suffix = ''.join(random.choices(string.ascii_lowercase + string.digits, k=5))
            meta['name'] = f"{meta['generateName']}{suffix}"
        if not meta.get('name'):
            raise errors.invalid(rt.group, rt.plural, None, 'metadata.name: Required value: name or generateName is required')
        if rt.namespaced:
            if meta.get('namespace') and namespace and meta['namespace'] != namespace:
                raise errors.bad_request('the namespace of the provided object does not match the namespace sent on the request')
            meta['namespace'] = namespace or meta.get('namespace')
            if not meta['namespace']:
                raise errors.bad_request('a namespace is required for a namespaced resource')
            if (None, meta['namespace']) not in self.buckets[('', 'namespaces')].objects:
                raise errors.not_found('', 'namespaces', meta['namespace'])
        else:
            meta.pop('namespace', None)
        if meta.get('resourceVersion'):  # as the apiserver: a create is not a conditional update
            raise errors.bad_request('resourceVersion should not be set on objects to be created')
        key = self._key(rt, obj)
        if key in self.buckets[rt.key].objects:
            raise errors.already_exists(rt.group, rt.plural, meta['name'])

        # System-managed fields: whatever the client sent is overwritten.
        for system_field in ('deletionTimestamp', 'deletionGracePeriodSeconds'):
            meta.pop(system_field, None)
        meta['uid'] = str(uuid.uuid4())
        meta['creationTimestamp'] = now_rfc3339()
        meta['generation'] = 1
        if rt.has_status:
            obj.pop('status', None)  # as the apiserver: status is only set via /status
        if rt.key == ('', 'namespaces'):
            obj['status'] = {'phase': 'Active'}
        if dry_run:
            meta['resourceVersion'] = str(self.rv)
            return obj
        meta['resourceVersion'] = str(self._next_rv())
        self.buckets[rt.key].objects[key] = obj
        self._emit(rt, 'ADDED', obj, None)
        return copy.deepcopy(obj)

    def update(self, rt: ResourceType, namespace: str | None, name: str, new: Obj,
               subresource: str | None, dry_run: bool = False) -> Obj:
        """
        Replace an existing object with `new` (already patched by the caller, if a patch).

        Preconditions in `new.metadata` (resourceVersion, uid) are checked against the current state.
        """
        old = self.require(rt, namespace, name)
        if not isinstance(new, dict) or not isinstance(new.get('metadata', {}), dict):
            raise errors.bad_request('the request body must be a JSON object with object metadata')
        new_meta = new.get('metadata') or {}
        if new_meta.get('name') not in (None, name):
            raise errors.bad_request(f'the name of the object ({new_meta["name"]}) does not match the name on the URL ({name})')
        if rt.namespaced and new_meta.get('namespace') not in (None, '', namespace):
            raise errors.bad_request('the namespace of the provided object does not match the namespace sent on the request')
        if new.get('kind') not in (None, rt.kind):
            raise errors.bad_request(f'the kind of the provided object ({new["kind"]}) does not match the URL ({rt.kind})')
        if new_meta.get('resourceVersion') and new_meta['resourceVersion'] != old['metadata']['resourceVersion']:
            raise errors.conflict(rt.group, rt.plural, name)
        if new_meta.get('uid') and new_meta['uid'] != old['metadata']['uid']:
            raise errors.conflict(rt.group, rt.plural, name,
                                  f'Precondition failed: UID in precondition: {new_meta["uid"]}, UID in object meta: {old["metadata"]["uid"]}')

        if subresource == 'status':
            result = copy.deepcopy(old)
            if 'status' in new:
                result['status'] = copy.deepcopy(new['status'])
            else:
                result.pop('status', None)
        elif subresource is None:
            result = copy.deepcopy(new)
            result['apiVersion'], result['kind'] = old['apiVersion'], old['kind']
            result_meta = result.setdefault('metadata', {})
            for system_field in _SYSTEM_META:
                if system_field in old['metadata']:
                    result_meta[system_field] = old['metadata'][system_field]
                else:
                    result_meta.pop(system_field, None)
            if rt.has_status:  # the main resource ignores status changes
                if 'status' in old:
                    result['status'] = copy.deepcopy(old['status'])
                else:
                    result.pop('status', None)
        else:
            raise errors.no_such_resource()

        if _spec_part(result) != _spec_part(old):
            result['metadata']['generation'] = old['metadata'].get('generation', 0) + 1
        if result == old:
            return old  # a no-op: same resourceVersion, no watch event (as in the apiserver)

        # Finalizers removed from an object being deleted: it is gone for real now.
        if result['metadata'].get('deletionTimestamp') and not result['metadata'].get('finalizers'):
            if dry_run:
                return result
            result['metadata']['resourceVersion'] = str(self._next_rv())
            self._remove(rt, result)
            return copy.deepcopy(result)

        if dry_run:
            return result
        result['metadata']['resourceVersion'] = str(self._next_rv())
        self.buckets[rt.key].objects[self._key(rt, result)] = result
        self._emit(rt, 'MODIFIED', result, old)
        return copy.deepcopy(result)

    def delete(self, rt: ResourceType, namespace: str | None, name: str,
               preconditions: dict[str, Any] | None = None, dry_run: bool = False) -> tuple[Obj, bool]:
        """Delete an object; returns it and whether it is gone (False if kept by finalizers)."""
        old = self.require(rt, namespace, name)
        preconditions = preconditions or {}
        if preconditions.get('resourceVersion') and preconditions['resourceVersion'] != old['metadata']['resourceVersion']:
            raise errors.conflict(rt.group, rt.plural, name)
        if preconditions.get('uid') and preconditions['uid'] != old['metadata']['uid']:
            raise errors.conflict(rt.group, rt.plural, name,
                                  f'Precondition failed: UID in precondition: {preconditions["uid"]}, UID in object meta: {old["metadata"]["uid"]}')
        if dry_run:
            return old, not old['metadata'].get('finalizers')
        if old['metadata'].get('finalizers'):
            if old['metadata'].get('deletionTimestamp'):
                return old, False  # already being deleted
            result = copy.deepcopy(old)
            result['metadata']['deletionTimestamp'] = now_rfc3339()
            result['metadata']['deletionGracePeriodSeconds'] = 0
            result['metadata']['generation'] = old['metadata'].get('generation', 0) + 1
            result['metadata']['resourceVersion'] = str(self._next_rv())
            self.buckets[rt.key].objects[self._key(rt, result)] = result
            self._emit(rt, 'MODIFIED', result, old)
            return copy.deepcopy(result), False
        result = copy.deepcopy(old)
        result['metadata']['resourceVersion'] = str(self._next_rv())
        self._remove(rt, result)
        return result, True

    def _remove(self, rt: ResourceType, obj: Obj) -> None:
        key = self._key(rt, obj)
        del self.buckets[rt.key].objects[key]
        self.owners.pop((rt.group, rt.plural, key[0], key[1]), None)
        self._emit(rt, 'DELETED', obj, None)

    def drop_resource(self, rt: ResourceType) -> None:
        """Delete all objects of a resource (e.g. when its CRD is deleted), with DELETED events."""
        for key in list(self.buckets[rt.key].objects):
            obj = copy.deepcopy(self.buckets[rt.key].objects[key])
            obj['metadata']['resourceVersion'] = str(self._next_rv())
            self._remove(rt, obj)

    # -- server-side apply ownership --------------------------------------------------------

    def ownership(self, rt: ResourceType, namespace: str | None, name: str) -> dict[tuple[str, str], set[Path]]:
        return self.owners.setdefault((rt.group, rt.plural, namespace if rt.namespaced else None, name), {})
