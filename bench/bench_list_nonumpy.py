"""List mode on a host with libprimesieve and no numpy (issue 11): the ``primesieve``
engine with the stdlib encoder against the pure-Python sieve, on a real old interpreter.

Runs ``client/primes.py`` under pyenv's CPython (default 3.6, which has no numpy) and
times ``run({"mode": "list"})`` of one block of 10^7 numbers at 10^9 with each engine
there, then the numpy engine in this interpreter for reference. Figures are CPU seconds,
best of ``--repeat`` (steadier than wall time on a shared machine); the ratio is
python / primesieve. Checks that every engine found the same count and payload.

Run: ``python bench/bench_list_nonumpy.py [--python 3.6] [--repeat 7]`` (about 10 s).
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from harness.sshd import pyenv_python  # noqa: E402

LO, WIDTH = 10**9, 10**7

TIMER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from client import primes
lo, hi, repeat = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out = {"numpy": primes._numpy() is not None, "engines": {}}
for engine in sys.argv[5:]:
    if engine not in primes.AVAILABLE:
        continue
    best = None
    for _ in range(repeat):
        began = time.process_time()
        result = primes.run({"lo": lo, "hi": hi, "mode": "list"}, engine=engine)
        spent = time.process_time() - began
        best = spent if best is None else min(best, spent)
    out["engines"][engine] = {"cpu": best, "count": result["count"], "data": result["data"]}
print(json.dumps(out))
"""


def timed(python, repeat, engines):
    done = subprocess.run([str(python), "-I", "-c", TIMER, ROOT, str(LO), str(LO + WIDTH - 1), str(repeat),
                           *engines], capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.6", help="pyenv version of the old host's Python")
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    python = pyenv_python(args.python)
    if python is None:
        raise SystemExit(f"needs pyenv's CPython {args.python}")
    old = timed(python, args.repeat, ["python", "primesieve"])
    if old["numpy"]:
        raise SystemExit(f"{python} has numpy: this bench is for a host without it")
    here = timed(sys.executable, args.repeat, ["numpy"])
    rows = [(f"{args.python} {name}", figures) for name, figures in old["engines"].items()]
    rows += [(f"{sys.version.split()[0]} {name} (reference)", figures) for name, figures in here["engines"].items()]
    if len({figures["data"] for _, figures in rows}) != 1:
        raise SystemExit("the engines disagree on the payload")
    print(f"list mode, one block [{LO:.0e}, +{WIDTH:.0e}), CPU seconds, best of {args.repeat}")
    for label, figures in rows:
        print(f"  {label:<28} {figures['cpu']:.3f} s  {figures['count']:,} primes")
    engines = old["engines"]
    if "python" in engines and "primesieve" in engines:
        print(f"  primesieve without numpy is {engines['python']['cpu'] / engines['primesieve']['cpu']:.1f}x "
              "faster than the pure-Python sieve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
