"""rcc.Stack (issue 19): layers, both directions, dropout between layers and either batch
layout, equal to torch.nn.LSTM / GRU / RNN with copied weights, forward and backward."""
import pytest
import torch

import rcc
from conftest import stdlib

TORCH = {"lstm.rnn": torch.nn.LSTM, "gru.rnn": torch.nn.GRU, "elman.rnn": torch.nn.RNN}


def pair(cell_file, backend="torch", num_layers=3, bidirectional=True, batch_first=True):
    torch.manual_seed(0)
    ref = TORCH[cell_file](5, 4, num_layers=num_layers, bidirectional=bidirectional,
                           batch_first=batch_first).double()
    cell = rcc.compile(stdlib(cell_file), backend=backend, cell=None)
    stack = rcc.Stack(cell, num_layers=num_layers, bidirectional=bidirectional,
                      batch_first=batch_first, d_in=5, d=4).double()
    return rcc.from_torch(stack, ref), ref


def torch_states(cell_file, final):
    """Our final states in torch's result layout: LSTM (h_n, c_n), GRU / RNN h_n."""
    return (final["h"], final["c"]) if cell_file == "lstm.rnn" else final["h"]


@pytest.mark.parametrize("cell_file, backend", [("lstm.rnn", "torch"), ("gru.rnn", "torch"),
                                                ("elman.rnn", "torch"), ("lstm.rnn", "cpp"),
                                                ("gru.rnn", "cpp")])
def test_three_bidirectional_layers_equal_torch(cell_file, backend):
    stack, ref = pair(cell_file, backend)
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    y, final = stack(x)
    y_ref, states_ref = ref(x)
    assert y.shape == (2, 7, 8)
    torch.testing.assert_close(y, y_ref)
    ours = torch_states(cell_file, final)
    if cell_file == "lstm.rnn":
        assert final["h"].shape == final["c"].shape == (6, 2, 4)  # [layers * dirs, B, d]
        torch.testing.assert_close(ours[0], states_ref[0])
        torch.testing.assert_close(ours[1], states_ref[1])
    else:
        torch.testing.assert_close(ours, states_ref)
    loss = y.sin().sum() + final["h"].cos().sum()
    loss_ref = y_ref.sin().sum() + (states_ref[0] if cell_file == "lstm.rnn"
                                    else states_ref).cos().sum()
    got = torch.autograd.grad(loss, [x, *stack.parameters()])
    want = torch.autograd.grad(loss_ref, [x, *[dict(ref.named_parameters())[n] for n in
                                              _torch_names(stack)]])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _torch_names(stack):
    """The torch parameter name of each of the stack's parameters, in its order."""
    names = []
    for k in range(stack.num_layers):
        for rev in ((False, True) if stack.bidirectional else (False,)):
            for name, _ in stack.cell(k, rev).named_parameters():
                names.append(f"{name}_l{k}" + ("_reverse" if rev else ""))
    return names


def test_initial_states_and_time_major_layout():
    stack, ref = pair("lstm.rnn", num_layers=2, batch_first=False)
    x = torch.randn(7, 3, 5, dtype=torch.float64)  # [T, B, d_in]
    h0, c0 = torch.randn(4, 3, 4, dtype=torch.float64), torch.randn(4, 3, 4, dtype=torch.float64)
    y, final = stack(x, initial_state={"h": h0, "c": c0})
    y_ref, (h, c) = ref(x, (h0, c0))
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(final["h"], h)
    torch.testing.assert_close(final["c"], c)


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(0)
    cell = rcc.compile(stdlib("gru.rnn"))
    stack = rcc.Stack(cell, num_layers=2, dropout=0.5, d_in=5, d=4).double()
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    stack.eval()
    y_eval, _ = stack(x)
    nodrop = rcc.Stack(cell, num_layers=2, d_in=5, d=4).double()
    nodrop.load_state_dict(stack.state_dict())
    torch.testing.assert_close(y_eval, nodrop(x)[0])
    stack.train()
    assert not torch.allclose(stack(x)[0], y_eval)
    single = rcc.Stack(cell, num_layers=1, dropout=0.5, d_in=5, d=4).double().train()
    single.load_state_dict({k: v for k, v in stack.state_dict().items() if k.startswith("cells.0")})
    torch.testing.assert_close(single(x)[0], stack.cells[0](x)[0])  # never after the last layer


