"""Per-position divisor fix-up for an average pool rebuilt as SPD + stride-1 conv.

A stride-1 conv divides every window sum by one constant. PyTorch's average pool does not when
``count_include_pad=False`` meets padding, or when ``ceil_mode`` lets the last window run past the
right padding. :class:`AvgPoolDivisorCorrection` rescales the conv output by
``weight_divisor / divisor(position)``, the divisor computed from the pool's input size with
``arange`` and elementwise arithmetic, no strided op. No torch.fx here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["AvgPoolDivisorCorrection", "avg_pool_divisors"]


def avg_pool_divisors(
    input_size: int,
    output_size: int,
    kernel: int,
    stride: int,
    padding: int,
    count_include_pad: bool,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Return, along one axis, the number of elements PyTorch's average pool divides by per output.

    PyTorch clips each window ``[i*stride - padding, i*stride - padding + kernel)`` to
    ``[-padding, input_size + padding)``. Without ``count_include_pad`` it clips it further to
    ``[0, input_size)``. The divisor of a box window is the product of these per-axis counts.

    Returns:
        An int64 tensor of ``output_size`` counts.
    """
    start = torch.arange(output_size, device=device) * stride - padding
    end = torch.clamp(start + kernel, max=input_size + padding)
    if count_include_pad:
        return end - start
    return torch.clamp(end, max=input_size) - torch.clamp(start, min=0)


class AvgPoolDivisorCorrection(nn.Module):
    """Rescale a stride-1 conv output to an average pool's per-position divisor.

    Put it after the stride-1 conv whose weight averaged with ``weight_divisor`` (from
    ``spd_avg_pool_weight``). ``forward(y, x)`` takes that conv's output ``y`` and the pool's
    original input ``x``, of which only the spatial size is read, because the output size alone
    does not fix the input size that the divisor depends on.

    A pool with ``divisor_override`` needs no correction: PyTorch then divides by the override
    everywhere, which the conv weight already does, and this module does not model it.
    """

    def __init__(
        self,
        kernel: Sequence[int],
        stride: Sequence[int],
        padding: Sequence[int],
        count_include_pad: bool,
        weight_divisor: float,
    ) -> None:
        super().__init__()
        self.kernel = tuple(int(k) for k in kernel)
        self.stride = tuple(int(s) for s in stride)
        self.padding = tuple(int(p) for p in padding)
        if not len(self.kernel) == len(self.stride) == len(self.padding):
            raise ValueError(
                f"kernel {self.kernel}, stride {self.stride} and padding {self.padding} must "
                f"have one entry per spatial axis"
            )
        if len(self.kernel) not in (1, 2, 3):
            raise ValueError(f"expected 1, 2 or 3 spatial axes, got kernel {self.kernel}")
        self.count_include_pad = bool(count_include_pad)
        self.weight_divisor = float(weight_divisor)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        spatial = len(self.kernel)
        if y.dim() != spatial + 2 or x.dim() != spatial + 2:
            raise ValueError(
                f"expected batched {spatial}-d inputs, got output shape {tuple(y.shape)} and "
                f"pool input shape {tuple(x.shape)}"
            )

        # Multiply the per-axis counts into (1, 1, out1, ..., outn) by broadcasting.
        divisor = torch.ones((1, 1) + (1,) * spatial, dtype=y.dtype, device=y.device)
        for axis in range(spatial):
            counts = avg_pool_divisors(
                x.shape[2 + axis],
                y.shape[2 + axis],
                self.kernel[axis],
                self.stride[axis],
                self.padding[axis],
                self.count_include_pad,
                device=y.device,
            )
            shape = [1, 1] + [1] * spatial
            shape[2 + axis] = -1
            divisor = divisor * counts.to(y.dtype).reshape(shape)
        return y * (self.weight_divisor / divisor)

    def extra_repr(self) -> str:
        return (
            f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}, "
            f"count_include_pad={self.count_include_pad}, weight_divisor={self.weight_divisor:g}"
        )
