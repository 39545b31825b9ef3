"""`fab dashboard`: the store's runs, live, in a browser (read-only; README.md, "Dashboard")."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable

from cluster.errors import UsageError

from .common import beowulf_task, parse_int, setup_logging, store_path

DEFAULT_PORT = 8787  # as cluster/dashboard/server.py


@beowulf_task(help={
    "db": "results store (SQLite file; default results.db, or beowulf.db in fabric.yaml); opened read-only",
    "port": "TCP port to listen on (default 8787; 0 picks a free one)",
    "bind": "address to listen on (default 127.0.0.1); any other address needs the token printed in the URL",
    "wait": "serve a store that does not exist yet (the page says so until a run creates it); "
            "without it a missing --db is an error",
})
def dashboard(c, db=None, port="8787", bind="127.0.0.1", wait=False):
    """Serve a live page of the store's runs: progress, ETA, each host's rate, sum of parts, timeline.

    The figures are fab stats' (same names, same values), updated once a second while a
    run goes; the store is only read. Listens on 127.0.0.1 unless --bind says otherwise;
    then a token is needed, printed once here in the URL. Ctrl-C stops it.
    """
    from cluster.dashboard.server import Dashboard, check_bind

    number = parse_int("port", port, minimum=0, maximum=65535)
    address = check_bind(bind)
    path = store_path(c, db)
    if not wait and not path.is_file():  # it only reads: a store that is not there is a typo, or too early
        raise UsageError(f"--db {path}: no such store (a run creates it: fab primes, scrape or map; "
                         "--wait serves it before, --dashboard on the run beside it)")
    setup_logging(quiet=True)
    board = Dashboard(path, bind=address, port=number)
    print(f"dashboard of {path}: {board.url}", flush=True)
    if board.token:
        print(f"listening on {address}, not loopback only: the token in the URL is required "
              "(anyone with the URL can read the store's figures)", file=sys.stderr, flush=True)
    print("Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        board.serve_forever()
    finally:
        board.httpd.server_close()


def start_beside(db_path: Path, port: int = 0, bind: str = "127.0.0.1") -> tuple[str, Callable[[], None]]:
    """Start a dashboard of ``db_path`` in a thread beside a run (``fab primes --dashboard``): (URL, stop)."""
    from cluster.dashboard.server import Dashboard

    board = Dashboard(db_path, bind=bind, port=port).start()
    return board.url, board.stop


@contextlib.contextmanager
def beside(db_path: Path, enabled: bool):
    """``fab primes --dashboard``: a dashboard of the run's store while the block runs, its URL printed.

    Port 8787 when free, else any free port; loopback only. Nothing happens when ``enabled`` is false.
    """
    if not enabled:
        yield None
        return
    from cluster.errors import BeowulfError

    try:
        url, stop = start_beside(db_path, DEFAULT_PORT)
    except BeowulfError:  # 8787 taken (another dashboard): any free port
        url, stop = start_beside(db_path, 0)
    print(f"dashboard: {url} (stops when this run ends; fab dashboard serves it afterwards)",
          file=sys.stderr, flush=True)
    try:
        yield url
    finally:
        stop()
