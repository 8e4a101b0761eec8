"""The stdlib's classic and diagonal RNN cells against independent implementations, in float64.

Elman, LSTM and GRU are checked against torch.nn.RNN / LSTM / GRU (and their *Cell versions) with
weights copied by rcc.from_torch. minGRU, minLSTM, RG-LRU, HGRN and the ParaRNN cells are checked
against plain loops of their papers' equations written below, which read the module's params by
name. Each comparison covers the per-step outputs, the final states and the gradients of a random
weighting of both w.r.t. every input, every initial state and every param.
"""
import pytest
import torch
import torch.nn.functional as F

import rcc
from conftest import stdlib

DT = torch.float64
B = 2


def compiled(name, **dims):
    return rcc.compile(stdlib(name))(**dims).double()


def weighted_loss(out, final, weights):
    """A loss that gives every output and final-state entry its own gradient."""
    loss = (out * weights["out"]).sum()
    for name, value in final.items():
        loss = loss + (value * weights[name]).sum()
    return loss


def assert_matches(out, final, ref_out, ref_final, leaves, names, ref_leaves=None):
    """Compare values, then gradients: of the cell's result w.r.t. `leaves`, of the reference's
    w.r.t. `ref_leaves` (the same tensors unless the reference has its own copies of the params)."""
    torch.testing.assert_close(out, ref_out)
    assert set(final) == set(ref_final)
    for name in ref_final:
        torch.testing.assert_close(final[name], ref_final[name], msg=f"final state {name!r}")
    weights = {"out": torch.randn_like(ref_out)}
    weights.update({name: torch.randn_like(value) for name, value in ref_final.items()})
    grads = torch.autograd.grad(weighted_loss(out, final, weights), leaves)
    ref_grads = torch.autograd.grad(weighted_loss(ref_out, ref_final, weights),
                                    leaves if ref_leaves is None else ref_leaves)
    for name, g, ref_g in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, ref_g, msg=f"gradient w.r.t. {name}")


# ---- Elman, LSTM, GRU against torch.nn ---------------------------------------------------------
TORCH_CELLS = {  # stdlib file -> (torch sequence module, torch one-step module, state names)
    "elman.rnn": (torch.nn.RNN, torch.nn.RNNCell, ("h",)),
    "lstm.rnn": (torch.nn.LSTM, torch.nn.LSTMCell, ("h", "c")),
    "gru.rnn": (torch.nn.GRU, torch.nn.GRUCell, ("h",)),
}
SIZES = [(1, 1, 1), (7, 3, 5), (7, 1, 1), (1, 4, 3)]  # (T, d_in, d)


def run_torch_sequence(ref, x, states):
    """torch.nn.RNN/LSTM/GRU with batch_first; states [B, d] -> ([B, T, d], {name: [B, d]})."""
    if isinstance(ref, torch.nn.LSTM):
        y, (h, c) = ref(x, (states["h"][None], states["c"][None]))
        return y, {"h": h[0], "c": c[0]}
    y, h = ref(x, states["h"][None])
    return y, {"h": h[0]}


