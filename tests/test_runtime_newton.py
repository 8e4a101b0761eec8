"""rcc.runtime.newton.newton_solve against sequential loops with autograd (float64): a diagonal GRU, a
diagonal peephole LSTM (2x2 blocks), linear and expansive cells, damping, the sequential fallback."""
import warnings

import pytest
import torch

from rcc.runtime.newton import newton_solve
from rcc.runtime.scan import linear_scan

F64 = torch.float64


# ---- cells, written from the equations, with hand-derived Jacobians --------------------------------

def gru_step(prev, x, wz, az, bz, wr, ar, br, wh, ah, bh):
    """Diagonal GRU (ParaRNN): every weight acting on h is elementwise."""
    (h,) = prev
    z = torch.sigmoid(wz * x + az * h + bz)
    r = torch.sigmoid(wr * x + ar * h + br)
    n = torch.tanh(wh * x + ah * (r * h) + bh)
    return ((1 - z) * h + z * n,)


def gru_jacobian(prev, x, wz, az, bz, wr, ar, br, wh, ah, bh):
    (h,) = prev
    z = torch.sigmoid(wz * x + az * h + bz)
    r = torch.sigmoid(wr * x + ar * h + br)
    n = torch.tanh(wh * x + ah * (r * h) + bh)
    dz = z * (1 - z) * az
    dr = r * (1 - r) * ar
    dn = (1 - n * n) * ah * (r + h * dr)
    return ((1 - z) * h + z * n,), (((1 - z) - dz * h + dz * n + z * dn,),)


def lstm_gates(prev, x, wi, ai, pi, bi, wf, af, pf, bf, wg, ag, bg, wo, ao, po, bo):
    h, c = prev
    i = torch.sigmoid(wi * x + ai * h + pi * c + bi)
    f = torch.sigmoid(wf * x + af * h + pf * c + bf)
    g = torch.tanh(wg * x + ag * h + bg)
    c_new = f * c + i * g
    o = torch.sigmoid(wo * x + ao * h + po * c_new + bo)  # output gate peeks at the new cell
    return i, f, g, c_new, o


def lstm_step(prev, *args):
    """Diagonal LSTM with peepholes: states (h, c), coupled elementwise."""
    _, _, _, c_new, o = lstm_gates(prev, *args)
    return (o * torch.tanh(c_new), c_new)


def lstm_jacobian(prev, x, wi, ai, pi, bi, wf, af, pf, bf, wg, ag, bg, wo, ao, po, bo):
    h, c = prev
    i, f, g, c_new, o = lstm_gates(prev, x, wi, ai, pi, bi, wf, af, pf, bf, wg, ag, bg, wo, ao, po, bo)
    di_dh, di_dc = i * (1 - i) * ai, i * (1 - i) * pi
    df_dh, df_dc = f * (1 - f) * af, f * (1 - f) * pf
    dg_dh = (1 - g * g) * ag
    dcn_dh = df_dh * c + di_dh * g + i * dg_dh
    dcn_dc = df_dc * c + f + di_dc * g
    do_dh = o * (1 - o) * (ao + po * dcn_dh)
    do_dc = o * (1 - o) * po * dcn_dc
    tc = torch.tanh(c_new)
    dh_dh = do_dh * tc + o * (1 - tc * tc) * dcn_dh
    dh_dc = do_dc * tc + o * (1 - tc * tc) * dcn_dc
    return (o * tc, c_new), ((dh_dh, dh_dc), (dcn_dh, dcn_dc))


def sequential(step, s0, args, seq_mask, T):
    """Reference: the plain loop over time, on [N]-row slices, differentiated by autograd."""
    N = s0[0].shape[0]
    state, outs = tuple(s0), []
    for t in range(T):
        state = step(state, *(a[t * N:(t + 1) * N] if seq else a for a, seq in zip(args, seq_mask)))
        outs.append(state)
    return tuple(torch.stack([o[i] for o in outs]) for i in range(len(s0)))


def param(*shape, scale=1.0):
    return (scale * torch.randn(shape, dtype=F64)).requires_grad_()


def compare(step, jacobian, s0, args, seq_mask, T, block, grad_wrt=None, **kw):
    """newton_solve vs the loop: trajectory, and grads w.r.t. s0 and all args that require grad."""
    traj, stats = newton_solve(step, jacobian, s0, args, block=block, seq_mask=seq_mask, **kw)
    ref = sequential(step, s0, args, seq_mask, T)
    for y, y_ref in zip(traj, ref):
        assert y.shape == y_ref.shape
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-11)
    wrt = grad_wrt or [t for t in (*s0, *args) if isinstance(t, torch.Tensor) and t.requires_grad]
    weights = [torch.randn_like(y) for y in ref]
    loss = sum((y * w).sum() for y, w in zip(traj, weights))
    loss_ref = sum((y * w).sum() for y, w in zip(ref, weights))
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads_ref = torch.autograd.grad(loss_ref, wrt, allow_unused=True)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)
    return traj, stats


