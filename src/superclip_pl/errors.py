"""The errors a user can fix (``superclip`` prints them in one line, exit status 2 or 1), apart from
``ValueError`` and ``OSError`` that the library raises for bad values and paths."""


class UserError(ValueError):
    """A usage or configuration mistake: the message names the key, the value and the fix."""


class BadDataStop(RuntimeError):
    """Training stopped because too many samples were unusable (a failed run: exit status 1); the
    message says where the checkpoint written before stopping is."""


class SignalStop(RuntimeError):
    """Training stopped on SIGTERM / SIGINT at the end of an optimizer step, after saving ``checkpoint``
    (exit status 128 + ``signum``, the shell's code for a process ended by that signal). Every rank
    raises it; ``quiet`` on all but rank 0, so that the line is printed once."""

    def __init__(self, signum: int, step: int, checkpoint: str, quiet: bool = False) -> None:
        import signal

        self.signum, self.step, self.checkpoint, self.quiet = signum, step, checkpoint, quiet
        self.name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.name} at step {step}; the model is saved to {checkpoint}")


class DivergedStop(RuntimeError):
    """Training stopped because too many consecutive steps had a non-finite loss or gradients (a failed
    run: exit status 1); the message says where the checkpoint of the last finite state is."""
