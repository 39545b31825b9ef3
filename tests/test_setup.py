"""fab setup / hosts / teardown against real sshd hosts (tests/harness)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow


def rows(stdout: str) -> dict:
    """Table rows of tabulate's plain output, keyed by the first column."""
    table = {}
    for line in stdout.splitlines()[2:-1]:  # header, rule, rows, summary line
        parts = line.split()
        if parts:
            table[parts[0]] = line
    return table


@pytest.fixture
def env(make_cluster, tmp_path):
    """A fresh 3-host cluster, its inventory and a fab config trusting only its keys."""
    cluster = make_cluster(3)
    inventory = cluster.write_inventory(tmp_path / "hosts.ini")
    config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
    return cluster, inventory, config


def test_setup_three_hosts_then_idempotent(env, run_fab):
    cluster, inventory, config = env
    first = run_fab(["setup", "--inventory", inventory], config=config)
    assert first.returncode == 0, first.stderr
    table = rows(first.stdout)
    for host in cluster:
        assert "uploaded" in table[host.name] and table[host.name].rstrip().endswith("ok")
        assert (host.workdir / "client" / "agent.py").exists()
        assert (host.workdir / "lib" / "socks.py").exists()
    assert "uploaded" in first.stdout.splitlines()[-1]
    second = run_fab(["setup", "--inventory", inventory], config=config)
    assert second.returncode == 0, second.stderr
    assert "nothing uploaded: every host was up to date" in second.stdout
    assert all("up to date" in line for line in rows(second.stdout).values())

    health = run_fab(["hosts", "--inventory", inventory], config=config)
    assert health.returncode == 0, health.stderr
    table = rows(health.stdout)
    assert all(" yes " in table[h.name] and " fresh " in table[h.name] for h in cluster)
    assert "3 of 3 hosts reachable" in health.stdout


def test_hosts_subset_and_stale_bundle(env, run_fab):
    cluster, inventory, config = env
    done = run_fab(["setup", "--inventory", inventory, "--hosts", "h2"], config=config)
    assert done.returncode == 0, done.stderr
    assert list(rows(done.stdout)) == ["h2"]
    assert not (cluster["h1"].workdir / "client").exists()
    health = run_fab(["hosts", "--inventory", inventory], config=config)
    table = rows(health.stdout)
    assert "missing: run fab setup" in table["h1"] and " fresh " in table["h2"]
    agent = cluster["h2"].workdir / "client" / "agent.py"
    agent.write_text(agent.read_text() + "\n# edited on the host\n")
    assert "stale: run fab setup" in rows(run_fab(["hosts", "--inventory", inventory], config=config).stdout)["h2"]
    repaired = run_fab(["setup", "--inventory", inventory, "--hosts", "h2"], config=config)
    assert "uploaded" in rows(repaired.stdout)["h2"] and "# edited" not in agent.read_text()
    assert " fresh " in rows(run_fab(["hosts", "--inventory", inventory], config=config).stdout)["h2"]


def test_unknown_key_refused_then_accept_new(env, run_fab, tmp_path):
    cluster, inventory, config = env
    known = cluster.known_hosts_path
    known.write_text("")  # nothing trusted
    refused = run_fab(["setup", "--inventory", inventory, "--hosts", "h1"], config=config)
    assert refused.returncode == 1
    assert "unknown host key for [127.0.0.2]" in refused.stdout
    assert "SHA256:" in refused.stdout and "--accept-new" in refused.stdout
    assert "Traceback" not in refused.stderr
    assert not (cluster["h1"].workdir / "client").exists()
    accepted = run_fab(["setup", "--inventory", inventory, "--hosts", "h1", "--accept-new"], config=config)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    lines = known.read_text().splitlines()
    assert lines == [f"[127.0.0.2]:{cluster['h1'].port} {cluster['h1'].public_key().split()[0]} "
                     f"{cluster['h1'].public_key().split()[1]}"]
    again = run_fab(["setup", "--inventory", inventory, "--hosts", "h1"], config=config)
    assert again.returncode == 0, again.stdout


def test_changed_key_always_refused(env, run_fab):
    cluster, inventory, config = env
    h1, h2 = cluster["h1"], cluster["h2"]
    # Claim h2's key for h1's address: h1 now presents a key that differs from the recorded one.
    cluster.known_hosts_path.write_text(h1.known_hosts_line().replace(h1.public_key().split()[1],
                                                                        h2.public_key().split()[1]) + "\n")
    for extra in ([], ["--accept-new"]):
        done = run_fab(["setup", "--inventory", inventory, "--hosts", "h1", *extra], config=config)
        assert done.returncode == 1
        assert "has CHANGED" in done.stdout and "ssh-keygen -R" in done.stdout


def test_hashed_known_hosts_entries(env, run_fab):
    cluster, inventory, config = env
    subprocess.run(["ssh-keygen", "-H", "-f", str(cluster.known_hosts_path)], check=True, capture_output=True)
    assert "|1|" in cluster.known_hosts_path.read_text()
    done = run_fab(["hosts", "--inventory", inventory], config=config)
    assert done.returncode == 0, done.stdout + done.stderr


