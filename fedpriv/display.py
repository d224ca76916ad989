"""How fedpriv's figures read for people: one rule for showing an epsilon, wherever it appears.

Tables, summaries, log lines, figure labels and the hospital's own refusal messages all show an
epsilon through :func:`format_epsilon`, so that no figure ever reads as reaching a budget it did not
reach, or as within one it passed. It depends on nothing of fedpriv's, so every stage may use it.
"""

from __future__ import annotations

import math
from typing import Any


def number(value: Any) -> float:
    """A numeric field as a float: None (unknown) as NaN, "inf" as infinity."""
    return math.nan if value is None else float(value)


def format_epsilon(value: Any, budget: Any = None) -> str:
    """An epsilon for people, the one rule every table, summary, log line and figure label uses.

    Four significant digits, and more where that is needed to keep the shown figure on the same side
    of the budget as the true one: 2.9951 spent of a budget of 3 reads "2.995", 2.99996 reads
    "2.99996" (never "3", which would say the budget was reached) and 3.00004 never reads "3" (which
    would hide that it was passed). Infinity (a non-private use) reads "inf", NaN (unknown) "nan".
    ``value`` and ``budget`` may be any numeric field of a run's files (None and "inf" included).
    """
    figure, limit = number(value), number(budget)
    if math.isnan(figure):
        return "nan"
    if math.isinf(figure):
        return "inf" if figure > 0 else "-inf"
    for digits in range(4, 18):
        text = f"{figure:.{digits}g}"
        shown = float(text)
        if not math.isfinite(limit) or ((shown < limit) == (figure < limit) and (shown > limit) == (figure > limit)):
            return text
    return repr(figure)
