"""The Triton kernels of a cell's loop over time (backend triton, plan sequential).

One program runs one row (batch x head) through all T steps, each value of the step a register
tile: a value of declared shape (e0, e1) is a tile (P0, P1), each extent padded to a power of two
(Triton's tiles are). Padded entries hold whatever the op computes there: loads fill them with 0,
stores skip them, and every contraction and reduction masks them, so garbage (exp(0) = 1, 1/0)
never reaches a real entry. The params' tiles are loaded once, before the loop, and stay on chip.

What the kernel computes and what torch computes before it is backends/loop.py's partition, the
same as backend cpp's. Pointwise ops are sympy expressions (backends/pointwise.py) printed as
Triton; the functions Triton lacks (tanh, log1p, expm1, softplus, ...) are jit helpers of the
prelude below. Slices, concat and stack of tiles are gathers along one axis (tl.gather).

The backward kernel runs the steps in reverse, recomputes each step from the state saved before
it, and adds each node's adjoint into its arguments' adjoints (sympy's partial derivatives for
pointwise ops, rules for the rest). The adjoints of the per-step arguments are stored per step;
those of the params' values are summed over the steps in registers, per row, and over the rows by
torch.

Numbers: a number Triton would round (a float literal is float32 in Triton) is passed as a
constexpr and made a tile of the kernel's float type, so float64 kernels stay exact.
"""
from __future__ import annotations

import re

import sympy
from sympy.printing.pycode import PythonCodePrinter

from rcc import ir
from rcc.codegen import dim_expr, doc_text

from ..loop import LoopPartition
from ..pointwise import POINTWISE, Helper, derivatives, pointwise

