"""Eager against torch.compile for a model holding an rcc cell, on CPU, in one process:

    python benchmarks/compile.py                # every row (about 2 minutes on 2 idle cores)
    python benchmarks/compile.py --only lstm --repeats 3

The model is the cell between a linear projection of its first input and one of its output
(what Inductor can fuse around it). Under torch.compile the cell is one op (rcc.runtime.ops) whose
backward runs the cell's forward again: the rows show what that recomputation costs, and what
the first call's compile and a second length cost (0 recompiles expected).

- lstm: B=8, T=512, d_in=d=128, float32 (backends torch and cpp, plan sequential);
- gla: B=4, H=4, T=1024, K=V=64, float32 (backend torch plans chunk and auto; backend cpp).

Each row checks the compiled model against eager (loss and gradients) before timing. Times are
forward + backward, the median of --repeats runs after --warmup runs; ratio = compiled / eager.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import rcc  # noqa: E402
from common import median_ms, print_machine  # noqa: E402

CPU = torch.device("cpu")


class Model(torch.nn.Module):
    def __init__(self, cell, width_in, width_out, heads):
        super().__init__()
        self.cell, self.heads = cell, heads
        self.inp = torch.nn.Linear(width_in, width_in)
        self.out = torch.nn.Linear(width_out, 1)

    def forward(self, x, *rest):
        y, _ = self.cell(torch.tanh(self.inp(x.flatten(2))).view_as(x), *rest)
        return self.out(y.flatten(2)).square().mean()


def lstm(backend, plan):
    cell = rcc.compile(os.path.join(REPO, "stdlib", "lstm.rnn"), backend=backend, plan=plan)
    model = Model(cell(d_in=128, d=128), 128, 128, ())
    return model, lambda T: [torch.randn(8, T, 128)]


def gla(backend, plan):
    cell = rcc.compile(os.path.join(REPO, "stdlib", "gla.rnn"), backend=backend, plan=plan)
    model = Model(cell(K=64, V=64), 4 * 64, 4 * 64, 4)

    def inputs(T):
        q, k, v = (torch.randn(4, T, 4, 64) for _ in range(3))
        gk = torch.nn.functional.logsigmoid(torch.randn(4, T, 4, 64)) / 16
        return [q, k / k.norm(dim=-1, keepdim=True), v, gk]
    return model, inputs


CASES = {
    "lstm": [("torch", "sequential", lstm), ("cpp", "sequential", lstm)],
    "gla": [("torch", "chunk", gla), ("torch", "auto", gla), ("cpp", "sequential", gla)],
}


def step(model, xs):
    loss = model(*xs)
    return [loss, *torch.autograd.grad(loss, list(model.parameters()))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=list(CASES), default=list(CASES))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    print_machine()
    print("\n| cell | backend, plan | eager ms | compiled ms | ratio | first call s | "
          "another T: new graphs |\n|---|---|---:|---:|---:|---:|---:|")
    for name in args.only:
        for backend, plan, make in CASES[name]:
            model, inputs = make(backend, plan)
            xs = inputs(256)
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            compiled = torch.compile(model, dynamic=True)
            start = time.perf_counter()
            got = step(compiled, xs)
            first = time.perf_counter() - start
            want = step(model, xs)
            err = max(((g - w).abs().max() / w.abs().max().clamp(min=1)).item()
                      for g, w in zip(got, want))
            if err > 1e-4:
                sys.exit(f"{name} {backend} {plan}: compiled differs from eager by {err:.3g} (relative)")
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            xs = inputs(512 if name == "lstm" else 1024)
            eager_ms = median_ms(lambda: step(model, xs), CPU, args.warmup, args.repeats)
            compiled_ms = median_ms(lambda: step(compiled, xs), CPU, args.warmup, args.repeats)
            more = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
            print(f"| {name} | {backend}, {plan} | {eager_ms:.1f} | {compiled_ms:.1f} | "
                  f"{compiled_ms / eager_ms:.2f}x | {first:.1f} | {more} |", flush=True)


if __name__ == "__main__":
    main()
