"""Backend 'triton': a Python module whose loop over time is a pair of generated Triton kernels.

The module is the torch printer's up to the loop (as backend cpp's): torch computes what reads no
state, then one launch of the forward kernel (kernel.py) runs every step; the backward kernel
runs them in reverse (rcc.runtime.triton). The kernels are printed into the module itself, as
Python code, so that a reader finds the whole cell in one file.
"""
from __future__ import annotations

import re

from rcc import ir
from rcc.backends.torch import plans as torch_plans
from rcc.backends.torch.graph import GraphPrinter
from rcc.backends.torch.printer import TorchPrinter, _tuple

from ..loop import FusedLoopPrinter
from ..loop import LoopPartition
from .kernel import PRELUDE, TileKernelPrinter, t_name
from .unit_layout import unit_layout
from .value_split import value_split
from .units import UnitKernelPrinter


def kernels_after(module, what, kernels, meta) -> str:
    """The module's text, then its Triton kernels: the helpers' prelude, the kernels, their meta."""
    title = f"# ---- {what}: Triton kernels (backends/triton/kernel.py) "
    return "\n".join([module, title + "-" * max(4, 100 - len(title)), PRELUDE.strip("\n"), "", "",
                      kernels.rstrip("\n"), "", "", *meta, ""])


class TritonModule:
    """What every module of backend triton has: its imports, and its plans' kernels from
    rcc.runtime.triton."""
    backend = "triton"
    needs = "torch, triton and rcc.runtime only"
    imports = ("import triton", "import triton.language as tl", "")
    runtime_imports = ("from rcc.runtime import triton as _rtt",)
    kernels = "_rtt"

    def reserved_names(self, cell):
        # the kernels and the prelude's helpers are module-level functions beside the class
        name = t_name(cell.name) or "cell"
        return (*re.findall(r"def (rcc_\w+)\(", PRELUDE),
                *(f"{name}_{part}" for part in ("forward", "backward", "meta", "jacobian", "units", "split")))


class TritonPrinter(TritonModule, FusedLoopPrinter, TorchPrinter):
    """Plan sequential: the loop over time as generated kernels: tiled over hidden units when
    the step works unit by unit (units.py), else one program per row holding the whole step
    (kernel.py)."""

    def __init__(self, cell: ir.CellIR, source_name: str = ""):
        super().__init__(cell, source_name, "sequential")
        part = LoopPartition(cell)
        layout = unit_layout(cell, part)
        self.tiled = not isinstance(layout, str)
        self.why = "" if self.tiled else layout  # why the step is not tiled over units
        split = None if self.tiled else value_split(cell, part)
        self.kernel = UnitKernelPrinter(cell, part, layout) if self.tiled else TileKernelPrinter(cell, split)
        if split is not None:
            self.why += f"; its columns of {split} are split over programs"
        self._fused_init(self.kernel.part)
        self.kernel_source = self.kernel.source()
        name = self.kernel.name
        if self.tiled:
            spec = self.kernel.spec()
            self.kernel_source += f"\n\n{name}_units = {spec!r}  # the kernels' layout, for the runtime\n"
        else:
            spec = self.kernel.split_spec()
            self.kernel_source += f"\n\n{name}_split = {spec!r}  # the axis split over programs\n"
        self.kernels = f"({name}_forward, {name}_backward)"
        self.meta = f"{name}_meta"
        self.class_attrs = [
            "",
            "    def __init__(self, *args, **kwargs):",
            "        super().__init__(*args, **kwargs)",
            f"        self._meta = {self.meta}(self.dims)  # the kernels' constexprs for these dims",
        ]

    def module(self) -> str:
        return kernels_after(super().module(), "the loop over time", self.kernel_source,
                             self.kernel.meta_source(self.meta) if self.tiled else
                             self.kernel.meta_source(self.meta, self.why))

    def _run_call(self, args, consts, states, shapes, built_for):
        if self.tiled:
            return [
                "        # every step in the Triton kernels, tiled over units and rows",
                f"        _outs, _finals = _rtt.run_units({self.kernels}, {self.kernel.name}_units,",
                "            self._meta,",
                f"            _T, _N, {args},",
                f"            {consts},",
                f"            {states}, {shapes},",
                f"            {built_for})",
            ]
        return [
            "        # every step in the Triton kernel: what it reads per step, once, and the states",
            f"        _outs, _finals = _rtt.run({self.kernels}, self._meta, _T, _N,",
            f"            {args},",
            f"            {consts},",
            f"            {states}, {shapes},",
            f"            {built_for}, {self.kernel.name}_split)",
        ]


class ScanPrinter(TritonModule, torch_plans.ScanPrinter):
    """Plan scan: the torch plan's module, its linear scans Triton kernels (rcc/runtime/triton/scan.py)."""

    def __init__(self, form, source_name=""):
        super().__init__(form, source_name)
        self.class_attrs = self.class_attrs + [scan_kernels(len(form.states) if form.matrix else 1, True)]


def scan_kernels(block: int, backward: bool) -> str:
    """The class attribute naming the scan kernels a plan launches (for rcc precompile): the
    linear scan (block 1) or the block scan of `block` x `block` blocks, and whether a backward
    scan kernel runs (plan newton's backward is a forward scan over reversed time)."""
    spec = dict(block=block, backward=backward)
    return f"    SCAN_KERNELS = {spec!r}  # what the Triton scans run (for rcc precompile)"


