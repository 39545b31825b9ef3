"""The scrape job: one URL a block, politely scheduled, retried by the rules of HTTP.

Items are URL indices (the normalised URL set, sorted, so the same set always
gives the same indices and a run resumes). What a host returns is checked
(the body's sha256 must match), then ``decide`` says whether the page is final
(committed: a page record plus the compressed body) or must be retried:

- 429 and 503 honour Retry-After (seconds or HTTP date), else back off exponentially;
- other 5xx, 408, timeouts, refused connections and connections dropped before
  any response retry a bounded number of times, on another host when there is one;
- any other 4xx, DNS and TLS errors, robots.txt refusals are final.

What a host sends is hostile until checked (SECURITY.md, "Scrape"): a body must be one
complete zlib stream of at most ``max_bytes`` once inflated (and of a bounded compressed
size), ``--no-bodies`` drops any body sent anyway, robots.txt text is at most
ROBOTS_MAX_BYTES.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import zlib
from dataclasses import dataclass
from typing import Optional

from cluster import __version__
from cluster.errors import BeowulfError
from cluster.jobs.base import COMMIT, GIVE_BACK, KIND_PROXY, LOSE_HOST, RETRY, Decision, Job
from cluster.politeness import UNKNOWN, DomainSchedule
from cluster.scheduler import Block

DEFAULT_USER_AGENT = f"beowulf/{__version__}"
# robots.txt text a host may report (UTF-8 bytes): the client's cap (client/scrape.py ROBOTS_MAX_BYTES).
ROBOTS_MAX_BYTES = 512 * 1024
# Address ranges a redirect may not move to from a public address (client/scrape.py PRIVATE_NETWORKS;
# fabric.yaml beowulf.private_networks replaces them, README.md "Scrape").
PRIVATE_NETWORKS = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
)
# Attempts of one URL before its last answer is recorded as final.
MAX_ATTEMPTS = 4
# Back-off after a 429/503 without Retry-After, or a server error: first wait, doubling, cap.
BACKOFF_FIRST, BACKOFF_CAP = 2.0, 300.0
# A Retry-After longer than this is capped (and the page retried then).
RETRY_AFTER_CAP = 600.0
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
RETRY_ERRORS = {"timeout", "connect"}
# A fetch is overdue after --timeout plus the site's gap (at most this much) plus this margin.
MAX_GAP_WAIT, TASK_MARGIN = 130.0, 5.0


class InvalidPage(BeowulfError):
    """A host's answer does not hold together (body does not match its sha256)."""


def default_user_agent(contact: Optional[str] = None) -> str:
    """``beowulf/VERSION``, plus ``(+CONTACT)`` when the user configured a contact URL."""
    return f"{DEFAULT_USER_AGENT} (+{contact})" if contact else DEFAULT_USER_AGENT


def compressed_bound(size: int) -> int:
    """The most bytes zlib's compress() makes from ``size`` bytes (zlib's deflateBound, plus room)."""
    return size + (size >> 12) + (size >> 14) + (size >> 25) + 64


def inflate(payload: bytes, limit: int) -> bytes:
    """The bytes of one complete zlib stream, at most ``limit`` of them; ValueError otherwise
    (cut off, followed by other bytes, damaged, or inflating to more)."""
    stream = zlib.decompressobj()
    try:
        body = stream.decompress(payload, limit + 1)
    except zlib.error as err:
        raise ValueError(f"damaged zlib stream ({err})") from None
    if len(body) > limit or stream.unconsumed_tail:
        raise ValueError(f"inflates to more than {limit} bytes")
    if not stream.eof:
        raise ValueError("zlib stream is cut off")
    if stream.unused_data:
        raise ValueError("bytes after the end of the zlib stream")
    return body


@dataclass(frozen=True)
class FetchOptions:
    """What defines the answer of a scrape run (with the URL set)."""

    timeout: float = 30.0
    max_bytes: int = 5_000_000
    user_agent: str = DEFAULT_USER_AGENT
    robots: bool = True
    insecure: bool = False
    bodies: bool = True
    tor: bool = False
    allow_private_redirects: bool = False
    private_networks: tuple = PRIVATE_NETWORKS


# Columns of a page record (the pages table, besides run_id and lo).
PAGE_COLUMNS = ("url", "final_url", "status", "content_type", "content_encoding", "size", "truncated", "sha256",
                "title", "elapsed", "host", "tor", "error", "error_kind", "attempts")

