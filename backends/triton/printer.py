"""Backend 'triton': a Python module whose loop over time is a pair of generated Triton kernels.

The module is the torch printer's up to the loop (as backend cpp's): torch computes what reads no
state, then one launch of the forward kernel (kernel.py) runs every step; the backward kernel
runs them in reverse (rcc.runtime.triton). The kernels are printed into the module itself, as
Python code, so that a reader finds the whole cell in one file.
"""
from __future__ import annotations

from rcc import ir, plans
from rcc.backends.torch import plans as torch_plans
from rcc.backends.torch.printer import TorchPrinter

from ..loop import FusedLoopPrinter
from .kernel import PRELUDE, TileKernelPrinter


class TritonModule:
    """What every module of backend triton has: its imports, and its plans' kernels from
    rcc.runtime.triton."""
    backend = "triton"
    needs = "torch, triton and rcc.runtime only"
    imports = ("import triton", "import triton.language as tl", "")
    runtime_imports = ("from rcc.runtime import triton as _rtt",)
    kernels = "_rtt"


class TritonPrinter(TritonModule, FusedLoopPrinter, TorchPrinter):
    """Plan sequential: the loop over time as generated kernels."""

    def __init__(self, cell: ir.CellIR, source_name: str = ""):
        super().__init__(cell, source_name, "sequential")
        self.kernel = TileKernelPrinter(cell)
        self._fused_init(self.kernel.part)
        self.kernel_source = self.kernel.source()
        name = self.kernel.name
        self.kernels = f"({name}_forward, {name}_backward)"
        self.meta = f"{name}_meta"
        self.class_attrs = [
            "",
            "    def __init__(self, *args, **kwargs):",
            "        super().__init__(*args, **kwargs)",
            f"        self._meta = {self.meta}(self.dims)  # the kernels' constexprs for these dims",
        ]

    def module(self) -> str:
        return "\n".join([
            super().module(),
            "# ---- the loop over time: Triton kernels (backends/triton/kernel.py) " + "-" * 20,
            PRELUDE.strip("\n"), "", "",
            self.kernel_source, "",
            *self.kernel.meta_source(self.meta), ""])

    def _run_call(self, args, consts, states, shapes):
        return [
            "        # every step in the Triton kernel: what it reads per step, once, and the states",
            f"        _outs, _finals = _rtt.run({self.kernels}, self._meta, _T, _N,",
            f"            {args},",
            f"            {consts},",
            f"            {states}, {shapes})",
        ]


class ScanPrinter(TritonModule, torch_plans.ScanPrinter):
    """Plan scan: the torch plan's module, its linear scans Triton kernels (rcc/runtime/triton/scan.py)."""


class NewtonPrinter(TritonModule, torch_plans.NewtonPrinter):
    """Plan newton: the torch plan's module, each iteration's scan a Triton kernel."""


class ChunkPrinter(TritonModule, torch_plans.ChunkPrinter):
    """Plan chunk: the torch plan's module, the chunkwise form a Triton kernel pair
    (rcc/runtime/triton/chunk.py)."""


def print_module(cell: ir.CellIR, source_name: str = "", plan: str = "sequential",
                 analysis=None) -> str:
    if plan == "sequential":
        return TritonPrinter(cell, source_name).module()
    if analysis is None:
        from rcc.passes.analysis import analyze_ir
        analysis = analyze_ir(cell)
    if plan == "scan":
        return ScanPrinter(plans.scan_form(cell, analysis), source_name).module()
    if plan == "newton":
        return NewtonPrinter(plans.newton_form(cell, analysis), source_name).module()
    if plan == "chunk":
        try:
            form = plans.chunk_form(cell)
        except plans.NotChunkable as e:
            raise plans.illegal("chunk", analysis, cell, str(e)) from None
        return ChunkPrinter(form, source_name).module()
    raise NotImplementedError(f"backend 'triton': no plan {plan!r}")
