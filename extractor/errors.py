"""Typed errors. Library code raises these; the CLI prints one line and exits 2."""
import os

# Where a `run --gpus` worker writes its one error line instead of stderr: the parent (runners/shards.py) reports
# every worker's in its own one line, so a failed sharded run says one line, not one per worker and its own.
# The value is "PARENT_PID:PATH": honoured only by a direct child of that process, so the same name exported in
# a user's shell (or inherited by a command a worker starts) never swallows an error line.
ERROR_FILE_ENV = "EXTRACTOR_ERROR_FILE"


def error_file_value(path: str) -> str:
    """ERROR_FILE_ENV's value for this process's workers."""
    return f"{os.getpid()}:{path}"


def error_file_for_me() -> str | None:
    """Where this process's parent (a --gpus parent) asked for its last line; None: say it on stderr."""
    parent, _, path = os.environ.get(ERROR_FILE_ENV, "").partition(":")
    return path if path and parent == str(os.getppid()) else None


class ExtractorError(Exception):
    """An error the user can fix: the message says what is wrong and how to fix it."""

    exit_code = 2


class TaskError(ExtractorError):
    """A task file (prompt spec or schema) is invalid, or a task name is unknown."""


class InputError(ExtractorError):
    """A corpus, gold or prediction file has a bad record."""


class ManifestError(ExtractorError):
    """An output's manifest is missing, corrupt, or does not match this run."""


class ModelError(ExtractorError):
    """A model or adapter directory cannot be used."""


class OutputError(ExtractorError):
    """An output cannot be written (disk full, permission denied, read-only file system)."""


def output_error(path, exc: OSError, resumable: bool = True) -> OutputError:
    hint = ("; everything written before is kept — fix it and rerun with --resume" if resumable
            else "; choose another --out or fix the folder")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}{hint}")


class LongInputError(ExtractorError):
    """A prompt is longer than the model accepts and --on-long is fail."""
