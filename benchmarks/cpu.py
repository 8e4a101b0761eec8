"""Backend 'cpp' on CPU, side by side with what a user would otherwise run, in one process:

    python benchmarks/cpu.py                 # every table (about 3 minutes on 2 idle cores)
    python benchmarks/cpu.py --only lstm gru --repeats 3

- hgrn: the diagonal linear recurrence h' = exp(g) * h + x (B=8, T=4096, D=256, float32, no
  grad) against torch.add(x, g) over the same two tensors, the memory-bandwidth floor of any
  pass that reads both;
- lstm, gru: B=8, T=1024, d_in=d=128 against torch.nn.LSTM / GRU (forward under no_grad, and
  forward + backward), and the latency of one step (B=1, T=1, no grad) against
  torch.nn.LSTMCell / GRUCell;
- deltanet, gla: B=8, H=4, T=1024, K=V=64 against a naive torch recurrence written the way
  flash-linear-attention's reference implementations are (a Python loop over time on [B, H, T, K]);
- decode: calls of a few rows (B x T up to 64) without gradients, through the kernel's
  whole-step entry (input projections in the loop) and its hoisted one, against torch.nn.LSTM:
  where rcc.runtime.cpp.FEW_ROWS should sit;
- compile: the first build of the LSTM kernel in an empty cache (cold) and the next instance in
  a fresh process state (warm: found on disk).

Before timing, every rcc module is checked against its peer with copied weights (outputs and, for
fwd+bwd rows, gradients); the script stops on a mismatch. Ratios are rcc time / peer time (below
1 is faster); each time is the median of --repeats runs after --warmup runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import rcc  # noqa: E402
from common import median_ms, print_machine  # noqa: E402

CPU = torch.device("cpu")


def stdlib(name):
    return os.path.join(REPO, "stdlib", name + ".rnn")


def row(name, ms, base_ms):
    print(f"| {name:<44} | {ms:>10.3f} | {ms / base_ms:>6.2f}x |")


def header(title):
    print(f"\n{title}\n| {'implementation':<44} | {'ms':>10} | {'ratio':>7} |\n|{'-' * 46}|{'-' * 12}:|{'-' * 8}:|")


def check(name, got, want, tol):
    err = max((g - w).abs().max().item() for g, w in zip(got, want))
    scale = max(1.0, max(w.abs().max().item() for w in want))
    if err > tol * scale:
        sys.exit(f"{name}: rcc differs from its peer by {err:.3g}")
    return err


def grads(fn, inputs, params):
    """Outputs of fn and the gradients of their sum by inputs and params."""
    outs = fn()
    loss = sum(o.sum() for o in outs)
    return list(torch.autograd.grad(loss, inputs + params))


# ---- hgrn ----------------------------------------------------------------------------------------
def bench_hgrn(args):
    B, T, D = 8, 4096, 256
    m = rcc.compile(stdlib("hgrn"), backend="cpp")(d=D)
    x = torch.randn(B, T, D)
    g = -torch.nn.functional.softplus(torch.randn(B, T, D))
    with torch.no_grad():
        y, _ = m(x, g)
        h, want = torch.zeros(B, D), []
        for t in range(64):
            h = g[:, t].exp() * h + x[:, t]
            want.append(h)
        check("hgrn", [y[:, :64]], [torch.stack(want, 1)], 1e-5)
        t_add = median_ms(lambda: torch.add(x, g), CPU, args.warmup, args.repeats)
        t_rcc = median_ms(lambda: m(x, g), CPU, args.warmup, args.repeats)
    header(f"HGRN h' = exp(g) * h + x, B={B}, T={T}, D={D}, float32, no grad")
    row("torch.add(x, g) (bandwidth floor)", t_add, t_add)
    row("rcc cpp", t_rcc, t_add)


# ---- lstm / gru ----------------------------------------------------------------------------------
def bench_torch_rnn(args, kind):
    B, T, d = 8, 1024, 128
    peer = getattr(torch.nn, kind)(d, d, batch_first=True)
    m = rcc.from_torch(rcc.compile(stdlib(kind.lower()), backend="cpp")(d_in=d, d=d), peer)
    x = torch.randn(B, T, d, requires_grad=True)
    params = list(m.parameters())
    peer_params = [dict(peer.named_parameters())[n + "_l0"] for n, _ in m.named_parameters()]
    with torch.no_grad():
        check(kind, [m(x)[0]], [peer(x)[0]], 1e-4)
    check(kind + " grads", grads(lambda: [m(x)[0]], [x], params),
          grads(lambda: [peer(x)[0]], [x], peer_params), 1e-3)
    with torch.no_grad():
        f_peer = median_ms(lambda: peer(x), CPU, args.warmup, args.repeats)
        f_rcc = median_ms(lambda: m(x), CPU, args.warmup, args.repeats)
    b_peer = median_ms(lambda: grads(lambda: [peer(x)[0]], [x], peer_params), CPU, args.warmup,
                       args.repeats)
    b_rcc = median_ms(lambda: grads(lambda: [m(x)[0]], [x], params), CPU, args.warmup, args.repeats)
    header(f"{kind}, B={B}, T={T}, d_in=d={d}, float32: forward (no grad)")
    row(f"torch.nn.{kind}", f_peer, f_peer)
    row("rcc cpp", f_rcc, f_peer)
    header(f"{kind}, B={B}, T={T}, d_in=d={d}, float32: forward + backward")
    row(f"torch.nn.{kind}", b_peer, b_peer)
    row("rcc cpp", b_rcc, b_peer)

    # one step, B=1: the latency of a call, as in autoregressive decoding
    cell = getattr(torch.nn, kind + "Cell")(d, d)
    one = rcc.from_torch(rcc.compile(stdlib(kind.lower()), backend="cpp")(d_in=d, d=d), cell)
    x1 = torch.randn(1, 1, d)
    state = {s: torch.randn(1, d) for s in one.STATES}
    cell_state = (state["h"], state["c"]) if kind == "LSTM" else state["h"]
    with torch.no_grad():
        want = cell(x1[:, 0], cell_state)
        want = want[0] if kind == "LSTM" else want
        check(kind + "Cell", [one(x1, initial_state=state)[0][:, 0]], [want], 1e-5)
        reps = args.repeats * 200
        l_peer = median_ms(lambda: cell(x1[:, 0], cell_state), CPU, 50, reps)
        l_rcc = median_ms(lambda: one(x1, initial_state=state), CPU, 50, reps)
    header(f"{kind}, one step: B=1, T=1, d_in=d={d}, float32, no grad")
    row(f"torch.nn.{kind}Cell", l_peer, l_peer)
    row("rcc cpp", l_rcc, l_peer)


# ---- decode: few rows, the kernel's two entry points ------------------------------------------
def bench_decode(args):
    """Where the whole-step entry (input projections in the loop) stops paying: calls of B x T
    rows without gradients, each entry forced through rcc.runtime.cpp.FEW_ROWS."""
    from rcc.runtime import cpp
    d = 128
    peer = torch.nn.LSTM(d, d, batch_first=True)
    m = rcc.from_torch(rcc.compile(stdlib("lstm"), backend="cpp")(d_in=d, d=d), peer)
    header(f"LSTM, d_in=d={d}, float32, no grad: rows B x T per call (FEW_ROWS = {cpp.FEW_ROWS})")
    default = cpp.FEW_ROWS
    try:
        for B, T in ((1, 1), (1, 2), (1, 4), (2, 4), (1, 8), (4, 4), (1, 16), (8, 8)):
            x = torch.randn(B, T, d)
            times = {}
            with torch.no_grad():
                want = peer(x)[0]
                for entry, few in (("whole step", B * T), ("hoisted", 0)):
                    cpp.FEW_ROWS = few
                    check(f"decode {entry}", [m(x)[0]], [want], 1e-5)
                    times[entry] = median_ms(lambda: m(x), CPU, 20, args.repeats * 50)
                t_peer = median_ms(lambda: peer(x), CPU, 20, args.repeats * 50)
            row(f"B={B} T={T}: torch.nn.LSTM", t_peer, t_peer)
            for entry, ms in times.items():
                row(f"B={B} T={T}: rcc cpp, {entry} entry", ms, t_peer)
    finally:
        cpp.FEW_ROWS = default


# ---- deltanet / gla --------------------------------------------------------------------------------
def naive_gla(q, k, v, gk):
    """flash-linear-attention's reference form: [B, H, T, K] and a loop over t."""
    B, H, T, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1])
    o = torch.empty_like(v)
    for t in range(T):
        S = S * gk[:, :, t].exp()[..., None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        o[:, :, t] = ((q[:, :, t] * K ** -0.5)[..., None] * S).sum(-2)
    return o


def naive_deltanet(q, k, v, beta):
    B, H, T, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1])
    o = torch.empty_like(v)
    for t in range(T):
        k_t = k[:, :, t]
        u = beta[:, :, t, None] * (v[:, :, t] - (S * k_t[..., None]).sum(-2))
        S = S + k_t[..., None] * u[..., None, :]
        o[:, :, t] = torch.einsum("bhk,bhkv->bhv", q[:, :, t] * K ** -0.5, S)
    return o


