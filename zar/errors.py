"""zar's exceptions: plain Python, each with the exit code it ends the process with.

Nothing here knows about click: ``zar.cli`` alone turns them into one-line messages.
"""

QUOTE_LIMIT = 200  # characters of user input an error message repeats


def quote(value: object) -> str:
    """``repr(value)`` cut to QUOTE_LIMIT characters: a message quotes the culprit, not a whole file."""
    text = repr(value)
    return text if len(text) <= QUOTE_LIMIT else f"{text[: QUOTE_LIMIT - 15]}... ({len(text)} chars)"


def clip(text: object) -> str:
    """``str(text)`` cut to QUOTE_LIMIT characters, for paths and names typed by the user."""
    text = str(text)
    return text if len(text) <= QUOTE_LIMIT else f"{text[: QUOTE_LIMIT - 15]}... ({len(text)} chars)"


class ZarException(Exception):
    """Any failure zar explains itself: its message is the one line the user reads.

    ``UserError`` is the user's mistake (exit 2); the others are what happened to a run that
    was set up right (it failed, was interrupted or pruned).
    """

    exit_code = 1

    @property
    def message(self) -> str:
        return str(self)


class UserError(ZarException):
    """A user mistake (a bad name, value, path or run id): exit code 2."""

    exit_code = 2


class DataError(UserError):
    """The data cannot be used as given (missing folder, unreadable images, too few classes)."""


class TrainingFailed(ZarException):
    """Training ran and failed (diverged, or a study's child failed): exit code 1.

    ``reason`` is what the run's ``zar.error`` tag says, when it differs from the message;
    ``tags`` are set on the run before it is closed.
    """

    exit_code = 1

    def __init__(self, message: str, reason: str | None = None, tags: dict[str, str] | None = None):
        super().__init__(message)
        self.reason = reason or message
        self.tags = tags or {}


class Interrupted(ZarException):
    """Stopped by a signal (Ctrl-C, SIGTERM, SIGHUP): exit code 130."""

    exit_code = 130


class Pruned(ZarException):
    """A sweep's trial stopped by its pruner after ``epoch``: the run ends KILLED, tagged ``zar.pruned``."""

    exit_code = 1

    def __init__(self, epoch: int, value: float):
        super().__init__(f"pruned after epoch {epoch}: val_acc {100 * value:.2f}% is below earlier trials' median")
        self.epoch = epoch
        self.value = value


def describe(error: BaseException) -> str:
    """One line for a study's list of failures, a run's ``zar.error`` tag or the error the user reads:
    zar's own message, or the type and the first line that says something (never an empty line,
    whatever the message: empty, or starting with a newline)."""
    if isinstance(error, ZarException) and str(error).strip():
        return str(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    name = type(error).__name__
    return f"{name}: {lines[0]}" if lines else f"{name} (with no message)"
