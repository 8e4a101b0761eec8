"""Plans: how a cell's recurrence is evaluated over time. Each parallel plan rewrites the step
into the pieces its algorithm needs (rcc.passes.linearize), or says why it cannot.

  scan:   s' = a(x) * s + b(x) per state, a and b free of states: a linear scan over time.
  newton: s' = f(s, x) with a diagonal or block-diagonal Jacobian: parallel Newton iterations,
          each a linear scan of the linearised step (ParaRNN, DEER).
  chunk:  matrix states S' = decay * S + sum k v^T (GLA, RetNet) or products of Householder
          factors (DeltaNet, DeltaProduct): the chunkwise-parallel form (rcc.chunkform).
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import CompileError
from .passes.linearize import ZERO, Linearizer

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
    states: tuple  # of AffineState, one per updated state


@dataclass(frozen=True)
class NewtonForm:
    cell: object  # the CellIR extended with the Jacobian nodes
    states: tuple  # the coupled states' names, in the cell's order
    jacobian: tuple  # jacobian[i][j]: node id of d s_i' / d s_j (elementwise), or None


def illegal(plan, analysis, cell) -> CompileError:
    """The error for a plan the analysis did not find legal, naming a state and the reason."""
    first = next((s for s in analysis.states if s.updated), None)
    name = f"state '{first.name}'" if first else "this cell"
    if plan == "scan":
        why = (f"{name}: its next value is not affine in the states (the step's Jacobian "
               f"depends on them), so there is no s' = A(x) s + b(x) to scan"
               if analysis.kind == "nonlinear" else
               f"{name}: the transition is {analysis.structure}; the scan needs a scalar, "
               "diagonal or block-diagonal one")
    elif plan == "newton":
        why = (f"{name}: the update is affine ({analysis.structure}); use plan 'scan' or 'chunk'"
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
    for s in analysis.states:
        others = [r for r in s.reads if r != s.name]
        if others:
            raise CompileError(f"plan 'scan': state '{s.name}' reads state '{others[0]}'; the "
                               "scan handles states that each depend only on themselves "
                               "(coupled affine states are not supported yet)", cell.span)
    zeros = {leaf[s]: ZERO for s in leaf}
    states = []
    for name in updated:
        coefficient = lin.tangent({leaf[name]: lin.one}, [nxt[name]])[nxt[name]]
        offset = lin.substitute(zeros, [nxt[name]])[nxt[name]]
        for v in (coefficient, offset):
            if lin.depends_on(v, leaf.values()):  # the analysis said affine: a compiler bug
                raise AssertionError(f"scan form of {name} still reads a state")
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