def test_one_host_down_others_provisioned(env, run_fab):
    cluster, inventory, config = env
    cluster["h3"].stop()
    done = run_fab(["setup", "--inventory", inventory], config=config)
    assert done.returncode == 3, done.stdout + done.stderr
    table = rows(done.stdout)
    assert table["h1"].rstrip().endswith("ok") and table["h2"].rstrip().endswith("ok")
    assert "cannot connect" in table["h3"]
    assert "1 of 3 hosts failed: h3" in done.stderr
    health = run_fab(["hosts", "--inventory", inventory], config=config)
    assert health.returncode == 3 and "2 of 3 hosts reachable" in health.stdout


def test_all_hosts_down_is_exit_1(env, run_fab):
    cluster, inventory, config = env
    for host in cluster:
        host.stop()
    done = run_fab(["setup", "--inventory", inventory], config=config)
    assert done.returncode == 1


def test_workdir_with_spaces_and_quotes(env, run_fab, tmp_path):
    cluster, _, config = env
    weird = tmp_path / "it's a \"work\" dir; $(touch pwned) `x`"
    inventory = cluster.write_inventory(tmp_path / "weird.ini", hosts=["h1"], extra={"h1": {"workdir": weird}})
    done = run_fab(["setup", "--inventory", inventory], config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (weird / "client" / "agent.py").exists() and (weird / "bundle.sha256").exists()
    assert not (tmp_path / "pwned").exists() and not list(tmp_path.rglob("pwned"))
    again = run_fab(["setup", "--inventory", inventory], config=config)
    assert "up to date" in again.stdout
    removed = run_fab(["teardown", "--inventory", inventory, "--yes"], config=config)
    assert removed.returncode == 0, removed.stdout
    assert not weird.exists()


def test_tilde_workdir_expands_on_host(env, run_fab, tmp_path):
    cluster, _, config = env
    inventory = cluster.write_inventory(tmp_path / "tilde.ini", hosts=["h1"],
                                        extra={"h1": {"workdir": "~/.beowulf-test-tilde"}})
    from pathlib import Path

    target = Path.home() / ".beowulf-test-tilde"
    shutil.rmtree(target, ignore_errors=True)
    try:
        done = run_fab(["setup", "--inventory", inventory], config=config)
        assert done.returncode == 0, done.stdout + done.stderr
        assert (target / "client" / "agent.py").exists()
        assert not (Path("~") / ".beowulf-test-tilde").exists()
    finally:
        shutil.rmtree(target, ignore_errors=True)


def test_bad_python_refused(env, run_fab, tmp_path):
    cluster, _, config = env
    old = tmp_path / "python2"
    old.write_text("#!/bin/sh\necho 'Python 2.7.18'\nexit 0\n")
    old.chmod(0o755)
    fake36 = tmp_path / "python35"
    fake36.write_text("#!/bin/sh\necho '{\"python\": \"3.5.2\", \"python_ok\": false}'\n")
    fake36.chmod(0o755)
    inventory = cluster.write_inventory(tmp_path / "py.ini", extra={
        "h1": {"python": "/bin/false"}, "h2": {"python": old}, "h3": {"python": fake36}})
    done = run_fab(["setup", "--inventory", inventory], config=config)
    assert done.returncode == 1, done.stdout
    table = rows(done.stdout)
    assert "did not run the probe as Python 3.6+" in table["h1"]
    assert "did not run the probe as Python 3.6+" in table["h2"]
    assert "Python 3.5.2 is too old" in table["h3"]
    assert "Traceback" not in done.stdout + done.stderr


def test_local_host_setup_and_hosts(run_fab, tmp_path):
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[this computer]\naddress = local\n")
    done = run_fab(["setup", "--inventory", inventory])
    assert done.returncode == 0, done.stderr
    assert "checkout (local)" in done.stdout
    health = run_fab(["hosts", "--inventory", inventory])
    assert health.returncode == 0 and "checkout (local)" in health.stdout


def test_teardown_asks_first(env, run_fab):
    cluster, inventory, config = env
    run_fab(["setup", "--inventory", inventory, "--hosts", "h1", "--no-numpy"], config=config)
    refused = run_fab(["teardown", "--inventory", inventory, "--hosts", "h1"], config=config, input="")
    assert refused.returncode == 2 and "no terminal to ask for confirmation; pass --yes" in refused.stderr
    assert (cluster["h1"].workdir / "client").exists()
    done = run_fab(["teardown", "--inventory", inventory, "--hosts", "h1", "--yes"], config=config)
    assert done.returncode == 0 and "removed" in done.stdout
    assert not cluster["h1"].workdir.exists()


def test_numpy_wheel_shipped_to_host_without_numpy(env, run_fab, tmp_path):
    """A host whose Python lacks numpy gets a wheel fetched on the coordinator (once per machine)."""
    cluster, _, config = env
    system_python = "/usr/bin/python3"
    if subprocess.run([system_python, "-c", "import numpy"], capture_output=True).returncode == 0:
        pytest.skip("the system Python already has numpy")
    inventory = cluster.write_inventory(tmp_path / "np.ini", hosts=["h1", "h2"],
                                        extra={"h1": {"python": system_python}, "h2": {"python": system_python}})
    done = run_fab(["setup", "--inventory", inventory], config=config, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    table = rows(done.stdout)
    assert "numpy (new)" in table["h1"] and "numpy (new)" in table["h2"], done.stdout
    for name in ("h1", "h2"):
        lib = cluster[name].workdir / "lib"
        check = subprocess.run([system_python, "-c", "import numpy; print(numpy.__version__)"],
                               env={"PYTHONPATH": str(lib)}, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    again = run_fab(["setup", "--inventory", inventory], config=config)
    assert "nothing uploaded" in again.stdout


def test_fab_dash_H_refused(run_fab):
    done = run_fab(["-H", "somehost", "hosts"])
    assert done.returncode == 2
    assert "fab -H is not supported" in done.stderr and "--inventory" in done.stderr


def test_bad_inventory_is_usage_error(run_fab, tmp_path):
    bad = tmp_path / "bad.ini"
    bad.write_text("[a]\naddress = u@h\nport = 0\n")
    for task in ("setup", "hosts", "teardown"):
        done = run_fab([task, "--inventory", bad, "--yes"] if task == "teardown" else [task, "--inventory", bad])
        assert done.returncode == 2, (task, done.stderr)
        assert f"{bad}:3:" in done.stderr and "Traceback" not in done.stderr


def test_ssh_config_alias_and_proxyjump(env, run_fab, tmp_path):
    """An ~/.ssh/config alias (HostName, User, Port, IdentityFile) and a ProxyJump hop, both key-checked."""
    cluster, _, config = env
    h1, h2 = cluster["h1"], cluster["h2"]
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(
        f"Host jumpbox\n  HostName {h2.ip}\n  Port {h2.port}\n  User root\n  IdentityFile {cluster.client_key}\n"
        f"Host inner\n  HostName {h1.ip}\n  Port {h1.port}\n  User root\n  IdentityFile {cluster.client_key}\n"
        f"  ProxyJump jumpbox\n"
        f"Host direct\n  HostName {h1.ip}\n  Port {h1.port}\n  User root\n  IdentityFile {cluster.client_key}\n"
    )
    inventory = tmp_path / "alias.ini"
    inventory.write_text(f"[direct]\naddress = direct\nworkdir = {tmp_path / 'w1'}\n"
                         f"[inner]\naddress = inner\nworkdir = {tmp_path / 'w2'}\n")
    done = run_fab(["--ssh-config", ssh_config, "hosts", "--inventory", inventory], config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 of 2 hosts reachable" in done.stdout
    # The jump host's key is checked too: without it, the hop is refused.
    cluster.known_hosts_path.write_text(h1.known_hosts_line() + "\n")
    refused = run_fab(["--ssh-config", ssh_config, "hosts", "--inventory", inventory, "--hosts", "inner"],
                      config=config)
    assert refused.returncode == 1 and "unknown host key" in refused.stdout, refused.stdout


def test_setup_tor_once_per_machine_not_per_machine_id(tmp_path, run_fab):
    """A host's machine_id is its own say: it must not make setup skip another host's tor step.

    All three sshd hosts here report this computer's /etc/machine-id, as a host lying about
    its machine id would. h1 and h2 are two machines (two host keys): each one's tor is
    checked on its own SOCKS port. h3 presents h1's host key: one machine, checked once.
    """
    from harness import SshCluster, keygen, require_sshd
    from harness.tor import SocksGreeter, share_host_key

    require_sshd()
    cluster = SshCluster(tmp_path / "cluster", 3)
    cluster["h1"].dir.mkdir(parents=True)
    keygen(cluster["h1"].host_key, comment="h1-host")
    share_host_key(cluster, cluster["h1"].host_key, "h3")
    with cluster, SocksGreeter(cluster["h1"].ip) as one, SocksGreeter(cluster["h2"].ip) as two, \
            SocksGreeter(cluster["h3"].ip) as three:
        inventory = cluster.write_inventory(tmp_path / "hosts.ini", extra={
            "h1": {"socks": one.address}, "h2": {"socks": two.address}, "h3": {"socks": three.address}})
        config = cluster.write_fabric_config(tmp_path / "fabric.yaml")
        done = run_fab(["setup", "--inventory", inventory, "--tor", "--no-numpy"], config=config)
        assert done.returncode == 0, done.stdout + done.stderr
        greeted = {"h1": one.greetings, "h2": two.greetings, "h3": three.greetings}
        assert greeted["h2"] == 1, greeted  # its own machine: its own tor checked
        assert greeted["h1"] + greeted["h3"] == 1, greeted  # one machine, two entries: once
        assert all("running" in line for line in rows(done.stdout).values()), done.stdout
