"""`fab version`."""

from __future__ import annotations

import platform

import fabric
import invoke
import paramiko

from cluster import __version__
from cluster.provision import local_bundle_hash

from .common import beowulf_task


@beowulf_task
def version(c):
    """Print beowulf's version, the client bundle hash and the library versions."""
    print(f"beowulf {__version__} (client bundle {local_bundle_hash()})")
    print(f"python {platform.python_version()}, fabric {fabric.__version__}, invoke {invoke.__version__}, "
          f"paramiko {paramiko.__version__}")
