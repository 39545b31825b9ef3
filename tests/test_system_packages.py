"""`fab setup --system-packages` (issue 11) on a real sshd host whose user's sudo asks for a password.

A throwaway user with a random password may run, as root and only after that password,
``sh -c "DEBIAN_FRONTEND=noninteractive apt-get install ..."``; the sudoers rule's
secure_path puts a fake ``apt-get`` first, which only records its arguments: no test ever
installs a package on this machine (its system Python is shared). The password goes only
through Fabric's prompt (``--prompt-for-sudo-password``): it must appear in no file, log,
output, nor any process's command line or environment (tests/test_security.py's watchers).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from test_security import ProcWatch, _skip_or_fail, fab_on_a_terminal, files_containing

from harness import REPO_ROOT, SshCluster, require_sshd

pytestmark = pytest.mark.slow


def expected_library() -> str:
    """The libprimesieve package apt offers on this machine (libprimesieve11 on Debian 12)."""
    names = subprocess.run(["apt-cache", "pkgnames", "libprimesieve"], capture_output=True, text=True,
                           timeout=120).stdout.split()
    libs = [n for n in names if n[len("libprimesieve"):].rstrip("t64").isdigit()]
    if not libs:
        _skip_or_fail("apt-cache knows no libprimesieve package here")
    return max(libs, key=lambda n: int(n[len("libprimesieve"):].rstrip("t64")))


@pytest.fixture
def apt_user():
    """A user with a password whose sudo (password asked) may run only `sh -c apt-get install ...`,
    with a fake apt-get that appends its arguments to a log."""
    if os.geteuid() != 0:
        _skip_or_fail("needs root to create a test user")
    missing = [t for t in ("sudo", "useradd", "userdel", "chpasswd", "visudo", "apt-cache") if shutil.which(t) is None]
    if missing:
        _skip_or_fail(f"needs {', '.join(missing)} (run tests/system-deps.sh as root)")
    name = "bwapt" + secrets.token_hex(4)
    password = "Bw-" + secrets.token_hex(16)
    folder = Path(tempfile.mkdtemp(prefix="beowulf-apt-"))
    os.chmod(folder, 0o755)
    (folder / "bin").mkdir(mode=0o755)
    log = folder / "apt-get.log"
    fake = folder / "bin" / "apt-get"
    fake.write_text(f'#!/bin/sh\nsleep 1\necho "$(id -u) $*" >> {log}\n')
    os.chmod(fake, 0o755)
    sudoers = Path(f"/etc/sudoers.d/beowulf-test-{name}")
    try:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True, capture_output=True)
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True, capture_output=True)
        # A python that is not the system's: a venv (sys.prefix is the venv, not /usr).
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(folder / "venv")], check=True,
                       capture_output=True, timeout=120)
        rule = folder / "sudoers"
        command = "-c DEBIAN_FRONTEND\\=noninteractive apt-get install -y -q *"
        rule.write_text(f'Defaults:{name} !lecture, secure_path="{folder}/bin:/usr/bin:/bin"\n'
                        f"{name} ALL=(root) /bin/sh {command}, /usr/bin/sh {command}\n")
        subprocess.run(["visudo", "-c", "-q", "-f", str(rule)], check=True, capture_output=True)
        os.chmod(rule, 0o440)
        shutil.copy2(rule, sudoers)
        rule.unlink()
        yield name, password, log, folder, Path(os.path.expanduser(f"~{name}"))
    finally:
        sudoers.unlink(missing_ok=True)
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        for leftover in (Path("/run/sudo/ts") / name, Path("/var/lib/sudo/lectured") / name):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_system_packages_through_sudo_with_a_password(apt_user, tmp_path):
    require_sshd()
    name, password, log, folder, home = apt_user
    library = expected_library()
    check = subprocess.run(["runuser", "-u", name, "--", "sudo", "-n", "sh", "-c",
                            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q x"], capture_output=True, text=True)
    assert check.returncode != 0 and "password is required" in check.stderr, check.stderr  # sudo really asks
    began = time.time() - 1
    base = Path(tempfile.mkdtemp(prefix="beowulf-apt-"))
    os.chmod(base, 0o711)
    try:
        # Two hosts on this one machine: h1's python is the system python3, h2's a venv's (not the system's).
        with SshCluster(base, 2, user=name) as cluster:
            inventory = cluster.write_inventory(tmp_path / "hosts.ini", extra={
                "h1": {"python": "/usr/bin/python3", "workdir": "~/bw1"},
                "h2": {"python": f"{folder}/venv/bin/python3", "workdir": "~/bw2"}})
            config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
            with ProcWatch(password.encode(), b"apt-get install") as watch:
                code, out, err, terminal = fab_on_a_terminal(
                    ["--prompt-for-sudo-password", "setup", "--system-packages", "--no-numpy", "--inventory",
                     inventory, "--verbose"], config, {"sudo.password": password})
            logs = [cluster[h].read_log() for h in ("h1", "h2")]
    finally:
        leaked = files_containing(password.encode(), [base, tmp_path, home, folder, "/var/log", "/var/lib/sudo",
                                                      "/run/sudo"], began, recent_only=False)
        leaked += files_containing(password.encode(), ["/tmp", "/var/tmp", "/dev/shm", "/run", REPO_ROOT]
                                   + [Path.home() / n for n in (".cache", ".config", ".ssh")], began, recent_only=True)
        shutil.rmtree(base, ignore_errors=True)
    assert code == 0, out + err
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("h1 ", "h2 "))}
    assert f"apt: installed python3-numpy {library}" in rows["h1"], out
    assert "apt: python is not the system python3, nothing installed" in rows["h2"], out
    # Once per machine, as root, with the distribution's package names; nothing else asked of apt.
    assert log.read_text().splitlines() == [f"0 install -y -q python3-numpy {library}"]
    assert watch.sightings, f"the /proc watcher never saw the apt-get command ({watch.passes} passes)"
    assert watch.leaks == []
    for text in [out, err, terminal.decode("utf-8", "replace"), *logs]:
        assert password not in text
    assert leaked == []
