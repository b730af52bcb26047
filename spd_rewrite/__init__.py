"""spd-rewrite: turn the strided convolutions and pooling of a CNN into SPD-Conv."""

from spd_rewrite.errors import SpdRewriteError
from spd_rewrite.ops.space_to_depth import SpaceToDepth, space_to_depth

__version__ = "0.1.0"

__all__ = ["SpaceToDepth", "SpdRewriteError", "__version__", "space_to_depth"]
