"""Variable-length batches (issue 19): cu_seqlens (flash-linear-attention's packing), lengths and
PackedSequence (torch.nn.utils.rnn's) equal running each sequence alone, forward and backward,
from each sequence's own initial state, on every plan and backend."""
import pytest
import torch

import rcc
from conftest import stdlib

LENGTHS = [1, 7, 64, 130]
TRITON_LENGTHS = [1, 7, 70]  # Triton's interpreter is slow: one chunk boundary of 64 suffices
CASES = [  # (cell, dims, backend, plan, heads)
    ("lstm.rnn", dict(d_in=3, d=4), "torch", "sequential", ()),
    ("lstm.rnn", dict(d_in=3, d=4), "torch", "auto", ()),
    ("lstm.rnn", dict(d_in=3, d=4), "cpp", "sequential", ()),
    ("lstm.rnn", dict(d_in=3, d=4), "triton", "sequential", ()),
    ("gla.rnn", dict(K=3, V=2), "torch", "scan", (2,)),
    ("gla.rnn", dict(K=3, V=2), "torch", "chunk", (2,)),
    ("gla.rnn", dict(K=3, V=2), "cpp", "sequential", (2,)),
    ("gla.rnn", dict(K=3, V=2), "triton", "chunk", ()),
    ("pararnn_gru.rnn", dict(d_in=3, d=4), "torch", "newton", ()),
]


def make(cell, dims, backend, plan):
    torch.manual_seed(0)
    return rcc.compile(stdlib(cell), backend=backend, plan=plan)(**dims).double()


