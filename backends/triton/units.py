"""The loop over time of a cell whose step works unit by unit (unit_layout.py), as Triton kernels
tiled over hidden units and rows: what plan sequential runs at model sizes.

Program (u, b) owns units [u*HB, u*HB + HB) and rows [b*BB, b*BB + BB); every value of the step
is printed as register tiles [BB, HB], one per block of D (a vector of m*D entries is m tiles),
[BB, 1] for a number per row and () for a number. The tiles' sizes are constexprs the runtime
picks; D, T and the batch are runtime integers, so one compiled kernel serves every hidden size
of its bucket, every length and every batch.

The recurrent products are the only reads across units: each step, a program reads the whole
previous state of its rows from memory (the states' history, written each step) and multiplies
it by the rows of P for its units, `tl.dot` over blocks of BK (tensor cores; fp32 and fp64
exactly, `input_precision="ieee"`). The new state goes back to memory; when several programs
share rows (U = D/HB > 1), they meet at a barrier (an atomic counter per block of rows) before
the next step reads it, or the runtime launches one step at a time (the interpreter, a grid
larger than the GPU).

The backward runs the steps in reverse. Step t's adjoint reaches its states in two parts: the
pointwise part in registers, and through the products, `gz_t @ P` (gz_t the products' adjoints,
which need every unit's). So iteration t first finishes step t+1's part (reading gz_{t+1}, which
every program wrote before the barrier), then computes step t's pointwise adjoints from the saved
state and products and stores gz_t. The products' weight gradients are one GEMM over all steps
afterwards (rcc.runtime.triton.units); the params' vectors' adjoints are summed per program.
"""
from __future__ import annotations

import sympy

from rcc import ir
from rcc.codegen import dim_expr, doc_text

from ..pointwise import POINTWISE, pointwise
from .kernel import TileExprPrinter, differentiable, t_name, value_hint
from .units_adjoint import UnitAdjoints, prefetched


