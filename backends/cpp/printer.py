"""Backend 'cpp': a Python module whose loop over time is a generated C++ kernel.

The module is the torch printer's, up to the loop: torch computes what reads no state (the input
projections, as one GEMM over the sequence; the params' expressions), then one call runs the
kernel (kernel.py) over every step, with gradients. The C++ source is held in the module and
built for the dims of each instance (rcc.runtime.cpp).
"""
from __future__ import annotations

from rcc import ir
from rcc.backends.torch.printer import TorchPrinter

from ..loop import FusedLoopPrinter, LoopPartition
from .kernel import KernelPrinter


class CppPrinter(FusedLoopPrinter, TorchPrinter):
    backend = "cpp"
    needs = "torch and rcc.runtime only (and a C++ compiler)"

    def __init__(self, cell: ir.CellIR, source_name: str = ""):
        super().__init__(cell, source_name, "sequential")
        self._fused_init(LoopPartition(cell))
        self.kernel = KernelPrinter(cell)
        dims = ", ".join(f"self.dims[{d.name!r}]" for d in cell.dims)
        self.class_attrs = [
            "",
            "    def __init__(self, *args, **kwargs):",
            "        super().__init__(*args, **kwargs)",
            "        # built now for these dims and the default dtype (a second), or found in the cache",
            "        self._kernel().build(torch.get_default_dtype())",
            "",
            "    def _kernel(self):",
            f"        return _rt.cpp.kernel(CPP_SOURCE, ({dims}{',' if len(cell.dims) == 1 else ''}))",
        ]

    def module(self) -> str:
        source = self.kernel.source()
        assert '"""' not in source and "\\" not in source  # held in a raw string below
        return (super().module() + "\n\n# The loop over time, built by rcc.runtime.cpp with the "
                "dims as RCC_DIM0, RCC_DIM1, ... (in DIMS order).\n"
                f'CPP_SOURCE = r"""{source}"""\n')

    def _run_call(self, args, consts, states, shapes):
        return [
            "        # every step in the C++ kernel: what it reads per step, once, and the states",
            "        _outs, _finals = _rt.cpp.run(self._kernel(), _T, _N,",
            f"            {args},",
            f"            {consts},",
            f"            {states}, {shapes})",
        ]


def print_module(cell: ir.CellIR, source_name: str = "") -> str:
    return CppPrinter(cell, source_name).module()
