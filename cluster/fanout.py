"""Run one function per host, all at once, each under its own deadline.

One hung host cannot block the rest: when its deadline passes it is reported
as timed out and its transport is closed, which unblocks whatever it waits on.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, TypeVar

from .errors import BeowulfError
from .inventory import Host

log = logging.getLogger(__name__)
T = TypeVar("T")


class HostOutcome:
    """What happened on one host: ``value`` or a one-line ``error``."""

    def __init__(self, host: Host):
        self.host = host
        self.value = None
        self.error: Optional[str] = None
        self.seconds = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def fan_out(hosts: list[Host], work: Callable[[Host, HostOutcome], T], deadline: float,
            on_timeout: Optional[Callable[[Host], None]] = None) -> list[HostOutcome]:
    """Call ``work(host, outcome)`` for every host in its own thread; outcomes in inventory order.

    ``work`` returns the value; a BeowulfError becomes the host's error line, any
    other exception too (logged with its traceback, since it is a bug).
    """
    outcomes = [HostOutcome(host) for host in hosts]

    def runner(outcome: HostOutcome) -> None:
        began = time.monotonic()
        try:
            outcome.value = work(outcome.host, outcome)
        except BeowulfError as err:
            outcome.error = str(err)
        except Exception as err:  # a bug, or a library error we did not anticipate
            log.exception("%s: unexpected error", outcome.host.name)
            outcome.error = f"{outcome.host.name}: {type(err).__name__}: {err}"
        finally:
            outcome.seconds = time.monotonic() - began

    threads = [threading.Thread(target=runner, args=(o,), name=f"host-{o.host.name}", daemon=True)
               for o in outcomes]
    for thread in threads:
        thread.start()
    end = time.monotonic() + deadline
    for thread, outcome in zip(threads, outcomes):
        thread.join(max(0.0, end - time.monotonic()))
        if thread.is_alive():
            outcome.error = f"{outcome.host.name}: no answer within {deadline:.0f}s (gave up)"
            if on_timeout:
                on_timeout(outcome.host)
    return outcomes