PRELUDE = '''
# ---- helpers for what triton.language lacks, numerically stable ----
@triton.jit
def rcc_expm1(x):
    # Kahan: (u - 1) * x / log(u) is exact to rounding where u = exp(x) rounds near 1
    u = tl.exp(x)
    um1 = u - 1.0
    r = tl.where(u == 1.0, x, um1 * x / tl.log(tl.where(u == 1.0, 2.0, u)))
    r = tl.where(um1 == -1.0, -1.0, r)
    return tl.where(u == float("inf"), u, r)


@triton.jit
def rcc_log1p(x):
    # Kahan: log(u) * x / (u - 1), u = 1 + x, corrects the rounding of 1 + x
    u = 1.0 + x
    r = tl.where(u == 1.0, x, tl.log(u) * x / tl.where(u == 1.0, 1.0, u - 1.0))
    return tl.where(u == float("inf"), u, r)


@triton.jit
def rcc_tanh(x):
    e = rcc_expm1(-2.0 * tl.abs(x))
    t = -e / (2.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def rcc_sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def rcc_softplus(x):
    return tl.maximum(x, 0.0) + rcc_log1p(tl.exp(-tl.abs(x)))


@triton.jit
def rcc_logsigmoid(x):
    return tl.minimum(x, 0.0) - rcc_log1p(tl.exp(-tl.abs(x)))


@triton.jit
def rcc_silu(x):
    return x * rcc_sigmoid(x)


@triton.jit
def rcc_gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x / tl.sqrt(tl.full((), 2.0, x.dtype))))


@triton.jit
def rcc_relu(x):
    return tl.maximum(x, 0.0)


@triton.jit
def rcc_abs(x):
    return tl.abs(x)


@triton.jit
def rcc_sign(x):
    return tl.where(x > 0, 1.0, 0.0) - tl.where(x < 0, 1.0, 0.0)


@triton.jit
def rcc_step(x):
    return tl.where(x > 0, 1.0, 0.0)


@triton.jit
def rcc_tiestep(x):
    # the share of a tie torch.maximum's gradient gives each side
    return tl.where(x > 0, 1.0, tl.where(x == 0, 0.5, 0.0))


@triton.jit
def rcc_max(a, b):
    return tl.maximum(a, b)


@triton.jit
def rcc_min(a, b):
    return tl.minimum(a, b)


@triton.jit
def rcc_logaddexp(a, b):
    m = tl.maximum(a, b)
    r = m + rcc_log1p(tl.exp(-tl.abs(a - b)))
    return tl.where(m == float("-inf"), m, r)


@triton.jit
def rcc_where(c, a, b):
    return tl.where(c != 0, a, b)


@triton.jit
def rcc_pow(a, b):
    # torch.pow: a negative base takes an integer exponent's sign; 0 ** 0 = 1
    m = tl.exp(b * tl.log(tl.abs(a)))
    odd = tl.abs(b - 2.0 * tl.floor(b * 0.5)) == 1.0
    # nested where, not &: Triton's interpreter cannot & a 0-d mask with a tile's
    m = tl.where(a < 0, tl.where(odd, -m, m), m)
    m = tl.where(a < 0, tl.where(b != tl.floor(b), float("nan"), m), m)
    return tl.where(b == 0, 1.0, m)


@triton.jit
def rcc_softmax(x, axis: tl.constexpr):
    # x's padding is -inf, so exp puts 0 there
    e = tl.exp(x - tl.max(x, axis, keep_dims=True))
    return e / tl.sum(e, axis, keep_dims=True)


@triton.jit
def rcc_logsumexp(x, axis: tl.constexpr):
    m = tl.max(x, axis)
    m = tl.where(m == float("-inf"), 0.0, m)
    return tl.log(tl.sum(tl.exp(x - tl.expand_dims(m, axis)), axis)) + m


@triton.jit
def rcc_logsumexp_all(x):
    m = tl.max(x)
    m = tl.where(m == float("-inf"), 0.0, m)
    return tl.log(tl.sum(tl.exp(x - m))) + m
''' + "".join(f'''

@triton.jit
def rcc_{op}(a, b):
    return tl.where(a {sym} b, 1.0, 0.0)
''' for op, sym in (("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">="), ("eq", "=="), ("ne", "!=")))

MAX_TILE = 65536  # elements of one register tile of the per-row kernel ([256, 256])

_TL = {"exp": "tl.exp", "log": "tl.log", "sqrt": "tl.sqrt", "sin": "tl.sin", "cos": "tl.cos",
       "erf": "tl.erf", "tanh": "rcc_tanh", "log1p": "rcc_log1p", "expm1": "rcc_expm1"}


def t_name(hint: str) -> str:
    """A user's name reduced to identifier characters (it only decorates generated names)."""
    return re.sub(r"[^A-Za-z0-9_]", "", hint or "")[:24]


def value_hint(cell, i) -> str:
    """Identifier characters from value i's name (its node's, or the input's, param's or state's
    it reads), to decorate generated names; "v" when it has none."""
    n = cell.node(i)
    return t_name(n.name or (n.attr("name") if n.op in ("input", "param", "state") else "")) or "v"


def differentiable(cell, part) -> set:
    """The values an adjoint flows through: the step's arguments, the states, and what the step
    computes from them."""
    diff, step = set(), set(part.step)
    for n in cell.nodes:
        if n.id in part.seq or n.id in part.const or n.op == "state" or (
                n.id in step and any(a in diff for a in n.args)):
            diff.add(n.id)
    return diff


def _fp32_exact(value) -> bool:
    import struct
    v = float(value)
    return struct.unpack("f", struct.pack("f", v))[0] == v if abs(v) < 3e38 else False


def _shifted(grid, sign, offset, printer) -> str:
    offset = sympy.sympify(offset)
    return grid if offset == 0 else f"{grid} {sign} {printer._int(offset)}"


class TileExprPrinter(PythonCodePrinter):
    """Prints a pointwise sympy expression as Triton: symbols through `names`, numbers Triton
    would round through `constant` (which returns the name of an exact tile of the number)."""

    def __init__(self, names: dict, constant):
        super().__init__({"standard": "python3"})
        self.names, self.constant = names, constant

    def _print(self, expr, **kwargs):
        if isinstance(expr, sympy.Basic) and expr.is_number and not isinstance(expr, Helper):
            if expr.is_Integer or ((expr.is_Rational or expr.is_Float) and _fp32_exact(expr)):
                return repr(float(expr))
            return self.constant(expr)
        return super()._print(expr, **kwargs)

    def _print_Symbol(self, s):
        return self.names[s.name]

    def _print_Pow(self, e, rational=False):
        base, exp = e.args
        b = self.parenthesize(base, sympy.printing.precedence.PRECEDENCE["Mul"] + 1)
        if exp == 2:
            return f"({b} * {b})"
        if exp == 3:
            return f"({b} * {b} * {b})"
        if exp == -1:
            return f"(1.0 / {b})"
        if exp == -2:
            return f"(1.0 / ({b} * {b}))"
        if exp == sympy.Rational(1, 2):
            return f"tl.sqrt({self._print(base)})"
        if exp == -sympy.Rational(1, 2):
            return f"(1.0 / tl.sqrt({self._print(base)}))"
        if base == sympy.E:
            return f"tl.exp({self._print(exp)})"
        return f"rcc_pow({self._tensor(base)}, {self._tensor(exp)})"

    def _tensor(self, expr):
        """`expr` printed as a tile even when it is a number (a literal is not a tensor)."""
        text = self._print(expr)
        if expr.is_number and text[0].isdigit() or text.startswith("-") and text[1:2].isdigit():
            return f"tl.full((), {text}, ACC)"
        return text

    def _print_Function(self, e):
        if isinstance(e, Helper):
            return f"{e.c_name}({', '.join(self._print(a) for a in e.args)})"
        name = type(e).__name__
        if name in _TL:
            return f"{_TL[name]}({', '.join(self._print(a) for a in e.args)})"
        raise NotImplementedError(f"triton printer: function {name}")  # unreachable for our ops

    _print_exp = _print_log = _print_sqrt = _print_sin = _print_cos = _print_erf = _print_Function
    _print_tanh = _print_log1p = _print_expm1 = _print_Function


class TileKernelPrinter:
    """Prints the forward and backward Triton kernels of `cell`'s loop over time, and `meta`,
    the Python function that computes their constexprs (extents, pads, numbers) from the dims."""

    def __init__(self, cell: ir.CellIR, split=None):
        self.cell = cell
        # the extent of the axis programs split (value_split.py: the step never mixes it), or None
        self.split = None if split is None else sympy.sympify(split)
        self.part = part = LoopPartition(cell)
        self.step, self.seq, self.const = part.step, part.seq, part.const
        self.state_node, self.updates = part.state_node, part.updates
        self.users = part.users
        self.name = t_name(cell.name) or "cell"
        self.extents = {}  # extent expression -> index k (E{k}, P{k}, index ix{k}, mask mx{k})
        self.constants = {}  # sympy number or dim expression -> index k (constexpr K{k})
        self.shapes = {}  # declared shape -> index j (offsets o{j}, mask m{j})
        self.value = {}  # node id -> local name in the kernel
        # arguments' names: kind prefix + index + the user's name, so they never collide
        self.seq_ptr = [f"q{k}_{self._hint(i)}" for k, i in enumerate(self.seq)]
        self.const_ptr = [f"w{k}_{self._hint(i)}" for k, i in enumerate(self.const)]
        self.tag = [f"{k}_{t_name(d.name)}" for k, d in enumerate(cell.states)]
        self.out_ptr = [f"p_out{k}_{t_name(name)}" for k, (name, _, _) in enumerate(cell.outputs)]
        # which values an adjoint flows through: those computed from an argument or a state
        self.diff = differentiable(cell, part)

    def _hint(self, i):
        return value_hint(self.cell, i)

    # ---- extents, shapes, constants --------------------------------------------------------
    def extent(self, expr) -> int:
        expr = sympy.sympify(expr)
        if not expr.is_integer:
            expr = sympy.floor(expr)
        return self.extents.setdefault(expr, len(self.extents))

    def tile(self, shape) -> str:
        """The tile shape of a declared shape, as a Triton shape tuple."""
        pads = [f"P{self.extent(e)}" for e in shape]
        return "(" + ", ".join(pads) + ("," if len(pads) == 1 else "") + ")"

    def axis(self, k_extent, axis, rank) -> str:
        """Index grid `ix{k}` along `axis` of a rank-`rank` tile."""
        return self._expand(f"ix{k_extent}", axis, rank)

    def axis_mask(self, k_extent, axis, rank) -> str:
        return self._expand(f"mx{k_extent}", axis, rank)

    @staticmethod
    def _expand(text, axis, rank):
        if rank == 1:
            return text
        return f"{text}[{', '.join(':' if a == axis else 'None' for a in range(rank))}]"

    def shape_index(self, shape) -> int:
        shape = tuple(sympy.sympify(s) for s in shape)
        for e in shape:
            self.extent(e)
        return self.shapes.setdefault(shape, len(self.shapes))

    def offsets(self, shape) -> str:
        return f"o{self.shape_index(shape)}" if shape else "0"

    def mask(self, shape):
        return f"m{self.shape_index(shape)}" if shape else None

    def numel(self, shape) -> str:
        return " * ".join(f"E{self.extent(e)}" for e in shape) or "1"

    def constant(self, value) -> str:
        k = self.constants.setdefault(sympy.sympify(value), len(self.constants))
        return f"k{k}"

    # ---- loads and stores ------------------------------------------------------------------
    def load(self, pointer, base, shape) -> str:
        address = f"{pointer} + {base}" if base else pointer
        if not shape:
            return f"tl.load({address}).to(ACC)"
        return (f"tl.load({address} + {self.offsets(shape)}, mask={self.mask(shape)}, "
                f"other=0.0).to(ACC)")

    def store(self, pointer, base, shape, value) -> str:
        address = f"{pointer} + {base}" if base else pointer
        if not shape:
            return f"tl.store({address}, {value})"
        return f"tl.store({address} + {self.offsets(shape)}, {value}, mask={self.mask(shape)})"

    def masked(self, text, shape, fill="0.0") -> str:
        """`text` (a tile of `shape`) with its padding set to `fill`."""
        if not shape:
            return text
        return f"tl.where({self.mask(shape)}, {text}, {fill})"

    # ---- forward values --------------------------------------------------------------------
    def operand(self, i, rank) -> str:
        """Value `i` as an operand of a pointwise op whose result has `rank` axes (NumPy aligns
        trailing axes; Triton's tiles need the leading ones added)."""
        n = self.cell.node(i)
        text = self.value[i]
        if 0 < n.type.rank < rank:
            return f"{text}[{', '.join(['None'] * (rank - n.type.rank) + [':'] * n.type.rank)}]"
        return text

    def _pointwise_symbols(self, n):
        """Sympy symbols (or numbers, for constants) of `n`'s arguments, and their texts."""
        syms, names = [], {}
        for k, a in enumerate(n.args):
            node = self.cell.node(a)
            value = sympy.sympify(node.attr("value")) if node.op == "const" else None
            if value is not None and a not in self.value and not value.free_symbols:
                syms.append(value)
            else:
                s = sympy.Symbol(f"a{k}")
                syms.append(s)
                names[s.name] = (self.constant(value) if value is not None and a not in self.value
                                 else self.operand(a, n.type.rank))
        return syms, names

    def expr(self, n: ir.Node) -> str:
        """The Triton expression of node `n` from its arguments' values."""
        op, shape, a = n.op, n.type.shape, n.args
        c = self.cell
        if op == "const":
            return self._number(n.attr("value")) + " + tl.zeros((), ACC)"
        if op == "outer":
            return f"{self.value[a[0]]}[:, None] * {self.value[a[1]]}[None, :]"
        if op in POINTWISE:
            syms, names = self._pointwise_symbols(n)
            value = pointwise(op, syms)
            text = TileExprPrinter(names, self.constant).doprint(value)
            if shape and not value.free_symbols:  # folded to a number (0.0 * S): keep the tile
                text = f"{text} + tl.zeros({self.tile(shape)}, ACC)"
            return text
        x = self.value[a[0]] if a else None
        if op == "matmul":
            return self._matmul(n)
        if op in ("sum", "mean", "amax", "logsumexp"):
            return self._reduce(n)
        if op == "softmax":
            src = c.node(a[0]).type.shape
            axis = n.attr("axis") if n.attr("axis") is not None else len(src) - 1
            neg = 'float("-inf")'
            return f"rcc_softmax({self.masked(x, src, neg)}, {axis})"
        if op == "getitem":
            return self._getitem(n)
        if op == "transpose":
            r = n.type.rank
            if r < 2:
                return x
            return f"tl.trans({x})" if r == 2 else f"tl.permute({x}, {tuple(range(r - 1, -1, -1))})"
        if op in ("concat", "stack"):
            return self._concat(n)
        if op == "eye":
            k0, k1 = (self.extent(e) for e in shape)
            return f"tl.where({self.axis(k0, 0, 2)} == {self.axis(k1, 1, 2)}, 1.0, 0.0).to(ACC)"
        if op in ("zeros", "ones"):
            return f"tl.full({self.tile(shape)}, {'1.0' if op == 'ones' else '0.0'}, ACC)"
        raise NotImplementedError(f"triton kernel: op {op}")  # unreachable for verified IR

    def _matmul(self, n):
        A, B = (self.cell.node(i) for i in n.args)
        x, y = self.value[A.id], self.value[B.id]
        kk = self.extent(A.type.shape[-1])
        if A.type.rank == 2 and B.type.rank == 1:  # [M, K] @ [K]
            return f"tl.sum(tl.where({self.axis_mask(kk, 1, 2)}, {x} * {y}[None, :], 0.0), 1)"
        if A.type.rank == 1 and B.type.rank == 2:  # [K] @ [K, N]
            return f"tl.sum(tl.where({self.axis_mask(kk, 0, 2)}, {x}[:, None] * {y}, 0.0), 0)"
        if A.type.rank == 1:  # [K] @ [K]
            return f"tl.sum(tl.where(mx{kk}, {x} * {y}, 0.0), 0)"
        return (f"tl.sum(tl.where({self.axis_mask(kk, 1, 3)}, {x}[:, :, None] * {y}[None, :, :], "
                f"0.0), 1)")

    def _reduce(self, n):
        src = self.cell.node(n.args[0])
        x, shape, axis = self.value[src.id], src.type.shape, n.attr("axis")
        if not shape:
            return x
        where = "" if axis is None else f", {axis}"
        if n.op in ("sum", "mean"):
            total = f"tl.sum({self.masked(x, shape)}{where})"
            if n.op == "sum":
                return total
            count = self.numel(shape) if axis is None else f"E{self.extent(shape[axis])}"
            return f"{total} / ({count})"
        neg = 'float("-inf")'
        if n.op == "amax":
            return f"tl.max({self.masked(x, shape, neg)}{where})"
        if axis is None:
            return f"rcc_logsumexp_all({self.masked(x, shape, neg)})"
        return f"rcc_logsumexp({self.masked(x, shape, neg)}, {axis})"

    def _index_steps(self, n):
        """NumPy indexing as steps on one axis each: ("new", axis, shape before),
        ("int", axis, shape, index), ("slice", axis, shape, start, extent); full slices vanish."""
        shape, axis, steps = list(self.cell.node(n.args[0]).type.shape), 0, []
        for entry in n.attr("index"):
            if entry[0] == "new":
                steps.append(("new", axis, tuple(shape)))
                shape.insert(axis, sympy.Integer(1))
                axis += 1
            elif entry[0] == "int":
                steps.append(("int", axis, tuple(shape), sympy.sympify(entry[1])))
                shape.pop(axis)
            else:
                lo, hi = sympy.sympify(entry[1]), sympy.sympify(entry[2])
                if not (lo == 0 and sympy.expand(hi - shape[axis]) == 0):
                    steps.append(("slice", axis, tuple(shape), lo, hi - lo))
                    shape[axis] = hi - lo
                axis += 1
        return steps

    def _getitem(self, n):
        """Each step: a new axis is expand_dims; an int picks one entry along its axis (a masked
        sum over it); a slice is a gather along its axis."""
        text = self.value[n.args[0]]
        for step in self._index_steps(n):
            kind, axis, shape = step[:3]
            if kind == "new":
                text = f"tl.expand_dims({text}, {axis})"
            elif kind == "int":
                pick = f"{self.axis(self.extent(shape[axis]), axis, len(shape))} == {self._int(step[3])}"
                text = f"tl.sum(tl.where({pick}, {text}, 0.0), {axis})"
            else:
                lo, width = step[3], step[4]
                grid = self.axis(self.extent(width), axis, len(shape))
                text = self._gather(text, shape, axis, width, _shifted(grid, "+", lo, self))
        return text

    def _int(self, expr) -> str:
        """A dim expression as a constexpr integer expression."""
        expr = sympy.sympify(expr)
        if expr.is_Integer:
            return str(int(expr))
        return f"E{self.extent(expr)}"

    def _gather(self, text, shape, axis, new_extent, index):
        """Tile `text` (of `shape`) gathered along `axis` at `index` (a grid along `axis`, of
        new_extent's pad), clamped into the source tile."""
        src_pad = f"P{self.extent(shape[axis])}"
        out = list(shape)
        out[axis] = new_extent
        return (f"tl.gather({text}, tl.broadcast_to(tl.minimum(tl.maximum({index}, 0), "
                f"{src_pad} - 1), {self.tile(out)}), {axis})")

    def _concat(self, n):
        """concat: each part gathered into place along the axis; stack: the same, each part an
        extent of 1 on a new axis."""
        axis, shape, r = n.attr("axis"), n.type.shape, n.type.rank
        k = self.extent(shape[axis])
        grid = self.axis(k, axis, r)
        out = f"tl.zeros({self.tile(shape)}, ACC)"
        offset = sympy.Integer(0)
        for a in n.args:
            part = self.cell.node(a)
            text, pshape = self.value[a], list(part.type.shape)
            if n.op == "stack":
                text = f"tl.expand_dims({text}, {axis})"
                pshape.insert(axis, sympy.Integer(1))
            width = pshape[axis]
            inside = f"({grid} >= {self._int(offset)}) & ({grid} < {self._int(offset + width)})"
            moved = self._gather(text, pshape, axis, shape[axis], _shifted(grid, "-", offset, self))
            out = f"tl.where({inside}, {moved}, {out})"
            offset = offset + width
        return out

    # ---- the kernels -----------------------------------------------------------------------
    def _leaves(self):
        """Names of the values the step reads from outside: states, per-step arguments, params'
        values; and the lines that load the params' values (once, before the loop)."""
        c = self.cell
        self.value = {}
        for k, d in enumerate(c.states):
            if d.name in self.state_node:
                self.value[self.state_node[d.name]] = self._state_value(k)
        for k, i in enumerate(self.seq):
            self.value[i] = f"x{k}_{self._hint(i)}"
        pre = []
        for k, i in enumerate(self.const):
            self.value[i] = f"w{k}_{self._hint(i)}"
            pre.append(f"{self.value[i]} = {self.load('p_' + self.value[i], '', self._shape(i))}")
        pre += self._constant_tiles(self.step, list(self.updates.values()) + [v for _, v, _ in c.outputs])
        return pre

    def _constant_tiles(self, ids, roots=()) -> list:
        """Lines giving a tile of its own to each constant that something other than a pointwise
        op reads (a pointwise op folds numbers into its expression), or that is a root."""
        c = self.cell
        wanted = set(roots) | {a for i in ids if c.node(i).op not in POINTWISE for a in c.node(i).args}
        lines = []
        for i in sorted(wanted):
            if c.node(i).op == "const" and i not in self.value:
                self.value[i] = f"c{i}"
                lines.append(f"c{i} = {self.expr(c.node(i))}")
        return lines

    def _shape(self, i):
        return self.cell.node(i).type.shape

    def _state_value(self, k):
        return f"s{self.tag[k]}"

    def _step_lines(self, time):
        """The loop body up to the step's values: per-step loads, then every node."""
        lines = []
        for k, i in enumerate(self.seq):
            v = self.value[i]
            lines.append(f"{v} = {self.load('p_' + v, f'{time} * {v}_st + n * {v}_sn', self._shape(i))}")
        for i in self.step:
            n = self.cell.node(i)
            if n.op == "const" and i in self.value:
                continue
            self.value[i] = f"v{i}_{self._hint(i)}" if n.name else f"v{i}"
            lines.append(f"{self.value[i]} = {self.expr(n)}")
        return lines

    def _root(self, v) -> str:
        if v not in self.value:  # a constant read directly
            return self._number(self.cell.node(v).attr("value"))
        return self.value[v]

    def _number(self, value) -> str:
        """A constant's value: a literal, or a constexpr's tile (dims, numbers float32 rounds)."""
        value = sympy.sympify(value)
        if value.free_symbols:
            return self.constant(value)
        return TileExprPrinter({}, self.constant).doprint(value)

    def _next_state(self, k, v) -> str:
        d = self.cell.states[k]
        text = f"({self._root(v)}).to(ACC)"
        if tuple(self._shape(v)) != tuple(d.shape) or self.cell.node(v).op == "const":
            text = f"tl.broadcast_to({text}, {self.tile(d.shape)})"
        return text

    def forward_source(self) -> list:
        c = self.cell
        pre = self._leaves()
        for k, d in enumerate(c.states):
            s = self._state_value(k)
            pre.append(f"{s} = {self.load(f'p_init{self.tag[k]}', f'n * ({self.numel(d.shape)})', d.shape)}")
        loop = []
        for k, d in enumerate(c.states):
            s = self._state_value(k)
            loop += ["if SAVE:  # the state before the step, for the backward kernel",
                     f"    {self.store(f'p_saved{self.tag[k]}', f't * N * ({self.numel(d.shape)}) + n * ({self.numel(d.shape)})', d.shape, s)}"]
        loop += self._step_lines("t")
        for k, (name, v, _) in enumerate(c.outputs):
            shape = self._shape(v)
            base = f"(n * T + t) * ({self.numel(shape)})"
            loop.append(self.store(self.out_ptr[k], base, shape,
                                   self._root(v)))
        # all at once: an update may read another state's previous value
        updates = [(k, self.updates[d.name]) for k, d in enumerate(c.states) if d.name in self.updates]
        if updates:
            loop.append(f"{', '.join(self._state_value(k) for k, _ in updates)} = "
                        f"{', '.join(self._next_state(k, v) for k, v in updates)}")
        post = [self.store(f'p_final{self.tag[k]}', f'n * ({self.numel(d.shape)})', d.shape,
                           self._state_value(k)) for k, d in enumerate(c.states)]
        args = ([f"p_{self.value[i]}, {self.value[i]}_st, {self.value[i]}_sn" for i in self.seq]
                + [f"p_{self.value[i]}" for i in self.const]
                + [f"p_init{tag}" for tag in self.tag] + self.out_ptr
                + [f"p_final{tag}" for tag in self.tag] + [f"p_saved{tag}" for tag in self.tag])
        doc = (f"Every step of {doc_text(self.cell.name)}, one program per row (batch x head), the params "
               "and the state on chip; saves the state before each step when SAVE.")
        return self._kernel(f"{self.name}_forward", doc, args, ["SAVE"], pre, loop, post,
                            "for t in range(T):")

    def _kernel(self, name, doc, args, flags, pre, loop, post, loop_head, header_lines=None):
        """A function printing the kernel's lines: called once every kernel of the module has
        been printed, so that each declares every constexpr of the module's `meta` (Triton
        rejects a launch that passes a constexpr its kernel does not declare)."""
        return lambda: self._render(name, doc, args, flags, pre, loop, post, loop_head, header_lines)

    def _render(self, name, doc, args, flags, pre, loop, post, loop_head, header_lines):
        header = [f'"""{doc}"""'] + (header_lines or
                                     ["n = tl.program_id(0)  # the row (batch x head) this program runs"])
        if self.split is not None and header_lines is None:
            header.append("vb = tl.program_id(1)  # the block of columns (the split axis) it owns")
        for e, k in self.extents.items():
            start = "vb * P{k} + ".format(k=k) if self._is_split(e) and header_lines is None else ""
            header += [f"ix{k} = {start}tl.arange(0, P{k})", f"mx{k} = ix{k} < E{k}"]
        for shape, j in self.shapes.items():
            ks = [self.extent(e) for e in shape]
            r = len(ks)
            strides = [" * ".join(f"E{q}" for q in ks[a + 1:]) for a in range(r)]
            terms = [self.axis(ks[a], a, r) + (f" * ({strides[a]})" if strides[a] else "")
                     for a in range(r)]
            header.append(f"o{j} = {' + '.join(terms)}")
            header.append(f"m{j} = {' & '.join(self.axis_mask(ks[a], a, r) for a in range(r))}")
        for value, k in self.constants.items():
            header.append(f"k{k} = tl.full((), K{k}, ACC)")
        constexprs = (flags + ["ACC"] + [f"E{k}" for k in self.extents.values()]
                      + [f"P{k}" for k in self.extents.values()]
                      + [f"K{k}" for k in self.constants.values()])
        sig = [f"    {a}," for a in args] + (["    T, N,"] if loop_head else [])
        sig += [f"    {', '.join(f'{x}: tl.constexpr' for x in constexprs[i:i + 4])},"
                for i in range(0, len(constexprs), 4)]
        if loop_head:
            body = header + list(pre) + [loop_head] + ["    " + ln for ln in loop] + list(post)
        else:  # no loop: `loop` are the last lines
            body = header + list(pre) + list(loop) + list(post)
        pads = ", ".join(f'"P{k}"' for k in self.extents.values())
        # a new length, batch or layout of the per-step arguments never recompiles
        ints = [x.strip() for a in args for x in a.split(",") if not x.strip().startswith("p_")]
        ints += ["T", "N"] if loop_head else []
        jit = f"@triton.jit(do_not_specialize=[{', '.join(repr(x) for x in ints)}])" if ints else "@triton.jit"
        return [f"@_rtt.tuned({pads})  # warps per program (one config unless RCC_AUTOTUNE=1)", jit,
                f"def {name}(", *sig, "):", *["    " + ln for ln in body]]

    # ---- the split axis ----------------------------------------------------------------------
    def _is_split(self, e) -> bool:
        return self.split is not None and sympy.expand(sympy.sympify(e) - self.split) == 0

    def whole(self, shape) -> bool:
        """Whether a value of `shape` is computed whole by every program of a row (the loop is
        split and it has no split axis): its adjoint is then each program's part of a sum."""
        return self.split is not None and not any(self._is_split(e) for e in shape)

    def _once(self, text, shape) -> str:
        """A gradient that enters from outside (an output's, a final state's): added by the first
        program of a row only, when each holds a part of the value's adjoint."""
        return f"tl.where(vb == 0, {text}, 0.0)" if self.whole(shape) else text

    def _part(self, base, shape, per_program) -> str:
        """The base offset of a stored adjoint; a part goes to program vb's own copy."""
        return f"vb * ({per_program}) + {base}" if self.whole(shape) else base

    def split_spec(self):
        """Which extent is split, and which per-step arguments, params and states are whole:
        their adjoints come back as one part per program, for the runtime to sum."""
        if self.split is None:
            return None
        return {"extent": self.extent(self.split),
                "seq": [self.whole(self._shape(i)) for i in self.seq],
                "const": [self.whole(self._shape(i)) for i in self.const],
                "states": [self.whole(d.shape) for d in self.cell.states]}

    # ---- backward --------------------------------------------------------------------------
    def backward_source(self) -> list:
        c = self.cell
        pre = self._leaves()
        step = set(self.step)
        self.dconst = {i: f"dw{k}" for k, i in enumerate(self.const) if i in self.diff}
        for i, name in self.dconst.items():
            pre.append(f"{name} = tl.zeros({self.tile(self._shape(i))}, ACC)")
        for k, d in enumerate(c.states):
            g = self._once(self.load(f'p_gfinal{k}', f'n * ({self.numel(d.shape)})', d.shape), d.shape)
            pre.append(f"l{k} = {g}  # d loss / d {t_name(d.name)}")
        loop = ["t = T - 1 - tt"]
        for k, d in enumerate(c.states):
            s = self._state_value(k)
            loop.append(f"{s} = {self.load(f'p_saved{self.tag[k]}', f't * N * ({self.numel(d.shape)}) + n * ({self.numel(d.shape)})', d.shape)}")
        loop += self._step_lines("t")
        self.adj, lines = {}, []
        loop.append("# adjoints, from the outputs and next states back to the step's arguments")
        for k, (name, v, _) in enumerate(c.outputs):
            if v in self.diff:
                g = self.load(f"p_gout{k}", f"n * gout{k}_sn + t * gout{k}_st", self._shape(v))
                lines += self._add_adjoint(v, self._once(g, self._shape(v)), True)
        for k, d in enumerate(c.states):
            v = self.updates.get(d.name)
            if v is not None and v in self.diff:
                lines += self._add_adjoint(v, f"l{k}", tuple(self._shape(v)) == tuple(d.shape))
        for i in sorted(step, reverse=True):
            if i in self.adj:
                lines += self._propagate(c.node(i))
        loop += lines
        for k, i in enumerate(self.seq):
            if i in self.adj:
                shape = self._shape(i)
                numel = self.numel(shape)
                base = self._part(f"(t * N + n) * ({numel})", shape, f"T * N * ({numel})")
                loop.append(self.store(f"p_d{self.value[i]}", base, shape, self.adj[i]))
        for k, d in enumerate(c.states):
            leaf = self.state_node.get(d.name)
            if d.name not in self.updates:  # the state passes the step unchanged
                if leaf in self.adj:
                    loop.append(f"l{k} += {self.adj[leaf]}")
            elif leaf in self.adj:
                loop.append(f"l{k} = {self.adj[leaf]}")
            else:
                loop.append(f"l{k} = tl.zeros({self.tile(d.shape)}, ACC)")
        post = [self.store(f"p_dinit{k}", self._part(f"n * ({self.numel(d.shape)})", d.shape,
                                                     f"N * ({self.numel(d.shape)})"), d.shape, f"l{k}")
                for k, d in enumerate(c.states)]
        for i, name in self.dconst.items():
            shape = self._shape(i)
            base = self._part(f"n * ({self.numel(shape)})", shape, f"N * ({self.numel(shape)})")
            post.append(self.store(f"p_{name}", base, shape, name))
        args = ([f"p_{self.value[i]}, {self.value[i]}_st, {self.value[i]}_sn" for i in self.seq]
                + [f"p_{self.value[i]}" for i in self.const]
                + [f"p_saved{tag}" for tag in self.tag]
                + [f"p_gout{k}, gout{k}_st, gout{k}_sn" for k in range(len(c.outputs))]
                + [f"p_gfinal{k}" for k in range(len(c.states))]
                + [f"p_d{self.value[i]}" for i in self.seq]
                + [f"p_dw{k}" for k in range(len(self.const))]
                + [f"p_dinit{k}" for k in range(len(c.states))])
        doc = (f"The steps of {doc_text(self.cell.name)} in reverse, each recomputed from its saved state, "
               "then its adjoints; the params' adjoints summed per row over the steps.")
        return self._kernel(f"{self.name}_backward", doc, args, [], pre, loop, post,
                            "for tt in range(T):")

    def _add_adjoint(self, i, text, full) -> list:
        """Add `text` (a tile of i's shape when `full`, else one that broadcasts to it) into
        value i's adjoint: a per-step name, or the params' accumulator."""
        tile = self.tile(self._shape(i))
        if not full:
            text = f"tl.broadcast_to({text}, {tile})"
        if i in self.dconst:
            return [f"{self.dconst[i]} += {text}"]
        if i in self.adj:
            return [f"{self.adj[i]} += {text}"]
        self.adj[i] = f"g{i}"
        return [f"g{i} = {text}"]

    def _propagate(self, n: ir.Node) -> list:
        """Lines adding node n's adjoint into its differentiable arguments' adjoints."""
        g, op, c = self.adj[n.id], n.op, self.cell
        args = [a for a in n.args if a in self.diff]
        if not args:
            return []
        lines = []

        def add(a, text, full=True):
            if a in self.diff:
                lines.extend(self._add_adjoint(a, text, full))

        shape, rank = n.type.shape, n.type.rank
        if op == "outer":  # g [M, N]
            a, b = (self.value[i] for i in n.args)
            km, kn = (self.extent(e) for e in shape)
            add(n.args[0], f"tl.sum(tl.where({self.axis_mask(kn, 1, 2)}, {g} * {b}[None, :], 0.0), 1)")
            add(n.args[1], f"tl.sum(tl.where({self.axis_mask(km, 0, 2)}, {g} * {a}[:, None], 0.0), 0)")
            return lines
        if op in POINTWISE:
            syms, names = self._pointwise_symbols(n)
            y = sympy.Symbol("y_")
            names["y_"] = self.value[n.id]
            parts = derivatives(op, syms, y)
            for k, a in enumerate(n.args):
                if a not in self.diff or parts[k] == 0:
                    continue
                d = parts[k]
                if d == 1:
                    text = g
                elif d == -1:
                    text = f"-{g}"
                else:
                    text = f"{g} * ({TileExprPrinter(names, self.constant).doprint(d)})"
                add(a, self._unbroadcast(text, shape, self._shape(a)))
            return lines
        x = self.value[n.args[0]] if n.args else None
        if op == "matmul":
            A, B = (c.node(i) for i in n.args)
            a, b = self.value[A.id], self.value[B.id]
            if A.type.rank == 2 and B.type.rank == 1:  # g [M]
                km = self.extent(A.type.shape[0])
                add(A.id, f"{g}[:, None] * {b}[None, :]")
                add(B.id, f"tl.sum(tl.where({self.axis_mask(km, 0, 2)}, {a} * {g}[:, None], 0.0), 0)")
            elif A.type.rank == 1 and B.type.rank == 2:  # g [N]
                kn = self.extent(B.type.shape[1])
                add(A.id, f"tl.sum(tl.where({self.axis_mask(kn, 1, 2)}, {b} * {g}[None, :], 0.0), 1)")
                add(B.id, f"{a}[:, None] * {g}[None, :]")
            elif A.type.rank == 1:  # g scalar
                add(A.id, f"{g} * {b}")
                add(B.id, f"{g} * {a}")
            else:  # g [M, N]
                km, kn = self.extent(A.type.shape[0]), self.extent(B.type.shape[1])
                add(A.id, f"tl.sum(tl.where({self.axis_mask(kn, 2, 3)}, {g}[:, None, :] * "
                          f"{b}[None, :, :], 0.0), 2)")
                add(B.id, f"tl.sum(tl.where({self.axis_mask(km, 0, 3)}, {a}[:, :, None] * "
                          f"{g}[:, None, :], 0.0), 0)")
            return lines
        src = self._shape(n.args[0]) if n.args else ()
        axis = n.attr("axis") if op in ("sum", "mean", "amax", "logsumexp", "softmax") else None
        if op in ("sum", "mean", "amax", "logsumexp"):
            if not src:
                add(n.args[0], g)
                return lines
            ge = g if axis is None else f"tl.expand_dims({g}, {axis})"
            ye = self.value[n.id] if axis is None else f"tl.expand_dims({self.value[n.id]}, {axis})"
            if op == "sum":
                add(n.args[0], ge, full=False)
            elif op == "mean":
                count = self.numel(src) if axis is None else f"E{self.extent(src[axis])}"
                add(n.args[0], f"{ge} / ({count})", full=False)
            elif op == "logsumexp":
                add(n.args[0], f"{ge} * tl.exp({x} - {ye})")
            else:  # amax: torch splits the gradient evenly between tied maxima
                eq = f"t{n.id}"
                lines.append(f"{eq} = ({x} == {ye}) & {self.mask(src)}")
                keep = "" if axis is None else f", {axis}, keep_dims=True"
                lines.append(f"n{n.id} = tl.sum(tl.where({eq}, 1.0, 0.0){keep})")
                add(n.args[0], f"tl.where({eq}, {ge} / n{n.id}, 0.0)")
            return lines
        if op == "softmax":
            ax = axis if axis is not None else len(src) - 1
            y = self.value[n.id]
            add(n.args[0], f"{y} * ({g} - tl.sum({self.masked(f'{g} * {y}', src)}, {ax}, keep_dims=True))")
            return lines
        if op == "transpose":
            add(n.args[0], g if rank < 2 else f"tl.trans({g})" if rank == 2 else
                f"tl.permute({g}, {tuple(range(rank - 1, -1, -1))})")
            return lines
        if op == "getitem":
            text = g
            for step in reversed(self._index_steps(n)):
                kind, ax, before = step[:3]
                r = len(before)
                if kind == "new":
                    text = f"tl.sum({text}, {ax})"
                elif kind == "int":
                    grid = self.axis(self.extent(before[ax]), ax, r)
                    text = f"tl.where({grid} == {self._int(step[3])}, tl.expand_dims({text}, {ax}), 0.0)"
                else:
                    lo, width = step[3], step[4]
                    grid = self.axis(self.extent(before[ax]), ax, r)
                    after = list(before)
                    after[ax] = width
                    inside = f"({grid} >= {self._int(lo)}) & ({grid} < {self._int(lo + width)})"
                    moved = self._gather(text, after, ax, before[ax], _shifted(grid, "-", lo, self))
                    text = f"tl.where({inside}, {moved}, 0.0)"
            add(n.args[0], text)
            return lines
        if op in ("concat", "stack"):
            ax = n.attr("axis")
            offset = sympy.Integer(0)
            for a in n.args:
                pshape = list(self._shape(a))
                if op == "stack":
                    grid = self.axis(self.extent(shape[ax]), ax, rank)
                    add(a, f"tl.sum(tl.where({grid} == {self._int(offset)}, {g}, 0.0), {ax})")
                    offset = offset + 1
                    continue
                grid = self.axis(self.extent(pshape[ax]), ax, rank)
                add(a, self._gather(g, shape, ax, pshape[ax], _shifted(grid, "+", offset, self)))
                offset = offset + pshape[ax]
            return lines
        raise NotImplementedError(f"triton kernel: the adjoint of {op}")  # no other op reads

    def _unbroadcast(self, text, result, arg):
        """An adjoint of `result`'s shape summed down to the shape `arg` broadcast from."""
        result, arg = tuple(result), tuple(arg)
        lead = len(result) - len(arg)
        axes = list(range(lead)) + [lead + k for k, e in enumerate(arg)
                                    if e == 1 and result[lead + k] != 1]
        if not axes:
            return text
        text = self.masked(text, result)
        if not arg:
            return f"tl.sum({text})"
        for k in reversed(range(lead, len(result))):
            if k in axes:
                text = f"tl.sum({text}, {k}, keep_dims=True)"
        for k in reversed(range(lead)):
            text = f"tl.sum({text}, {k})"
        return text

    # ---- a kernel over independent rows (Newton's step and Jacobian) ----------------------
    def rows_source(self, name, ids, states, reads, roots, shape) -> list:
        """A kernel computing `roots` (ids, or None for a zero) from the state leaves `states` and
        the values `reads` (per row when batched), one program per row; every root is stored
        broadcast to the states' `shape`, as [rows, *shape]."""
        c = self.cell
        self.value = {}
        pre, args = [], []
        for k, leaf in enumerate(states):
            self.value[leaf] = f"s{k}_{self._hint(leaf)}"
            args.append("p_" + self.value[leaf])
            pre.append(f"{self.value[leaf]} = {self.load(args[-1], f'r * ({self.numel(shape)})', shape)}")
        for k, i in enumerate(reads):
            n = c.node(i)
            self.value[i] = f"a{k}_{self._hint(i)}"
            args.append("p_" + self.value[i])
            base = f"r * ({self.numel(n.type.shape)})" if n.type.batched else ""
            pre.append(f"{self.value[i]} = {self.load(args[-1], base, n.type.shape)}")
        pre += self._constant_tiles(ids, [v for v in roots if v is not None])
        for i in sorted(ids):
            n = c.node(i)
            self.value[i] = f"v{i}_{self._hint(i)}" if n.name else f"v{i}"
            pre.append(f"{self.value[i]} = {self.expr(n)}")
        tile = self.tile(shape)
        outs = [f"p_out{k}" for k, v in enumerate(roots) if v is not None]
        stores = [self.store(f"p_out{k}", f"r * ({self.numel(shape)})", shape,
                             f"({self._root(v)}) + tl.zeros({tile}, ACC)")
                  for k, v in enumerate(roots) if v is not None]
        head = ["r = tl.program_id(0)  # the row (a step of a sequence) this program computes"]
        return self._kernel(name, "Independent rows: each row's next states and the step's Jacobian "
                            "entries, from its previous states.", args + outs, [], pre, stores, [], "",
                            header_lines=head)

    # ---- the whole source ------------------------------------------------------------------
    def source(self) -> str:
        """The kernels, then `{name}_meta(dims)`: their constexprs for the dims' values."""
        forward = self.forward_source()
        backward = self.backward_source()
        return "\n".join(forward() + ["", ""] + backward()) + "\n"

    def meta_source(self, name, why="reads across hidden units") -> list:
        names = {d.name: f"dims[{d.name!r}]" for d in self.cell.dims}
        lines = [f"def {name}(dims):",
                 '    """The kernels\' constexprs: extents E, their pads P, numbers K."""',
                 "    E = {"]
        lines += [f"        {k}: {dim_expr(e, names)},  # {e}" for e, k in self.extents.items()]
        lines.append("    }")
        lines.append("    meta = {f'E{k}': e for k, e in E.items()}")
        lines.append("    meta.update({f'P{k}': triton.next_power_of_2(e) for k, e in E.items()})  # tiles")
        for value, k in self.constants.items():
            lines.append(f"    meta['K{k}'] = float({dim_expr(value, names) if value.free_symbols else repr(float(value))})")
        def pad(e):  # a split axis is a block of it per program
            k = self.extent(e)
            return f"_rtt.value_block(meta['E{k}'])" if self._is_split(e) else f"meta['P{k}']"
        tiles = [" * ".join(pad(e) for e in shape) for shape in self.shapes if len(shape) > 1]
        if tiles:  # one program holds the whole step (or its columns): its largest tile bounds it
            lines.append(f"    largest = max([{', '.join(tiles)}])")
            lines.append(f"    if largest > {MAX_TILE}:")
            said = doc_text(f"of {self.cell.name} (its step {why})").replace("{", "{{").replace("}", "}}")
            lines.append("        raise ValueError(f'backend triton, plan sequential: one program holds the whole "
                         f"step {said}; at these dims its largest tile has {{largest}} elements, past the "
                         f"{MAX_TILE} a program compiles in reasonable time and registers. Use backend torch "
                         "or cpp, or smaller dims')")
        lines.append("    return meta")
        return lines