def sequences(m, heads, lengths, seed=0):
    """Per sequence, one tensor [L, *heads, *decl] per input (GLA's gate in log space)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for L in lengths:
        xs = [torch.randn(L, *heads, *m.shapes[n], generator=g, dtype=torch.float64)
              for n in m.INPUTS]
        if "gk" in m.INPUTS:
            i = m.INPUTS.index("gk")
            xs[i] = -torch.nn.functional.softplus(xs[i])
        out.append(xs)
    return out


def initial_states(m, heads, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randn(S, *heads, *m.shapes[s], generator=g, dtype=torch.float64,
                           requires_grad=True) for s in m.STATES}


def loss_of(y, final):
    y = y[0] if isinstance(y, tuple) else y
    return (y.sin().sum() + sum(v.cos().sum() for v in final.values()))


@pytest.mark.parametrize("cell, dims, backend, plan, heads", CASES)
def test_cu_seqlens_equals_each_sequence_alone(cell, dims, backend, plan, heads):
    m = make(cell, dims, backend, plan)
    lengths = TRITON_LENGTHS if backend == "triton" else LENGTHS
    seqs = sequences(m, heads, lengths)
    init = initial_states(m, heads, len(lengths))
    packed = [torch.cat([s[k] for s in seqs])[None].requires_grad_() for k in range(len(m.INPUTS))]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    y, final = m(*packed, cu_seqlens=cu, initial_state=init)
    params = list(m.parameters())
    got = torch.autograd.grad(loss_of(y, final), [*packed, *params, *init.values()])

    # each sequence alone, from its own initial state
    alone = [[x.detach().clone().requires_grad_() for x in s] for s in seqs]
    loss = 0
    for i, xs in enumerate(alone):
        yi, fi = m(*[x[None] for x in xs],
                   initial_state={s: v[i:i + 1] for s, v in init.items()})
        loss = loss + loss_of(yi, fi)
        torch.testing.assert_close(y[0, cu[i]:cu[i + 1]], yi[0])
        for s in m.STATES:
            torch.testing.assert_close(final[s][i], fi[s][0])
    want = torch.autograd.grad(loss, [*[x for xs in alone for x in xs], *params,
                                      *init.values()])
    n_in = len(m.INPUTS)
    per_seq = want[:n_in * len(seqs)]
    for k in range(n_in):  # the packed input's gradient is the sequences' gradients packed
        torch.testing.assert_close(got[k], torch.cat(per_seq[k::n_in])[None])
    for a, b in zip(got[n_in:], want[n_in * len(seqs):]):
        torch.testing.assert_close(a, b)


def test_lengths_and_packed_sequence_equal_cu_seqlens():
    m = make("lstm.rnn", dict(d_in=3, d=4), "torch", "auto")
    seqs = [s[0] for s in sequences(m, (), [5, 2, 9])]
    y, final = m(torch.cat(seqs)[None], cu_seqlens=[0, 5, 7, 16])
    padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    yp, fp = m(torch.cat([padded, torch.randn(3, 2, 3, dtype=torch.float64)], 1),
               lengths=torch.tensor([5, 2, 9]))  # padding past the longest too: never read
    assert yp.shape == (3, 11, 4) and (yp[1, 2:] == 0).all() and (yp[:, 9:] == 0).all()
    yk, fk = m(torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False))
    assert isinstance(yk, torch.nn.utils.rnn.PackedSequence)
    unpacked, lens = torch.nn.utils.rnn.pad_packed_sequence(yk, batch_first=True)
    assert lens.tolist() == [5, 2, 9]
    for b, (lo, hi) in enumerate([(0, 5), (5, 7), (7, 16)]):
        torch.testing.assert_close(yp[b, :hi - lo], y[0, lo:hi])
        torch.testing.assert_close(unpacked[b, :hi - lo], y[0, lo:hi])
    for s in m.STATES:  # final states in the batch's own order, as torch.nn.LSTM's h_n
        torch.testing.assert_close(fp[s], final[s])
        torch.testing.assert_close(fk[s], final[s])


def test_output_final_state_false_and_one_tensor_initial_state():
    m = make("gla.rnn", dict(K=3, V=2), "torch", "chunk")
    seqs = sequences(m, (), [4, 3])
    packed = [torch.cat([s[k] for s in seqs])[None] for k in range(4)]
    S0 = torch.randn(2, 3, 2, dtype=torch.float64)
    y, none = m(*packed, cu_seqlens=[0, 4, 7], initial_state=S0, output_final_state=False)
    assert none is None
    torch.testing.assert_close(y, m(*packed, cu_seqlens=[0, 4, 7], initial_state={"S": S0})[0])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(cu_seqlens=[0, 4, 6]), ValueError, "rise strictly from 0 to the packed length 7"),
    (dict(cu_seqlens=[1, 7]), ValueError, "rise strictly from 0"),
    (dict(cu_seqlens=[0, 3, 3, 7]), ValueError, "each sequence at least one step"),
    (dict(cu_seqlens=torch.tensor([0.0, 7.0])), ValueError, "1-D integer tensor"),
    (dict(cu_seqlens=[0, 7], lengths=[7]), TypeError, "not both"),
    (dict(cu_seqlens=[0, 3, 7], initial_state={"h": torch.zeros(3, 4)}), ValueError,
     r"expects \[2, 4\]: one per sequence"),
])
def test_bad_varlen_calls_say_what_is_wrong(kwargs, error, message):
    m = rcc.compile(stdlib("lstm.rnn"))(d_in=3, d=4)
    with pytest.raises(error, match=message):
        m(torch.randn(1, 7, 3), **kwargs)


def test_bad_lengths_and_batches():
    m = rcc.compile(stdlib("lstm.rnn"))(d_in=3, d=4)
    with pytest.raises(ValueError, match=r"a batch of one, \[1, total, \.\.\.\]; got \[2, 7, 3\]"):
        m(torch.randn(2, 7, 3), cu_seqlens=[0, 7])
    with pytest.raises(ValueError, match="a length from 1 to 7"):
        m(torch.randn(2, 7, 3), lengths=[3, 8])
    with pytest.raises(ValueError, match="a length from 1 to 7"):
        m(torch.randn(2, 7, 3), lengths=[3])
