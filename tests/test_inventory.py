"""hosts.ini parsing: every key, defaults, and each error naming file and line."""

from __future__ import annotations

import pytest

from cluster.errors import InventoryError, UsageError
from cluster.inventory import load_inventory, parse_address, select_hosts


def write(tmp_path, text, name="hosts.ini"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_key_and_defaults(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id_ed25519").write_text("key")
    path = write(tmp_path, """
; a comment
[DEFAULT]
nice = 5          ; shared by all

[this computer]
address = local

[desktop]
address = alice@192.168.1.10   # inline comment
port = 2222
slots = 8
python = /usr/bin/python3.7
workdir = ~/my beowulf
identity = keys/id_ed25519
socks = 127.0.0.1:9150
tor_control = 127.0.0.1:9051

[v6]
address = bob@[fe80::1%eth0]

[alias]
address = mypi
nice = 19
""")
    hosts = {h.name: h for h in load_inventory(path)}
    assert list(hosts) == ["this computer", "desktop", "v6", "alias"]
    local = hosts["this computer"]
    assert local.is_local and local.nice == 5 and local.port is None and local.slots is None
    desktop = hosts["desktop"]
    assert (desktop.user, desktop.hostname, desktop.port, desktop.slots) == ("alice", "192.168.1.10", 2222, 8)
    assert desktop.python == "/usr/bin/python3.7" and desktop.workdir == "~/my beowulf"
    assert desktop.identity == str(tmp_path.resolve() / "keys" / "id_ed25519")
    assert desktop.socks == "127.0.0.1:9150" and desktop.tor_control == "127.0.0.1:9051"
    assert (hosts["v6"].user, hosts["v6"].hostname) == ("bob", "fe80::1%eth0")
    assert (hosts["alias"].user, hosts["alias"].hostname, hosts["alias"].nice) == (None, "mypi", 19)
    assert hosts["alias"].socks == "127.0.0.1:9050" and hosts["alias"].tor_control == "/run/tor/control"


def test_percent_is_not_interpolation(tmp_path):
    path = write(tmp_path, "[a]\naddress = u@h\nworkdir = /tmp/100%done\n")
    assert load_inventory(path)[0].workdir == "/tmp/100%done"


@pytest.mark.parametrize("text, line, words", [
    ("[a]\naddress = u@h\ncolour = red\n", 3, "unknown key 'colour'"),
    ("[a]\naddress = u@h\nport = 70000\n", 3, "port must be 1..65535"),
    ("[a]\naddress = u@h\nport = ssh\n", 3, "port must be a positive integer"),
    ("[a]\naddress = u@h\nslots = 0\n", 3, "slots must be a positive integer"),
    ("[a]\naddress = u@h\nslots = -2\n", 3, "slots must be a positive integer"),
    ("[a]\naddress = u@h\nslots = two\n", 3, "slots must be a positive integer"),
    ("[a]\naddress = u@h\n\n[a]\naddress = v@h\n", 4, "duplicate host [a]"),
    ("[a]\nslots = 2\n", 1, "has no address"),
    ("[a]\naddress =\n", 2, "has no address"),
    ("[a]\naddress = a@b@c\n", 2, "bad address"),
    ("[a]\naddress = local\nport = 22\n", 3, "a local host has no port"),
    ("[a]\naddress = u@h\nnice = 40\n", 3, "nice must be an integer 0..19"),
    ("[a]\naddress = u@h\naddress = v@h\n", 3, "given twice"),
    ("address = u@h\n", 1, "expected a [host name] section"),
    ("[DEFAULT]\nbogus = 1\n[a]\naddress = local\n", 2, "unknown key 'bogus' in [DEFAULT]"),
    ("[a]\naddress = u@h\nthis line is junk\n", 3, "cannot parse"),
    ("[a]\naddress = u@h\nidentity = no/such/key\n", 3, "identity file"),
])
def test_errors_name_file_and_line(tmp_path, text, line, words):
    path = write(tmp_path, text)
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}:"), message
    assert words in message
    assert "\n" not in message


def test_empty_and_missing_and_unreadable(tmp_path):
    with pytest.raises(InventoryError, match="no hosts"):
        load_inventory(write(tmp_path, "; nothing\n"))
    with pytest.raises(InventoryError, match="no such inventory file"):
        load_inventory(tmp_path / "nope.ini")
    folder = tmp_path / "dir.ini"
    folder.mkdir()
    with pytest.raises(InventoryError, match="cannot read inventory"):
        load_inventory(folder)
    binary = tmp_path / "bin.ini"
    binary.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(InventoryError, match="cannot read inventory"):
        load_inventory(binary)


def test_select_hosts(tmp_path):
    path = write(tmp_path, "[a]\naddress = local\n[b]\naddress = u@b\n[c]\naddress = u@c\n")
    hosts = load_inventory(path)
    assert [h.name for h in select_hosts(hosts, None, path)] == ["a", "b", "c"]
    assert [h.name for h in select_hosts(hosts, "c, a", path)] == ["a", "c"]
    with pytest.raises(UsageError, match="--hosts: x not in"):
        select_hosts(hosts, "a,x", path)
    with pytest.raises(UsageError, match="--hosts: no host names"):
        select_hosts(hosts, " , ", path)


def test_parse_address():
    assert parse_address("u@h") == ("u", "h")
    assert parse_address("h.example") == (None, "h.example")
    assert parse_address("u@[::1]") == ("u", "::1")
    with pytest.raises(ValueError):
        parse_address("u@h:22")
