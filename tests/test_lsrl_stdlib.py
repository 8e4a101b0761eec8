"""stdlib/lsrl.rnn (`use lsrl`): each sugar fn against its definition in LSRL (Petrov et al. 2024;
github.com/AleksandarPetrov/LSRL, lsrl/sugar_blocks.py), written here independently in numpy, on
random inputs and on the boundary values where the ReLU constructions change or break; the two
block fns f_modulo_counter and f_counter over steps.

Each fn is evaluated by compiling a tiny cell that outputs it per step (inputs [B, T], or
[B, T, d] for vectors). Two kinds of reference:
- LSRL's own formula (the `lsrl_*` functions, float64). rcc writes f_step as
  ReLU(s x) - ReLU(s x - 1) where LSRL writes ReLU(s x) - s ReLU(x - 1/s): equal in real
  arithmetic, but LSRL's form rounds past 1/s (1/s has no exact binary form), so the comparison
  to LSRL's formula is to LSRL_TOL.
- The construction's exact value in floating point (`exact_*`): f_step(x, s) is exactly
  clip(s x, 0, 1) as long as s x < 2**53 (float64) or 2**24 (float32), so every fn built on it is
  compared bit for bit to the same composition of clips.
"""
import math

import numpy as np
import pytest
import torch

import rcc

S = 1000.0  # LSRL's default scale
L = 1e10  # LSRL's default large constant of f_ifelse
LSRL_TOL = 1e-9  # LSRL's f_step is 1 only to about |s x| * 2**-52 past 1/s


# ---- LSRL's definitions (sugar_blocks.py), numpy float64 -------------------------------------

def relu(v):
    return np.maximum(v, 0.0)


def lsrl_step(x, scale=S):
    return relu(scale * x) - scale * relu(x - 1.0 / scale)


def lsrl_bump(x, lb, ub):
    return lsrl_step(x - lb) - lsrl_step(x - ub)


def lsrl_not(x):
    return 1 - x


def lsrl_and(x, y):
    return relu(lsrl_step(x) + lsrl_step(y) - 1)


def lsrl_or(x, y):
    return lsrl_step(x + y)


def lsrl_larger(x, y):
    return lsrl_step(x - y)


def lsrl_smaller(x, y):
    return lsrl_step(y - x)


def lsrl_eq(x, y):
    return lsrl_step(-1 * (lsrl_step(x - y) + lsrl_step(y - x) - 1))


def lsrl_neq(x, y):
    return lsrl_step(lsrl_step(x - y) + lsrl_step(y - x))


def lsrl_ifelse(c, t, f, large=L):
    return (relu(c * (-1 * large) + f) + relu(lsrl_not(c) * (-1 * large) + t)
            - relu(c * (-1 * large) - f) - relu(lsrl_not(c) * (-1 * large) - t))


def lsrl_ifelse_step(c, t, f, large=L):
    return (relu(-large + large * lsrl_step(0.5 - c) + f)
            - relu(-large + large * lsrl_step(0.5 - c) - f)
            + relu(-large + large * lsrl_step(c - 0.5) + t)
            - relu(-large + large * lsrl_step(c - 0.5) - t))


def lsrl_ifelse_mul(c, t, f):
    return c * t + lsrl_not(c) * f


# ---- the constructions' exact values in floating point -----------------------------------------

def exact_step(x, scale=S):
    return np.clip(scale * x, 0.0, 1.0)


def exact_eq(x, y):
    return exact_step(-(exact_step(x - y) + exact_step(y - x) - 1))


def exact_neq(x, y):
    return exact_step(exact_step(x - y) + exact_step(y - x))


# ---- running a fn --------------------------------------------------------------------------------

