#!/usr/bin/env python3
"""
Run the Kubernetes API server emulator (see README.md next to this file).

    python e2e/apiserver/server.py --port 0 --kubeconfig-out /tmp/kubeconfig [--ready-file /tmp/ready]

Listens on 127.0.0.1 (plain HTTP), writes a kubeconfig pointing at itself,
prints the URL, writes the ready file once listening, and exits cleanly
on SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pathlib
import signal
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import aiohttp.web  # noqa: E402

from kubeemu.emulator import ApiServerEmulator  # noqa: E402
from kubeemu.store import Store  # noqa: E402

KUBECONFIG_TEMPLATE = """\
apiVersion: v1
kind: Config
clusters:
- name: kubeemu
  cluster:
    server: {url}
users:
- name: kubeemu
  user:
    token: kubeemu-dummy-token
contexts:
- name: kubeemu
  context:
    cluster: kubeemu
    user: kubeemu
    namespace: default
current-context: kubeemu
"""


def _write_atomically(path: str, text: str) -> None:
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(tmp, path)


async def serve(args: argparse.Namespace) -> None:
    emulator = ApiServerEmulator(store=Store(history_size=args.watch_history),
                                 bookmark_interval=args.bookmark_interval)
    async with emulator:  # kmock's handler must be entered (it then reports its errors as Status objects)
        handler = emulator
        if args.audit_log:
            audit = open(args.audit_log, 'a', encoding='utf-8', buffering=1)

            async def handler(request):  # noqa: F811 - wraps the emulator
                auth = request.headers.get('Authorization', '')
                audit.write(json.dumps({
                    'user': auth.split(' ', 1)[1] if ' ' in auth else '',
                    'method': request.method,
                    'path': request.path,
                    'query': request.query_string,
                }) + '\n')
                return await emulator(request)
        server = aiohttp.web.Server(handler, handler_cancellation=True)
        runner = aiohttp.web.ServerRunner(server, shutdown_timeout=2.0)
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, args.host, args.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        url = f'http://{host}:{port}'

        if args.kubeconfig_out:
            _write_atomically(args.kubeconfig_out, KUBECONFIG_TEMPLATE.format(url=url))
        print(url, flush=True)
        if args.ready_file:
            _write_atomically(args.ready_file, url + '\n')

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

        logging.getLogger('kubeemu').info('shutting down')
        emulator.stop()  # let the watch streams end gracefully
        await runner.cleanup()
        if args.ready_file:
            try:
                os.unlink(args.ready_file)
            except FileNotFoundError:
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description='An in-memory Kubernetes API server emulator (kmock-based).')
    parser.add_argument('--host', default='127.0.0.1')
    parser.add_argument('--port', type=int, default=0, help='0 picks a free port')
    parser.add_argument('--kubeconfig-out', help='write a kubeconfig for this server to this path')
    parser.add_argument('--ready-file', help='write the URL to this file once listening')
    parser.add_argument('--watch-history', type=int, default=1000,
                        help='events kept per resource for watches resumed from a resourceVersion; older ones get 410 Gone')
    parser.add_argument('--bookmark-interval', type=float, default=10.0,
                        help='seconds between BOOKMARK events (only for watches with allowWatchBookmarks=true)')
    parser.add_argument('--log-level', default='INFO')
    parser.add_argument('--access-log', action='store_true', help='log every request')
    parser.add_argument('--audit-log', metavar='FILE',
                        help='append one JSON line per request: user (the bearer token), method, path, query')
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, format='%(asctime)s %(name)s %(levelname)s %(message)s')
    if not args.access_log:
        logging.getLogger('aiohttp.access').setLevel(logging.WARNING)
    asyncio.run(serve(args))


if __name__ == '__main__':
    main()
