"""``idefics-kit batch``: answer a JSONL file of conversations, resumably.

Input: one JSON object per line, ``{"id": "a1", "messages": [...]}`` with
``messages`` in the :meth:`Conversation.to_messages` format. Output: one JSON
object per input line, in input order, appended and fsync'd row by row::

    {"id": "a1", "text": "...", "finish_reason": "stop",
     "usage": {"prompt_tokens": 41, "completion_tokens": 7}, "error": null}

A bad line gets an error row (``text``/``finish_reason``/``usage`` null,
``error`` = ``{"type": ..., "message": ...}``); a line whose id cannot be read
gets ``"id": null`` and ``"line": N``. Rerunning the same command skips the
inputs whose rows are already in the output file. The answering itself
(checks, image decoding, length-aware batches, per-input errors) is
:meth:`Generator.iter_batch`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections import abc, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from idefics_kit._cli_common import PROG, CliExit, cli_message
from idefics_kit.conversation import Conversation, Part, Turn
from idefics_kit.errors import IdeficsKitError, UsageError
from idefics_kit.images import ImagePart
from idefics_kit.options import GenerationOptions
from idefics_kit.results import Result

if TYPE_CHECKING:
    from idefics_kit.generator import Generator

__all__ = [
    "BatchJob",
    "Done",
    "Record",
    "RecordError",
    "answer",
    "conversation_of",
    "error_row",
    "find_duplicate",
    "parse_record",
    "read_done",
    "result_row",
    "run_batch",
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

    def bad(message: str, record_id: str | None = None) -> Record:
        return Record(line, record_id, error=RecordError(f"line {line}: {message}"))

    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return bad(f"not UTF-8 text ({exc})")
    except (ValueError, RecursionError) as exc:
        return bad(f"invalid JSON ({exc})")
    if not isinstance(obj, dict):
        return bad(
            f'expected a JSON object {{"id": ..., "messages": [...]}}, got a JSON {_json_type(obj)}'
        )
    record_id = obj.get("id")
    if not isinstance(record_id, str) or not record_id:
        got = "no id" if "id" not in obj else f"a JSON {_json_type(record_id)} {record_id!r}"
        return bad(f'"id" must be a non-empty string, got {got}')
    if "messages" not in obj:
        return bad(
            'no "messages" key; expected a list of chat messages '
            f"(Conversation.to_messages() format), found keys {sorted(obj)}",
            record_id,
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
    """The output row of an input: its answer, or its error when ``result.error`` is set."""
    if result.error is not None:
        return error_row(record, result.error)
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
    """The output row of an input that failed with ``exc``.

    The error's batch position (``exc.index``) is not repeated: it is the
    input's position in one run, and the row's id already says which input.
    """
    message = cli_message(str(exc))
    return _row(
        record,
        text=None,
        finish_reason=None,
        usage=None,
        error={"type": type(exc).__name__, "message": message},
    )


# -- answering --------------------------------------------------------------------


def conversation_of(messages: Any, *, allow_private_network: bool = False) -> Conversation:
    """``Conversation.from_messages``; with ``allow_private_network``, URL images may come
    from loopback and private addresses too (see ``ImagePart.from_url``)."""
    conversation = Conversation.from_messages(messages)
    if not allow_private_network:
        return conversation
    turns = tuple(
        Turn(role=turn.role, parts=tuple(_trusted(part) for part in turn.parts))
        for turn in conversation.turns
    )
    return Conversation(system=conversation.system, turns=turns)


def _trusted(part: Part) -> Part:
    if isinstance(part, ImagePart) and part.kind == "url":
        return ImagePart.from_url(part.to_message_content()["url"], allow_private_network=True)
    return part


def answer(
    gen: Generator,
    records: Iterable[Record],
    options: GenerationOptions,
    *,
    batch_size: int,
    trust: bool = False,
) -> abc.Generator[Row, None, None]:
    """The row of every record, in order.

    A record whose line or messages cannot be parsed gets its error row here;
    the others go through ``gen.iter_batch``, which checks, decodes, batches
    and answers them, giving a failing input its own error result. ``trust``:
    URL images may come from private addresses (``--allow-private-network``).
    """
    # Every record read, in order, with the error that kept it from the model.
    # iter_batch reads ahead, so results come after the records they follow.
    waiting: deque[tuple[Record, IdeficsKitError | None]] = deque()

    def conversations() -> Iterator[Conversation]:
        for record in records:
            try:
                if record.error is not None:
                    raise record.error
                conversation = conversation_of(record.messages, allow_private_network=trust)
            except IdeficsKitError as exc:
                waiting.append((record, exc))
            else:
                waiting.append((record, None))
                yield conversation

    def rejected() -> Iterator[Row]:
        while waiting and waiting[0][1] is not None:
            record, error = waiting.popleft()
            assert error is not None
            yield error_row(record, error)

    results = gen.iter_batch(conversations(), options, batch_size=batch_size, on_error="return")
    for result in results:
        yield from rejected()
        yield result_row(waiting.popleft()[0], result)
    yield from rejected()


# -- progress ----------------------------------------------------------------------


class Progress:
    """A tqdm bar on stderr: items, items/s, ETA, and generated tokens/s as postfix."""

    def __init__(self, total: int, *, enabled: bool, err: TextIO) -> None:
        from tqdm import tqdm

        self._bar: Any = tqdm(
            total=total, unit="item", file=err, disable=not enabled, dynamic_ncols=True
        )
        self._start = time.monotonic()
        self.tokens = 0
        self.errors = 0

    def advance(self, row: Row) -> None:
        if row["usage"] is None:
            self.errors += 1
        else:
            self.tokens += int(row["usage"]["completion_tokens"])
        elapsed = max(time.monotonic() - self._start, 1e-9)
        self._bar.set_postfix_str(f"{self.tokens / elapsed:.1f} tok/s", refresh=False)
        self._bar.update()

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
    allow_private_network: bool = False


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
    records = (r for r in read_records(job.input) if not done.has(r.line, r.id))
    rows = answer(
        gen,
        records,
        job.options,
        batch_size=job.batch_size,
        trust=job.allow_private_network,
    )
    with contextlib.closing(RowWriter(job.output)) as writer, contextlib.closing(rows):
        progress = Progress(pending, enabled=not job.quiet, err=err)
        try:
            for row in rows:
                writer.write(row)
                progress.advance(row)
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
