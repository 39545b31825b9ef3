"""The declared job interface (cluster/jobs/base.py): the coordinator runs a job through its hooks
only (own tables, rows, retry and failure decisions, failure kinds), and the engine names no job."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

import pytest
from fabric import Config

from cluster.coordinator import Coordinator
from cluster.errors import JobError
from cluster.inventory import Host
from cluster.jobs import REGISTRY, hooks_of, job_class, names
from cluster.jobs.base import COMMIT, GIVE_BACK, KIND_DIED, KIND_ERROR, RETRY, Decision, Job
from cluster.jobs.trivial import TrivialJob
from cluster.store import Store

ROOT = Path(__file__).resolve().parent.parent


def local(name: str, slots: int = 2) -> Host:
    return Host(name=name, address="local", slots=slots, nice=10)


class Noted(TrivialJob):
    """Echo blocks; each block's first answer is retried later (an attempt row recorded), the
    second is committed with a row of the job's own table."""

    migrations = (["CREATE TABLE noted (run_id INTEGER NOT NULL, lo INTEGER NOT NULL, what TEXT NOT NULL,"
                   " host TEXT NOT NULL)"],)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.answered = set()

    def decide(self, block, result, host):
        if block.lo not in self.answered:
            self.answered.add(block.lo)
            return Decision(RETRY, delay=0.05, avoid=True, record=[("noted", {"what": "attempt", "host": host})])
        return Decision(COMMIT)

    def rows(self, block, result, host):
        return [("noted", {"what": "done", "host": host})]

    def block_meta(self, result):
        return {"echoed": bool(result)}


def test_job_tables_rows_and_retry_decisions(tmp_path):
    db = tmp_path / "r.db"
    outcome = Coordinator(Noted(12, "echo", block=1), [local("a"), local("b")], Config(), str(db)).run()
    assert outcome.items_total == 12
    with Store(db) as store:
        run_id = store.runs()[-1]["id"]
        notes = store.query("SELECT lo, what FROM noted WHERE run_id = ? ORDER BY lo, what", (run_id,))
        blocks = store.blocks(run_id)
    assert [(n["lo"], n["what"]) for n in notes] == [(lo, what) for lo in range(12) for what in ("attempt", "done")]
    assert all(b["attempts"] >= 2 for b in blocks)
    assert all(b["meta"]["echoed"] is True for b in blocks)


class Kinds(TrivialJob):
    """Remembers the failure kinds the coordinator hands it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kinds = []

    def failure(self, block, kind, message, host):
        self.kinds.append(kind)
        return Decision(GIVE_BACK)


@pytest.mark.parametrize("client_job, args, kind", [
    ("fail", {"message": "boom"}, KIND_ERROR),
    ("crash", {"signal": 9}, KIND_DIED),
])
def test_failure_kinds_come_from_the_agent(tmp_path, client_job, args, kind):
    job = Kinds(2, client_job, args=args)
    with pytest.raises(JobError, match=r"failed \d+ times"):
        Coordinator(job, [local("a"), local("b")], Config(), str(tmp_path / "r.db")).run()
    assert job.kinds and set(job.kinds) == {kind}


def test_registry():
    assert {"primes", "scrape"} <= set(names())
    for name in REGISTRY:
        cls = job_class(name)
        assert issubclass(cls, Job) and cls.name == name
    assert hooks_of("no-such-job") is Job and job_class("no-such-job") is None
    assert hooks_of("primes").slots_label() == "slots" and hooks_of("scrape").slots_label() == "workers"


def test_decision_refuses_an_unknown_action():
    with pytest.raises(ValueError):
        Decision("maybe")


# Names of jobs, their fields and hooks that must not appear in the engine's code (comments and
# docstrings may name them).
JOB_WORDS = ("checksum", "engines", "page_record", "ProxyError", "pages", "primes", "scrape", "hasattr")


def _code_words(path: Path) -> set:
    """Names and string contents of a module, without comments and docstrings."""
    words, previous = set(), tokenize.NEWLINE
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type in (tokenize.COMMENT, tokenize.NL):
            continue
        if token.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            previous = token.type  # a docstring (a string that is a statement of its own)
            continue
        if token.type in (tokenize.NAME, tokenize.STRING):
            words.update(w.strip("\"'") for w in token.string.replace(".", " ").replace("(", " ").split())
        previous = token.type
    return words


@pytest.mark.parametrize("module", ["cluster/coordinator.py", "cluster/scheduler.py", "cluster/calibrate.py"])
def test_the_engine_names_no_job(module):
    found = _code_words(ROOT / module) & set(JOB_WORDS)
    assert not found, f"{module} names {sorted(found)}"


def test_agents_name_no_job_but_the_hello_field():
    """cluster/agents.py checks the hello's shape (``engines`` is a field of the wire protocol)."""
    found = _code_words(ROOT / "cluster/agents.py") & (set(JOB_WORDS) - {"engines"})
    assert not found, sorted(found)
