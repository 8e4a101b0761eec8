"""Plans: how a cell's recurrence is evaluated over time. Each parallel plan rewrites the step
into the pieces its algorithm needs (rcc.passes.linearize), or says why it cannot.

  scan:   s' = a(x) * s + b(x) per state, a and b free of states: a linear scan over time.
  newton: s' = f(s, x) with a diagonal or block-diagonal Jacobian: parallel Newton iterations,
          each a linear scan of the linearised step (ParaRNN, DEER).
  chunk:  matrix states S' = decay * S + sum k v^T (GLA, RetNet) or products of Householder
          factors (DeltaNet, DeltaProduct): the chunkwise-parallel form (rcc.chunkform).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import sympy

from . import ir
from .errors import CompileError
from .passes.generalize import general_of, instance_of
from .passes.linearize import ZERO, Linearizer
from .lowrank import NotLowRank, filled, micro_steps
from .passes.verify import chunk_form_mismatch, refusal

PLANS = ("auto", "sequential", "scan", "chunk", "newton")


@dataclass(frozen=True)
class AffineState:
    """s' = coefficient * s + offset (node ids; coefficient None: s' does not read s)."""
    name: str
    coefficient: object
    offset: object  # node id or ZERO


@dataclass(frozen=True)
class ScanForm:
    cell: object  # the CellIR extended with the coefficient and offset nodes
    states: tuple  # of AffineState, one per updated state (coupled: one per state)
    # coupled states (they read each other element by element): matrix[i][j] = d s_i' / d s_j
    # (node id or None), one block scan over k x k blocks; the states' coefficients are None
    matrix: tuple = ()


@dataclass(frozen=True)
class NewtonForm:
    cell: object  # the CellIR extended with the Jacobian nodes
    states: tuple  # the coupled states' names, in the cell's order
    jacobian: tuple  # jacobian[i][j]: node id of d s_i' / d s_j (elementwise), or None


def illegal(plan, analysis, cell, reason="") -> CompileError:
    """The error for a plan the analysis did not find legal, naming a state and the reason."""
    first = next((s for s in analysis.states if s.updated), None)
    name = f"state '{first.name}'" if first else "this cell"
    if reason:
        why = reason if "state '" in reason else f"{name}: {reason}"
    elif plan == "scan":
        why = (f"{name}: its next value is not affine in the states (the step's Jacobian "
               f"depends on them), so there is no s' = A(x) s + b(x) to scan"
               if analysis.kind == "nonlinear" else
               f"{name}: the transition is {analysis.structure}; the scan needs each state's "
               "next value to read the states element by element (a scalar, diagonal or "
               "block-diagonal transition)")
    elif plan == "newton":
        others = [p for p in analysis.plans if p in ("scan", "chunk")]
        why = (f"{name}: the update is affine ({analysis.structure}): Newton would take one "
               "iteration; " + (f"use plan '{others[0]}'" if others else "no parallel form of "
                                "its transition applies")
               if analysis.kind == "affine" else
               f"{name}: the step's Jacobian is {analysis.structure}; parallel Newton needs it "
               "diagonal or block-diagonal (each step would solve a dense system)")
    else:
        why = (f"{name}: the chunkwise form needs a matrix state updated affinely by a "
               f"scalar/diagonal decay or Householder factors; this transition is "
               f"{analysis.kind} {analysis.structure}")
    return CompileError(f"plan '{plan}' does not apply to cell '{cell.name}': {why} "
                        f"(legal plans: {', '.join(analysis.plans)})", cell.span)


def _updates(cell):
    """Each state's next value: its update, or the state itself where it is never updated."""
    leaf = {n.attr("name"): n.id for n in cell.nodes if n.op == "state"}
    updates = dict(cell.updates)
    return leaf, {d.name: updates.get(d.name, leaf[d.name]) for d in cell.states}


