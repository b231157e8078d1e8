"""Typed errors raised by library code. Only cli.py turns them into messages and exit codes.

Every message is written for the user: what was wrong, where (file, line, recipe key), what was
expected, and how to fix it.
"""


def first_line(error: BaseException) -> str:
    """The first line of the error's message (a library's may go on for a traceback's worth), or
    its type's name when the message is empty: what a one-line message quotes."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__


def typed_first_line(error: BaseException) -> str:
    """`Type: first line`, or `Type` alone when the message is empty."""
    return f"{type(error).__name__}: {first_line(error)}" if str(error).strip() else type(error).__name__


class GptjTuneError(Exception):
    """Base class: a problem the user can fix. The CLI prints it without a traceback."""

    exit_code = 2


class RecipeError(GptjTuneError):
    """The recipe (YAML, overrides or resolved values) is invalid. Holds every problem at once."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"Recipe is not valid{where}; found {len(problems)} problem(s):"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


class DataError(GptjTuneError):
    """A data file or record cannot be used. Names the file, line and field where known."""


class ModelError(GptjTuneError):
    """The model or tokenizer cannot be loaded or built as the recipe asks."""


class RunDirError(GptjTuneError):
    """The run directory is missing, already used, or its checkpoints are unusable."""


class TrackerError(GptjTuneError):
    """An experiment tracker (logging.trackers) cannot reach its server or cannot start."""


class Stopped(GptjTuneError):
    """Stopped by Ctrl-C or SIGTERM: exit code 130, as a shell reports a Ctrl-C."""

    exit_code = 130


class TrainingError(GptjTuneError):
    """Training cannot continue (e.g. the loss became NaN). The last good checkpoint is kept."""

    exit_code = 1
