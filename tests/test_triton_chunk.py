"""Backend triton's chunked kernels (plan chunk) against the torch reference (rcc.runtime.chunk,
itself checked against loops of the recurrences in test_runtime_chunk.py), in Triton's
interpreter: forward and backward, float64 and float32, T not a multiple of the chunk or the
sub-chunk, key and value sizes that are not powers of two (several blocks), initial states,
and log-decays near -inf and near 0."""
import pytest
import torch

from rcc.runtime import chunk as reference

F64, F32 = torch.float64, torch.float32


def _gradients(fn, inputs, cotangents):
    outs = fn(*inputs)
    loss = sum((o * c).sum() for o, c in zip(outs, cotangents))
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    return list(outs) + list(torch.autograd.grad(loss, wrt))


def _compare(fn, ref, inputs, cotangents, dtype):
    got, want = _gradients(fn, inputs, cotangents), _gradients(ref, inputs, cotangents)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        if dtype == F64:
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
        else:  # float32 noise on values of order one
            torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5 * max(1.0, w.abs().max().item()))


def _gla_inputs(N, T, K, V, G, dtype, log_decay=None, seed=0):
    torch.manual_seed(seed)
    q, k = (torch.randn(N, T, K, dtype=dtype) for _ in range(2))
    v = torch.randn(N, T, V, dtype=dtype)
    if log_decay is None:
        g = -torch.nn.functional.softplus(torch.randn(N, T, G, dtype=dtype))
    else:
        g = torch.full((N, T, G), log_decay, dtype=dtype)
    s0 = torch.randn(N, K, V, dtype=dtype)
    cot = [torch.randn(N, T, V, dtype=dtype), torch.randn(N, K, V, dtype=dtype)]
    return [x.requires_grad_() for x in (q, k, v, g, s0)], cot


@pytest.mark.parametrize("N,T,K,V,G,chunk,dtype,log_decay", [
    (2, 9, 3, 2, 3, 16, F64, None), (1, 1, 4, 4, 4, 64, F64, None),  # T = 1
    (3, 21, 5, 7, 1, 16, F64, None),  # G = 1: a scalar decay
    (2, 40, 3, 70, 3, 16, F64, None),  # three blocks of value columns
    (1, 130, 48, 80, 48, 64, F64, None),  # two blocks of keys, three of values, a partial chunk
    (2, 130, 6, 5, 1, 64, F64, None), (2, 15, 5, 4, 5, 32, F32, None), (1, 130, 33, 17, 1, 64, F32, None),
    (1, 70, 5, 4, 5, 64, F64, -60.0), (1, 70, 5, 4, 1, 64, F64, -60.0),  # decays near 0
    (1, 70, 5, 4, 5, 64, F64, -1e-6), (1, 70, 5, 4, 1, 64, F32, -1e-6),  # decays near 1
    (1, 70, 5, 4, 5, 64, F32, -60.0)])
@pytest.mark.parametrize("prev", [False, True])  # o_t reads the state after step t, or before (RWKV-6)
def test_chunk_linear_attention(N, T, K, V, G, chunk, dtype, log_decay, prev):
    from rcc.runtime.triton import chunk_linear_attention
    inputs, cot = _gla_inputs(N, T, K, V, G, dtype, log_decay)
    _compare(lambda *x: chunk_linear_attention(*x, chunk_size=chunk, prev=prev),
             lambda *x: reference.chunk_linear_attention(*x, chunk_size=chunk, prev=prev), inputs, cot,
             dtype)


