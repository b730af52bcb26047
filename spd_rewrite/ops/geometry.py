"""Layout of an SPD replacement along one spatial axis.

A window op (conv or pool) with kernel ``k``, stride ``s``, padding ``p``, dilation ``d`` reads, for
output ``i`` and tap ``t``, input element ``s*i + d*t - p``. After space-to-depth with scale ``s``
the same element sits in block ``b`` at phase ``r`` with ``s*b + r = s*i + d*t - p``, so a stride-1
op over the blocks can read it. :func:`plan_axis` picks, per axis, the stride-1 kernel size, the
symmetric zero padding of that op, and how the SPD layer pads or crops its input, so that:

* the stride-1 op returns exactly the original output size for every input size;
* every input element that the original op reads survives the SPD crop (when ``fits_taps``, each
  original tap has a place in the new kernel, which is what exact weight transfer needs).

No torch.fx here: these are plain integers.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AxisLayout", "WindowAxis", "plan_axis"]

# Input sizes checked by ``_keeps_every_read``. The layout is periodic in the input size modulo the
# stride once the size exceeds the kernel span, so a few periods past the span cover every size.
_CHECK_PERIODS = 4


@dataclass(frozen=True)
class WindowAxis:
    """One spatial axis of a strided window op, as PyTorch defines it."""

    kernel: int
    stride: int
    padding: int = 0
    dilation: int = 1
    ceil_mode: bool = False

    @property
    def span(self) -> int:
        """Distance from the first to the last tap, plus one."""
        return self.dilation * (self.kernel - 1) + 1

    def output_size(self, size: int) -> int:
        """Return the op's output size for an input of ``size`` elements (PyTorch's formula)."""
        numerator = size + 2 * self.padding - self.span
        if not self.ceil_mode:
            return numerator // self.stride + 1

        out = -(-numerator // self.stride) + 1
        # PyTorch drops a last window that would start inside the right padding.
        if (out - 1) * self.stride >= size + self.padding:
            out -= 1
        return out

    def tap_offsets(self) -> list[int]:
        """Input offset ``d*t - p`` of each tap ``t``, relative to ``s*i``."""
        return [self.dilation * t - self.padding for t in range(self.kernel)]


@dataclass(frozen=True)
class AxisLayout:
    """Layout of one axis of the SPD + stride-1 replacement.

    The SPD layer prepends ``pad_before`` padding elements, then pads or crops the end so that it
    emits ``(size + block_offset) // scale`` blocks. The stride-1 op after it has kernel ``kernel``
    and symmetric zero padding ``padding``.
    """

    scale: int
    kernel: int
    padding: int
    pad_before: int
    block_offset: int
    fits_taps: bool
    # Block index (in the stride-1 kernel) and phase of each original tap.
    taps: tuple[tuple[int, int], ...]

    def blocks(self, size: int) -> int:
        """Return how many SPD blocks the layer emits for ``size`` input elements."""
        return (size + self.block_offset) // self.scale


def plan_axis(axis: WindowAxis, kernel: int | None) -> AxisLayout:
    """Lay out one axis of the replacement for ``axis``.

    Args:
        axis: the original op along this axis.
        kernel: the stride-1 kernel size, or ``None`` for the smallest one that holds every tap.

    The original taps are centred in the new kernel where it has room, like "same" padding; the
    stride-1 op takes as much of the padding as keeps the output size exact, and the SPD layer
    takes the rest.
    """
    scale = axis.stride
    block_of_tap = [offset // scale for offset in axis.tap_offsets()]
    first_block, last_block = min(block_of_tap), max(block_of_tap)
    if kernel is None:
        kernel = last_block - first_block + 1

    # Blocks of padding before the taps: centred like "same" padding, but never cutting a tap off.
    left = max((kernel - 1) // 2, -first_block)
    if last_block + left > kernel - 1:
        left = max(kernel - 1 - last_block, 0)
    fits_taps = first_block + left >= 0 and last_block + left <= kernel - 1

    taps = tuple(
        ((offset + scale * left) // scale, (offset + scale * left) % scale)
        for offset in axis.tap_offsets()
    )

    # The stride-1 op pads `padding` blocks on both sides; the SPD layer adds the rest on the left.
    for padding in range(left, -1, -1):
        pad_before = scale * (left - padding)
        # The op's output size is blocks + 2*padding - kernel + 1; solve for blocks = Hout + c.
        constant = kernel - 1 - 2 * padding
        first_guess = _block_offset(axis, constant)
        # In ceil mode PyTorch drops a last window that starts in the right padding. That can
        # shift the output size by one for some sizes modulo the stride, so try nearby offsets.
        nearby = range(first_guess - scale, first_guess + scale + 1) if axis.ceil_mode else ()
        for block_offset in [first_guess, *(o for o in nearby if o != first_guess)]:
            layout = AxisLayout(scale, kernel, padding, pad_before, block_offset, fits_taps, taps)
            if _keeps_every_read(axis, layout):
                return layout

    raise ValueError(
        f"no space-to-depth layout reproduces the output size of kernel {axis.kernel}, "
        f"stride {axis.stride}, padding {axis.padding}, dilation {axis.dilation}, "
        f"ceil_mode {axis.ceil_mode} for every input size"
    )


def _block_offset(axis: WindowAxis, constant: int) -> int:
    """Return ``o`` with ``(size + o) // scale == output_size(size) + constant`` for every size."""
    # output_size = (size + 2p - span [+ s - 1]) // s + 1 without the ceil-mode drop, which
    # ``_keeps_every_read`` rejects when it matters.
    numerator_shift = 2 * axis.padding - axis.span
    if axis.ceil_mode:
        numerator_shift += axis.stride - 1
    return numerator_shift + axis.stride * (1 + constant)


def _keeps_every_read(axis: WindowAxis, layout: AxisLayout) -> bool:
    """Check that, for every input size, output sizes agree and no element read is cropped."""
    scale = axis.stride
    last_tap = axis.tap_offsets()[-1]
    start = max(1, axis.span - 2 * axis.padding)
    stop = start + _CHECK_PERIODS * scale * max(layout.kernel, axis.kernel) + scale

    for size in range(start, stop):
        out = axis.output_size(size)
        if out < 1:
            continue
        blocks = layout.blocks(size)
        if blocks + 2 * layout.padding - layout.kernel + 1 != out:
            return False

        last_read = min(size - 1, scale * (out - 1) + last_tap)
        kept = blocks * scale - layout.pad_before
        if last_read >= kept:
            return False
    return True
