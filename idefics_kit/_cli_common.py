"""Pieces shared by the command-line modules: the exit exception and message helpers."""

from __future__ import annotations

__all__ = ["PROG", "CliExit", "cli_message", "one_line"]

PROG = "idefics-kit"


class CliExit(Exception):
    """End the command with ``code`` and one line on stderr.

    ``label`` follows the program name: ``idefics-kit: error: ...``; ``None``
    prints ``idefics-kit: ...`` (used for "interrupted").
    """

    def __init__(self, message: str, code: int = 1, *, label: str | None = "error") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.label = label

    def line(self) -> str:
        """The stderr line, without the newline."""
        prefix = f"{PROG}: {self.label}: " if self.label else f"{PROG}: "
        return prefix + one_line(self.message)


def one_line(message: str) -> str:
    """``message`` with every run of whitespace (newlines included) made one space."""
    return " ".join(message.split())


def cli_message(message: str) -> str:
    """An SDK error message in the CLI's terms: its keyword hints become flag hints."""
    return message.replace("pass allow_private_network=True", "pass --allow-private-network")
