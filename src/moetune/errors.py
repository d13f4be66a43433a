"""Errors that mean "the user's input is wrong" rather than "moetune failed".

The CLI turns a :class:`UserError` into one paragraph on stderr and exit code 2, with no
traceback; every other exception is a failure during work (exit code 1).
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a config, a data file, a path or a checkpoint. Exit code 2."""


class ConfigError(UserError):
    """A config value is wrong. ``key`` is its dotted path, so the loader can add file:line."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


class RunFailure(Exception):
    """Work failed for a reason with known remedies (out of memory, ...): one paragraph, exit code 1."""


class OutOfMemory(RunFailure):
    """The device ran out of memory; the message lists what to change."""


class StoppedBySignal(KeyboardInterrupt):
    """SIGTERM / SIGINT ended a run before its training loop started: one line, exit code 128 + the signal number.

    A KeyboardInterrupt, not an Exception, so library code that catches Exception while the model is
    being built cannot swallow it.
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), to quote in a one-paragraph error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def yaml_problem(err: BaseException) -> str:
    """What a YAML parser error says is wrong and where (its first line alone names neither line nor column)."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or problem is None:
        return first_line(err)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
