"""An LSRL program debranched into a path: stages of one kind each, in the order a target's layers
provide them.

The program's states are grouped into LinStates: states whose updates read each other's values
form one LinState (strongly connected components of the read graph), and its transition must be
affine in them: a ReLU or product inside such a loop is no LinState. Every ReLU, product and
LinState is then placed at the earliest stage of its kind (the target's pattern of stage kinds,
repeated) after the stages that compute what it reads. A value needed later than the stage after
the one computing it is carried through the stages between, as LSRL's debranching does with
bypasses; what a bypass is depends on the stage's kind (rcc.lsrl.layers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from ..errors import CompileError
from .program import Form, Program


@dataclass
class LinState:
    """States updated together: S' = A S + (forms of other atoms); the `old` values read outside
    the update (`keep_old`, flat indices into S) are kept one step as more state elements."""
    states: list  # (name, size)
    A: np.ndarray
    inputs: list  # [Form] per element of S: the update less its A S part
    init: np.ndarray
    keep_old: list = field(default_factory=list)

    def atoms(self):
        """(kind, name, index) of S's elements, in order."""
        return [(name, k) for name, size in self.states for k in range(size)]


@dataclass
class Stage:
    kind: str  # L (LinStates), R (ReLUs), M (products)
    items: list  # atom ids (R, M) or LinStates (L)
    carried: list  # atom ids passed through


@dataclass
class Schedule:
    program: Program
    stages: list
    linstates: list


def _form_atoms(forms) -> set:
    return {a for f in forms for a in f.terms}


def group_states(prog: Program) -> list:
    """The LinStates of `prog`, in an order where each reads only earlier ones' values."""
    atoms = prog.atoms
    reach: dict = {}

    def states_reached(a) -> frozenset:  # the states an atom's value depends on this step
        if a not in reach:
            at = atoms[a]
            if at.kind in ("old", "new"):
                reach[a] = frozenset({at.name})
            elif at.kind == "input":
                reach[a] = frozenset()
            else:
                reach[a] = frozenset().union(*(states_reached(b) for b in _form_atoms(at.args)))
        return reach[a]

    g = nx.DiGraph()
    names = [name for name, _, _ in prog.states]
    g.add_nodes_from(names)
    for s in names:
        for a in _form_atoms(prog.updates[s]):
            for q in states_reached(a):
                g.add_edge(q, s)
    sizes = {name: int(np.prod(shape)) for name, shape, _ in prog.states}
    order = list(nx.topological_sort(nx.condensation(g)))
    comps = nx.condensation(g).graph["mapping"]
    members = {}
    for s in names:  # declaration order within a LinState
        members.setdefault(comps[s], []).append(s)
    out = []
    for c in order:
        group = members[c]
        out.append(_linstate(prog, group, sizes, states_reached))
    return out


def _linstate(prog, group, sizes, states_reached) -> LinState:
    atoms = prog.atoms
    inside = set(group)
    position, n = {}, 0
    for s in group:
        for k in range(sizes[s]):
            position[(s, k)] = n
            n += 1
    forms = [f for s in group for f in prog.updates[s]]
    # a `new` value of the group read in its own update is its update's form (acyclic: s' can
    # only read the updates computed before it)
    for _ in range(n + 1):
        expand = [a for a in _form_atoms(forms) if atoms[a].kind == "new"
                  and atoms[a].name in inside]
        if not expand:
            break
        forms = [_substitute(f, {a: prog.updates[atoms[a].name][atoms[a].index]
                                 for a in expand}) for f in forms]
    A = np.zeros((n, n))
    inputs = []
    for row, f in enumerate(forms):
        rest = {}
        for a, c in f.terms.items():
            at = atoms[a]
            if at.kind == "old" and at.name in inside:
                A[row, position[(at.name, at.index)]] += c
            elif states_reached(a) & inside:
                names = ", ".join(sorted(states_reached(a) & inside))
                raise CompileError(
                    f"the states {', '.join(group)} form a loop through a {at.kind} (here) that "
                    f"reads {names}: an LSRL LinState is affine in its own state (s' = A s + B x + "
                    "b); move the nonlinearity out of the loop", at.span, at.notes)
            else:
                rest[a] = c
        inputs.append(Form(prog, rest, f.const))
    init = np.concatenate([np.asarray(init, dtype=np.float64).reshape(-1)
                           for name, _, init in prog.states if name in inside]) if n else \
        np.zeros(0)
    order = {name: i for i, (name, _, _) in enumerate(prog.states)}
    return LinState([(s, sizes[s]) for s in sorted(group, key=order.get)], A, inputs, init)


