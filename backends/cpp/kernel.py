"""The C++ kernel of a cell: the loop over time, fused, for the values that read a state.

What reads no state (the input projections, the params' expressions) is computed by torch before
the kernel, once for the whole sequence; the kernel receives those values per step ("seq"
arguments, [T, N, ...] with any strides) and the unbatched ones once ("const" arguments). One
OpenMP task runs a block of rows (batch x heads) through all T steps with its state in a small
workspace, so the state stays in cache. Every array is row-major with the block's rows outermost.

Values are printed as *accesses*: the C++ expression of a node's element at an index. A value
used once, by a pointwise op of its shape, is folded into its user's expression; getitem and
transpose are index maps onto their argument; the rest (matmuls, reductions, softmax, concat,
stack, values used twice) are computed into an array. The backward kernel runs the steps in
reverse, recomputes each step from the state saved before it, and adds each node's adjoint into
its arguments' adjoints with the partial derivatives sympy gives (scalar.py).
"""
from __future__ import annotations

import re

import sympy
from sympy.printing.cxx import CXX17CodePrinter

from rcc import ir
from rcc.codegen import regions

from ..loop import VIEWS, LoopPartition
from ..pointwise import POINTWISE, derivatives, pointwise
from .scalar import cxx

REDUCING = ("matmul", "sum", "mean", "amax", "logsumexp", "softmax", "concat", "stack")
ROWS_PER_BLOCK = 16  # the most rows one task runs together (its workspace holds this many)


def c_name(hint: str) -> str:
    """A user's name reduced to C identifier characters (it only decorates generated names)."""
    return re.sub(r"[^A-Za-z0-9_]", "", hint or "")[:24]


class _IntPrinter(CXX17CodePrinter):
    """Dim expressions as C++ integer expressions over the dim constants."""

    def __init__(self, names):
        super().__init__({"strict": False})
        self.names = names

    def _print_Symbol(self, s):
        return self.names[s.name]

    def _print_Pow(self, e):
        base, exp = e.args
        if exp.is_Integer and exp > 0:
            return "(" + "*".join([self.parenthesize(base, 60)] * int(exp)) + ")"
        return super()._print_Pow(e)

    def _print_floor(self, e):  # of a non-negative ratio of dims: C's integer division
        num, den = sympy.fraction(sympy.together(e.args[0]))
        return f"(({self._print(num)}) / ({self._print(den)}))"

    def _print_Rational(self, r):
        return f"({r.p} / {r.q})"