class NewtonPrinter(TritonModule, torch_plans.NewtonPrinter):
    """Plan newton: the torch plan's module with the Jacobian (each iteration's residual and
    linearisation: the next states and d next_i / d prev_j) one generated Triton kernel over all
    rows, and each iteration's scan a Triton kernel. The step stays a torch function: the
    backward differentiates it once (one VJP over all rows)."""

    def __init__(self, form, source_name=""):
        super().__init__(form, source_name)
        self.kernel = TileKernelPrinter(form.cell)
        self.class_attrs = self.class_attrs + [
            "",
            "    def __init__(self, *args, **kwargs):",
            "        super().__init__(*args, **kwargs)",
            f"        self._meta = {self.kernel.name}_meta(self.dims)  # the kernel's constexprs",
            scan_kernels(len(form.states), False),
        ]

    def _solve(self, lines):
        c, form = self.cell, self.form
        roots = list(self.next_of.values()) + [v for row in form.jacobian for v in row]
        leaves = [self.leaf[s] for s in form.states]
        # what the kernel computes from the states and what the step reads (a Jacobian entry
        # may itself be state-free: a product of two gates the step reads)
        stop = set(self.reads) | set(leaves)
        ids = {i for i in torch_plans._cone(c, [v for v in roots if v is not None], stop) - stop
               if c.node(i).op != "const"}
        decl = next(d for d in c.states if d.name == form.states[0])
        self.kernel_source = self.kernel.rows_source(
            f"{self.kernel.name}_jacobian", ids, leaves, self.reads, roots, decl.shape)
        k = len(form.states)
        hints = [f"{s}_new" for s in form.states] + [f"d{a}_d{b}" for a in form.states for b in form.states]
        texts = [self.ns.new(h) if v is not None else "None" for h, v in zip(hints, roots)]
        outs = [t for t in texts if t != "None"]
        nexts = texts[:k]
        rows = [texts[k + i * k:k + (i + 1) * k] for i in range(k)]
        args = "".join(", " + self.var[a] for a in self.reads)
        self.jac_fn = [
            "    def _jacobian" + self.signature,
            "        # one Triton kernel over the rows: the next states, then d next_i / d prev_j",
            f"        {', '.join(outs)}{',' if len(outs) == 1 else ''} = _rtt.over_rows(",
            f"            {self.kernel.name}_jacobian, self._meta, tuple(_prev){args[1:] and ' + (' + args[2:] + ',)'},",
            f"            {len(outs)})",
            f"        return {_tuple(nexts)}, {_tuple(_tuple(r) for r in rows)}",
        ]
        return super()._solve(lines)

    def module(self) -> str:
        text = super().module()  # prints the kernel's body (_solve)
        return kernels_after(text, "the Jacobian over all rows", "\n".join(self.kernel_source()),
                             self.kernel.meta_source(f"{self.kernel.name}_meta"))


class ChunkPrinter(TritonModule, torch_plans.ChunkPrinter):
    """Plan chunk: the torch plan's module, the chunkwise form Triton kernels
    (rcc/runtime/triton/chunk_gla.py, chunk_delta.py, dplr.py; maxplus.py for a max-plus state
    computed first)."""

    def __init__(self, form, source_name=""):
        super().__init__(form, source_name)
        if form.kind == "linear":
            K = form.cell.states[[d.name for d in form.cell.states].index(form.state)].shape[-2]
            launches = dict(kernels="linear_attention", state=form.state, extra_values=len(form.folded),
                            scalar_decay=form.cell.node(form.log_decay).type.shape[-1:] != (K,),
                            prev=bool(form.readouts[0].prev))
        elif form.kind == "dplr":
            launches = dict(kernels="dplr", state=form.state, n_h=len(form.steps),
                            scalar_decay=form.cell.node(form.steps[0].log_decay).type.shape[-1] == 1)
        else:
            launches = dict(kernels="delta_rule", state=form.state, n_h=len(form.keys))
        if form.maxplus:  # the stabiliser's scan runs first (rcc/runtime/triton/maxplus.py)
            launches["maxplus"] = True
        self.class_attrs = self.class_attrs + [
            f"    CHUNK_KERNELS = {launches!r}  # what the Triton kernels run (for rcc precompile)"]


class GridChunkPrinter(TritonModule, GraphPrinter):
    """Plan chunk over grid2d: the torch graph module (the cell's body over every node at once,
    torch ops, as the sequence plans' gates), its solve of the affine form (pLSTM's chunks and the
    wavefront over them) Triton kernels (rcc/runtime/triton/grid.py)."""
    imports = ()  # no kernel is printed into this module: it calls rcc.runtime.triton's

    def __init__(self, cell: ir.CellIR, source_name: str = ""):
        super().__init__(cell, source_name, "chunk")
        self.class_attrs = self.class_attrs + [
            "    SOLVE = staticmethod(_rtt.grid_solve)  # the states, chunk by chunk: Triton kernels"]


def print_module(cell: ir.CellIR, source_name: str = "", plan: str = "sequential",
                 analysis=None) -> str:
    if plan == "sequential":
        return TritonPrinter(cell, source_name).module()
    if analysis is None:
        from rcc.passes.analysis import analyze_ir
        analysis = analyze_ir(cell)
    return torch_plans.print_plan(cell, plan, analysis, source_name, printers={
        "scan": ScanPrinter, "newton": NewtonPrinter, "chunk": ChunkPrinter})
