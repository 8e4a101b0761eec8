"""Where each value of a cell over a graph lives (LANGUAGE.md section 8), and the checks on it.

Over grid2d and dag a value is computed per node, per incoming edge (inside sum_pred & co.), per
outgoing edge (what an edge state's update computes: it reads out_slot) or per (incoming,
outgoing) pair (an edge state's update reading the incoming edges). `spaces` says which, as:

- "const": params and constants only; "seq": inputs only, computed for every node at once;
- "node", "in", "out", "pair": computed level by level, one row per node, edge or pair.
"""
from __future__ import annotations

from dataclasses import dataclass

from rcc import ir
from rcc.builder import GraphBuilder
from rcc.errors import CompileError


@dataclass(frozen=True)
class Spaces:
    space: dict  # node id -> "const" | "seq" | "node" | "in" | "out" | "pair"
    slots: int  # how many pred(E, k) tables are read (the largest k + 1)
    pairs: bool  # whether a value is computed per (incoming, outgoing) pair
    take_sizes: tuple  # ((side, axis size, span), ...): slot indices, checked against degrees


def spaces(cell: ir.CellIR) -> Spaces:
    aggs = {n.attr("scope"): (n.attr("agg"), n.attr("k")) for n in cell.nodes if n.op == "pred"}
    space, scopes, level = {}, {}, {}
    slots = 0
    takes = []
    for n in cell.nodes:
        axes, used = set(), set()  # {"in", "out"}; the aggregating scopes read
        for a in n.args:
            axes |= _axes(space[a])
            used |= scopes[a]
        is_level = any(level[a] for a in n.args)
        if n.op == "state" and n.attr("scope") is not None:
            agg, k = aggs[n.attr("scope")]
            is_level = True
            if agg == "index":
                slots = max(slots, k + 1)
            else:
                axes.add("in")
                used.add(n.attr("scope"))
        elif n.op == "slot":
            is_level = True
            axes.add(n.attr("side"))
            if n.attr("side") == "in":
                used.add(n.attr("scope"))
        elif n.op == "pred":
            is_level = True
            if n.attr("agg") != "index":
                used.discard(n.attr("scope"))
                axes.discard("in")
        elif n.op == "take":
            slot = cell.node(n.args[1])
            size = cell.node(n.args[0]).type.shape[n.attr("axis")]
            takes.append((slot.attr("side"), size, slot.span))
        if len(used) > 1:
            raise CompileError("this expression reads the incoming edges of two nested "
                               "predecessor forms at once; an inner sum_pred(...) sees only its "
                               "own edges", n.span)
        level[n.id], scopes[n.id] = is_level, used
        if not n.type.batched:
            space[n.id] = "const"
        elif not is_level:
            space[n.id] = "seq"
        else:
            space[n.id] = {frozenset(): "node", frozenset({"in"}): "in",
                           frozenset({"out"}): "out"}.get(frozenset(axes), "pair")
    pairs = any(s == "pair" for s in space.values())
    _check_uses(cell, space)
    return Spaces(space, slots, pairs, tuple(takes))


def _axes(space) -> set:
    return {"in": {"in"}, "out": {"out"}, "pair": {"in", "out"}}.get(space, set())


def _check_uses(cell, space):
    """Values per outgoing edge (they read out_slot) may only become an edge state."""
    place = {d.name: d.over for d in cell.states}
    for name, v, span in cell.outputs:
        if space[v] == "out":
            raise CompileError(f"output '{name}' reads out_slot, so it has one value per "
                               "outgoing edge; an output has one per node (sum the edges with "
                               "an edge state and sum_pred)", span)
    for name, v in cell.updates:
        if space[v] == "out" and place[name] != "edges":
            node = cell.node(v)
            raise CompileError(f"the update of state '{name}' reads out_slot, so it has one "
                               f"value per outgoing edge; declare it 'state {name}[...] over "
                               "edges'", node.span)


_LINEAR = ("add", "sub", "neg")


def affine_grid(cell: ir.CellIR):
    """Why plan 'chunk' cannot run this cell over grid2d, or None when it can: every state's next
    value must be affine in the states its predecessors bring, each scaled by a scalar per node
    (pLSTM's transitions) or a gate per channel, elementwise (never mixing channels):
    C' = sum_pred(T[out_slot, in_slot] * C) + b, a * pred(h, 0) + ..., g[d] * pred(h, 0) + ..."""
    return _affine_grid(cell)[0]


