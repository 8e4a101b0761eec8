"""State-transition analysis: is the update affine in the state, and what structure has its
transition A (affine) or its Jacobian ds'/ds (nonlinear)?

Summary of the method: the cell is evaluated element by element in sympy at two small sets of
probe dims (rcc.passes.probe). The joint Jacobian J of the updates by the previous states is then
exact: the update is affine iff no entry of J contains a state symbol. Its sparsity pattern gives
the structure: scalar (J = c I per state), diagonal, block-diagonal (connected components of one
fixed size k at both probe sizes, e.g. (h, c) of a diagonal LSTM: k = 2), or dense. For a matrix
state, the chain of state-shaped values every path from s to s' goes through (its dominators, by
networkx) splits the step into links; a link that is the identity minus a symmetric rank-1 matrix
acting on every column is a Householder factor (I - beta k k^T), a link that scales is a gate.
DeltaNet is one Householder link, Gated DeltaNet a gate then one, DeltaProduct n_h of them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace

import networkx as nx
import numpy as np
import sympy

from .. import ir
from ..errors import CompileError
from .generalize import general_of
from .probe import NoGrad, Probe, flat, jacobian, probe_dims

STRUCTURES = ("scalar", "diagonal", "block-diagonal", "householder", "diagonal+low-rank", "dense")


@dataclass(frozen=True)
class StateFacts:
    name: str
    shape: tuple
    reads: tuple  # the states whose previous value this state's update reads
    updated: bool


@dataclass(frozen=True)
class Analysis:
    cell: str
    kind: str  # "affine" | "nonlinear"
    structure: str  # one of STRUCTURES, with details, e.g. "block-diagonal(k=2)"
    plans: tuple  # legal plans
    states: tuple = ()
    block: int = 1  # k for block-diagonal
    n_householder: int = 0
    gated: bool = False
    notes: tuple = field(default=())
    # every state's next value reads the other states (and itself) element by element only:
    # the Jacobian is k x k blocks pairing equal elements (what the scan and Newton plans need)
    elementwise: bool = False

    def __str__(self) -> str:
        lines = [f"cell {self.cell}: {self.kind} in the state, transition {self.structure}"]
        for s in self.states:
            shape = "[" + ", ".join(str(d) for d in s.shape) + "]"
            reads = ", ".join(s.reads) or "no state"
            lines.append(f"  state {s.name}{shape}: "
                         + (f"next value reads {reads}" if s.updated else "never updated (kept)"))
        lines.extend(f"  {n}" for n in self.notes)
        lines.append("  legal plans: " + ", ".join(self.plans))
        return "\n".join(lines)


# sympy differentiates nested expressions recursively (some 20 frames a level): room for
# steps a few hundred operations deep; deeper ones get a located error, not a traceback
_RECURSION_LIMIT = 3000  # (8000 overflowed the C stack at 400 nested tanh)


# The symbolic derivative of a step costs about the cube of its depth in nonlinear functions
# (64 nested tanh: 3 s) and grows with the size of its expression tree, which a value used twice
# a level doubles (`a = sigmoid(a) * a` ten times: 3,000 nodes, 5 s): past these, the analysis
# says so at once rather than run for minutes
MAX_NONLINEAR_DEPTH = 64
MAX_TREE = 1024
# its Jacobian is dense, n x n for n state elements at the probe sizes: a dim fixed at
# generation (a loop count, RetNet's heads) keeps its value there
MAX_PROBE_STATE = 1024
# the ops that nest no nonlinear function (leaves, arithmetic, piecewise-linear, comparisons)
_LINEAR = {"input", "param", "state", "const", "zeros", "ones", "eye", "slot", "pred", "neg",
           "add", "sub", "mul", "matmul", "outer", "sum", "mean", "concat", "stack", "getitem",
           "take", "transpose", "where", "relu", "abs", "sign", "maximum", "minimum", "amax",
           "lt", "le", "gt", "ge", "eq", "ne"}


def analyze_ir(cell: ir.CellIR) -> Analysis:
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, _RECURSION_LIMIT))
    try:
        probed = general_of(cell) or cell  # literal sizes: the family (rcc.passes.generalize)
        _check_size(probed)
        return _analyze(cell, probed)
    except RecursionError:
        raise _too_deep(cell, "") from None
    finally:
        sys.setrecursionlimit(old)


_NO_ANALYSIS = "plan 'sequential' needs no analysis: rcc.compile(..., plan='sequential')"


def _too_deep(cell, why):
    return CompileError(
        f"cell '{cell.name}' nests its step too deeply for rcc's analysis (it differentiates "
        f"the step symbolically{why}); {_NO_ANALYSIS}", cell.span)


def _check_size(cell):
    """Refuse, before any work, a step whose symbolic derivative would take minutes."""
    depth, tree = {}, {}
    for n in cell.nodes:
        depth[n.id] = max((depth[a] for a in n.args), default=0) + (n.op not in _LINEAR)
        tree[n.id] = 1 + sum(tree[a] for a in n.args)
    roots = [v for _, v in cell.updates]
    if roots and max(depth[v] for v in roots) > MAX_NONLINEAR_DEPTH:
        raise _too_deep(cell, f": more than {MAX_NONLINEAR_DEPTH} nonlinear functions deep")
    subs = {ir.dim_symbol(k): v for k, v in probe_dims(cell, 1).items()}
    n = sum(int(sympy.prod([sympy.sympify(x).subs(subs) for x in d.shape])) for d in cell.states)
    if n > MAX_PROBE_STATE:
        fixed = ", ".join(f"{d.name}={d.static}" for d in cell.dims if d.static is not None)
        raise CompileError(
            f"cell '{cell.name}' has {n} state elements at the sizes rcc's analysis runs it at "
            f"(more than {MAX_PROBE_STATE}; fixed at generation: {fixed or 'none'}): the analysis "
            f"differentiates the step element by element; {_NO_ANALYSIS}", cell.span)
    if roots and max(tree[v] for v in roots) > MAX_TREE:
        raise _too_deep(cell, f": its expression tree, values used twice counted twice, has "
                              f"more than {MAX_TREE} operations")


def _analyze(written: ir.CellIR, cell: ir.CellIR) -> Analysis:
    # `cell` is what is probed: `written` itself, or its family; the facts name states only and
    # report the shapes as written
    if cell.topology != "seq":
        raise NotImplementedError(
            f"the state-transition analysis covers cells over seq; cell '{cell.name}' runs over "
            f"{cell.topology} (rcc explain says what it runs, and whether plan 'chunk' applies: "
            "rcc.passes.topology.affine_grid)")
    probes = [Probe(cell, probe_dims(cell, 0)), Probe(cell, probe_dims(cell, 1))]
    small = probes[0]
    states = [d.name for d in cell.states]
    updates = dict(cell.updates)

    # every fact must hold at both probe sizes: a structure that appears only at one size (three
    # rotations of a 3-vector are the identity) is a coincidence of that size
    jacs = [_joint_jacobian(p, cell, states, updates) for p in probes]
    jac = jacs[0]
    # a derivative that is undefined (h / (h - h)) makes no parallel form exact: sequential only
    # (most entries are sympy's one zero: skipped by identity, the Jacobian is n x n)
    undefined = any(e is not sympy.S.Zero and e.has(sympy.zoo, sympy.nan, sympy.oo, -sympy.oo)
                    for j in jacs for row in j for e in row)
    state_symbols = [set(_all_state_symbols(p, states)) for p in probes]
    # a comparison of the state ((h > 0) * 0.3) has a zero derivative but is no affine term: the
    # Jacobian does not see it, so its reads are found in the updates themselves
    compared = [_compared_states(p, states, updates) for p in probes]
    affine = not undefined and not any(t for c in compared for t in c.values()) and all(
        e is sympy.S.Zero or not (e.free_symbols & symbols)
        for symbols, j in zip(state_symbols, jacs) for row in j for e in row)
    kind = "affine" if affine else "nonlinear"

    read = {name: set() for name in states}
    for p, j, cmp in zip(probes, jacs, compared):
        owner = [name for name in states for _ in flat(_state_symbols(p, name))]
        for i, row in enumerate(j):
            read[owner[i]] |= {owner[c] for c, e in enumerate(row) if e != 0}
        for name, through in cmp.items():
            read[name] |= through
    facts = [StateFacts(d.name, d.shape, tuple(s for s in states if s in read[d.name]),
                        d.name in updates) for d in written.states]

    block = _block_size(jac)
    block_other = _block_size(jacs[1])
    notes = []
    n_hh, gated = 0, False
    if block == 1 and block_other == 1:
        structure = "scalar" if affine and all(_is_scalar(j, p, states) for p, j in
                                               zip(probes, jacs)) else "diagonal"
    elif affine and (hh := _householder_chain(cell, small)) is not None \
            and hh == _householder_chain(cell, probes[1]):  # a swap of 2 rows is a reflection
        n_hh, gated = hh
        structure = f"householder(n_h={n_hh}{', gated' if gated else ''})"
        notes.append(f"each step applies {n_hh} Householder factor(s) (I - beta k k^T) to the "
                     "matrix state" + (", after a decay gate" if gated else ""))
    elif block == block_other and block is not None:
        structure = f"block-diagonal(k={block})"
    elif affine and _is_diagonal_plus_low_rank(jac):
        structure = "diagonal+low-rank"
    else:
        structure = "dense"
    if structure.startswith("block-diagonal"):
        notes.append(f"the state splits into independent blocks of {block} coupled values")
    elementwise = not undefined and all(_is_elementwise(j, p, states)
                                        for p, j in zip(probes, jacs))
    if undefined:
        notes.append("the step's derivative by its states is undefined somewhere (a division by "
                     "zero, the log of zero): only plan sequential applies")
    independent = all(set(f.reads) <= {f.name} for f in facts)
    if elementwise and not independent:
        notes.append("the states read each other element by element: "
                     + ("the scan runs them as one block scan of k x k blocks" if affine else
                        "parallel Newton solves them together"))
    one_shape = len({tuple(d.shape) for d in cell.states}) == 1
    form = _chunk_form(cell) if not undefined else None  # max-plus states: nonlinear, chunkable
    # the scan takes independent states or one block scan of coupled ones of one shape; Newton's
    # blocks pair equal elements of all states
    plans = _legal_plans(kind, form, elementwise and (
        (independent or one_shape) if affine else one_shape))
    for m in (form.maxplus if form is not None else ()):
        notes.append(f"state {m.state} is a max-plus recurrence {m.state}' = max({m.state} + a, b)"
                     f" (a stabiliser): plan chunk computes it first by a max-plus scan, then "
                     f"the other states, affine given it, chunkwise")
    for z, _, _ in (form.folded if form is not None else ()):
        notes.append(f"state {z} has state {form.state}'s decay and key: plan chunk folds it in as "
                     f"one more value column, read as dot(q, {z}')")
    if form is not None and form.kind == "dplr" and structure.startswith("householder"):
        notes.append("the decay gate is per key: plan chunk runs each step as a diagonal-plus-"
                     "rank-one transition diag(e^g) + a b^T")
    elif form is not None and form.kind == "dplr":
        # the verified form is the exact fact: its micro-steps reproduce the step
        structure = f"diagonal+rank-one(steps={len(form.steps)})"
        notes.append(f"each step applies {len(form.steps)} diagonal-plus-rank-one transition(s) "
                     "diag(e^g) + a b^T to the matrix state, then writes k u^T")
    analysis = Analysis(cell.name, kind, structure, plans, tuple(facts), block or 0, n_hh, gated,
                        tuple(notes), elementwise)
    if "scan" in plans and not _scan_builds(written, analysis):
        analysis = replace(analysis, plans=tuple(p for p in plans if p != "scan"), notes=(
            *notes, "the step is affine only once its terms simplify (h ** 0): the scan's form, "
                    "read off the step, still reads the state; plan scan does not apply"))
    return analysis


def _scan_builds(cell, analysis) -> bool:
    from ..plans import NotScannable, scan_form

    try:
        scan_form(cell, analysis)
    except NotScannable:
        return False
    return True


def _all_state_symbols(probe, states) -> list:
    return [s for name in states for s in flat(_state_symbols(probe, name))]


def _state_symbols(probe, name):
    return probe.state_symbols.get(name, np.empty((0,), dtype=object))


def _compared_states(probe, states, updates) -> dict:
    """Per updated state, the states its update reads through a comparison (a 0/1 value)."""
    owner = {sym: name for name in states for sym in flat(_state_symbols(probe, name))}
    out = {}
    for name in states:
        if name in updates:
            through = set()
            for e in flat(probe.values[updates[name]]):
                for c in sympy.sympify(e).atoms(NoGrad):
                    through |= {owner[x] for x in c.free_symbols if x in owner}
            out[name] = through
    return out


def _joint_jacobian(probe, cell, states, updates):
    """Rows: every element of every next state; columns: every element of every state."""
    cols = [s for name in states for s in flat(_state_symbols(probe, name))]
    outs = []
    for name in states:
        if name in updates:
            outs.extend(flat(probe.values[updates[name]]))
        else:
            outs.extend(flat(_state_symbols(probe, name)))  # a state with no update keeps its value
    return jacobian([sympy.sympify(o) for o in outs], cols)


def _block_size(jac):
    """Size of the connected components of the coupling graph, if they all have one size."""
    n = len(jac)
    g = nx.Graph()
    g.add_nodes_from(range(n))
    for i, row in enumerate(jac):
        for j, e in enumerate(row):
            if e != 0 and i != j:
                g.add_edge(i, j)
    sizes = {len(c) for c in nx.connected_components(g)}
    if len(sizes) == 1:
        k = sizes.pop()
        return k if k < n or n == 1 else (1 if n == 1 else None)
    return None


def _is_elementwise(jac, probe, states) -> bool:
    """Whether every block d s_i' / d s_j of the joint Jacobian is zero or diagonal, between
    states of one shape."""
    sizes = [len(flat(_state_symbols(probe, name))) for name in states]
    starts = np.cumsum([0] + sizes)
    for i, si in enumerate(states):
        for j, sj in enumerate(states):
            block = [row[starts[j]:starts[j + 1]] for row in jac[starts[i]:starts[i + 1]]]
            nonzero = [(r, c) for r, row in enumerate(block) for c, e in enumerate(row) if e != 0]
            if nonzero and (sizes[i] != sizes[j] or any(r != c for r, c in nonzero)):
                return False
    return True


def _is_scalar(jac, probe, states) -> bool:
    """Each state's diagonal coefficients are one value per head: constant over a vector state,
    and over the last two axes (the matrix) of a matrix state with leading head axes (RetNet's
    per-head gamma is scalar; GLA's per-key decay is not)."""
    offset = 0
    for name in states:
        shape = _state_symbols(probe, name).shape
        n = int(np.prod(shape))
        diag = _numeric([[jac[offset + i][offset + i] for i in range(n)]])[0]
        per_head = diag.reshape(int(np.prod(shape[:-2])) if len(shape) > 2 else 1, -1)
        if not np.allclose(per_head, per_head[:, :1], rtol=1e-12, atol=1e-12):
            return False
        offset += n
    return True


def _is_diagonal_plus_low_rank(jac) -> bool:
    a = _numeric(jac)
    if a.size == 0:
        return False
    if not np.isfinite(a).all():
        return False
    off = a - np.diag(np.diag(a))
    rank = np.linalg.matrix_rank(off, tol=1e-8 * max(1.0, np.abs(a).max()))
    return 0 < rank <= max(1, len(a) // 3)


def _numeric(rows, seed=0):
    """Evaluate a matrix of sympy expressions at random values of its symbols."""
    rng = np.random.default_rng(seed)
    syms = sorted({s for row in rows for e in row for s in sympy.sympify(e).free_symbols},
                  key=str)
    values = {s: float(rng.uniform(0.2, 0.9)) for s in syms}
    return np.array([[_number(sympy.sympify(e).xreplace(values)) for e in row] for row in rows])


def _number(e) -> float:
    """A real number, or NaN where the expression is not one there (log(x - x), a complex
    root): every structure test then fails, so the analysis stays conservative."""
    try:
        z = complex(sympy.N(e))
    except (TypeError, ValueError):
        return float("nan")
    return z.real if z.imag == 0 else float("nan")


def _householder_chain(cell, probe):
    """For a single updated matrix state: (number of Householder links, gated?) when every link
    of its dominator chain is a Householder factor or a scalar/diagonal gate; else None."""
    matrix_states = [d for d in cell.states if d.name in dict(cell.updates) and len(d.shape) == 2]
    if len(matrix_states) != 1 or len(cell.updates) != 1:
        return None
    decl = matrix_states[0]
    src = next(n.id for n in cell.nodes if n.op == "state" and n.attr("name") == decl.name)
    dst = dict(cell.updates)[decl.name]
    chain = _dominator_chain(cell, src, dst, decl.shape)
    if chain is None:
        return None
    n_hh, gated = 0, False
    for a, b in zip(chain, chain[1:]):
        link = _classify_link(cell, probe, a, b)
        if link == "householder":
            n_hh += 1
        elif link == "gate":
            gated = True
        else:
            return None
    return (n_hh, gated) if n_hh else None


def _dominator_chain(cell, src, dst, shape):
    g = nx.DiGraph()
    for n in cell.nodes:
        for a in n.args:
            g.add_edge(a, n.id)
    if src not in g or dst not in g or not nx.has_path(g, src, dst):
        return None
    reach = nx.descendants(g, src) | {src}
    sub = g.subgraph(v for v in reach if v == dst or nx.has_path(g, v, dst))
    idom = nx.immediate_dominators(sub, src)
    chain = [dst]
    while chain[-1] != src:
        chain.append(idom[chain[-1]])
    chain.reverse()
    same = [v for v in chain if _same_shape(cell.node(v).type.shape, shape)]
    return same if same[0] == src and same[-1] == dst else None


def _same_shape(a, b):
    return len(a) == len(b) and all(sympy.expand(x - y) == 0 for x, y in zip(a, b))


def _classify_link(cell, probe, a, b):
    """'gate' (b = c * a elementwise, plus a state-free term), 'householder' (b = (I - u u^T) a
    column by column, u u^T symmetric rank one, plus a state-free term) or 'other'."""
    linked = Probe(cell, probe.dims, overrides={a: "link"})
    src = flat(linked.override_symbols[a])
    out = [sympy.sympify(e) for e in flat(linked.values[b])]
    jac = jacobian(out, src)
    if any(e.free_symbols & set(src) for row in jac for e in row):
        return "other"
    k, v = linked.shape(cell.node(a))
    n = k * v
    if all(jac[i][j] == 0 for i in range(n) for j in range(n) if i != j):
        return "gate"
    # every column of the matrix state must be mapped by the same K x K matrix, alone
    blocks = []
    for col in range(v):
        idx = [i * v + col for i in range(k)]
        for i in range(n):
            for j in idx:
                if i not in idx and jac[i][j] != 0:
                    return "other"
        blocks.append([[jac[r][c] for c in idx] for r in idx])
    numeric = [_numeric(blk) for blk in blocks]  # the same random point for every block
    if any(not np.allclose(b, numeric[0], rtol=1e-12, atol=1e-12) for b in numeric[1:]):
        return "other"
    m = numeric[0] - np.eye(k)
    if not np.isfinite(m).all():
        return "other"
    sym = np.allclose(m, m.T, atol=1e-10)
    rank = np.linalg.matrix_rank(m, tol=1e-9)
    return "householder" if sym and rank == 1 else "other"


def _legal_plans(kind, form, elementwise):
    plans = ["sequential"]
    if kind == "affine" and elementwise:
        plans.append("scan")
    if kind != "affine" and elementwise:
        plans.append("newton")
    if form is not None:  # verified exact (a nonlinear cell's: through its max-plus states)
        plans.append("chunk")
    return tuple(plans)


def _chunk_form(cell):
    """The chunkwise form (verified exact: rcc.plans.chunk_form), or None."""
    from ..plans import NotChunkable, chunk_form

    try:
        return chunk_form(cell)
    except NotChunkable:
        return None
