"""The stdlib layers (rcc.layers) against the same layer around flash-linear-attention's
pure-torch recurrence (fla.ops.*.naive: fla's torch path, what runs it on a CPU), forward +
backward, float32, on CPU, in one process:

    python benchmarks/layers.py               # about a minute on 2 idle cores
    python benchmarks/layers.py --T 512 --repeats 3

- gla: rcc.layers.gla(d_model=512, num_heads=4): K=64, V=128 per head;
- gated_deltanet: rcc.layers.gated_deltanet(d_model=512, num_heads=4, head_dim=64): V=128;
- kda: rcc.layers.kda(d_model=512, num_heads=4, head_dim=64): K=V=64.
B=4, T=1024 by default. The peer row runs the layer's own projections, norm, gate and output
projection around fla's naive recurrence (rcc.Layer.cell_inputs / output), so the ratio is the
recurrence's. Each rcc row is checked against the peer first (outputs and gradients).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import rcc  # noqa: E402
from common import median_ms, print_machine  # noqa: E402

CPU = torch.device("cpu")


def peers():
    with warnings.catch_warnings():  # fla warns that Triton is not available on a CPU
        warnings.simplefilter("ignore")
        from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
        from fla.ops.gla.naive import naive_recurrent_gla
        from fla.ops.kda.naive import naive_recurrent_kda
    return {"gla": naive_recurrent_gla, "gated_deltanet": naive_recurrent_gated_delta_rule,
            "kda": naive_recurrent_kda}


def make(name, backend, plan):
    if name == "gla":
        return rcc.layers.gla(512, num_heads=4, backend=backend, plan=plan)
    if name == "kda":
        return rcc.layers.kda(512, num_heads=4, head_dim=64, backend=backend, plan=plan)
    return rcc.layers.gated_deltanet(512, num_heads=4, head_dim=64, backend=backend, plan=plan)


def run(fn, layer, x):
    y = fn()
    return [y, *torch.autograd.grad(y.square().mean(), [x, *layer.parameters()])]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", choices=["gla", "gated_deltanet", "kda"],
                    default=["gla", "gated_deltanet", "kda"])
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--T", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print_machine()
    naive = peers()
    print(f"\nB={args.B}, T={args.T}, d_model=512, float32, forward + backward\n"
          "| layer | implementation | ms | ratio to fla naive |\n|---|---|---:|---:|")
    for name in args.only:
        torch.manual_seed(0)
        x = torch.randn(args.B, args.T, 512, requires_grad=True)
        base = make(name, "torch", "sequential")

        def peer():
            return base.output(x, naive[name](*base.cell_inputs(x))[0])
        want = run(peer, base, x)
        peer_ms = median_ms(lambda: run(peer, base, x), CPU, args.warmup, args.repeats)
        print(f"| {name} | fla naive recurrence | {peer_ms:.1f} | 1.00x |", flush=True)
        for backend, plan in (("torch", "auto"), ("torch", "chunk"), ("cpp", "sequential")):
            layer = make(name, backend, plan)
            layer.load_state_dict(base.state_dict())
            got = run(lambda: layer(x)[0], layer, x)
            err = max(((g - w).abs().max() / w.abs().max().clamp(min=1e-3)).item()
                      for g, w in zip(got, want))
            if err > 1e-3:
                sys.exit(f"{name} {backend} {plan}: differs from fla's naive by {err:.3g}")
            ms = median_ms(lambda: run(lambda: layer(x)[0], layer, x), CPU, args.warmup,
                           args.repeats)
            print(f"| {name} | rcc {backend}, {plan} | {ms:.1f} | {ms / peer_ms:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
