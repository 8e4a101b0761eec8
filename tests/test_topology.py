"""Cells over dag and grid2d (LANGUAGE.md section 8) against node-by-node loops written here from
the papers' equations, forward and backward in float64."""
import networkx as nx
import pytest
import torch

import rcc
from conftest import stdlib



@pytest.fixture(autouse=True)
def float64():
    """Every tensor and module of these tests in float64 (restored after each test)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def grads(y, leaves):
    return torch.autograd.grad(y, leaves, retain_graph=True, allow_unused=True)


def assert_same(out, ref, leaves, tol=1e-11):
    """Forward values and the gradients of a random projection agree."""
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    w = torch.randn_like(ref)
    for a, b, leaf in zip(grads((out * w).sum(), leaves), grads((ref * w).sum(), leaves), leaves):
        # None (autograd: unused) and zeros (a kernel's gradient of an input it did not need)
        # say the same
        a, b = (torch.zeros_like(leaf) if g is None else g for g in (a, b))
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def random_dag(n, p, seed):
    """Edges i -> j (i < j) with probability p, in random order: several sources and sinks,
    some nodes isolated."""
    g = torch.Generator().manual_seed(seed)
    edges = [(i, j) for i in range(n) for j in range(i + 1, n) if torch.rand(1, generator=g) < p]
    perm = torch.randperm(len(edges), generator=g).tolist()
    return [edges[k] for k in perm]


def topo_order(n, edges):
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    g.add_edges_from(edges)
    return list(nx.topological_sort(g))


def predecessors(v, edges):
    """The sources of v's incoming edges, in edge_index order (their slots)."""
    return [u for u, w in edges if w == v]


def grid_edges(X, Y):
    """The grid as a DAG: (i-1, j) -> (i, j) and (i, j-1) -> (i, j), node i * Y + j."""
    edges = []
    for i in range(X):
        for j in range(Y):
            if i > 0:
                edges.append(((i - 1) * Y + j, i * Y + j))
            if j > 0:
                edges.append((i * Y + j - 1, i * Y + j))
    return edges


# ---- Tree-LSTMs (Tai et al. 2015) -------------------------------------------------------------
def child_sum_loop(m, x, edges):
    B, N, _ = x.shape
    d = m.U_f.shape[0]
    W, U, Uf, b = m.W, m.U, m.U_f, m.b
    h, c = {}, {}
    for v in topo_order(N, edges):
        kids = predecessors(v, edges)
        hk = [h[u] for u in kids] or [torch.zeros(B, d)]
        ck = [c[u] for u in kids] or [torch.zeros(B, d)]
        wi, wo, wu, wf = (x[:, v] @ W.T + b).split(d, -1)
        ui, uo, uu = (sum(hk) @ U.T).split(d, -1)
        c[v] = torch.sigmoid(wi + ui) * torch.tanh(wu + uu) + sum(
            torch.sigmoid(wf + a @ Uf.T) * cc for a, cc in zip(hk, ck))
        h[v] = torch.sigmoid(wo + uo) * torch.tanh(c[v])
    return torch.stack([h[v] for v in range(N)], 1), torch.stack([c[v] for v in range(N)], 1)


BACKENDS = ["torch", "cpp"]  # cpp: the level schedule in one C++ kernel (backends/cpp/graph.py)
# cells over grid2d that are affine in their states also run on backend triton (plan chunk: the
# solve in Triton kernels, in the interpreter here)
GRID_BACKENDS = BACKENDS + ["triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("graph", ["tree", "random_dag", "no_edges", "one_node"])
def test_child_sum_tree_lstm_matches_node_loop(graph, backend):
    torch.manual_seed(0)
    if graph == "tree":  # children -> parent; node 0 the root
        edges, N = [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 2), (7, 6)], 8
    elif graph == "random_dag":  # sources, sinks and isolated nodes
        # sources 0, 1, 2; sinks 8, 9, 10; 11 and 12 isolated; edges not in topological order
        N = 13
        edges = [(6, 8), (0, 3), (4, 7), (1, 3), (7, 10), (1, 4), (2, 5), (3, 6), (4, 6),
                 (5, 7), (3, 8), (0, 9), (2, 10)]
    elif graph == "no_edges":
        edges, N = [], 4
    else:
        edges, N = [], 1
    m = rcc.compile(stdlib("treelstm.rnn"), cell="ChildSumTreeLSTM", backend=backend)(
        d_in=3, d=5).double()
    with torch.no_grad():
        m.b.normal_()
    x = torch.randn(2, N, 3, requires_grad=True)
    ei = torch.tensor(edges, dtype=torch.long).reshape(-1, 2).T
    y, final = m(x, edge_index=ei)
    h, c = child_sum_loop(m, x, edges)
    assert_same(y, h, [x, m.W, m.U, m.U_f, m.b])
    torch.testing.assert_close(final["c"], c)
    torch.testing.assert_close(final["h"], h)


@pytest.mark.parametrize("backend", BACKENDS)
def test_heads_and_batch_of_one_shared_graph(backend):
    """[B, N, *heads, d_in]: the heads are independent rows over the same graph."""
    torch.manual_seed(1)
    edges = random_dag(9, 0.3, seed=5)
    m = rcc.compile(stdlib("treelstm.rnn"), cell="ChildSumTreeLSTM", backend=backend)(
        d_in=2, d=3).double()
    x = torch.randn(2, 9, 3, 2, requires_grad=True)  # 3 heads
    y, final = m(x, edge_index=torch.tensor(edges).T)
    assert y.shape == (2, 9, 3, 3) and final["c"].shape == (2, 9, 3, 3)
    for head in range(3):
        ref, _ = child_sum_loop(m, x[:, :, head], edges)
        assert_same(y[:, :, head], ref, [x, m.W])


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_union_of_graphs_equals_separate_runs(backend):
    """B = 1 with the nodes of two graphs concatenated (as PyTorch Geometric batches graphs)."""
    torch.manual_seed(2)
    m = rcc.compile(stdlib("treelstm.rnn"), cell="ChildSumTreeLSTM", backend=backend)(
        d_in=2, d=3).double()
    e1, e2 = random_dag(6, 0.4, seed=1), random_dag(5, 0.5, seed=2)
    x1, x2 = torch.randn(1, 6, 2), torch.randn(1, 5, 2)
    union = e1 + [(u + 6, w + 6) for u, w in e2]
    y, _ = m(torch.cat([x1, x2], 1), edge_index=torch.tensor(union).T)
    y1, _ = m(x1, edge_index=torch.tensor(e1).T)
    y2, _ = m(x2, edge_index=torch.tensor(e2).T)
    torch.testing.assert_close(y, torch.cat([y1, y2], 1))


