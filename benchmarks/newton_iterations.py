"""How plan newton converges on the ParaRNN cells (pararnn_gru, pararnn_lstm) at long sequence
lengths, in float64 and float32: Newton iterations, final residual, damping and fallback, and the
error of its outputs and final states against the sequential loop.

    python benchmarks/newton_iterations.py                        # T in {1024, 16384, 65536}, B=2, d=32
    python benchmarks/newton_iterations.py --T 256 1024           # a quick check

Each cell gets its module's default initialisation (seed 0) and randn inputs. The reference is plan
sequential in float64 (a loop: exact to a few float64 ulps per step); each plan newton run, float64
and float32 (the same weights and inputs, cast), is compared with it, as is plan sequential run in
float32 (the loop's own float32 error, for scale). "err/(eps T)" is the largest |error| of outputs
and final states divided by the dtype's epsilon times T: the worst case of a loop's rounding error
grows like eps * T, so a value well below 1 means Newton's answer is as good as a loop's. Newton
runs with the module's defaults (max_iter 30, tol 4 eps (log2 T + 4)); "its", "residual",
"damped" (damped iterations) and "fallback" (finished sequentially) come from m.last_stats. Every
run is one forward under no_grad; nothing is timed here (benchmarks/plans.py times the plans).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing rcc

import rcc  # noqa: E402
from common import print_machine  # noqa: E402

CELLS = ("pararnn_gru", "pararnn_lstm")
COLUMNS = (  # title, width, left-aligned
    ("cell", 12, True), ("dtype", 7, True), ("T", 5, False), ("its", 3, False),
    ("residual", 8, False), ("tol", 8, False), ("damped", 6, False), ("fallback", 8, True),
    ("max|err| y", 10, False), ("max|err| final", 14, False), ("err/(eps T)", 11, False),
    ("seq f32 err/(eps T)", 19, False))


def table_line(cells):
    return "| " + " | ".join(f"{c:{'<' if left else '>'}{w}s}"
                             for c, (_, w, left) in zip(cells, COLUMNS)) + " |"


def forward(module, x):
    """(outputs, final states in declaration order) of one forward under no_grad."""
    with torch.no_grad():
        y, final = module(x)
    return y, [final[s] for s in module.STATES]


def max_error(values, reference):
    return max((v.double() - r).abs().max().item() for v, r in zip(values, reference))


def run_cell(name, args, device):
    path = os.path.join(REPO, "stdlib", name + ".rnn")
    dims = {"d_in": args.d, "d": args.d}
    torch.manual_seed(0)
    sequential64 = rcc.compile(path, plan="sequential")(**dims).to(device).double()
    weights = sequential64.state_dict()
    rows = []
    for T in args.T:
        generator = torch.Generator().manual_seed(T)
        x64 = torch.randn(args.B, T, args.d, generator=generator, dtype=torch.float64).to(device)
        ref_y, ref_final = forward(sequential64, x64)
        for dtype in args.dtypes:
            eps = torch.finfo(dtype).eps
            x = x64.to(dtype)
            seq_scaled = "-"
            if dtype != torch.float64:  # the loop's own error in this dtype, for scale
                sequential = rcc.compile(path, plan="sequential")(**dims).to(device)
                sequential.load_state_dict(weights)
                sequential.to(dtype)
                y, states = forward(sequential, x)
                seq_error = max(max_error([y], [ref_y]), max_error(states, ref_final))
                seq_scaled = f"{seq_error / (eps * T):.1e}"
            newton = rcc.compile(path, plan="newton")(**dims).to(device)
            newton.load_state_dict(weights)
            newton.to(dtype)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                y, states = forward(newton, x)
            stats = newton.last_stats
            tol = 4.0 * eps * (torch.log2(torch.tensor(float(T))).item() + 4.0)
            error_y = max_error([y], [ref_y])
            error_final = max_error(states, ref_final)
            error = max(error_y, error_final)
            rows.append([name, str(dtype).replace("torch.", ""), str(T), str(stats["iterations"]),
                         f"{stats['residual']:.1e}", f"{newton.tol or tol:.1e}", str(stats["damped"]),
                         "yes" if stats["fallback"] else "no", f"{error_y:.1e}", f"{error_final:.1e}",
                         f"{error / (eps * T):.1e}", seq_scaled])
            for w in caught:
                print(f"  warning ({name} {dtype} T={T}): {w.message}", file=sys.stderr)
            print(f"  {name} {dtype} T={T} done", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    parser.add_argument("--T", type=int, nargs="+", default=[1024, 16384, 65536],
                        help="sequence lengths (default 1024 16384 65536)")
    parser.add_argument("--B", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--d", type=int, default=32, help="d_in = d (default 32)")
    parser.add_argument("--dtypes", nargs="+", choices=("float64", "float32"),
                        default=["float64", "float32"])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    args.dtypes = [getattr(torch, name) for name in args.dtypes]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("newton_iterations.py: error: --device cuda but torch sees no CUDA device")
    device = torch.device(args.device)

    print_machine(device if device.type == "cuda" else None)
    print(f"device {device.type}, B={args.B}, d_in=d={args.d}; reference: plan sequential in float64; "
          "errors are max |difference| to it\n", flush=True)
    rows = []
    for name in args.cells:
        rows += run_cell(name, args, device)
    print(table_line([title for title, _, _ in COLUMNS]))
    print("|" + "|".join("-" * (w + 1) + ("-" if left else ":") for _, w, left in COLUMNS) + "|")
    for row in rows:
        print(table_line(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
