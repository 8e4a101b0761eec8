"""The typed SSA IR: what every pass analyses and every backend prints.

A `CellIR` is one step of a recurrence after elaboration: fns inlined, loops unrolled, names
resolved. Its `nodes` are in topological order; each has an `op` from `OPS`, argument node ids,
static attributes and a `Type`. Shapes are tuples of sympy expressions in the cell's dims, so one IR
serves every value of the free dims; a dim that sets a loop count or a split is fixed
(`Dim.static`), and an entry that is not an integer for every dim (`d/2` from split) is backed by a
`Constraint` checked when the dims are bound. `batched` says whether a value depends on an input
or a state: such a value differs per batch row, head and step, and carries a leading batch axis at
run time; the others depend on params and constants only. See docs/ir.md for the op table.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

import sympy

from .errors import Span

UNARY = ("neg", "sigmoid", "tanh", "relu", "silu", "gelu", "exp", "log", "log1p", "expm1",
         "softplus", "logsigmoid", "sqrt", "rsqrt", "abs", "sign", "sin", "cos")
BINARY = ("add", "sub", "mul", "div", "pow", "maximum", "minimum", "logaddexp")
COMPARE = ("lt", "le", "gt", "ge", "eq", "ne")
REDUCE = ("sum", "mean", "amax", "logsumexp")

# op -> (arity or None for variadic, attribute names)
OPS: dict[str, tuple[Optional[int], tuple[str, ...]]] = {
    "input": (0, ("name",)), "param": (0, ("name",)),
    # a state; over a graph, `scope` names the predecessor form (`pred`) it is read through
    "state": (0, ("name", "scope")),
    "const": (0, ("value",)),          # a scalar: sympy number or expression of dims
    "eye": (0, ("n",)), "zeros": (0, ()), "ones": (0, ()),
    **{op: (1, ()) for op in UNARY},
    **{op: (2, ()) for op in BINARY + COMPARE},
    "where": (3, ()),
    "matmul": (2, ()), "outer": (2, ()),
    **{op: (1, ("axis",)) for op in REDUCE},  # axis: None (all) or a non-negative int
    "softmax": (1, ("axis",)),
    "concat": (None, ("axis",)), "stack": (None, ("axis",)),
    "getitem": (1, ("index",)),        # index: tuple of ('int', e) | ('slice', a, b) | ('new',)
    "transpose": (1, ()),
    # Topologies (LANGUAGE.md section 8). pred: its argument evaluated once per incoming edge,
    # the states of scope `scope` bound to that edge's, then reduced by `agg` (sum, mean, max), or
    # (agg "index") through the k-th incoming edge only. slot: the row's incoming (side "in", of
    # a pred's scope) or outgoing (side "out") edge slot, an integer; take: x[..., slot, ...] at
    # declared axis `axis`.
    "pred": (1, ("agg", "k", "scope")),
    "slot": (0, ("side", "scope")),
    "take": (2, ("axis",)),
}
TOPOLOGIES = ("seq", "grid2d", "dag")
PRED_AGGS = ("sum", "mean", "max", "index")


@dataclass(frozen=True)
class Type:
    shape: tuple  # of sympy.Expr (integers in the dims)
    batched: bool

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        dims = ", ".join(str(s) for s in self.shape)
        return f"{'batched ' if self.batched else ''}[{dims}]"


@dataclass(frozen=True)
class Node:
    id: int
    op: str
    args: tuple
    attrs: tuple  # sorted (key, value) pairs, hashable
    type: Type
    span: Span
    name: str = ""  # the user's name for this value, if it was bound to one (for readable code)

    def attr(self, key: str, default: Any = None) -> Any:
        for k, v in self.attrs:
            if k == key:
                return v
        return default


@dataclass(frozen=True)
class Init:
    """A declaration's initializer: kind in INIT_KINDS, args (sympy scalars), or a param name."""
    kind: str
    args: tuple = ()
    param: str = ""


