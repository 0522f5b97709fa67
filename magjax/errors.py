"""The one exception type for a user's mistake, as opposed to a bug in magjax.

A ``UserError`` says what is wrong with something the user gave (a file, a record, a config
field, a flag) and names it; the command-line entry points print its message as one line and
exit non-zero, while any other exception is a bug and keeps its traceback. It subclasses
``ValueError`` so that callers catching bad input as ``ValueError`` keep working.
"""


class UserError(ValueError):
    """Bad input from the user: the message names the file, record or field and what was
    expected."""
