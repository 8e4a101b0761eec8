"""Backend triton's loop over time tiled over hidden units (backends/triton/units.py): which cells
take it, and that it equals the torch reference when the units and rows span several programs
(launched one step at a time, as in Triton's interpreter), with T=1, a batch that is not a
multiple of the row block, a hidden size that is not a power of two, every kind of value the
layout admits, and without gradients (the two-slot history)."""
import pytest
import torch

import rcc
from conftest import cell_inputs, run_with_grads, stdlib

import rcc.runtime.triton.units as units
from rcc.backends.loop import LoopPartition
from rcc.backends.triton.unit_layout import unit_layout

TILED = ["lstm.rnn", "gru.rnn", "elman.rnn", "slstm.rnn", "pararnn_gru.rnn", "pararnn_lstm.rnn",
         "mingru.rnn", "minlstm.rnn", "hgrn.rnn", "rglru.rnn"]

# every kind of value: a number per row (a), a param number (w), a param vector (v), products
# P @ h and Q @ c, h @ P (transposed), a state no step updates (k), a concatenation of blocks,
# an output that is one number per row
ODD = """
cell Odd(d) {
    input x[d], a
    param P[d, 2*d], w, v[d], Q[2*d, d]
    state h[d], c[d], k[d]
    z1, z2 = split(h @ P, 2)
    g = sigmoid(a * w + z1 + v)
    both = concat(z2, g) + Q @ c
    left, right = split(both, 2)
    h' = g * tanh(left + x) + (1 - g) * h * k
    c' = tanh(right) * w + a
    output y = h'
    output s = a * w * 2.5
}
"""


@pytest.fixture
def several_programs(monkeypatch):
    """Blocks of 32 units (16 where D <= 32): d=80 spans 3 programs of units."""
    blocks = units.blocks

    def smaller(N, D, sms, matrices=1):
        tiles = blocks(N, D, sms, matrices)
        return dict(tiles, HB=32, STEPWISE=True, SYNC=False) if D > 32 else tiles
    monkeypatch.setattr(units, "blocks", smaller)


def _dims(name, d):
    return {"d": d} if name in ("hgrn.rnn", "rglru.rnn") else {"d_in": 3, "d": d}


def _compare(source, dims, B, T, dtype, tol):
    ref = rcc.compile(source, backend="torch", plan="sequential")(**dims).to(dtype)
    mod = rcc.compile(source, backend="triton", plan="sequential")(**dims).to(dtype)
    mod.load_state_dict(ref.state_dict())
    xs, init = cell_inputs(ref, B, T, (), dtype)
    want, want_grads = run_with_grads(ref, xs, init)
    got, got_grads = run_with_grads(mod, xs, init)
    for w, g in zip(list(want) + list(want_grads), list(got) + list(got_grads)):
        if w is None:
            assert g is None or not g.abs().any()
        else:
            torch.testing.assert_close(g, w, **tol)
    with torch.no_grad():  # the two-slot history, no products saved
        out, final = mod(*xs, initial_state=init)
    for w, g in zip(want, list(out if isinstance(out, tuple) else (out,)) + [final[s] for s in mod.STATES]):
        torch.testing.assert_close(g, w.detach(), **tol)


F64 = {"rtol": 1e-10, "atol": 1e-11}


def test_the_cells_whose_step_works_unit_by_unit_are_tiled():
    from rcc.api import build_ir
    for name in TILED:
        cell = build_ir(stdlib(name))[0]
        assert not isinstance(unit_layout(cell, LoopPartition(cell)), str), name
        assert "_units = {" in rcc.generate(stdlib(name), backend="triton", plan="sequential")
    reasons = {"mlstm.rnn": "a state is not a vector", "lru.rnn": "does not multiply a param by a state"}
    for name, why in reasons.items():
        cell = build_ir(stdlib(name))[0]
        assert why in unit_layout(cell, LoopPartition(cell))
    # a product of a value the step computes needs the whole vector mid-step: one program per row
    paper_gru = ("cell G(d) {\n input x[d]\n param W[d, d]\n state h[d]\n r = sigmoid(x)\n"
                 " h' = tanh(W @ (r * h) + x)\n output h'\n}\n")
    assert "_units = {" not in rcc.generate(paper_gru, backend="triton", plan="sequential")


@pytest.mark.parametrize("name", TILED)
@pytest.mark.parametrize("T", [1, 5])
def test_several_programs_of_units_and_rows_equal_torch(several_programs, name, T):
    _compare(stdlib(name), _dims(name, 80), 19, T, torch.float64, F64)


@pytest.mark.parametrize("name", ["lstm.rnn", "gru.rnn"])
def test_float32(several_programs, name):
    _compare(stdlib(name), _dims(name, 40), 17, 6, torch.float32, {"rtol": 2e-4, "atol": 2e-5})


@pytest.mark.parametrize("d,B,T", [(5, 3, 1), (5, 3, 6), (40, 19, 4)])
def test_every_kind_of_value(several_programs, d, B, T):
    _compare(ODD, {"d": d}, B, T, torch.float64, F64)


def test_tile_sizes_and_launch_modes():
    one = units.blocks(16, 20, 132)
    assert one["HB"] == 32 and not one["SYNC"] and not one["STEPWISE"]  # one program of units
    b = units.blocks(16, 1024, 132)
    assert (b["BB"], b["HB"], b["SYNC"]) == (16, 16, True)  # 64 programs meet at a barrier
    assert units.blocks(64, 2048, 132)["STEPWISE"]  # 128 x 4 programs exceed the GPU
    assert units.blocks(16, 1024, None)["STEPWISE"]  # the interpreter runs programs in turn
    # the tiles, so the compiled kernel, are the same for every hidden size and batch above 32
    keys = {tuple(sorted(units.blocks(N, D, 132).items())) for N in (1, 16) for D in (64, 256, 1024)}
    assert len(keys) == 1
