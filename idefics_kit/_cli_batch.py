"""``idefics-kit batch``: answer a JSONL file of conversations, resumably.

Input: one JSON object per line, ``{"id": "a1", "messages": [...]}`` with
``messages`` in the :meth:`Conversation.to_messages` format. Output: one JSON
object per input line, in input order, appended and fsync'd row by row::

    {"id": "a1", "text": "...", "finish_reason": "stop",
     "usage": {"prompt_tokens": 41, "completion_tokens": 7}, "error": null}

A bad line gets an error row (``text``/``finish_reason``/``usage`` null,
``error`` = ``{"type": ..., "message": ...}``); a line whose id cannot be read
gets ``"id": null`` and ``"line": N``. Rerunning the same command skips the
inputs whose rows are already in the output file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TextIO

from tqdm import tqdm

from idefics_kit._cli_common import PROG, CliExit
from idefics_kit.conversation import Conversation, Turn
from idefics_kit.errors import IdeficsKitError, UsageError
from idefics_kit.generator import Generator
from idefics_kit.images import ImagePart
from idefics_kit.options import GenerationOptions
from idefics_kit.results import Result

__all__ = [
    "BatchJob",
    "Done",
    "Record",
    "RecordError",
    "answer_all",
    "error_row",
    "find_duplicate",
    "parse_record",
    "read_done",
    "ready_conversation",
    "result_row",
    "run_batch",
    "run_window",
    "windows",
]

Row = dict[str, Any]

_UTF8_BOM = b"\xef\xbb\xbf"


class RecordError(UsageError):
    """A JSONL line that is not an object with a non-empty string ``id`` and ``messages``."""


# -- input ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One non-blank input line: its 1-based number, its id (None if unreadable) and content."""

    line: int
    id: str | None
    messages: Any = None
    error: IdeficsKitError | None = None


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def parse_record(line: int, raw: bytes) -> Record:
    """Parse one input line; a malformed line gives a Record carrying a RecordError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Record(line, None, error=RecordError(f"line {line}: not UTF-8 text ({exc})"))
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return Record(line, None, error=RecordError(f"line {line}: invalid JSON ({exc})"))
    if not isinstance(obj, dict):
        return Record(
            line,
            None,
            error=RecordError(
                f'line {line}: expected a JSON object {{"id": ..., "messages": [...]}}, '
                f"got a JSON {_json_type(obj)}"
            ),
        )
    record_id = obj.get("id")
    if not isinstance(record_id, str) or not record_id:
        got = "no id" if "id" not in obj else f"a JSON {_json_type(record_id)} {record_id!r}"
        return Record(
            line,
            None,
            error=RecordError(f'line {line}: "id" must be a non-empty string, got {got}'),
        )
    if "messages" not in obj:
        return Record(
            line,
            record_id,
            error=RecordError(
                f'line {line}: no "messages" key; expected a list of chat messages '
                f"(Conversation.to_messages() format), found keys {sorted(obj)}"
            ),
        )
    return Record(line, record_id, messages=obj["messages"])


def read_records(path: Path) -> Iterator[Record]:
    """Every non-blank line of the input file, parsed, in order."""
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        raise CliExit(f"input file {str(path)!r} not found") from None
    except OSError as exc:
        raise CliExit(f"cannot read input file {str(path)!r}: {exc.strerror or exc}") from None
    with file:
        for number, raw in enumerate(file, start=1):
            data = raw.removeprefix(_UTF8_BOM) if number == 1 else raw
            if data.strip():
                yield parse_record(number, data)


def find_duplicate(index: Iterable[tuple[int, str | None]]) -> tuple[str, list[int]] | None:
    """The first id that occurs more than once, with every line it is on; None if all unique."""
    lines: dict[str, list[int]] = {}
    first_duplicate: str | None = None
    for line, record_id in index:
        if record_id is None:
            continue
        seen = lines.setdefault(record_id, [])
        seen.append(line)
        if len(seen) == 2 and first_duplicate is None:
            first_duplicate = record_id
    return None if first_duplicate is None else (first_duplicate, lines[first_duplicate])


def _and(numbers: Sequence[int]) -> str:
    words = [str(number) for number in numbers]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _check_unique(index: Sequence[tuple[int, str | None]], path: Path) -> None:
    duplicate = find_duplicate(index)
    if duplicate is not None:
        record_id, lines = duplicate
        raise CliExit(
            f"duplicate id {record_id!r} on lines {_and(lines)} of {path}; every id must be unique"
        )


# -- output and resume ------------------------------------------------------------


@dataclass
class Done:
    """What an earlier run already wrote: ids, and line numbers of rows without an id."""

    ids: set[str] = field(default_factory=set)
    lines: set[int] = field(default_factory=set)
    rows: int = 0
    truncated: bool = False

    def has(self, line: int, record_id: str | None) -> bool:
        """Whether the input at ``line`` with ``record_id`` already has its row."""
        return record_id in self.ids if record_id is not None else line in self.lines

    def add(self, row: Row) -> bool:
        """Record an output row; False if it is not a row this command writes."""
        record_id, line = row.get("id"), row.get("line")
        if isinstance(record_id, str):
            self.ids.add(record_id)
        elif record_id is None and isinstance(line, int) and not isinstance(line, bool):
            self.lines.add(line)
        else:
            return False
        self.rows += 1
        return True


def read_done(path: Path) -> Done:
    """Read the rows of an earlier run; cut away a trailing partial line (a crash mid-write)."""
    done = Done()
    try:
        file = open(path, "r+b")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        return done
    except OSError as exc:
        raise CliExit(f"cannot open output file {str(path)!r}: {exc.strerror or exc}") from None
    with file:
        offset = 0
        for number, raw in enumerate(file, start=1):
            if not raw.endswith(b"\n"):
                file.truncate(offset)
                done.truncated = True
                break
            offset += len(raw)
            if raw.strip() and not done.add(_output_row(raw)):
                raise CliExit(
                    f"line {number} of the output file {str(path)!r} is not a row of "
                    f"'{PROG} batch'; pass another -o, or fix or remove that file"
                )
    return done


def _output_row(raw: bytes) -> Row:
    try:
        row = json.loads(raw)
    except (ValueError, RecursionError):
        return {"id": 0}  # rejected by Done.add
    return row if isinstance(row, dict) else {"id": 0}


def _check_distinct(input_path: Path, output_path: Path) -> None:
    try:
        same = output_path.exists() and os.path.samefile(input_path, output_path)
    except OSError:
        same = False
    if same:
        raise CliExit(f"the output file {str(output_path)!r} is the input file; pass another -o")


class RowWriter:
    """Appends rows to the output file; each row is one write, flushed and fsync'd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        try:
            self._file: BinaryIO = open(path, "ab")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise CliExit(
                f"cannot write output file {str(path)!r}: {exc.strerror or exc}"
            ) from None

    def write(self, row: Row) -> None:
        """Append ``row`` durably; a Ctrl-C meanwhile takes effect once the row is written."""
        data = _encode_row(row)
        with _sigint_deferred():
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.count += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold SIGINT back for the duration (main thread only), then deliver it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
        elif received and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


