"""Checks that need the whole cell: names that would clash with torch.nn.Module attributes."""
from __future__ import annotations

import torch

from .. import ir
from ..errors import CompileError

# an instance's dir, so attributes set in __init__ (`training`) count too
_MODULE_ATTRS = set(dir(torch.nn.Module())) | {"dims", "shapes", "CELL", "DIMS", "STATIC_DIMS",
                                                "INPUTS", "STATES", "OUTPUTS", "reset_parameters",
                                                # a graph cell's (rcc.runtime.graph)
                                                "TOPOLOGY", "SLOTS", "PAIRS", "EDGE_STATES",
                                                "PLAN", "chunk_size",
                                                # the plans' settings and results, plan auto's
                                                "max_iter", "tol", "last_stats", "last_plan",
                                                "last_estimates", "PLAN_CLASSES", "PLAN_FACTS",
                                                "RCC_CODE"}


def check_names(cell: ir.CellIR) -> ir.CellIR:
    for p in cell.params:
        if p.name in _MODULE_ATTRS or p.name.startswith("_"):
            raise CompileError(f"param '{p.name}' clashes with an attribute of the generated "
                               "torch.nn.Module; rename it", p.span)
    if not cell.outputs:
        raise CompileError(f"cell '{cell.name}' has no output: add `output y = ...`", cell.span)
    return cell
