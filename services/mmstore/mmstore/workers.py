"""Several server processes, each listening on its own ``SO_REUSEPORT`` socket.

uvicorn's ``workers`` share one listening socket: whichever process wakes first accepts every
connection waiting, so a handful of long-lived keep-alive clients (inference replicas, trainer
loaders, a balancer's pool) can all land on one worker while the others idle (measured: 16 wrk
connections on 2 workers gave 11k or 17k req/s from run to run). With ``SO_REUSEPORT`` each
worker has its own accept queue and the kernel spreads connections over them by address hash.
uvicorn's supervisor is kept as it is (worker restarts, signals); only what a worker listens on
changes. Where ``SO_REUSEPORT`` is missing, the workers share one socket as uvicorn's do.
"""

from __future__ import annotations

import socket
import sys

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import multiprocess


def reuseport_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _ReusePortProcess(multiprocess.Process):
    """A uvicorn worker that ignores the supervisor's shared socket and listens on its own."""

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover (child)
        super().target([reuseport_socket(self.config.host, self.config.port)])


def serve(config: uvicorn.Config) -> None:
    """Run ``config`` with ``config.workers`` processes (one: in this process)."""
    if config.workers <= 1:
        server = uvicorn.Server(config)
        server.run()
        if not server.started:
            sys.exit(STARTUP_FAILURE)  # as uvicorn.run: the app or the socket failed at startup
        return
    if not hasattr(socket, "SO_REUSEPORT"):  # uvicorn's own way: one socket shared by all
        multiprocess.Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    # Bound, never listening: the port is this server's (a busy port fails here, once, not in
    # every worker), while only the workers' sockets take connections.
    reserved = reuseport_socket(config.host, config.port, listen=False)
    multiprocess.Process = _ReusePortProcess  # the name the supervisor builds its workers from
    try:
        multiprocess.Multiprocess(config, sockets=[]).run()
    finally:
        reserved.close()
