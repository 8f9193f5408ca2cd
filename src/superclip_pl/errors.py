"""The errors a user can fix (``superclip`` prints them in one line, exit status 2 or 1), apart from
``ValueError`` and ``OSError`` that the library raises for bad values and paths."""


class UserError(ValueError):
    """A usage or configuration mistake: the message names the key, the value and the fix."""


class BadDataStop(RuntimeError):
    """Training stopped because too many samples were unusable (a failed run: exit status 1); the
    message says where the checkpoint written before stopping is."""
