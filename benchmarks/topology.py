"""Cells over grid2d and dag: rcc's level schedule (the wavefront on grids; backends torch and
cpp) and plan chunk (pLSTM's parallel form) against a Python loop over the nodes, the way one
writes a Tree-LSTM or an MDRNN by hand, measured side by side.

    python benchmarks/topology.py                # about 3 minutes on 2 idle cores
    python benchmarks/topology.py --quick        # smaller sizes, a smoke run
    python benchmarks/topology.py --device cuda  # on a GPU: backend triton's plan chunk too

Each rcc module is first checked against its loop (outputs, float32 tolerance). Printed: the
median milliseconds of the forward (no grad) and of forward + backward, the ratio loop / rcc,
the number of sequential steps each takes, and the time to build the schedule of a new graph
(networkx's topological generations and the index tensors; cached per graph afterwards).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import networkx as nx
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import rcc  # noqa: E402
from benchmarks.common import median_ms, print_machine  # noqa: E402
from rcc.runtime import graph as rt_graph  # noqa: E402

STDLIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "stdlib")


def mdrnn_loop(m, x):
    B, X, Y, _ = x.shape
    h, zero = {}, x.new_zeros(B, m.b.shape[0])
    # the input projection once, as the level schedule does; unbound per pixel, since indexing
    # wx[:, i, j] in the loop would make backward write a zero tensor of wx's size per pixel
    wx = [row.unbind(1) for row in (x @ m.W.T + m.b).unbind(1)]
    for i in range(X):
        for j in range(Y):
            h[i, j] = torch.tanh(wx[i][j] + h.get((i - 1, j), zero) @ m.U_0.T
                                 + h.get((i, j - 1), zero) @ m.U_1.T)
    return torch.stack([torch.stack([h[i, j] for j in range(Y)], 1) for i in range(X)], 1)


def plstm2d_loop(m, x):
    """The paper's node-by-node 2D reference (P-mode gates from the pixel)."""
    B, X, Y, _ = x.shape
    K, V = m.W_q.shape[0], m.W_v.shape[0]
    q, k, v = x @ m.W_q.T, x @ m.W_k.T, x @ m.W_v.T
    o = torch.sigmoid(x @ m.w_o + m.b_o)
    a = (o * torch.sigmoid(x @ m.w_t + m.b_t))[..., None, None]
    s = (o * torch.sigmoid(x @ m.w_s + m.b_s))[..., None, None]
    mark = torch.sigmoid(x @ m.w_m + m.b_m)[..., None]
    direct = torch.sigmoid(x @ m.w_d + m.b_d)[..., None]
    kv = k[..., :, None] * v[..., None, :]
    zero = x.new_zeros(B, K, V)
    # per pixel, unbound once (indexing in the loop would cost backward a full-size zero each)
    q, k, v, a, s, mark, direct, kv = ([row.unbind(1) for row in t.unbind(1)]
                                       for t in (q, k, v, a, s, mark, direct, kv))
    Cr, Cd, out = {}, {}, {}
    for i in range(X):
        for j in range(Y):
            cin = Cr.get((i - 1, j), zero) + Cd.get((i, j - 1), zero)
            Cr[i, j] = a[i][j] * cin + s[i][j] * kv[i][j]
            Cd[i, j] = (1 - a[i][j]) * cin + (1 - s[i][j]) * kv[i][j]
            out[i, j] = (mark[i][j] * torch.einsum("bk,bkv->bv", q[i][j], cin) + direct[i][j]
                         * (q[i][j] * k[i][j]).sum(-1, keepdim=True) * v[i][j]) / K ** 0.5
    return torch.stack([torch.stack([out[i, j] for j in range(Y)], 1) for i in range(X)], 1)


def child_sum_loop(m, x, order, preds):
    B, N, _ = x.shape
    d = m.U_f.shape[0]
    wx = (x @ m.W.T + m.b).unbind(1)  # per node, once (see mdrnn_loop)
    h, c, zero = [None] * N, [None] * N, x.new_zeros(B, 1, d)
    for v in order:
        ps = preds[v]
        hp = torch.stack([h[u] for u in ps], 1) if ps else zero
        cp = torch.stack([c[u] for u in ps], 1) if ps else zero
        wi, wo, wu, wf = wx[v].split(d, -1)
        ui, uo, uu = (hp.sum(1) @ m.U.T).split(d, -1)
        f = torch.sigmoid(wf[:, None] + hp @ m.U_f.T)
        c[v] = torch.sigmoid(wi + ui) * torch.tanh(wu + uu) + (f * cp).sum(1)
        h[v] = torch.sigmoid(wo + uo) * torch.tanh(c[v])
    return torch.stack(h, 1)


def random_dag(n, parents, seed):
    """Node v > 0 takes up to `parents` distinct random earlier nodes as predecessors."""
    g = torch.Generator().manual_seed(seed)
    src, tgt = [], []
    for v in range(1, n):
        for u in set(torch.randint(0, v, (parents,), generator=g).tolist()):
            src.append(u)
            tgt.append(v)
    return torch.tensor([src, tgt])


