"""Layers that the pass inserts. No torch.fx here."""

from spd_rewrite.ops.space_to_depth import ChannelOrder, SpaceToDepth, space_to_depth

__all__ = ["ChannelOrder", "SpaceToDepth", "space_to_depth"]