def scan_form(cell, analysis) -> ScanForm:
    if "scan" not in analysis.plans:
        raise illegal("scan", analysis, cell)
    lin = Linearizer(cell)
    leaf, nxt = _updates(cell)
    updated = [d.name for d in cell.states if d.name in dict(cell.updates)]
    zeros = {leaf[s]: ZERO for s in leaf}
    if any(set(s.reads) - {s.name} for s in analysis.states):
        # coupled (LRU's complex state as re/im pairs, delay lines): the analysis found every
        # block d s_i' / d s_j elementwise between states of one shape, so one block scan
        names = [d.name for d in cell.states]
        columns = [lin.tangent({leaf[j]: lin.one}, [nxt[i] for i in names]) for j in names]
        matrix = tuple(tuple(columns[j][nxt[i]] for j in range(len(names))) for i in names)
        offsets = lin.substitute(zeros, [nxt[i] for i in names])
        states = tuple(AffineState(i, None, offsets[nxt[i]]) for i in names)
        return ScanForm(cell.with_nodes(lin.nodes), states, matrix)
    states = []
    for name in updated:
        coefficient = lin.tangent({leaf[name]: lin.one}, [nxt[name]])[nxt[name]]
        offset = lin.substitute(zeros, [nxt[name]])[nxt[name]]
        for v in (coefficient, offset):
            if lin.depends_on(v, leaf.values()):
                # affine only through a simplification the IR does not make (h ** (x - x)):
                # the analysis then leaves the scan out of the legal plans
                raise NotScannable(f"the scan's form of state '{name}', read off the step, "
                                   "still reads a state")
        states.append(AffineState(name, coefficient, offset))
    return ScanForm(cell.with_nodes(lin.nodes), tuple(states))


def newton_form(cell, analysis) -> NewtonForm:
    if "newton" not in analysis.plans:
        raise illegal("newton", analysis, cell)
    names = [d.name for d in cell.states]
    shapes = {d.name: tuple(d.shape) for d in cell.states}
    if len(set(shapes.values())) != 1:
        raise CompileError("plan 'newton': coupled states of different shapes ("
                           + ", ".join(f"{n}{list(s)}" for n, s in shapes.items())
                           + ") are not supported: the blocks pair equal elements",
                           cell.span)
    lin = Linearizer(cell)
    leaf, nxt = _updates(cell)
    # one forward-mode pass per state: column j of every block, as elementwise values
    columns = [lin.tangent({leaf[j]: lin.one}, [nxt[i] for i in names]) for j in names]
    jac = tuple(tuple(columns[j][nxt[i]] for j in range(len(names))) for i in names)
    return NewtonForm(cell.with_nodes(lin.nodes), tuple(names), jac)


@dataclass(frozen=True)
class Readout:
    """An output's read of the matrix state: node `node` is o = q @ S' (per head), or q @ S
    (prev: the state before the step, RWKV-6), plus `extra` (a state-free node, or None) where
    the output reads q @ (S + X): extra = q @ X (RWKV-6's bonus)."""
    node: int
    q: int  # node id, shape [*heads, K]
    prev: bool = False
    extra: object = None


@dataclass(frozen=True)
class ChunkForm:
    """S' = decay * S + k v^T (kind "linear": GLA, RetNet), S' = Householder products
    (kind "delta": M = gate * S; M = (I - beta_j k_j k_j^T) M + k_j u_j^T for each j), or
    diagonal-plus-rank-one micro-steps (kind "dplr": M = diag(e^g) M + a (b^T M) + k u^T for
    each; KDA, RWKV-7, Comba, per-key gated DeltaProduct; rcc.lowrank)."""
    cell: object
    state: str
    kind: str
    heads: tuple  # leading axes of the state before [K, V]
    log_decay: object  # node id of shape [*heads, K] or [*heads, 1] (linear), [] (delta); or None
    keys: tuple  # node ids [*heads, K], one per rank-1 term / Householder factor
    values: tuple  # node ids [*heads, V] (linear: v; delta: u = beta * v)
    betas: tuple  # delta: node ids of shape []
    readouts: tuple  # of Readout
    steps: tuple = ()  # dplr: the micro-steps of a token (rcc.lowrank.Micro, every piece a node)
    # vector states z[K] folded in as extra value columns (linear kind): z' = decay * z + k c,
    # read as q . z' with the readout's q: ((state name, c node, readout node), ...)
    folded: tuple = ()
    maxplus: tuple = ()  # of MaxPlus: states computed first, by a max-plus scan


