"""The two ways a classroom command fails: a usage error (exit status 2) and any other failure (exit status 1)."""

from __future__ import annotations


class ClassroomError(Exception):
    """The command could not do its job (exit status 1); the message says why."""


class UsageError(ClassroomError):
    """The command was asked for something it refuses: a bad folder, an unknown part (exit status 2)."""


__all__ = ["ClassroomError", "UsageError"]
