"""Backend 'triton' on a GPU, side by side with the hand-written kernels a user would otherwise
run, in one process:

    python benchmarks/gpu.py                       # every table, on cuda:0
    python benchmarks/gpu.py --only gla lstm --repeats 20
    TRITON_INTERPRET=1 python benchmarks/gpu.py --smoke   # tiny shapes on CPU: checks the script

- gla, delta_rule, gated_delta_rule, kda: flash-linear-attention's chunk kernels (chunk_gla,
  chunk_delta_rule, chunk_gated_delta_rule, chunk_kda) on their shapes, B=8, T=4096, H=16,
  K=V=128, bf16, against rcc's stdlib cell of the same recurrence (gla.rnn, deltanet.rnn,
  gated_deltanet.rnn, kda.rnn) with plan 'auto' on backend triton;
- hgrn: fla's chunk_hgrn, B=8, T=4096, D=2048 (H*K), bf16, against hgrn.rnn;
- lstm, gru: torch.nn.LSTM / GRU (cuDNN) with copied weights, and FlashRNN's fused kernels
  (backends triton_fused and cuda_fused, its own random weights, the same shapes), B=16, T=1024,
  d=d_in=256 and 1024 (--d), bf16, against lstm.rnn / gru.rnn;
- newton: ParaGRU (pararnn_gru.rnn) plan newton against its plan sequential, both backend triton,
  B=8, T=65536, d=d_in=256 and 1024 (--d), float32 (ParaRNN's long-sequence setting).

Each row is timed forward under no_grad and forward + backward (the gradients of sum(outputs)
by the inputs and params). Before timing, rcc's output is checked against its peer where the
weights can be shared (fla's ops, cuDNN); the script stops on a mismatch. Peers that are not
installed (pip install flash-linear-attention flashrnn) or fail are listed with the reason.
Ratios are rcc time / peer time (below 1 is faster); each time is the median of --repeats runs.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import rcc  # noqa: E402
from common import median_ms, print_machine  # noqa: E402

SHAPES = {  # the shapes; --smoke shrinks them to run in Triton's interpreter
    "linear": dict(B=8, T=4096, H=16, K=128, V=128),
    "hgrn": dict(B=8, T=4096, D=2048),
    "rnn": dict(B=16, T=1024, D=256),  # D: --d
    "newton": dict(B=8, T=65536),  # D: --d
}
SMOKE = {"linear": dict(B=1, T=5, H=2, K=4, V=4), "hgrn": dict(B=1, T=5, D=8),
         "rnn": dict(B=1, T=4, D=8), "newton": dict(B=1, T=6)}


def stdlib(name):
    return os.path.join(REPO, "stdlib", name + ".rnn")


def header(title):
    print(f"\n{title}\n| {'implementation':<40} | {'fwd ms':>9} | {'ratio':>6} | {'fwd+bwd ms':>10} |"
          f" {'ratio':>6} |\n|{'-' * 42}|{'-' * 10}:|{'-' * 7}:|{'-' * 11}:|{'-' * 7}:|")


def row(name, fwd, fwdbwd, base=None):
    def ratio(ms, ref):
        return f"{ms / ref:>5.2f}x" if ref else "     -"
    print(f"| {name:<40} | {fwd:>9.3f} | {ratio(fwd, base and base[0])} | {fwdbwd:>10.3f} |"
          f" {ratio(fwdbwd, base and base[1])} |")


def skipped(name, why):
    print(f"| {name:<40} | {'n/a':>9} | {'':>6} | {'n/a':>10} | {'':>6} |  {why}")


def timed(fn, leaves, args):
    """(forward ms under no_grad, forward + backward ms): fn() returns a tuple of tensors."""
    def fwd():
        with torch.no_grad():
            fn()

    def fwdbwd():
        out = fn()
        torch.autograd.backward([o.float().sum() for o in out], inputs=leaves)

    return (median_ms(fwd, args.device, args.warmup, args.repeats),
            median_ms(fwdbwd, args.device, args.warmup, args.repeats))


def differs(got, want, tol):
    """'' if got matches want within tol (relative to want's scale), else the difference."""
    for g, w in zip(got, want):
        err = (g.float() - w.float()).abs().max().item()
        if not err <= tol * max(1.0, w.float().abs().max().item()):
            return f"rcc differs from its peer by {err:.3g}"
    return ""


def check(name, got, want, tol):
    why = differs(got, want, tol)
    if why:
        sys.exit(f"{name}: {why}")


def leaf(shape, args, scale=1.0, fn=None):
    x = torch.randn(shape, device=args.device, dtype=torch.float32) * scale
    return (fn(x) if fn else x).to(args.dtype).requires_grad_()


# ---- flash-linear-attention's ops --------------------------------------------------------------
def bench_linear(args, op):
    s = (SMOKE if args.smoke else SHAPES)["linear"]
    B, T, H, K, V = s["B"], s["T"], s["H"], s["K"], s["V"]
    cell = {"gla": "gla", "delta_rule": "deltanet", "gated_delta_rule": "gated_deltanet", "kda": "kda"}[op]
    m = rcc.compile(stdlib(cell), backend="triton")(K=K, V=V).to(args.device, args.dtype)
    q, v = leaf((B, T, H, K), args), leaf((B, T, H, V), args)
    normalize = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731 (the delta rule's keys)
    k = leaf((B, T, H, K), args, fn=normalize if op != "gla" else None)
    log_decay = lambda x: torch.nn.functional.logsigmoid(x) / 16  # noqa: E731
    g = leaf((B, T, H, K) if op in ("gla", "kda") else (B, T, H), args, fn=log_decay)
    beta = leaf((B, T, H), args, fn=torch.sigmoid)
    by_name = {"q": q, "k": k, "v": v, "gk": g, "g": g, "beta": beta}
    inputs = [by_name[n] for n in m.INPUTS]
    ours = lambda: (m(*inputs)[0],)  # noqa: E731
    header(f"{op}: B={B} T={T} H={H} K={K} V={V} {args.dtype} (rcc plan {_plan(m)})")
    mine = timed(ours, inputs, args)
    try:
        fla = _fla(op)
    except ImportError as e:
        row("rcc " + cell, *mine)
        skipped("flash-linear-attention " + op, f"not installed ({e})")
        return
    scale = K ** -0.5

    def theirs():
        if op == "gla":
            return (fla(q, k, v, g, scale=scale)[0],)
        if op == "delta_rule":
            return (fla(q, k, v, beta, scale=scale)[0],)
        return (fla(q, k, v, g, beta, scale=scale)[0],)  # gated_delta_rule, kda
    try:
        with torch.no_grad():
            want = theirs()
        base = timed(theirs, inputs, args)
    except Exception as e:  # an fla version whose signature differs, or a kernel that fails here
        row("rcc " + cell, *mine)
        skipped("flash-linear-attention chunk_" + op, f"{type(e).__name__}: {str(e).splitlines()[0][:60]}")
        return
    with torch.no_grad():
        why = differs(ours(), want, 2e-2)
    row("flash-linear-attention chunk_" + op, *base)
    if why:
        row("rcc " + cell, *mine)
        skipped("rcc " + cell + " against it", why + ": no ratio")
        return
    row("rcc " + cell, *mine, base=base)


def _plan(m):
    """The plan named in the generated module's docstring."""
    import re
    doc = sys.modules[type(m).__module__].__doc__ or ""
    found = re.search(r"plan (\w+)", doc)
    return found.group(1) if found else "?"


def _fla(op):
    if op == "gla":
        from fla.ops.gla import chunk_gla
        return chunk_gla
    if op == "delta_rule":
        from fla.ops.delta_rule import chunk_delta_rule
        return chunk_delta_rule
    if op == "kda":
        from fla.ops.kda import chunk_kda
        return chunk_kda
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    return chunk_gated_delta_rule


def bench_hgrn(args):
    s = (SMOKE if args.smoke else SHAPES)["hgrn"]
    B, T, D = s["B"], s["T"], s["D"]
    m = rcc.compile(stdlib("hgrn"), backend="triton")(d=D).to(args.device, args.dtype)
    x = leaf((B, T, D), args)
    g = leaf((B, T, D), args, fn=torch.nn.functional.logsigmoid)
    ours = lambda: (m(x, g)[0],)  # noqa: E731
    header(f"hgrn: B={B} T={T} D={D} {args.dtype}")
    mine = timed(ours, [x, g], args)
    try:
        from fla.ops.hgrn import chunk_hgrn
    except ImportError as e:
        row("rcc hgrn", *mine)
        skipped("flash-linear-attention chunk_hgrn", f"not installed ({e})")
        return
    theirs = lambda: (chunk_hgrn(x, g)[0],)  # noqa: E731
    try:
        with torch.no_grad():
            want = theirs()
        base = timed(theirs, [x, g], args)
    except Exception as e:
        row("rcc hgrn", *mine)
        skipped("flash-linear-attention chunk_hgrn", f"{type(e).__name__}: {str(e).splitlines()[0][:60]}")
        return
    with torch.no_grad():
        check("hgrn", ours(), want, 2e-2)
    row("flash-linear-attention chunk_hgrn", *base)
    row("rcc hgrn", *mine, base=base)


# ---- LSTM / GRU ------------------------------------------------------------------------------------
def bench_rnn(args, kind):
    s = (SMOKE if args.smoke else SHAPES)["rnn"]
    for D in ([s["D"]] if args.smoke else args.d):
        _bench_rnn(args, kind, s["B"], s["T"], D)


def _bench_rnn(args, kind, B, T, D):
    peer = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(D, D, batch_first=True)
    peer = peer.to(args.device, args.dtype)
    m = rcc.compile(stdlib(kind), backend="triton")(d_in=D, d=D).to(args.device, args.dtype)
    rcc.from_torch(m, peer)
    x = leaf((B, T, D), args)
    params = list(m.parameters())
    ours = lambda: (m(x)[0],)  # noqa: E731
    theirs = lambda: (peer(x)[0],)  # noqa: E731
    header(f"{kind}: B={B} T={T} d_in=d={D} {args.dtype}")
    with torch.no_grad():
        check(kind, ours(), theirs(), 2e-2)
    mine = timed(ours, [x] + params, args)
    try:
        base = timed(theirs, [x] + list(peer.parameters()), args)
        row(f"torch.nn.{kind.upper()} ({'cuDNN' if args.device.type == 'cuda' else 'CPU'})", *base)
    except RuntimeError as e:
        base = None
        skipped(f"torch.nn.{kind.upper()}", str(e).splitlines()[0][:80])
    for backend in args.flashrnn:
        try:
            from flashrnn.flashrnn import flashrnn
            gates = 4 if kind == "lstm" else 3
            Wx = leaf((B, T, gates, 1, D), args)
            R = leaf((gates, 1, D, D), args, scale=D ** -0.5)
            b = leaf((gates, 1, D), args)

            def flash(Wx=Wx, R=R, b=b, backend=backend):
                return (flashrnn(Wx, R, b, function=kind, backend=backend,
                                 dtype=str(args.dtype).split(".")[-1])[0],)
            row(f"FlashRNN {backend}", *timed(flash, [Wx, R, b], args), base=base)
        except Exception as e:  # not installed, or a backend that does not build for this GPU
            skipped(f"FlashRNN {backend}", f"{type(e).__name__}: {str(e).splitlines()[0][:60]}")
    row(f"rcc {kind}", *mine, base=base)


def bench_newton(args):
    """ParaGRU plan newton against plan sequential (both backend triton), float32, long T."""
    s = (SMOKE if args.smoke else SHAPES)["newton"]
    for D in ([4] if args.smoke else args.d):
        cls = {plan: rcc.compile(stdlib("pararnn_gru"), backend="triton", plan=plan)
               for plan in ("sequential", "newton")}
        seq = cls["sequential"](d_in=D, d=D).to(args.device, torch.float32)
        newton = cls["newton"](d_in=D, d=D).to(args.device, torch.float32)
        newton.load_state_dict(seq.state_dict())
        x = leaf((s["B"], s["T"], D), args).float().detach().requires_grad_()
        leaves = [x] + list(seq.parameters())
        header(f"newton: ParaGRU B={s['B']} T={s['T']} d={D} float32")
        base = timed(lambda: (seq(x)[0],), leaves, args)
        with torch.no_grad():
            want, got = seq(x)[0], newton(x)[0]
        row("rcc ParaGRU plan sequential", *base)
        mine = timed(lambda: (newton(x)[0],), [x] + list(newton.parameters()), args)
        why = differs((got,), (want,), 1e-3)
        stats = getattr(newton, "last_stats", {})
        row(f"rcc ParaGRU plan newton ({stats.get('iterations', '?')} iterations)", *mine,
            base=None if why else base)
        if why:
            skipped("rcc ParaGRU plan newton against it", why + ": no ratio")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=["gla", "delta_rule", "gated_delta_rule", "kda", "hgrn",
                                                 "lstm", "gru", "newton"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--d", type=int, nargs="*", default=[256, 1024], help="hidden sizes of lstm, gru, newton")
    p.add_argument("--flashrnn", nargs="*", default=["triton_fused", "cuda_fused"],
                   help="FlashRNN's backends to time (cuda_fused builds an extension: minutes)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU in Triton's interpreter (TRITON_INTERPRET=1): checks the script")
    args = p.parse_args()
    args.dtype = getattr(torch, args.dtype)
    if args.smoke:
        args.device, args.repeats, args.warmup, args.dtype = torch.device("cpu"), 1, 0, torch.float32
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (none found); --smoke runs tiny shapes on CPU")
    else:
        args.device = torch.device("cuda", 0)
    torch.manual_seed(0)
    print_machine(gpu=args.device if args.device.type == "cuda" else None)
    for name in args.only:
        if name in ("gla", "delta_rule", "gated_delta_rule", "kda"):
            bench_linear(args, name)
        elif name == "newton":
            bench_newton(args)
        elif name == "hgrn":
            bench_hgrn(args)
        elif name in ("lstm", "gru"):
            bench_rnn(args, name)
        else:
            sys.exit(f"unknown table {name!r}")


if __name__ == "__main__":
    main()
