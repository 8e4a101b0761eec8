"""The first call of a model in a new process: rcc.compile, instantiation and one forward, each
case in a fresh Python process (torch imported before the clock starts), on this machine:

    python benchmarks/first_call.py [--repeats 3]

- cold: an empty RCC_CACHE_DIR (the compiler runs; backend cpp builds its kernel);
- warm code: the generated code and kernels are cached, the front-end cache is off
  (RCC_NO_FRONT_CACHE=1): the compiler runs again, what rcc did before this cache;
- warm: both cached (rcc.frontcache): no parsing, elaborating, analysing or printing.

Cells: stdlib LSTM (d_in = d = 256, plan sequential), GLA (K = V = 64, plan auto), LSTM on
backend cpp. Prints each case's median seconds, whether lark and sympy were imported, and the
ratio warm / warm code.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from common import print_machine  # noqa: E402

SCRIPT = """
import sys, time, torch
t = time.perf_counter()
import rcc
stdlib = {stdlib!r}
lstm = rcc.compile(stdlib + "/lstm.rnn", plan="sequential")(d_in=256, d=256)
gla = rcc.compile(stdlib + "/gla.rnn")(K=64, V=64)
lstm_cpp = rcc.compile(stdlib + "/lstm.rnn", backend="cpp")(d_in=256, d=256)
x = torch.randn(2, 8, 256)
lstm(x); lstm_cpp(x); gla(*(torch.randn(2, 8, 64) for _ in range(4)))
print(time.perf_counter() - t, "lark" in sys.modules, "sympy" in sys.modules)
"""


def run(cache, front, stdlib):
    env = dict(os.environ, RCC_CACHE_DIR=cache, OMP_NUM_THREADS="1")
    if not front:
        env["RCC_NO_FRONT_CACHE"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(stdlib=stdlib)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), out[1] == "True", out[2] == "True"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print_machine()
    stdlib = os.path.join(REPO, "stdlib")
    rows = {}
    for case, front in (("cold", True), ("warm code", False), ("warm", True)):
        times, imports = [], None
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:
                if case != "cold":
                    run(cache, front=True, stdlib=stdlib)  # fill the caches
                seconds, lark, sympy = run(cache, front, stdlib)
            times.append(seconds)
            imports = (lark, sympy)
        rows[case] = statistics.median(times)
        print(f"{case:10s} {rows[case]:6.3f} s   lark imported: {imports[0]!s:5s} "
              f"sympy imported: {imports[1]}")
    print(f"warm / warm code: {rows['warm'] / rows['warm code']:.2f}")


if __name__ == "__main__":
    main()
