"""Pieces shared by the command-line modules: the exit exception and message helpers."""

from __future__ import annotations

import argparse
import math

__all__ = [
    "PROG",
    "CliExit",
    "cli_message",
    "non_negative_float",
    "non_negative_int",
    "one_line",
    "positive_float",
    "positive_int",
]

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


# argparse ``type=`` functions: a bad value is a usage error naming the rule.


def _number(text: str, kind: type[int] | type[float], low: float, strict: bool, rule: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (value > low if strict else value >= low)):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return int(_number(text, int, 1, False, "an integer >= 1"))


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return int(_number(text, int, 0, False, "an integer >= 0"))


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _number(text, float, 0, True, "a number > 0")


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _number(text, float, 0, False, "a number >= 0")
