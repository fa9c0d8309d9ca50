"""Human units on the command line: durations (``7d``, ``12h``, ``30m``, ``90s``) and sizes
(``64K``, ``1M``, ``50M``; binary multiples). Errors name the text that was wrong."""

from __future__ import annotations

import re

from p2v.errors import UsageError

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION_RE = re.compile(r"(\d+)\s*([smhdw])", re.IGNORECASE)
_SIZE_RE = re.compile(r"(\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)


def parse_duration(text: str, *, what: str = "duration") -> int:
    """Seconds in ``text``: a number and a unit (s, m, h, d, w), or several (``1d12h``).

    A bare number is seconds. Zero and negative durations are refused.
    """
    raw = text.strip()
    if raw.isdigit():
        seconds = int(raw)
    else:
        pos, seconds = 0, 0
        for m in _DURATION_RE.finditer(raw):
            if m.start() != pos:
                break
            seconds += int(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
            pos = m.end()
        if pos != len(raw) or not raw:
            raise UsageError(
                f"{what} {text!r} is not a duration", hint="use a number and a unit: 90s, 30m, 12h, 7d, 2w"
            )
    if seconds <= 0:
        raise UsageError(f"{what} {text!r} must be longer than zero")
    return seconds


def parse_size(text: str, *, what: str = "size") -> int:
    """Bytes in ``text``: a number with an optional binary unit (K, M, G, T; ``KiB``/``KB`` too).

    A bare number is bytes. Zero is refused.
    """
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise UsageError(f"{what} {text!r} is not a size", hint="use a number and a unit: 4096, 64K, 1M, 50M, 2G")
    value = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if value <= 0:
        raise UsageError(f"{what} {text!r} must be larger than zero")
    return value


def format_duration(seconds: float) -> str:
    """A short reading of a duration: ``45s``, ``12m``, ``3h20m``, ``2d4h``."""
    s = round(seconds)
    if s < 0:
        return "-" + format_duration(-s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s % 60 else f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m:02d}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if h else f"{d}d"


def format_size(size: int) -> str:
    """Binary units with one decimal: ``512B``, ``64.0K``, ``1.5G``."""
    value = float(size)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            return f"{int(value)}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")