# "values": a state's initial value computed from numbers and dims, args its elements row-major
INIT_KINDS = ("default", "zeros", "ones", "const", "eye", "uniform", "normal", "xavier",
              "orthogonal", "param", "values")


@dataclass(frozen=True)
class Decl:
    kind: str  # input | param | state
    name: str
    shape: tuple
    init: Init
    span: Span
    over: str = "nodes"  # a state's place over a graph: "nodes", or "edges" (one per edge)


@dataclass(frozen=True)
class Dim:
    name: str
    default: Optional[int]
    span: Span
    static: Optional[int] = None  # value fixed at generation (the dim sets a loop count, say)


@dataclass(frozen=True)
class Constraint:
    """A dim expression that must be a positive integer (checked when dims are bound)."""
    expr: Any
    what: str
    span: Span
    failure: str = ""  # the message when it fails, if "WHAT is VALUE; must be positive" reads badly


@dataclass(frozen=True)
class CellIR:
    name: str
    filename: str
    topology: str
    dims: tuple  # of Dim
    inputs: tuple  # of Decl
    params: tuple
    states: tuple
    nodes: tuple  # of Node, topologically ordered, node.id == index
    updates: tuple  # ((state name, node id), ...)
    outputs: tuple  # ((output name, node id, span), ...)
    constraints: tuple = ()
    span: Optional[Span] = None
    source_hash: str = field(default="", compare=False)
    # per node, as elaborated: the span of the outermost fn call in the cell that made it (None
    # outside fns), for errors found after elaboration (rcc.lsrl). Passes that renumber nodes
    # drop it (with_nodes).
    origins: tuple = field(default=(), compare=False)

    def node(self, i: int) -> Node:
        return self.nodes[i]

    def users(self) -> dict:
        out = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for a in n.args:
                out[a].append(n.id)
        return out

    def with_nodes(self, nodes, updates=None, outputs=None) -> "CellIR":
        return replace(self, nodes=tuple(nodes), updates=self.updates if updates is None else
                       tuple(updates), outputs=self.outputs if outputs is None else tuple(outputs),
                       origins=())

    def located(self, i: int):
        """(span, notes) to report node `i` at: the fn call in the cell it came from, with a note
        at the place in the fn, or the node's own span."""
        origin = self.origins[i] if i < len(self.origins) else None
        n = self.nodes[i]
        if origin is None or origin == n.span:
            return n.span, ()
        return origin, (("in the fn, here", n.span),)


def cone(nodes, roots, stop=()) -> set:
    """The ids of the values `roots` are computed from (themselves included), not looking past
    the ids in `stop`."""
    seen, work = set(), list(roots)
    while work:
        i = work.pop()
        if i not in seen:
            seen.add(i)
            if i not in stop:
                work.extend(nodes[i].args)
    return seen


def dim_symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, positive=True)


def verify(cell: CellIR) -> None:
    """Check IR invariants (run between passes): SSA order, arity, attribute names, batched flags,
    and that updates and outputs name existing states and nodes."""
    for i, n in enumerate(cell.nodes):
        assert n.id == i, f"node {i} has id {n.id}"
        arity, attr_names = OPS[n.op]
        assert arity is None or len(n.args) == arity, f"{n.op} takes {arity} args: {n}"
        assert all(0 <= a < i for a in n.args), f"node {i} uses a later value: {n}"
        assert {k for k, _ in n.attrs} <= set(attr_names), f"bad attrs on {n}"
        want_batched = n.op in ("input", "state", "slot", "pred") or any(
            cell.nodes[a].type.batched for a in n.args)
        assert n.type.batched == want_batched, f"batched flag wrong on {n}"
    names = {d.name for d in cell.states}
    for s, v in cell.updates:
        assert s in names and 0 <= v < len(cell.nodes)
    for _, v, _ in cell.outputs:
        assert 0 <= v < len(cell.nodes)