@dataclass(frozen=True)
class MaxPlus:
    """A state with m' = max(m + a, b), a and b free of every state (xLSTM's stabiliser): its
    trajectory is one max-plus scan, and the other states see m and m' as given sequences."""
    state: str
    leaf: int
    update: int
    a: int
    b: int


class NotScannable(Exception):
    """The affine step's scan form cannot be read off the IR (the analysis drops the scan)."""


class NotChunkable(Exception):
    """Why the chunkwise form does not apply (the analysis reports it; plan='chunk' raises it)."""


@functools.lru_cache(maxsize=32)
def chunk_form(cell) -> ChunkForm:
    """The pieces of the chunkwise form, or NotChunkable saying why. The pieces are read off the
    IR's structure, then checked to reproduce the step exactly (rcc.passes.verify): a form that
    does not is refused, whatever the pattern matched. (Cached: the analysis, the cost model and
    the printer all ask; a refusal is not cached and is recomputed.)"""
    # a cell with literal sizes: its form verified on the family it belongs to (a refusal is the
    # family's, said at probe sizes; rcc.passes.generalize)
    general = general_of(cell)
    verified = chunk_form(general) if general is not None else None
    try:
        form = _structural_chunk_form(cell)
    except NotChunkable as e:
        if len(cell.states) == 1 and len(cell.states[0].shape) >= 2 and cell.updates:
            raise NotChunkable(refusal(cell, cell.states[0].name, str(e))) from None
        raise
    if verified is not None and instance_of(verified, form):
        return form
    why = chunk_form_mismatch(form, cell)
    if why:
        raise NotChunkable(why)
    return form


def _structural_chunk_form(cell) -> ChunkForm:
    """The gated linear or delta-rule form (backend triton has kernels for both), else the
    diagonal-plus-rank-one one; with vector states beside the matrix, those folded in."""
    maxplus = _maxplus_states(cell)
    if maxplus and len(maxplus) < len(cell.updates):
        given = _given(cell, maxplus)
        inner = _structural_chunk_form(given)
        extension = inner.cell.nodes[len(cell.nodes):]
        return replace(inner, cell=cell.with_nodes(cell.nodes + extension),
                       maxplus=tuple(maxplus))
    if len(cell.states) > 1:
        return _folded_chunk_form(cell)
    try:
        return _gated_chunk_form(cell)
    except NotChunkable as first:
        if len(cell.states) != 1 or len(cell.updates) != 1 or len(cell.states[0].shape) != 2:
            raise
        try:
            return _dplr_chunk_form(cell)
        except NotLowRank as e:
            raise NotChunkable(str(e)) from None
        except NotChunkable:
            raise first from None


def _dplr_chunk_form(cell) -> ChunkForm:
    decl = cell.states[0]
    lin = Linearizer(cell)
    leaf, nxt = _updates(cell)
    s, s_next = leaf[decl.name], nxt[decl.name]
    chain = _chain(cell, s, s_next, decl.shape)
    steps = micro_steps(cell, lin, chain, decl, (_log_of, _drop_axis, _rank_one))
    steps = filled(lin, steps, decl.shape[0], decl.shape[1], cell.span)
    readouts = _only_after_the_step(_readouts(cell, lin, s, s_next, decl),
                                    "diagonal-plus-rank-one form")
    return ChunkForm(cell.with_nodes(lin.nodes), decl.name, "dplr", (), None, (), (), (),
                     readouts, tuple(steps))


