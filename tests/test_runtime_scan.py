"""rcc.runtime.scan: linear_scan and block_scan against python loops of the recurrences (float64),
forward and gradients, broadcast decays, T=1, and T=100k with decays near 0 and near 1."""
import pytest
import torch

from rcc.runtime.scan import block_scan, linear_scan

F64 = torch.float64


def linear_loop(a, b, s0):
    """s_t = a_t * s_{t-1} + b_t with a broadcast by torch exactly as written (right-aligned)."""
    a = a.reshape((1,) * (b.dim() - a.dim()) + tuple(a.shape))
    states, s = [], s0
    for t in range(b.shape[0]):
        s = a[t if a.shape[0] > 1 else 0] * s + b[t]
        states.append(s)
    return torch.stack(states)


def block_loop(A, b, s0):
    A = A.reshape((1,) * (b.dim() + 1 - A.dim()) + tuple(A.shape))
    states, s = [], s0
    for t in range(b.shape[0]):
        s = (A[t if A.shape[0] > 1 else 0] @ s.unsqueeze(-1)).squeeze(-1) + b[t]
        states.append(s)
    return torch.stack(states)


def check_against(fn, ref, inputs):
    """Forward equal, and gradients of a random projection equal for every input that requires grad."""
    out, out_ref = fn(*inputs), ref(*inputs)
    torch.testing.assert_close(out, out_ref)
    weights = torch.randn_like(out_ref)
    wrt = [x for x in inputs if x.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), wrt)
    grads_ref = torch.autograd.grad((out_ref * weights).sum(), wrt)
    for g, g_ref, x in zip(grads, grads_ref, wrt):
        assert g.shape == x.shape
        torch.testing.assert_close(g, g_ref)


def leaf(*shape, low=None, high=None):
    if low is None:
        return torch.randn(shape, dtype=F64, requires_grad=True)
    return (low + (high - low) * torch.rand(shape, dtype=F64)).requires_grad_()


@pytest.mark.parametrize("T", [1, 2, 7, 33])
@pytest.mark.parametrize("d", [1, 5])
@pytest.mark.parametrize("a_shape", ["full", "per_time_shared_batch", "per_channel_const", "scalar",
                                     "time_only"])
def test_linear_scan_matches_loop(T, d, a_shape):
    N = 3
    shapes = {"full": (T, N, d), "per_time_shared_batch": (T, 1, d), "per_channel_const": (d,),
              "scalar": (), "time_only": (T, 1, 1)}
    a = leaf(*shapes[a_shape], low=-1.1, high=1.1)
    check_against(linear_scan, linear_loop, (a, leaf(T, N, d), leaf(N, d)))


@pytest.mark.parametrize("T", [1, 7, 33])
def test_linear_scan_matrix_state_with_key_decay(T):
    # GLA-style: decay per key [T, N, K, 1] against a state [T, N, K, V]; a stays small.
    N, K, V = 3, 4, 5
    check_against(linear_scan, linear_loop,
                  (leaf(T, N, K, 1, low=0.0, high=1.0), leaf(T, N, K, V), leaf(N, K, V)))


def test_linear_scan_partial_requires_grad_and_broadcast_views():
    T, N, d = 9, 3, 5
    a = torch.rand(T, N, d, dtype=F64)  # no grad
    x = leaf(T, 1, d)
    b = x.expand(T, N, d)  # a broadcast view: the grad must flow back to x summed over N
    s0_row = leaf(d)
    s0 = s0_row.expand(N, d)
    check_against(lambda a, x, s: linear_scan(a, x.expand(T, N, d), s.expand(N, d)),
                  lambda a, x, s: linear_loop(a, x.expand(T, N, d), s.expand(N, d)), (a, x, s0_row))
    # s0 alone requiring grad, given with fewer dims than b[0]
    out = linear_scan(a, b.detach(), s0)
    (g,) = torch.autograd.grad(out.sum(), s0_row)
    (g_ref,) = torch.autograd.grad(linear_loop(a, b.detach(), s0).sum(), s0_row)
    torch.testing.assert_close(g, g_ref)


def test_linear_scan_float32_and_dtype_of_grads():
    T, N, d = 17, 3, 5
    a = torch.rand(T, N, d, requires_grad=True)
    b = torch.randn(T, N, d, requires_grad=True)
    s0 = torch.randn(N, d, requires_grad=True)
    out = linear_scan(a, b, s0)
    assert out.dtype == torch.float32
    ref = linear_loop(a.double(), b.double(), s0.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), (a, b, s0))
    assert all(g.dtype == torch.float32 for g in grads)


def python_float_scan(a, b, s0):
    """Reference in python floats (float64) for long sequences: [T, M] lists, M small."""
    s = list(s0)
    out = []
    for a_t, b_t in zip(a, b):
        s = [ai * si + bi for ai, si, bi in zip(a_t, s, b_t)]
        out.append(s)
    return out


def python_float_adjoint(a, g):
    """lam_t = g_t + a_{t+1} lam_{t+1}, in python floats."""
    T = len(g)
    lam = [None] * T
    nxt = [0.0] * len(g[0])
    for t in range(T - 1, -1, -1):
        a_next = a[t + 1] if t + 1 < T else [0.0] * len(nxt)
        nxt = [gi + ai * li for gi, ai, li in zip(g[t], a_next, nxt)]
        lam[t] = nxt
    return lam


