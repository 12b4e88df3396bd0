"""Errors the CLI turns into one-line messages (no traceback unless --debug)."""

from __future__ import annotations


class RnngenError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""

    exit_code = 1


class InputError(RnngenError):
    """Bad input: a file, a data set or an option value (exit status 2)."""

    exit_code = 2


class CheckpointError(RnngenError):
    """A checkpoint that is missing, corrupted, foreign or from a newer rnngen (exit status 2)."""

    exit_code = 2


class TrainingError(RnngenError):
    """A failure at run time, such as a loss that keeps diverging (exit status 1)."""

    exit_code = 1