def _substitute(f: Form, defs: dict) -> Form:
    out = Form(f.prog, {}, f.const)
    for a, c in f.terms.items():
        out = out + (defs[a].scale(c) if a in defs else Form(f.prog, {a: c}))
    return out


def schedule(prog: Program, pattern: str, refuse=None) -> Schedule:
    """Place the program's LinStates, ReLUs and products at stages of `pattern` (e.g. "LR": a
    LinState stage then a ReLU stage), repeated as often as needed; stages left empty are
    dropped. `refuse(atom)` may raise for
    an atom kind the target cannot compute."""
    atoms = prog.atoms
    linstates = group_states(prog)
    provides = {}  # atom id -> the item that computes it
    for ls in linstates:
        for name, k in ls.atoms():
            for kind in ("new", "old"):
                key = (kind, name, k, ())
                if key in prog.index:
                    provides[prog.index[key]] = ls
    items = {}  # item -> (kind, atoms it reads)
    for ls in linstates:
        items[id(ls)] = (ls, "L", _form_atoms(ls.inputs))
    for a, at in enumerate(atoms):
        if at.kind in ("relu", "mul"):
            if refuse is not None:
                refuse(at)
            items[a] = (a, "R" if at.kind == "relu" else "M", _form_atoms(at.args))
            provides[a] = a
    # old values read outside their LinState's own update: kept one more step
    read_anywhere = set().union(*(r for _, _, r in items.values()),
                                _form_atoms(f for _, _, fs in prog.outputs for f in fs))
    for ls in linstates:
        ls.keep_old = [i for i, (name, k) in enumerate(ls.atoms())
                       if prog.index.get(("old", name, k, ())) in read_anywhere]
    available = {a for a, at in enumerate(atoms) if at.kind == "input"}
    pending = dict(items)
    placed = []  # (stage kind, [item])
    idle = 0
    while pending:
        kind = pattern[len(placed) % len(pattern)]
        ready = [key for key, (item, k, reads) in pending.items()
                 if k == kind and reads <= available]
        placed.append((kind, [pending[key][0] for key in ready]))
        for key in ready:
            item = pending.pop(key)[0]
            available |= {a for a, it in provides.items() if it is item}
        idle = 0 if ready else idle + 1
        if idle > len(pattern):
            raise CompileError("the program reads a value before it is computed (an LSRL "
                               "program is a DAG within each step)", prog.span)
    # a stage with nothing placed would only pass values on: dropped
    placed = [(kind, its) for kind, its in placed if its]
    return Schedule(prog, _with_carried(prog, placed, items, provides), linstates)


def _with_carried(prog, placed, items, provides) -> list:
    """Stages with the atoms each must pass through: made earlier, read later."""
    made_at = {a: -1 for a, at in enumerate(prog.atoms) if at.kind == "input"}
    for k, (_, its) in enumerate(placed):
        for item in its:
            for a, it in provides.items():
                if it is item:
                    made_at[a] = k
    last_read = {}
    for k, (kind, its) in enumerate(placed):
        for item in its:
            key = id(item) if kind == "L" else item
            for a in items[key][2]:
                last_read[a] = max(last_read.get(a, -1), k)
    for _, _, forms in prog.outputs:
        for a in _form_atoms(forms):
            last_read[a] = len(placed)
    stages = []
    for k, (kind, its) in enumerate(placed):
        carried = sorted(a for a, made in made_at.items()
                         if made < k and last_read.get(a, -1) > k)
        stages.append(Stage(kind, its, carried))
    return stages