def test_chunk_linear_attention_without_initial_state_or_cotangents():
    """S0 None is zeros; an output whose gradient is not asked for (only o, or only S_T) counts
    as zero."""
    from rcc.runtime.triton import chunk_linear_attention
    (q, k, v, g, _), _ = _gla_inputs(2, 19, 4, 3, 4, F64)
    for pick in (0, 1):
        got = torch.autograd.grad(chunk_linear_attention(q, k, v, g)[pick].sum(), [q, k, v, g])
        want = torch.autograd.grad(reference.chunk_linear_attention(q, k, v, g)[pick].sum(), [q, k, v, g],
                                   allow_unused=True, materialize_grads=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    o, S = chunk_linear_attention(q[:, :0], k[:, :0], v[:, :0], g[:, :0])
    assert o.shape == (2, 0, 3) and S.shape == (2, 4, 3) and not S.any()


def _delta_inputs(N, T, n_h, K, V, gate, dtype, log_decay=None, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(N, T, K, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(N, T, n_h, K, dtype=dtype), dim=-1)
    beta = torch.sigmoid(torch.randn(N, T, n_h, dtype=dtype))
    u = torch.randn(N, T, n_h, V, dtype=dtype)
    g = None
    if gate:
        g = (-torch.nn.functional.softplus(torch.randn(N, T, dtype=dtype)) if log_decay is None
             else torch.full((N, T), log_decay, dtype=dtype)).requires_grad_()
    s0 = torch.randn(N, K, V, dtype=dtype)
    cot = [torch.randn(N, T, V, dtype=dtype), torch.randn(N, K, V, dtype=dtype)]
    return [x.requires_grad_() for x in (q, k, u, beta)] + [g, s0.requires_grad_()], cot


@pytest.mark.parametrize("N,T,n_h,K,V,gate,chunk,dtype,log_decay", [
    (2, 9, 1, 3, 2, True, 4, F64, None), (1, 1, 1, 4, 4, False, 16, F64, None),  # T = 1
    (2, 11, 2, 3, 5, True, 4, F64, None),  # DeltaProduct: two micro-steps per token
    (1, 13, 3, 4, 3, True, 2, F64, None),  # three: slots past 3 C are identity steps
    (2, 40, 1, 5, 70, False, 64, F64, None),  # three blocks of value columns
    (1, 130, 1, 48, 80, True, 64, F64, None),  # two key blocks, three value blocks, a partial chunk
    (1, 130, 2, 33, 17, True, 64, F32, None), (2, 15, 1, 5, 4, True, 64, F32, None),
    (1, 70, 2, 5, 4, True, 64, F64, -60.0), (1, 70, 3, 5, 4, True, 64, F64, -60.0),  # gates near 0
    (1, 70, 1, 5, 4, True, 64, F64, -1e-6), (1, 70, 1, 5, 4, True, 64, F32, -60.0)])  # near 1
def test_chunk_delta_rule(N, T, n_h, K, V, gate, chunk, dtype, log_decay):
    from rcc.runtime.triton import chunk_delta_rule
    inputs, cot = _delta_inputs(N, T, n_h, K, V, gate, dtype, log_decay)
    _compare(lambda *x: chunk_delta_rule(*x, chunk_size=chunk),
             lambda *x: reference.chunk_delta_rule(*x, chunk_size=chunk), inputs, cot, dtype)


def _dplr_inputs(N, T, M, K, V, G1, dtype, log_decay=None, seed=0):
    torch.manual_seed(seed)
    q = torch.randn(N, T, K, dtype=dtype)
    key = torch.nn.functional.normalize(torch.randn(N, T, M, K, dtype=dtype), dim=-1)
    a = -torch.sigmoid(torch.randn(N, T, M, 1, dtype=dtype)) * key  # KDA's removal, -beta k
    b = key * torch.sigmoid(torch.randn(N, T, M, K, dtype=dtype))
    k = 0.5 * torch.randn(N, T, M, K, dtype=dtype)
    u = torch.randn(N, T, M, V, dtype=dtype)
    g = (-torch.nn.functional.softplus(torch.randn(N, T, M, G1, dtype=dtype)) if log_decay is None
         else torch.full((N, T, M, G1), log_decay, dtype=dtype))
    s0 = torch.randn(N, K, V, dtype=dtype)
    cot = [torch.randn(N, T, V, dtype=dtype), torch.randn(N, K, V, dtype=dtype)]
    return [x.requires_grad_() for x in (q, g, a, b, k, u, s0)], cot


@pytest.mark.parametrize("N,T,M,K,V,G1,chunk,dtype,log_decay", [
    (2, 9, 1, 3, 2, 3, 16, F64, None), (1, 1, 1, 4, 4, 4, 64, F64, None),  # T = 1
    (2, 11, 2, 3, 5, 3, 4, F64, None),  # two micro-steps a token (per-key gated DeltaProduct)
    (1, 13, 3, 4, 3, 1, 2, F64, None),  # three, and one decay for every key (Comba)
    (1, 70, 1, 20, 6, 20, 64, F64, None), (1, 130, 1, 48, 20, 1, 64, F64, None),
    (1, 70, 2, 5, 4, 5, 64, F64, -60.0), (1, 70, 1, 5, 4, 5, 64, F64, -1e-6),
    (1, 70, 1, 20, 6, 20, 64, F32, None)])
def test_chunk_dplr(N, T, M, K, V, G1, chunk, dtype, log_decay):
    from rcc.runtime.dplr import chunk_dplr as torch_dplr
    from rcc.runtime.triton import chunk_dplr
    inputs, cot = _dplr_inputs(N, T, M, K, V, G1, dtype, log_decay)
    _compare(lambda *x: chunk_dplr(*x, chunk_size=chunk), lambda *x: torch_dplr(*x, chunk_size=chunk),
             inputs, cot, dtype)


def test_a_new_length_or_batch_never_recompiles():
    """Every chunk and scan kernel takes the length, the number of chunks and the rows (batch x
    heads) unspecialized: Triton would otherwise compile a new kernel for T=1, for a multiple of 16
    and for every other length or batch. Only the head sizes (K, V, the decay's width) are."""
    from rcc.runtime.triton import chunk_delta, chunk_gla, dplr, scan
    kernels = {}
    for mod in (chunk_gla, chunk_delta, dplr, scan):
        for name, k in vars(mod).items():
            if not name.startswith(("_chunk_", "_delta_", "_dplr_", "_linear_scan")):
                continue  # a helper, inlined into the kernels that call it
            while type(k).__name__ == "Autotuner":
                k = k.fn
            if hasattr(k, "params"):  # compiled for a GPU
                kernels[name] = {p.name: p.do_not_specialize for p in k.params}
            elif type(k).__name__ == "InterpretedFunction":  # in the interpreter
                free = k.kwargs.get("do_not_specialize") or ()
                kernels[name] = {a: a in free for a in k.arg_names}
    assert len(kernels) == 13, sorted(kernels)
    for name, args in kernels.items():
        for arg, unspecialized in args.items():
            if arg in ("T", "NC", "N", "M", "a_st", "A_st"):
                assert unspecialized, (name, arg)
