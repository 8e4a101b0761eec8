"""The rcc reference backend's LSTM (stdlib/lstm.rnn, backend torch, plan sequential) beside
torch.nn.LSTM and a Python loop over torch.nn.LSTMCell, in one run on one machine.

    python benchmarks/reference.py                          # B=8, T=1024, d=128, CPU (+ CUDA)
    python benchmarks/reference.py --T 64 --repeats 3       # a quick check that it works

All three get the same weights (copied from the torch.nn.LSTM), and their outputs, final states
and input gradients are compared before anything is timed. Each measurement is the median of
--repeats runs after --warmup runs. "forward" runs under torch.no_grad() (inference);
"forward+backward" runs the forward with autograd and then backward of the outputs' sum, as a
training step does. Ratios are time / torch.nn.LSTM's time (lower is faster; torch.nn.LSTM calls
one fused kernel per layer, oneDNN on CPU and cuDNN on CUDA, so it is the bar to reach).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing rcc

import rcc  # noqa: E402
from common import median_ms, print_machine  # noqa: E402


class LSTMCellLoop(torch.nn.Module):
    """torch.nn.LSTMCell stepped by a Python loop: what a hand-written recurrence looks like."""

    def __init__(self, d_in, d):
        super().__init__()
        self.cell = torch.nn.LSTMCell(d_in, d)

    def forward(self, x):
        B, T, _ = x.shape
        h = x.new_zeros(B, self.cell.hidden_size)
        c = x.new_zeros(B, self.cell.hidden_size)
        ys = []
        for t in range(T):
            h, c = self.cell(x[:, t], (h, c))
            ys.append(h)
        return torch.stack(ys, 1), h, c


def build(d_in, d, device):
    """The three implementations with the weights of one torch.nn.LSTM. Each is wrapped as
    x -> (y [B, T, d], h_T [B, d], c_T [B, d])."""
    reference = torch.nn.LSTM(d_in, d, batch_first=True).to(device)
    loop = LSTMCellLoop(d_in, d).to(device)
    rcc_cell = rcc.compile(os.path.join(REPO, "stdlib", "lstm.rnn"))(d_in=d_in, d=d).to(device)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            source = getattr(reference, name + "_l0")
            getattr(loop.cell, name).copy_(source)
            getattr(rcc_cell, name).copy_(source)

    def run_reference(x):
        y, (h, c) = reference(x)
        return y, h[0], c[0]

    def run_rcc(x):
        y, final = rcc_cell(x)
        return y, final["h"], final["c"]

    modules = {"torch.nn.LSTM": reference, "LSTMCell loop": loop, "rcc torch reference": rcc_cell}
    runners = {"torch.nn.LSTM": run_reference, "LSTMCell loop": loop, "rcc torch reference": run_rcc}
    return modules, runners


def check_agreement(runners, x, tolerance) -> float:
    """Largest |difference| to torch.nn.LSTM over outputs, final states and d(sum y)/dx."""
    results = {}
    for name, run in runners.items():
        xg = x.detach().clone().requires_grad_(True)
        y, h, c = run(xg)
        (grad,) = torch.autograd.grad(y.sum(), xg)
        results[name] = [t.detach() for t in (y, h, c, grad)]
    worst = 0.0
    base = results["torch.nn.LSTM"]
    for name, values in results.items():
        diffs = [(a - b).abs().max().item() for a, b in zip(values, base)]
        worst = max(worst, *diffs)
        if name != "torch.nn.LSTM":
            print(f"  {name:22s} vs torch.nn.LSTM: max |diff| y {diffs[0]:.2e}  h_T {diffs[1]:.2e}"
                  f"  c_T {diffs[2]:.2e}  dL/dx {diffs[3]:.2e}")
    if worst > tolerance:
        raise SystemExit(f"reference.py: error: the implementations disagree (max |diff| {worst:.2e} "
                         f"> {tolerance:.0e}); not timing them")
    return worst


def bench_device(device, args):
    torch.manual_seed(0)
    modules, runners = build(args.d_in, args.d, device)
    x = torch.randn(args.B, args.T, args.d_in, device=device)
    print(f"\n{device.type.upper()}: B={args.B} T={args.T} d_in={args.d_in} d={args.d} float32")
    check_agreement(runners, x, args.tolerance)

    rows = []
    for name, run in runners.items():
        params = list(modules[name].parameters())

        def forward(run=run):
            with torch.no_grad():
                run(x)

        def forward_backward(run=run, params=params):
            xg = x.detach().requires_grad_(True)
            y, _, _ = run(xg)
            torch.autograd.grad(y.sum(), [xg, *params])

        rows.append((name, median_ms(forward, device, args.warmup, args.repeats),
                     median_ms(forward_backward, device, args.warmup, args.repeats)))

    base_fwd, base_both = rows[0][1], rows[0][2]
    print(f"  {'implementation':22s} {'forward ms':>11s} {'ratio':>7s}   {'fwd+bwd ms':>11s} {'ratio':>7s}")
    for name, fwd, both in rows:
        print(f"  {name:22s} {fwd:11.2f} {fwd / base_fwd:6.2f}x   {both:11.2f} {both / base_both:6.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--B", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--T", type=int, default=1024, help="sequence length (default 1024)")
    parser.add_argument("--d", type=int, default=128, help="hidden size (default 128)")
    parser.add_argument("--d-in", type=int, default=None, help="input size (default: --d)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs, median taken (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU, and CUDA too when available")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest |difference| allowed between implementations (float32)")
    args = parser.parse_args(argv)
    args.d_in = args.d_in or args.d
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("reference.py: error: --device cuda but torch sees no CUDA device")
        devices.append(torch.device("cuda"))

    print_machine(0 if torch.cuda.is_available() else None)
    print(f"median of {args.repeats} runs after {args.warmup} warmup runs; forward under no_grad, "
          "fwd+bwd = forward with autograd + grad of sum(y) wrt x and params")
    for device in devices:
        bench_device(device, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