def nary_loop(m, x, edges, n_ary=2):
    B, N, _ = x.shape
    d = m.U_f.shape[1]
    h, c = {}, {}
    zero = torch.zeros(B, d)
    for v in topo_order(N, edges):
        kids = predecessors(v, edges)
        hk = [h[u] for u in kids] + [zero] * (n_ary - len(kids))
        ck = [c[u] for u in kids] + [zero] * (n_ary - len(kids))
        wi, wo, wu, wf = (x[:, v] @ m.W.T + m.b).split(d, -1)
        ui, uo, uu = sum(hk[l] @ m.U[l].T for l in range(n_ary)).split(d, -1)
        cv = torch.sigmoid(wi + ui) * torch.tanh(wu + uu)
        for k in range(n_ary):
            f = wf + sum(hk[l] @ m.U_f[(k * n_ary + l) * d:(k * n_ary + l + 1) * d].T
                         for l in range(n_ary))
            cv = cv + torch.sigmoid(f) * ck[k]
        c[v], h[v] = cv, torch.sigmoid(wo + uo) * torch.tanh(cv)
    return torch.stack([h[v] for v in range(N)], 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nary_tree_lstm_matches_node_loop(backend):
    """A binary tree; node 4 has one child (its second slot reads zeros), leaves none."""
    torch.manual_seed(3)
    edges = [(1, 0), (2, 0), (3, 1), (5, 1), (6, 4), (4, 2), (7, 3), (8, 3)]
    m = rcc.compile(stdlib("treelstm.rnn"), cell="NaryTreeLSTM", backend=backend)(
        d_in=3, d=4).double()
    x = torch.randn(2, 9, 3, requires_grad=True)
    y, _ = m(x, edge_index=torch.tensor(edges).T)
    assert_same(y, nary_loop(m, x, edges), [x, m.W, m.U, m.U_f])


# ---- 2D: MDRNN (Graves et al. 2007) ----------------------------------------------------------
def mdrnn_loop(m, x):
    B, X, Y, _ = x.shape
    d = m.b.shape[0]
    h = {}
    for i in range(X):
        for j in range(Y):
            up = h.get((i - 1, j), torch.zeros(B, d))
            left = h.get((i, j - 1), torch.zeros(B, d))
            h[i, j] = torch.tanh(x[:, i, j] @ m.W.T + up @ m.U_0.T + left @ m.U_1.T + m.b)
    return torch.stack([torch.stack([h[i, j] for j in range(Y)], 1) for i in range(X)], 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("X, Y", [(1, 1), (3, 5), (4, 1), (1, 6), (7, 6)])
def test_mdrnn_matches_node_loop_on_odd_grids(X, Y, backend):
    torch.manual_seed(4)
    m = rcc.compile(stdlib("mdrnn.rnn"), backend=backend)(d_in=3, d=4).double()
    with torch.no_grad():
        m.b.normal_()
    x = torch.randn(2, X, Y, 3, requires_grad=True)
    y, final = m(x)
    ref = mdrnn_loop(m, x)
    assert_same(y, ref, [x, m.W, m.U_0, m.U_1, m.b])
    torch.testing.assert_close(final["h"], ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grid_equals_the_same_cell_over_the_grid_dag(backend):
    """A cell that reads its predecessors symmetrically gives the same numbers over grid2d and
    over dag with the grid's edges."""
    body = """
        input x[d]
        param U[d, d]
        state h[d]
        h' = tanh(x + sum_pred(U @ h) + max_pred(h) - mean_pred(sigmoid(h)))
        output h'
    }"""
    grid = rcc.compile("cell G(d) over grid2d {" + body, backend=backend)(d=3).double()
    dag = rcc.compile("cell G(d) over dag {" + body, backend=backend)(d=3).double()
    dag.load_state_dict(grid.state_dict())
    x = torch.randn(2, 5, 4, 3, requires_grad=True)
    y, _ = grid(x)
    y_dag, _ = dag(x.reshape(2, 20, 3), edge_index=torch.tensor(grid_edges(5, 4)).T)
    assert_same(y.reshape(2, 20, 3), y_dag, [x])
    w = torch.randn_like(y_dag)
    torch.testing.assert_close(grads((y.reshape(2, 20, 3) * w).sum(), [grid.U])[0],
                               grads((y_dag * w).sum(), [dag.U])[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_and_max_pred_match_node_loop(backend):
    src = """cell Agg(d) over dag {
        input x[d]
        state h[d] = 0.5
        h' = tanh(x + mean_pred(h * x) - max_pred(h))
        output h'
    }"""
    m = rcc.compile(src, backend=backend)(d=3)
    # nodes 0 and 1 have equal inputs, hence equal states: node 10's max_pred has a tie, whose
    # gradient splits evenly between the two (as torch's amax)
    edges = random_dag(10, 0.3, seed=7) + [(0, 10), (1, 10)]
    x = torch.randn(2, 11, 3)
    x[:, 1] = x[:, 0]
    x.requires_grad_()
    h0 = torch.randn(2, 3, requires_grad=True)
    y, _ = m(x, edge_index=torch.tensor(edges).T, initial_state={"h": h0})
    h = {}
    for v in topo_order(11, edges):
        hp = [h[u] for u in predecessors(v, edges)] or [h0]  # no predecessor: the initial state
        mean = sum(a * x[:, v] for a in hp) / len(hp)
        h[v] = torch.tanh(x[:, v] + mean - torch.stack(hp).amax(0))
    assert_same(y, torch.stack([h[v] for v in range(11)], 1), [x, h0])


# ---- pLSTM (Poeppel et al. 2025) -------------------------------------------------------------
def plstm_graph_loop(q, k, v, S, T, M, D, edges, N):
    """The paper's graph recurrence, edge by edge: C_e for e = (u -> w) is
    sum_{p into u} T_u[slot_out(e), slot_in(p)] C_p + S_u[slot_out(e)] k_u v_u^T, and
    y_w = sum_{e into w} M_w[slot_in(e)] q_w^T C_e + D_w (q_w . k_w) v_w."""
    B, _, K = q.shape
    C = {}
    y = [None] * N
    for u in topo_order(N, edges):
        ins = [e for e, (a, w) in enumerate(edges) if w == u]
        outs = [e for e, (a, w) in enumerate(edges) if a == u]
        in_slot = {e: r for r, e in enumerate(ins)}
        kv = k[:, u, :, None] * v[:, u, None, :]
        for o, e in enumerate(outs):
            acc = S[:, u, o, None, None] * kv
            for p in ins:
                acc = acc + T[:, u, o, in_slot[p], None, None] * C[p]
            C[e] = acc
        out = D[:, u, None] * (q[:, u] * k[:, u]).sum(-1, keepdim=True) * v[:, u]
        for p in ins:
            out = out + M[:, u, in_slot[p], None] * torch.einsum("bk,bkv->bv", q[:, u], C[p])
        y[u] = out
    return torch.stack(y, 1), C


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["P", "D"])
def test_plstm_graph_matches_edge_loop(mode, backend):
    torch.manual_seed(5)
    N, K, V, P = 11, 3, 2, 6
    edges = random_dag(N, 0.3, seed=11)
    m = rcc.compile(stdlib("plstm.rnn"), cell=f"PLSTMGraph{mode}", backend=backend)(K=K, V=V, P=P)
    q, k = torch.randn(2, N, K, requires_grad=True), torch.randn(2, N, K)
    v = torch.randn(2, N, V)
    s, t = torch.randn(2, N, P), torch.randn(2, N, P, P, requires_grad=True)
    mk, d = torch.randn(2, N, P), torch.randn(2, N)
    y, final = m(q, k, v, s, t, mk, d, edge_index=torch.tensor(edges).T)
    # the stabilisation, from the paper's reference layer
    T = t / (0.5 + t.abs().sum(2, keepdim=True)) if mode == "P" else torch.tanh(t)
    ref, C = plstm_graph_loop(q, k, v, torch.sigmoid(s), T, torch.sigmoid(mk),
                              torch.sigmoid(d), edges, N)
    assert_same(y, ref, [q, t])
    if edges:
        torch.testing.assert_close(final["C"], torch.stack([C[e] for e in range(len(edges))], 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plstm_graph_too_many_edges_for_the_slots(backend):
    m = rcc.compile(stdlib("plstm.rnn"), cell="PLSTMGraphP", backend=backend)(K=2, V=2, P=2)
    edges = torch.tensor([[0, 1, 2], [3, 3, 3]])  # node 3 has three incoming edges
    args = [torch.randn(1, 4, *s) for s in ((2,), (2,), (2,), (2,), (2, 2), (2,), ())]
    with pytest.raises(ValueError, match="a node has 3 incoming edges, but the axis indexed by "
                                         "in_slot at line 21 has 2 slots"):
        m(*args, edge_index=edges)


def plstm2d_loop(q, k, v, T, S, M, D, scale):
    """The paper's 2D node-by-node reference: node (x, y) holds C^r (edge to (x+1, y)) and C^d
    (edge to (x, y+1)); cl = C^r[x-1, y], cu = C^d[x, y-1] (zero outside);
    C^r = T_rl cl + T_ru cu + S_r k v^T, C^d = T_du cu + T_dl cl + S_d k v^T,
    y = (q^T (M_l cl + M_u cu) + D (q . k) v) * scale. Gates: dicts of [B, X, Y] tensors."""
    B, X, Y, K = q.shape
    V = v.shape[-1]
    zero = torch.zeros(B, K, V)
    Cr, Cd, out = {}, {}, {}
    for x in range(X):
        for y in range(Y):
            cl, cu = Cr.get((x - 1, y), zero), Cd.get((x, y - 1), zero)

            def g(name):
                return T[name][:, x, y, None, None] if name in T else S[name][:, x, y, None, None]
            kv = k[:, x, y, :, None] * v[:, x, y, None, :]
            Cr[x, y] = g("rl") * cl + g("ru") * cu + g("r") * kv
            Cd[x, y] = g("du") * cu + g("dl") * cl + g("d") * kv
            read = M["l"][:, x, y, None, None] * cl + M["u"][:, x, y, None, None] * cu
            out[x, y] = (torch.einsum("bk,bkv->bv", q[:, x, y], read) + D[:, x, y, None]
                         * (q[:, x, y] * k[:, x, y]).sum(-1, keepdim=True) * v[:, x, y]) * scale
    y = torch.stack([torch.stack([out[i, j] for j in range(Y)], 1) for i in range(X)], 1)
    C = torch.stack([torch.stack([torch.stack([Cr[i, j], Cd[i, j]], 1) for j in range(Y)], 1)
                     for i in range(X)], 1)
    return y, C


def randomize(m):
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.7)


@pytest.mark.parametrize("backend", GRID_BACKENDS)
@pytest.mark.parametrize("X, Y", [(1, 1), (3, 4), (5, 2)])
def test_plstm2d_p_mode_matches_paper_loop(X, Y, backend):
    torch.manual_seed(6)
    K, V = 3, 2
    m = rcc.compile(stdlib("plstm.rnn"), cell="PLSTM2DP", backend=backend)(d_in=4, K=K, V=V)
    randomize(m)
    x = torch.randn(2, X, Y, 4, requires_grad=True)
    y, final = m(x)
    q, k, v = x @ m.W_q.T, x @ m.W_k.T, x @ m.W_v.T
    o = torch.sigmoid(x @ m.w_o + m.b_o)
    t = torch.sigmoid(x @ m.w_t + m.b_t)
    src = o * torch.sigmoid(x @ m.w_s + m.b_s)
    mark = torch.sigmoid(x @ m.w_m + m.b_m)
    # P-mode (the reference layer): T_rl = T_ru = o t, T_dl = T_du = 1 - o t, S_d = 1 - S_r
    T = {"rl": o * t, "ru": o * t, "dl": 1 - o * t, "du": 1 - o * t}
    S = {"r": src, "d": 1 - src}
    ref, C = plstm2d_loop(q, k, v, T, S, {"l": mark, "u": mark},
                          torch.sigmoid(x @ m.w_d + m.b_d), K ** -0.5)
    assert_same(y, ref, [x] + list(m.parameters()))
    torch.testing.assert_close(final["C"], C)


@pytest.mark.parametrize("backend", GRID_BACKENDS)
def test_plstm2d_d_mode_matches_paper_loop(backend):
    torch.manual_seed(7)
    K, V, X, Y = 2, 3, 4, 5
    m = rcc.compile(stdlib("plstm.rnn"), cell="PLSTM2DD", backend=backend)(d_in=3, K=K, V=V)
    randomize(m)
    x = torch.randn(2, X, Y, 3, requires_grad=True)
    y, _ = m(x)
    q, k, v = x @ m.W_q.T, x @ m.W_k.T, x @ m.W_v.T
    t = torch.tanh(x @ m.W_t.T + m.b_t)
    s = torch.sigmoid(x @ m.W_s.T + m.b_s)
    mk = torch.sigmoid(x @ m.W_m.T + m.b_m)
    # chirality L: T_ru is the shared cross transition, T_dl = 0
    T = {"rl": t[..., 0], "ru": t[..., 1], "dl": torch.zeros_like(t[..., 0]), "du": t[..., 2]}
    ref, _ = plstm2d_loop(q, k, v, T, {"r": s[..., 0], "d": s[..., 1]},
                          {"l": mk[..., 0], "u": mk[..., 1]},
                          torch.sigmoid(x @ m.w_d + m.b_d), K ** -0.5)
    assert_same(y, ref, [x] + list(m.parameters()))


def test_plstm1d_matches_loop():
    torch.manual_seed(8)
    m = rcc.compile(stdlib("plstm.rnn"), cell="PLSTM1D")(K=3, V=2)
    B, T = 2, 7
    q, k, v = torch.randn(B, T, 3, requires_grad=True), torch.randn(B, T, 3), torch.randn(B, T, 2)
    s, t, mk, d = (torch.randn(B, T) for _ in range(4))
    y, _ = m(q, k, v, s, t, mk, d)
    C, ys = torch.zeros(B, 3, 2), []
    for i in range(T):
        read = torch.sigmoid(mk[:, i, None]) * torch.einsum("bk,bkv->bv", q[:, i], C)
        ys.append((read + torch.sigmoid(d[:, i, None]) * (q[:, i] * k[:, i]).sum(-1, keepdim=True)
                   * v[:, i]) / 3 ** 0.5)
        C = torch.tanh(t[:, i, None, None]) * C + torch.sigmoid(s[:, i, None, None]) * (
            k[:, i, :, None] * v[:, i, None, :])
    assert_same(y, torch.stack(ys, 1), [q])


GRID_CORE = """cell Core(P = 2) over {topology} {{
    input kv, source[P], transition[P, P], mark[P]
    state C over edges
    C' = sum_pred(transition[out_slot, in_slot] * C) + source[out_slot] * kv
    output y = sum_pred(mark[in_slot] * C)
}}"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_plstm_grid_equals_the_grid_dag_with_its_slots_remapped(backend):
    """pLSTM on grid2d equals pLSTM on the grid written as a DAG (the paper's line-graph view):
    a DAG's slots are edge ranks, so at the borders the gates move to other slots."""
    torch.manual_seed(9)
    X, Y = 4, 3
    grid = rcc.compile(GRID_CORE.format(topology="grid2d"), backend=backend)()
    dag = rcc.compile(GRID_CORE.format(topology="dag"), backend=backend)()
    kv = torch.randn(2, X, Y, requires_grad=True)
    S, T, M = torch.randn(2, X, Y, 2), torch.randn(2, X, Y, 2, 2), torch.randn(2, X, Y, 2)
    y, _ = grid(kv, S, T, M)
    edges = grid_edges(X, Y)
    in_dir, out_dir = {}, {}  # node -> the grid slot of each DAG slot
    for u, w in edges:
        direction = 0 if w - u == Y else 1
        in_dir.setdefault(w, []).append(direction)
        out_dir.setdefault(u, []).append(direction)
    n = X * Y
    Sd, Td, Md = S.reshape(2, n, 2).clone(), T.reshape(2, n, 2, 2).clone(), M.reshape(2, n, 2).clone()
    for node in range(n):
        ins = in_dir.get(node, [0]) + [1, 0][:2 - len(in_dir.get(node, [0]))]
        outs = out_dir.get(node, [0]) + [1, 0][:2 - len(out_dir.get(node, [0]))]
        if len(set(ins)) < 2:
            ins = [ins[0], 1 - ins[0]]
        if len(set(outs)) < 2:
            outs = [outs[0], 1 - outs[0]]
        Sd[:, node] = S.reshape(2, n, 2)[:, node][:, outs]
        Md[:, node] = M.reshape(2, n, 2)[:, node][:, ins]
        Td[:, node] = T.reshape(2, n, 2, 2)[:, node][:, outs][:, :, ins]
    y_dag, _ = dag(kv.reshape(2, n), Sd, Td, Md, edge_index=torch.tensor(edges).T)
    assert_same(y.reshape(2, n), y_dag, [kv])


@pytest.mark.parametrize("backend", GRID_BACKENDS)
def test_plstm_p_mode_carries_a_source_across_a_64x64_grid(backend):
    """P-mode (each incoming edge passes on exactly what it holds, split by an orientation)
    conserves the mass of a source at (0, 0): the outgoing edges of each of the first 64
    anti-diagonals hold exactly 1, and all of it leaves the grid through its far borders after
    up to 126 steps, neither exploding nor vanishing; the unstabilised transitions 0.9 / 0.9 grow
    as 1.8^n."""
    torch.manual_seed(10)
    n = 64
    grid = rcc.compile(GRID_CORE.format(topology="grid2d"), backend=backend)()
    kv = torch.zeros(1, n, n)
    kv[0, 0, 0] = 1.0
    o = torch.rand(1, n, n)  # a random orientation per pixel
    S = torch.stack([o, 1 - o], -1)
    T = torch.stack([torch.stack([o, o], -1), torch.stack([1 - o, 1 - o], -1)], -2)  # T[out, in]
    _, final = grid(kv, S, T, torch.ones(1, n, n, 2))
    C = final["C"][0]  # [X, Y, 2]: the edges leaving each pixel
    diag = torch.zeros(2 * n - 1).index_add_(
        0, (torch.arange(n)[:, None] + torch.arange(n)).flatten(), C.sum(-1).flatten())
    torch.testing.assert_close(diag[:n], torch.ones(n))
    torch.testing.assert_close(C[n - 1, :, 0].sum() + C[:, n - 1, 1].sum(), torch.tensor(1.0))
    _, loose = grid(kv, torch.full((1, n, n, 2), 0.5), torch.full((1, n, n, 2, 2), 0.9),
                    torch.ones(1, n, n, 2))
    assert loose["C"][0, 20, 20].sum() > 1e3  # without the stabilisation: 1.8^40 / C(40, 20)-ish


@pytest.mark.parametrize("backend", GRID_BACKENDS)
def test_plstm2d_long_range_gradient_on_64x64(backend):
    """The far corner's output depends on the first pixel: the gradient is finite and not
    vanishing (P-mode splits the state over the paths, 2^-126 C(126, 63) ~ 0.07 reach the
    corner, where a product of 126 gates of 1/2 would give 1e-38)."""
    torch.manual_seed(11)
    m = rcc.compile(stdlib("plstm.rnn"), cell="PLSTM2DP", backend=backend)(d_in=4, K=2, V=2)
    x = torch.randn(1, 64, 64, 4, requires_grad=True)
    y, _ = m(x)
    (g,) = torch.autograd.grad(y[0, 63, 63].sum(), [x])
    assert torch.isfinite(g).all()
    assert g[0, 0, 0].abs().max() > 1e-7


# ---- graphs given at call time ----------------------------------------------------------------
def test_cycle_is_a_value_error_naming_it():
    m = rcc.compile(stdlib("treelstm.rnn"), cell="ChildSumTreeLSTM")(d_in=2, d=2)
    with pytest.raises(ValueError, match=r"edge_index has a cycle \((1 -> 2 -> 3 -> 1|2 -> 3 -> "
                                         r"1 -> 2|3 -> 1 -> 2 -> 3)\)"):
        m(torch.randn(1, 4, 2), edge_index=torch.tensor([[0, 1, 2, 3], [1, 2, 3, 1]]))
    with pytest.raises(ValueError, match=r"cycle \(0 -> 0\)"):
        m(torch.randn(1, 4, 2), edge_index=torch.tensor([[0], [0]]))


@pytest.mark.parametrize("edge_index, error, words", [
    (None, TypeError, "pass the graph as edge_index=[2, E]"),
    (torch.tensor([[0, 1, 2]]), ValueError, "expected [2, E]"),
    (torch.tensor([[0], [5]]), ValueError, "names node 5, but the inputs have 3 nodes"),
    (torch.tensor([[0.0], [1.0]]), TypeError, "must hold integers"),
])
def test_bad_edge_index(edge_index, error, words):
    m = rcc.compile(stdlib("treelstm.rnn"), cell="ChildSumTreeLSTM")(d_in=2, d=2)
    with pytest.raises(error) as info:
        m(torch.randn(1, 3, 2), edge_index=edge_index)
    assert words in str(info.value)


def test_grid_inputs_are_checked():
    m = rcc.compile(stdlib("mdrnn.rnn"))(d_in=2, d=3)
    with pytest.raises(ValueError, match=r"expects \[B, X, Y, \*heads, 2\]"):
        m(torch.randn(3, 2))
    with pytest.raises(TypeError, match="takes no edge_index"):
        m(torch.randn(1, 2, 2, 2), edge_index=torch.zeros(2, 0, dtype=torch.long))


def test_level_schedule_is_the_wavefront_on_grids():
    from rcc.runtime.graph import dag_schedule, grid_schedule

    s = grid_schedule(64, 64)
    assert len(s.levels) == 127 and max(lv.n_nodes for lv in s.levels) == 64
    edges = random_dag(40, 0.1, seed=4)
    s = dag_schedule(torch.tensor(edges).T, 40)
    level = {}
    for L, lv in enumerate(s.levels):
        for v in lv.seq_node.tolist():
            level[v] = L
    assert len(level) == 40
    assert all(level[u] < level[w] for u, w in edges)
    generations = list(nx.topological_generations(nx.DiGraph(edges)))
    assert len(s.levels) == len(generations) if edges else True


@pytest.mark.parametrize("body, line, col, words", [
    ("input x[2]\nstate h\noutput y = x[out_slot]", 4, 12,
     "output 'y' reads out_slot, so it has one value per outgoing edge"),
    ("input x[2]\nstate h\noutput y = sum_pred(h) * x[in_slot]", 4, 32,
     "in_slot is the slot of an incoming edge"),
    ("input x[2]\nstate h\noutput y = in_slot", 4, 16, "'in_slot' is an edge slot"),
    ("input x\nstate h over edges\nh' = x\noutput y = sum_pred(h)", 3, 13, ""),
    ("input x[2]\nstate h\nh' = x[out_slot]\noutput y = sum_pred(h)", 4, 12,
     "reads out_slot, so it has one value per outgoing edge; declare it 'state h[...] over edges'"),
    ("input x\nstate h over trees\noutput y = x", 3, 18, "a state lives over 'edges' or 'nodes'"),
    ("input x over edges\noutput y = x", 2, 18, "only states live on edges"),
])
def test_graph_errors(body, line, col, words):
    src = "cell C() over dag {\n" + "\n".join("    " + s for s in body.split("\n")) + "\n}\n"
    if not words:  # this one is fine: an edge state that every outgoing edge takes from x
        rcc.compile(src)
        return
    with pytest.raises(rcc.CompileError) as info:
        rcc.compile(src)
    assert (info.value.line, info.value.col) == (line, col), str(info.value)
    assert words in info.value.message


def test_edge_state_over_seq_is_an_error():
    with pytest.raises(rcc.CompileError, match="lives on edges, but cell 'C' runs over seq"):
        rcc.compile("cell C() {\n    input x\n    state h over edges\n    output y = x\n}\n")


def test_cpp_levels_in_float32_and_without_gradients():
    """backend cpp in float32 against the torch levels, with and without autograd recording,
    on a batch of 3 (blocks of rows) over a random DAG."""
    torch.manual_seed(6)
    edges = torch.tensor(random_dag(12, 0.3, seed=3)).T
    ref = rcc.compile(stdlib("treelstm.rnn"), cell="ChildSumTreeLSTM")(d_in=4, d=8).float()
    mod = rcc.compile(stdlib("treelstm.rnn"), cell="ChildSumTreeLSTM", backend="cpp")(
        d_in=4, d=8).float()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(3, 12, 4, dtype=torch.float32, requires_grad=True)
    (y, fr), (ym, fm) = ref(x, edge_index=edges), mod(x, edge_index=edges)
    torch.testing.assert_close(ym, y)
    torch.testing.assert_close(fm["c"], fr["c"])
    gr, = torch.autograd.grad(y.sum() + fr["c"].sum(), x)
    gm, = torch.autograd.grad(ym.sum() + fm["c"].sum(), x)
    torch.testing.assert_close(gm, gr)
    with torch.no_grad():
        torch.testing.assert_close(mod(x, edge_index=edges)[0], y)


def test_analyze_says_it_covers_seq_cells():
    with pytest.raises(NotImplementedError, match="cell 'MDRNN' runs over grid2d"):
        rcc.analyze(stdlib("mdrnn.rnn"))


def test_graph_cells_refuse_other_backends_and_plans():
    never = ("cell N(d) over dag {\n    input x[d]\n    state h[d], c[d]\n"
             "    h' = x + sum_pred(h + c)\n    output h'\n}")
    with pytest.raises(NotImplementedError, match="state 'c' is never updated is not built"):
        rcc.compile(never, backend="cpp")
    with pytest.raises(NotImplementedError, match="backend 'cpp' runs plan 'sequential'"):
        rcc.compile(stdlib("mdrnn.rnn"), backend="cpp", plan="chunk")
    only_chunk = "backend 'triton' runs plan 'chunk' over grid2d only"
    with pytest.raises(NotImplementedError, match=only_chunk + r".*states\): the update of 'h' mul"):
        rcc.compile(stdlib("mdrnn.rnn"), backend="triton")
    with pytest.raises(NotImplementedError, match=only_chunk + ".*plan 'chunk' runs cells over "
                                                               "grid2d"):
        rcc.compile(stdlib("treelstm.rnn"), cell="ChildSumTreeLSTM", backend="triton")
    with pytest.raises(NotImplementedError, match=only_chunk + r" \(pLSTM's parallel form, cells "
                                                               r"affine in their states\); the level"):
        rcc.compile(stdlib("plstm.rnn"), cell="PLSTM2DP", backend="triton", plan="sequential")
    with pytest.raises(NotImplementedError, match="plan 'scan' has no graph form"):
        rcc.compile(stdlib("mdrnn.rnn"), plan="scan")


# ---- rcc explain ------------------------------------------------------------------------------
def test_explain_says_which_schedule_and_why():
    from rcc.api import explain

    text = explain(stdlib("mdrnn.rnn"))
    assert "cell MDRNN over grid2d: states h on nodes" in text
    assert "schedule: the wavefront" in text and "X + Y - 1 anti-diagonals" in text
    assert "plan 'chunk' does not apply: the update of 'h' multiplies its state by a matrix" in text
    text = explain(stdlib("plstm.rnn"), cell="PLSTM2DD")
    assert "plan 'chunk' (pLSTM's parallel form" in text
    assert "Backend cpp runs the schedule" in text and "backend triton runs plan 'chunk' (" in text
    text = explain(stdlib("plstm.rnn"), cell="PLSTMGraphP")
    assert "states C on edges" in text and "sum_pred(.)" in text
    assert "networkx's topological generations" in text


def test_explain_graph_draws_the_schedule(tmp_path):
    from test_cli import rcc_cli

    png = tmp_path / "grid.png"
    r = rcc_cli("explain", stdlib("mdrnn.rnn"), "--graph", str(png), "--grid", "5x7")
    assert r.returncode == 0, r.stderr
    assert "drew the 11 steps on the 5 x 7 grid" in r.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    edges = tmp_path / "edges.txt"
    edges.write_text("0 3\n1 3\n2 4\n3 5\n4 5\n")
    png = tmp_path / "dag.png"
    r = rcc_cli("explain", stdlib("treelstm.rnn"), "--cell", "ChildSumTreeLSTM",
                "--graph", str(png), "--edge-index", str(edges))
    assert r.returncode == 0, r.stderr
    assert "drew the 3 steps on the DAG of 6 nodes, 5 edges" in r.stdout and png.stat().st_size
    edges.write_text("0 1\n1 0\n")
    r = rcc_cli("explain", stdlib("treelstm.rnn"), "--cell", "ChildSumTreeLSTM",
                "--graph", str(png), "--edge-index", str(edges))
    assert r.returncode == 2 and "edge_index has a cycle (0 -> 1 -> 0)" in r.stderr


# ---- plan chunk: pLSTM's parallel form on grids -----------------------------------------------
AFFINE_NODES = """cell Lin(d) over grid2d {
    input x[d], a, b
    state h[d] = 0.3
    h' = sigmoid(a) * pred(h, 0) + tanh(b) * pred(h, 1) - 0.5 * mean_pred(h) / 2 + x * x
    output y = tanh(h') + sum_pred(h * h)
}"""


@pytest.mark.parametrize("cell, dims", [("PLSTM2DP", dict(d_in=3, K=2, V=3)),
                                        ("PLSTM2DD", dict(d_in=3, K=3, V=2)),
                                        (AFFINE_NODES, dict(d=3)),
                                        ("GRID_CORE", {})])  # a scalar state
@pytest.mark.parametrize("X, Y, chunk", [(1, 1, 4), (5, 7, 4), (9, 6, 2), (8, 8, 8), (3, 2, 1)])
def test_plan_chunk_equals_the_wavefront(cell, dims, X, Y, chunk):
    """Chunks that divide the grid or not, chunk 1 (every node its own chunk), the whole grid one
    chunk: outputs, final states and gradients (inputs, params, initial state) as the levels."""
    check_plan_chunk(cell, dims, X, Y, chunk, "torch")


@pytest.mark.parametrize("cell, dims", [("PLSTM2DP", dict(d_in=3, K=2, V=3)),
                                        ("PLSTM2DD", dict(d_in=3, K=3, V=2)),
                                        (AFFINE_NODES, dict(d=3)),
                                        ("GRID_CORE", {})])
@pytest.mark.parametrize("X, Y, chunk", [(1, 1, 4), (5, 7, 3), (9, 6, 2), (4, 4, 4), (3, 2, 1)])
def test_triton_plan_chunk_equals_the_wavefront(cell, dims, X, Y, chunk):
    """Backend triton: the cell's body in torch, the solve in Triton kernels (interpreted: chunks
    of at most 4 a side)."""
    check_plan_chunk(cell, dims, X, Y, chunk, "triton")


def check_plan_chunk(cell, dims, X, Y, chunk, backend):
    torch.manual_seed(12)
    source, name = (stdlib("plstm.rnn"), cell) if cell.startswith("PLSTM") else (cell, None)
    if cell == "GRID_CORE":
        source = GRID_CORE.format(topology="grid2d")
    seq = rcc.compile(source, cell=name)(**dims)
    par = rcc.compile(source, cell=name, plan="chunk", backend=backend)(**dims)
    randomize(seq)
    par.load_state_dict(seq.state_dict())
    par.chunk_size = chunk
    decl = [tuple(v) for v in seq.shapes.values()][:len(seq.INPUTS)]
    xs = [torch.randn(2, X, Y, 2, *s, requires_grad=True) for s in decl]  # 2 heads
    state = {seq.STATES[0]: torch.randn(2, 2, *seq.shapes[seq.STATES[0]], requires_grad=True)}
    y, final = seq(*xs, initial_state=state)
    y_par, final_par = par(*xs, initial_state=state)
    torch.testing.assert_close(y_par, y, rtol=1e-10, atol=1e-10)
    for k in final:
        torch.testing.assert_close(final_par[k], final[k], rtol=1e-10, atol=1e-10)
    w = torch.randn_like(y)
    leaves = xs + [state[seq.STATES[0]]]
    g_seq = grads((y * w).sum() + final[seq.STATES[0]].sum(), leaves + list(seq.parameters()))
    g_par = grads((y_par * w).sum() + final_par[seq.STATES[0]].sum(), leaves + list(par.parameters()))
    for a, b in zip(g_par, g_seq):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("source, cell, words", [
    (stdlib("mdrnn.rnn"), None, "the update of 'h' multiplies its state by a matrix (line 11)"),
    ("cell N(d) over grid2d {\n input x[d]\n state h[d]\n h' = tanh(sum_pred(h)) + x\n output h'\n}",
     None, "the update of 'h' is not affine in its state: tanh at line 4"),
    ("cell V(d) over grid2d {\n input x[d]\n state h[d]\n h' = sum(sum_pred(h) * x[:, None], 0)\n"
     " output h'\n}", None, "scales a state of shape [d] into shape [d, d] (line 4)"),
    (stdlib("treelstm.rnn"), "ChildSumTreeLSTM", "plan 'chunk' runs cells over grid2d"),
    ("cell W(d) over grid2d {\n input x[d]\n state h[d], g[d]\n h' = sum_pred(g) + x\n"
     " g' = sum_pred(h)\n output h'\n}", None, "the update of 'h' reads state 'g'"),
])
def test_plan_chunk_says_why_it_does_not_apply(source, cell, words):
    with pytest.raises(NotImplementedError) as info:
        rcc.compile(source, cell=cell, plan="chunk")
    assert "plan 'chunk' cannot run it: " in str(info.value) and words in str(info.value)


def test_grid_linear_solve_against_the_recurrence():
    """rcc.runtime.grid_chunk.solve alone, on an odd grid, against the recurrence it solves."""
    from rcc.runtime.grid_chunk import solve

    torch.manual_seed(13)
    T, b = torch.randn(3, 7, 5, 2, 2), torch.randn(3, 7, 5, 2, 4)
    C = solve(T, b, 3)
    ref = torch.zeros_like(b)
    for x in range(7):
        for y in range(5):
            up = ref[:, x - 1, y, 0] if x else torch.zeros(3, 4)
            left = ref[:, x, y - 1, 1] if y else torch.zeros(3, 4)
            for o in range(2):
                ref[:, x, y, o] = (T[:, x, y, o, 0, None] * up + T[:, x, y, o, 1, None] * left
                                   + b[:, x, y, o])
    torch.testing.assert_close(C, ref)


@pytest.mark.parametrize("NB, X, Y, D, chunk", [(3, 7, 5, 4, 3), (1, 1, 1, 1, 4), (2, 9, 6, 70, 2),
                                                 (2, 8, 8, 3, 4), (1, 3, 2, 2, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_grid_solve_equals_the_torch_solve(NB, X, Y, D, chunk, dtype):
    """rcc.runtime.triton.grid_solve (backend triton's kernels) against the torch solve: the
    states and the gradients of T and b (its backward is the same kernels on the flipped grid);
    70 state columns take two blocks of 64."""
    from rcc.runtime.grid_chunk import solve
    from rcc.runtime.triton import grid_solve

    torch.manual_seed(14)
    T = (0.7 * torch.randn(NB, X, Y, 2, 2, dtype=dtype)).requires_grad_()
    b = torch.randn(NB, X, Y, 2, D, dtype=dtype, requires_grad=True)
    got, want = grid_solve(T, b, chunk), solve(T, b, chunk)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(got, want, **tol)
    w = torch.randn_like(got)
    for a, b_ in zip(grads((got * w).sum(), [T, b]), grads((want * w).sum(), [T, b])):
        torch.testing.assert_close(a, b_, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_plan_chunk_in_half_precision_solves_in_float32(dtype):
    """Half-precision params and inputs: the solve computes and keeps the states in float32, the
    results come back in the input's dtype, as close to float32 as the rounded inputs allow."""
    torch.manual_seed(15)
    ref = rcc.compile(stdlib("plstm.rnn"), cell="PLSTM2DD")(d_in=3, K=2, V=3).float()
    m = rcc.compile(stdlib("plstm.rnn"), cell="PLSTM2DD", backend="triton")(d_in=3, K=2, V=3)
    m = m.to(dtype)
    m.load_state_dict(ref.state_dict())
    ref.load_state_dict(m.float().state_dict())  # the same rounded params in float32
    m = m.to(dtype)
    x = torch.randn(2, 5, 6, 3, dtype=dtype, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    (y, final), (want, want_final) = m(x), ref(x32)
    assert y.dtype == final["C"].dtype == dtype
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(final["C"].float(), want_final["C"], rtol=2e-2, atol=2e-2)
    (g,), (g32,) = grads(y.float().sum(), [x]), grads(want.sum(), [x32])
    torch.testing.assert_close(g.float(), g32, rtol=2e-2, atol=2e-2)


def test_triton_grid_solve_refuses_chunks_too_big_for_its_tiles():
    m = rcc.compile(stdlib("plstm.rnn"), cell="PLSTM2DP", backend="triton")(d_in=2, K=2, V=2)
    m.chunk_size = 8
    with pytest.raises(ValueError, match="backend 'triton' solves grids in chunks of 1 to 4 nodes "
                                         "a side in Triton's interpreter; got chunk_size=8"):
        m(torch.randn(1, 3, 3, 2))


def test_equal_predecessor_forms_are_computed_once():
    """pLSTM 2D reads sum_pred(C) in its update and in its output: one scatter-add per level."""
    code = rcc.generate(stdlib("plstm.rnn"), cell="PLSTM2DP")
    assert code.count("_g.sum(") == 1
    # different bodies stay apart: the Child-Sum Tree-LSTM sums h, and f * c
    code = rcc.generate(stdlib("treelstm.rnn"), cell="ChildSumTreeLSTM")
    assert code.count("_g.sum(") == 2


def test_param_named_like_a_graph_module_attribute_is_an_error():
    with pytest.raises(rcc.CompileError, match="param 'PLAN' clashes with an attribute"):
        rcc.compile("cell C() over dag {\n    input x\n    param PLAN\n    output y = x * PLAN\n}\n")


def test_sum_pred_of_a_constant_counts_incoming_edges():
    """sum_pred(1) is the in-degree (a source counts its one virtual edge); mean_pred(2) is 2."""
    m = rcc.compile("cell D() over dag {\n    input x\n    output n = x * 0 + sum_pred(1)\n"
                    "    output m = mean_pred(2.0) + x * 0\n}\n")()
    (n, mean), _ = m(torch.zeros(2, 5), edge_index=torch.tensor([[0, 1, 2, 0], [3, 3, 3, 4]]))
    torch.testing.assert_close(n, torch.tensor([[1.0, 1, 1, 3, 1]] * 2))
    torch.testing.assert_close(mean, torch.full((2, 5), 2.0))


PER_CHANNEL = """cell GatedGrid(d) over grid2d {
    input x[d], g[d]
    param a[d]
    state h[d]
    h' = sigmoid(g) * (pred(h, 0) + sigmoid(a) * pred(h, 1)) * 0.5 + x
    output y = h' * 2
}"""


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("grid,chunk", [((5, 4), 2), ((3, 7), 3), ((1, 1), 2)])
def test_plan_chunk_with_a_gate_per_channel(backend, grid, chunk):
    """A gate of shape [d] scales each channel of the state: the grid solve runs per channel
    (channels join the batch), equal to the wavefront, forward and backward."""
    seq = rcc.compile(PER_CHANNEL)(d=3)
    par = rcc.compile(PER_CHANNEL, plan="chunk", backend=backend)(d=3)
    par.load_state_dict(seq.state_dict())
    par.chunk_size = chunk
    x, g = (torch.randn(2, *grid, 3, requires_grad=True) for _ in range(2))
    init = {"h": torch.randn(2, 3, requires_grad=True)}
    (y, final), (y_par, final_par) = seq(x, g, initial_state=init), par(x, g, initial_state=init)
    torch.testing.assert_close(y_par, y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final_par["h"], final["h"], rtol=1e-10, atol=1e-10)
    w = torch.randn_like(y)
    for a, b in zip(grads((y_par * w).sum(), [x, g, init["h"], par.a]),
                    grads((y * w).sum(), [x, g, init["h"], seq.a])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
