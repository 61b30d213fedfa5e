"""``python -m kiln.router``: run one router process."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvloop

from kiln.errors import KilnError
from kiln.router.proxy import CONNECT_TIMEOUT, HEADER_TIMEOUT
from kiln.router.server import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kiln.router",
        description="kiln's L7 router: weighted release pools per environment.",
    )
    parser.add_argument("--control", type=Path, required=True, help="control API unix socket")
    parser.add_argument("--state", type=Path, help="where the last accepted config is kept")
    parser.add_argument(
        "--takeover",
        type=Path,
        metavar="OLD_SOCK",
        help="take the listening sockets over from the router serving this control socket",
    )
    parser.add_argument(
        "--takeover-drain",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long the old router may take to finish its requests (default 30)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=f"give up connecting to an instance after this long (default {CONNECT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--response-timeout",
        type=float,
        default=HEADER_TIMEOUT,
        metavar="SECONDS",
        help="answer 504 if an instance sends no response headers this long after the request"
        f" (default {HEADER_TIMEOUT:g})",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s kiln-router[%(process)d] %(levelname)s %(message)s",
    )
    log = logging.getLogger("kiln.router")
    try:
        uvloop.run(
            run(
                args.control,
                args.state,
                args.takeover,
                args.takeover_drain,
                connect_timeout=args.connect_timeout,
                response_timeout=args.response_timeout,
            )
        )
    except KilnError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
