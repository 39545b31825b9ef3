"""Tunables in one place, a line each on what they mean."""

# Oldest Python a host may run the client with (client/ is written in 3.6 syntax).
MIN_HOST_PYTHON = (3, 6)
# Default niceness of worker processes: we are guests on machines people use.
DEFAULT_NICE = 10
# Default working folder on a remote host ("~" expands on the host).
DEFAULT_WORKDIR = "~/beowulf"
# Default Tor SOCKS endpoint and control socket on each host.
DEFAULT_SOCKS = "127.0.0.1:9050"
DEFAULT_TOR_CONTROL = "/run/tor/control"
# At most this many SSH handshakes at once (sshd's MaxStartups default is 10:30:100).
MAX_CONCURRENT_CONNECTS = 8
# Seconds to wait for a TCP connect + SSH handshake when neither -t nor ssh_config says.
DEFAULT_CONNECT_TIMEOUT = 15
# Seconds between SSH keepalive packets on an open connection.
KEEPALIVE_SECONDS = 15
# Per-host deadline for a whole `fab setup` (probe, upload, unpack, install).
SETUP_DEADLINE_SECONDS = 600
# Per-host deadline for `fab hosts` (probe only).
PROBE_DEADLINE_SECONDS = 60
# Seconds allowed for fetching one optional binary wheel (numpy) on the coordinator.
WHEEL_DOWNLOAD_TIMEOUT = 180
# Seconds allowed for resolving and fetching fab map --requirements for one host platform.
REQUIREMENTS_DOWNLOAD_TIMEOUT = 600
