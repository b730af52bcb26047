"""Errors raised by spd-rewrite.

Every error derives from :class:`SpdRewriteError`. Its message is one line that names the offending
model, node, file or value and the fix. The CLI prints that line and exits with ``exit_code``:

* ``2``: the input is wrong (model spec, weights file, rule file, input shape, output folder);
* ``1``: the pass refused to emit a model (verification failed, channels could not be adjusted).
"""

from __future__ import annotations

__all__ = [
    "ChannelPropagationError",
    "CheckpointError",
    "InputShapeError",
    "ModelForwardError",
    "ModelSpecError",
    "OutputFolderError",
    "RuleDefinitionError",
    "SpdRewriteError",
    "TraceError",
    "UnsupportedNodeError",
    "VerificationError",
    "WeightTransferError",
]


class SpdRewriteError(Exception):
    """Base class of every error that spd-rewrite raises on purpose."""

    exit_code: int = 2


class ModelSpecError(SpdRewriteError):
    """A model spec could not be resolved to an ``nn.Module``."""


class CheckpointError(SpdRewriteError):
    """A weights file is missing, corrupt, unsafe to load, or does not fit the model."""


class RuleDefinitionError(SpdRewriteError):
    """A rule file or rule set is malformed."""


class InputShapeError(SpdRewriteError):
    """An example input shape is malformed or does not fit the model."""


class ModelForwardError(SpdRewriteError):
    """The user's model raised while running the example input."""


class TraceError(SpdRewriteError):
    """``torch.fx`` could not trace the model, even with leaf fallback."""


class OutputFolderError(SpdRewriteError):
    """An output folder exists, or writing or reading a saved folder failed."""


class UnsupportedNodeError(SpdRewriteError):
    """A matched node has a form that the replacement cannot reproduce."""

    exit_code = 1


class ChannelPropagationError(SpdRewriteError):
    """A channel change cannot be carried to the consumers of a widened tensor."""

    exit_code = 1


class WeightTransferError(SpdRewriteError):
    """Weights could not be carried over to the replacement layers."""

    exit_code = 1


class VerificationError(SpdRewriteError):
    """The rewritten model failed verification against the original on the example input."""

    exit_code = 1
