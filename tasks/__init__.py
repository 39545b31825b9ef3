"""The command surface: one module per command family, thin on purpose.

Each task parses its flags, reads the config, calls ``cluster/`` and prints.
"""

from invoke import Collection

from . import dashboard, hosts, info, primes, scrape, stats
from . import map as map_tasks
from . import tor as tor_tasks
from .common import usage_errors_exit_2

usage_errors_exit_2()

ns = Collection()
ns.add_task(hosts.setup)
ns.add_task(hosts.hosts_, name="hosts")
ns.add_task(hosts.teardown)
ns.add_task(info.version)
ns.add_task(primes.primes)
ns.add_task(scrape.scrape)
ns.add_task(map_tasks.map_, name="map")
ns.add_task(stats.stats)
ns.add_task(stats.calibrate)
ns.add_task(dashboard.dashboard)
ns.configure({"beowulf": {"inventory": None, "known_hosts": None}})
ns.add_collection(tor_tasks.ns, name="tor")
