"""State-transition analysis of every stdlib cell, cross-checked against autograd Jacobians."""
import networkx as nx
import pytest
import torch

import rcc
from conftest import stdlib

EXPECTED = {  # file: (kind, structure, legal plans)
    "mingru.rnn": ("affine", "diagonal", ("sequential", "scan")),
    "minlstm.rnn": ("affine", "diagonal", ("sequential", "scan")),
    "hgrn.rnn": ("affine", "diagonal", ("sequential", "scan")),
    "rglru.rnn": ("affine", "diagonal", ("sequential", "scan")),
    # the decay exp(delta A) varies along both axes of h[d, N]: no chunkwise form (Mamba-2's
    # scalar decay has one)
    "mamba.rnn": ("affine", "diagonal", ("sequential", "scan")),
    "gla.rnn": ("affine", "diagonal", ("sequential", "scan", "chunk")),
    "retnet.rnn": ("affine", "scalar", ("sequential", "scan", "chunk")),  # one gamma per head
    "deltanet.rnn": ("affine", "householder(n_h=1)", ("sequential", "chunk")),
    "gated_deltanet.rnn": ("affine", "householder(n_h=1, gated)", ("sequential", "chunk")),
    "deltaproduct.rnn": ("affine", "householder(n_h=2, gated)", ("sequential", "chunk")),
    "pararnn_gru.rnn": ("nonlinear", "diagonal", ("sequential", "newton")),
    "pararnn_lstm.rnn": ("nonlinear", "block-diagonal(k=2)", ("sequential", "newton")),
    "elman.rnn": ("nonlinear", "dense", ("sequential",)),
    "lstm.rnn": ("nonlinear", "dense", ("sequential",)),
    "gru.rnn": ("nonlinear", "dense", ("sequential",)),
    # the max stabiliser m is not affine; it is a max-plus scan, and given m the rest is chunkwise
    "mlstm.rnn": ("nonlinear", "dense", ("sequential", "chunk")),
    "slstm.rnn": ("nonlinear", "dense", ("sequential",)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_stdlib_analysis(name):
    a = rcc.analyze(stdlib(name))
    assert (a.kind, a.structure, a.plans) == EXPECTED[name]
    assert a.structure.split("(")[0] in str(a)


def test_scalar_decay_is_scalar_and_rank_one_non_householder_is_not():
    a = rcc.analyze("""
cell Scalar(K, V) {
    input k[K], v[V], g
    state S[K, V]
    S' = exp(g) * S + outer(k, v)
    output o = sum(S', 0)
}""")
    assert (a.kind, a.structure) == ("affine", "scalar")
    assert "scan" in a.plans and "chunk" in a.plans
    a = rcc.analyze("""
cell Skew(K, V) {
    input a[K], b[K], v[V]
    state S[K, V]
    S' = S - outer(a, b @ S) + outer(a, v)
    output o = sum(S', 0)
}""")
    assert a.kind == "affine" and not a.structure.startswith("householder")


def _step_jacobian(path, dims):
    """d(next states)/d(states) of one step, by autograd, flattened over all states."""
    m = rcc.compile(path)(**dims).double()
    inputs = [torch.randn(1, 1, *m.shapes[n], dtype=torch.float64) * 0.5 for n in m.INPUTS]
    shapes = [tuple(m.shapes[s]) for s in m.STATES]
    sizes = [int(torch.Size(s).numel()) for s in shapes]

    def step(flat):
        parts = torch.split(flat, sizes)
        init = {s: p.reshape(1, *shape) for s, p, shape in zip(m.STATES, parts, shapes)}
        _, final = m(*inputs, initial_state=init)
        return torch.cat([final[s].reshape(-1) for s in m.STATES])

    x0 = torch.randn(sum(sizes), dtype=torch.float64) * 0.5
    return torch.autograd.functional.jacobian(step, x0)


def _components(jac):
    g = nx.Graph()
    g.add_nodes_from(range(jac.shape[0]))
    rows, cols = torch.nonzero(jac.abs() > 1e-12, as_tuple=True)
    g.add_edges_from((int(r), int(c)) for r, c in zip(rows, cols) if r != c)
    return sorted(len(c) for c in nx.connected_components(g))


@pytest.mark.parametrize("name,dims", [
    ("mingru.rnn", {"d_in": 3, "d": 4}), ("gla.rnn", {"K": 3, "V": 2}),
    ("pararnn_gru.rnn", {"d_in": 2, "d": 5}), ("pararnn_lstm.rnn", {"d_in": 2, "d": 4}),
    ("deltanet.rnn", {"K": 3, "V": 4}), ("lstm.rnn", {"d_in": 2, "d": 3}),
])
def test_detected_structure_matches_autograd(name, dims):
    """A wrongly 'diagonal' Jacobian must never go unnoticed (ParaRNN's silent failure mode)."""
    a = rcc.analyze(stdlib(name))
    comps = _components(_step_jacobian(stdlib(name), dims))
    n = sum(comps)
    if a.structure in ("scalar", "diagonal"):
        assert comps == [1] * n
    elif a.structure.startswith("block-diagonal"):
        assert comps == [a.block] * (n // a.block)
    elif a.structure.startswith("householder"):
        assert comps == [dims["K"]] * dims["V"]  # each column of S[K, V] evolves alone
    else:
        assert comps == [n]


def test_a_rotation_of_rows_is_not_a_householder_factor_because_two_rows_swap_like_one():
    """At K=2 rotating the rows swaps them: I - (e1 - e2)(e1 - e2)^T, a reflection. The fact must
    hold at both probe sizes, and at K=3 a rotation is no reflection."""
    src = ("cell M(K, V) {\n    input k[K], v[V]\n    state S[K, V]\n"
           "    S' = concat(S[1:K], S[0:1], axis=0) + outer(k, v)\n    output o = sum(S', 0)\n}\n")
    a = rcc.analyze(src)
    assert a.structure == "dense" and a.n_householder == 0 and a.plans == ("sequential",)
