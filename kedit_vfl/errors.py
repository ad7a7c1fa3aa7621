"""The one error type for user mistakes.

Library code raises :class:`UserError` for anything the user can fix (a missing file,
a malformed record, an incompatible artifact). The CLI turns it into one line on stderr
and exit code 2; every other exception is a bug and exits with code 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input, reported as one clear line (exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class PeerError(Exception):
    """The other party vanished, timed out or broke the protocol (one line, exit code 1).

    Not the user's input at fault, and not a bug in this process: the message says what
    happened on the wire and how to continue (usually ``--resume`` on both sides).
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