def run(exprs: dict, inputs: dict, dtype=torch.float64, dims="", shapes=None, extra="",
        state=None, plan="auto"):
    """Compile `use lsrl` and a cell with the given inputs (scalars, or shapes[name]) and one
    output per expression; run it on inputs [B, T, ...]. Returns {output: numpy array} (and the
    final states when `state` is not None, `state` then being initial_state=)."""
    shapes = shapes or {}
    decls = ", ".join(n + shapes.get(n, "") for n in inputs)
    outs = "".join(f"    output {k} = {v}\n" for k, v in exprs.items())
    src = f"use lsrl\ncell S({dims}) {{\n    input {decls}\n{extra}{outs}}}\n"
    cls = rcc.compile(src, backend="torch", plan=plan)
    m = (cls(**_dim_values(dims)) if dims else cls()).to(dtype)
    xs = [torch.as_tensor(np.asarray(v), dtype=dtype) for v in inputs.values()]
    out, final = m(*xs, initial_state=state)
    out = out if isinstance(out, tuple) else (out,)
    got = {k: o.detach().numpy() for k, o in zip(exprs, out)}
    return (got, {k: v.numpy() for k, v in final.items()}) if state is not None else got


def _dim_values(dims):
    return {kv.split("=")[0].strip(): int(kv.split("=")[1]) for kv in dims.split(",")}


def col(*values):
    """Values as inputs [B, 1]: one boundary case per batch row."""
    return np.asarray(values, dtype=np.float64).reshape(-1, 1)


