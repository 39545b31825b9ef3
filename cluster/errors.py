"""One base exception; every user-facing failure is a one-line subclass.

The task layer turns a ``BeowulfError`` into ``invoke.Exit(str(err), code)``,
so the message must read well on its own, on one line.
"""


class BeowulfError(Exception):
    """Base of every error beowulf reports to the user, with its ``exit_code``
    (docs/ARCHITECTURE.md, "Errors and exit status")."""

    exit_code = 1


class UsageError(BeowulfError):
    """A bad flag or argument: nothing was done."""

    exit_code = 2


class InventoryError(UsageError):
    """hosts.ini is unreadable or wrong; the message names the file and line."""


class HostKeyError(BeowulfError):
    """A host's key is unknown (and --accept-new was not given) or has changed."""


class ConnectError(BeowulfError):
    """A host could not be reached or did not let us in."""


class RemoteError(BeowulfError):
    """A command on a host failed in a way that is not the user's mistake."""


class SetupError(BeowulfError):
    """Provisioning a host failed (too old a Python, no disk, ...)."""


class StoreError(BeowulfError):
    """The results store cannot be used (corrupt, locked, newer schema)."""


class JobError(BeowulfError):
    """The job could not finish (all hosts lost, disk full); it can be resumed."""
