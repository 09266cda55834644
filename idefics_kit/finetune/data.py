"""Training rows: read from ``batch``-format JSONL files or given as conversations, checked.

A row file is what ``idefics-kit batch`` reads (one ``{"id": ..., "messages":
[...]}`` object per line, parsed by the same functions); in training rows the
assistant turns are the targets. Every row is checked before training starts
(parsed, images decoded, encoded, its length measured): a row that cannot be
used becomes a :class:`BadRow` with its id and the reason, never a silent drop.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from idefics_kit.conversation import Conversation, TextPart
from idefics_kit.errors import IdeficsKitError, TrainingDataError, TrainingError
from idefics_kit.finetune.labels import Encoder, assistant_turns
from idefics_kit.jobs import conversation_of, parse_record

__all__ = ["BadRow", "Row", "RowSource", "check_rows", "fingerprint", "read_rows"]

RowSource: TypeAlias = (
    str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Iterable[Conversation]
)
"""Training or eval rows: a JSONL file, several, or conversations (ids are their positions)."""

_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """One training row: where it came from and its conversation (None when unreadable)."""

    id: str
    where: str
    """``FILE line N``, or ``row N`` for conversations passed in directly."""
    conversation: Conversation | None
    error: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BadRow:
    """A row left out of training, and why."""

    id: str | None
    where: str
    reason: str

    def line(self) -> str:
        """One report line: ``FILE line N (id 'a1'): reason``."""
        named = f" (id {self.id!r})" if self.id is not None else ""
        return f"{self.where}{named}: {self.reason}"


def _is_paths(source: object) -> bool:
    if isinstance(source, (str, os.PathLike)):
        return True
    return (
        isinstance(source, Sequence)
        and bool(source)
        and all(isinstance(item, (str, os.PathLike)) for item in source)
    )


def _paths(source: object) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        return [Path(source)]
    assert isinstance(source, Sequence)
    return [Path(item) for item in source]


def read_rows(source: RowSource) -> list[Row]:
    """Every row of ``source`` in order; unreadable lines become rows carrying their error."""
    if _is_paths(source):
        return [row for path in _paths(source) for row in _file_rows(path)]
    rows = []
    items: Iterable[object] = source  # type: ignore[assignment]
    for index, item in enumerate(items):
        where = f"row {index}"
        if isinstance(item, Conversation):
            rows.append(Row(id=str(index), where=where, conversation=item))
        else:
            rows.append(
                Row(
                    id=str(index),
                    where=where,
                    conversation=None,
                    error=f"expected a Conversation, got {type(item).__name__}",
                )
            )
    return rows


def _file_rows(path: Path) -> Iterator[Row]:
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise TrainingDataError(
            f"cannot read the rows file {str(path)!r}: {exc.strerror or exc}"
        ) from None
    with file:
        for number, raw in enumerate(file, start=1):
            data = raw.removeprefix(_UTF8_BOM) if number == 1 else raw
            if not data.strip():
                continue
            record = parse_record(number, data)
            where = f"{path.name} line {number}"
            if record.error is not None:
                message = str(record.error).removeprefix(f"line {number}: ")
                yield Row(id=record.id or "", where=where, conversation=None, error=message)
                continue
            assert record.id is not None
            try:
                conversation = conversation_of(record.messages)
            except IdeficsKitError as exc:
                yield Row(id=record.id, where=where, conversation=None, error=str(exc))
            else:
                yield Row(id=record.id, where=where, conversation=conversation)


def fingerprint(source: RowSource, rows: Sequence[Row]) -> str:
    """A digest of the rows, so a rerun can tell whether it trains on the same data."""
    digest = hashlib.sha256()
    if _is_paths(source):
        for path in _paths(source):
            digest.update(path.read_bytes())
    else:
        for row in rows:
            digest.update(row.id.encode() + b"\0")
            if row.conversation is not None:
                digest.update(repr(_texts(row.conversation)).encode())
    return digest.hexdigest()[:16]


def _texts(conversation: Conversation) -> list[object]:
    return [conversation.system] + [
        (turn.role, [p.text if isinstance(p, TextPart) else "<image>" for p in turn.parts])
        for turn in conversation.turns
    ]


def _answer_problem(conversation: Conversation, *, needs_final_answer: bool) -> str | None:
    targets = assistant_turns(conversation)
    if not targets:
        return "no assistant turn: nothing to learn (assistant turns are the targets)"
    for turn in targets:
        parts = conversation.turns[turn].parts
        text = "".join(p.text for p in parts if isinstance(p, TextPart))
        if not text.strip():
            return f"empty answer: assistant turn {turn} (0-based) has no text"
    if needs_final_answer and conversation.turns[-1].role != "assistant":
        return "the last turn is not an assistant turn: an eval row needs its expected answer last"
    return None


def check_rows(
    rows: Sequence[Row], encoder: Encoder, *, needs_final_answer: bool = False
) -> tuple[list[Row], list[BadRow]]:
    """The usable rows and the bad ones (one reason each), both in input order.

    A row is bad when it cannot be parsed, has no assistant turn or an empty
    answer, has an image that cannot be decoded, or does not fit the model's
    context. Eval rows (``needs_final_answer``) must also end with the answer.
    """
    good: list[Row] = []
    bad: list[BadRow] = []
    for row in rows:
        if row.conversation is None:
            bad.append(BadRow(id=row.id or None, where=row.where, reason=row.error or "unreadable"))
            continue
        problem = _answer_problem(row.conversation, needs_final_answer=needs_final_answer)
        if problem is None:
            try:
                encoder.encode(row.conversation)
            except TrainingError:
                raise  # the template, not the row: no row can be trained on
            except IdeficsKitError as exc:
                problem = str(exc)
        if problem is None:
            good.append(row)
        else:
            bad.append(BadRow(id=row.id, where=row.where, reason=problem))
    return good, bad
