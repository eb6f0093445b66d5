"""The one parser of byte sizes ("64KB", "512MiB", "2GiB", "1048576"), for every size setting.

SI prefixes are decimal and the ``i`` forms binary, as usual: KB = 1000, KiB = 1024, MB = 1000**2,
MiB = 1024**2, and so on; a bare ``K``/``M``/``G``/``T`` is the SI prefix too. Case is ignored.
"""

from __future__ import annotations

import math
import re

_PREFIXES = "kmgt"
_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i)?)?b?")


def parse_size(value: int | float | str) -> int:
    """Bytes of ``value``: a whole number as it is (``50e6`` too, as LitServe accepts), or text such as
    ``"64KB"``, ``"1.5GiB"``, ``"100"``.

    Raises ``ValueError`` naming the accepted forms for anything else (negative, empty, ``"2XB"``).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"a size must be a number of bytes or text such as '512MiB', got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0 or not value.is_integer():
            raise ValueError(f"a size must be a whole, non-negative number of bytes, got {value!r}")
        return int(value)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    match = _SIZE.fullmatch(value.strip().lower())
    if match is None:
        raise ValueError(
            f"not a size: {value!r} (expected bytes, or a number with KB, MB, GB, TB (powers of 1000) "
            "or KiB, MiB, GiB, TiB (powers of 1024))"
        )
    number, prefix, binary = match.groups()
    base = 1024 if binary else 1000
    multiplier = base ** (_PREFIXES.index(prefix) + 1) if prefix else 1
    return round(float(number) * multiplier)
