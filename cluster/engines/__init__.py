"""Which engine carries a job's tasks: beowulf's own agents over SSH, or a Dask cluster.

``--engine ssh|dask`` (default: ``beowulf.engine`` in fabric.yaml, else ``ssh``) and
``--scheduler ADDRESS`` (default: ``beowulf.scheduler``; none: an embedded LocalCluster).
The engine changes how tasks travel, never what a run is: the run's identity in the store
leaves it out, so a run started on one engine resumes on the other (README, "Engines").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import UsageError

ENGINES = ("ssh", "dask")
INSTALL_HINT = "pip install -r requirements-dask.txt"

ENGINE_HELP = {
    "engine": "ssh (beowulf's agents on hosts.ini's hosts, the default) or dask (the workers of a Dask cluster)",
    "scheduler": "--engine dask: the Dask scheduler's address (tcp://HOST:8786, tls://...); "
                 "default: beowulf.scheduler in fabric.yaml, else a LocalCluster on this computer",
}


@dataclass
class EngineChoice:
    name: str  # "ssh" or "dask"
    scheduler: Optional[str] = None  # dask: the scheduler's address, None for the embedded LocalCluster

    @property
    def is_dask(self) -> bool:
        return self.name == "dask"


def choose(config: dict, engine: Optional[str], scheduler: Optional[str]) -> EngineChoice:
    """The engine from the flags, else fabric.yaml's ``beowulf:`` section; UsageError when wrong."""
    name = str(engine or config.get("engine") or "ssh").strip().lower()
    if name not in ENGINES:
        origin = "--engine" if engine else "beowulf.engine in fabric.yaml"
        raise UsageError(f"{origin}: expected ssh or dask, not {name[:40]!r}")
    address = scheduler or config.get("scheduler")
    if name == "ssh":
        if scheduler:
            raise UsageError("--scheduler is for --engine dask")
        return EngineChoice("ssh")
    require_dask()
    from .dask import check_address

    return EngineChoice("dask", check_address(address) if address else None)


def require_dask() -> None:
    """UsageError (exit 2) telling how to install Dask when ``distributed`` does not import."""
    try:
        import cloudpickle  # noqa: F401
        import distributed  # noqa: F401
    except ImportError:
        raise UsageError(f"--engine dask needs dask[distributed], which is not installed: {INSTALL_HINT}") from None


def open_dask(choice: EngineChoice):
    """Connect to the chosen scheduler (or start the LocalCluster): a started DaskEngine."""
    from .dask import DaskEngine

    return DaskEngine(choice.scheduler).start()
