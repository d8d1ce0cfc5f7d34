"""The one exception type for mistakes a user can fix (bad input, missing model or data), and the
one place that turns it into what a command prints."""

from __future__ import annotations

from collections.abc import Callable


class TaxonError(Exception):
    """A user-fixable problem. The CLI prints its message as one line and exits with status 2.

    The message must name the problem and the fix, e.g.
    "unknown dataset 'foo': run `taxon data list` to see the known cards".
    """


def guarded(fn: Callable[[], object]) -> int:
    """Run a command's body: a TaxonError becomes one line on stderr and exit status 2;
    otherwise the body's int return value, or 0."""
    try:
        result = fn()
    except TaxonError as e:
        from rich.console import Console

        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        return 2
    return result if isinstance(result, int) else 0
