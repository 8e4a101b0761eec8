"""Backend triton's runtime: what generated modules call (as `_rtt`).

common.py: devices, dtypes and autotuning; loop.py: the generated loop-over-time kernels'
launcher with gradients (plan sequential); units.py: the same, tiled over hidden units; scan.py:
the linear and block scans (plans scan and newton); chunk_gla.py: chunkwise gated linear
attention, chunk_delta.py: the gated delta rule / DeltaProduct, dplr.py: diagonal-plus-
rank-one steps (plan chunk); maxplus.py: the stabiliser's max-plus scan before them; grid.py:
pLSTM's 2D parallel form (plan chunk over grid2d).
"""
from ...errors import require_triton

require_triton()  # a clear error naming the extra, before the kernels' own `import triton`

from .chunk_delta import chunk_delta_rule
from .dplr import chunk_dplr
from .chunk_gla import chunk_linear_attention
from .common import check, interpreted, tuned
from .grid import grid_solve
from .maxplus import maxplus_scan
from .loop import over_rows, run, value_block
from .units import run as run_units
from .scan import block_adjoint, block_scan, linear_adjoint, linear_scan

__all__ = ["check", "interpreted", "tuned", "run", "run_units", "over_rows", "value_block",
           "linear_scan", "block_scan", "linear_adjoint", "block_adjoint", "chunk_linear_attention",
           "chunk_delta_rule", "chunk_dplr", "grid_solve", "maxplus_scan"]