def _encode_row(row: Row) -> bytes:
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (from a JSON escape in the input)
        return (json.dumps(row) + "\n").encode("ascii")


# -- rows ------------------------------------------------------------------------


def _row(record: Record, **fields: Any) -> Row:
    row: Row = {"id": record.id}
    if record.id is None:
        row["line"] = record.line
    row.update(fields)
    return row


def result_row(record: Record, result: Result) -> Row:
    """The output row of an answered input."""
    return _row(
        record,
        text=result.text,
        finish_reason=result.finish_reason,
        usage={
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
        },
        error=None,
    )


def error_row(record: Record, exc: BaseException) -> Row:
    """The output row of an input that failed with ``exc``."""
    return _row(
        record,
        text=None,
        finish_reason=None,
        usage=None,
        error={"type": type(exc).__name__, "message": str(exc)},
    )


# -- answering --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Item:
    """A pending input, checked: a ready conversation or the error that rules it out."""

    record: Record
    conversation: Conversation | None
    error: IdeficsKitError | None


def ready_conversation(messages: Any) -> Conversation:
    """Parse and check ``messages``, decoding every image now (each image is decoded once).

    Raises an IdeficsKitError (ConversationError, ImageLoadError...) for a bad input.
    """
    conversation = Conversation.from_messages(messages)
    conversation.validate()
    turns = tuple(
        Turn(
            role=turn.role,
            parts=tuple(
                ImagePart.from_pil(part.load()) if isinstance(part, ImagePart) else part
                for part in turn.parts
            ),
        )
        for turn in conversation.turns
    )
    return Conversation(system=conversation.system, turns=turns)


def check_item(record: Record) -> Item:
    """Turn a record into an Item, catching the input's own errors."""
    if record.error is not None:
        return Item(record, None, record.error)
    try:
        return Item(record, ready_conversation(record.messages), None)
    except IdeficsKitError as exc:
        return Item(record, None, exc)


