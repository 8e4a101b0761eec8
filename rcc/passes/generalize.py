"""A cell written with literal sizes (`x[64]`, `W[64, 64]`) is analysed as the family it belongs to.

The analysis evaluates a step element by element in sympy (rcc.passes.probe): at a cell's literal
sizes that costs what the sizes cost (a 128 x 128 matmul: minutes), where a cell with symbolic
dims is probed at 2 and 3. So elaboration also builds the cell's *general* form: every integer
literal that is a declared size (over 8; smaller ones cost nothing) becomes a hidden dim whose
default is that literal. It is kept only if the general IR, with each hidden dim at its literal
value, is node for node the cell's IR: the cell is then one member of the family, and every fact
the analysis reads off the family at probe sizes holds for it as it does for a cell written with
dims. When the generalisation does not elaborate (a slice `x[0:32]` meeting a hidden dim), or does
not give back the cell, the analysis probes the cell itself, as before.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict

import sympy

from .. import ir
from .. import syntax as S
from ..errors import CompileError, Span

SMALLEST = 9  # literal sizes below this are probed as written


def hidden_dim(value: int) -> str:
    """The hidden dim standing for literal size `value` (not an identifier: no clash)."""
    return f"<{value}>"


def dims_text(dims: dict) -> str:
    """Probe dims as a message names them: `K=2`, and a literal size as `size 16 probed as 2`."""
    return ", ".join(f"size {k[1:-1]} probed as {v}" if k.startswith("<") else f"{k}={v}"
                     for k, v in sorted(dims.items()))


def literal_sizes(cell: S.Cell) -> list:
    """The integer literals in the cell's declared shapes that are worth generalising."""
    sizes = set()
    for stmt in _walk(cell.body):
        if isinstance(stmt, S.DeclItem):
            for e in _walk(stmt.shape):
                if isinstance(e, S.Num) and e.is_int and int(e.value) >= SMALLEST:
                    sizes.add(int(e.value))
    return sorted(sizes)


def generalize(cell: S.Cell, fns: dict, sizes: list, everywhere: bool = True):
    """(cell, fns) with every integer literal in `sizes` replaced by its hidden dim (with
    `everywhere` False, only those in declared shapes: `64 ** -128` is no expression of dims);
    the hidden dims are declared in increasing order of their values, so probe values keep that
    order."""
    sizes = set(sizes)

    def rewrite(node, shape=False):
        if isinstance(node, S.Num) and node.is_int and int(node.value) in sizes \
                and (everywhere or shape):
            return S.Name(hidden_dim(int(node.value)), node.span)
        if isinstance(node, S.DeclItem):
            return dataclasses.replace(node, shape=rewrite(node.shape, True),
                                       init=rewrite(node.init))
        if isinstance(node, tuple):
            return tuple(rewrite(x, shape) for x in node)
        if dataclasses.is_dataclass(node) and not isinstance(node, (type, Span)):
            return dataclasses.replace(node, **{f.name: rewrite(getattr(node, f.name), shape)
                                                for f in dataclasses.fields(node)})
        return node

    hidden = tuple(S.DimDecl(hidden_dim(v), v, cell.span) for v in sorted(sizes))
    general = dataclasses.replace(cell, dims=tuple(cell.dims) + hidden, body=rewrite(cell.body))
    return general, {name: rewrite(fn) for name, fn in fns.items()}


def instance_of(general, cell) -> bool:
    """Whether `general` (a general CellIR, or anything holding one: a plan's form) with each
    hidden dim at its value is `cell` (constraints aside: the cell's were checked at its literal
    sizes)."""
    return _same(general, cell, literal_values(general, cell))


def literal_values(general, cell) -> dict:
    """Each hidden dim's symbol -> its literal size."""
    general = _cell_in(general)
    names = {d.name for d in _cell_in(cell).dims}
    return {ir.dim_symbol(d.name): d.default for d in general.dims if d.name not in names}


def _cell_in(obj):
    return obj if isinstance(obj, ir.CellIR) else obj.cell


def _same(a, b, values) -> bool:
    if isinstance(a, ir.CellIR) and isinstance(b, ir.CellIR):
        return all(_same(getattr(a, f), getattr(b, f), values) for f in _COMPARED)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y, values) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        return all(_same(getattr(a, f.name), getattr(b, f.name), values)
                   for f in dataclasses.fields(a) if f.compare)
    a = substitute(a, values)
    if isinstance(b, sympy.Float) and isinstance(a, sympy.Expr) and a.is_number:
        return float(a) == float(b)  # a constant the cell's elaboration rounded (sqrt(12))
    return a == b


_COMPARED = ("name", "topology", "inputs", "params", "states", "nodes", "updates", "outputs")


def substitute(obj, values: dict):
    """`obj` (sympy expressions, or tuples of them) with `values` substituted."""
    if isinstance(obj, sympy.Basic):
        return obj.subs(values)
    if isinstance(obj, tuple):
        return tuple(substitute(x, values) for x in obj)
    return obj


# cell -> its general form, for cells whose general form was checked to give them back; keyed by
# what the analysis reads (a dim's default does not change the family)
_GENERAL: OrderedDict = OrderedDict()
_KEEP = 256


def _key(cell: ir.CellIR):
    return (cell.name, cell.topology, tuple((d.name, d.static) for d in cell.dims), cell.inputs,
            cell.params, cell.states, cell.nodes, cell.updates, cell.outputs)


def remember(cell: ir.CellIR, general) -> bool:
    """Record `general` as `cell`'s general form if it gives `cell` back and has probe sizes
    (a constraint between hidden dims may have none: the analysis then probes `cell`); whether
    it did."""
    from .probe import probe_dims

    if general is None or not instance_of(general, cell):
        return False
    try:
        probe_dims(general, 0), probe_dims(general, 1)
    except CompileError:
        return False
    _GENERAL[_key(cell)] = general
    _GENERAL.move_to_end(_key(cell))
    while len(_GENERAL) > _KEEP:
        _GENERAL.popitem(last=False)
    return True


def general_of(cell: ir.CellIR):
    """The checked general form of `cell`, or None (then the analysis probes `cell` itself)."""
    return _GENERAL.get(_key(cell))


def _walk(node):
    """Every dataclass and tuple inside `node`, depth first."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, tuple):
            stack.extend(n)
        elif dataclasses.is_dataclass(n) and not isinstance(n, type):
            yield n
            stack.extend(getattr(n, f.name) for f in dataclasses.fields(n))
