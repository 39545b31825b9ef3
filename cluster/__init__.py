"""beowulf's engine: inventory, SSH, provisioning, scheduling and the store.

Nothing in here knows about the command line; ``tasks/`` is the only caller.
"""

__version__ = "0.1.0"