@pytest.mark.parametrize("T,d_in,d", SIZES)
@pytest.mark.parametrize("file", sorted(TORCH_CELLS))
def test_torch_rnn_matches_torch_nn(file, T, d_in, d):
    torch_seq, _, state_names = TORCH_CELLS[file]
    ref = torch_seq(d_in, d, batch_first=True).double()
    m = rcc.from_torch(compiled(file, d_in=d_in, d=d), ref)
    x = torch.randn(B, T, d_in, dtype=DT, requires_grad=True)
    states = {s: torch.randn(B, d, dtype=DT, requires_grad=True) for s in state_names}
    out, final = m(x, initial_state=states)
    ref_out, ref_final = run_torch_sequence(ref, x, states)
    params = sorted(dict(m.named_parameters()).items())
    leaves = [x, *states.values()] + [p for _, p in params]
    ref_leaves = [x, *states.values()] + [ref.get_parameter(n + "_l0") for n, _ in params]
    names = ["x", *states] + [n for n, _ in params]
    assert_matches(out, final, ref_out, ref_final, leaves, names, ref_leaves)


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("file", sorted(TORCH_CELLS))
def test_torch_rnn_matches_torch_cell_loop(file, T):
    """A Python loop of torch.nn.RNNCell / LSTMCell / GRUCell (one step when T = 1)."""
    _, torch_cell, state_names = TORCH_CELLS[file]
    d_in, d = 3, 5
    ref = torch_cell(d_in, d).double()
    m = rcc.from_torch(compiled(file, d_in=d_in, d=d), ref)
    x = torch.randn(B, T, d_in, dtype=DT, requires_grad=True)
    states = {s: torch.randn(B, d, dtype=DT, requires_grad=True) for s in state_names}
    out, final = m(x, initial_state=states)
    ref_final, ys = dict(states), []
    for t in range(T):
        if state_names == ("h", "c"):
            h, c = ref(x[:, t], (ref_final["h"], ref_final["c"]))
            ref_final = {"h": h, "c": c}
        else:
            ref_final = {"h": ref(x[:, t], ref_final["h"])}
        ys.append(ref_final["h"])
    params = sorted(dict(m.named_parameters()).items())
    leaves = [x, *states.values()] + [p for _, p in params]
    ref_leaves = [x, *states.values()] + [ref.get_parameter(n) for n, _ in params]
    names = ["x", *states] + [n for n, _ in params]
    assert_matches(out, final, torch.stack(ys, 1), ref_final, leaves, names, ref_leaves)


@pytest.mark.parametrize("file", sorted(TORCH_CELLS))
def test_torch_rnn_heads_match_torch_nn_on_flattened_batch(file):
    """[B, T, H1, H2, d_in] runs every head with the same weights, as torch does on a batch."""
    torch_seq, _, state_names = TORCH_CELLS[file]
    T, d_in, d, heads = 4, 3, 2, (2, 3)
    ref = torch_seq(d_in, d, batch_first=True).double()
    m = rcc.from_torch(compiled(file, d_in=d_in, d=d), ref)
    x = torch.randn(B, T, *heads, d_in, dtype=DT, requires_grad=True)
    states = {s: torch.randn(B, *heads, d, dtype=DT, requires_grad=True) for s in state_names}
    out, final = m(x, initial_state=states)
    flat_x = x.movedim(1, 3).reshape(-1, T, d_in)  # [B*H1*H2, T, d_in]
    flat_out, flat_final = run_torch_sequence(ref, flat_x, {s: v.reshape(-1, d)
                                                           for s, v in states.items()})
    ref_out = flat_out.reshape(B, *heads, T, d).movedim(3, 1)
    ref_final = {s: v.reshape(B, *heads, d) for s, v in flat_final.items()}
    params = sorted(dict(m.named_parameters()).items())
    leaves = [x, *states.values()] + [p for _, p in params]
    ref_leaves = [x, *states.values()] + [ref.get_parameter(n + "_l0") for n, _ in params]
    names = ["x", *states] + [n for n, _ in params]
    assert_matches(out, final, ref_out, ref_final, leaves, names, ref_leaves)


def test_from_torch_rejects_wrong_sizes():
    m = compiled("lstm.rnn", d_in=3, d=5)
    with pytest.raises(ValueError, match="weight_ih"):
        rcc.from_torch(m, torch.nn.LSTM(3, 4))


def test_from_torch_takes_other_layers():
    ref = torch.nn.GRU(3, 3, num_layers=2, batch_first=True).double()
    m = rcc.from_torch(compiled("gru.rnn", d_in=3, d=3), ref, layer=1)
    torch.testing.assert_close(m.weight_hh, ref.weight_hh_l1)
    torch.testing.assert_close(m.bias_ih, ref.bias_ih_l1)