def _maxplus_states(cell) -> list:
    """The states whose update is max(m + a, b) (either order) with a, b free of every state."""
    leaves = {n.attr("name"): n.id for n in cell.nodes if n.op == "state"}
    found = []
    for name, u in cell.updates:
        n = cell.node(u)
        if n.op != "maximum" or name not in leaves:
            continue
        leaf = leaves[name]
        for x, y in (n.args, n.args[::-1]):
            term = cell.node(x)
            if term.op == "add" and leaf in term.args and \
                    not ir.cone(cell.nodes, [y]) & set(leaves.values()):
                a = term.args[1] if term.args[0] == leaf else term.args[0]
                if not ir.cone(cell.nodes, [a]) & set(leaves.values()):
                    found.append(MaxPlus(name, leaf, u, a, y))
                    break
    return found


def _given(cell, maxplus):
    """`cell` with each max-plus state's previous and next values made inputs (same node ids):
    what the other states' forms are read from, with m and m' as given sequences."""
    nodes = list(cell.nodes)
    decls = []
    for m in maxplus:
        decl = next(d for d in cell.states if d.name == m.state)
        for i, suffix in ((m.leaf, "@prev"), (m.update, "@next")):
            n = nodes[i]
            nodes[i] = ir.Node(i, "input", (), (("name", m.state + suffix),), n.type, n.span)
            decls.append(ir.Decl("input", m.state + suffix, decl.shape, decl.init, decl.span))
    names = {m.state for m in maxplus}
    return replace(cell, nodes=tuple(nodes), inputs=cell.inputs + tuple(decls),
                   states=tuple(d for d in cell.states if d.name not in names),
                   updates=tuple((s, u) for s, u in cell.updates if s not in names))


def _folded_chunk_form(cell) -> ChunkForm:
    """One matrix state S[K, V] in the gated linear form and vector states z[K] whose update is
    the same decay plus S's key times a scalar, z' = decay * z + k c (linear attention's
    normaliser, mLSTM's n without its stabiliser): each z is one more column of S with value c,
    read as q . z' with S's q (the normaliser); one chunkwise pass computes all of them."""
    matrices = [d for d in cell.states if len(d.shape) >= 2]
    if len(matrices) != 1 or len(matrices[0].shape) != 2:
        raise NotChunkable("the chunkwise form needs one [K, V] matrix state; vector states [K] "
                           "beside it are folded in as extra value columns")
    decl = matrices[0]
    lin = Linearizer(cell)
    form = _gated_chunk_form(cell, decl, lin)
    if form.kind != "linear" or any(r.prev or r.extra is not None for r in form.readouts):
        raise NotChunkable(f"vector states beside state '{decl.name}' fold into the gated linear "
                           f"form S' = decay * S + k v^T read as q @ {decl.name}' only")
    leaf, nxt = _updates(cell)
    users, outputs = cell.users(), [v for _, v, _ in cell.outputs]
    q, stop, folded = form.readouts[0].q, {r.node for r in form.readouts}, []
    for z in (d for d in cell.states if d is not decl):
        if len(z.shape) != 1 or sympy.expand(z.shape[0] - decl.shape[0]) != 0 or \
                z.name not in dict(cell.updates):
            raise NotChunkable(f"state '{z.name}' is not a vector [K] updated beside matrix state "
                               f"'{decl.name}' (only those fold into its chunkwise form)")
        write = lin.substitute({leaf[z.name]: ZERO}, [nxt[z.name]])[nxt[z.name]]
        c = _scale_of(lin, write, form.keys[0])
        reads = [u for u in users[nxt[z.name]] if cell.node(u).op == "matmul"
                 and set(cell.node(u).args) == {nxt[z.name], q}]
        if c is None or len(reads) != 1:
            raise NotChunkable(f"state '{z.name}' does not fold into state '{decl.name}': its "
                               f"input term must be k * scalar with {decl.name}'s key k, and the "
                               f"outputs must read it once as dot(q, {z.name}') with its q")
        folded.append((z.name, c, reads[0]))
        stop.add(reads[0])
    read = lin.cone(outputs, stop=stop)
    others = [z for z, _, _ in folded if leaf[z] in read or nxt[z] in read]
    if others:
        raise NotChunkable(f"an output reads state '{others[0]}' other than as dot(q, "
                           f"{others[0]}')")
    return replace(form, cell=cell.with_nodes(lin.nodes), folded=tuple(folded))