def gru_problem(T, N, shape, weight_scale=1.0, x_scale=1.0):
    d = shape[-1]
    x = (x_scale * torch.randn((T * N,) + shape, dtype=F64)).requires_grad_()
    params = [param(d, scale=weight_scale) for _ in range(9)]
    s0 = (param(N, *shape),)
    return s0, (x, *params), (True,) + (False,) * 9


# ---- tests -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("d", [1, 5])
def test_gru_matches_loop(T, d):
    s0, args, mask = gru_problem(T, 3, (d,))
    _, stats = compare(gru_step, gru_jacobian, s0, args, mask, T, block=1)
    assert stats["converged"] and not stats["fallback"]
    if T == 1:
        assert stats["iterations"] == 0  # the warm start f(s0, x_0) is already the answer


def test_gru_state_with_heads_axis():
    T, N = 9, 3
    s0, args, mask = gru_problem(T, N, (2, 4))  # state [N, 2, 4], params broadcast over the first axis
    compare(gru_step, gru_jacobian, s0, args, mask, T, block=1)


def test_gru_contractive_long_sequence_few_iterations():
    T, N = 1000, 3
    s0, args, mask = gru_problem(T, N, (5,), weight_scale=0.5)
    traj, stats = newton_solve(gru_step, gru_jacobian, s0, args, block=1, seq_mask=mask)
    assert stats["converged"] and not stats["fallback"]
    assert 1 <= stats["iterations"] <= 8
    with torch.no_grad():
        ref = sequential(gru_step, s0, args, mask, T)
    torch.testing.assert_close(traj[0], ref[0], rtol=1e-12, atol=1e-12)
    assert stats["residual"] <= 1e-13


