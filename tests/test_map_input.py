"""fab map's pure building blocks: replacement strings, quoting, inputs, keys, run identity, exports.

The replacement strings are compared with GNU parallel itself (installed on the test
machine) where it matters; every quoting case is also run through a real /bin/sh.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from client import mapper
from cluster import mapexport, mapinput
from cluster.errors import UsageError

PARALLEL = shutil.which("parallel")
HOSTILE = ["; touch pwned", "a b", "it's", 'say "hi"', "$HOME", "`touch pwned`", "$(touch pwned)",
           "line1\nline2", "-rf", "--help", "", "tab\there", "back\\slash", "*", "~", "a\udcffb"]


def need_parallel():
    if PARALLEL is None:
        if os.environ.get("CI") == "true":
            pytest.fail("GNU parallel is not installed")
        pytest.skip("GNU parallel is not installed")


# ------------------------------------------------------------------------ templates

@pytest.mark.parametrize("value", ["a/b.c/d", "foo.tar.gz", ".bashrc", "foo.", "dir/", "/x", "x",
                                   "a/b/c.d", "a//b.c", "/", "a b/c d.e"])
def test_modifiers_match_gnu_parallel(value):
    need_parallel()
    done = subprocess.run([PARALLEL, "--will-cite", "-q", "printf", r"%s\0%s\0%s\0%s\0%s\0",
                           "{}", "{.}", "{/}", "{//}", "{/.}", ":::", value],
                          capture_output=True, check=True, timeout=60)
    expected = done.stdout.decode().split("\0")[:5]
    assert [mapper.modify(value, modifier) for modifier in ("", ".", "/", "//", "/.")] == expected


def test_columns_seq_slot_and_appending():
    parts = mapper.parse_template("echo {3} {-1} {2.} {1/} {5} {#} {%}")
    assert mapper.render(parts, "x", 7, 2, columns=["a/b", "c.d", "e"]) == "echo e e c b  7 2"
    assert mapper.render(mapper.parse_template("echo"), "a b", 1) == "echo 'a b'"
    assert mapper.render(mapper.parse_template("echo"), "x", 1, columns=["a", "b c"]) == "echo a 'b c'"
    assert mapper.render(mapper.parse_template("echo {#}"), "ignored", 3) == "echo 3"


def test_appending_and_columns_match_gnu_parallel():
    need_parallel()
    done = subprocess.run([PARALLEL, "--will-cite", "--dry-run", "--colsep", " ", "echo", "{2}", "{-1}", "{5}"],
                          input=b"a b c\n", capture_output=True, check=True, timeout=60)
    ours = mapper.render(mapper.parse_template("echo {2} {-1} {5}"), "a b c", 1, columns=["a", "b", "c"])
    assert ours.split() == done.stdout.decode().split()


@pytest.mark.parametrize("value", HOSTILE)
def test_every_value_is_one_argument_never_code(value, tmp_path):
    parts = mapper.parse_template("printf '[%s]' {} x{}y {.} {/} {//} {/.} {1}")
    command = mapper.render(parts, value, 1)
    done = subprocess.run([b"/bin/sh", b"-c", mapper.fs(command)], cwd=tmp_path, capture_output=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    words = [value, "x" + value + "y"] + [mapper.modify(value, m) for m in (".", "/", "//", "/.")] + [value]
    assert done.stdout == "".join(f"[{word}]" for word in words).encode("utf-8", "surrogateescape")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("template", ['echo "{}"', "echo '{}'", "echo `{}`", "echo ${x:-{}}",
                                      "echo $'{}'", "echo hi # {}", "cat <<EOF\n{}\nEOF",
                                      'echo "$(echo "{}")"'])
def test_replacement_where_quoting_cannot_protect_is_refused(template, tmp_path):
    with pytest.raises(mapper.TemplateError, match="inside"):
        mapper.parse_template(template)
    with pytest.raises(UsageError, match="^--command: "):
        mapinput.check_template(template)


def test_quoted_contexts_would_have_run_code(tmp_path):
    """Why the templates above are refused: naive rendering inside quotes runs the value."""
    for template in ('echo "{}"', "echo hi # {}"):
        naive = template.replace("{}", mapper.shlex.quote("x\ntouch pwned\n$(touch pwned) #"))
        subprocess.run(["/bin/sh", "-c", naive], cwd=tmp_path, capture_output=True, timeout=30)
        assert (tmp_path / "pwned").exists()
        (tmp_path / "pwned").unlink()


@pytest.mark.parametrize("template", ["echo {..}", "echo {0}", "echo {=1=}", "echo {+/}", "echo {1#}",
                                      "echo {-0}", "echo {foo}", "echo {1x}", "echo { }", "echo x{item}y",
                                      "cp {} $(echo {name})"])
def test_unknown_replacement_strings_are_usage_errors(template):
    with pytest.raises(UsageError, match="unknown replacement string"):
        mapinput.check_template(template)


@pytest.mark.parametrize("template", ['echo "$(echo {})"', "echo ${#} {}", "awk '{print $1}' {}",
                                      "echo {1..3} {}", "f() { echo \"$1\"; }; f {}", "echo a <<< {}",
                                      "echo ${HOME} {}", "awk '{print}' {}", "echo '{foo}' {}", "echo \\{foo} {}",
                                      "echo {a,b} {a..c} {}", "{ echo {}; }", 'jq "{a}" {}', "echo {} # {foo}"])
def test_shell_braces_are_not_replacement_strings(template):
    parts = mapper.parse_template(template)
    assert mapper.render(parts, "v", 1).replace("v", "{}") == template


def test_columns_beyond_a_line_are_errors_naming_the_line(tmp_path):
    path = tmp_path / "grid.tsv"
    path.write_bytes(b"1\t2\t3\n4\t5\n")
    need = mapinput.columns_needed([("--command", mapper.parse_template("echo {1} {3.}")),
                                    ("--return", mapper.parse_template("{-2}.out"))])
    assert need == (3, "--command's {3.}")
    with pytest.raises(UsageError, match=r"^--args .*grid.tsv line 2: 2 columns, but --command's \{3.\} needs 3$"):
        mapinput.open_input(args=str(path), colsep="\t", need=need)
    assert len(mapinput.open_input(args=str(path), colsep="\t", need=(2, "{-2}"))) == 2
    for form in ({"range_text": "1:3"}, {"args": str(path)}):
        with pytest.raises(UsageError, match="without --colsep"):
            mapinput.open_input(**form, need=(2, "--command's {2}"))
    assert mapinput.columns_needed([("--command", mapper.parse_template("echo {1} {} {#}"))]) == (1, "")


def test_function_specs():
    assert mapinput.check_function("mod.py:f") == ("mod", "f")
    assert mapinput.check_function("pkg.sub:run") == ("pkg.sub", "run")
    for bad in ("../x:f", "/abs/mod:f", "mod", "mod:f:g", "a-b:f", "mod:class", "os.path/..:f", ":f", "m:"):
        with pytest.raises(UsageError, match="^--function: "):
            mapinput.check_function(bad)


# ------------------------------------------------------------------------ inputs

def test_args_items_columns_and_keys(tmp_path):
    path = tmp_path / "grid.tsv"
    path.write_bytes(b"1\t0.5\n2\t0.7\n1\t0.5\n\n")
    items = list(mapinput.open_input(args=str(path), colsep="\t"))
    assert [(i.seq, i.value, i.columns) for i in items] == [
        (1, "1\t0.5", ("1", "0.5")), (2, "2\t0.7", ("2", "0.7")), (3, "1\t0.5", ("1", "0.5")), (4, "", ("",))]
    assert len({item.key for item in items}) == 4  # duplicate lines are two items
    path.write_bytes(b"1\t0.5\n2\t0.7\n1\t0.5\n\nnew\n1\t0.5\n")
    again = list(mapinput.open_input(args=str(path), colsep="\t"))
    assert [item.key for item in again[:4]] == [item.key for item in items]  # appending keeps keys
    assert len({item.key for item in again}) == 6


def test_args_non_utf8_kept_as_bytes(tmp_path):
    path = tmp_path / "names"
    path.write_bytes(b"caf\xe9\nok\n")
    first = next(iter(mapinput.open_input(args=str(path))))
    assert mapinput.value_bytes(first.value) == b"caf\xe9"
    command = mapper.render(mapper.parse_template("printf %s {}"), first.value, 1)
    done = subprocess.run([b"/bin/sh", b"-c", mapper.fs(command)], capture_output=True, timeout=30)
    assert done.stdout == b"caf\xe9"
    wire = json.loads(json.dumps(first.task_item()))  # the agent link is JSON with ensure_ascii
    assert wire["value"] == first.value


def test_args_from_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a\nb\n")))
    source = mapinput.open_input(args="-")
    assert [item.value for item in source] == ["a", "b"]
    assert [item.value for item in source] == ["a", "b"]  # spooled: iterates twice
    source.close()


def test_args_errors(tmp_path):
    nul = tmp_path / "nul"
    nul.write_bytes(b"a\nb\0c\n")
    with pytest.raises(UsageError, match=r"^--args .*nul line 2: NUL byte$"):
        mapinput.open_input(args=str(nul))
    with pytest.raises(UsageError, match="no such file"):
        mapinput.open_input(args=str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(UsageError, match="no lines"):
        mapinput.open_input(args=str(empty))
    with pytest.raises(UsageError, match="--colsep"):
        mapinput.open_input(args=str(nul), colsep="(")
    with pytest.raises(UsageError, match="one of"):
        mapinput.open_input(args=str(nul), range_text="1:2")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.write_bytes(b"a\n")
        locked.chmod(0)
        with pytest.raises(UsageError, match="^--args .*locked: Permission denied"):
            mapinput.open_input(args=str(locked))


def test_range_items_are_computed_lazily():
    source = mapinput.open_input(range_text="1:1000000")
    assert len(source) == 1_000_000
    assert source.item(1).value == 1 and source.item(1_000_000).value == 1_000_000
    iterator = iter(source)
    assert [next(iterator).value for _ in range(3)] == [1, 2, 3]
    assert [i.value for i in mapinput.open_input(range_text="10:0:-5")] == [10, 5, 0]
    assert [i.value for i in mapinput.open_input(range_text="0:10:4")] == [0, 4, 8]
    assert source.item(5).key == mapinput.open_input(range_text="-3:9").item(9).key  # keyed by value


@pytest.mark.parametrize("text,message", [("5:1", "empty"), ("a:b", "integers"), ("1", "integers"),
                                          ("1:2:0", "STEP is 0"), ("1:10000000000000", "over the limit"),
                                          ("1.5:3", "integers"), ("1:2:3:4", "integers"),
                                          ("1:99999999999999999999", "integers")])
def test_range_errors(text, message):
    with pytest.raises(UsageError, match=f"^--range .*{message}"):
        mapinput.open_input(range_text=text)


def test_files_items(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"same")
    (tmp_path / "a name.txt").write_bytes(b"same")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_bytes(b"other")
    items = list(mapinput.open_input(files=str(tmp_path / "**" / "*.txt")))
    assert [os.path.relpath(item.path, tmp_path) for item in items] == ["a name.txt", "b.txt", "sub/c.txt"]
    assert items[0].sha256 == items[1].sha256 and items[0].key != items[1].key
    task = items[0].task_item("c2FtZQ==")
    assert task["file"] == {"name": "a name.txt", "sha256": items[0].sha256, "data": "c2FtZQ=="}
    (tmp_path / "b.txt").write_bytes(b"changed")
    changed = list(mapinput.open_input(files=str(tmp_path / "**" / "*.txt")))
    assert changed[1].key != items[1].key and changed[0].key == items[0].key  # keyed by content
    with pytest.raises(UsageError, match="matches nothing"):
        mapinput.open_input(files=str(tmp_path / "*.tif"))
    with pytest.raises(UsageError, match="no regular file"):
        mapinput.open_input(files=str(tmp_path / "su*"))


def test_run_identity():
    form = mapinput.open_input(range_text="1:10").form
    base = mapinput.run_identity("command", "echo {}", form)
    assert base == mapinput.run_identity("command", "echo {}", mapinput.open_input(range_text=" 1:10 ").form)
    # The range's bounds are part of the identity (an item's key is its value).
    assert base != mapinput.run_identity("command", "echo {}", mapinput.open_input(range_text="1:99").form)
    assert base != mapinput.run_identity("command", "echo {}", mapinput.open_input(range_text="1:10:2").form)
    assert base != mapinput.run_identity("command", "echo {} ", form)
    assert base != mapinput.run_identity("function", "echo {}", form)
    assert base != mapinput.run_identity("command", "echo {}", form, shipped="ab" * 8)
    assert base != mapinput.run_identity("command", "echo {}", {"kind": "args", "colsep": None})
    assert base != mapinput.run_identity("command", "echo {}", form, returns=("{.}.gz",))


# ------------------------------------------------------------------------ exports

def records():
    return [mapexport.ItemRecord(1, "a", "ok", "h1", 1700000000.25, 0.5, 0, None, "echo a", b"a\n", b""),
            mapexport.ItemRecord(2, "b\udcff", "failed", "h2", 1700000001.0, 1.25, 3, None, "echo 'b\nc'",
                                 b"\xff\xfe", b"oops\n", 10, 2),
            mapexport.ItemRecord(3, 3, "timeout", "h1", 1700000002.0, 10.0, None, 9, "sleep 99")]


def test_export_plain_and_jsonl(tmp_path):
    plain = tmp_path / "out.txt"
    mapexport.write_export(str(plain), records())
    assert plain.read_bytes() == b"a\n\xff\xfe"
    lines = tmp_path / "out.jsonl"
    mapexport.write_export(str(lines), records())
    rows = [json.loads(line) for line in lines.read_text().splitlines()]
    assert rows[0] == {"seq": 1, "item": "a", "item_base64": None, "status": "ok", "exit": 0, "signal": None,
                       "value": None, "error": None, "host": "h1", "attempt": 1, "truncated": False,
                       "stdout": "a\n", "stdout_base64": None, "stderr": "", "stderr_base64": None}
    assert all(list(row) == list(mapexport.EXPORT_KEYS) for row in rows)  # the same keys in every record
    assert rows[1]["stdout"] is None and rows[1]["stdout_base64"] == "//4="
    assert rows[1]["item"] is None and rows[1]["item_base64"] == "Yv8="
    assert rows[2]["item"] == 3
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(ValueError, match="order"):
        mapexport.write_export(str(plain), reversed(records()))
    assert plain.read_bytes() == b"a\n\xff\xfe" and not list(tmp_path.glob(".*tmp"))


def test_joblog_has_gnu_parallels_columns(tmp_path):
    need_parallel()
    theirs = tmp_path / "theirs.log"
    subprocess.run([PARALLEL, "--will-cite", "--joblog", str(theirs), "echo {}; exit {}", ":::", "0", "3"],
                   capture_output=True, timeout=60)
    ours = tmp_path / "ours.log"
    mapexport.write_joblog(str(ours), records())
    their_lines = theirs.read_bytes().split(b"\n")
    our_lines = ours.read_bytes().split(b"\n")
    assert our_lines[0] == their_lines[0]
    for name in (theirs, ours):  # both parse with parallel's column names, the same way
        with open(name, newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
        assert list(rows[0]) == list(mapexport.JOBLOG_COLUMNS)
        for row in rows:
            float(row["Starttime"]), float(row["JobRuntime"]), int(row["Exitval"]), int(row["Signal"])
            assert len(row["Starttime"].split(".")[1]) == 3 and len(row["JobRuntime"]) >= 10
    rows = [line.split(b"\t") for line in our_lines[1:-1]]
    assert rows[0] == [b"1", b"h1", b"1700000000.250", b"     0.500", b"0", b"0", b"0", b"0", b"echo a"]
    assert rows[1][6:] == [b"3", b"0", b"echo 'b\0c'"]
    assert rows[2][6:8] == [b"-1", b"9"]  # killed on --timeout: -1, as parallel's --timeout (below)
    timed = tmp_path / "timed.log"
    subprocess.run([PARALLEL, "--will-cite", "--joblog", str(timed), "--timeout", "0.2", "sleep", ":::", "30"],
                   capture_output=True, timeout=60)
    assert timed.read_bytes().split(b"\n")[1].split(b"\t")[6] == b"-1"
    # parallel --resume reads our joblog: the Seqs listed there are not run again
    out = subprocess.run([PARALLEL, "--will-cite", "--resume", "--joblog", str(ours), "echo", ":::", "a", "b", "c",
                          "d"], capture_output=True, timeout=60)
    assert out.stdout.split() == [b"d"]


# ------------------------------------------------------------------------ a host's results

HELLO_SHA256 = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


def good_result(**changes):
    result = {"seq": 2, "ok": True, "exit": 0, "signal": None, "timed_out": False, "stdout": "hi\n",
              "stdout_b64": False, "truncated": False, "stderr": "/w8=", "stderr_b64": True, "error": None,
              "returned": [{"path": "in/x/a.gz", "sha256": HELLO_SHA256, "size": 5, "data": "aGVsbG8="}],
              "start": 1700000000.5, "seconds": 0.25}
    result.update(changes)
    return result


def test_parse_item_result():
    record, files = mapexport.parse_item_result(good_result(), {2: "a.txt"}, "h1", "command", returns=1)
    assert (record.status, record.stdout, record.stderr, record.receive) == ("ok", b"hi\n", b"\xff\x0f", 8)
    assert files[0].data == b"hello" and files[0].path == "in/x/a.gz"
    record, _ = mapexport.parse_item_result(good_result(ok=True, exit=3), {2: "a"}, "h1", "command", returns=1)
    assert record.status == "failed"  # the host's "ok" is not what decides
    record, _ = mapexport.parse_item_result({"seq": 2, "value": [1, 2], "error": None, "timed_out": False,
                                             "start": 1.0, "seconds": 0.0}, {2: 5}, "h", "function")
    assert record.status == "ok" and record.value == [1, 2]


@pytest.mark.parametrize("changes,message", [
    ({"seq": 9}, "not sent"), ({"seq": True}, "seq"), ({"exit": 999}, "out of range"),
    ({"signal": -1}, "out of range"), ({"start": float("nan")}, "start"), ({"seconds": -1}, "seconds"),
    ({"stdout": "x" * 2_000_000}, "over"), ({"stdout": "!!", "stdout_b64": True}, "not base64"),
    ({"stderr": "A" * 10000, "stderr_b64": True}, "over"),
    ({"returned": [{"path": "p", "sha256": "0" * 64, "size": 5, "data": "aGVsbG8="}]}, "does not match"),
    ({"returned": [{"path": "p", "error": "x"}, {"path": "q", "error": "y"}]}, "2 returned files"),
    ({"returned": "nope"}, "returned"), ({"stdout": 5}, "stdout"),
])
def test_parse_item_result_refuses_hostile_fields(changes, message):
    with pytest.raises(mapexport.ResultError, match=message):
        mapexport.parse_item_result(good_result(**changes), {2: "a"}, "h1", "command", returns=1)