def _scale_of(lin, v, k):
    """c with v = k * c (c a scalar node; the constant one where v is k), else None."""
    if v == k:
        return lin.one
    if v == ZERO:  # no input term (z' = z / k): not decay * z + k c
        return None
    n = lin.node(v)
    if n.op == "mul" and k in n.args:
        c = n.args[1] if n.args[0] == k else n.args[0]
        return c if lin.node(c).type.rank == 0 else None
    return None


def _gated_chunk_form(cell, decl=None, lin=None) -> ChunkForm:
    """The form of matrix state `decl` (the cell's one state when None), read with `lin`."""
    if decl is None:
        if len(cell.states) != 1 or len(cell.updates) != 1:
            raise NotChunkable("the chunkwise form needs exactly one state, a matrix")
        decl = cell.states[0]
        if len(decl.shape) < 2:
            raise NotChunkable(f"state '{decl.name}' is not a matrix")
    lin = lin or Linearizer(cell)
    leaf, nxt = _updates(cell)
    s, s_next = leaf[decl.name], nxt[decl.name]
    heads = tuple(decl.shape[:-2])
    chain = _chain(cell, s, s_next, decl.shape)
    links = [_link(cell, lin, a, b) for a, b in zip(chain, chain[1:])]
    gates = [ln for ln in links if ln[0] == "gate"]
    factors = [ln for ln in links if ln[0] == "householder"]
    if factors:
        if len(gates) + len(factors) != len(links):
            raise NotChunkable("a step of the update is neither a decay gate nor a Householder "
                               "factor (I - beta k k^T) S + k u^T")
        if heads:
            raise NotChunkable("the delta-rule chunk form takes a [K, V] state (heads as layout)")
        if gates and (links[0][0] != "gate" or len(gates) > 1):
            raise NotChunkable("the decay gate must come once, before the Householder factors")
        log_decay = None
        if gates:
            log_decay = _log_of(lin, gates[0][1])
            if lin.node(log_decay).type.rank != 0:
                raise NotChunkable("the delta-rule chunk form needs a scalar decay gate")
        readouts = _only_after_the_step(_readouts(cell, lin, s, s_next, decl), "delta rule")
        return ChunkForm(cell.with_nodes(lin.nodes), decl.name, "delta", heads, log_decay,
                         tuple(f[1] for f in factors), tuple(f[2] for f in factors),
                         tuple(f[3] for f in factors), readouts)
    # one affine link: S' = a * S + b with b a rank-1 product
    a = lin.tangent({s: lin.one}, [s_next])[s_next]
    b = lin.substitute({s: ZERO}, [s_next])[s_next]
    if a is None or b in (None, ZERO) or lin.depends_on(a, [s]) or lin.depends_on(b, [s]):
        raise NotChunkable("the update is not S' = decay * S + k v^T")
    a_shape = tuple(lin.node(a).type.shape)
    if len(a_shape) >= 1 and a_shape[-1] != 1:
        raise NotChunkable(f"the decay varies along the last axis of state '{decl.name}' "
                           "(it must scale whole rows: decay[..., :, None] or a scalar)")
    log_decay = _log_of(lin, a)
    if len(a_shape) >= 1:
        log_decay = _drop_axis(lin, log_decay, len(a_shape) - 1)  # [..., K, 1] -> [..., K]
    k, v = _rank_one(cell, lin, b, decl)
    readouts = _readouts(cell, lin, s, s_next, decl)
    return ChunkForm(cell.with_nodes(lin.nodes), decl.name, "linear", heads, log_decay, (k,),
                     (v,), (), readouts)


