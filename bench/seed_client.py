"""The seed's prime client (client_primes.py, 2015), ported to Python 3 for benchmarks only.

The seed sent each block as ``python client_primes.py 0 N N+1 ...`` (10,000
numbers on the command line) over a new ssh connection; the client tested each
number by trial division and printed a JSON object {number: is_prime}.

Port notes: ``xrange`` became ``range`` and ``print`` a function; the Tor
branch is left out. The published text of ``is_prime`` lost its first line to
HTML stripping ("if n = 2"); it is the usual ``if n <= 3: return n >= 2``.
This is not part of beowulf: bench/bench_sieve.py times it as the baseline.
"""

import json
import sys

# Numbers per block in the seed's server loop.
SEED_BLOCK = 10_000


def is_prime(n):
    """Trial division by 2, 3 and 6k +- 1 up to sqrt(n), as the seed did."""
    if n <= 3:
        return n >= 2
    if n % 2 == 0 or n % 3 == 0:
        return False
    for i in range(5, int(n**0.5) + 1, 6):
        if n % i == 0 or n % (i + 2) == 0:
            return False
    return True


def worker(nums):
    """{number: is_prime(number)} for the numbers given as strings, as the seed did."""
    results = {}
    for n in nums:
        results[int(n)] = is_prime(int(n))
    return results


def run_block(lo, hi):
    """The seed client's work for [lo, hi]: test every number, JSON-encode the answer."""
    return json.dumps(worker([str(n) for n in range(lo, hi + 1)]))


def main(argv):
    """Command line as in the seed: TOR_FLAG N N N ... (the flag is ignored here)."""
    print(json.dumps(worker(argv[2:])))


if __name__ == "__main__":
    main(sys.argv)
