"""Run the hub with uvicorn on a socket we bind ourselves, so port 0 works and the real URL
is known before the first request (written to `<home>/serve.json` for tests and scripts).

One worker per port: DESIGN §6 measured `--workers 2` stalling keep-alive requests by 44 ms.
One process per home: `<home>/serve.lock` is flock()ed for the life of the process, so a second
`hub serve` of the same home stops before it binds or touches `serve.json`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket

import uvicorn

from aipipe.cds.limits import require_loopback
from aipipe.errors import ConfigError, ConflictError
from aipipe.hub.app import create_app
from aipipe.hub.home import HubPaths
from aipipe.hub.mtls import PeerCertProtocol
from aipipe.secure.keyfiles import write_private
from aipipe.tls import require_hub_tls, scheme


def serve(
    paths: HubPaths,
    host: str,
    port: int,
    log_level: str = "warning",
    *,
    insecure_http: bool = False,
) -> None:
    """Serve until interrupted: HTTPS (TLS 1.3) with hub.yaml's tls_cert/tls_key, and with
    `mtls: required` client certificates (`aipipe.hub.mtls`); plain HTTP only with
    `insecure_http`, on a loopback address (development)."""
    if paths.config.cds_allow_unauthenticated:
        require_loopback(host, "hub.yaml cds_allow_unauthenticated")
    if insecure_http and paths.config.mtls == "required":
        raise ConfigError(
            f"hub.yaml at {paths.home} says mtls: required, which needs HTTPS: drop "
            "--insecure-http, or turn mutual TLS off (aipipe hub tls mtls off)"
        )
    tls = None if insecure_http else paths.tls()
    require_hub_tls(paths.home, host, tls, insecure_http=insecure_http)
    lock = lock_home(paths)
    try:
        sock = _listen(host, port)
        family = sock.family
        bound_port = sock.getsockname()[1]
        url_host = f"[{host}]" if family == socket.AF_INET6 else host
        url = f"{scheme(tls)}://{url_host}:{bound_port}"
        options = {} if tls is None else tls.uvicorn_options()
        if tls is not None and tls.client_ca is not None:  # mutual TLS: the app sees the peer
            options["http"] = PeerCertProtocol
        config = uvicorn.Config(create_app(paths), log_level=log_level, access_log=False, **options)
        server = uvicorn.Server(config)
        tmp = paths.serve_info.with_suffix(".tmp")
        write_private(tmp, json.dumps({"url": url, "pid": os.getpid()}).encode(), what="serve info")
        os.replace(tmp, paths.serve_info)
        try:
            server.run(sockets=[sock])
        finally:
            paths.serve_info.unlink(missing_ok=True)
    finally:
        os.close(lock)  # releases the flock


def lock_home(paths: HubPaths) -> int:
    """Take `<home>/serve.lock` for this process, or say which process serves the home."""
    fd = os.open(paths.serve_lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"cannot lock {paths.serve_lock}: {exc.strerror}") from exc
        raise ConflictError(
            f"the hub at {paths.home} is already served by {_holder(paths)}; "
            "stop that process first (one `hub serve` per home)"
        ) from exc
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _holder(paths: HubPaths) -> str:
    try:
        info = json.loads(paths.serve_info.read_text())
        return f"pid {info['pid']} at {info['url']}"
    except (OSError, ValueError, KeyError, TypeError):
        pid = paths.serve_lock.read_text().strip() or "?"
        return f"pid {pid} (still starting)"


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets accepted from a TCP
    # listener that says so; without it every keep-alive answer waited ~44 ms for the client's
    # delayed ACK (bench/round_overhead.py).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is already in use; stop what listens there or pass "
                "another --port (0 picks a free one)"
            ) from exc
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock
