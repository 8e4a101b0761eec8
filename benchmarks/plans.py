"""rcc's plans (sequential, scan, chunk, newton) of twelve stdlib cells side by side with the Python
loop over time a user would write by hand in plain torch, in one run on one machine.

    python benchmarks/plans.py                                  # B=4, T in {256, 2048}, CPU
    python benchmarks/plans.py --T 64 --repeats 1 --cells mingru gla   # a quick check
    python benchmarks/plans.py --device cuda                    # on a GPU (synchronized timings)

Every plan the analysis finds legal for a cell (rcc.analyze(path).plans) is compiled, given the
parameters of the sequential module, and run on the same float32 inputs. Before anything is timed,
each plan and the hand loop are compared with plan sequential: outputs, final states, and the
gradients of sum(outputs) with respect to every input and parameter; the script stops if a largest
|difference| exceeds --tolerance times the largest |value| of the sequential result (or 1, if
larger). A plan that fails to compile or run is left out of the table with a printed note.

"fwd" runs under torch.no_grad(); "fwd+bwd" runs the forward with autograd and then the gradient of
sum(outputs) with respect to every input and parameter. Each figure is the median of --repeats runs
after --warmup runs. Ratios are time / time of plan sequential and time / time of the hand loop
(lower is faster). "its" is the Newton iteration count of plan newton's last forward ("fb": it
finished sequentially). The plan that plan 'auto' (the cost model) picks for the call is marked
with "<auto".
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing rcc

import rcc  # noqa: E402
from common import median_ms, print_machine  # noqa: E402

CELLS = ("mingru", "gla", "retnet", "deltanet", "gated_deltanet", "deltaproduct",
         "pararnn_gru", "pararnn_lstm", "kda", "rwkv7", "comba", "mlstm")
N_HOUSEHOLDER = 2  # DeltaProduct's n_h


# ---------------------------------------------------------------------------------------------
# The hand loops: the papers' equations stepped by a Python loop in plain torch, with everything
# that reads no state (projections, gates of the inputs, decays) computed for all steps before the
# loop, and sequences split with unbind (indexing x[:, t] per step makes backward O(T^2)).
# Each takes the module (for its parameters and dims) and the inputs; returns (y, final states).
# ---------------------------------------------------------------------------------------------

def mingru_loop(m, x):
    z = torch.sigmoid(F.linear(x, m.Wz, m.bz))
    candidate = F.linear(x, m.Wh, m.bh)
    h = x.new_zeros(x.shape[0], m.bz.shape[0])
    ys = []
    for z_t, candidate_t in zip(z.unbind(1), candidate.unbind(1)):
        h = (1 - z_t) * h + z_t * candidate_t
        ys.append(h)
    return torch.stack(ys, 1), {"h": h}


def _readout(q_t, S):
    """o = S^T q per head: q_t [B, H, K], S [B, H, K, V] -> [B, H, V]."""
    return (q_t.unsqueeze(-2) @ S).squeeze(-2)


def gla_loop(m, q, k, v, gk):
    B, _, H, K = q.shape
    q = q * K ** -0.5
    decay = gk.exp().unsqueeze(-1)
    S = q.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for q_t, k_t, v_t, a_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), decay.unbind(1)):
        S = a_t * S + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        outs.append(_readout(q_t, S))
    return torch.stack(outs, 1), {"S": S}


def retnet_loop(m, q, k, v):
    B, _, H, K = q.shape
    q = q * K ** -0.5
    gamma = (1 - 2.0 ** (-5 - torch.arange(H, dtype=q.dtype, device=q.device)))[:, None, None]
    S = q.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for q_t, k_t, v_t in zip(q.unbind(1), k.unbind(1), v.unbind(1)):
        S = gamma * S + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        outs.append(_readout(q_t, S))
    return torch.stack(outs, 1), {"S": S}


def _delta_update(S, k_t, v_t, beta_t):
    """S + k (beta (v - S^T k))^T: move what the memory returns for k a step beta towards v."""
    recalled = (k_t.unsqueeze(-2) @ S).squeeze(-2)
    return S + k_t.unsqueeze(-1) * (beta_t.unsqueeze(-1) * (v_t - recalled)).unsqueeze(-2)


def deltanet_loop(m, q, k, v, beta):
    B, _, H, K = q.shape
    q = q * K ** -0.5
    S = q.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for q_t, k_t, v_t, beta_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), beta.unbind(1)):
        S = _delta_update(S, k_t, v_t, beta_t)
        outs.append(_readout(q_t, S))
    return torch.stack(outs, 1), {"S": S}


def gated_deltanet_loop(m, q, k, v, beta, g):
    B, _, H, K = q.shape
    q = q * K ** -0.5
    decay = g.exp()[..., None, None]
    S = q.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for q_t, k_t, v_t, beta_t, a_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), beta.unbind(1),
                                          decay.unbind(1)):
        S = _delta_update(a_t * S, k_t, v_t, beta_t)
        outs.append(_readout(q_t, S))
    return torch.stack(outs, 1), {"S": S}


def deltaproduct_loop(m, q, k, v, beta, g):
    B, _, H, K = q.shape
    q = q * K ** -0.5
    decay = g.exp()[..., None, None]
    S = q.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for q_t, k_t, v_t, beta_t, a_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), beta.unbind(1),
                                          decay.unbind(1)):
        S = a_t * S
        for j in range(k_t.shape[-2]):  # n_h Householder-like steps per token
            S = _delta_update(S, k_t[..., j, :], v_t[..., j, :], beta_t[..., j])
        outs.append(_readout(q_t, S))
    return torch.stack(outs, 1), {"S": S}


def kda_loop(m, q, k, v, g, beta):
    B, _, H, K = q.shape
    q = q * K ** -0.5
    S = q.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for q_t, k_t, v_t, g_t, beta_t in zip(*(x.unbind(1) for x in (q, k, v, g, beta))):
        S = _delta_update(g_t.exp().unsqueeze(-1) * S, k_t, v_t, beta_t)  # per-key decay first
        outs.append(_readout(q_t, S))
    return torch.stack(outs, 1), {"S": S}


def rwkv7_loop(m, r, log_w, k, v, kk, a):
    B, _, H, K = r.shape
    S = r.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for r_t, w_t, k_t, v_t, kk_t, a_t in zip(*(x.unbind(1) for x in (r, log_w, k, v, kk, a))):
        removed = (a_t * kk_t).unsqueeze(-1) * _readout(kk_t, S).unsqueeze(-2)
        S = w_t.exp().unsqueeze(-1) * S - removed + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        outs.append(_readout(r_t, S))
    return torch.stack(outs, 1), {"S": S}


def comba_loop(m, q, k, v, p, beta, g):
    B, _, H, K = q.shape
    q = q * K ** -0.5
    S = q.new_zeros(B, H, K, v.shape[-1])
    outs = []
    for q_t, k_t, v_t, p_t, beta_t, g_t in zip(*(x.unbind(1) for x in (q, k, v, p, beta, g))):
        S = g_t.exp()[..., None, None] * S
        delta = beta_t.unsqueeze(-1) * (v_t - _readout(p_t, S))
        S = S + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
        outs.append(_readout(q_t, S))
    return torch.stack(outs, 1), {"S": S}


def mlstm_loop(m, q, k, v, i_pre, f_pre):
    B, _, H, K = q.shape
    k = k * K ** -0.5
    log_f = F.logsigmoid(f_pre)
    C = q.new_zeros(B, H, K, v.shape[-1])
    n = q.new_zeros(B, H, K)
    m_t = q.new_zeros(B, H)
    outs = []
    for q_t, k_t, v_t, i_t, lf_t in zip(*(x.unbind(1) for x in (q, k, v, i_pre, log_f))):
        m_next = torch.maximum(lf_t + m_t, i_t)  # the stabiliser
        i, f = torch.exp(i_t - m_next), torch.exp(lf_t + m_t - m_next)
        C = f[..., None, None] * C + (i[..., None] * k_t).unsqueeze(-1) * v_t.unsqueeze(-2)
        n = f[..., None] * n + i[..., None] * k_t
        m_t = m_next
        norm = torch.maximum((n * q_t).sum(-1).abs(), torch.exp(-m_t))
        outs.append(_readout(q_t, C) / norm[..., None])
    return torch.stack(outs, 1), {"C": C, "n": n, "m": m_t}


def pararnn_gru_loop(m, x):
    # the three input projections as one matmul, as a careful user would fuse them
    weights = torch.cat([m.Wz, m.Wr, m.Wh])
    biases = torch.cat([m.bz, m.br, m.bh])
    projected = F.linear(x, weights, biases)
    h = x.new_zeros(x.shape[0], m.bz.shape[0])
    ys = []
    for p_t in projected.unbind(1):
        xz, xr, xh = p_t.chunk(3, -1)
        z = torch.sigmoid(xz + m.az * h)
        r = torch.sigmoid(xr + m.ar * h)
        n = torch.tanh(xh + m.ah * (r * h))
        h = (1 - z) * h + z * n
        ys.append(h)
    return torch.stack(ys, 1), {"h": h}


def pararnn_lstm_loop(m, x):
    weights = torch.cat([m.Wf, m.Wc, m.Wo])
    biases = torch.cat([m.bf, m.bc, m.bo])
    projected = F.linear(x, weights, biases)
    h = x.new_zeros(x.shape[0], m.bf.shape[0])
    c = torch.zeros_like(h)
    ys = []
    for p_t in projected.unbind(1):
        xf, xc, xo = p_t.chunk(3, -1)
        f = torch.sigmoid(xf + m.af * h + m.pf * c)
        candidate = torch.tanh(xc + m.ac * h)
        c = f * c + (1 - f) * candidate
        o = torch.sigmoid(xo + m.ao * h + m.po * c)
        h = o * torch.tanh(c)
        ys.append(h)
    return torch.stack(ys, 1), {"h": h, "c": c}


# ---------------------------------------------------------------------------------------------
# Dims and inputs per cell. Inputs follow the papers' conventions: GLA's forget gate arrives as
# logsigmoid(.) / 16, the delta rules' keys are L2-normalised, beta = sigmoid(.) (2 sigmoid(.)
# for DeltaProduct, which allows negative eigenvalues), log-decays g = logsigmoid(.) / 16.
# ---------------------------------------------------------------------------------------------

def cell_dims(name, args):
    if name in ("mingru", "pararnn_gru", "pararnn_lstm"):
        return {"d_in": args.d, "d": args.d}
    if name == "retnet":
        return {"H": args.heads, "K": args.kv, "V": args.kv}
    if name == "deltaproduct":
        return {"K": args.kv, "V": args.kv, "n_h": N_HOUSEHOLDER}
    return {"K": args.kv, "V": args.kv}


def make_inputs(name, B, T, args, device, generator):
    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    H, K = args.heads, args.kv
    if name in ("mingru", "pararnn_gru", "pararnn_lstm"):
        return (randn(B, T, args.d),)
    q, v = randn(B, T, H, K), randn(B, T, H, K)
    if name == "gla":
        return q, randn(B, T, H, K), v, F.logsigmoid(randn(B, T, H, K)) / 16
    if name == "retnet":
        return q, randn(B, T, H, K), v
    if name == "deltaproduct":
        n_h = N_HOUSEHOLDER
        keys = F.normalize(randn(B, T, H, n_h, K), dim=-1)
        return (q, keys, randn(B, T, H, n_h, K), 2 * torch.sigmoid(randn(B, T, H, n_h)),
                F.logsigmoid(randn(B, T, H)) / 16)
    keys = F.normalize(randn(B, T, H, K), dim=-1)
    beta = torch.sigmoid(randn(B, T, H))
    if name == "kda":  # per-key log-decays as GLA's
        return q, keys, v, F.logsigmoid(randn(B, T, H, K)) / 16, beta
    if name == "rwkv7":  # w = exp(-0.6 sigmoid(.)) as the paper's decay, a in (0, 1)
        return (q, -0.6 * torch.sigmoid(randn(B, T, H, K)), randn(B, T, H, K) * K ** -0.5, v,
                keys, torch.sigmoid(randn(B, T, H, K)))
    if name == "comba":
        return (q, keys, v, F.normalize(randn(B, T, H, K), dim=-1), beta,
                F.logsigmoid(randn(B, T, H)) / 16)
    if name == "mlstm":  # input and forget pre-activations per head, as xLSTM's
        return q, randn(B, T, H, K), v, randn(B, T, H), randn(B, T, H) + 3.0
    if name == "deltanet":
        return q, keys, v, beta
    return q, keys, v, beta, F.logsigmoid(randn(B, T, H)) / 16  # gated_deltanet


HAND_LOOPS = {name: globals()[name + "_loop"] for name in CELLS}


# ---------------------------------------------------------------------------------------------
# Running, checking and timing
# ---------------------------------------------------------------------------------------------

class Candidate:
    """One implementation of a cell: a plan's module, or the hand loop (run with the sequential
    module's parameters). run(inputs) -> (list of result tensors: outputs then final states)."""

    def __init__(self, label, module, run):
        self.label, self.module, self.run = label, module, run
        self.params = list(module.parameters())
        self.stats = None


def module_runner(module):
    def run(inputs):
        out, final = module(*inputs)
        outs = list(out) if isinstance(out, tuple) else [out]
        return outs, [final[s] for s in module.STATES]
    return run


def loop_runner(name, module):
    def run(inputs):
        out, final = HAND_LOOPS[name](module, *inputs)
        return [out], [final[s] for s in module.STATES]
    return run


def build_candidates(name, args, device):
    """(candidates, auto module, notes): the sequential plan first, then the other legal plans,
    then the hand loop; all share the sequential module's parameters."""
    path = os.path.join(REPO, "stdlib", name + ".rnn")
    dims = cell_dims(name, args)
    plans = rcc.analyze(path, dims=dims).plans
    torch.manual_seed(0)
    base = rcc.compile(path, plan="sequential")(**dims).to(device)
    candidates = [Candidate("sequential", base, module_runner(base))]
    notes = []
    for plan in plans:
        if plan == "sequential":
            continue
        try:
            module = rcc.compile(path, plan=plan)(**dims).to(device)
            module.load_state_dict(base.state_dict())
            if plan == "chunk":
                module.chunk_size = args.chunk_size
        except Exception as error:  # a broken plan is reported, not benchmarked
            notes.append(f"{name}: plan {plan} left out: it does not compile "
                         f"({type(error).__name__}: {error})")
            continue
        candidates.append(Candidate(plan, module, module_runner(module)))
    candidates.append(Candidate("hand loop", base, loop_runner(name, base)))
    auto = rcc.compile(path, plan="auto")(**dims).to(device)
    auto.load_state_dict(base.state_dict())
    auto.chunk_size = args.chunk_size
    return candidates, auto, notes


def with_grad(inputs):
    return [x.detach().clone().requires_grad_(True) for x in inputs]


def results_and_grads(candidate, inputs):
    """Outputs, final states, and d sum(outputs) / d (inputs, params), all detached."""
    leaves = with_grad(inputs)
    outs, states = candidate.run(leaves)
    grads = torch.autograd.grad(sum(o.sum() for o in outs), leaves + candidate.params,
                                allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, leaves + candidate.params)]
    return [t.detach() for t in outs + states], grads


def largest_diff(values, reference, tolerance):
    """(largest |difference|, whether every tensor is within tolerance * max(1, max |reference|))."""
    worst, within = 0.0, True
    for a, b in zip(values, reference):
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        if not math.isfinite(diff):
            return math.inf, False
        scale = max(1.0, b.abs().max().item() if b.numel() else 0.0)
        worst = max(worst, diff)
        within = within and diff <= tolerance * scale
    return worst, within


def newton_note(stats):
    if not stats:
        return ""
    return f"{stats['iterations']}" + (" fb" if stats["fallback"] else "")


def bench_cell(name, T, args, device, built):
    """Rows (label, fwd ms, fwd+bwd ms, fwd diff, grad diff, its, auto mark) for one cell and T."""
    candidates, auto, notes = built
    generator = torch.Generator().manual_seed(1000 + T)
    inputs = make_inputs(name, args.B, T, args, device, generator)

    with torch.no_grad():
        auto(*inputs)
    auto_plan = auto.last_plan

    # check first: every candidate against plan sequential, forward and gradients
    checked = []
    reference = None
    for candidate in candidates:
        try:
            values, grads = results_and_grads(candidate, inputs)
        except Exception as error:
            notes.append(f"{name} T={T}: {candidate.label} left out: it raises "
                         f"{type(error).__name__}: {error}")
            if args.verbose:
                traceback.print_exc()
            continue
        stats = getattr(candidate.module, "last_stats", None) if candidate.label == "newton" else None
        if reference is None:
            reference = values, grads
            checked.append((candidate, 0.0, 0.0, stats))
            continue
        fwd_diff, fwd_ok = largest_diff(values, reference[0], args.tolerance)
        grad_diff, grad_ok = largest_diff(grads, reference[1], args.tolerance)
        if not (fwd_ok and grad_ok):
            raise SystemExit(f"plans.py: error: {name} T={T}: {candidate.label} disagrees with plan "
                             f"sequential (max |diff| outputs/states {fwd_diff:.2e}, gradients "
                             f"{grad_diff:.2e}; tolerance {args.tolerance:.0e} x scale); not timing it")
        checked.append((candidate, fwd_diff, grad_diff, stats))

    rows = []
    for candidate, fwd_diff, grad_diff, stats in checked:
        def forward(candidate=candidate):
            with torch.no_grad():
                candidate.run(inputs)

        def forward_backward(candidate=candidate):
            leaves = with_grad(inputs)
            outs, _ = candidate.run(leaves)
            torch.autograd.grad(sum(o.sum() for o in outs), leaves + candidate.params,
                                allow_unused=True)

        fwd = median_ms(forward, device, args.warmup, args.repeats)
        both = median_ms(forward_backward, device, args.warmup, args.repeats)
        if candidate.label == "newton":
            stats = candidate.module.last_stats
        rows.append((candidate.label, fwd, both, fwd_diff, grad_diff, newton_note(stats),
                     "<auto" if candidate.label == auto_plan else ""))
    return rows


