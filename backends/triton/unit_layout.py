"""Which cells' steps work unit by unit, so that their loop over time tiles over hidden units.

A cell whose states are vectors of one length D, and whose step computes every value either per
unit (a vector of m*D entries: m blocks of D, entry j of each block belonging to unit j) or per
row (a scalar), reads across units in one place only: the recurrent products `P @ s` (P a param
[m*D, D]) and `s @ P` (P [D, m*D]) of a state s. Everything else in the step (pointwise ops,
slices and concatenations of whole blocks) keeps unit j's entries in unit j. Such a step runs
as programs that each own a block of units (and of rows): a program needs the whole previous
state only for the products, which it reads from memory. This is the form of LSTM, GRU, Elman,
sLSTM and the diagonal (ParaRNN, linear) cells; the analysis reads it off the IR, whatever the
cell is called.

unit_layout(cell, part) returns a UnitLayout, or a sentence saying which value breaks the form.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from rcc import ir

from ..pointwise import POINTWISE


@dataclass(frozen=True)
class Product:
    """A recurrent product: node `node` = P @ state (or state @ P when `transposed`), P the
    loop partition's const number `matrix`, its result m blocks of D."""
    node: int
    matrix: int
    state: int
    transposed: bool
    m: int


@dataclass
class UnitLayout:
    D: sympy.Expr  # the states' length: the axis programs split
    blocks: dict = field(default_factory=dict)  # value id -> m (0: one number per row, or one)
    rowwise: set = field(default_factory=set)  # scalars that differ between rows
    products: list = field(default_factory=list)
    slices: dict = field(default_factory=dict)  # getitem id -> the first block it takes


def unit_layout(cell: ir.CellIR, part) -> UnitLayout | str:
    if cell.topology != "seq":
        return "the cell runs over a graph"
    if not cell.states or any(len(s.shape) != 1 for s in cell.states):
        return "a state is not a vector"
    D = sympy.sympify(cell.states[0].shape[0])
    if any(sympy.expand(sympy.sympify(s.shape[0]) - D) != 0 for s in cell.states):
        return "the states have different lengths"
    lay = UnitLayout(D)

    def blocks(shape):
        if len(shape) == 0:
            return 0
        if len(shape) != 1:
            return None
        q = sympy.simplify(sympy.sympify(shape[0]) / D)
        return int(q) if q.is_Integer and q > 0 else None

    const_index = {i: k for k, i in enumerate(part.const)}
    state_index = {part.state_node[d.name]: k for k, d in enumerate(cell.states) if d.name in part.state_node}
    for i in state_index:
        lay.blocks[i] = 1
    step = set(part.step)
    matrices = set()
    for i in part.step:
        n = cell.node(i)
        if n.op == "matmul":
            a, b = (cell.node(x) for x in n.args)
            m = blocks(n.type.shape)
            if m and a.id in const_index and b.id in state_index and a.type.rank == 2 \
                    and sympy.expand(sympy.sympify(a.type.shape[1]) - D) == 0:
                lay.products.append(Product(i, const_index[a.id], state_index[b.id], False, m))
                matrices.add(a.id)
            elif m and b.id in const_index and a.id in state_index and b.type.rank == 2 \
                    and sympy.expand(sympy.sympify(b.type.shape[0]) - D) == 0:
                lay.products.append(Product(i, const_index[b.id], state_index[a.id], True, m))
                matrices.add(b.id)
            else:
                return (f"the product {n.name or n.op} does not multiply a param by a state "
                        "(it reads a value the step computes, or contracts another axis)")
            lay.blocks[i] = m
    for i in part.seq + part.const:
        if i in matrices:
            users = [u for u in cell.users()[i] if u in step]
            if any(cell.node(u).op != "matmul" for u in users):
                return f"the matrix {cell.node(i).name} is read by more than a recurrent product"
            continue
        m = blocks(cell.node(i).type.shape)
        if m is None:
            return (f"{cell.node(i).name or cell.node(i).op} is neither a vector of the length of the "
                    "states nor a scalar")
        lay.blocks[i] = m
        if m == 0 and i in part.seq:
            lay.rowwise.add(i)
    for i in part.step:
        n = cell.node(i)
        if n.op == "matmul":
            continue
        why = _block_rule(cell, n, lay, blocks)
        if why:
            return why
    for v in [v for _, v in cell.updates]:
        if lay.blocks.get(v, 0) > 1:
            return "a state's update is longer than the state"
    return lay


def _block_rule(cell, n, lay, blocks) -> str:
    """Set lay.blocks[n.id] for a step node, or say why n mixes units."""
    m = blocks(n.type.shape)
    for a in n.args:
        if a not in lay.blocks and cell.node(a).op == "const":
            lay.blocks[a] = 0
    args = [lay.blocks.get(a) for a in n.args]
    name = n.name or n.op
    if m is None or any(x is None for x in args):
        return f"{name} is neither a vector of the length of the states nor a scalar"
    if n.op in POINTWISE:
        if any(x not in (0, m) for x in args):
            return f"{name} combines vectors of different lengths"
    elif n.op == "getitem":
        index = n.attr("index")
        if args[0] == 0 or len(index) != 1 or index[0][0] != "slice":
            return f"{name} indexes a vector other than by a slice of whole blocks"
        lo = sympy.simplify(sympy.sympify(index[0][1]) / lay.D)
        if not lo.is_Integer:
            return f"the slice {name} does not start at a multiple of the length of the states"
        lay.blocks[n.id] = m
        lay.slices[n.id] = int(lo)
        return ""
    elif n.op == "concat":
        if any(x == 0 for x in args):
            return f"{name} concatenates scalars"
    elif n.op == "transpose":
        if n.type.rank > 1:
            return f"{name} transposes a matrix"
    elif n.op not in ("zeros", "ones", "const"):
        return f"{name} ({n.op}) reads across units"
    lay.blocks[n.id] = m
    if m == 0 and any(a in lay.rowwise for a in n.args):
        lay.rowwise.add(n.id)
    return ""
