"""Run the hub with uvicorn on a socket we bind ourselves, so port 0 works and the real URL
is known before the first request (written to `<home>/serve.json` for tests and scripts).

One worker per port: DESIGN §6 measured `--workers 2` stalling keep-alive requests by 44 ms.
"""

from __future__ import annotations

import json
import os
import socket

import uvicorn

from aipipe.cds.limits import require_loopback
from aipipe.hub.app import create_app
from aipipe.hub.home import HubPaths


def serve(paths: HubPaths, host: str, port: int, log_level: str = "warning") -> None:
    if paths.config.cds_allow_unauthenticated:
        require_loopback(host, "hub.yaml cds_allow_unauthenticated")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets accepted from a TCP
    # listener that says so; without it every keep-alive answer waited ~44 ms for the client's
    # delayed ACK (bench/round_overhead.py).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    bound_port = sock.getsockname()[1]
    url_host = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"http://{url_host}:{bound_port}"
    config = uvicorn.Config(create_app(paths), log_level=log_level, access_log=False)
    server = uvicorn.Server(config)
    tmp = paths.serve_info.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    os.replace(tmp, paths.serve_info)
    try:
        server.run(sockets=[sock])
    finally:
        paths.serve_info.unlink(missing_ok=True)