def bench(name, module_call, loop_call, steps, args):
    device = torch.device(args.device)
    with torch.no_grad():
        diff = (module_call() - loop_call()).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"{name}: rcc and the node loop differ by {diff:.2e}")
    row = [name]
    for fn in (module_call, loop_call):
        with torch.no_grad():
            row.append(median_ms(fn, device, args.warmup, args.repeats))
    for fn in (module_call, loop_call):
        row.append(median_ms(lambda: fn().sum().backward(), device, args.warmup, args.repeats))
    fwd, fwd_loop, both, both_loop = row[1:]
    print(f"| {name} | {steps} | {fwd:.1f} | {fwd_loop:.1f} | {fwd_loop / fwd:.1f}x | {both:.1f} "
          f"| {both_loop:.1f} | {both_loop / both:.1f}x | {diff:.1e} |", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu (backend cpp's rows) or cuda (backend "
                   "triton's plan chunk rows)")
    args = p.parse_args()
    torch.manual_seed(0)
    n_grid, n_dag = (16, 1000) if args.quick else (64, 10000)
    on_gpu = args.device.startswith("cuda")
    dev = torch.device(args.device)
    print_machine(dev if on_gpu else None)
    print("| case | steps rcc / loop | fwd rcc ms | fwd loop ms | loop/rcc | fwd+bwd rcc ms | "
          "fwd+bwd loop ms | loop/rcc | max diff |")
    print("|---|---|---|---|---|---|---|---|---|")

    mdrnn = rcc.compile(os.path.join(STDLIB, "mdrnn.rnn"))(d_in=32, d=32).to(dev)
    x = torch.randn(8, n_grid, n_grid, 32, device=dev, requires_grad=True)
    steps = f"{2 * n_grid - 1} / {n_grid * n_grid}"
    bench(f"MDRNN {n_grid}x{n_grid}, B=8, d=32", lambda: mdrnn(x)[0],
          lambda: mdrnn_loop(mdrnn, x), steps, args)
    if not on_gpu:
        mdrnn_cpp = rcc.compile(os.path.join(STDLIB, "mdrnn.rnn"), backend="cpp")(d_in=32, d=32)
        mdrnn_cpp.load_state_dict(mdrnn.state_dict())
        mdrnn_cpp._kernel().wait()  # the backward's build, not timed
        bench("the same, backend cpp", lambda: mdrnn_cpp(x)[0], lambda: mdrnn_loop(mdrnn, x),
              steps, args)

    plstm = rcc.compile(os.path.join(STDLIB, "plstm.rnn"), cell="PLSTM2DP")(
        d_in=32, K=16, V=16).to(dev)
    x = torch.randn(4, n_grid, n_grid, 32, device=dev, requires_grad=True)
    bench(f"pLSTM 2D P-mode {n_grid}x{n_grid}, B=4, K=V=16", lambda: plstm(x)[0],
          lambda: plstm2d_loop(plstm, x), steps, args)
    if not on_gpu:
        plstm_cpp = rcc.compile(os.path.join(STDLIB, "plstm.rnn"), cell="PLSTM2DP",
                                backend="cpp")(d_in=32, K=16, V=16)
        plstm_cpp.load_state_dict(plstm.state_dict())
        plstm_cpp._kernel().wait()
        bench("the same, backend cpp", lambda: plstm_cpp(x)[0], lambda: plstm2d_loop(plstm, x),
              steps, args)
    for backend in ("torch", "triton") if on_gpu else ("torch",):
        chunked = rcc.compile(os.path.join(STDLIB, "plstm.rnn"), cell="PLSTM2DP", plan="chunk",
                              backend=backend)(d_in=32, K=16, V=16).to(dev)
        chunked.load_state_dict(plstm.state_dict())
        for c in (4, 8):
            chunked.chunk_size = c
            n_chunks = -(-n_grid // c)
            bench(f"the same, plan chunk, {c}x{c} chunks" + ", backend triton" * (backend != "torch"),
                  lambda: chunked(x)[0], lambda: plstm2d_loop(plstm, x),
                  f"{2 * n_chunks - 1} / {n_grid * n_grid}", args)

    tree = rcc.compile(os.path.join(STDLIB, "treelstm.rnn"), cell="ChildSumTreeLSTM")(
        d_in=32, d=32).to(dev)
    ei = random_dag(n_dag, 2, seed=1)
    graph = nx.DiGraph(ei.T.tolist())
    graph.add_nodes_from(range(n_dag))
    order = list(nx.topological_sort(graph))
    preds = [[] for _ in range(n_dag)]
    for u, v in ei.T.tolist():
        preds[v].append(u)
    start = time.perf_counter()
    schedule = rt_graph.dag_schedule(ei, n_dag)
    build_ms = (time.perf_counter() - start) * 1e3
    x = torch.randn(4, n_dag, 32, device=dev, requires_grad=True)
    ei_dev = ei.to(dev)
    bench(f"Child-Sum Tree-LSTM, random DAG {n_dag} nodes {ei.shape[1]} edges, B=4, d=32",
          lambda: tree(x, edge_index=ei_dev)[0], lambda: child_sum_loop(tree, x, order, preds),
          f"{len(schedule.levels)} / {n_dag}", args)
    if on_gpu:
        print(f"\nschedule of the {n_dag}-node DAG built in {build_ms:.0f} ms")
        return
    tree_cpp = rcc.compile(os.path.join(STDLIB, "treelstm.rnn"), cell="ChildSumTreeLSTM",
                           backend="cpp")(d_in=32, d=32)
    tree_cpp.load_state_dict(tree.state_dict())
    tree_cpp._kernel().wait()
    bench("the same, backend cpp", lambda: tree_cpp(x, edge_index=ei)[0],
          lambda: child_sum_loop(tree, x, order, preds), f"{len(schedule.levels)} / {n_dag}", args)
    print(f"\nschedule of the {n_dag}-node DAG built in {build_ms:.0f} ms (once per graph; "
          f"cached afterwards)")


if __name__ == "__main__":
    main()
