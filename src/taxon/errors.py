"""The one exception type for mistakes a user can fix (bad input, missing model or data)."""


class TaxonError(Exception):
    """A user-fixable problem. The CLI prints its message as one line and exits with status 2.

    The message must name the problem and the fix, e.g.
    "unknown dataset 'foo': run `taxon data list` to see the known cards".
    """
