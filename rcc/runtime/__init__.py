"""What generated modules may import: the CellModule base class and initializers (torch only)."""
from .module import (CellModule, from_torch, init_const, init_default, init_eye, init_normal,
                     init_orthogonal, init_uniform, init_xavier, span)
from . import cpp, ops, varlen
from .chunk import chunk_delta_rule, chunk_linear_attention
from .dplr import chunk_dplr
from .maxplus import maxplus_scan
from .graph import GraphCellModule
from .layout import batch_major, every_step, from_chunks, previous_steps, time_major, to_chunks
from .newton import newton_solve
from .scan import block_scan, linear_scan

__all__ = ["cpp", "ops", "varlen", "CellModule", "GraphCellModule", "from_torch", "init_const",
           "init_default", "init_eye", "init_normal", "init_orthogonal", "init_uniform",
           "init_xavier", "span", "batch_major",
           "every_step", "previous_steps", "time_major", "block_scan", "linear_scan",
           "chunk_delta_rule", "chunk_linear_attention", "chunk_dplr", "maxplus_scan",
           "from_chunks", "to_chunks", "newton_solve"]
