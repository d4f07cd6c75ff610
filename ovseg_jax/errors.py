"""Exceptions shared by the package's command-line tools.

A `UsageError` is an expected, user-fixable problem (a missing file, a bad flag, a checkpoint that does not
fit the model): the CLIs print it as one `error: ...` line, with no traceback. It is a `ValueError`, so code
that already catches bad values catches it too. Everything else is a bug and keeps its traceback.
"""


class UsageError(ValueError):
  """An expected, user-fixable problem: printed as one line, no traceback."""