def _readouts(cell, lin, s, s_next, decl):
    """Where the outputs read the state: each must be q @ S' (or its per-head form
    sum(S' * q[..., :, None], axis=-2)), q @ S, or either plus a state-free matrix, q @ (S + X),
    with q free of the state."""
    outputs = lin.cone([v for _, v, _ in cell.outputs])
    update = lin.cone([s_next])  # the update's own reads (k @ S of the delta rule) are not outputs'
    users = cell.users()
    found = []
    for n in cell.nodes:
        if n.id not in outputs:
            continue
        read = _matrix_read(cell, lin, users, n, s, s_next) \
            if len(decl.shape) == 2 and n.id not in update else None
        if read is not None:
            q, prev, extra = read
            if lin.depends_on(q, [s, s_next]):
                break
            found.append(Readout(n.id, q, prev, extra))
            continue
        if s_next not in n.args:
            continue
        if n.op == "matmul" and n.args == (n.args[0], s_next) and len(decl.shape) == 2:
            q, node = n.args[0], n.id
        elif n.op == "sum" and n.attr("axis") == len(decl.shape) - 2:  # ones @ S'
            q = lin.b.emit("ones", (), decl.shape[:-1], n.span)
            node = n.id
        else:
            q, node = _sum_readout(cell, lin, users, n, s_next, len(decl.shape))
        if q is None or lin.depends_on(q, [s, s_next]):
            break
        found.append(Readout(node, q))
    reads = lin.cone([v for _, v, _ in cell.outputs], stop={r.node for r in found})
    if len(found) != 1 and not (s in reads or s_next in reads):
        raise NotChunkable(f"the outputs must read state '{decl.name}' once, as q @ "
                           f"{decl.name}'")
    if s in reads or s_next in reads:
        raise NotChunkable(f"an output reads state '{decl.name}' other than as q @ "
                           f"{decl.name}' (the chunkwise form computes only that)")
    return tuple(found)


def _only_after_the_step(readouts, form):
    if any(r.prev for r in readouts):
        raise NotChunkable(f"an output reads the state before the step (q @ S); the chunkwise "
                           f"{form} computes reads of S' only (gated linear attention takes both)")
    return readouts


def _matrix_read(cell, lin, users, n, s, s_next):
    """(q, prev, extra) for n = q @ S, q @ (S + X) or q @ (S' + X) with X state-free (extra =
    q @ X, a new node); None for q @ S' alone (the plain readout) and anything else."""
    if n.op != "matmul" or cell.node(n.args[1]).type.rank != 2:
        return None
    q, m = n.args
    if m == s:
        return q, True, None
    if m == s_next:  # S' may itself be S + X: it is read as S'
        return None
    term = cell.node(m)
    if term.op != "add":
        return None
    for own, other in (term.args, term.args[::-1]):
        if own in (s, s_next) and not lin.depends_on(other, [s, s_next]) and len(users[m]) == 1:
            extra = lin.b.emit("matmul", (q, other), n.type.shape, n.span)
            return q, own == s, extra
    return None


def _sum_readout(cell, lin, users, n, s_next, rank):
    """(q, the sum node) for sum(S' * q[..., :, None], axis=rank-2) at `n`, else (None, None)."""
    if n.op != "mul":
        return None, None
    other = n.args[1] if n.args[0] == s_next else n.args[0]
    shape = lin.node(other).type.shape
    used_by = users[n.id]
    if len(used_by) != 1 or cell.node(used_by[0]).op != "sum" or \
            cell.node(used_by[0]).attr("axis") != rank - 2 or len(shape) != rank or shape[-1] != 1:
        return None, None
    return _drop_axis(lin, other, rank - 1), used_by[0]