def bench_linear_attention(args, name):
    B, H, T, K = 8, 4, 1024, 64
    m = rcc.compile(stdlib(name), backend="cpp")(K=K, V=K)
    q, k, v = (torch.randn(B, T, H, K) for _ in range(3))
    k = k / k.norm(dim=-1, keepdim=True)
    fourth = (-torch.nn.functional.softplus(torch.randn(B, T, H, K)) if name == "gla"
              else torch.sigmoid(torch.randn(B, T, H)))
    inputs = [t.requires_grad_() for t in (q, k, v, fourth)]
    naive = naive_gla if name == "gla" else naive_deltanet

    def peer():
        return [naive(*[t.transpose(1, 2) for t in inputs]).transpose(1, 2)]

    def ours():
        return [m(*inputs)[0]]
    with torch.no_grad():
        check(name, ours(), peer(), 1e-4)
    check(name + " grads", grads(ours, inputs, []), grads(peer, inputs, []), 1e-3)
    with torch.no_grad():
        f_peer = median_ms(peer, CPU, args.warmup, args.repeats)
        f_rcc = median_ms(ours, CPU, args.warmup, args.repeats)
    b_peer = median_ms(lambda: grads(peer, inputs, []), CPU, args.warmup, args.repeats)
    b_rcc = median_ms(lambda: grads(ours, inputs, []), CPU, args.warmup, args.repeats)
    title = {"gla": "GLA", "deltanet": "DeltaNet"}[name]
    header(f"{title}, B={B}, H={H}, T={T}, K=V={K}, float32: forward (no grad)")
    row("naive torch recurrence (fla's reference form)", f_peer, f_peer)
    row("rcc cpp", f_rcc, f_peer)
    header(f"{title}, B={B}, H={H}, T={T}, K=V={K}, float32: forward + backward")
    row("naive torch recurrence (fla's reference form)", b_peer, b_peer)
    row("rcc cpp", b_rcc, b_peer)


