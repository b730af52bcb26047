"""The YOLOv5 training loss: anchor matching by shape, neighbour-cell assignment, CIoU, BCE.

For each output level with grid ``nx x ny`` and anchors ``a`` (in grid cells):

1. A target box (in grid cells) matches an anchor when ``max(w/a_w, a_w/w, h/a_h, a_h/h)`` is
   below ``anchor_threshold`` (4.0); one target can match several anchors.
2. Each match is assigned to the cell holding its centre and to the one or two neighbouring cells
   whose edge the centre is within half a cell of (not at the image border). The decoded centre
   ``2 * sigmoid(t) - 0.5`` spans (-0.5, 1.5) cells, so those neighbours can still reach it.
3. Box loss: ``1 - CIoU`` between the decoded box and the target, averaged over matches.
4. Objectness loss: BCE against a map that contains the (detached, clamped) CIoU at matched cells
   and 0 elsewhere, weighted per level by ``balance`` ([4.0, 1.0, 0.4] for P3, P4, P5).
5. Class loss: BCE of the class logits against one-hot targets (skipped for one class).

The gains follow YOLOv5's scaling: box ``0.05 * 3/nl``, objectness ``1.0 * (size/640)^2 * 3/nl``
and class ``0.5 * nc/80 * 3/nl``; the sum is multiplied by the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from spd_rewrite.errors import SpdRewriteError
from spd_rewrite.train.boxes import complete_iou

__all__ = ["YoloLoss", "find_detect_head"]

# Half a cell: how close a centre must be to a cell edge to be assigned to the neighbour too.
_NEIGHBOUR_MARGIN = 0.5
_BALANCE: dict[int, tuple[float, ...]] = {3: (4.0, 1.0, 0.4)}
# Cell shifts (dx, dy): own cell, left, up, right, down.
_SHIFTS = ((0, 0), (-1, 0), (0, -1), (1, 0), (0, 1))


def find_detect_head(model: nn.Module) -> nn.Module:
    """Return the submodule with YOLO's ``anchors`` and ``stride`` buffers and ``nc``/``na``/``nl``.

    Raises:
        SpdRewriteError: the model has no such submodule, so it is not a YOLO detector.
    """
    for module in model.modules():
        buffers = dict(module.named_buffers(recurse=False))
        if "anchors" in buffers and "stride" in buffers and hasattr(module, "nc"):
            return module
    raise SpdRewriteError(
        f"{type(model).__name__} has no Detect head (a module with 'anchors' and 'stride' "
        "buffers); detection training needs a YOLOv5 target"
    )


@dataclass(frozen=True)
class _Matches:
    image: torch.Tensor
    anchor: torch.Tensor
    row: torch.Tensor
    column: torch.Tensor
    box: torch.Tensor
    """(n, 4): centre relative to the assigned cell, then width and height, in cells."""
    anchor_size: torch.Tensor
    cls: torch.Tensor


class YoloLoss:
    """Compute the loss of a YOLOv5 ``Detect`` head's raw outputs (see the module docstring)."""

    def __init__(
        self,
        detect: nn.Module,
        image_size: int,
        *,
        box_gain: float = 0.05,
        obj_gain: float = 1.0,
        cls_gain: float = 0.5,
        anchor_threshold: float = 4.0,
        balance: tuple[float, ...] | None = None,
    ) -> None:
        self.anchors = detect.get_buffer("anchors")
        self.strides = detect.get_buffer("stride")
        self.num_classes = int(detect.nc)  # type: ignore[arg-type]
        levels = len(self.strides)
        # NOTE: only the 3-level weights are YOLOv5's; other level counts get equal weights.
        self.balance: tuple[float, ...] = balance or _BALANCE.get(levels, (1.0,) * levels)
        level_scale = 3 / levels
        self.box_gain = box_gain * level_scale
        self.cls_gain = cls_gain * self.num_classes / 80 * level_scale
        self.obj_gain = obj_gain * (image_size / 640) ** 2 * level_scale
        self.anchor_threshold = anchor_threshold

    def __call__(
        self, predictions: list[torch.Tensor], targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the total loss and its detached ``(box, obj, cls)`` parts.

        Args:
            predictions: raw maps ``(N, na, ny, nx, 5 + nc)``, one per level.
            targets: ``(M, 6)`` rows of image index, class, cx, cy, w, h as image fractions.
        """
        device = predictions[0].device
        box_loss = torch.zeros((), device=device)
        obj_loss = torch.zeros((), device=device)
        cls_loss = torch.zeros((), device=device)
        targets = targets.to(device=device, dtype=torch.float32)

        for level, raw in enumerate(predictions):
            raw = raw.float()
            matches = self._match(level, raw.shape[2], raw.shape[3], targets)
            objectness_target = torch.zeros(raw.shape[:4], device=device)
            if len(matches.image):
                picked = raw[matches.image, matches.anchor, matches.row, matches.column]
                centre = picked[:, :2].sigmoid() * 2 - 0.5
                size = (picked[:, 2:4].sigmoid() * 2).pow(2) * matches.anchor_size
                iou = complete_iou(torch.cat((centre, size), dim=1), matches.box)
                box_loss = box_loss + (1 - iou).mean()

                # NOTE: where two matches share a cell, the last write wins. Sorting makes that the
                # highest IoU on CPU, but CUDA does not promise an order for repeated indices.
                score = iou.detach().clamp(min=0)
                order = score.argsort()
                objectness_target[
                    matches.image[order],
                    matches.anchor[order],
                    matches.row[order],
                    matches.column[order],
                ] = score[order]

                if self.num_classes > 1:
                    one_hot = F.one_hot(matches.cls, self.num_classes).float()
                    cls_loss = cls_loss + F.binary_cross_entropy_with_logits(picked[:, 5:], one_hot)
            obj_loss = obj_loss + self.balance[level] * F.binary_cross_entropy_with_logits(
                raw[..., 4], objectness_target
            )

        parts = torch.stack(
            (box_loss * self.box_gain, obj_loss * self.obj_gain, cls_loss * self.cls_gain)
        )
        batch_size = predictions[0].shape[0]
        return parts.sum() * batch_size, parts.detach()

    def _match(self, level: int, rows: int, columns: int, targets: torch.Tensor) -> _Matches:
        device = targets.device
        stride = self.strides[level].to(device)
        # (na, 2) anchor sizes in cells.
        anchors = self.anchors[level].to(device=device, dtype=torch.float32) / stride
        grid_scale = torch.tensor(
            [columns, rows, columns, rows], device=device, dtype=torch.float32
        )
        boxes = targets[:, 2:6] * grid_scale

        # (na, M, 2) side ratios of each target to each anchor.
        ratio = boxes[None, :, 2:4] / anchors[:, None, :]
        shape_match = torch.max(ratio, 1 / ratio).amax(dim=2) < self.anchor_threshold
        anchor_index, target_index = shape_match.nonzero(as_tuple=True)
        boxes = boxes[target_index]

        centre = boxes[:, :2]
        from_far_edge = grid_scale[:2] - centre
        margin = _NEIGHBOUR_MARGIN
        # (5, n): whether each match also goes to the own/left/up/right/down cell.
        use_cell = torch.stack(
            (
                torch.ones_like(centre[:, 0], dtype=torch.bool),
                (centre[:, 0] % 1 < margin) & (centre[:, 0] > 1),
                (centre[:, 1] % 1 < margin) & (centre[:, 1] > 1),
                (from_far_edge[:, 0] % 1 < margin) & (from_far_edge[:, 0] > 1),
                (from_far_edge[:, 1] % 1 < margin) & (from_far_edge[:, 1] > 1),
            )
        )
        shift_index, match_index = use_cell.nonzero(as_tuple=True)
        shifts = torch.tensor(_SHIFTS, device=device, dtype=torch.float32)[shift_index]
        cell = (centre[match_index].floor() + shifts).long()
        column = cell[:, 0].clamp(0, columns - 1)
        row = cell[:, 1].clamp(0, rows - 1)
        cell_origin = torch.stack((column, row), dim=1).float()

        chosen = target_index[match_index]
        return _Matches(
            image=targets[chosen, 0].long(),
            anchor=anchor_index[match_index],
            row=row,
            column=column,
            box=torch.cat((centre[match_index] - cell_origin, boxes[match_index, 2:4]), dim=1),
            anchor_size=anchors[anchor_index[match_index]],
            cls=targets[chosen, 1].long(),
        )
