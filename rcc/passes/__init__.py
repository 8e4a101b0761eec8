"""IR passes, run in the order of PIPELINE; each takes and returns a verified CellIR."""
from __future__ import annotations

from .. import ir
from .checks import check_names
from .dead_code import eliminate_dead_code
from .topology import merge_predecessor_forms

PIPELINE = (check_names, merge_predecessor_forms, eliminate_dead_code)


def run_pipeline(cell: ir.CellIR) -> ir.CellIR:
    for p in PIPELINE:
        cell = p(cell)
        ir.verify(cell)
    return cell
