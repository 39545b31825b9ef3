"""Run one function per host, many at once, each under its own deadline.

One hung host cannot block the rest: when its deadline passes it is reported
as timed out and its transport is closed, which unblocks whatever it waits on.
At most MAX_CONCURRENT_HOSTS hosts are worked on at a time: 100 at once
thrash the coordinator (a Paramiko transport thread each, every command's
channel polled) and, when the hosts share machines, those machines too; each
host's deadline starts when its turn does.
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
# Hosts worked on at once. 100 loopback hosts on 2 cores: 16 at a time provisioned all of
# them in ~33 s; all 100 at once took 73 s and 70 of them hit their 60 s command timeout.
MAX_CONCURRENT_HOSTS = 16


class HostOutcome:
    """What happened on one host: ``value`` or a one-line ``error``."""

    def __init__(self, host: Host):
        self.host = host
        self.value = None
        self.error: Optional[str] = None
        self.seconds = 0.0
        self.began: Optional[float] = None  # when its turn came (None while it waits)

    @property
    def ok(self) -> bool:
        return self.error is None


def fan_out(hosts: list[Host], work: Callable[[Host, HostOutcome], T], deadline: float,
            on_timeout: Optional[Callable[[Host], None]] = None,
            concurrency: int = MAX_CONCURRENT_HOSTS) -> list[HostOutcome]:
    """Call ``work(host, outcome)`` for every host in its own thread; outcomes in inventory order.

    At most ``concurrency`` calls run at once; each has ``deadline`` seconds from its start.
    ``work`` returns the value; a BeowulfError becomes the host's error line, any
    other exception too (logged with its traceback, since it is a bug).
    """
    outcomes = [HostOutcome(host) for host in hosts]
    turns = threading.Semaphore(max(1, concurrency))
    ended = threading.Event()  # set whenever a host's work ends
    released: set[int] = set()  # outcomes whose turn went back (by the runner or on giving up)
    guard = threading.Lock()

    def give_turn_back(index: int) -> None:
        with guard:
            if index in released:
                return
            released.add(index)
        turns.release()

    def runner(index: int, outcome: HostOutcome) -> None:
        turns.acquire()
        outcome.began = began = time.monotonic()
        try:
            outcome.value = work(outcome.host, outcome)
        except BeowulfError as err:
            outcome.error = str(err)
        except Exception as err:  # a bug, or a library error we did not anticipate
            log.exception("%s: unexpected error", outcome.host.name)
            outcome.error = f"{outcome.host.name}: {type(err).__name__}: {err}"
        finally:
            outcome.seconds = time.monotonic() - began
            give_turn_back(index)
            ended.set()

    threads = [threading.Thread(target=runner, args=(i, o), name=f"host-{o.host.name}", daemon=True)
               for i, o in enumerate(outcomes)]
    for thread in threads:
        thread.start()
    pending = list(range(len(outcomes)))
    while pending:
        ended.clear()
        now = time.monotonic()
        waiting, next_deadline = [], now + 1.0
        for index in pending:
            outcome = outcomes[index]
            if not threads[index].is_alive():
                continue
            if outcome.began is not None and now >= outcome.began + deadline:
                # Gave up: its turn goes to the next host (closing its transport unblocks its thread).
                outcome.error = f"{outcome.host.name}: no answer within {deadline:.0f}s (gave up)"
                give_turn_back(index)
                if on_timeout:
                    on_timeout(outcome.host)
                continue
            if outcome.began is not None:
                next_deadline = min(next_deadline, outcome.began + deadline)
            waiting.append(index)
        pending = waiting
        if pending:
            ended.wait(max(0.0, next_deadline - now))
    return outcomes
