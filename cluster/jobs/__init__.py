"""Per-workload jobs: how to split the work, what a host runs, how to check and store a result.

The interface every job implements is cluster/jobs/base.py ``Job``; the registry below maps
a job's name (the run's ``job`` in the store, the client job module) to its class, so that
the engine and the tools (stats, calibrate, report) find a job's hooks by name instead of
branching on it (docs/ARCHITECTURE.md, "How to add a job"). Modules are imported when asked
for (primes needs numpy).
"""

from __future__ import annotations

import importlib
from typing import Optional

from .base import Job

# name -> (module, class). A new job adds its line here.
REGISTRY: dict[str, tuple[str, str]] = {
    "primes": ("cluster.jobs.primes", "PrimesJob"),
    "scrape": ("cluster.jobs.scrape", "ScrapeJob"),
}


def register(name: str, module: str, cls: str) -> None:
    """Add (or replace) a job of the registry."""
    REGISTRY[name] = (module, cls)


def names() -> list[str]:
    """The registered jobs' names, sorted."""
    return sorted(REGISTRY)


def job_class(name: str) -> Optional[type]:
    """The Job class of ``name``, or None for a job not registered (e.g. a built-in client job)."""
    entry = REGISTRY.get(name)
    if entry is None:
        return None
    return getattr(importlib.import_module(entry[0]), entry[1])


def hooks_of(name: str) -> type:
    """The class of job ``name`` for its class-level hooks (presentation, calibrate,
    migrations): the base Job's defaults for a job not registered."""
    return job_class(name) or Job