def test_gru_float32_long_sequence_is_nan_free():
    T, N, d = 2000, 2, 3
    s0, args, mask = gru_problem(T, N, (d,), weight_scale=1.5, x_scale=4.0)
    s0 = tuple(s.detach().float() for s in s0)
    args = tuple(a.detach().float() for a in args)
    (traj,), stats = newton_solve(gru_step, gru_jacobian, s0, args, block=1, seq_mask=mask)
    assert torch.isfinite(traj).all()
    assert stats["converged"] or stats["fallback"]
    ref = sequential(gru_step, s0, args, mask, T)[0]
    torch.testing.assert_close(traj, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("d", [1, 5])
def test_peephole_lstm_two_state_blocks(T, d):
    N = 3
    x = torch.randn(T * N, d, dtype=F64, requires_grad=True)
    params = [param(d) for _ in range(15)]
    s0 = (param(N, d), param(N, d))
    _, stats = compare(lstm_step, lstm_jacobian, s0, (x, *params), (True,) + (False,) * 15, T, block=2)
    assert stats["converged"] and not stats["fallback"]


def test_block_with_missing_jacobian_entries_and_partial_grads():
    # (h, c): c' = a*c + x (does not read h), h' = tanh(w*h + c'): J = ((.., ..), (None, a)).
    T, N, d = 11, 3, 4

    def step(prev, x, a, w):
        h, c = prev
        c_new = a * c + x
        return (torch.tanh(w * h + c_new), c_new)

    def jacobian(prev, x, a, w):
        h, c = prev
        c_new = a * c + x
        y = torch.tanh(w * h + c_new)
        return (y, c_new), (((1 - y * y) * w, (1 - y * y) * a), (None, a))

    x = torch.randn(T * N, d, dtype=F64, requires_grad=True)
    a = torch.rand(d, dtype=F64, requires_grad=True)
    w = torch.randn(d, dtype=F64)  # does not require grad
    s0 = (torch.randn(N, d, dtype=F64), torch.randn(N, d, dtype=F64, requires_grad=True))
    compare(step, jacobian, s0, (x, a, w), (True, False, False), T, block=2)


def test_linear_cell_is_one_newton_step_and_param_jacobian_broadcasts():
    T, N, d = 33, 3, 5

    def step(prev, x, a):
        return (a * prev[0] + x,)

    def jacobian(prev, x, a):
        return (a * prev[0] + x,), ((a,),)  # J is the parameter itself, shape [d]

    a = torch.rand(d, dtype=F64, requires_grad=True)
    x = torch.randn(T * N, d, dtype=F64, requires_grad=True)
    s0 = (torch.randn(N, d, dtype=F64, requires_grad=True),)
    _, stats = compare(step, jacobian, s0, (x, a), (True, False), T, block=1)
    assert stats["iterations"] == 1 and stats["converged"]


def test_autonomous_cell_needs_length_and_python_number_args():
    # No sequence args: T comes from `length`; a python float arg is a constant.
    T, N, d = 9, 2, 3

    def step(prev, k):
        return (torch.cos(k * prev[0]),)

    def jacobian(prev, k):
        return (torch.cos(k * prev[0]),), ((-k * torch.sin(k * prev[0]),),)

    s0 = (torch.rand(N, d, dtype=F64, requires_grad=True),)
    (traj,), stats = newton_solve(step, jacobian, s0, (0.7,), block=1, seq_mask=(False,), length=T)
    ref = sequential(step, s0, (0.7,), (False,), T)[0]
    torch.testing.assert_close(traj, ref)
    (g,) = torch.autograd.grad(traj.sum(), s0)
    (g_ref,) = torch.autograd.grad(ref.sum(), s0)
    torch.testing.assert_close(g, g_ref)
    with pytest.raises(ValueError, match="seq_mask"):
        newton_solve(step, jacobian, s0, (torch.tensor(0.7),), block=1)
    with pytest.raises(ValueError, match="cannot tell T"):
        newton_solve(step, jacobian, s0, (0.7,), block=1, seq_mask=(False,))


# A map whose Newton iterates overflow: the period-2 logistic map h' = r*h*(1-h) + x, r = 3.2 (stable,
# not chaotic, trajectory stays in (0, 1)), with local slopes up to 3.2 that the linear solve multiplies.
LOGISTIC_R = 3.2


def logistic_step(prev, x, r):
    h = prev[0]
    return (r * h * (1 - h) + x,)


def logistic_jacobian(prev, x, r):
    h = prev[0]
    return (r * h * (1 - h) + x,), ((r * (1 - 2 * h),),)


def plain_newton(step, jacobian, s0, args, T, iterations):
    """Undamped Newton written out here (warm start, then linearise and scan), for the divergence check."""
    N = s0.shape[0]
    (h,) = step((s0.repeat(T, *([1] * (s0.dim() - 1))),), *args)
    for _ in range(iterations):
        prev = torch.cat((s0, h[:-N]))
        (F,), ((J,),) = jacobian((prev,), *args)
        shape = (T, N) + tuple(s0.shape[1:])
        h = linear_scan(J.reshape(shape), (F - J * prev).reshape(shape), s0).reshape(F.shape)
    return h


@pytest.mark.parametrize("T", [33, 200])
def test_divergent_newton_is_damped_or_finished_sequentially(T):
    N, d = 3, 2
    x = (0.01 * torch.rand(T * N, d, dtype=F64)).requires_grad_()
    r = torch.tensor(LOGISTIC_R, dtype=F64, requires_grad=True)
    s0 = ((0.2 + 0.6 * torch.rand(N, d, dtype=F64)).requires_grad_(),)
    with torch.no_grad():
        undamped = plain_newton(logistic_step, logistic_jacobian, s0[0], (x, r), T, iterations=6)
    assert not torch.isfinite(undamped).all()  # plain Newton overflows on this cell
    with pytest.warns(RuntimeWarning, match="finished sequentially"):
        _, stats = compare(logistic_step, logistic_jacobian, s0, (x, r), (True, False), T, block=1)
    assert stats["damped"] > 0
    assert stats["fallback"] and not stats["converged"]
    assert stats["residual"] <= 1e-12


def test_expansive_tanh_converges_with_damping():
    # h' = tanh(5 h + x): bistable, slopes up to 5; plain Newton's residual grows before it settles.
    T, N, d = 33, 3, 1

    def step(prev, x, w):
        return (torch.tanh(w * prev[0] + x),)

    def jacobian(prev, x, w):
        y = torch.tanh(w * prev[0] + x)
        return (y,), ((w * (1 - y * y),),)

    torch.manual_seed(1)
    x = (2 * torch.randn(T * N, d, dtype=F64)).requires_grad_()
    w = torch.tensor(5.0, dtype=F64, requires_grad=True)
    s0 = (torch.randn(N, d, dtype=F64, requires_grad=True),)
    with torch.no_grad():
        residuals = []
        for iterations in range(4):
            h = plain_newton(step, jacobian, s0[0], (x, w), T, iterations)
            residuals.append((h - step((torch.cat((s0[0], h[:-N])),), x, w)[0]).abs().max().item())
    assert max(residuals[1:]) > 2 * residuals[0]  # the undamped residual grows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converges without the sequential fallback
        _, stats = compare(step, jacobian, s0, (x, w), (True, False), T, block=1)
    assert stats["converged"] and stats["damped"] > 0 and not stats["fallback"]


def test_fallback_with_tiny_iteration_budget_is_exact_and_warns_once():
    T = 33
    s0, args, mask = gru_problem(T, 3, (5,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, stats = compare(gru_step, gru_jacobian, s0, args, mask, T, block=1, max_iter=1)
    assert stats["fallback"] and stats["iterations"] == 1
    assert len([w for w in caught if "finished sequentially" in str(w.message)]) == 1
