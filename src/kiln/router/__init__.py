"""kiln's router: an HTTP/1.1 reverse proxy with weighted release pools.

It runs as its own process (``python -m kiln.router``) so that restarting
the daemon never drops a request, and hands its listening sockets to a
successor for zero-downtime upgrades. The daemon drives it through
:class:`RouterClient`.
"""

from kiln.router.client import RouterClient, RouterResponseError, spawn_router

__all__ = ["RouterClient", "RouterResponseError", "spawn_router"]