class KernelPrinter:
    def __init__(self, cell: ir.CellIR, hoist: bool = True):
        self.cell = cell
        self.region = regions(cell)
        self.dims = {d.name: f"D_{c_name(d.name)}" if c_name(d.name) == d.name else f"D{k}"
                     for k, d in enumerate(cell.dims)}
        part = LoopPartition(cell, hoist)
        self.users, uses, self.step = part.users, part.uses, part.step
        self.seq, self.const = part.seq, part.const
        self.state_index = {d.name: k for k, d in enumerate(cell.states)}
        self.state_node = {n.attr("name"): n.id for n in cell.nodes if n.op == "state"}
        self.updates = dict(cell.updates)
        # which step values get an array: all but folded pointwise values and index maps
        self.stored = set()
        for i in self.step:
            n = cell.node(i)
            if n.op in VIEWS:
                continue
            user = self.users[i][0] if uses[i] == 1 and self.users[i] else None
            folds = (n.op in POINTWISE and user is not None
                     and cell.node(user).op in POINTWISE - {"outer"}
                     and cell.node(user).type.shape == n.type.shape)
            if not folds:
                self.stored.add(i)
        # a state's next value is copied into the state after the step: give it its own array
        # when it is a view or an argument, so that the copies cannot overwrite what another
        # state's next value reads
        self.copied = {v for v in self.updates.values() if v not in self.stored}
        self.adjoint = [i for i in self.step if cell.node(i).op not in VIEWS]

    # ---- names and indices ----------------------------------------------------------------
    def size(self, expr) -> str:
        expr = sympy.sympify(expr)
        if not expr.is_integer and not expr.is_number:
            expr = sympy.floor(expr)  # d/2: exact where used (a constraint checked it)
        return _IntPrinter(self.dims).doprint(expr)

    def numel(self, shape) -> str:
        return self.size(sympy.prod([sympy.sympify(s) for s in shape])) if shape else "1"

    def flat(self, shape, idx) -> str:
        """The row-major offset of index `idx` (C++ expressions) in an array of `shape`."""
        terms = []
        for k, i in enumerate(idx):
            if i == "0":
                continue
            stride = sympy.prod([sympy.sympify(s) for s in shape[k + 1:]])
            terms.append(i if stride == 1 else f"{_paren(i)}*{_paren(self.size(stride))}")
        return " + ".join(terms) or "0"

    def F(self, i) -> str:
        """The constant holding the element count of value i."""
        return f"F{i}"

    def row(self, i, idx) -> str:
        """Offset of element idx of lane b in a block array of value i."""
        return _offset(f"b*{self.F(i)}", self.flat(self.cell.node(i).type.shape, idx))

    # ---- reading values ---------------------------------------------------------------------
    def access(self, i, idx) -> str:
        """The C++ expression of element `idx` of value `i` in lane `b`."""
        n = self.cell.node(i)
        if n.op == "const":
            return cxx(sympy.sympify(n.attr("value")), self.dims)
        if i in self.seq:
            k = self.seq.index(i)
            return f"x{k}[{_offset(f'b*xn{k}', self.flat(n.type.shape, idx))}]"
        if i in self.const:
            return f"c{self.const.index(i)}[{self.flat(n.type.shape, idx)}]"
        if n.op == "state":
            return f"s{self.state_index[n.attr('name')]}[{self.row(i, idx)}]"
        if i in self.stored:
            return f"w{i}[{self.row(i, idx)}]"
        return self.compute(i, idx)

    def compute(self, i, idx) -> str:
        """Element idx of value i computed from its arguments (pointwise ops and index maps)."""
        n = self.cell.node(i)
        if n.op in VIEWS:
            return self.access(n.args[0], self.parent_index(n, idx))
        if n.op in POINTWISE:
            args, names = self._symbols(n, idx)
            return "(" + cxx(pointwise(n.op, args), names) + ")"
        raise AssertionError(f"{n.op} is stored, not computed")  # REDUCING values are stored

    def _symbols(self, n, idx):
        """Symbols for the arguments of pointwise node n (constants as their values) and the
        accesses they print as."""
        args, names = [], dict(self.dims)
        for p, a in enumerate(n.args):
            node = self.cell.node(a)
            if node.op == "const":
                args.append(sympy.sympify(node.attr("value")))
            else:
                args.append(sympy.Symbol(f"#a{p}"))
                names[f"#a{p}"] = self.access(a, self.arg_index(n, p, idx))
        return args, names

    def arg_index(self, n, p, idx):
        """The index of argument p that element idx of pointwise node n reads (broadcasting)."""
        if n.op == "outer":
            return (idx[p],)
        shape = self.cell.node(n.args[p]).type.shape
        out = n.type.shape
        lead = len(out) - len(shape)
        return tuple("0" if sympy.sympify(s) == 1 and sympy.sympify(out[lead + k]) != 1
                     else idx[lead + k] for k, s in enumerate(shape))

    def parent_index(self, n, idx):
        if n.op == "transpose":
            return tuple(reversed(idx))
        out, r = [], 0
        for entry in n.attr("index"):
            if entry[0] == "new":
                r += 1
            elif entry[0] == "int":
                out.append(self.size(entry[1]))
            else:
                lo = sympy.sympify(entry[1])
                out.append(idx[r] if lo == 0 else f"{_paren(idx[r])} + {_paren(self.size(lo))}")
                r += 1
        return tuple(out) + tuple(idx[r:])

    # ---- loops --------------------------------------------------------------------------------
    def loop(self, shape, body, indent="      "):
        """Lines looping over the lanes of the block and every index of `shape`; body(idx,
        indent) gives the innermost lines."""
        lines, idx, base = [], [], indent
        lines.append(f"{indent}for (long b = 0; b < nb; ++b) {{")
        indent += "  "
        for k, s in enumerate(shape):
            v = f"i{k}"
            lines.append(f"{indent}for (long {v} = 0; {v} < {self.size(s)}; ++{v}) {{")
            indent += "  "
            idx.append(v)
        lines += body(tuple(idx), indent)
        while len(indent) > len(base):
            indent = indent[:-2]
            lines.append(f"{indent}}}")
        return lines

    # ---- forward code of one stored value ---------------------------------------------------------
    def forward(self, i) -> list:
        n = self.cell.node(i)
        shape = n.type.shape
        head = f"      // {self.describe(n)}"
        if n.op == "matmul":
            return [head] + self._matmul(n)
        if n.op in ("sum", "mean", "amax", "logsumexp"):
            return [head] + self._reduce(n)
        if n.op == "softmax":
            return [head] + self._softmax(n)
        if n.op in ("concat", "stack"):
            lines = [head]
            for part, place in self._parts(n):
                pshape = self.cell.node(part).type.shape
                lines += self.loop(pshape, lambda idx, ind, part=part, place=place: [
                    f"{ind}w{i}[{self.row(i, place(idx))}] = {self.access(part, idx)};"])
            return lines
        return [head] + self.loop(shape, lambda idx, ind: [
            f"{ind}w{i}[{self.row(i, idx)}] = {self.compute(i, idx)};"])

    def _parts(self, n):
        """(part, index map from the part's index to n's) for each part of a concat or stack."""
        axis = n.attr("axis")
        offset = sympy.Integer(0)
        for p, part in enumerate(n.args):
            if n.op == "stack":
                yield part, (lambda idx, p=p: idx[:axis] + (str(p),) + idx[axis:])
            else:
                off = self.size(offset)
                yield part, (lambda idx, off=off: idx[:axis] + (
                    idx[axis] if off == "0" else f"{idx[axis]} + {_paren(off)}",) + idx[axis + 1:])
                offset += sympy.sympify(self.cell.node(part).type.shape[axis])

    def _matmul_axes(self, n):
        """The operands, their free index variables (i0 of a matrix A, i1 of a matrix B) with
        extents, and the contracted extent."""
        a, b = (self.cell.node(x) for x in n.args)
        ia = (("i0", a.type.shape[0]),) if a.type.rank == 2 else ()
        jb = (("i1", b.type.shape[1]),) if b.type.rank == 2 else ()
        return a, b, ia, jb, ("k", a.type.shape[-1])

    def nest(self, loops, body, indent="      "):
        """Nested for-loops over (variable, extent) pairs, "b" being the lanes of the block;
        body(indent) gives the innermost lines."""
        lines = []
        for var, extent in loops:
            bound = "nb" if var == "b" else self.size(extent)
            lines.append(f"{indent}for (long {var} = 0; {var} < {bound}; ++{var}) {{")
            indent += "  "
        lines += body(indent)
        for _ in loops:
            indent = indent[:-2]
            lines.append(f"{indent}}}")
        return lines

    @staticmethod
    def _lanes_inside(loops, shared):
        """Loop order: when an operand is shared by all lanes (a param matrix), the lanes go
        inside the loops over its rows, so each row is read once per step, from L1."""
        lane = [("b", None)]
        return loops + lane if shared else lane + loops

    def gemv(self, n):
        """For W @ h with W a param matrix and h a vector in an array (the recurrent matmul):
        (the const index of W, (h's pointer, lane stride)); else None."""
        a, b = (self.cell.node(x) for x in n.args)
        if a.id in self.const and a.type.rank == 2 and b.type.rank == 1:
            h = self.plain(b.id, self.access_arrays)
            if h is not None:
                return self.const.index(a.id), h
        return None

    def plain(self, i, arrays):
        """(pointer, lane stride) of value i's array in `arrays` (values or adjoints), or None
        when it has none (a folded value, an index map)."""
        n = self.cell.node(i)
        if i in self.seq:
            k = self.seq.index(i)
            return arrays["seq"](k, i)
        if n.op == "state":
            k = self.state_index[n.attr("name")]
            return arrays["state"](k), self.F(i)
        if i in arrays["own"]:
            return arrays["node"](i), self.F(i)
        return None

    @property
    def access_arrays(self):
        return {"seq": lambda k, i: (f"x{k}", f"xn{k}"), "state": lambda k: f"s{k}.p",
                "own": self.stored, "node": lambda i: f"w{i}.p"}

    @property
    def adjoint_arrays(self):
        return {"seq": lambda k, i: (f"gx{k}.p", self.F(i)), "state": lambda k: f"gs{k}.p",
                "own": set(self.adjoint), "node": lambda i: f"g{i}.p"}

    def _matmul(self, n):
        """y = A @ B. A matrix-vector product is a dot product per output (contiguous rows of A);
        with a matrix B, rows of B are added into rows of y (contiguous along B's columns)."""
        fast = self.gemv(n)
        if fast is None:
            return self._matmul_loops(n)
        k, (x, xs) = fast
        a = self.cell.node(n.args[0])
        sizes = f"{self.size(a.type.shape[0])}, {self.size(a.type.shape[1])}"
        rest = f"{x}, {xs}, w{n.id}.p, {self.F(n.id)}, nb);"
        return _either(  # register-tiled on W packed once per call, when the call is long enough
            [f"rcc_gemv<R, false>(cP{k}.data(), {sizes}, {rest}"],
            [f"      rcc_dots<R>(c{k}, {sizes}, {rest}"])

    def _matmul_loops(self, n):
        a, b, ia, jb, k = self._matmul_axes(n)
        i, j = tuple(v for v, _ in ia), tuple(v for v, _ in jb)
        y = lambda: f"w{n.id}[{self.row(n.id, i + j)}]"  # noqa: E731
        if not jb:
            def body(ind):
                return [f"{ind}R acc = 0;",
                        f"{ind}#pragma omp simd reduction(+:acc)",
                        f"{ind}for (long k = 0; k < {self.size(k[1])}; ++k) acc += "
                        f"{self.access(a.id, i + ('k',))} * {self.access(b.id, ('k',))};",
                        f"{ind}{y()} = acc;"]
            return self.nest(self._lanes_inside(list(ia), not a.type.batched), body)

        def axpy(ind):
            return [f"{ind}const R aik = {self.access(a.id, i + ('k',))};",
                    f"{ind}for (long i1 = 0; i1 < {self.size(jb[0][1])}; ++i1) "
                    f"{y()} += aik * {self.access(b.id, ('k',) + j)};"]
        return [f"      w{n.id}.zero();"] + self.nest(
            self._lanes_inside(list(ia) + [k], not b.type.batched), axpy)

    def _matmul_backward(self, n):
        fast = self.gemv(n)
        if fast is None:
            return self._matmul_backward_loops(n)
        k, (x, xs) = fast
        gx = self.plain(n.args[1], self.adjoint_arrays)
        a = self.cell.node(n.args[0])
        M, K = self.size(a.type.shape[0]), self.size(a.type.shape[1])
        return _either(
            [f"rcc_gemv<R, true>(cQ{k}.data(), {K}, {M}, g{n.id}.p, {self.F(n.id)}, "
             f"{gx[0]}, {gx[1]}, nb);  // dh += W^T g",
             f"rcc_rank_update<R>(gc{k}.p, {M}, {K}, g{n.id}.p, {self.F(n.id)}, "
             f"{x}, {xs}, nb);  // dW += g h^T"],
            self._matmul_backward_loops(n))

    def _matmul_backward_loops(self, n):
        a, b, ia, jb, k = self._matmul_axes(n)
        i, j = tuple(v for v, _ in ia), tuple(v for v, _ in jb)
        g = lambda: f"g{n.id}[{self.row(n.id, i + j)}]"  # noqa: E731
        ak, bk = i + ("k",), ("k",) + j
        shared = not a.type.batched or not b.type.batched
        if jb:  # dA(i, k) = sum_j g(i, j) B(k, j);  dB(k, j) += A(i, k) g(i, j)
            def body(ind):
                return [f"{ind}R acc = 0;",
                        f"{ind}#pragma omp simd reduction(+:acc)",
                        f"{ind}for (long i1 = 0; i1 < {self.size(jb[0][1])}; ++i1) "
                        f"acc += {g()} * {self.access(b.id, bk)};",
                        *[ind + s for s in self.accumulate(a.id, ak, "acc")],
                        f"{ind}const R aik = {self.access(a.id, ak)};",
                        f"{ind}for (long i1 = 0; i1 < {self.size(jb[0][1])}; ++i1) {{",
                        *[f"{ind}  {s}" for s in self.accumulate(b.id, bk, f"aik * {g()}")],
                        f"{ind}}}"]
            return self.nest(self._lanes_inside(list(ia) + [k], shared), body)

        def vector(ind):  # dA(i, k) += g(i) B(k);  dB(k) += A(i, k) g(i)
            return [f"{ind}const R gy = {g()};",
                    f"{ind}for (long k = 0; k < {self.size(k[1])}; ++k) {{",
                    *[f"{ind}  {s}" for s in self.accumulate(a.id, ak, f"gy * {self.access(b.id, bk)}")],
                    *[f"{ind}  {s}" for s in self.accumulate(b.id, bk, f"{self.access(a.id, ak)} * gy")],
                    f"{ind}}}"]
        return self.nest(self._lanes_inside(list(ia), shared), vector)

    def _reduced(self, n):
        """(x, the reduced axes, the index of x from the output index and the inner loop vars)."""
        x = self.cell.node(n.args[0])
        axis = n.attr("axis")
        axes = list(range(x.type.rank)) if axis is None else [axis]

        def x_index(idx):
            it, out = iter(idx), []
            for k in range(x.type.rank):
                out.append(f"k{k}" if k in axes else next(it))
            return tuple(out)
        return x, axes, x_index

    def _inner(self, x, axes, body, ind):
        """Loops over the reduced axes of x around body lines."""
        lines = []
        for k in axes:
            lines.append(f"{ind}for (long k{k} = 0; k{k} < {self.size(x.type.shape[k])}; ++k{k}) {{")
            ind += "  "
        lines += [ind + line for line in body]
        for _ in axes:
            ind = ind[:-2]
            lines.append(f"{ind}}}")
        return lines

    def _reduce(self, n):
        x, axes, x_index = self._reduced(n)
        count = self.numel([x.type.shape[k] for k in axes])

        def body(idx, ind):
            xi = self.access(x.id, x_index(idx))
            out = f"w{n.id}[{self.row(n.id, idx)}]"
            if n.op in ("sum", "mean"):
                scale = f" / R({count})" if n.op == "mean" else ""
                return [f"{ind}R acc = 0;", *self._inner(x, axes, [f"acc += {xi};"], ind),
                        f"{ind}{out} = acc{scale};"]
            lines = [f"{ind}R top = -std::numeric_limits<R>::infinity();",
                     *self._inner(x, axes, [f"top = std::max(top, {xi});"], ind)]
            if n.op == "amax":
                return lines + [f"{ind}{out} = top;"]
            return lines + [f"{ind}R acc = 0;",
                            *self._inner(x, axes, [f"acc += std::exp({xi} - top);"], ind),
                            f"{ind}{out} = std::isinf(top) ? top : top + std::log(acc);"]
        return self.loop(n.type.shape, body)

    def _softmax_loop(self, n, body):
        x, axes, x_index = self._reduced(n)
        outer = [s for k, s in enumerate(x.type.shape) if k not in axes]
        # idx: the outer index; x_index puts k<axis> on the softmax axis
        return self.loop(outer, lambda idx, ind: body(x, axes, x_index(idx), ind))

    def _softmax(self, n):
        def body(x, axes, xi, ind):
            v, out = self.access(x.id, xi), f"w{n.id}[{self.row(n.id, xi)}]"
            return [f"{ind}R top = -std::numeric_limits<R>::infinity();",
                    *self._inner(x, axes, [f"top = std::max(top, {v});"], ind),
                    f"{ind}R acc = 0;",
                    *self._inner(x, axes, [f"{out} = std::exp({v} - top);", f"acc += {out};"], ind),
                    *self._inner(x, axes, [f"{out} /= acc;"], ind)]
        return self._softmax_loop(n, body)

    # ---- backward code of one value: its adjoint into its arguments' ------------------------------
    def accumulate(self, i, idx, expr) -> list:
        """Statements adding `expr` to the adjoint of element idx of value i."""
        n = self.cell.node(i)
        if n.op == "const":
            return []
        if n.op in VIEWS and i not in self.seq and i not in self.const:
            return self.accumulate(n.args[0], self.parent_index(n, idx), expr)
        if i in self.seq:
            k = self.seq.index(i)
            return [f"gx{k}[{_offset(f'b*{self.F(i)}', self.flat(n.type.shape, idx))}] += {expr};"]
        if i in self.const:
            return [f"gc{self.const.index(i)}[{self.flat(n.type.shape, idx)}] += {expr};"]
        if n.op == "state":
            return [f"gs{self.state_index[n.attr('name')]}[{self.row(i, idx)}] += {expr};"]
        return [f"g{i}[{self.row(i, idx)}] += {expr};"]

    def backward(self, i) -> list:
        n = self.cell.node(i)
        head = f"      // adjoint of {self.describe(n)}"
        g = lambda idx: f"g{i}[{self.row(i, idx)}]"  # noqa: E731
        if n.op in POINTWISE:
            y = sympy.Symbol("#y")

            def body(idx, ind):
                args, names = self._symbols(n, idx)
                names["#y"] = self.access(i, idx)
                lines = [f"{ind}const R gy = {g(idx)};"]
                for p, d in enumerate(derivatives(n.op, args, y)):
                    if d != 0:
                        term = "gy" if d == 1 else f"gy * ({cxx(d, names)})"
                        lines += [ind + s for s in self.accumulate(
                            n.args[p], self.arg_index(n, p, idx), term)]
                return lines
            return [head] + self.loop(n.type.shape, body)
        if n.op == "matmul":
            return [head] + self._matmul_backward(n)
        if n.op in ("sum", "mean", "amax", "logsumexp"):
            x, axes, x_index = self._reduced(n)
            count = self.numel([x.type.shape[k] for k in axes])

            def body(idx, ind):
                xi = x_index(idx)
                d = {"sum": "gy", "mean": f"gy / R({count})",
                     "amax": f"({self.access(x.id, xi)} == {self.access(i, idx)} ? gy : R(0))",
                     "logsumexp": f"gy * std::exp({self.access(x.id, xi)} - {self.access(i, idx)})",
                     }[n.op]
                return [f"{ind}const R gy = {g(idx)};",
                        *self._inner(x, axes, self.accumulate(x.id, xi, d), ind)]
            return [head] + self.loop(n.type.shape, body)
        if n.op == "softmax":
            def body(x, axes, xi, ind):
                y, gy = self.access(i, xi), g(xi)
                return [f"{ind}R dot = 0;",
                        *self._inner(x, axes, [f"dot += {gy} * {y};"], ind),
                        *self._inner(x, axes, self.accumulate(x.id, xi, f"{y} * ({gy} - dot)"),
                                     ind)]
            return [head] + self._softmax_loop(n, body)
        if n.op in ("concat", "stack"):
            lines = [head]
            for part, place in self._parts(n):
                pshape = self.cell.node(part).type.shape
                lines += self.loop(pshape, lambda idx, ind, part=part, place=place: [
                    ind + s for s in self.accumulate(part, idx, g(place(idx)))])
            return lines
        raise AssertionError(n.op)

    def describe(self, n) -> str:
        name = c_name(n.name)
        return f"{n.op}{' ' + name if name else ''} [{', '.join(self.size(s) for s in n.type.shape)}]"

    # ---- the whole source -------------------------------------------------------------------------
    def source(self, whole: "KernelPrinter | None" = None) -> str:
        """The whole source: RCC_PART 1 builds the forward, 2 the backward (two builds that can
        run at once), 3 `whole`'s forward (the kernel of the same cell with nothing hoisted, as
        rcc_whole_steps). RCC_REAL (float or double) is defined when the kernel is built for a dtype."""
        sizes = self._sized() | (whole._sized() if whole is not None else set())
        lines = self._head("the loop over time of one cell", [], sizes)
        lines += _part(1, self._forward_fn("forward"), "forward")
        lines += _part(2, self._backward_fn(), "backward")
        if whole is not None:
            lines += _part(3, whole._forward_fn("whole_steps"), "whole_steps")
        return "\n".join(lines) + "\n"

    def _head(self, what, helpers, sizes) -> list:
        """The source up to the entry points: a title saying `what` it is, the prelude and
        `helpers` (lines), the dims and the element counts of the values `sizes`."""
        c = self.cell
        lines = [f"// {c_name(c.name)}: {what}, generated by rcc.",
                 "// Do not edit: regenerate it from the .rnn source.", PRELUDE, *helpers,
                 "// dims: defined (RCC_DIM<k>) when the module is built for their values"]
        lines += [f"constexpr long {self.dims[d.name]} = RCC_DIM{k};" for k, d in enumerate(c.dims)]
        lines.append("// element counts of the values the kernel reads or writes")
        lines += [f"constexpr long {self.F(i)} = {self.numel(c.node(i).type.shape)};"
                  for i in sorted(sizes)]
        return lines

    def _sized(self) -> set:
        """The values whose element counts the kernel names."""
        c = self.cell
        sizes = set(self.step) | set(self.seq) | set(self.const) | set(self.state_node.values())
        return sizes | {v for _, v, _ in c.outputs} | set(self.updates.values())

    def _state_size(self, k):
        name = self.cell.states[k].name
        i = self.state_node.get(name)
        return self.F(i) if i is not None else self.numel(self.cell.states[k].shape)

    def _args(self, backward):
        """Unpack the pointer table. Layout (runtime/cpp.py builds it): size = [N, T, threads,
        save, then (t stride, row stride) of each seq argument and of each output]; p = seq
        args, const args, initial states, then forward: outputs, final states, saved states;
        backward: saved states, output grads, final-state grads, seq grads, const grads,
        initial-state grads."""
        c = self.cell
        lines = ["  const long N = size[0], T = size[1];",
                 "  const int threads = int(size[2]);",
                 "  const bool save = size[3] != 0;"]
        ptr = 0
        st = 4
        for k, i in enumerate(self.seq):
            lines.append(f"  const R* const seq{k} = static_cast<const R*>(p[{ptr}]);"
                         f"  // {self.describe(c.node(i))}, [T, N, F{i}] strided")
            lines.append(f"  const long xt{k} = size[{st}], xn{k} = size[{st + 1}];")
            ptr, st = ptr + 1, st + 2
        for k, i in enumerate(self.const):
            lines.append(f"  const R* const c{k} = static_cast<const R*>(p[{ptr}]);"
                         f"  // {self.describe(c.node(i))}")
            ptr += 1
        for k, d in enumerate(c.states):
            lines.append(f"  const R* const init{k} = static_cast<const R*>(p[{ptr}]);"
                         f"  // state {c_name(d.name)}, [N, ...]")
            ptr += 1
        if not backward:
            for k, (name, v, _) in enumerate(c.outputs):
                lines.append(f"  R* const out{k} = static_cast<R*>(p[{ptr}]);"
                             f"  // output {c_name(name)}, [T, N, F{v}] strided")
                lines.append(f"  const long ot{k} = size[{st}], on{k} = size[{st + 1}];")
                ptr, st = ptr + 1, st + 2
            for k in range(len(c.states)):
                lines.append(f"  R* const final{k} = static_cast<R*>(p[{ptr}]);")
                ptr += 1
        for k in range(len(c.states)):
            q = "R*" if not backward else "const R*"
            lines.append(f"  {q} const saved{k} = static_cast<{q}>(p[{ptr}]);"
                         "  // [T, N, ...]: the state before each step")
            ptr += 1
        if backward:
            for k, (name, v, _) in enumerate(c.outputs):
                lines.append(f"  const R* const gout{k} = static_cast<const R*>(p[{ptr}]);"
                             f"  // [T, N, F{v}] strided, or null")
                lines.append(f"  const long gt{k} = size[{st}], gr{k} = size[{st + 1}];")
                ptr, st = ptr + 1, st + 2
            for k in range(len(c.states)):
                lines.append(f"  const R* const gfinal{k} = static_cast<const R*>(p[{ptr}]);"
                             "  // or null")
                ptr += 1
            for k in range(len(self.seq)):
                lines.append(f"  R* const gseq{k} = static_cast<R*>(p[{ptr}]);  // [T, N, ...]")
                ptr += 1
            for k in range(len(self.const)):
                lines.append(f"  R* const gconst{k} = static_cast<R*>(p[{ptr}]);"
                             "  // [N, ...]: row n0 of each block")
                ptr += 1
            for k in range(len(c.states)):
                lines.append(f"  R* const ginit{k} = static_cast<R*>(p[{ptr}]);  // [N, ...]")
                ptr += 1
        return lines

    def _packs(self, backward):
        """Each W of a register-tiled W @ h packed into panels once per call (rcc_pack): W's
        rows for the forward (cP), its columns for the backward's W^T g (cQ)."""
        lines = []
        for k in sorted({f[0] for f in map(self.gemv, self._matmuls()) if f is not None}):
            shape = self.cell.node(self.const[k]).type.shape
            M, K = self.size(shape[0]), self.size(shape[1])
            if backward:
                lines.append(f"  const std::vector<R> cQ{k} = packed ? rcc_pack(c{k}, {M}, {K}, {K}, 1)"
                             " : std::vector<R>();")
            else:
                lines.append(f"  const std::vector<R> cP{k} = packed ? rcc_pack(c{k}, {K}, {M}, 1, {K})"
                             " : std::vector<R>();")
        return lines

    def _matmuls(self):
        return [self.cell.node(i) for i in self.step if self.cell.node(i).op == "matmul"]

    def _block_head(self, backward):
        c = self.cell
        # packing a W costs a pass over it: worth it when it serves enough steps and rows
        packs = self._packs(False) + (self._packs(True) if backward else [])
        lines = ["  const bool packed = T * N >= PACK_MIN;"] * bool(packs) + packs
        lines += ["  const long rows = std::max(1L, std::min(long(ROWS_PER_BLOCK), "
                 "(N + threads - 1) / threads));",
                 "  const long blocks = (N + rows - 1) / rows;",
                 "  #pragma omp parallel for schedule(static) num_threads(threads) if(blocks > 1)",
                 "  for (long blk = 0; blk < blocks; ++blk) {",
                 "    const long n0 = blk * rows, nb = std::min(rows, N - n0);"]
        for k in range(len(c.states)):
            F = self._state_size(k)
            lines.append(f"    Buffer<R> s{k}(nb * {F});  // state {c_name(c.states[k].name)}")
        for i in sorted(self.stored | self.copied):
            lines.append(f"    Buffer<R> w{i}(nb * {self.F(i)});")
        return lines

    def _load_seq(self):
        return [f"      const R* const x{k} = seq{k} + t * xt{k} + n0 * xn{k};"
                for k in range(len(self.seq))]

    def _step_values(self):
        lines = []
        for i in self.step:
            if i in self.stored:
                lines += self.forward(i)
        return lines

    def _forward_fn(self, name):
        c = self.cell
        lines = ["template <typename R>", f"static void {name}(const long* size, void* const* p) {{"]
        lines += self._args(backward=False) + self._block_head(False)
        for k in range(len(c.states)):
            F = self._state_size(k)
            lines.append(f"    std::copy(init{k} + n0 * {F}, init{k} + (n0 + nb) * {F}, s{k}.p);")
        lines.append("    for (long t = 0; t < T; ++t) {")
        lines += self._load_seq()
        for k in range(len(c.states)):
            F = self._state_size(k)
            lines.append(f"      if (save) std::copy(s{k}.p, s{k}.p + nb * {F}, "
                         f"saved{k} + (t * N + n0) * {F});")
        lines += self._step_values()
        for k, (name, v, _) in enumerate(c.outputs):
            lines.append(f"      // output {c_name(name)}")
            lines += self.loop(c.node(v).type.shape, lambda idx, ind, k=k, v=v: [
                f"{ind}out{k}[t * ot{k} + (n0 + b) * on{k} + "
                f"{_paren(self.flat(c.node(v).type.shape, idx))}] = {self.access(v, idx)};"])
        for v in sorted(self.copied):
            lines.append("      // a next state that is not stored: copied before the states change")
            lines += self.loop(c.node(v).type.shape, lambda idx, ind, v=v: [
                f"{ind}w{v}[{self.row(v, idx)}] = {self.access(v, idx)};"])
        for name, v in self.updates.items():
            k = self.state_index[name]
            lines.append(f"      std::copy(w{v}.p, w{v}.p + nb * {self.F(v)}, s{k}.p);"
                         f"  // {c_name(name)}'")
        lines.append("    }")
        for k in range(len(c.states)):
            F = self._state_size(k)
            lines.append(f"    std::copy(s{k}.p, s{k}.p + nb * {F}, final{k} + n0 * {F});")
        lines += ["  }", "}"]
        return lines

    def _backward_fn(self):
        return self._storing_all(self._backward_body)

    def _storing_all(self, make):
        """make() with every value that has an adjoint stored: the backward reads each value
        several times (in its own and its users' derivatives), so it stores every value of the
        step once rather than recompute folded ones (exp, tanh...)."""
        forward_stored, self.stored = self.stored, self.stored | set(self.adjoint)
        try:
            return make()
        finally:
            self.stored = forward_stored

    def _backward_body(self):
        c = self.cell
        lines = ["template <typename R>", "static void backward(const long* size, void* const* p) {"]
        lines += self._args(backward=True) + self._block_head(True)
        for k in range(len(c.states)):
            F = self._state_size(k)
            lines += [f"    Buffer<R> gs{k}(nb * {F}), gn{k}(nb * {F});"
                      f"  // adjoints of state {c_name(c.states[k].name)} before and after the step",
                      f"    if (gfinal{k}) std::copy(gfinal{k} + n0 * {F}, gfinal{k} + (n0 + nb) * {F}, "
                      f"gn{k}.p);"]
        for i in self.adjoint:
            lines.append(f"    Buffer<R> g{i}(nb * {self.F(i)});")
        for k, i in enumerate(self.seq):
            lines.append(f"    Buffer<R> gx{k}(nb * {self.F(i)});")
        for k, i in enumerate(self.const):
            lines.append(f"    Buffer<R> gc{k}({self.F(i)});")
        lines.append("    for (long t = T - 1; t >= 0; --t) {")
        lines += self._load_seq()
        for k in range(len(c.states)):
            F = self._state_size(k)
            lines.append(f"      std::copy(saved{k} + (t * N + n0) * {F}, "
                         f"saved{k} + (t * N + n0 + nb) * {F}, s{k}.p);")
        lines.append("      // the step again, from the state saved before it")
        lines += self._step_values()
        zero = [f"g{i}" for i in self.adjoint] + [f"gs{k}" for k in range(len(c.states))] + \
               [f"gx{k}" for k in range(len(self.seq))]
        lines += [f"      {z}.zero();" for z in zero]
        lines.append("      // adjoints of this step's outputs and next states")
        for k, (name, v, _) in enumerate(c.outputs):
            shape = c.node(v).type.shape
            lines.append(f"      if (gout{k}) {{")
            lines += self.loop(shape, lambda idx, ind, k=k, v=v, shape=shape: [
                ind + s for s in self.accumulate(v, idx, f"gout{k}[t * gt{k} + (n0 + b) * gr{k} + "
                                                 f"{_paren(self.flat(shape, idx))}]")],
                indent="        ")
            lines.append("      }")
        for k, d in enumerate(c.states):
            v = self.updates.get(d.name)
            if v is None:
                F = self._state_size(k)
                lines.append(f"      for (long e = 0; e < nb * {F}; ++e) gs{k}[e] += gn{k}[e];"
                             f"  // {c_name(d.name)} keeps its value")
                continue
            shape = c.node(v).type.shape
            lines += self.loop(shape, lambda idx, ind, k=k, v=v: [
                ind + s for s in self.accumulate(v, idx, f"gn{k}[{self.row(v, idx)}]")])
        for i in reversed(self.adjoint):
            lines += self.backward(i)
        for k, i in enumerate(self.seq):
            lines.append(f"      std::copy(gx{k}.p, gx{k}.p + nb * {self.F(i)}, "
                         f"gseq{k} + (t * N + n0) * {self.F(i)});")
        for k in range(len(c.states)):
            lines.append(f"      std::swap(gs{k}.p, gn{k}.p);")
        lines.append("    }")
        for k in range(len(c.states)):
            F = self._state_size(k)
            lines.append(f"    std::copy(gn{k}.p, gn{k}.p + nb * {F}, ginit{k} + n0 * {F});")
        for k, i in enumerate(self.const):
            lines.append(f"    std::copy(gc{k}.p, gc{k}.p + {self.F(i)}, gconst{k} + n0 * {self.F(i)});")
        lines += ["  }", "}"]
        return lines