# The scrape job's own table (Job.migrations): one row per fetched URL of a scrape run
# (its body, compressed, is in the store's payloads). Stores made before the job interface
# had it in the core schema; Store.migrate_job records it as this job's version 1.
PAGES_V1 = [
    """CREATE TABLE IF NOT EXISTS pages (
        run_id       INTEGER NOT NULL,
        lo           INTEGER NOT NULL,        -- the URL's index in the run
        url          TEXT    NOT NULL,
        final_url    TEXT,
        status       INTEGER,
        content_type TEXT,
        size         INTEGER,
        truncated    INTEGER NOT NULL DEFAULT 0,
        sha256       TEXT,
        title        TEXT,
        elapsed      REAL,
        host         TEXT    NOT NULL,
        tor          INTEGER NOT NULL DEFAULT 0,
        error        TEXT,
        error_kind   TEXT,
        attempts     INTEGER NOT NULL DEFAULT 1,
        content_encoding TEXT,
        PRIMARY KEY (run_id, lo),
        FOREIGN KEY (run_id, lo) REFERENCES blocks (run_id, lo) ON DELETE CASCADE
    )""",
]


class ScrapeJob(Job):
    """Fetch every URL once across the cluster."""

    name = "scrape"
    migrations = (PAGES_V1,)
    encoded_fields = ("body",)
    unit = ("page", "pages")

    def __init__(self, urls: list[str], options: FetchOptions, delay: float = 1.0, per_domain: int = 1,
                 concurrency: int = 4):
        self.urls = sorted(urls)
        self.options = options
        self.delay = delay
        self.per_domain = per_domain
        self.concurrency = concurrency
        self.start, self.end, self.total = 0, len(self.urls) - 1, len(self.urls)
        self.schedule: Optional[DomainSchedule] = None
        self.run_id = 0

    # ------------------------------------------------------------ identity and shape

    def params(self) -> dict:
        digest = hashlib.sha256("\n".join(self.urls).encode("utf-8")).hexdigest()
        options = dict(self.options.__dict__)
        return {"urls": digest, "count": self.total, "options": options, "tor": self.options.tor}

    def make_schedule(self, done: list[tuple[int, int]], min_block: int = 1) -> DomainSchedule:
        """Per-site politeness (cluster/politeness.py): one URL a block."""
        self.schedule = DomainSchedule(self.urls, done, self.delay, self.per_domain, self.options.robots)
        return self.schedule

    @classmethod
    def slots_label(cls) -> str:
        return "workers"

    def first_block(self) -> int:
        return 1

    def max_block(self) -> int:
        return 1

    def min_block(self) -> int:
        return 1

    def slot_factor(self) -> int:
        """Agent workers per slot: fetching waits on the network, so each slot runs several."""
        return self.concurrency

    def capacity(self, slots: int) -> int:
        """Tasks in flight per host: one per worker, plus a short queue (half the workers,
        at least 2) so a worker finishing a page starts the next without waiting a round
        trip to the coordinator (it hides round trips up to about half a page's time).
        Only URLs of sites with no gap between request starts are queued
        (DomainSchedule.next_block): a politely spaced request starts when it is sent."""
        return slots + max(2, slots // 2)

    # ------------------------------------------------------------ per host

    def prepare_host(self, transport) -> None:
        """--tor fails closed: a host whose Tor SOCKS port does not answer, or whose tor is not
        bootstrapped (its control port says so), is left out before any request (cluster/tor.py)."""
        if not self.options.tor:
            return
        from cluster.tor import tor_ready

        tor_ready(transport)

    def task_args_for(self, block: Block, link, task_id: int) -> dict:
        """The fetch of one URL by the host behind ``link`` (its proxy, one circuit per worker)."""
        options = self.options
        args = {
            "url": self.urls[block.lo], "timeout": options.timeout, "max_bytes": options.max_bytes,
            "user_agent": options.user_agent, "insecure": options.insecure, "bodies": options.bodies,
        }
        if options.robots:
            rules = self.schedule.robots_of(block)
            args["robots"] = {"fetch": True} if getattr(block, "fetch_robots", False) else rules
            args["gap"] = self.delay
        else:
            args["robots"] = None
        if options.allow_private_redirects:
            args["allow_private_redirects"] = True
        else:
            args["private_networks"] = list(options.private_networks)
        if getattr(block, "after", None) is not None:
            # The site's gap, kept by this host's own clock from its previous answer (politeness.py).
            args["after"] = block.after
        if options.tor:
            args["proxy"] = link.host.socks
            # Tor isolates circuits by SOCKS username: the client appends the number of the
            # worker slot that runs the task, so each worker of each host has its own circuit.
            args["isolation"] = f"beowulf-{self.run_id}-{link.name}"
        return args

    def task_floor(self) -> float:
        """Seconds a fetch may take on any host before it is overdue (README, "When a scrape goes
        wrong"): the whole call is bounded by --timeout (client/scrape.py), plus a wait for the
        site's gap and the hop to the host and back."""
        return self.options.timeout + min(max(self.delay, 1.0), MAX_GAP_WAIT) + TASK_MARGIN

    def task_args(self, lo: int, hi: int) -> dict:
        return {"url": self.urls[lo]}

    # ------------------------------------------------------------ results

    def check(self, lo: int, hi: int, result: dict) -> tuple[int, Optional[bytes]]:
        """Check the fields' types, decode the body and check it against its sha256 (runs in the
        host's reader thread): what passes can be decided on and stored without surprises."""
        problem = _shape_problem(result, self.options.max_bytes)
        if problem:
            raise InvalidPage(f"URL {lo}: {problem}")
        found = 1 if _ok_status(result.get("status")) else 0
        if not self.options.bodies:  # --no-bodies: a body sent anyway is dropped unread
            result.pop("body", None)
            return found, None
        data = result.get("body")
        if data is None:
            return found, None
        limit = compressed_bound(self.options.max_bytes)
        if not isinstance(data, str) or len(data) > 4 * (limit // 3 + 1):
            raise InvalidPage(f"URL {lo}: body is not text or is longer than {limit} bytes compressed")
        try:
            payload = base64.b64decode(data, validate=True)
            body = inflate(payload, self.options.max_bytes)
        except (binascii.Error, ValueError) as err:
            raise InvalidPage(f"URL {lo}: body does not decode: {err}") from None
        if hashlib.sha256(body).hexdigest() != result.get("sha256") or len(body) != result.get("size"):
            raise InvalidPage(f"URL {lo}: body does not match its sha256/size")
        return found, payload

    def decide(self, block: Block, result: dict, host: str) -> Decision:
        """COMMIT a final answer, or RETRY later (``avoid``: on another host, when one is up)."""
        block.answered_at = result.get("answered_at")  # checked by the schedule before it is used
        robots = result.get("robots")
        if robots is not None and self.schedule is not None:
            rules = robots_rules(robots)
            self.schedule.set_robots(block, rules, robots.get("crawl_delay"))
        if block.attempts >= MAX_ATTEMPTS:
            return Decision(COMMIT)
        status, kind = result.get("status"), result.get("error_kind")
        if status in (429, 503):
            wait = result.get("retry_after")
            if wait is None:
                wait = _backoff(block.attempts)
            return Decision(RETRY, delay=min(float(wait), RETRY_AFTER_CAP))
        # A connection that dropped before any response (status None, "http") is transient too.
        if status in RETRY_STATUSES or kind in RETRY_ERRORS or (kind == "http" and status is None):
            return Decision(RETRY, delay=_backoff(block.attempts), avoid=True)
        return Decision(COMMIT)

    def failure(self, block: Block, kind: str, message: str, host: str) -> Decision:
        """--tor fails closed: a host whose proxy broke is out until its SOCKS port answers
        again (the URL goes back, not counted as its failure); other failures count."""
        if kind == KIND_PROXY:
            return Decision(LOSE_HOST, reason=f"proxy failed: {message}")
        return Decision(GIVE_BACK)

    def rows(self, block: Block, result: dict, host: str) -> list:
        """The URL's row of the pages table, stored with the block."""
        return [("pages", self.page_record(block, host, result))]

    def page_record(self, block: Block, host: str, result: dict) -> dict:
        """The row of the pages table for this URL."""
        return {
            "url": self.urls[block.lo], "final_url": result.get("final_url"), "status": result.get("status"),
            "content_type": result.get("content_type"), "content_encoding": result.get("content_encoding"),
            "size": result.get("size"),
            "truncated": int(bool(result.get("truncated"))), "sha256": result.get("sha256"),
            "title": result.get("title"), "elapsed": result.get("elapsed"), "host": host,
            "tor": int(bool(result.get("via_proxy"))), "error": result.get("error"),
            "error_kind": result.get("error_kind"), "attempts": block.attempts,
        }


# ---------------------------------------------------------------- reading the pages table


def iter_pages(store, run_id: int):
    """Yield (page record, compressed body or None) of a scrape run in URL order, streaming
    (nothing for a store no scrape run ever used)."""
    if not store.has_table("pages"):
        return
    columns = ", ".join(f"p.{key}" for key in PAGE_COLUMNS)
    rows = store.iter_query(
        f"SELECT p.lo, {columns}, d.data FROM pages p LEFT JOIN payloads d"
        " ON d.run_id = p.run_id AND d.lo = p.lo WHERE p.run_id = ? ORDER BY p.lo", (run_id,))
    for row in rows:
        yield dict(zip(("index", *PAGE_COLUMNS), row[:-1])), row[-1]


def recent_pages(store, run_id: int, limit: int) -> list:
    """The latest ``limit`` pages of a scrape run (by URL index, highest first), without bodies:
    lo, url, final_url, status, title, host, error, error_kind."""
    if not store.has_table("pages"):
        return []
    return store.query(
        "SELECT lo, url, final_url, status, title, host, error, error_kind FROM pages"
        " WHERE run_id = ? ORDER BY lo DESC LIMIT ?", (run_id, int(limit)))


# Result fields that are text (or null), and the error kinds a client reports.
TEXT_FIELDS = ("url", "final_url", "content_type", "content_encoding", "sha256", "title", "error")
ERROR_KINDS = ("timeout", "connect", "dns", "tls", "http", "redirects", "robots", "too_big", "other")
# Kinds of a robots.txt fetch that could not reach the site (client/scrape.py NETWORK_KINDS).
NETWORK_KINDS = ("connect", "dns", "timeout")


def robots_rules(robots: dict):
    """What a robots.txt report decides for its origin: the rules, or UNKNOWN when the site could
    not be reached at all (a network error): then the next URL of the site tries robots.txt again,
    and each URL records the network error it met itself (README.md, "Scrape")."""
    if robots.get("status") is None and robots.get("error_kind") in NETWORK_KINDS:
        return UNKNOWN
    return {"status": robots.get("status"), "text": robots.get("text")}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_seconds(value) -> bool:
    """A finite, non-negative number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _shape_problem(result, max_bytes: int) -> str:
    """What is wrong with the fields of a fetch result (a broken or hostile host), or ""."""
    if not isinstance(result, dict):
        return "result is not an object"
    for key in TEXT_FIELDS:
        if result.get(key) is not None and not isinstance(result[key], str):
            return f"{key} is not text"
    status, size = result.get("status"), result.get("size", 0)
    if status is not None and not (_is_int(status) and 100 <= status <= 999):
        return "status is not an HTTP status"
    if not _is_int(size) or size < 0:
        return "size is not a byte count"
    if size > max_bytes:
        return f"size {size} is over --max-bytes {max_bytes}"
    if result.get("error_kind") not in (None, *ERROR_KINDS):
        return "unknown error_kind"
    for key in ("retry_after", "elapsed"):
        if result.get(key) is not None and not _is_seconds(result[key]):
            return f"{key} is not a number of seconds"
    robots = result.get("robots")
    if robots is not None:
        if not isinstance(robots, dict):
            return "robots is not an object"
        if robots.get("status") is not None and not _is_int(robots["status"]):
            return "robots status is not a number"
        text = robots.get("text")
        if text is not None and not isinstance(text, str):
            return "robots text is not text"
        if text is not None and (len(text) > ROBOTS_MAX_BYTES
                                 or len(text.encode("utf-8", "surrogatepass")) > ROBOTS_MAX_BYTES):
            return f"robots text is over {ROBOTS_MAX_BYTES} bytes"
        if robots.get("error_kind") not in (None, *NETWORK_KINDS):
            return "unknown robots error_kind"
        if robots.get("network_error") is not None and not isinstance(robots["network_error"], str):
            return "robots network_error is not text"
        if robots.get("crawl_delay") is not None and not _is_seconds(robots["crawl_delay"]):
            return "robots crawl_delay is not a number of seconds"
    return ""


def _ok_status(status) -> bool:
    return isinstance(status, int) and 200 <= status < 400


def _backoff(attempts: int) -> float:
    return min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** max(0, attempts - 1))
