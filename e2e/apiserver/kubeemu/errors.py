"""
Kubernetes-style API errors, rendered as ``kind: Status`` objects.

Clients (kubectl, kube-rs) decide what to do from ``code`` and ``reason``:
e.g. kube-rs treats ``409``/``Conflict`` as a retryable optimistic-concurrency
failure, and the watcher re-lists on ``410``/``Expired``.
"""
from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An API error with a Status payload (``kind: Status, status: Failure``)."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            'kind': 'Status',
            'apiVersion': 'v1',
            'metadata': {},
            'status': 'Failure',
            'message': self.message,
            'reason': self.reason,
            'code': self.code,
        }
        if self.details is not None:
            status['details'] = self.details
        return status


def _details(name: str | None, group: str, plural: str) -> dict[str, Any]:
    details: dict[str, Any] = {'group': group, 'kind': plural}
    if name is not None:
        details['name'] = name
    return details


def _qualified(group: str, plural: str) -> str:
    # The apiserver names resources as "plural.group" (or just "plural" for the core group).
    return f'{plural}.{group}' if group else plural


def not_found(group: str, plural: str, name: str | None) -> ApiError:
    return ApiError(404, 'NotFound', f'{_qualified(group, plural)} "{name}" not found',
                    _details(name, group, plural))


def no_such_resource() -> ApiError:
    return ApiError(404, 'NotFound', 'the server could not find the requested resource', {})


def already_exists(group: str, plural: str, name: str) -> ApiError:
    return ApiError(409, 'AlreadyExists', f'{_qualified(group, plural)} "{name}" already exists',
                    _details(name, group, plural))


def conflict(group: str, plural: str, name: str, why: str | None = None) -> ApiError:
    why = why or 'the object has been modified; please apply your changes to the latest version and try again'
    return ApiError(409, 'Conflict', f'Operation cannot be fulfilled on {_qualified(group, plural)} "{name}": {why}',
                    _details(name, group, plural))


def bad_request(message: str) -> ApiError:
    return ApiError(400, 'BadRequest', message)


def invalid(group: str, plural: str, name: str | None, message: str) -> ApiError:
    return ApiError(422, 'Invalid', f'{_qualified(group, plural)} "{name or ""}" is invalid: {message}',
                    _details(name, group, plural))


def method_not_allowed(message: str = 'the server does not allow this method on the requested resource') -> ApiError:
    return ApiError(405, 'MethodNotAllowed', message, {})


def unsupported_media_type(content_type: str) -> ApiError:
    return ApiError(415, 'UnsupportedMediaType', f'the body of the request was in an unknown format - '
                    f'accepted media types include: application/json-patch+json, application/merge-patch+json, '
                    f'application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type!r})')


def gone(rv: str) -> ApiError:
    return ApiError(410, 'Expired', f'too old resource version: {rv}')
