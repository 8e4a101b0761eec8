"""Drop values that no state update or output uses (e.g. locals a loop bound but never read)."""
from __future__ import annotations

from dataclasses import replace

from .. import ir

_LEAVES = ("input", "param", "state")


def eliminate_dead_code(cell: ir.CellIR) -> ir.CellIR:
    live = set()
    work = [v for _, v in cell.updates] + [v for _, v, _ in cell.outputs]
    while work:
        i = work.pop()
        if i not in live:
            live.add(i)
            work.extend(cell.node(i).args)
    # declarations stay; a state read through a predecessor form (over a graph) is a value
    keep = [n for n in cell.nodes if n.id in live or n.op in _LEAVES and n.attr("scope") is None]
    if len(keep) == len(cell.nodes):
        return cell
    new_id = {n.id: k for k, n in enumerate(keep)}
    nodes = [replace(n, id=new_id[n.id], args=tuple(new_id[a] for a in n.args)) for n in keep]
    return cell.with_nodes(nodes, updates=[(s, new_id[v]) for s, v in cell.updates],
                           outputs=[(o, new_id[v], sp) for o, v, sp in cell.outputs])