def same(a, b):
    """Bit for bit (up to the sign of zero), with shapes equal."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.array_equal(a, b), np.max(np.abs(a - b))


def close(a, b, tol):
    np.testing.assert_allclose(a, b, rtol=0, atol=tol)


RNG = np.random.default_rng(20240405)


@pytest.fixture(autouse=True)
def _fresh_rng():
    """Each test draws the same numbers, alone or in the whole file."""
    global RNG
    RNG = np.random.default_rng(20240405)


def rand(scale=1.0, shape=(4, 8)):
    return RNG.normal(size=shape) * scale


# ---- f_step ----------------------------------------------------------------------------------

STEP_BOUNDARY = col(0.0, -0.0, 1 / S, 0.5 / S, -1e-9, 1e-9, 0.999 / S, 1.001 / S, 2 / S,
                    -1 / S, 0.25, 1.0, -1.0, 1e6, -1e6)


@pytest.mark.parametrize("x", [rand(0.002), rand(1.0), STEP_BOUNDARY],
                         ids=["random-ramp", "random", "boundary"])
def test_f_step(x):
    got = run({"s": "f_step(x)", "s7": "f_step(x, 7)", "half": "f_step(x, scale = 0.5)"}, {"x": x})
    same(got["s"], exact_step(x))
    same(got["s7"], exact_step(x, 7.0))
    same(got["half"], exact_step(x, 0.5))
    close(got["s"], lsrl_step(x), LSRL_TOL)
    close(got["s7"], lsrl_step(x, 7.0), LSRL_TOL)
    close(got["half"], lsrl_step(x, 0.5), LSRL_TOL)
    assert set(np.unique(got["s"][np.abs(x) >= 1 / S])) <= {0.0, 1.0}


def test_f_step_at_its_corners():
    x = col(0.0, 1 / S, 0.5 / S, -1e-9, 1e-9, 2 / S, 5.0)
    got = run({"s": "f_step(x)"}, {"x": x})["s"][:, 0]
    # 0 at x <= 0, the ramp s x on (0, 1/s), exactly 1 from 1/s on
    same(got, [0.0, 1.0, 0.5, 0.0, S * 1e-9, 1.0, 1.0])
    # LSRL's own form is 1 only up to rounding past 1/s: s x - s (x - 1/s) at x = 2/s, 5
    lsrl = lsrl_step(x)[:, 0]
    assert lsrl[0] == 0.0 and lsrl[3] == 0.0 and lsrl[2] == 0.5
    close(lsrl, got, LSRL_TOL)


def test_f_step_float32_range():
    # rcc's form is exactly 1 past 1/s in float32 too while s x < 2**24 (x < 16777.216); LSRL's
    # form loses it already at x = 0.3 (0.99997: 1/s has no exact binary form).
    x = col(1 / S, 0.3, 1.0, 100.0, 16777.0, 16777.215)
    got = run({"s": "f_step(x)"}, {"x": x}, dtype=torch.float32)["s"]
    same(got, np.ones_like(got))
    x32 = x.astype(np.float32)
    lsrl32 = relu(np.float32(S) * x32) - np.float32(S) * relu(x32 - np.float32(1 / S))
    assert lsrl32[1, 0] == np.float32(0.999969482421875)
    # Past s x = 2**24, s x - 1 rounds in float32 and the difference is 0 or 2, not 1 (measured;
    # LSRL's form breaks the same way): both forms hold only for moderate |x|.
    big = run({"s": "f_step(x)"}, {"x": col(16778.0, 20000.0, 20000.001, 1e6)},
              dtype=torch.float32)["s"][:, 0]
    same(big, [0.0, 0.0, 2.0, 0.0])


# ---- f_bump, f_not, f_relu_identity, f_constant ----------------------------------------------

@pytest.mark.parametrize("lb, ub", [(0.0, 1.0), (-0.5, 0.25)])
def test_f_bump(lb, ub):
    x = np.concatenate([rand(1.0).reshape(-1, 1),
                        col(lb, lb + 1 / S, lb + 0.5 / S, lb - 1e-9, (lb + ub) / 2, ub,
                            ub + 1 / S, ub + 0.5 / S, ub + 2 / S, ub + 1e-9)])
    lbs, ubs = np.full_like(x, lb), np.full_like(x, ub)
    got = run({"b": "f_bump(x, lb, ub)", "b_lit": f"f_bump(x, {lb}, {ub})"},
              {"x": x, "lb": lbs, "ub": ubs})
    want = exact_step(x - lb) - exact_step(x - ub)
    same(got["b"], want)
    same(got["b_lit"], want)
    close(got["b"], lsrl_bump(x, lb, ub), LSRL_TOL)
    b = got["b"][-10:, 0]
    # 0 at lb, the ramp's middle at lb + 0.5/s, 1 in the middle and at ub, then down to 0 past
    # ub + 1/s (x - ub rounds, so ub + 1/s itself is within LSRL_TOL of 0)
    assert b[0] == 0.0 and b[3] == 0.0 and b[4] == 1.0 and b[5] == 1.0
    close(b[[1, 2, 6, 7, 8]], [1.0, 0.5, 0.0, 0.5, 0.0], 1e-9)
    close(b[9], 1 - 1e-6, 1e-12)


def test_f_not_relu_identity_constant():
    x = np.concatenate([rand(3.0).reshape(-1, 1), col(0.0, 1.0, -1e-9, 1e300, -1e-300)])
    got = run({"n": "f_not(x)", "r": "f_relu_identity(x)", "k": "f_constant(x, 2.5)"}, {"x": x})
    same(got["n"], lsrl_not(x))
    same(got["r"], x)  # ReLU(x) - ReLU(-x): one of the two is 0, exact
    same(got["k"], np.full_like(x, 2.5))


# ---- booleans and comparisons ------------------------------------------------------------------

BOOL_EXPRS = {"a": "f_and(x, y)", "o": "f_or(x, y)", "gt": "f_larger(x, y)",
              "lt": "f_smaller(x, y)", "eq": "f_eq(x, y)", "ne": "f_neq(x, y)"}


def _exact_bool(x, y):
    return {"a": relu(exact_step(x) + exact_step(y) - 1), "o": exact_step(x + y),
            "gt": exact_step(x - y), "lt": exact_step(y - x), "eq": exact_eq(x, y),
            "ne": exact_neq(x, y)}


def _lsrl_bool(x, y):
    return {"a": lsrl_and(x, y), "o": lsrl_or(x, y), "gt": lsrl_larger(x, y),
            "lt": lsrl_smaller(x, y), "eq": lsrl_eq(x, y), "ne": lsrl_neq(x, y)}


def test_boolean_fns_truth_tables():
    x, y = col(0, 0, 1, 1), col(0, 1, 0, 1)
    got = run(BOOL_EXPRS, {"x": x, "y": y})
    truth = {"a": x * y, "o": np.maximum(x, y), "gt": (x > y) * 1.0, "lt": (x < y) * 1.0,
             "eq": (x == y) * 1.0, "ne": (x != y) * 1.0}
    lsrl = _lsrl_bool(x, y)
    for k in BOOL_EXPRS:
        same(got[k], truth[k])
        close(lsrl[k], truth[k], LSRL_TOL)


@pytest.mark.parametrize("scale", [1.0, 0.002], ids=["random", "random-ramp"])
def test_boolean_fns_random(scale):
    x, y = rand(scale), rand(scale)
    got = run(BOOL_EXPRS, {"x": x, "y": y})
    exact, lsrl = _exact_bool(x, y), _lsrl_bool(x, y)
    for k in BOOL_EXPRS:
        same(got[k], exact[k])
        close(got[k], lsrl[k], LSRL_TOL)


def test_comparisons_at_their_resolution():
    # rows: equal operands; 2**-9 apart (>= 1/1000, an exact difference); 1/1000 apart as
    # decimals (2.001 - 2.0 rounds below 1/1000); exactly 1/1000 apart from 0; half the resolution;
    # 1e-9 apart
    x = col(0.3, -2.5, 0.0, 1e6, 0.5, 2.001, 1 / S, 0.5 / S, 1e-9)
    y = col(0.3, -2.5, 0.0, 1e6, 0.5 - 2 ** -9, 2.0, 0.0, 0.0, 0.0)
    got = run(BOOL_EXPRS, {"x": x, "y": y})
    gt, lt, eq, ne = (got[k][:, 0] for k in ("gt", "lt", "eq", "ne"))
    same(gt, exact_step(x - y)[:, 0])
    same(eq, exact_eq(x, y)[:, 0])
    same(ne, exact_neq(x, y)[:, 0])
    # equal operands: exact
    same(eq[:4], [1.0] * 4)
    same(ne[:4], [0.0] * 4)
    same(gt[:4], [0.0] * 4)
    same(lt[:4], [0.0] * 4)
    # an exact difference >= 1/1000, and 1/1000 itself from 0: exact
    same(gt[[4, 6]], [1.0, 1.0])
    same(eq[[4, 6]], [0.0, 0.0])
    same(ne[[4, 6]], [1.0, 1.0])
    # 2.001 - 2.0 = 0.0009999999999998899: not quite 1/1000, so not quite 0/1 (measured)
    assert gt[5] != 1.0 and abs(gt[5] - 1) < 1e-12
    assert eq[5] != 0.0 and abs(eq[5]) < 1e-9
    # half the resolution: the ramp's middle, where f_eq and f_neq both say 1
    same([gt[7], eq[7], ne[7]], [0.5, 1.0, 1.0])
    # 1e-9 apart: equal for f_eq, 1e-3 for f_neq (the construction's limit)
    same([eq[8], ne[8]], [1.0, exact_step(exact_step(1e-9))])
    close(ne[8], 1e-3, 1e-15)
    # LSRL's formulas agree to LSRL_TOL on all of these
    lsrl = _lsrl_bool(x, y)
    for k in BOOL_EXPRS:
        close(got[k], lsrl[k], LSRL_TOL)


# ---- if-else --------------------------------------------------------------------------------------

IFELSE = {"ie": "f_ifelse(c, t, f)", "il": "f_ifelse(c, t, f, 100)",
          "st": "f_ifelse_step(c, t, f)", "mul": "f_ifelse_mul(c, t, f)"}


def test_ifelse_variants_with_exact_conditions():
    c = np.repeat(col(0.0, 1.0), 8, axis=1)
    t, f = RNG.uniform(-90, 90, (2, 8)), RNG.uniform(-90, 90, (2, 8))
    got = run(IFELSE, {"c": c, "t": t, "f": f})
    want = np.where(c == 1, t, f)
    for k in IFELSE:  # |t|, |f| < 100 <= L: every variant picks exactly
        same(got[k], want)
    same(got["ie"], lsrl_ifelse(c, t, f))
    same(got["il"], lsrl_ifelse(c, t, f, 100.0))
    same(got["st"], lsrl_ifelse_step(c, t, f))
    same(got["mul"], lsrl_ifelse_mul(c, t, f))


def test_ifelse_variants_with_random_conditions():
    c, t, f = RNG.uniform(size=(4, 8)), rand(50.0), rand(50.0)
    c[0, :4] = [1e-12, 1 - 1e-12, 0.4985, 0.5015]  # near 0 and 1; outside f_step's ramp at 0.5
    got = run(IFELSE, {"c": c, "t": t, "f": f})
    same(got["ie"], lsrl_ifelse(c, t, f))
    same(got["il"], lsrl_ifelse(c, t, f, 100.0))
    same(got["mul"], lsrl_ifelse_mul(c, t, f))
    # f_ifelse_step thresholds c at 0.5 first; LSRL's formula does the same with L f_step(+-(c -
    # 0.5)): identical outside the ramp |c - 0.5| < 1/1000
    same(got["st"], lsrl_ifelse_step(c, t, f))
    same(got["st"], np.where(c > 0.5, t, f))
    # f_ifelse with c away from 0 and 1 switches both branches off (measured: 0 where
    # |t|, |f| < L min(c, 1 - c))
    off = np.minimum(c, 1 - c) * L > np.maximum(np.abs(t), np.abs(f))
    assert off.sum() > 20
    same(got["ie"][off], np.zeros(off.sum()))


def test_ifelse_variants_at_c_one_half():
    c = np.full((2, 4), 0.5)
    t, f = rand(50.0, (2, 4)), rand(50.0, (2, 4))
    got = run(IFELSE, {"c": c, "t": t, "f": f})
    # f_ifelse: both branches off (|t|, |f| < L/2): 0, as LSRL's formula
    same(got["ie"], np.zeros_like(t))
    same(got["ie"], lsrl_ifelse(c, t, f))
    same(got["il"], lsrl_ifelse(c, t, f, 100.0))
    # f_ifelse_mul: the average, exact (halving is exact)
    same(got["mul"], (t + f) / 2)
    # f_ifelse_step at exactly 0.5: f_step(0.5 - c) = f_step(c - 0.5) = 0, both branches off,
    # so 0, as LSRL's f_ifelse_step
    same(got["st"], np.zeros_like(t))
    same(lsrl_ifelse_step(c, t, f), np.zeros_like(t))
    # mid-ramp, c = 0.5 + 0.5/1000: the thresholded condition is 0.5, both branches off in both
    c2 = np.full((2, 4), 0.5 + 0.5 / S)
    got2 = run(IFELSE, {"c": c2, "t": t, "f": f})
    same(got2["st"], np.zeros_like(t))
    same(lsrl_ifelse_step(c2, t, f), np.zeros_like(t))


def test_ifelse_l_leaks_past_its_large_constant():
    # f_ifelse(c, t, f, 100): exact while |t|, |f| < 100; with c = 0 a t of 150 leaks t - L
    c, t, f = col(0.0, 0.0, 1.0, 1.0), col(150.0, -150.0, 0.25, 0.25), col(0.25, 0.25, 120.0, 99.0)
    got = run(IFELSE, {"c": c, "t": t, "f": f})
    same(got["il"][:, 0], [0.25 + 50.0, 0.25 - 50.0, 0.25 + 20.0, 0.25])
    same(got["il"], lsrl_ifelse(c, t, f, 100.0))
    same(got["mul"], np.where(c == 1, t, f))  # no large constant: always exact


def test_ifelse_float32_near_the_large_constant():
    """f_ifelse against f_ifelse_mul in float32, L = 1e10 (measured behaviour).

    Evaluated as the cell writes it, f_ifelse with c exactly 0 or 1 keeps t and f bit for bit
    while |t|, |f| < L: the branch that is off gets -L and its ReLUs give exact zeros. (The
    fragility lsrl.rnn describes, t - L + L, is that of an affine layer that adds L c and -L
    before the ReLU; this cell never forms that sum.) It breaks where the large constant meets
    t: |t| >= L leaks t - L into the other branch, and a condition one float32 ulp off 1 turns
    the branch into ReLU(t - L * 2**-24) = ReLU(t - 596): t's digits are lost, while
    f_ifelse_mul stays within an ulp of t.
    """
    t = np.array([1.2345678, 12345.678, 123456.7, 3.3e9, 9.9e9, -9.9e9, 1.01e10, -1.01e10],
                 dtype=np.float32)
    f = np.full_like(t, 0.3)
    off1 = np.float32(1) - np.float32(2 ** -24)
    cs = np.array([[1.0] * 8, [0.0] * 8, [off1] * 8], dtype=np.float32)
    ts, fs = np.tile(t, (3, 1)), np.tile(f, (3, 1))
    got = run({"ie": "f_ifelse(c, t, f)", "mul": "f_ifelse_mul(c, t, f)"},
              {"c": cs, "t": ts, "f": fs}, dtype=torch.float32)
    ie, mul = got["ie"], got["mul"]
    assert ie.dtype == np.float32
    # c = 1: both exact, even at |t| > L (the off branch is f's, and |f| < L)
    same(ie[0], t)
    same(mul[0], t)
    # c = 0: exact f while |t| < L; at |t| = 1.01e10 > L the t branch leaks |t| - L (float32's
    # 1.01e10 is 10099999744, so 99999744) with t's sign, and f is lost in its rounding
    same(ie[1, :6], f[:6])
    same(mul[1], f)
    leak = np.sign(t[6:]) * (np.abs(t[6:].astype(np.float64)) - L)
    same(leak, [99999744.0, -99999744.0])
    close(ie[1, 6:], leak + 0.3, 8.0)  # 8: float32's ulp at 1e8
    # c one ulp below 1: f_ifelse gives 0 for |t| < 596 and t - 596 further out; f_ifelse_mul
    # loses nothing beyond float32 rounding
    assert ie[2, 0] == 0.0
    close(ie[2, 1:3], t[1:3] - np.float32(L * 2 ** -24), 0.02)
    assert np.all(np.abs(ie[2, :4] - t[:4]) > 1.0)
    np.testing.assert_allclose(mul[2], t, rtol=2.5e-7, atol=1e-6)


IFEQ = {"ieq": "f_ifeq(x, y, t, f)", "ieqm": "f_ifeq_mul(x, y, t, f)"}


def test_ifeq_on_equal_and_distinct_operands():
    # operands on a grid of 1/8: equal, or at least 1/8 apart (exact differences)
    x = RNG.integers(-3, 4, size=(4, 8)) / 8.0
    y = x.copy()
    y[1::2] += RNG.integers(1, 4, size=(2, 8)) / 8.0
    t, f = rand(50.0), rand(50.0)
    got = run(IFEQ, {"x": x, "y": y, "t": t, "f": f})
    want = np.where(x == y, t, f)
    same(got["ieq"], want)
    same(got["ieqm"], want)
    same(got["ieq"], lsrl_ifelse(exact_eq(x, y), t, f))
    same(got["ieqm"], lsrl_ifelse_mul(exact_eq(x, y), t, f))


def test_ifeq_random_operands():
    x, y, t, f = rand(0.002), rand(0.002), rand(50.0), rand(50.0)
    y[0] = x[0]
    got = run(IFEQ, {"x": x, "y": y, "t": t, "f": f})
    eq = exact_eq(x, y)
    same(got["ieq"], lsrl_ifelse(eq, t, f))
    same(got["ieqm"], lsrl_ifelse_mul(eq, t, f))
    same(got["ieq"][0], t[0])


# ---- vectors [B, T, d] ----------------------------------------------------------------------------

def test_sugar_on_vectors_is_elementwise():
    B, T, d = 2, 4, 3
    x, y = rand(0.003, (B, T, d)), rand(0.003, (B, T, d))
    x[:, :, 0] = y[:, :, 0]  # equal operands in one component
    c = RNG.integers(0, 2, size=(B, T, d)).astype(np.float64)
    cs = RNG.integers(0, 2, size=(B, T)).astype(np.float64)  # a scalar condition per step
    t, f = rand(5.0, (B, T, d)), rand(5.0, (B, T, d))
    exprs = {"eq": "f_eq(x, y)", "ne": "f_neq(x, y)", "gt": "f_larger(x, y)",
             "bump": "f_bump(x, 0, 0.002)", "a": "f_and(x, y)", "ie": "f_ifelse(c, t, f)",
             "mul": "f_ifelse_mul(c, t, f)", "mul_s": "f_ifelse_mul(cs, t, f)",
             "ieq": "f_ifeq_mul(x, y, t, f)"}
    got = run(exprs, {"x": x, "y": y, "c": c, "cs": cs, "t": t, "f": f}, dims="d=3",
              shapes={n: "[d]" for n in ("x", "y", "c", "t", "f")})
    same(got["eq"], exact_eq(x, y))
    same(got["ne"], exact_neq(x, y))
    same(got["gt"], exact_step(x - y))
    same(got["bump"], exact_step(x) - exact_step(x - 0.002))
    same(got["a"], relu(exact_step(x) + exact_step(y) - 1))
    same(got["ie"], np.where(c == 1, t, f))
    same(got["mul"], np.where(c == 1, t, f))
    same(got["mul_s"], np.where(cs[..., None] == 1, t, f))
    same(got["ieq"], lsrl_ifelse_mul(exact_eq(x, y), t, f))
    same(got["eq"][:, :, 0], np.ones((B, T)))
    for k, ref in (("eq", lsrl_eq(x, y)), ("ne", lsrl_neq(x, y)), ("gt", lsrl_larger(x, y)),
                   ("bump", lsrl_bump(x, 0, 0.002)), ("a", lsrl_and(x, y))):
        close(got[k], ref, LSRL_TOL)


# ---- block fns: the modulo counter and the counter ---------------------------------------------

MOD = {"m": "f_modulo_counter(x, n) + 0 * x"}


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_f_modulo_counter_with_a_dim(n):
    T = 3 * n + 2
    got, final = run(MOD, {"x": np.zeros((2, T))}, dims=f"n={n}", state={})
    same(got["m"], np.tile(np.arange(T) % n, (2, 1)).astype(np.float64))
    # two scalar states, named after the fn, end at position (T - 1) mod n on the unit circle
    assert list(final) == ["f_modulo_counter_cos_t", "f_modulo_counter_sin_t"]
    ang = 2 * math.pi * ((T - 1) % n) / n
    close(final["f_modulo_counter_cos_t"], [math.cos(ang)] * 2, 1e-12)
    close(final["f_modulo_counter_sin_t"], [math.sin(ang)] * 2, 1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_f_modulo_counter_with_a_literal(n):
    T = 3 * n + 2
    got = run({"m": f"f_modulo_counter(x, {n}) + 0 * x", "m2": "f_modulo_counter(x, 2) + 0 * x"},
              {"x": np.zeros((1, T))})
    same(got["m"][0], np.arange(T) % n)
    same(got["m2"][0], np.arange(T) % 2)  # a second copy counts on its own


def test_f_modulo_counter_starts_from_the_given_state():
    n, T, p = 5, 8, 2
    ang = 2 * math.pi * p / n  # at position p before the first step: the first value is p + 1
    state = {"f_modulo_counter_cos_t": torch.full((1,), math.cos(ang), dtype=torch.float64),
             "f_modulo_counter_sin_t": torch.full((1,), math.sin(ang), dtype=torch.float64)}
    got, _ = run(MOD, {"x": np.zeros((1, T))}, dims=f"n={n}", state=state)
    same(got["m"][0], (np.arange(T) + p + 1) % n)


def test_f_modulo_counter_cpp_backend():
    n, T = 5, 8
    src = "use lsrl\ncell S(n) {\n    input x\n    output m = f_modulo_counter(x, n) + 0 * x\n}\n"
    m = rcc.compile(src, backend="cpp")(n=n).double()
    out, _ = m(torch.zeros(1, T, dtype=torch.float64))
    same(out.numpy()[0], np.arange(T) % n)


@pytest.mark.parametrize("plan", ["sequential", "auto"])
def test_f_counter(plan):
    T = 8
    bits = RNG.integers(0, 2, size=(3, T)).astype(np.float64)
    v = rand(1.0, (3, T))
    got, final = run({"k": "f_counter(b)", "s": "f_counter(v)"}, {"b": bits, "v": v}, state={},
                     plan=plan)
    same(got["k"], np.cumsum(bits, axis=1))  # the count after each step, exact
    ref = np.zeros((3, T))
    acc = np.zeros(3)
    for t in range(T):  # the running sum, added in step order
        acc = acc + v[:, t]
        ref[:, t] = acc
    if plan == "sequential":
        same(got["s"], ref)
    else:  # the cost model picks plan scan here (measured), which adds in another order
        close(got["s"], ref, 1e-14)
    assert list(final) == ["f_counter_count", "f_counter_2_count"]
    same(final["f_counter_count"], bits.sum(1))
    # from a given count
    got, _ = run({"k": "f_counter(b)", "s": "f_counter(v)"}, {"b": bits, "v": v},
                 state={"f_counter_count": torch.full((3,), 10.0, dtype=torch.float64)})
    same(got["k"], 10 + np.cumsum(bits, axis=1))
    same(got["s"][:, 0], v[:, 0])  # the other counter still starts at 0
