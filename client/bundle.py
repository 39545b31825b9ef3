"""The client bundle's identity: one hash over client/*.py, the same on both sides.

The coordinator hashes its checkout's client/ folder; the agent hashes the folder
it runs from. Equal hashes mean the host runs exactly the code we expect.
Standard library only, Python 3.6 syntax: this file is shipped to hosts.
"""
import hashlib
import os

BUNDLE_SUFFIXES = (".py",)


def bundle_files(folder):
    """Sorted names of the files that make up the bundle in ``folder``."""
    names = []
    for name in os.listdir(folder):
        if name.endswith(BUNDLE_SUFFIXES) and os.path.isfile(os.path.join(folder, name)):
            names.append(name)
    return sorted(names)


def bundle_hash(folder):
    """Hex sha256 over each bundle file's name and bytes, in name order (16 hex digits)."""
    digest = hashlib.sha256()
    for name in bundle_files(folder):
        with open(os.path.join(folder, name), "rb") as handle:
            data = handle.read()
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(str(len(data)).encode("ascii") + b"\0")
        digest.update(data)
    return digest.hexdigest()[:16]
