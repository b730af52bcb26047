"""spd-rewrite: turn the strided convolutions and pooling of a CNN into SPD-Conv.

    result = spd_rewrite.rewrite(model, example_inputs=torch.randn(1, 3, 64, 64), rules="paper")
    result.model   # the rewritten nn.Module (a torch.fx GraphModule in graph mode)
    result.report  # what was replaced, with shapes, parameters and FLOPs before and after
"""

from spd_rewrite.errors import (
    ChannelPropagationError,
    CheckpointError,
    InputShapeError,
    ModelForwardError,
    ModelSpecError,
    OutputFolderError,
    RuleDefinitionError,
    SpdRewriteError,
    TraceError,
    UnsupportedNodeError,
    VerificationError,
    WeightTransferError,
)
from spd_rewrite.io.saved_folder import load, save
from spd_rewrite.ops.blocks import ConvSPD, SPDConv, SPDMaxPool
from spd_rewrite.ops.space_to_depth import SpaceToDepth, space_to_depth
from spd_rewrite.pipeline import RewriteResult, rewrite
from spd_rewrite.report.record import RewriteReport
from spd_rewrite.rules.loader import builtin_rule_sets, load_rule_set
from spd_rewrite.rules.model import Rule, RuleSet

__version__ = "0.1.0"

__all__ = [
    "ChannelPropagationError",
    "CheckpointError",
    "ConvSPD",
    "InputShapeError",
    "ModelForwardError",
    "ModelSpecError",
    "OutputFolderError",
    "RewriteReport",
    "RewriteResult",
    "Rule",
    "RuleDefinitionError",
    "RuleSet",
    "SPDConv",
    "SPDMaxPool",
    "SpaceToDepth",
    "SpdRewriteError",
    "TraceError",
    "UnsupportedNodeError",
    "VerificationError",
    "WeightTransferError",
    "__version__",
    "builtin_rule_sets",
    "load",
    "load_rule_set",
    "rewrite",
    "save",
    "space_to_depth",
]