def test_stack_errors():
    gla = rcc.compile(stdlib("gla.rnn"))
    with pytest.raises(TypeError, match="one input and one output"):
        rcc.Stack(gla, K=3, V=2)
    lstm = rcc.compile(stdlib("lstm.rnn"))
    with pytest.raises(TypeError, match="no dim 'n_in'"):
        rcc.Stack(lstm, num_layers=2, input_dim="n_in", d_in=5, d=4)
    stack = rcc.Stack(lstm, num_layers=2, d_in=5, d=4)
    with pytest.raises(ValueError, match=r"takes \[2, B, \.\.\.\]"):
        stack(torch.randn(2, 3, 5), initial_state={"h": torch.zeros(1, 2, 4)})
    with pytest.raises(ValueError, match="num_layers=1, bidirectional=False; the Stack has "
                                         "num_layers=2"):
        rcc.from_torch(stack, torch.nn.LSTM(5, 4))


@pytest.mark.parametrize("cell_file", ["lstm.rnn", "gru.rnn"])
def test_packed_sequences_equal_torch(cell_file):
    """A PackedSequence (and a padded batch with lengths) through 2 bidirectional layers: the
    reverse direction starts at each sequence's own end, as torch.nn.LSTM's does."""
    stack, ref = pair(cell_file, num_layers=2)
    lens = [5, 2, 7]
    x = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lens, batch_first=True,
                                                     enforce_sorted=False)
    y, final = stack(packed)
    y_ref, states_ref = ref(packed)
    assert isinstance(y, torch.nn.utils.rnn.PackedSequence)
    torch.testing.assert_close(y.data, y_ref.data)
    h_ref = states_ref[0] if cell_file == "lstm.rnn" else states_ref
    torch.testing.assert_close(final["h"], h_ref)
    got = torch.autograd.grad(y.data.sin().sum() + final["h"].sum(), [x, *stack.parameters()],
                              retain_graph=True)  # the packing of x is shared with ref's graph
    want = torch.autograd.grad(y_ref.data.sin().sum() + h_ref.sum(),
                               [x, *[dict(ref.named_parameters())[n] for n in _torch_names(stack)]])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    y_pad, final_pad = stack(x, lengths=torch.tensor(lens))
    unpacked, _ = torch.nn.utils.rnn.pad_packed_sequence(y_ref, batch_first=True)
    torch.testing.assert_close(y_pad, unpacked)  # zeros past each length, as torch pads
    torch.testing.assert_close(final_pad["h"], h_ref)


def test_a_stack_of_a_one_state_cell_takes_initial_state_as_one_tensor():
    """torch.nn.GRU's h_0 [num_layers * directions, B, d]; several states need a dict."""
    stack = rcc.Stack(rcc.compile(stdlib("gru.rnn")), num_layers=2, d_in=4, d=5)
    x, h0 = torch.randn(3, 6, 4), torch.randn(2, 3, 5)
    torch.testing.assert_close(stack(x, initial_state=h0)[0],
                               stack(x, initial_state={"h": h0})[0])
    lstm = rcc.Stack(rcc.compile(stdlib("lstm.rnn")), num_layers=2, d_in=4, d=5)
    with pytest.raises(TypeError, match="has 2 states: pass a dict"):
        lstm(x, initial_state=h0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_cu_seqlens_equals_each_sequence_alone(batch_first):
    """Sequences packed along time (flash-linear-attention's layout) through 2 bidirectional
    layers: each sequence's reverse direction starts at its own end; initial and final states
    are one per sequence."""
    stack, _ = pair("lstm.rnn", num_layers=2, batch_first=batch_first)
    lens = [5, 1, 7]
    seqs = [torch.randn(1, n, 5, dtype=torch.float64) for n in lens]
    h0 = {"h": torch.randn(4, 3, 4, dtype=torch.float64), "c": torch.randn(4, 3, 4, dtype=torch.float64)}
    packed = torch.cat(seqs, 1)
    cu = torch.tensor([0, 5, 6, 13])
    y, final = stack(packed if batch_first else packed.transpose(0, 1), initial_state=h0, cu_seqlens=cu)
    for i, x in enumerate(seqs):
        start = {k: v[:, i:i + 1] for k, v in h0.items()}
        y_i, final_i = stack(x if batch_first else x.transpose(0, 1), initial_state=start)
        got = y[:, cu[i]:cu[i + 1]] if batch_first else y[cu[i]:cu[i + 1]]
        torch.testing.assert_close(got, y_i)
        for k in final:
            torch.testing.assert_close(final[k][:, i:i + 1], final_i[k])
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        stack(packed, cu_seqlens=[0, 5, 12])
    with pytest.raises(TypeError, match="not both"):
        stack(packed, cu_seqlens=cu, lengths=[13])
