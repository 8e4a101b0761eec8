"""Backend 'cpp': a Python module whose loop over time is a generated C++ kernel.

The module is the torch printer's, up to the loop: torch computes what reads no state (the input
projections, as one GEMM over the sequence; the params' expressions), then one call runs the
kernel (kernel.py) over every step, with gradients. The C++ source is held in the module and
built for the dims of each instance (rcc.runtime.cpp).
"""
from __future__ import annotations

from rcc import ir
from rcc.backends.torch.printer import TorchPrinter, _tuple

from ..loop import FusedLoopPrinter, LoopPartition
from .kernel import KernelPrinter


class CppKernelMethods:
    """What a module whose kernel is C++ adds to the printed module: building the kernel when
    the module is made, `_kernel()`, and the source (`_kernel_source()`) as CPP_SOURCE."""

    def _kernel_methods(self) -> list:
        dims = ", ".join(f"self.dims[{d.name!r}]" for d in self.cell.dims)
        return [
            "",
            "    def __init__(self, *args, **kwargs):",
            "        super().__init__(*args, **kwargs)",
            "        # the forward built now for these dims and the default dtype (half a second), or",
            "        # found in the cache; the backward when a call first needs it",
            "        self._kernel().build(torch.get_default_dtype())",
            "",
            "    def _kernel(self):",
            f"        return _rt.cpp.kernel(CPP_SOURCE, ({dims}{',' if len(self.cell.dims) == 1 else ''}))",
        ]

    def module(self) -> str:
        source = self._kernel_source()
        assert '"""' not in source and "\\" not in source  # held in a raw string below
        return (super().module() + "\n\n# The kernel, built by rcc.runtime.cpp with the dims as "
                "RCC_DIM0, RCC_DIM1, ... (in DIMS order).\n"
                f'CPP_SOURCE = r"""{source}"""\n')


class CppPrinter(CppKernelMethods, FusedLoopPrinter, TorchPrinter):
    backend = "cpp"
    needs = "torch and rcc.runtime only (and a C++ compiler)"
    module_as_op = False  # its loop is an op under torch.compile (rcc.runtime.ops.cpp_loop)

    def __init__(self, cell: ir.CellIR, source_name: str = ""):
        super().__init__(cell, source_name, "sequential")
        # a second entry point computes everything per step, for a few rows without gradients
        self.whole_step = LoopPartition(cell, hoist=False)
        self._fused_init(LoopPartition(cell), self.whole_step.const)
        self.kernel = KernelPrinter(cell)
        self.class_attrs = self._kernel_methods()

    def _kernel_source(self) -> str:
        return self.kernel.source(KernelPrinter(self.cell, hoist=False))

    def _kernel_entries(self):
        return {"run": self.part, "whole": self.whole_step}

    def _whole_step_call(self, seq):
        c, part = self.cell, self.whole_step
        assert all(c.node(i).op == "input" for i in part.seq)  # the kernel computes the rest
        args = [seq[c.node(i).attr("name")] for i in part.seq]
        consts = [self._ref(i) for i in part.const]
        states = [self.decl_names[s.name] for s in c.states]
        shapes = [self._shape(c.node(v).type.shape) for _, v, _ in c.outputs]
        return [
            "        if _rt.cpp.few_rows(_N, _T):",
            "            # a few rows without gradients (decoding): one call computes everything,",
            "            # the projections of the inputs too (a GEMM would cost more than it saves)",
            "            _outs, _finals = _rt.cpp.whole_steps(self._kernel(), _T, _N,",
            f"                {_tuple(args)},",
            f"                {_tuple(consts)},",
            f"                {_tuple(states)}, {_tuple(shapes)},",
            f"                {self.built_for['whole']})",
            "            return self._result(_outs, _finals, _layout, output_final_state)",
        ]

    def _run_call(self, args, consts, states, shapes, built_for):
        return [
            "        # every step in the C++ kernel: what it reads per step, once, and the states",
            "        _outs, _finals = _rt.cpp.run(self._kernel(), _T, _N,",
            f"            {args},",
            f"            {consts},",
            f"            {states}, {shapes},",
            f"            {built_for})",
        ]


def print_module(cell: ir.CellIR, source_name: str = "") -> str:
    return CppPrinter(cell, source_name).module()
