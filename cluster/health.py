"""`fab hosts`: a read-only look at each host. Nothing is written anywhere."""

from __future__ import annotations

import statistics

from .provision import host_workdir, local_bundle_hash, probe
from .transport import Transport


def check_host(transport: Transport, expected_bundle: str | None = None) -> dict:
    """Latency, bundle freshness and the probe's facts for one connected host."""
    samples = [transport.round_trip() * 1000 for _ in range(3)]
    host = transport.host
    if host.is_local:
        facts = probe(transport)
        bundle = "checkout (local)"
    else:
        facts = probe(transport, host_workdir(host))
        expected = expected_bundle or local_bundle_hash()
        if not facts.get("bundle"):
            bundle = "missing: run fab setup"
        elif facts["bundle"] == expected:
            bundle = "fresh"
        else:
            bundle = "stale: run fab setup"
    return {"latency_ms": statistics.median(samples), "bundle": bundle, "facts": facts}