def _part(k, function, name) -> list:
    """`function` (template lines) and its C entry point rcc_<name>, built when RCC_PART is k."""
    return ["", f"#if RCC_PART == {k}", *function,
            f'extern "C" void rcc_{name}(const long* size, void* const* p) '
            f'{{ {name}<RCC_REAL>(size, p); }}', "#endif"]


def _either(fast, loops) -> list:
    """`fast` (lines) when the kernel packed its matrices, else `loops`."""
    return (["      if (packed) {"] + [f"        {line}" for line in fast] + ["      } else {"]
            + ["  " + line for line in loops] + ["      }"])


def _paren(text: str) -> str:
    return text if re.fullmatch(r"[A-Za-z0-9_]+", text) else f"({text})"


def _offset(base: str, flat: str) -> str:
    return base if flat == "0" else f"{base} + {flat}"


PRELUDE = r"""
#if defined(__x86_64__) && defined(__linux__) && !defined(__FAST_MATH__)
// glibc declares its vector math functions (libmvec: exp, tanh, log1p... on 4 or 8 lanes, within
// 4 ulp) only under __FAST_MATH__, because they do not set errno; rcc compiles with
// -fno-math-errno, so loops calling them may be vectorized without -ffast-math's other effects
// (it would also assume no inf or NaN).
#define __FAST_MATH__ 1
#include <math.h>
#undef __FAST_MATH__
#endif
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

constexpr int ROWS_PER_BLOCK = @ROWS_PER_BLOCK@;
constexpr long PACK_MIN = 32;  // steps x rows from which a call packs its matrices (rcc_pack)

// A workspace array of one block; p can be swapped with another's.
template <typename R> struct Buffer {
  std::vector<R> v;
  R* p;
  explicit Buffer(long n) : v(std::max(n, 1L), R(0)), p(v.data()) {}
  R& operator[](long i) { return p[i]; }
  void zero() { std::fill(p, p + v.size(), R(0)); }
};

// W @ h for a shared W on nb lanes (the recurrent matmul). W is first packed into panels of TW
// outputs (rcc_pack), each panel [C, TW] contiguous, so a tile of L lanes x TW outputs is
// accumulated in registers while the contraction index c streams through one panel in order.
template <typename R> struct Panel {
  typedef R V __attribute__((vector_size(32)));
  static constexpr long VL = 32 / sizeof(R), TW = 2 * VL;
};

// Panels of the matrix X[c, o] = src[c * sc + o * so] (C x O), zero-padded to whole panels.
template <typename R>
static std::vector<R> rcc_pack(const R* src, long C, long O, long sc, long so) {
  constexpr long TW = Panel<R>::TW;
  std::vector<R> out(((O + TW - 1) / TW) * C * TW, R(0));
  for (long o0 = 0; o0 < O; o0 += TW) {
    R* panel = out.data() + (o0 / TW) * C * TW;
    const long n = std::min(TW, O - o0);
    for (long c = 0; c < C; ++c)
      for (long j = 0; j < n; ++j) panel[c * TW + j] = src[c * sc + (o0 + j) * so];
  }
  return out;
}

// y[l, o] (+)= sum_c X[c, o] x[l, c] for lanes l < L, o < O, X packed by rcc_pack.
template <typename R, bool ADD, int L>
static inline void rcc_gemv_lanes(const R* P, long O, long C, const R* x, long xs, R* y, long ys) {
  typedef typename Panel<R>::V V;
  constexpr long VL = Panel<R>::VL, TW = Panel<R>::TW;
  for (long o = 0; o < O; o += TW, P += C * TW) {
    V acc[L][2] = {};
    for (long c = 0; c < C; ++c) {
      V a0, a1;
      std::memcpy(&a0, P + c * TW, sizeof a0);
      std::memcpy(&a1, P + c * TW + VL, sizeof a1);
#if defined(__GNUC__) && defined(__x86_64__)
      // keep the panel's two vectors in registers: otherwise GCC folds a load into each of
      // the 2L multiply-adds, and the loads, not the multiply-adds, bound the loop (2x slower)
      asm("" : "+x"(a0), "+x"(a1));
#endif
      for (int l = 0; l < L; ++l) {
        const R xv = x[l * xs + c];
        acc[l][0] += a0 * xv;
        acc[l][1] += a1 * xv;
      }
    }
    const long n = std::min(TW, O - o);
    for (int l = 0; l < L; ++l) {
      R out[TW];
      std::memcpy(out, acc[l], sizeof out);
      for (long j = 0; j < n; ++j) y[l * ys + o + j] = ADD ? y[l * ys + o + j] + out[j] : out[j];
    }
  }
}

template <typename R, bool ADD>
static void rcc_gemv(const R* P, long O, long C, const R* x, long xs, R* y, long ys, long nb) {
  long l = 0;
  for (; l + 4 <= nb; l += 4) rcc_gemv_lanes<R, ADD, 4>(P, O, C, x + l * xs, xs, y + l * ys, ys);
  for (; l < nb; ++l) rcc_gemv_lanes<R, ADD, 1>(P, O, C, x + l * xs, xs, y + l * ys, ys);
}

// The same product on W row-major [O, C] as given, for calls too short to repay packing: four
// rows at a time, read from L1 for every lane, make four independent sums (a single dot
// product waits on the latency of its multiply-adds).
template <typename R>
static void rcc_dots(const R* W, long O, long C, const R* x, long xs, R* y, long ys, long nb) {
  long o = 0;
  for (; o + 4 <= O; o += 4) {
    const R *w0 = W + o * C, *w1 = w0 + C, *w2 = w1 + C, *w3 = w2 + C;
    for (long l = 0; l < nb; ++l) {
      const R* xl = x + l * xs;
      R a0 = 0, a1 = 0, a2 = 0, a3 = 0;
      #pragma omp simd reduction(+:a0, a1, a2, a3)
      for (long c = 0; c < C; ++c) {
        a0 += w0[c] * xl[c];
        a1 += w1[c] * xl[c];
        a2 += w2[c] * xl[c];
        a3 += w3[c] * xl[c];
      }
      R* yl = y + l * ys + o;
      yl[0] = a0, yl[1] = a1, yl[2] = a2, yl[3] = a3;
    }
  }
  for (; o < O; ++o)
    for (long l = 0; l < nb; ++l) {
      R a = 0;
      #pragma omp simd reduction(+:a)
      for (long c = 0; c < C; ++c) a += W[o * C + c] * x[l * xs + c];
      y[l * ys + o] = a;
    }
}

// A[i, k] += sum_l g[l, i] x[l, k] (the gradient of a shared W in W @ h, summed over lanes):
// two vectors of a row of A stay in registers while the lanes are added in.
template <typename R>
static void rcc_rank_update(R* A, long M, long K, const R* g, long gs, const R* x, long xs, long nb) {
  typedef typename Panel<R>::V V;
  constexpr long VL = Panel<R>::VL;
  for (long i = 0; i < M; ++i) {
    R* row = A + i * K;
    long k = 0;
    for (; k + 2 * VL <= K; k += 2 * VL) {
      V a0, a1;
      std::memcpy(&a0, row + k, sizeof a0);
      std::memcpy(&a1, row + k + VL, sizeof a1);
      for (long l = 0; l < nb; ++l) {
        const R gv = g[l * gs + i];
        V x0, x1;
        std::memcpy(&x0, x + l * xs + k, sizeof x0);
        std::memcpy(&x1, x + l * xs + k + VL, sizeof x1);
        a0 += x0 * gv;
        a1 += x1 * gv;
      }
      std::memcpy(row + k, &a0, sizeof a0);
      std::memcpy(row + k + VL, &a1, sizeof a1);
    }
    for (; k < K; ++k)
      for (long l = 0; l < nb; ++l) row[k] += g[l * gs + i] * x[l * xs + k];
  }
}

// The elementwise functions C++ lacks, in the forms torch computes them.
template <typename R> static inline R rcc_sigmoid(R x) { return R(1) / (R(1) + std::exp(-x)); }
template <typename R> static inline R rcc_softplus(R x) {
  return x > R(20) ? x : std::log1p(std::exp(x));  // torch's threshold
}
template <typename R> static inline R rcc_logsigmoid(R x) {
  return std::min(x, R(0)) - std::log1p(std::exp(-std::abs(x)));
}
template <typename R> static inline R rcc_silu(R x) { return x * rcc_sigmoid(x); }
template <typename R> static inline R rcc_gelu(R x) {
  return R(0.5) * x * (R(1) + std::erf(x * R(0.7071067811865476)));
}
template <typename R> static inline R rcc_relu(R x) { return x > R(0) ? x : R(0); }
template <typename R> static inline R rcc_abs(R x) { return std::abs(x); }
template <typename R> static inline R rcc_sign(R x) { return R((x > R(0)) - (x < R(0))); }
template <typename R> static inline R rcc_step(R x) { return x > R(0) ? R(1) : R(0); }
template <typename R> static inline R rcc_tiestep(R x) {
  return x > R(0) ? R(1) : (x == R(0) ? R(0.5) : R(0));
}
template <typename R> static inline R rcc_max(R a, R b) {
  return (a != a || b != b) ? a + b : std::max(a, b);  // NaN propagates, as in torch
}
template <typename R> static inline R rcc_min(R a, R b) {
  return (a != a || b != b) ? a + b : std::min(a, b);
}
template <typename R> static inline R rcc_logaddexp(R a, R b) {
  const R m = std::max(a, b);
  return std::isinf(m) && m < R(0) ? m : m + std::log1p(std::exp(-std::abs(a - b)));
}
template <typename R> static inline R rcc_where(R c, R a, R b) { return c != R(0) ? a : b; }
template <typename R> static inline R rcc_lt(R a, R b) { return a < b ? R(1) : R(0); }
template <typename R> static inline R rcc_le(R a, R b) { return a <= b ? R(1) : R(0); }
template <typename R> static inline R rcc_gt(R a, R b) { return a > b ? R(1) : R(0); }
template <typename R> static inline R rcc_ge(R a, R b) { return a >= b ? R(1) : R(0); }
template <typename R> static inline R rcc_eq(R a, R b) { return a == b ? R(1) : R(0); }
template <typename R> static inline R rcc_ne(R a, R b) { return a != b ? R(1) : R(0); }
""".replace("@ROWS_PER_BLOCK@", str(ROWS_PER_BLOCK))


def print_kernel(cell: ir.CellIR) -> str:
    return KernelPrinter(cell).source()