def per_channel_grid(cell: ir.CellIR) -> bool:
    """Whether plan chunk's transitions on this grid cell differ per channel (a gate of shape
    [d] scales a state): the solve then runs once per channel."""
    return _affine_grid(cell)[1]


def _affine_grid(cell: ir.CellIR):
    """(why not, or None; whether a transition is per channel)."""
    per_channel = False
    if cell.topology != "grid2d":
        return f"plan 'chunk' runs cells over grid2d; this one runs over {cell.topology}", False
    if not cell.updates:
        return "the cell updates no state", False
    for name, root in cell.updates:
        kind = {}  # node id -> "free" | "affine"
        needed = ir.cone(cell.nodes, [root])
        for n in cell.nodes:
            if n.id not in needed:
                continue
            args = [kind[a] for a in n.args]
            if n.op == "state" and n.attr("scope") is not None:
                if n.attr("name") != name:
                    return (f"the update of '{name}' reads state '{n.attr('name')}': each state's "
                            "update may read only itself"), False
                kind[n.id] = "affine"
            elif "affine" not in args:
                kind[n.id] = "free"
            elif n.op in _LINEAR or n.op == "pred" and n.attr("agg") in ("sum", "mean", "index"):
                kind[n.id] = "affine"
            elif n.op in ("mul", "div") and args.count("affine") == 1 and \
                    (n.op == "mul" or args[0] == "affine"):
                factor = cell.node(n.args[1] if args[0] == "affine" else n.args[0])
                scaled = cell.node(n.args[0] if args[0] == "affine" else n.args[1])
                if factor.type.rank != 0:
                    if tuple(n.type.shape) != tuple(scaled.type.shape):
                        return (f"the update of '{name}' scales a state of shape "
                                f"{list(scaled.type.shape)} into shape {list(n.type.shape)} "
                                f"(line {n.span.line}); plan 'chunk' takes gates that scale each "
                                "channel of the state in place"), False
                    per_channel = True  # elementwise: a transition per channel
                kind[n.id] = "affine"
            elif n.op in ("matmul", "outer"):
                return (f"the update of '{name}' multiplies its state by a matrix (line "
                        f"{n.span.line}); plan 'chunk' takes a scalar or a gate per channel per "
                        "node and edge pair"), False
            else:
                return (f"the update of '{name}' is not affine in its state: {n.op} at line "
                        f"{n.span.line}"), False
    return None, per_channel


def merge_predecessor_forms(cell: ir.CellIR) -> ir.CellIR:
    """One scope for equal predecessor forms: `sum_pred(C)` written twice (in an update and in an
    output, say) is then computed once. Forms are equal when their bodies are, up to the names of
    their own scopes (inner forms already merged)."""
    if cell.topology == "seq":
        return cell
    nodes = cell.nodes
    canon, seen = {}, {}  # scope -> its representative; (agg, body signature) -> scope
    memo = {}

    def sig(i, own):
        key = (i, own)
        if key not in memo:
            n = nodes[i]
            attrs = tuple((k, "own" if k == "scope" and v == own else canon.get(v, v) if
                           k == "scope" else v) for k, v in n.attrs)
            value = (n.op, attrs, n.type.shape, tuple(sig(a, own) for a in n.args))
            memo[key] = value
        return memo[key]

    for n in nodes:
        if n.op == "pred" and n.attr("agg") != "index":
            scope = n.attr("scope")
            canon[scope] = seen.setdefault((n.attr("agg"), sig(n.args[0], scope)), scope)
    if all(k == v for k, v in canon.items()):
        return cell
    builder, new = GraphBuilder(), {}
    for n in nodes:
        attrs = tuple((k, canon.get(v, v) if k == "scope" else v) for k, v in n.attrs)
        new[n.id] = builder.emit(n.op, tuple(new[a] for a in n.args), n.type.shape, n.span,
                                 attrs, batched=n.type.batched)
        kept = builder.nodes[new[n.id]]
        if n.name and not kept.name:
            builder.nodes[kept.id] = ir.Node(kept.id, kept.op, kept.args, kept.attrs, kept.type,
                                             kept.span, n.name)
    return cell.with_nodes(builder.nodes, updates=[(s, new[v]) for s, v in cell.updates],
                           outputs=[(o, new[v], sp) for o, v, sp in cell.outputs])
