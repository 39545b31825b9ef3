"""Shared pytest fixtures: sshd test clusters, the repo root and a ``fab`` runner."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable, List

import pytest

from harness import REPO_ROOT, SshCluster, require_sshd
from harness import run_fab as _run_fab

# A shell without job control starts background commands with SIGINT ignored, and an ignored
# signal stays ignored across exec: the fab children of the Ctrl-C tests would never see it.
# A handler here is reset to the default in every child, so they get Ctrl-C as a user's fab does.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root folder (the one holding fabfile.py)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def ssh_cluster_session(tmp_path_factory) -> SshCluster:
    """Three sshd hosts (h1..h3 on 127.0.0.2-4) started once for the whole session."""
    require_sshd()
    with SshCluster(tmp_path_factory.mktemp("cluster"), 3) as cluster:
        yield cluster


@pytest.fixture
def ssh_cluster(ssh_cluster_session) -> SshCluster:
    """The shared three-host cluster, all hosts running and no relays, for one test.

    A test may stop or kill hosts and add relays; they are restored afterwards.
    """
    ssh_cluster_session.ensure_running()
    yield ssh_cluster_session
    ssh_cluster_session.ensure_running()


@pytest.fixture
def make_cluster(tmp_path_factory) -> Callable[..., SshCluster]:
    """A factory ``make_cluster(n, **kwargs)`` returning a new started cluster.

    Every cluster it made is stopped at teardown.
    """
    require_sshd()
    made: List[SshCluster] = []

    def make(n: int = 3, **kwargs) -> SshCluster:
        cluster = SshCluster(tmp_path_factory.mktemp("cluster"), n, **kwargs)
        made.append(cluster)
        return cluster.start()

    yield make
    for cluster in made:
        cluster.stop()


@pytest.fixture
def fresh_cluster(make_cluster) -> Callable[..., SshCluster]:
    """Another name for ``make_cluster``."""
    return make_cluster


@pytest.fixture(scope="session")
def run_fab() -> Callable:
    """``run_fab(args, cwd=None, config=None, input=None, timeout=120, env=None)``.

    Runs ``python -m fabric -r REPO [-f config] *args`` and returns the
    CompletedProcess with text stdout/stderr (see harness.run_fab).
    """
    return _run_fab