def _drop_axis(lin, v, axis):
    """v[..., 0, ...] on `axis` (a size-1 axis)."""
    node = lin.node(v)
    shape = node.type.shape
    target = tuple(shape[:axis]) + tuple(shape[axis + 1:])
    if node.op == "getitem" and node.attr("index")[axis:] == (("new",),) and \
            tuple(lin.node(node.args[0]).type.shape) == target:
        return node.args[0]  # x[..., None][..., 0] is x
    index = tuple(("slice", sympy.Integer(0), d) for d in shape[:axis]) + (("int", sympy.Integer(0)),)
    return lin.b.emit("getitem", (v,), shape[:axis] + shape[axis + 1:], node.span,
                      (("index", index),))


def _log_of(lin, a):
    """log(a) without computing exp then log where a is exp(z) (a decay near 0 stays finite)."""
    n = lin.node(a)
    if n.op == "exp":
        return n.args[0]
    if n.op == "getitem":
        return lin.b.emit("getitem", (_log_of(lin, n.args[0]),), n.type.shape, n.span, n.attrs)
    if n.op == "mul":
        return lin._bin("add", _log_of(lin, n.args[0]), _log_of(lin, n.args[1]))
    try:
        return lin._un("log", a)
    except CompileError:  # a constant decay of 0 or below: its log folds to no real number
        raise NotChunkable("the decay is a constant that is not positive (the chunkwise form "
                           "works with its logarithm)") from None


def _rank_one(cell, lin, b, decl):
    n = lin.node(b)
    if n.op == "outer":
        return n.args
    if n.op == "mul" and any(lin.node(a).op == "outer" for a in n.args):
        outer = next(a for a in n.args if lin.node(a).op == "outer")
        c = n.args[1] if n.args[0] == outer else n.args[0]
        if lin.node(c).type.rank == 0:  # c * outer(k, v) = outer(k, c * v)
            k, v = lin.node(outer).args
            return k, lin._bin("mul", c, v)
    if n.op == "mul":
        x, y = (lin.node(i) for i in n.args)
        if x.type.rank == y.type.rank == len(decl.shape) and x.type.shape[-1] == 1 \
                and y.type.shape[-2] == 1:
            return (_drop_axis(lin, x.id, x.type.rank - 1), _drop_axis(lin, y.id, y.type.rank - 2))
    raise NotChunkable(f"the input term of state '{decl.name}' is not one outer product k v^T")


def _chain(cell, s, s_next, shape):
    from .passes.analysis import _dominator_chain

    chain = _dominator_chain(cell, s, s_next, shape)
    if chain is None:
        raise NotChunkable("the update does not pass through a chain of state-shaped values")
    return chain


def _link(cell, lin, a, b):
    """("gate", coefficient) for b = c * a; ("householder", k, u, beta) for
    b = a + outer(k, u - beta * (k @ a)); else ("other",)."""
    coefficient = lin.tangent({a: lin.one}, [b])[b]
    offset = lin.substitute({a: ZERO}, [b])[b]
    n = cell.node(b)
    if offset == ZERO and coefficient is not None and not lin.depends_on(coefficient, [a]):
        return ("gate", coefficient)
    if n.op == "add" and a in n.args:
        term = cell.node(n.args[1] if n.args[0] == a else n.args[0])
        if term.op == "outer":
            k, w = term.args
            reads = [m for m in lin.cone([w]) if cell.node(m).op == "matmul"
                     and cell.node(m).args[1] == a]
            if len(reads) == 1 and cell.node(reads[0]).args[0] == k and \
                    a not in lin.cone([w], stop=set(reads)) - set(reads):
                z = reads[0]
                c = lin.tangent({z: lin.one}, [w])[w]
                u = lin.substitute({z: ZERO}, [w])[w]
                if c is not None and lin.node(c).type.rank == 0 and u != ZERO \
                        and not lin.depends_on(c, [a, z]):
                    return ("householder", k, u, lin._un("neg", c))
    return ("other",)
