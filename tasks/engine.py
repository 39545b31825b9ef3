"""--engine / --scheduler for the tasks that run jobs (fab primes, fab scrape): the hosts to use
and how the coordinator reaches them (cluster/engines/)."""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

from cluster.engines import EngineChoice, choose, open_dask
from cluster.errors import JobError, UsageError

from .common import beowulf_config, load_hosts

log = logging.getLogger(__name__)
# Seconds to wait for a first worker (a dask-jobqueue cluster may still be scaling up).
FIRST_WORKER_SECONDS = 60.0


@dataclass
class Engine:
    """What a job task hands to its Coordinator: the hosts, and how to reach them."""

    choice: EngineChoice
    hosts: list
    dask: object = None
    kwargs: dict = field(default_factory=dict)  # Coordinator(**kwargs): link_factory for dask

    def attach(self, coordinator) -> None:
        """Workers joining or leaving mid-run reach the coordinator (dask only)."""
        if self.dask is not None:
            self.dask.watch(coordinator)


def engine_choice(c, engine: Optional[str], scheduler: Optional[str], inventory: Optional[str] = None,
                  hosts: Optional[str] = None, tor: bool = False) -> EngineChoice:
    """Validate the engine flags (UsageError, exit 2) before anything is started."""
    choice = choose(beowulf_config(c), engine, scheduler)
    if choice.is_dask:
        if tor:
            raise UsageError("--tor is not available with --engine dask (a Dask worker has no Tor set up by "
                             "beowulf); use the ssh engine for --tor")
        if inventory or hosts:
            raise UsageError("--inventory and --hosts are for --engine ssh; with --engine dask the hosts are "
                             "the Dask scheduler's workers")
    return choice


@contextmanager
def engine_hosts(c, choice: EngineChoice, inventory: Optional[str] = None, hosts: Optional[str] = None):
    """Yield an Engine: hosts.ini's hosts (ssh), or the Dask cluster's workers (closed afterwards)."""
    if not choice.is_dask:
        _path, selected = load_hosts(c, inventory, hosts)
        yield Engine(choice, selected)
        return
    dask = open_dask(choice)
    try:
        if not dask.workers:
            where = choice.scheduler or "the LocalCluster"
            log.info("waiting up to %.0fs for a worker of %s", FIRST_WORKER_SECONDS, where)
            try:
                dask.client.wait_for_workers(1, timeout=FIRST_WORKER_SECONDS)
            except (TimeoutError, OSError) as err:
                raise JobError(f"the Dask scheduler at {where} has no worker ({type(err).__name__}); "
                               "start some (README, Engines) and run the command again") from None
            dask.refresh()
        yield Engine(choice, dask.hosts(), dask, {"link_factory": dask.link_factory})
    finally:
        dask.close()
        # The command ends soon after: the interpreter's last collection would walk every object
        # Dask and its imports made, 0.13 s of the command's end on this machine against 0.03 s
        # frozen (BENCHMARKS.md, "Dask engine"). Frozen objects are still freed by refcount.
        gc.freeze()