def test_linear_scan_long_sequence_extreme_decays():
    # T = 100k: channel 0 decays ~1e-30 (states forget at once), channel 1 decays 1 - 1e-12 (a sum of
    # 100k inputs), channel 2 random in (0, 1). No NaN or inf, equal to a float64 loop, grads too.
    T = 100_000
    a = torch.empty(T, 1, 3, dtype=F64)
    a[..., 0] = 1e-30 * torch.rand(T, 1, dtype=F64)
    a[..., 1] = 1.0 - 1e-12 * torch.rand(T, 1, dtype=F64)
    a[..., 2] = torch.rand(T, 1, dtype=F64)
    b = torch.randn(T, 1, 3, dtype=F64)
    s0 = torch.randn(1, 3, dtype=F64)
    a.requires_grad_()
    b.requires_grad_()
    s0.requires_grad_()
    out = linear_scan(a, b, s0)
    a_list, b_list = a.detach()[:, 0].tolist(), b.detach()[:, 0].tolist()
    ref = torch.tensor(python_float_scan(a_list, b_list, s0.detach()[0].tolist()), dtype=F64)
    assert torch.isfinite(out).all()
    # channel 1 is a sum of 100k unit normals (|s| ~ 300): relative to that scale
    torch.testing.assert_close(out[:, 0], ref, rtol=1e-10, atol=1e-9)
    g = torch.randn(T, 1, 3, dtype=F64)
    ga, gb, gs0 = torch.autograd.grad(out, (a, b, s0), g)
    lam = torch.tensor(python_float_adjoint(a_list, g[:, 0].tolist()), dtype=F64)
    prev = torch.cat((s0.detach(), ref[:-1]))
    assert all(torch.isfinite(x).all() for x in (ga, gb, gs0))
    torch.testing.assert_close(gb[:, 0], lam, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(ga[:, 0], lam * prev, rtol=1e-10, atol=1e-6)
    torch.testing.assert_close(gs0[0], a.detach()[0, 0] * lam[0], rtol=1e-10, atol=1e-9)


def test_linear_scan_long_sequence_float32_finite():
    T = 100_000
    a = torch.stack([torch.full((T,), 1e-30), torch.full((T,), 1 - 1e-7), torch.rand(T)], -1)[:, None]
    b = torch.randn(T, 1, 3)
    out = linear_scan(a, b, torch.zeros(1, 3))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 0, 0], b[:, 0, 0], rtol=1e-6, atol=1e-6)  # forgets at once
    ref = torch.tensor(python_float_scan(a[:, 0].double().tolist(), b[:, 0].double().tolist(), [0.0] * 3),
                       dtype=F64)
    torch.testing.assert_close(out[:, 0].double(), ref, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_block_scan_matches_loop(T, k):
    N, E = 3, 5
    A = (0.6 * torch.randn(T, N, E, k, k, dtype=F64)).requires_grad_()
    check_against(block_scan, block_loop, (A, leaf(T, N, E, k), leaf(N, E, k)))


@pytest.mark.parametrize("k", [2, 3])
def test_block_scan_broadcast_blocks(k):
    T, N, E = 11, 3, 4
    # blocks shared across the batch, and blocks constant in time
    A_shared = (0.6 * torch.randn(T, 1, E, k, k, dtype=F64)).requires_grad_()
    check_against(block_scan, block_loop, (A_shared, leaf(T, N, E, k), leaf(N, E, k)))
    A_const = (0.6 * torch.randn(E, k, k, dtype=F64)).requires_grad_()
    check_against(block_scan, block_loop, (A_const, leaf(T, N, E, k), leaf(N, E, k)))
    # no E axis, and only b requiring grad
    A = 0.6 * torch.randn(T, N, k, k, dtype=F64)
    check_against(block_scan, block_loop, (A, leaf(T, N, k), torch.randn(N, k, dtype=F64)))


def test_block_scan_long_sequence_rotations_stay_finite():
    # 2x2 rotations scaled by 1 - 1e-9: norm-preserving to rounding over 20k steps.
    T = 20_000
    theta = torch.rand(T, 1, dtype=F64)
    c, s = torch.cos(theta) * (1 - 1e-9), torch.sin(theta) * (1 - 1e-9)
    A = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    b = 0.01 * torch.randn(T, 1, 2, dtype=F64)
    s0 = torch.randn(1, 2, dtype=F64)
    out = block_scan(A, b, s0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, block_loop(A, b, s0), rtol=1e-9, atol=1e-9)


def test_gradcheck_small():
    T, N, d = 5, 2, 3
    a = torch.rand(T, N, 1, dtype=F64, requires_grad=True)
    torch.autograd.gradcheck(linear_scan, (a, leaf(T, N, d), leaf(N, d)))
    A = (0.5 * torch.randn(T, N, 2, 2, dtype=F64)).requires_grad_()
    torch.autograd.gradcheck(block_scan, (A, leaf(T, N, 2), leaf(N, 2)))