def windows(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Consecutive runs of items holding ``size`` good ones each (the last may hold fewer)."""
    window: list[Item] = []
    good = 0
    for item in items:
        window.append(item)
        good += item.conversation is not None
        if good == size:
            yield window
            window, good = [], 0
    if window:
        yield window


Outcome = Result | IdeficsKitError


def answer_all(
    gen: Generator, conversations: Sequence[Conversation], options: GenerationOptions, size: int
) -> list[Outcome]:
    """Answer as one batch; if that fails, one by one so only the failing input errs.

    The one-by-one pass also gives the failing input its own error message
    (a batch error names the index of the conversation in the batch).
    """
    if not conversations:
        return []
    try:
        return list(gen.generate_batch(conversations, options, batch_size=size))
    except IdeficsKitError:
        return [_answer_one(gen, conversation, options) for conversation in conversations]


def _answer_one(gen: Generator, conversation: Conversation, options: GenerationOptions) -> Outcome:
    try:
        return gen.generate(conversation, options)
    except IdeficsKitError as exc:
        return exc


def run_window(
    gen: Generator, window: Sequence[Item], options: GenerationOptions, size: int
) -> list[Row]:
    """The rows of a window, in input order."""
    good = [item.conversation for item in window if item.conversation is not None]
    outcomes = iter(answer_all(gen, good, options, size))
    rows = []
    for item in window:
        outcome: Outcome | None = item.error if item.conversation is None else next(outcomes)
        if isinstance(outcome, Result) and outcome.error is not None:
            outcome = outcome.error
        assert outcome is not None
        rows.append(
            result_row(item.record, outcome)
            if isinstance(outcome, Result)
            else error_row(item.record, outcome)
        )
    return rows


# -- progress ----------------------------------------------------------------------


class Progress:
    """A tqdm bar on stderr: items, items/s, ETA, and generated tokens/s as postfix."""

    def __init__(self, total: int, *, enabled: bool, err: TextIO) -> None:
        self._bar: Any = tqdm(
            total=total, unit="item", file=err, disable=not enabled, dynamic_ncols=True
        )
        self._start = time.monotonic()
        self.tokens = 0
        self.errors = 0

    def advance(self, rows: Sequence[Row]) -> None:
        for row in rows:
            usage = row["usage"]
            if usage is None:
                self.errors += 1
            else:
                self.tokens += int(usage["completion_tokens"])
        elapsed = max(time.monotonic() - self._start, 1e-9)
        self._bar.set_postfix_str(f"{self.tokens / elapsed:.1f} tok/s", refresh=False)
        self._bar.update(len(rows))

    def close(self) -> None:
        self._bar.close()


# -- the command ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchJob:
    """What ``idefics-kit batch`` was asked to do."""

    input: Path
    output: Path
    options: GenerationOptions
    batch_size: int
    quiet: bool


def _notifier(quiet: bool, err: TextIO) -> Callable[[str], None]:
    def note(text: str) -> None:
        if not quiet:
            print(f"{PROG}: {text}", file=err)

    return note


def run_batch(job: BatchJob, load: Callable[[], Generator], err: TextIO) -> int:
    """Check the input, resume from the output, answer what is left; return the exit code.

    ``load`` is called only when there is work to do, after every check that
    needs no model.
    """
    note = _notifier(job.quiet, err)
    index = [(record.line, record.id) for record in read_records(job.input)]
    _check_unique(index, job.input)
    _check_distinct(job.input, job.output)
    done = read_done(job.output)
    pending = sum(not done.has(line, record_id) for line, record_id in index)
    if done.truncated:
        note(f"removed a partial last line from {job.output} (an interrupted write)")
    if pending == 0:
        note(f"nothing to do: all {len(index)} inputs already have a row in {job.output}")
        return 0
    if done.rows:
        note(f"resuming: {len(index) - pending} of {len(index)} inputs already in {job.output}")
    gen = load()
    with RowWriter(job.output) as writer:
        progress = Progress(pending, enabled=not job.quiet, err=err)
        try:
            _answer_pending(gen, job, done, writer, progress)
        except KeyboardInterrupt:
            raise CliExit(
                f"interrupted; {writer.count} rows written to {job.output} "
                f"({done.rows + writer.count} in total); rerun the same command to resume",
                130,
                label=None,
            ) from None
        finally:
            progress.close()
    note(
        f"wrote {writer.count} rows to {job.output} ({progress.errors} with an error; "
        f"{done.rows} were already there)"
    )
    return 0


def _answer_pending(
    gen: Generator, job: BatchJob, done: Done, writer: RowWriter, progress: Progress
) -> None:
    """Answer the inputs without a row, window by window, writing rows in input order."""
    records = (r for r in read_records(job.input) if not done.has(r.line, r.id))
    for window in windows(map(check_item, records), job.batch_size):
        rows = run_window(gen, window, job.options, job.batch_size)
        for row in rows:
            writer.write(row)
        progress.advance(rows)