# ---- hand loops of the papers' equations --------------------------------------------------------
# Each step takes the module (for its params), this step's inputs and the previous states, with
# any head axes as leading batch axes (x @ W.T and elementwise ops broadcast over them), and
# returns (output, new states).
def mingru_step(m, inp, st):
    x, h = inp["x"], st["h"]
    z = torch.sigmoid(x @ m.Wz.T + m.bz)
    h_tilde = x @ m.Wh.T + m.bh
    h = (1 - z) * h + z * h_tilde
    return h, {"h": h}


def minlstm_step(m, inp, st):
    x, h = inp["x"], st["h"]
    f = torch.sigmoid(x @ m.Wf.T + m.bf)
    i = torch.sigmoid(x @ m.Wi.T + m.bi)
    f_norm, i_norm = f / (f + i), i / (f + i)
    h = f_norm * h + i_norm * (x @ m.Wh.T + m.bh)
    return h, {"h": h}


def rglru_step(m, inp, st):
    x, h = inp["x"], st["h"]
    r = torch.sigmoid(x @ m.Wa.T + m.ba)
    i = torch.sigmoid(x @ m.Wx.T + m.bx)
    a = torch.sigmoid(m.Lambda) ** (8.0 * r)  # a_t = a^(c r_t), c = 8
    h = a * h + torch.sqrt(1 - a * a) * (i * x)
    return h, {"h": h}


def hgrn_step(m, inp, st):
    h = torch.exp(inp["g"]) * st["h"] + inp["x"]
    return h, {"h": h}


def paragru_step(m, inp, st):
    x, h = inp["x"], st["h"]
    z = torch.sigmoid(x @ m.Wz.T + m.az * h + m.bz)
    r = torch.sigmoid(x @ m.Wr.T + m.ar * h + m.br)
    n = torch.tanh(x @ m.Wh.T + m.ah * h * r + m.bh)
    h = z * n + (1 - z) * h
    return h, {"h": h}


def paralstm_step(m, inp, st):
    x, h, c = inp["x"], st["h"], st["c"]
    f = torch.sigmoid(x @ m.Wf.T + m.af * h + m.pf * c + m.bf)
    c_new = torch.tanh(x @ m.Wc.T + m.ac * h + m.bc)
    c = f * c + (1 - f) * c_new
    o = torch.sigmoid(x @ m.Wo.T + m.ao * h + m.po * c + m.bo)
    h = o * torch.tanh(c)
    return h, {"h": h, "c": c}


def log_forget_gate(*shape):
    return F.logsigmoid(torch.randn(*shape, dtype=DT))  # g = log f with f in (0, 1), as fla's


LOOP_CELLS = {  # name -> (file, step, takes d_in, states, inputs: name -> maker(shape))
    "minGRU": ("mingru.rnn", mingru_step, True, ("h",), {"x": None}),
    "minLSTM": ("minlstm.rnn", minlstm_step, True, ("h",), {"x": None}),
    "RG-LRU": ("rglru.rnn", rglru_step, False, ("h",), {"x": None}),
    "HGRN": ("hgrn.rnn", hgrn_step, False, ("h",), {"x": None, "g": log_forget_gate}),
    "ParaGRU": ("pararnn_gru.rnn", paragru_step, True, ("h",), {"x": None}),
    "ParaLSTM": ("pararnn_lstm.rnn", paralstm_step, True, ("h", "c"), {"x": None}),
}
LOOP_SIZES = [pytest.param(T, d, heads, id=f"T{T}-d{d}-heads{'x'.join(map(str, heads)) or 0}")
              for T, d, heads in [(1, 1, ()), (1, 5, ()), (7, 1, ()), (7, 5, ()), (7, 5, (2, 3)),
                                  (1, 1, (3, 1))]]


def run_loop(step, m, inputs, states):
    ys = []
    for t in range(next(iter(inputs.values())).shape[1]):
        y, states = step(m, {k: v[:, t] for k, v in inputs.items()}, states)
        ys.append(y)
    return torch.stack(ys, 1), states


