"""``python -m kiln.daemon``: run the daemon of ``KILN_HOME`` in the foreground.

``kiln daemon start`` (and any command that needs it) starts this detached.
Only one daemon runs per home: the second one finds the lock held and exits.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import sys
import threading

from kiln.daemon.api import Handler, Server
from kiln.daemon.engine import Engine
from kiln.daemon.metrics import MetricsServer, render_daemon, serve_tcp
from kiln.errors import KilnError
from kiln.home import Home
from kiln.logs import retention_from_env
from kiln.logs.catalog import StateCatalog
from kiln.logs.collector import Collector
from kiln.runtime import get_runtime


def main() -> int:
    home = Home.from_env()
    home.ensure()
    logging.basicConfig(
        filename=home.logs / "daemon.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    lock = open(home.run / "daemon.lock", "a+b")  # noqa: SIM115 (held for the process's life)
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("a kiln daemon already runs for this KILN_HOME", file=sys.stderr)
        return 0
    sock = home.run / "daemon.sock"
    sock.unlink(missing_ok=True)
    engine = Engine(home, get_runtime(os.environ.get("KILN_RUNTIME", "local")))
    stop = threading.Event()
    server = Server(str(sock), Handler)
    server.engine = engine
    server.stop_event = stop
    max_age, max_bytes = retention_from_env()
    collector = Collector(
        home.logs / "instances",
        home.logs / "logs.db",
        StateCatalog(engine.state),
        max_age=max_age,
        max_bytes=max_bytes,
    )
    server.logs = collector
    collector.start()
    metrics: MetricsServer | None = None
    if os.environ.get("KILN_METRICS_LISTEN"):
        try:
            metrics = serve_tcp(
                os.environ["KILN_METRICS_LISTEN"], lambda: render_daemon(engine, collector)
            )
        except KilnError as exc:
            logging.getLogger("kiln.daemon").error("%s", exc)
            engine.state.event("daemon.warning", str(exc))
    engine.recover()
    loop = threading.Thread(target=engine.run, args=(stop,), name="kiln-engine", daemon=True)
    loop.start()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    (home.run / "daemon.pid").write_text(str(os.getpid()))
    logging.getLogger("kiln.daemon").info("daemon %s serving on %s", os.getpid(), sock)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        stop.set()
        loop.join(timeout=10)
        if server.stop_all:
            engine.stop_all()
        if metrics is not None:
            metrics.shutdown()
        collector.stop()
        sock.unlink(missing_ok=True)
        engine.state.event("daemon.exited", "daemon exited")
    return 0


if __name__ == "__main__":
    sys.exit(main())
