"""Backend 'cpp': a Python module whose loop over time is a generated C++ kernel.

The module is the torch printer's, up to the loop: torch computes what reads no state (the input
projections, as one GEMM over the sequence; the params' expressions), then one call runs the
kernel (kernel.py) over every step, with gradients. The C++ source is held in the module and
built for the dims of each instance (rcc.runtime.cpp).
"""
from __future__ import annotations

from rcc import ir
from rcc.backends.torch.printer import TorchPrinter, _tuple

from .kernel import KernelPrinter


class CppPrinter(TorchPrinter):
    backend = "cpp"

    def __init__(self, cell: ir.CellIR, source_name: str = ""):
        super().__init__(cell, source_name, "sequential")
        self.kernel = KernelPrinter(cell)
        # torch computes what the kernel reads and does not compute itself
        self.args = set(self.kernel.seq + self.kernel.const)
        self.live = ir.cone(cell.nodes, self.args)
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

    def _only_user_in(self, i, region) -> bool:
        # what the kernel reads gets a name: the kernel call passes it
        return i not in self.args and super()._only_user_in(i, region)

    def module(self) -> str:
        source = self.kernel.source()
        assert '"""' not in source and "\\" not in source  # held in a raw string below
        return (super().module() + "\n\n# The loop over time, built by rcc.runtime.cpp with the "
                "dims as RCC_DIM0, RCC_DIM1, ... (in DIMS order).\n"
                f'CPP_SOURCE = r"""{source}"""\n')

    def _forward(self, body):
        c, k = self.cell, self.kernel
        seq = {d.name: self.ns.new(d.name + "_seq") for d in c.inputs}
        shapes = [self._shape(c.node(v).type.shape) for _, v, _ in c.outputs]  # dims first
        lines = self._forward_head(body, seq)
        # batch-major (no copy of the inputs): the kernel reads any strides
        self._seq_values(body["seq"], seq, lines, time_major=False)
        args = []
        for i in k.seq:  # [T, N, ...] views
            n = c.node(i)
            if n.op == "input":
                args.append(f"{seq[n.attr('name')]}.transpose(0, 1)")
            else:
                ref = self._ref(i)
                args.append(f"{ref}.reshape(_N, _T, *{ref}.shape[1:]).transpose(0, 1)")
        consts = [self._ref(i) for i in k.const]
        states = [self.decl_names[s.name] for s in c.states]
        lines += [
            "        # every step in the C++ kernel: what it reads per step, once, and the states",
            "        _outs, _finals = _rt.cpp.run(",
            f"            self._kernel(), _T, _N, {_tuple(args)},",
            f"            {_tuple(consts)},",
            f"            {_tuple(states)}, {_tuple(shapes)})",
            "        return self._result(_outs, _finals, _layout)",
        ]
        return lines


def print_module(cell: ir.CellIR, source_name: str = "") -> str:
    return CppPrinter(cell, source_name).module()