# ---- compile time ------------------------------------------------------------------------------
def bench_compile(args):
    from rcc.runtime import cpp
    cls = rcc.compile(stdlib("lstm"), backend="cpp")
    old = os.environ.get("RCC_CACHE_DIR")
    os.environ["RCC_CACHE_DIR"] = tempfile.mkdtemp(prefix="rcc-bench-")
    try:
        cpp._BY_SOURCE.clear()
        start = time.perf_counter()
        m = cls(d_in=128, d=128)
        cold = time.perf_counter() - start  # the forward is built: the module runs
        x = torch.randn(1, 1, 128, requires_grad=True)
        m(x)  # a call that needs the backward starts its build
        m._kernel().wait()
        cold_backward = time.perf_counter() - start  # and the backward, built meanwhile
        cpp._BY_SOURCE.clear()  # as a new process would: only the disk cache is left
        start = time.perf_counter()
        m = cls(d_in=128, d=128)
        m(x)
        m._kernel().wait()
        warm = time.perf_counter() - start
    finally:
        if old is None:
            del os.environ["RCC_CACHE_DIR"]
        else:
            os.environ["RCC_CACHE_DIR"] = old
    print(f"\nCompile (LSTM kernel, {cpp.compiler()} {' '.join(cpp.FLAGS)}): cold {cold:.2f} s to a "
          f"module that runs forward, {cold_backward:.2f} s until its backward is built too (in the "
          f"background, from the first call with gradients); warm (cached, both) {warm * 1e3:.1f} ms")


BENCHES = {"hgrn": bench_hgrn, "lstm": lambda a: bench_torch_rnn(a, "LSTM"),
           "gru": lambda a: bench_torch_rnn(a, "GRU"),
           "deltanet": lambda a: bench_linear_attention(a, "deltanet"),
           "gla": lambda a: bench_linear_attention(a, "gla"), "decode": bench_decode,
           "compile": bench_compile}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), default=list(BENCHES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print_machine()
    for name in args.only:
        BENCHES[name](args)


if __name__ == "__main__":
    main()
