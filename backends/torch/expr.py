"""Printing one IR node as a torch expression: operator precedence, broadcasting of
declared axes after the batch axis, the torch call for each op."""
from __future__ import annotations

import sympy

from rcc import ir

_UNARY = {
    "sigmoid": "torch.sigmoid", "tanh": "torch.tanh", "relu": "torch.relu", "silu": "F.silu",
    "gelu": "F.gelu", "exp": "torch.exp", "log": "torch.log", "log1p": "torch.log1p",
    "expm1": "torch.expm1", "softplus": "F.softplus", "logsigmoid": "F.logsigmoid",
    "sqrt": "torch.sqrt", "rsqrt": "torch.rsqrt", "abs": "torch.abs", "sign": "torch.sign",
    "sin": "torch.sin", "cos": "torch.cos",
}
_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}
_COMPARE = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
_SWAPPED = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}
_REDUCE = {"sum": "torch.sum", "mean": "torch.mean", "amax": "torch.amax",
           "logsumexp": "torch.logsumexp"}
_LETTERS = "ijklm"
# Python precedence of the expressions this printer writes, loosest first. Binary operators are
# always printed with a space on each side, which is how _precedence finds them.
_PREC_COMPARE, _PREC_ADD, _PREC_MUL, _PREC_UNARY, _PREC_POW, _PREC_ATOM = range(1, 7)
_BINARY_PREC = {"<": _PREC_COMPARE, "<=": _PREC_COMPARE, ">": _PREC_COMPARE, ">=": _PREC_COMPARE,
                "==": _PREC_COMPARE, "!=": _PREC_COMPARE, "+": _PREC_ADD, "-": _PREC_ADD,
                "*": _PREC_MUL, "/": _PREC_MUL, "@": _PREC_MUL, "**": _PREC_POW}


