"""What generated modules may import: the CellModule base class and initializers (torch only)."""
from .module import (CellModule, from_torch, init_const, init_default, init_eye, init_normal,
                     init_orthogonal, init_uniform, init_xavier, span)

__all__ = ["CellModule", "from_torch", "init_const", "init_default", "init_eye", "init_normal",
           "init_orthogonal", "init_uniform", "init_xavier", "span"]
