"""Memory sizes written for people ("4GB", "500MB", "1.5GiB") parsed into bytes."""

from __future__ import annotations

import re

# Decimal units follow the SI (what disk and cloud vendors print); binary units have the "i".
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_memory(size: str | int) -> int:
    """``"4GB"`` → 4_000_000_000, ``"512MiB"`` → 536_870_912, an int → itself (bytes).

    Units: B, K/KB, M/MB, G/GB, T/TB (powers of 1000) and KiB, MiB, GiB, TiB (powers of 1024),
    case-insensitive. Raises ``ValueError`` for anything else, or for a size that is not positive.
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"a memory size must be a string like '4GB' or a number of bytes, got {size!r}")
    if isinstance(size, int):
        number = size
    else:
        match = _PATTERN.fullmatch(size)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"cannot read the memory size {size!r}: write a number and a unit, e.g. '4GB', '500MB', '2GiB'"
            )
        number = int(float(match.group(1)) * _UNITS[unit])
    if number <= 0:
        raise ValueError(f"a memory size must be positive, got {size!r}")
    return number


def format_bytes(size: float) -> str:
    """A byte count for humans: 1_234_567 → '1.2 MB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