class ExprPrinter:
    """Mixed into TorchPrinter: needs self.cell, self.var, self.inline, self.batch, _dim."""

    def _ref(self, i) -> str:
        return self.var[i] if i in self.var else self.inline[i]

    def _operand(self, i, rank, least=_PREC_ATOM) -> str:
        """Argument `i` of an elementwise op whose result has `rank` declared axes: batched
        operands of lower rank get new axes after the batch axis (NumPy aligns declared axes).
        `least`: the precedence the operand's text needs where it is used."""
        n = self.cell.node(i)
        text = self._ref(i)
        if n.type.batched and n.type.rank < rank:
            return f"{_atom(text)}[:, {', '.join(['None'] * (rank - n.type.rank))}]"
        return _wrap(text, least)

    def _infix(self, op, a, b, rank) -> str:
        prec = _BINARY_PREC[op]
        # left-associative operators need a tighter right operand; ** is right-associative
        left, right = (prec + 1, prec) if op == "**" else (prec, prec + 1)
        if prec == _PREC_COMPARE:
            left = prec + 1  # Python would chain a < b < c
        return f"{self._operand(a, rank, left)} {op} {self._operand(b, rank, right)}"

    def _is_const(self, i):
        return self.cell.node(i).op == "const"

    def _expr(self, n: ir.Node) -> str:
        op, r = n.op, n.type.rank
        a = n.args
        if op == "neg":
            return f"-{_wrap(self._ref(a[0]), _PREC_POW)}"
        if op in _UNARY:
            return f"{_UNARY[op]}({self._tensor_operand(a[0], a, r)})"
        if op in _INFIX:
            return self._infix(_INFIX[op], a[0], a[1], r)
        if op in ("maximum", "minimum") and self._is_const(a[0]) != self._is_const(a[1]):
            t, c = (a[1], a[0]) if self._is_const(a[0]) else (a[0], a[1])
            bound = "min" if op == "maximum" else "max"
            return f"torch.clamp({self._ref(t)}, {bound}={self._ref(c)})"
        if op in ("maximum", "minimum", "logaddexp"):
            x, y = (self._tensor_operand(i, a, r) for i in a)
            return f"torch.{op}({x}, {y})"
        if op in _COMPARE:
            return f"({self._compare(n)}).to(_dtype)"
        if op == "where":
            cond = self.cell.node(a[0])
            if cond.op in _COMPARE and a[0] in self.inline:
                c = self._compare(cond, r)  # the comparison is used only here: keep it boolean
            else:
                c = f"{self._tensor_operand(a[0], a, r)} != 0"
            # torch.where takes one Python float beside a tensor, in the tensor's dtype
            x, y = a[1], a[2]
            one_float = self._is_const(x) != self._is_const(y)
            x, y = (self._ref(i) if one_float and self._is_const(i) else
                    self._tensor_operand(i, (x, y), r) for i in (x, y))
            return f"torch.where({c}, {x}, {y})"
        if op == "matmul":
            return self._matmul(n)
        if op == "outer":
            return f"{_atom(self._ref(a[0]))}[..., :, None] * {_atom(self._ref(a[1]))}[..., None, :]"
        if op in _REDUCE:
            return f"{_REDUCE[op]}({self._ref(a[0])}, dim={self._axes(a[0], n.attr('axis'))})"
        if op == "softmax":
            return f"torch.softmax({self._ref(a[0])}, dim={self._axes(a[0], n.attr('axis'))})"
        if op in ("concat", "stack"):
            # every part needs the batch axis when one has it
            parts = ", ".join(self._batched_ref(i) if n.type.batched else
                              self._tensor_operand(i, (), 0) for i in a)
            axis = n.attr("axis") + (1 if n.type.batched else 0)
            return f"torch.{'cat' if op == 'concat' else 'stack'}([{parts}], dim={axis})"
        if op == "getitem":
            return self._getitem(n)
        if op == "transpose":
            x = _atom(self._ref(a[0]))
            if r == 2:
                return f"{x}.mT"  # the last two axes, with or without the batch axis
            perm = tuple(range(r - 1, -1, -1))
            if n.type.batched:
                perm = (0,) + tuple(p + 1 for p in perm)
            return f"{x}.permute{perm}"
        if op == "eye":
            return f"torch.eye({self._dim(n.attr('n'))}, dtype=_dtype, device=_device)"
        if op in ("zeros", "ones"):
            return f"torch.{op}({self._shape(n.type.shape)}, dtype=_dtype, device=_device)"
        raise NotImplementedError(f"torch printer: op {op}")  # unreachable for verified IR

    def _tensor_operand(self, i, args, rank):
        """An argument of a torch function that takes tensors only (torch.where, logaddexp,
        maximum, sigmoid...): constants, which print as Python floats, become 0-d tensors."""
        if not self._is_const(i):
            return self._operand(i, rank, least=0)
        like = next((self._ref(j) for j in args if self._ref(j).isidentifier()), None)
        if like is None:
            return f"torch.tensor({self._ref(i)}, dtype=_dtype, device=_device)"
        return f"{like}.new_tensor({self._ref(i)})"

    def _compare(self, n, rank=None) -> str:
        """A comparison as a boolean tensor, its batched operands aligned to `rank` axes."""
        x, y, cmp = n.args[0], n.args[1], n.op
        if self._is_const(x):
            x, y, cmp = y, x, _SWAPPED[cmp]  # keep the tensor on the left
        if self._is_const(x):  # two constants: left for a folding pass, still valid code
            return f"{self._tensor_operand(x, n.args, 0)} {_COMPARE[cmp]} {self._ref(y)}"
        return self._infix(_COMPARE[cmp], x, y, n.type.rank if rank is None else rank)

    def _axes(self, arg, axis):
        n = self.cell.node(arg)
        off = 1 if n.type.batched else 0
        if axis is None and n.type.rank > 1:  # every declared axis, never the batch axis
            return repr(tuple(range(off, off + n.type.rank)))
        return str((axis or 0) + off)

    def _getitem(self, n):
        parts = [":"] if n.type.batched else []
        shape, axis = self.cell.node(n.args[0]).type.shape, 0
        for entry in n.attr("index"):
            if entry[0] == "new":
                parts.append("None")
                continue
            if entry[0] == "int":
                parts.append(self._dim(entry[1]))
            else:  # print a:b as NumPy users write it: no 0 start, no stop at the axis end
                lo, hi = entry[1], entry[2]
                start = "" if sympy.sympify(lo) == 0 else self._dim(lo)
                stop = "" if sympy.expand(hi - shape[axis]) == 0 else self._dim(hi)
                parts.append(f"{start}:{stop}")
            axis += 1
        return f"{_atom(self._ref(n.args[0]))}[{', '.join(parts)}]"

    def _matmul(self, n):
        a, b = (self.cell.node(i) for i in n.args)
        x, y = self._ref(a.id), self._ref(b.id)
        ta, tb = a.type, b.type
        if not tb.batched or (tb.rank == 2 and (ta.rank == 2 or not ta.batched)):
            # torch.matmul treats the batch axis as NumPy's matmul treats a stack of matrices
            return self._infix("@", a.id, b.id, 0)
        if not ta.batched:  # an unbatched matrix or vector times a batch of vectors
            return f"F.linear({y}, {x})" if ta.rank == 2 else self._infix("@", b.id, a.id, 0)
        # both batched, one of them a batch of vectors: contract per batch element
        la = _LETTERS[:ta.rank]
        lb = la[-1] + _LETTERS[ta.rank: ta.rank + tb.rank - 1] if tb.rank == 2 else la[-1]
        out = la[:-1] + (lb[1:] if tb.rank == 2 else "")
        pa = ("n" if ta.batched else "") + la
        pb = ("n" if tb.batched else "") + lb
        po = ("n" if n.type.batched else "") + out
        return f"torch.einsum('{pa},{pb}->{po}', {x}, {y})"


def _precedence(text: str) -> int:
    """The precedence of the loosest operator of `text` outside brackets (atom if none)."""
    prec, depth = _PREC_ATOM, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == " " and depth == 0:
            token = text[i + 1:text.find(" ", i + 1)]
            prec = min(prec, _BINARY_PREC.get(token, _PREC_ATOM))
    if text.startswith("-"):
        prec = min(prec, _PREC_UNARY)
    return prec


def _wrap(text: str, least: int) -> str:
    """`text` as an operand that must bind at least as tightly as precedence `least`."""
    return f"({text})" if _precedence(text) < least else text


def _atom(text: str) -> str:
    """Parenthesise an expression unless it is a name, call, subscript or literal."""
    return _wrap(text, _PREC_ATOM)
