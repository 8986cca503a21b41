"""
The emulator: kmock's Kubernetes scaffold for discovery, plus our own resource API.

Division of labour:

* **kmock** (``KubernetesScaffold``) serves the discovery endpoints
  (``/``, ``/version``, ``/api``, ``/api/v1``, ``/apis``, ``/apis/G``, ``/apis/G/V``)
  from its bundled list of built-in resources, and renders its own errors as
  ``Status`` objects. We fix its discovery quirks by overriding the handlers:
  the core group version is ``v1`` (not ``/v1``), preferred versions are
  deterministic, and CRDs register their resources in ``self.resources``.

* **this module** serves every resource URL
  (``/api/v1/[namespaces/NS/]PLURAL[/NAME[/status]]`` and the ``/apis/G/V/...``
  equivalent) from :class:`~.store.Store`: CRUD, patches, server-side apply,
  selectors, watches with resourceVersion resumption and bookmarks, and Tables.

kmock's own stateful ``KubernetesEmulator`` is deliberately NOT used for objects:
it keeps no resourceVersions/uids/history, treats every update as a merge,
cannot PUT, and its request parser crashes on ``/api/v1/namespaces``. Its state
handling lives in ``_handle()``, which runs before any routing, so it cannot be
fixed piecemeal; we route resource URLs past it instead.
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import attrs
import kmock
import yaml
from typing_extensions import override

from . import errors, patching, tables
from .errors import ApiError
from .selectors import parse_field_selector, parse_label_selector
from .store import Event, Obj, ResourceType, Store

log = logging.getLogger('kubeemu')

CRD_GROUP, CRD_PLURAL = 'apiextensions.k8s.io', 'customresourcedefinitions'
ALL_VERBS = {'create', 'delete', 'deletecollection', 'get', 'list', 'patch', 'update', 'watch'}
INITIAL_NAMESPACES = ('default', 'kube-system', 'kube-public', 'kube-node-lease')


@dataclass(frozen=True)
class Route:
    """A parsed resource URL."""
    group: str
    version: str
    namespace: str | None
    plural: str
    name: str | None
    subresource: str | None


def _version_priority(version: str) -> tuple[int, int, int]:
    """Kubernetes version ordering: GA > beta > alpha, then the higher number first (for sorting)."""
    m = re.match(r'^v(\d+)(?:(alpha|beta)(\d+))?$', version)
    if not m:
        return (3, 0, 0)  # non-conventional versions go last
    stability = {None: 0, 'beta': 1, 'alpha': 2}[m.group(2)]
    return (stability, -int(m.group(1)), -int(m.group(3) or 0))


def _json(data: Any, status: int = 200) -> aiohttp.web.Response:
    return aiohttp.web.Response(body=json.dumps(data, separators=(',', ':')).encode(),
                                status=status, content_type='application/json')


@attrs.define(kw_only=True)
class ApiServerEmulator(kmock.KubernetesScaffold):
    store: Store = attrs.field(factory=Store)
    bookmark_interval: float = 10.0  # seconds between BOOKMARK events on watches that allow them
    # The additionalPrinterColumns of CRD versions: (group, version, plural) -> columns.
    _printer_columns: dict[tuple[str, str, str], list[dict[str, Any]]] = attrs.field(factory=dict, init=False)
    _stopping: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.resources.load_bundled()  # the built-in resources, as discovered from a real cluster
        for probe in ('/healthz', '/livez', '/readyz'):  # kmock's DSL: a fixed answer for a path
            self.fallback[f'get {probe}'] << b'ok'
        self.store.listeners.append(self._on_store_event)
        for namespace in INITIAL_NAMESPACES:
            self.store.create(self._resource_type('', 'v1', 'namespaces'), None,
                              {'metadata': {'name': namespace}})

    def stop(self) -> None:
        """Make the open watch streams finish (for a graceful shutdown)."""
        self._stopping.set()
        self.store.wake_watchers()

    # ------------------------------------------------------------------------------------------
    # Entry point: resource URLs are ours, everything else (discovery) goes to kmock.
    # ------------------------------------------------------------------------------------------

    @override
    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        route = self._parse_route(raw_request.path)
        if route is None:
            try:
                return await super().__call__(raw_request)
            finally:
                self._forget_requests()
        try:
            return await self._serve(raw_request, route)
        except ApiError as e:
            if e.code >= 500:
                log.error('%s %s -> %s', raw_request.method, raw_request.path_qs, e.message)
            return _json(e.status(), status=e.code)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:  # a bug in the emulator: report it as an apiserver would
            log.exception('%s %s failed', raw_request.method, raw_request.path_qs)
            return _json(ApiError(500, 'InternalError', f'emulator failure: {e!r}').status(), status=500)

    def _forget_requests(self) -> None:
        # kmock records every request it serves (for test assertions); a long-running
        # emulator must not grow forever. The records are not used here at all.
        if len(self._requests) > 1000:
            self._requests.clear()
            for payload in self._payloads:
                payload._requests.clear()

    def _parse_route(self, path: str) -> Route | None:
        segments = [segment for segment in path.split('/') if segment]
        if segments[:2] == ['api', 'v1']:
            group, version, rest = '', 'v1', segments[2:]
        elif len(segments) >= 3 and segments[0] == 'apis':
            group, version, rest = segments[1], segments[2], segments[3:]
        else:
            return None  # discovery & everything else
        if not rest:
            return None  # /api/v1, /apis/G/V: discovery
        namespace = None
        # "namespaces/NS/PLURAL/..." is namespaced, unless PLURAL is a subresource of namespaces
        # (e.g. /api/v1/namespaces/NS/status or .../finalize).
        if rest[0] == 'namespaces' and len(rest) >= 3:
            info = self._info(group, version, rest[2])
            if info is not None or group != '':
                namespace, rest = rest[1], rest[2:]
        return Route(group=group, version=version, namespace=namespace, plural=rest[0],
                     name=rest[1] if len(rest) > 1 else None,
                     subresource='/'.join(rest[2:]) or None)

    def _info(self, group: str, version: str, plural: str) -> kmock.ResourceInfo | None:
        key = kmock.resource(group, version, plural)
        return self.resources[key] if key in self.resources else None

    def _resource_type(self, group: str, version: str, plural: str) -> ResourceType:
        info = self._info(group, version, plural)
        if info is None:
            raise errors.no_such_resource()
        return ResourceType(group=group, version=version, plural=plural,
                            kind=info.kind or plural.capitalize(),
                            namespaced=bool(info.namespaced), has_status='status' in info.subresources)

    # ------------------------------------------------------------------------------------------
    # Resource API
    # ------------------------------------------------------------------------------------------

    async def _serve(self, raw: aiohttp.web.BaseRequest, route: Route) -> aiohttp.web.StreamResponse:
        rt = self._resource_type(route.group, route.version, route.plural)
        info = self._info(route.group, route.version, route.plural)
        assert info is not None
        query = raw.query
        method = raw.method.upper()
        dry_run = bool(query.getall('dryRun', []))
        if route.namespace is not None and not rt.namespaced:
            raise errors.no_such_resource()
        if route.subresource is not None and (route.subresource != 'status' or not rt.has_status):
            raise errors.no_such_resource()

        if info.verbs == {'create'}:  # reviews etc.: answered, never stored
            if method != 'POST' or route.name is not None:
                raise errors.method_not_allowed()
            return _json(self._review(rt, await self._body(raw)), status=201)

        if method == 'GET' and query.get('watch') in ('true', '1'):
            return await self._serve_watch(raw, route, rt)
        if method == 'GET' and route.name is None:
            return self._serve_list(raw, route, rt)
        if method == 'GET':
            obj = self.store.require(rt, route.namespace, route.name)
            return self._respond(raw, rt, obj)
        if method == 'POST' and route.name is None:
            if rt.namespaced and route.namespace is None:
                raise errors.method_not_allowed()
            obj = self.store.create(rt, route.namespace, await self._body(raw), dry_run=dry_run)
            self._after_write(rt, obj, dry_run)
            return self._respond(raw, rt, obj, status=201)
        if method == 'PUT' and route.name is not None:
            obj = self.store.update(rt, route.namespace, route.name, await self._body(raw),
                                    route.subresource, dry_run=dry_run)
            self._after_write(rt, obj, dry_run)
            return self._respond(raw, rt, obj)
        if method == 'PATCH' and route.name is not None:
            obj, created = await self._serve_patch(raw, route, rt, dry_run)
            self._after_write(rt, obj, dry_run)
            return self._respond(raw, rt, obj, status=201 if created else 200)
        if method == 'DELETE' and route.name is not None and route.subresource is None:
            body = await self._body(raw, required=False) or {}
            obj, gone = self.store.delete(rt, route.namespace, route.name,
                                          preconditions=body.get('preconditions'), dry_run=dry_run)
            if not gone:  # still there, waiting for finalizers: the apiserver returns the object
                return self._respond(raw, rt, obj)
            return _json({
                'kind': 'Status', 'apiVersion': 'v1', 'metadata': {}, 'status': 'Success',
                'details': {'name': route.name, 'group': rt.group, 'kind': rt.plural,
                            'uid': obj['metadata']['uid']},
            })
        if method == 'DELETE' and route.name is None:  # deletecollection
            return self._serve_deletecollection(raw, route, rt, dry_run)
        raise errors.method_not_allowed()

    async def _body(self, raw: aiohttp.web.BaseRequest, required: bool = True) -> Any:
        if 'protobuf' in raw.content_type or 'cbor' in raw.content_type:
            raise errors.unsupported_media_type(raw.content_type)  # JSON/YAML only
        text = await raw.text()
        if not text.strip():
            if required:
                raise errors.bad_request('the request body is empty')
            return None
        try:
            if 'yaml' in raw.content_type:
                return yaml.safe_load(text)
            return json.loads(text)
        except (ValueError, yaml.YAMLError) as e:
            raise errors.bad_request(f'the request body is not valid JSON/YAML: {e}')

    def _output(self, rt: ResourceType, obj: Obj) -> Obj:
        """Present a stored object in the requested API version (no conversion, just the label)."""
        obj = copy.deepcopy(obj)
        obj['apiVersion'] = rt.api_version
        return obj

    def _respond(self, raw: aiohttp.web.BaseRequest, rt: ResourceType, obj: Obj, status: int = 200) -> aiohttp.web.Response:
        if raw.method == 'GET' and tables.wants_table(raw.headers.get('Accept', '')):
            return _json(self._table(rt, [obj]), status=status)
        return _json(self._output(rt, obj), status=status)

    def _table(self, rt: ResourceType, objs: list[Obj]) -> Obj:
        columns = tables.columns_for(self._printer_columns.get((rt.group, rt.version, rt.plural)))
        return tables.render(objs, columns, str(self.store.rv))

    def _filter(self, raw: aiohttp.web.BaseRequest, route: Route) -> Callable[[Obj], bool]:
        labels_ok = parse_label_selector(raw.query.get('labelSelector'))
        fields_ok = parse_field_selector(raw.query.get('fieldSelector'))

        def matches(obj: Obj) -> bool:
            meta = obj.get('metadata', {})
            return (
                (route.namespace is None or meta.get('namespace') == route.namespace) and
                (route.name is None or meta.get('name') == route.name) and
                labels_ok(meta.get('labels') or {}) and fields_ok(obj)
            )
        return matches

    def _serve_list(self, raw: aiohttp.web.BaseRequest, route: Route, rt: ResourceType) -> aiohttp.web.Response:
        matches = self._filter(raw, route)
        items = [self._output(rt, obj) for obj in self.store.list(rt, route.namespace) if matches(obj)]
        if tables.wants_table(raw.headers.get('Accept', '')):
            return _json(self._table(rt, items))
        # No pagination: `limit` is accepted and ignored, everything comes in one page without `continue`.
        return _json({
            'kind': f'{rt.kind}List',
            'apiVersion': rt.api_version,
            'metadata': {'resourceVersion': str(self.store.rv)},
            'items': items,
        })

    def _serve_deletecollection(self, raw: aiohttp.web.BaseRequest, route: Route, rt: ResourceType,
                                dry_run: bool) -> aiohttp.web.Response:
        matches = self._filter(raw, route)
        deleted = []
        for obj in self.store.list(rt, route.namespace):
            if matches(obj):
                result, _ = self.store.delete(rt, obj['metadata'].get('namespace'), obj['metadata']['name'],
                                              dry_run=dry_run)
                self._after_write(rt, result, dry_run)
                deleted.append(self._output(rt, result))
        return _json({'kind': f'{rt.kind}List', 'apiVersion': rt.api_version,
                      'metadata': {'resourceVersion': str(self.store.rv)}, 'items': deleted})

    # -- patches & server-side apply --------------------------------------------------------

    async def _serve_patch(self, raw: aiohttp.web.BaseRequest, route: Route, rt: ResourceType,
                           dry_run: bool) -> tuple[Obj, bool]:
        assert route.name is not None
        content_type = raw.content_type
        patch = await self._body(raw)
        if content_type == 'application/apply-patch+yaml':
            return self._apply(raw, route, rt, patch, dry_run)
        old = self.store.require(rt, route.namespace, route.name)
        if content_type == 'application/merge-patch+json':
            new = patching.merge_patch(old, patch)
        elif content_type == 'application/strategic-merge-patch+json':
            new = patching.strategic_merge_patch(old, patch)
        elif content_type == 'application/json-patch+json':
            new = patching.json_patch(old, patch)
        else:
            raise errors.unsupported_media_type(content_type)
        return self.store.update(rt, route.namespace, route.name, new, route.subresource, dry_run=dry_run), False

    def _apply(self, raw: aiohttp.web.BaseRequest, route: Route, rt: ResourceType, applied: Any,
               dry_run: bool) -> tuple[Obj, bool]:
        """Server-side apply, simplified: see patching.server_side_apply()."""
        assert route.name is not None
        manager = raw.query.get('fieldManager')
        if not manager:
            raise errors.bad_request('PATCH requests with apply content type must specify fieldManager')
        if not isinstance(applied, dict) or not applied.get('apiVersion') or not applied.get('kind'):
            raise errors.bad_request('apply patches must set apiVersion and kind')
        meta = applied.get('metadata') or {}
        if meta.get('name') not in (None, route.name):
            raise errors.bad_request(f'the name of the object ({meta.get("name")}) does not match the name on the URL ({route.name})')

        # Only the fields that an apply can own: user metadata + spec-like fields, or only status.
        owned_meta = {k: v for k, v in meta.items() if k in ('labels', 'annotations', 'finalizers', 'ownerReferences')}
        if route.subresource == 'status':
            fields = {'status': applied['status']} if 'status' in applied else {}
        else:
            fields = {k: v for k, v in applied.items() if k not in ('apiVersion', 'kind', 'metadata')}
            if rt.has_status:
                fields.pop('status', None)
            if owned_meta:
                fields['metadata'] = owned_meta

        old = self.store.get(rt, route.namespace, route.name)
        if old is None:
            if route.subresource is not None:
                raise errors.not_found(rt.group, rt.plural, route.name)
            body = copy.deepcopy(fields)
            body['metadata'] = {**owned_meta, 'name': route.name}
            obj = self.store.create(rt, route.namespace, body, dry_run=dry_run)
            if not dry_run:
                self.store.ownership(rt, route.namespace, route.name)[(manager, '')] = patching.leaf_paths(fields)
            return obj, True

        owners = self.store.ownership(rt, route.namespace, route.name)
        key = (manager, route.subresource or '')
        others: set[patching.Path] = set()
        for other_key, paths in owners.items():
            if other_key != key:
                others |= paths
        new = patching.server_side_apply(old, fields, owners.get(key, set()), others)
        if meta.get('resourceVersion'):  # an apply with a resourceVersion is a precondition
            new['metadata']['resourceVersion'] = meta['resourceVersion']
        obj = self.store.update(rt, route.namespace, route.name, new, route.subresource, dry_run=dry_run)
        if not dry_run:
            owners[key] = patching.leaf_paths(fields)
        return obj, False

    # -- watches ----------------------------------------------------------------------------

    async def _serve_watch(self, raw: aiohttp.web.BaseRequest, route: Route, rt: ResourceType) -> aiohttp.web.StreamResponse:
        query = raw.query
        matches = self._filter(raw, route)
        as_table = tables.wants_table(raw.headers.get('Accept', ''))
        rv_text = query.get('resourceVersion', '')
        send_initial = query.get('sendInitialEvents') == 'true'
        bookmarks = query.get('allowWatchBookmarks') in ('true', '1')
        timeout = float(query['timeoutSeconds']) if query.get('timeoutSeconds') else None
        if rv_text not in ('', '0') and not rv_text.isdigit():
            raise errors.bad_request(f'invalid resourceVersion: {rv_text!r}')

        def render(type_: str, obj: Obj) -> bytes:
            payload = self._table(rt, [obj]) if as_table and type_ != 'BOOKMARK' else self._output(rt, obj)
            return json.dumps({'type': type_, 'object': payload}, separators=(',', ':')).encode() + b'\n'

        def bookmark(rv: int, initial_end: bool = False) -> bytes:
            meta: dict[str, Any] = {'resourceVersion': str(rv)}
            if initial_end:
                meta['annotations'] = {'k8s.io/initial-events-end': 'true'}
            return render('BOOKMARK', {'kind': rt.kind, 'apiVersion': rt.api_version, 'metadata': meta})

        def translate(event: Event) -> bytes | None:
            # Like the apiserver's watch cache: selector-filtered watches see objects
            # entering the selection as ADDED and leaving it as DELETED.
            now_ok = matches(event.obj)
            was_ok = event.old is not None and matches(event.old)
            if event.type == 'MODIFIED' and now_ok and not was_ok:
                return render('ADDED', event.obj)
            if event.type == 'MODIFIED' and was_ok and not now_ok:
                return render('DELETED', event.obj)
            return render(event.type, event.obj) if now_ok else None

        # Subscribe and take the initial state in the same tick: nothing can slip in between.
        queue = self.store.subscribe(rt)
        try:
            initial: list[bytes] = []
            failure: ApiError | None = None
            if rv_text in ('', '0') or send_initial:
                initial = [render('ADDED', obj) for obj in self.store.list(rt, route.namespace) if matches(obj)]
                if send_initial:
                    initial.append(bookmark(self.store.rv, initial_end=True))
            else:
                try:
                    initial = [chunk for event in self.store.events_since(rt, int(rv_text))
                               if (chunk := translate(event)) is not None]
                except ApiError as e:
                    failure = e  # as the apiserver: 200, then an ERROR event (kube-rs relists on 410)

            response = aiohttp.web.StreamResponse(status=200, headers={'Content-Type': 'application/json'})
            response.enable_chunked_encoding()
            await response.prepare(raw)
            if failure is not None:
                await response.write(json.dumps({'type': 'ERROR', 'object': failure.status()}).encode() + b'\n')
                await response.write_eof()
                return response
            for chunk in initial:
                await response.write(chunk)

            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if timeout is not None else None
            next_bookmark = loop.time() + self.bookmark_interval
            while not self._stopping.is_set():
                now = loop.time()
                if deadline is not None and now >= deadline:
                    break
                if bookmarks and now >= next_bookmark and queue.empty():
                    # Every event up to the current revision has been delivered: safe to resume from it.
                    await response.write(bookmark(self.store.rv))
                    next_bookmark = now + self.bookmark_interval
                wait = 1.0  # wake up regularly to notice shutdowns and deadlines
                if deadline is not None:
                    wait = min(wait, deadline - now)
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=max(wait, 0.0))
                except asyncio.TimeoutError:
                    continue
                if event is None:  # woken up for the shutdown
                    continue
                chunk = translate(event)
                if chunk is not None:
                    await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            self.store.unsubscribe(rt, queue)

    # -- side effects: CRDs, reviews ----------------------------------------------------------

    def _review(self, rt: ResourceType, body: Any) -> Obj:
        """Access/token reviews: everything is allowed (there is no authorization here)."""
        obj = copy.deepcopy(body) if isinstance(body, dict) else {}
        obj['apiVersion'], obj['kind'] = rt.api_version, rt.kind
        obj.setdefault('metadata', {})
        if rt.kind.endswith('AccessReview'):
            obj['status'] = {'allowed': True, 'reason': 'the emulator allows everything'}
        elif rt.kind == 'SelfSubjectRulesReview':
            obj['status'] = {'resourceRules': [{'verbs': ['*'], 'apiGroups': ['*'], 'resources': ['*']}],
                             'nonResourceRules': [{'verbs': ['*'], 'nonResourceURLs': ['*']}], 'incomplete': False}
        elif rt.kind == 'SelfSubjectReview':
            obj['status'] = {'userInfo': {'username': 'admin', 'groups': ['system:masters', 'system:authenticated']}}
        elif rt.kind == 'TokenReview':
            obj['status'] = {'authenticated': True, 'user': {'username': 'admin', 'groups': ['system:masters']}}
        return obj

    def _after_write(self, rt: ResourceType, obj: Obj, dry_run: bool) -> None:
        """Play the apiextensions controller: a CRD becomes NamesAccepted & Established at once."""
        if dry_run or rt.key != (CRD_GROUP, CRD_PLURAL):
            return
        crd = self.store.get(rt, None, obj['metadata']['name'])
        if crd is None or crd['metadata'].get('deletionTimestamp'):
            return
        spec = crd.get('spec', {})
        status = copy.deepcopy(crd.get('status') or {})
        conditions = {c.get('type'): c for c in status.get('conditions', [])}
        for type_, reason, message in (('NamesAccepted', 'NoConflicts', 'no conflicts found'),
                                       ('Established', 'InitialNamesAccepted', 'the initial names have been accepted')):
            if conditions.get(type_, {}).get('status') != 'True':
                conditions[type_] = {'type': type_, 'status': 'True', 'reason': reason, 'message': message,
                                     'lastTransitionTime': crd['metadata']['creationTimestamp']}
        status['conditions'] = list(conditions.values())
        status['acceptedNames'] = spec.get('names', {})
        stored = [v['name'] for v in spec.get('versions', []) if v.get('storage')]
        status['storedVersions'] = sorted(set(status.get('storedVersions', [])) | set(stored))
        self.store.update(rt, None, crd['metadata']['name'], {**crd, 'status': status}, 'status')

    def _on_store_event(self, rt: ResourceType, event: Event) -> None:
        """Keep discovery in sync with the stored CRDs (register/unregister their resources)."""
        if rt.key != (CRD_GROUP, CRD_PLURAL):
            return
        if event.old is not None:
            self._unregister_crd(event.old, keep=event.obj)
        if event.type == 'DELETED':
            self._unregister_crd(event.obj, keep=None)
        else:
            self._register_crd(event.obj)

    def _crd_resources(self, crd: Obj) -> list[tuple[kmock.resource, kmock.ResourceInfo, list[dict[str, Any]]]]:
        spec = crd.get('spec') or {}
        names = spec.get('names') or {}
        group, plural, kind = spec.get('group'), names.get('plural'), names.get('kind')
        if not group or not plural or not kind:
            return []  # not valid enough to serve anything (the real apiserver would reject it)
        result = []
        for version in spec.get('versions') or []:
            if not version.get('served', True) or not version.get('name'):
                continue
            subresources = set((version.get('subresources') or {}).keys()) & {'status', 'scale'}
            info = kmock.ResourceInfo(
                kind=kind, singular=names.get('singular') or kind.lower(),
                namespaced=spec.get('scope', 'Namespaced') == 'Namespaced',
                verbs=ALL_VERBS, shortnames=names.get('shortNames') or [],
                categories=names.get('categories') or [], subresources=subresources,
            )
            result.append((kmock.resource(group, version['name'], plural), info,
                           version.get('additionalPrinterColumns') or []))
        return result

    def _register_crd(self, crd: Obj) -> None:
        for resource, info, columns in self._crd_resources(crd):
            self.resources[resource] = info
            self._printer_columns[(resource.group, resource.version, resource.plural)] = columns

    def _unregister_crd(self, crd: Obj, keep: Obj | None) -> None:
        kept = {res for res, _, _ in self._crd_resources(keep)} if keep is not None else set()
        for resource, _, _ in self._crd_resources(crd):
            if resource not in kept and resource in self.resources:
                del self.resources[resource]
                self._printer_columns.pop((resource.group, resource.version, resource.plural), None)
        if keep is None:  # the CRD is gone: so are all of its objects
            for resource, info, _ in self._crd_resources(crd)[:1]:
                self.store.drop_resource(ResourceType(
                    group=resource.group, version=resource.version, plural=resource.plural, kind=info.kind,
                    namespaced=bool(info.namespaced), has_status='status' in info.subresources))

    # ------------------------------------------------------------------------------------------
    # Discovery: kmock's handlers, with its quirks fixed.
    # ------------------------------------------------------------------------------------------

    @override
    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        # kmock's own errors (e.g. an unknown API group) carry kmock-specific reasons/hints
        # and tracebacks; answer with the apiserver's plain Status instead.
        if isinstance(exc, kmock.KubernetesNotFoundError):
            return _json(errors.no_such_resource().status(), status=404)
        return await super()._render_error(exc)

    @override
    async def _serve_server_version(self, request: kmock.Request) -> kmock.Payload:
        # kmock reports a k3s v1.26; claim a recent version so that clients see no version skew.
        # (The bundled discovery data is a recent cluster's anyway.)
        return {'major': '1', 'minor': '32', 'gitVersion': 'v1.32.0+kubeemu', 'gitCommit': '', 'gitTreeState': 'clean',
                'buildDate': '2026-01-01T00:00:00Z', 'goVersion': 'go1.23', 'compiler': 'gc', 'platform': 'linux/amd64'}

    def _group_versions(self) -> dict[str, list[str]]:
        """group -> versions, the preferred (highest-priority) version first."""
        groups: dict[str, set[str]] = {}
        for res in self.resources:
            if res.group and res.version:
                groups.setdefault(res.group, set()).add(res.version)
        return {group: sorted(versions, key=_version_priority) for group, versions in sorted(groups.items())}

    @staticmethod
    def _group_doc(group: str, versions: list[str]) -> dict[str, Any]:
        return {
            'name': group,
            'versions': [{'groupVersion': f'{group}/{v}', 'version': v} for v in versions],
            'preferredVersion': {'groupVersion': f'{group}/{versions[0]}', 'version': versions[0]},
        }

    @override
    async def _serve_apis(self, request: kmock.Request) -> kmock.Payload:
        # kmock picks a "preferred" version from a set (random per process): be deterministic.
        return {'kind': 'APIGroupList', 'apiVersion': 'v1',
                'groups': [self._group_doc(g, vs) for g, vs in self._group_versions().items()]}

    @override
    async def _serve_group(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None
        versions = self._group_versions().get(request.resource.group or '')
        if not versions:
            raise kmock.KubernetesResourceNotFoundError()
        return {'kind': 'APIGroup', 'apiVersion': 'v1', **self._group_doc(request.resource.group or '', versions)}

    @override
    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        payload = await super()._serve_version(request)
        assert isinstance(payload, dict) and request.resource is not None
        # kmock reports the core group as "/v1"; the apiserver (and kubectl) say "v1".
        if request.resource.group == '':
            payload['groupVersion'] = request.resource.version
        payload['resources'] = sorted(payload['resources'], key=lambda r: r['name'])
        for entry in payload['resources']:
            entry['verbs'] = sorted(entry['verbs'])
            if '/' in entry['name']:  # subresources: no short names etc. (else kubectl warns), only get/update
                entry.update(singularName='', shortNames=[], categories=[], verbs=['get', 'patch', 'update'])
        return payload
