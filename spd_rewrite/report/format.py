"""Number and shape formatting shared by the report's renderers."""

from __future__ import annotations

__all__ = ["format_count", "format_error", "format_shape"]


def format_count(value: int) -> str:
    """Return ``value`` with SI suffixes: ``11.69M``, ``1.82G``."""
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{suffix}"
    return str(value)


def format_shape(shape: tuple[int, ...] | None) -> str:
    """Return ``(1, 64, 56, 56)`` as ``1x64x56x56``."""
    if shape is None:
        return "?"
    return "x".join(str(size) for size in shape)


def format_error(value: float | None) -> str:
    """Return an absolute error in short scientific form."""
    return "-" if value is None else f"{value:.1e}"
