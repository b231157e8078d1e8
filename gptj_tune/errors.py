"""Typed errors raised by library code. Only cli.py turns them into messages and exit codes.

Every message is written for the user: what was wrong, where (file, line, recipe key), what was
expected, and how to fix it.
"""


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