COLUMNS = (  # title, width, left-aligned
    ("cell", 14, True), ("T", 5, False), ("plan", 10, True), ("fwd ms", 8, False),
    ("fwd+bwd ms", 10, False), ("fwd/seq", 7, False), ("f+b/seq", 7, False), ("fwd/hand", 8, False),
    ("f+b/hand", 8, False), ("its", 5, False), ("max|diff| y,S", 13, False),
    ("max|diff| grad", 14, False), ("auto", 5, True))


def table_line(cells):
    return "| " + " | ".join(f"{c:{'<' if left else '>'}{w}s}"
                             for c, (_, w, left) in zip(cells, COLUMNS)) + " |"


def print_table(all_rows):
    """A markdown table, one row per (cell, T, implementation)."""
    print(table_line([title for title, _, _ in COLUMNS]))
    print("|" + "|".join("-" * (w + 1) + ("-" if left else ":") for _, w, left in COLUMNS) + "|")
    for (name, T), rows in all_rows.items():
        by_label = {r[0]: r for r in rows}
        seq, hand = by_label.get("sequential"), by_label.get("hand loop")

        def ratio(base, value, index):
            return f"{value / base[index]:.2f}x" if base else "-"

        for label, fwd, both, fwd_diff, grad_diff, its, mark in rows:
            print(table_line([name, str(T), label, f"{fwd:.2f}", f"{both:.2f}",
                              ratio(seq, fwd, 1), ratio(seq, both, 2), ratio(hand, fwd, 1),
                              ratio(hand, both, 2), its, f"{fwd_diff:.1e}", f"{grad_diff:.1e}", mark]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS),
                        help="cells to run (default: all twelve)")
    parser.add_argument("--T", type=int, nargs="+", default=[256, 2048],
                        help="sequence lengths (default 256 2048)")
    parser.add_argument("--B", type=int, default=4, help="batch size (default 4)")
    parser.add_argument("--heads", type=int, default=2,
                        help="heads of the matrix-state cells, [B, T, H, K] (default 2)")
    parser.add_argument("--kv", type=int, default=32, help="K = V of the matrix-state cells (default 32)")
    parser.add_argument("--d", type=int, default=64,
                        help="d_in = d of minGRU and the ParaRNN cells (default 64)")
    parser.add_argument("--chunk-size", type=int, default=64, help="plan chunk's chunk_size (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs, median taken (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest |difference| to plan sequential allowed, relative to the "
                             "largest |value| (or 1) of each tensor (default 1e-3, float32)")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing plans")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("plans.py: error: --device cuda but torch sees no CUDA device")
    device = torch.device(args.device)

    print_machine(device if device.type == "cuda" else None)
    print(f"device {device.type}, float32, B={args.B}, heads={args.heads}, K=V={args.kv}, d=d_in={args.d},"
          f" chunk_size={args.chunk_size}, DeltaProduct n_h={N_HOUSEHOLDER}; median of {args.repeats} "
          f"runs after {args.warmup} warm-up(s)")
    print("fwd under no_grad; fwd+bwd = forward with autograd + grad of sum(outputs) wrt all inputs "
          "and params; ratios are time / time (lower is faster)\n", flush=True)

    all_rows, notes = {}, []
    for name in args.cells:
        built = build_candidates(name, args, device)
        for T in args.T:
            start = time.perf_counter()
            all_rows[(name, T)] = bench_cell(name, T, args, device, built)
            print(f"  {name} T={T}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        notes += built[2]
    print_table(all_rows)
    for note in dict.fromkeys(notes):
        print("note:", note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
