"""What generated modules may import: the CellModule base class and initializers (torch only)."""
from .module import (CellModule, from_torch, init_const, init_default, init_eye, init_normal,
                     init_orthogonal, init_uniform, init_xavier, span)
from .layout import batch_major, every_step, previous_steps, time_major
from .scan import block_scan, linear_scan

__all__ = ["CellModule", "from_torch", "init_const", "init_default", "init_eye", "init_normal",
           "init_orthogonal", "init_uniform", "init_xavier", "span", "batch_major",
           "every_step", "previous_steps", "time_major", "block_scan", "linear_scan"]
