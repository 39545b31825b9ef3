"""URL file parsing and normalisation; the per-site politeness of the URL schedule (pure)."""

from __future__ import annotations

import re
import time

import pytest

from cluster.errors import UsageError
from cluster.jobs.scrape import FetchOptions, ScrapeJob
from cluster.politeness import HOLDER_LEAD, DomainSchedule
from cluster.urls import normalise, origin, read_url_file


@pytest.mark.parametrize("raw, expected", [
    ("HTTP://Example.COM", "http://example.com/"),
    ("http://example.com:80/a?b=1#frag", "http://example.com/a?b=1"),
    ("https://example.com:443/", "https://example.com/"),
    ("https://example.com:8443/x", "https://example.com:8443/x"),
    ("http://[::1]:8080/p", "http://[::1]:8080/p"),
    ("http://a.test/Path/Keeps/Case?Q=V", "http://a.test/Path/Keeps/Case?Q=V"),
])
def test_normalise(raw, expected):
    assert normalise(raw) == expected


@pytest.mark.parametrize("raw, reason", [
    ("ftp://example.com/", "not an http(s) URL"), ("example.com", "no scheme"), ("http://", "no host"),
    ("http://exa mple.com/", "spaces"), ("http://example.com:99999/", "bad port"),
    ("http://user:pw@example.com/", "credentials"),
])
def test_normalise_rejects(raw, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        normalise(raw)


def test_url_file_lines_comments_duplicates(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("# my list\n\nhttp://a.test/1\nHTTP://A.TEST:80/1#x\n  http://b.test/2  \n")
    urls, bad, duplicates = read_url_file(str(path))
    assert urls == ["http://a.test/1", "http://b.test/2"] and not bad and duplicates == 1


def test_url_file_bad_lines_named_by_number(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("http://a.test/1\nnot a url\nftp://x/\n")
    with pytest.raises(UsageError) as caught:
        read_url_file(str(path))
    message = str(caught.value)
    assert f"{path}:2:" in message and "and 1 more bad lines" in message and "--skip-bad" in message
    urls, bad, _ = read_url_file(str(path), skip_bad=True)
    assert urls == ["http://a.test/1"] and [b.number for b in bad] == [2, 3]


def test_url_file_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        read_url_file(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(UsageError, match="no URLs"):
        read_url_file(str(empty))


def schedule(urls, delay=0.0, per_domain=1, robots=False):
    return DomainSchedule(sorted(urls), [], delay, per_domain, robots)


def test_one_request_at_a_time_per_site_and_sites_in_parallel():
    s = schedule([f"http://a.test/{i}" for i in range(3)] + [f"http://b.test/{i}" for i in range(3)])
    first = s.next_block("h1")
    second = s.next_block("h1")
    assert {origin(s.urls[first[1].lo]), origin(s.urls[second[1].lo])} == {"http://a.test",
                                                                                   "http://b.test"}
    assert s.next_block("h2") is None  # both sites busy
    s.complete(first[0])
    third = s.next_block("h2")
    assert third is not None and origin(s.urls[third[1].lo]) == origin(s.urls[first[1].lo])


def test_delay_between_starts():
    s = schedule([f"http://a.test/{i}" for i in range(2)], delay=0.3)
    task, _ = s.next_block("h1")
    s.complete(task)
    assert s.next_block("h1") is None
    assert 0.2 < s.next_ready_in() <= 0.36
    time.sleep(s.next_ready_in() + 0.01)
    assert s.next_block("h1") is not None


def test_robots_first_then_the_rest():
    s = schedule([f"http://a.test/{i}" for i in range(3)], robots=True)
    task, block = s.next_block("h1")
    assert block.fetch_robots
    assert s.next_block("h2") is None  # the site waits for its rules
    s.set_robots(block, {"status": 200, "text": "User-agent: *\nDisallow:\n"}, crawl_delay=None)
    s.complete(task)
    task2, block2 = s.next_block("h2")
    assert not block2.fetch_robots and s.robots_of(block2)["status"] == 200


def test_lost_robots_fetch_is_redone():
    s = schedule(["http://a.test/1", "http://a.test/2"], robots=True)
    task, block = s.next_block("h1")
    s.give_back(task)
    again = s.next_block("h2")
    assert again[1] is block and block.fetch_robots


def test_retry_after_holds_the_site_back():
    s = schedule(["http://a.test/1", "http://b.test/1"])
    task, block = s.next_block("h1")
    s.give_back(task, retry_at=time.monotonic() + 30)
    other = s.next_block("h1")
    assert other is not None and other[1] is not block
    s.complete(other[0])
    assert s.next_block("h1") is None and s.uncut() == 1 and not s.finished()


def test_scrape_job_params_identify_the_url_set():
    a = ScrapeJob(["http://b.test/", "http://a.test/"], FetchOptions())
    b = ScrapeJob(["http://a.test/", "http://b.test/"], FetchOptions())
    c = ScrapeJob(["http://a.test/", "http://b.test/"], FetchOptions(tor=True))
    assert a.params() == b.params() != c.params()
    assert ScrapeJob(["http://a.test/"], FetchOptions(), delay=5).params() == \
        ScrapeJob(["http://a.test/"], FetchOptions(), delay=0).params()


def test_hold_back_applies_to_a_site_already_waiting_in_line():
    s = schedule(["http://a.test/1", "http://a.test/2", "http://a.test/3"], delay=0.0, per_domain=2)
    first, _ = s.next_block("h1")
    s.give_back(first, retry_at=time.monotonic() + 30)  # a 429 while the site is queued to go again
    assert s.next_block("h2") is None


def test_a_busy_host_queues_only_urls_of_sites_without_a_gap():
    s = schedule(["http://a.test/1", "http://a.test/2", "http://b.test/1", "http://b.test/2"], robots=True)
    for _ in range(2):  # both sites learn their rules; b asks for a Crawl-delay
        task, block = s.next_block("h1")
        slow = origin(s.urls[block.lo]) == "http://b.test"
        s.set_robots(block, {"status": 200, "text": ""}, crawl_delay=0.2 if slow else None)
        s.complete(task)
    time.sleep(0.25)
    queued = s.next_block("h1", queued=True)
    assert queued is not None and origin(s.urls[queued[1].lo]) == "http://a.test"
    assert s.next_block("h1", queued=True) is None  # b must start when handed out
    idle = s.next_block("h1")
    assert idle is not None and origin(s.urls[idle[1].lo]) == "http://b.test"


def test_a_busy_host_queues_nothing_when_every_site_has_a_delay():
    s = schedule([f"http://{name}.test/1" for name in "abc"], delay=0.5)
    assert s.next_block("h1", queued=True) is None
    assert s.next_block("h1") is not None


def test_scrape_hosts_hold_a_short_queue_beyond_their_workers():
    job = ScrapeJob(["http://a.test/"], FetchOptions(), concurrency=4)
    assert job.capacity(8) == 12 and job.capacity(1) == 3


# ---------------------------------------------------------------- the gap at the site (issue 9, section 6)


def answered(s, task, at):
    """The task's result came back saying its answer arrived at ``at`` on its host's clock."""
    s.tasks[task][0].answered_at = at
    s.complete(task)


def test_the_holder_gets_the_next_url_early_and_waits_by_its_own_clock():
    s = schedule([f"http://a.test/{i}" for i in range(3)], delay=0.6)
    task, block = s.next_block("h1")
    assert block.after is None  # nothing fetched from the site yet
    answered(s, task, 1000.0)
    assert s.next_block("h1") is None and s.next_block("h2") is None
    # h1 may have it HOLDER_LEAD before the gap is over (it waits the rest itself), others not before the gap
    assert 0.6 - HOLDER_LEAD - 0.05 < s.next_ready_in() <= 0.6 - HOLDER_LEAD
    time.sleep(s.next_ready_in() + 0.01)
    assert s.next_block("h2") is None
    task2, block2 = s.next_block("h1")
    assert block2.after == 1000.6  # the answer's moment on h1's clock + the gap


def test_a_site_moves_to_another_host_a_gap_after_the_result():
    s = schedule([f"http://a.test/{i}" for i in range(3)], delay=0.3)
    task, _ = s.next_block("h1")
    time.sleep(0.35)  # a slow fetch: longer than the gap, so only the answer's moment counts
    ended = time.monotonic()
    answered(s, task, 5.0)
    assert s.next_block("h2") is None  # not a gap after the dispatch: a gap after the answer
    while s.next_block("h2") is None:
        time.sleep(0.01)
    assert time.monotonic() - ended >= 0.3
    assert s.tasks[max(s.tasks)][0].after is None  # a new host: no clock of its own to wait by


def test_a_site_in_flight_stays_on_one_host():
    s = schedule([f"http://a.test/{i}" for i in range(4)], delay=0.1, per_domain=2)
    s.next_block("h1")
    time.sleep(0.2)
    assert s.next_block("h2") is None  # in flight on h1: its second request goes there too
    assert s.next_block("h1") is not None


def test_no_answer_means_a_gap_from_now_on_any_host():
    s = schedule([f"http://a.test/{i}" for i in range(2)], delay=0.3)
    task, _ = s.next_block("h1")
    s.give_back(task)  # lost host, overdue task: nobody knows when its request reached the site
    assert s.next_block("h1") is None and s.next_block("h2") is None
    assert 0.25 < s.next_ready_in() <= 0.3
    time.sleep(0.31)
    again = s.next_block("h2")
    assert again is not None and again[1].after is None


def test_an_answer_time_that_is_not_a_clock_is_not_used():
    s = schedule([f"http://a.test/{i}" for i in range(2)], delay=0.3)
    task, _ = s.next_block("h1")
    answered(s, task, float("nan"))
    time.sleep(0.31)
    assert s.next_block("h1")[1].after is None


def test_retry_elsewhere_is_a_preference_when_every_host_tried():
    s = schedule(["http://a.test/1"])
    s.hosts_up = {"h1", "h2"}
    task, block = s.next_block("h1")
    s.give_back(task, avoid=True)  # a 500 on h1: h2 should try
    assert s.next_block("h1") is None
    task, _ = s.next_block("h2")
    s.give_back(task, avoid=True)  # a 500 on h2 as well: either may try again (it used to wait for ever)
    assert s.next_block("h1") is not None
    s.give_back(s.tasks_of("h1")[0], invalid=True)  # an invalid result is a ban, not a preference
    assert s.next_block("h1") is None and s.next_block("h2") is not None


def test_scrape_task_args_carry_the_holders_wait():
    job = ScrapeJob(["http://a.test/1", "http://a.test/2"], FetchOptions(), delay=0.3)
    s = job.make_schedule([])
    task, block = s.next_block("h1")
    link = type("Link", (), {"name": "h1", "slots": 1, "host": None})()
    assert "after" not in job.task_args_for(block, link, task)
    job.decide(block, {"status": 200, "answered_at": 50.0}, "h1")
    s.complete(task)
    time.sleep(0.1)
    task2, block2 = s.next_block("h1")
    assert job.task_args_for(block2, link, task2)["after"] == 50.3
    assert job.task_floor() == 30.0 + 1.0 + 5.0  # --timeout, the gap wait, a margin
