"""Numbers as text for the Markdown tables and reports: one value, or a mean ± std over seeds;
text made safe inside a Markdown table cell."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from typing import Any


def markdown_cell(text: Any) -> str:
    """Text safe inside a Markdown table cell (``|`` escaped, newlines flattened)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def format_value(value: Any, digits: int = 3, *, missing: str = "n/a", nan: str = "n/a") -> str:
    """One table cell: a float (NumPy floats included) with ``digits`` decimals, ``nan`` for a
    float NaN, ``missing`` for None and ``str(value)`` for anything else (ints, strings)."""
    if isinstance(value, float):
        return nan if math.isnan(value) else f"{value:.{digits}f}"
    return missing if value is None else str(value)


def format_mean_std(
    values: Iterable[float], digits: int = 2, *, scale: float = 1.0, show_n: bool = False
) -> str:
    """``mean ± std`` of ``values`` (sample std) times ``scale``, with ``digits`` decimals: the
    mean alone for one value, ``"–"`` for none; ``show_n`` appends ``" (n=<count>)"``."""
    values = list(values)
    if not values:
        return "–"
    mean = statistics.fmean(values) * scale
    n = f" (n={len(values)})" if show_n else ""
    if len(values) == 1:
        return f"{mean:.{digits}f}{n}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}{n}"
