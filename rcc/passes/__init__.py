"""IR passes, run in the order of PIPELINE; each takes and returns a verified CellIR."""
from __future__ import annotations

from .. import ir
from .checks import check_names
from .dead_code import eliminate_dead_code
from .generalize import general_of, remember
from .topology import merge_predecessor_forms

PIPELINE = (check_names, merge_predecessor_forms, eliminate_dead_code)


def run_pipeline(cell: ir.CellIR) -> ir.CellIR:
    general = general_of(cell)
    for p in PIPELINE:
        cell = p(cell)
        ir.verify(cell)
    if general is not None:  # the analysis reads the general form of the cell the passes give
        remember(cell, run_pipeline(general))
    return cell