class UnitKernelPrinter(UnitAdjoints):
    """Prints the forward and backward kernels of `cell`'s loop tiled over units (the backward's
    adjoint rules are units_adjoint.py's), `meta(dims)` and `spec()`, what the runtime reads."""

    def __init__(self, cell: ir.CellIR, part, layout):
        self.cell, self.part, self.lay = cell, part, layout
        self.name = t_name(cell.name) or "cell"
        self.constants = {}
        self.product = {p.node: p for p in layout.products}
        self.matrices = {part.const[p.matrix] for p in layout.products}  # their ids
        self.tag = [f"{k}_{t_name(d.name)}" for k, d in enumerate(cell.states)]
        # pointers p_*, strides of the per-step arguments {name}_st (time) and {name}_sn (row)
        self.seq_name = [f"x{k}_{self._hint(i)}" for k, i in enumerate(part.seq)]
        self.seq_ptr = [f"p_{x}" for x in self.seq_name]
        self.const_ptr = [f"p_w{k}_{self._hint(i)}" for k, i in enumerate(part.const)]
        self.diff = differentiable(cell, part)

    def _hint(self, i):
        return value_hint(self.cell, i)

    def m(self, i) -> int:
        return self.lay.blocks[i]

    def kind(self, i) -> str:
        """'unit' (tiles [BB, HB]), 'row' ([BB, 1]) or 'one' (a number)."""
        if self.m(i):
            return "unit"
        return "row" if i in self.lay.rowwise else "one"

    def constant(self, value) -> str:
        return f"k{self.constants.setdefault(sympy.sympify(value), len(self.constants))}"

    def md(self, m) -> str:
        return "D" if m == 1 else f"{m} * D"

    # ---- values ------------------------------------------------------------------------------
    def _args(self, n, g):
        """Sympy symbols or numbers for n's arguments, their texts in block g."""
        syms, names = [], {}
        for k, a in enumerate(n.args):
            node = self.cell.node(a)
            if node.op == "const" and a not in self.value:
                value = sympy.sympify(node.attr("value"))
                if not value.free_symbols:
                    syms.append(value)
                    continue
                text = self.constant(value)
            else:
                text = self.value[a][g if self.m(a) else 0]
            s = sympy.Symbol(f"a{k}")
            syms.append(s)
            names[s.name] = text
        return syms, names

    def _node(self, n) -> list:
        """The texts of node n's blocks (one text for a scalar)."""
        op, m = n.op, self.m(n.id)
        if op in POINTWISE:
            out = []
            for g in range(max(m, 1)):
                syms, names = self._args(n, g)
                out.append(TileExprPrinter(names, self.constant).doprint(pointwise(op, syms)))
            return out
        if op == "getitem":
            lo = self.lay.slices[n.id]
            return self.value[n.args[0]][lo:lo + m]
        if op == "concat":
            return [t for a in n.args for t in self.value[a]]
        if op == "transpose":
            return self.value[n.args[0]]
        if op in ("zeros", "ones"):
            fill = "1.0" if op == "ones" else "0.0"
            return [f"tl.full((BB, HB), {fill}, ACC)"] * m if m else [f"tl.full((), {fill}, ACC)"]
        raise NotImplementedError(f"unit kernel: op {op}")  # unit_layout admits no other op

    def _root(self, v) -> list:
        n = self.cell.node(v)
        if v not in self.value:  # a number read directly
            value = sympy.sympify(n.attr("value"))
            text = (self.constant(value) if value.free_symbols else
                    TileExprPrinter({}, self.constant).doprint(value))
            return [f"({text} + tl.zeros((), ACC))"]
        return self.value[v]

    def _full(self, text) -> str:
        return f"tl.broadcast_to({text}, (BB, HB))"

    # ---- memory ------------------------------------------------------------------------------
    def _seq_load(self, k, i, time) -> list:
        ptr, x = self.seq_ptr[k], self.seq_name[k]
        if self.kind(i) == "row":
            return [f"tl.load({ptr} + {time} * {x}_st + rows * {x}_sn, mask=rmask, other=0.0)"
                    f".to(ACC)[:, None]"]
        return [f"tl.load({ptr} + {time} * {x}_st + r2 * {x}_sn + {g} * D + u2, mask=m2, "
                f"other=0.0).to(ACC)" for g in range(self.m(i))]

    def _hist(self, k, time, cols="u2") -> str:
        """State k's history at step `time` (slot time % NSLOT), these rows, columns `cols`."""
        return f"p_hist{self.tag[k]} + (({time}) % NSLOT) * ND + r2 * D + {cols}"

    def _slab(self, ptr, time, m, cols) -> str:
        """A per-step buffer [T, N, m*D] (products, their adjoints, a seq value's adjoint) at step
        `time`, these rows, columns `cols`."""
        md = self.md(m)
        return f"{ptr} + ({time}) * N * ({md}) + r2 * ({md}) + {cols}"

    def _leaves(self) -> list:
        """Names of what the step reads from outside, and the lines loading the params'
        vectors and numbers (once)."""
        c, part = self.cell, self.part
        self.value = {}
        for k, d in enumerate(c.states):
            if d.name in part.state_node:
                self.value[part.state_node[d.name]] = [f"s{k}"]
        for k, i in enumerate(part.seq):
            self.value[i] = [f"x{k}_{g}" for g in range(max(self.m(i), 1))]
        pre = []
        for k, i in enumerate(part.const):
            if i in self.matrices:
                continue
            ptr = self.const_ptr[k]
            if self.m(i):
                self.value[i] = [f"w{k}_{g}" for g in range(self.m(i))]
                pre += [f"w{k}_{g} = tl.load({ptr} + {g} * D + units, mask=umask, other=0.0).to(ACC)[None, :]"
                        for g in range(self.m(i))]
            else:
                self.value[i] = [f"w{k}"]
                pre.append(f"w{k} = tl.load({ptr}).to(ACC)")
        return pre

    def _products(self, time, saved: bool) -> list:
        """Lines computing (or, `saved`, loading) the recurrent products' blocks at step `time`."""
        lines = []
        for j, p in enumerate(self.lay.products):
            self.value[p.node] = [f"z{j}_{g}" for g in range(p.m)]
            if saved:
                lines += [f"z{j}_{g} = tl.load({self._slab(f'p_z{j}', time, p.m, f'{g} * D + u2')}, "
                          "mask=m2, other=0.0)" for g in range(p.m)]
            else:
                lines += [f"z{j}_{g} = tl.zeros((BB, HB), ACC)" for g in range(p.m)]
        if saved or not self.lay.products:
            return lines
        loads, dots = [], []
        for k in sorted({p.state for p in self.lay.products}):
            hist = self._hist(k, time, "ks[None, :]")
            loads.append((f"hk{k}", f"tl.load({hist}, mask=rmask[:, None] & kmask[None, :], other=0.0, "
                                    "cache_modifier=\".cg\")"))
        for j, p in enumerate(self.lay.products):
            w = self.const_ptr[p.matrix]
            for g in range(p.m):
                address = (f"ks[:, None] * ({self.md(p.m)}) + {g} * D + u2" if p.transposed
                           else f"({g} * D + u2) * D + ks[:, None]")
                loads.append((f"wk{j}_{g}", f"tl.load({w} + {address}, mask=kmask[:, None] & umask[None, :], "
                                            "other=0.0)"))
                dots.append(f"z{j}_{g} = tl.dot(hk{p.state}.to(DOT), wk{j}_{g}.to(DOT), z{j}_{g}, "
                            "input_precision=\"ieee\", out_dtype=ACC)")
        lines.append("# the recurrent products, over blocks of the previous states of these rows")
        return lines + prefetched("D", loads, dots)

    def _step(self) -> list:
        lines = []
        for i in self.part.step:
            n = self.cell.node(i)
            if i in self.product:
                continue
            texts = self._node(n)
            if n.op in POINTWISE or n.op in ("zeros", "ones"):
                names = [f"v{i}_{g}" for g in range(len(texts))] if self.m(i) else [f"v{i}"]
                lines += [f"{a} = {b}" for a, b in zip(names, texts)]
                texts = names
            self.value[i] = texts
        return lines

    def _barrier(self) -> list:
        # release: this program's stores before the count; spin on plain (L2) reads, then one
        # acquire, so the next step's reads see every program's stores
        return ["tl.debug_barrier()  # this program's threads see each other's stores",
                "if SYNC:  # and every program of these rows has stored its part of the step",
                "    tl.atomic_add(p_sync + b, 1, sem=\"release\")",
                "    target = (i + 1) * tl.num_programs(0)",
                "    while tl.load(p_sync + b, volatile=True) < target:",
                "        pass",
                "    tl.atomic_add(p_sync + b, 0, sem=\"acquire\")",
                "    tl.debug_barrier()"]

    # ---- forward -----------------------------------------------------------------------------
    def forward_source(self) -> list:
        c = self.cell
        pre = self._leaves()
        pre += [f"s{k} = tl.load({self._hist(k, 't_first')}, mask=m2, other=0.0)"
                for k in range(len(c.states))]
        loop = ["t = t_first + i"]
        loop += [ln for k, i in enumerate(self.part.seq) for ln in
                 (f"{a} = {b}" for a, b in zip(self.value[i], self._seq_load(k, i, "t")))]
        loop += self._products("t", saved=False)
        for j, p in enumerate(self.lay.products):
            loop += ["if SAVE:  # the products, for the backward"]
            loop += [f"    tl.store({self._slab(f'p_z{j}', 't', p.m, f'{g} * D + u2')}, z{j}_{g}, mask=m2)"
                     for g in range(p.m)]
        loop += self._step()
        for k, (name, v, _) in enumerate(c.outputs):
            loop += self._store_output(f"p_out{k}", v)
        updates = [(k, self.part.updates[d.name]) for k, d in enumerate(c.states)
                   if d.name in self.part.updates]
        if updates:
            loop.append(f"{', '.join(f's{k}' for k, _ in updates)} = "
                        f"{', '.join(self._full(self._root(v)[0]) + '.to(ACC)' for _, v in updates)}")
        loop += [f"tl.store({self._hist(k, 't + 1')}, s{k}, mask=m2)" for k in range(len(c.states))]
        loop += self._barrier()
        args = (self._seq_args() + self.const_ptr + [f"p_hist{t}" for t in self.tag]
                + [f"p_out{k}" for k in range(len(c.outputs))]
                + [f"p_z{j}" for j in range(len(self.lay.products))] + ["p_sync"])
        doc = (f"Steps t_first .. t_first + t_count - 1 of {doc_text(c.name)} for a block of units and "
               "of rows; each step's states to the history (slot t % NSLOT), its products too when SAVE.")
        return self._kernel(f"{self.name}_forward", doc, args, ["t_first", "t_count"], ["SAVE"],
                            pre, loop, [])

    def _store_output(self, ptr, v) -> list:
        texts, m = self._root(v), self.m(v) if v in self.lay.blocks else 0
        if m:
            return [f"tl.store({ptr} + (r2 * T + t) * ({self.md(m)}) + {g} * D + u2, {x}, mask=m2)"
                    for g, x in enumerate(texts)]
        return [f"tl.store({ptr} + r2 * T + t, tl.broadcast_to({texts[0]}, (BB, 1)), "
                f"mask=rlead[:, None])"]

    def _seq_args(self) -> list:
        return [f"p_{x}, {x}_st, {x}_sn" for x in self.seq_name]

    # ---- rendering ---------------------------------------------------------------------------
    def _kernel(self, name, doc, args, runtime, flags, pre, loop, post):
        return lambda: self._render(name, doc, args, runtime, flags, pre, loop, post)

    def _render(self, name, doc, args, runtime, flags, pre, loop, post):
        header = [f'"""{doc}"""',
                  "u = tl.program_id(0)  # the block of units this program owns",
                  "b = tl.program_id(1)  # and of rows (batch x head)",
                  "rows = b * BB + tl.arange(0, BB)",
                  "units = u * HB + tl.arange(0, HB)",
                  "rmask = rows < N",
                  "umask = units < D",
                  "r2 = rows[:, None]",
                  "u2 = units[None, :]",
                  "m2 = rmask[:, None] & umask[None, :]",
                  "rlead = rmask & (rows * 0 + u == 0)  # program u = 0 stores what every u computes",
                  "ND = N * D  # one step of a state's history"]
        header += [f"k{k} = tl.full((), K{k}, ACC)" for k in self.constants.values()]
        ints = runtime + ["NSLOT", "T", "N", "D"]
        constexprs = (flags + ["SYNC", "ACC", "DOT", "BB", "HB", "BK"]
                      + [f"K{k}" for k in self.constants.values()])
        sig = [f"    {a}," for a in args] + [f"    {', '.join(ints)},"]
        sig += [f"    {', '.join(f'{x}: tl.constexpr' for x in constexprs[i:i + 4])},"
                for i in range(0, len(constexprs), 4)]
        body = header + list(pre) + ["for i in range(t_count):"] + ["    " + ln for ln in loop] + list(post)
        # a new length, first step or batch never recompiles; D and the strides are specialized
        # (Triton: divisible by 16 or not), which lets the loads along units be vectors
        quoted = ", ".join(f'"{x}"' for x in runtime + ["NSLOT", "T", "N"])
        return [f"@triton.jit(do_not_specialize=[{quoted}])", f"def {name}(", *sig, "):",
                *["    " + ln for ln in body]]

    def source(self) -> str:
        forward, backward = self.forward_source(), self.backward_source()
        return "\n".join(forward() + ["", ""] + backward()) + "\n"

    def meta_source(self, name) -> list:
        names = {d.name: f"dims[{d.name!r}]" for d in self.cell.dims}
        lines = [f"def {name}(dims):",
                 '    """The kernels\' hidden size D (a runtime integer) and numbers K (constexprs)."""',
                 f"    meta = {{'D': {dim_expr(self.lay.D, names)}}}"]
        for value, k in self.constants.items():
            number = dim_expr(value, names) if value.free_symbols else repr(float(value))
            lines.append(f"    meta['K{k}'] = float({number})")
        lines.append("    return meta")
        return lines

    def spec(self) -> dict:
        """What the runtime needs to know of the kernels' arguments."""
        part = self.part
        return {
            "seq": [self.m(i) for i in part.seq],
            "const": [None if i in self.matrices else self.m(i) for i in part.const],
            "diff_const": [i in self.diff and i not in self.matrices for i in part.const],
            "products": [(p.matrix, p.state, p.transposed, p.m) for p in self.lay.products],
        }