@pytest.mark.parametrize("T,d,heads", LOOP_SIZES)
@pytest.mark.parametrize("cell", sorted(LOOP_CELLS))
def test_cell_matches_hand_loop(cell, T, d, heads):
    file, step, takes_d_in, state_names, input_makers = LOOP_CELLS[cell]
    d_in = 3 if takes_d_in else d
    m = compiled(file, **({"d_in": d_in, "d": d} if takes_d_in else {"d": d}))
    inputs = {}
    for name, make in input_makers.items():
        width = d_in if name == "x" else d
        value = make(B, T, *heads, width) if make else torch.randn(B, T, *heads, width, dtype=DT)
        inputs[name] = value.requires_grad_()
    states = {s: torch.randn(B, *heads, d, dtype=DT, requires_grad=True) for s in state_names}
    out, final = m(**inputs, initial_state=states)
    ref_out, ref_final = run_loop(step, m, inputs, states)
    params = sorted(dict(m.named_parameters()).items())
    leaves = [*inputs.values(), *states.values()] + [p for _, p in params]
    names = [*inputs, *states] + [n for n, _ in params]
    assert_matches(out, final, ref_out, ref_final, leaves, names)


@pytest.mark.parametrize("cell", sorted(LOOP_CELLS))
def test_cell_default_initial_state_is_zero(cell):
    file, step, takes_d_in, state_names, input_makers = LOOP_CELLS[cell]
    d = 3
    m = compiled(file, **({"d_in": 2, "d": d} if takes_d_in else {"d": d}))
    inputs = {name: (make(B, 4, d) if make else torch.randn(B, 4, 2 if takes_d_in else d,
                                                            dtype=DT))
              for name, make in input_makers.items()}
    out, final = m(**inputs)
    ref_out, ref_final = run_loop(step, m, inputs, {s: torch.zeros(B, d, dtype=DT)
                                                    for s in state_names})
    torch.testing.assert_close(out, ref_out)
    for name in state_names:
        torch.testing.assert_close(final[name], ref_final[name])


def test_rglru_default_lambda_gives_paper_decay_range():
    """Lambda ~ U[4.3, 9.0] puts a^c = sigmoid(Lambda)^8 in about [0.9, 0.999] (paper, 2.4)."""
    m = compiled("rglru.rnn", d=256)
    decay = torch.sigmoid(m.Lambda) ** 8
    assert decay.min() > 0.89 and decay.max() < 0.9991


# ---- gradcheck ---------------------------------------------------------------------------------
def gradcheck_cell(m, inputs, states):
    """torch.autograd.gradcheck of outputs and final states in inputs, initial states and params."""
    params = dict(m.named_parameters())
    input_names, state_names, param_names = list(inputs), list(states), list(params)

    def fn(*tensors):
        ins = dict(zip(input_names, tensors))
        sts = dict(zip(state_names, tensors[len(ins):]))
        ps = dict(zip(param_names, tensors[len(ins) + len(sts):]))
        out, final = torch.func.functional_call(m, ps, args=(), kwargs={**ins, "initial_state": sts})
        return (out, *(final[s] for s in state_names))

    leaves = [*inputs.values(), *states.values()] + [p.detach().clone().requires_grad_()
                                                    for p in params.values()]
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("file,state_names", [("lstm.rnn", ("h", "c")), ("gru.rnn", ("h",))])
def test_gradcheck_torch_layout_cells(file, state_names):
    m = compiled(file, d_in=2, d=3)
    x = torch.randn(2, 3, 2, dtype=DT, requires_grad=True)
    states = {s: torch.randn(2, 3, dtype=DT, requires_grad=True) for s in state_names}
    gradcheck_cell(m, {"x": x}, states)


def test_gradcheck_rglru():
    m = compiled("rglru.rnn", d=3)
    with torch.no_grad():  # a decay away from 1, where sqrt(1 - a^2) is well conditioned
        m.Lambda.uniform_(-1.0, 2.0)
    x = torch.randn(2, 3, 3, dtype=DT, requires_grad=True)
    gradcheck_cell(m, {"x": x}, {"h": torch.randn(2, 3, dtype=DT, requires_grad=True)})
