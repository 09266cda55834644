"""Batch jobs you can resume and trust: inputs, rows, the ledger, the manifest, writers, the lock.

``idefics-kit batch``, ``idefics-kit batch --ray`` and
:func:`idefics_kit.ray.run_batch` are built from this module, and so can an
application's own job loop. The pieces:

* **Inputs** (:func:`expand_inputs`, :func:`index_inputs`,
  :func:`read_records`): JSONL files (``{"id": ..., "messages": [...]}`` per
  line) and Parquet files (``id`` and ``messages`` columns, optionally an
  ``images`` column of binary values), several at once, given as files,
  folders or glob patterns. Ids must be unique across all of them; a
  duplicate is refused before any model work, naming every place it occurs.
* **Rows** (:func:`result_row`, :func:`error_row`): one JSON object per
  input, ``{"id", "text", "finish_reason", "usage", "error"}``. An input line
  whose id cannot be read gets ``"id": null`` and its ``"line"`` (and, in a
  job of several inputs, its ``"input"`` file).
* **Outputs** (:class:`JsonlOutput`, one JSONL file; :class:`PartsOutput`, a
  folder of part files): opening one takes its **lock** (a second writer is
  refused at once with :class:`OutputBusyError`; the lock of a process that
  is gone is taken over), checks its **manifest** (what wrote it: model and
  revision or folder fingerprint, generation options, SDK version, inputs; a
  rerun with other settings is refused with :class:`OutputMismatchError`
  naming the difference, the output untouched), repairs what a crash left
  (a partial last line, temporary files, an unfinished retry) and reads the
  **ledger** (:class:`Ledger`: which inputs have a row, and which of those
  rows are errors).
* **Retrying error rows** is crash-safe: new rows for inputs that already
  have an (error) row go to a journal file beside the output, never into it;
  when the run ends (or, after a crash, when the next run opens the output)
  the journal is merged: the output is rewritten into a temporary file with
  each error row replaced by its new row, fsync'd and renamed over the
  output (``os.replace``, atomic), then the journal is removed. A crash
  before the rename leaves output and journal as they were; one after it
  leaves a journal whose rows are already in: merging again changes nothing.
  So at every moment the output holds each input at most once, and nothing
  written is lost.
* :func:`status`: how far an output is (rows, errors, remaining inputs,
  whether a job is writing it) without running anything.

Nothing here imports torch, transformers, Ray or the command line; pyarrow is
imported only for Parquet files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections import abc, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from idefics_kit.conversation import Conversation, Part, Turn
from idefics_kit.errors import (
    ConversationError,
    IdeficsKitError,
    RuntimeFailure,
    UsageError,
)
from idefics_kit.images import ImagePart
from idefics_kit.options import GenerationOptions
from idefics_kit.results import Result

if TYPE_CHECKING:
    from idefics_kit.generator import Generator

__all__ = [
    "MANIFEST_FORMAT",
    "InputIndex",
    "JobOutput",
    "JobStatus",
    "JsonlOutput",
    "Key",
    "Ledger",
    "Manifest",
    "OutputBusyError",
    "OutputMismatchError",
    "PartsOutput",
    "Record",
    "RecordError",
    "RowWriter",
    "answer",
    "conversation_of",
    "error_row",
    "expand_inputs",
    "find_duplicate",
    "index_inputs",
    "input_format",
    "messages_of_row",
    "parse_record",
    "read_records",
    "result_row",
    "row_key",
    "row_schema",
    "status",
]

Row = dict[str, Any]
Key = str | tuple[str | None, int]
"""What identifies an input: its id, or (input file or None, line) when it has none."""
InputFormat = Literal["jsonl", "parquet"]
OutputFormat = Literal["jsonl", "parquet"]

MANIFEST_FORMAT = "idefics-kit-batch/1"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
_UTF8_BOM = b"\xef\xbb\xbf"
_IMAGE_SOURCES = ("path", "url", "base64", "image")
_GLOB_CHARACTERS = frozenset("*?[")


# -- errors ------------------------------------------------------------------------------


class RecordError(UsageError):
    """An input line or row that is not an object with a non-empty string ``id`` and
    ``messages``; it becomes that input's error row."""


class OutputMismatchError(UsageError):
    """The output was written with other settings (model, options, SDK version or inputs)
    than this run's; it is left untouched. ``differences`` names each one."""

    def __init__(self, message: str, differences: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.differences = tuple(differences)


class OutputBusyError(RuntimeFailure):
    """Another live process holds the output's lock (it is writing that output)."""


# -- inputs ------------------------------------------------------------------------------


def input_format(path: Path) -> InputFormat:
    """``"parquet"`` for ``.parquet``/``.pq`` files, else ``"jsonl"``."""
    return "parquet" if path.suffix.lower() in PARQUET_SUFFIXES else "jsonl"


def expand_inputs(specs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The input files of ``specs``, in order: files as given, a folder's ``.jsonl``/
    ``.parquet`` files sorted by name, a glob pattern's matches sorted by name.

    Raises :class:`~idefics_kit.UsageError` for nothing given, a missing file, a pattern
    or folder without files, or a file given twice.
    """
    raw = [specs] if isinstance(specs, (str, os.PathLike)) else list(specs)
    if not raw:
        raise UsageError("no input files given")
    paths: list[Path] = []
    for item in raw:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            found = sorted(
                p
                for p in path.iterdir()
                if p.is_file() and p.suffix.lower() in JSONL_SUFFIXES + PARQUET_SUFFIXES
            )
            if not found:
                raise UsageError(f"input folder {text!r} holds no .jsonl or .parquet files")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        elif _GLOB_CHARACTERS & set(text):
            import glob

            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise UsageError(f"no input file matches {text!r}")
            paths.extend(matches)
        else:
            raise UsageError(f"input file {text!r} not found")
    seen: dict[Path, Path] = {}
    for path in paths:
        resolved = path.resolve()
        if resolved in seen:
            raise UsageError(
                f"the input file {str(path)!r} is given twice (also as {str(seen[resolved])!r}); "
                "give each input once"
            )
        seen[resolved] = path
    return paths


@dataclass(frozen=True, slots=True, kw_only=True)
class Record:
    """One input: its 1-based line (JSONL) or row (Parquet) number, its id (None if
    unreadable), its messages, the error that keeps it from the model, and its input
    file (``source``; set only in a job of several inputs)."""

    line: int
    id: str | None
    messages: Any = None
    error: IdeficsKitError | None = None
    source: str | None = None

    @property
    def key(self) -> Key:
        """The ledger key: the id, or ``(source, line)`` when there is none."""
        return self.id if self.id is not None else (self.source, self.line)


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def parse_record(line: int, raw: bytes, *, source: str | None = None) -> Record:
    """Parse one JSONL line; a malformed line gives a Record carrying a RecordError."""

    def bad(message: str, record_id: str | None = None) -> Record:
        where = f"line {line}" if source is None else f"line {line} of {source}"
        return Record(
            line=line, id=record_id, error=RecordError(f"{where}: {message}"), source=source
        )

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
    return Record(line=line, id=record_id, messages=obj["messages"], source=source)


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        file = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        raise UsageError(f"input file {str(path)!r} not found") from None
    except OSError as exc:
        raise UsageError(f"cannot read input file {str(path)!r}: {exc.strerror or exc}") from None
    with file:
        for number, raw in enumerate(file, start=1):
            data = raw.removeprefix(_UTF8_BOM) if number == 1 else raw
            if data.strip():
                yield number, data


def _parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise UsageError(
            f"Parquet files need pyarrow ({exc}); install it with: pip install 'idefics-kit[ray]'"
        ) from None
    return pq


def _parquet_file(path: Path) -> Any:
    pq = _parquet()
    import pyarrow as pa

    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"cannot read the Parquet input {str(path)!r}: {exc}") from None
    names = file.schema_arrow.names
    if "id" not in names or "messages" not in names:
        raise UsageError(
            f"{path} has the columns {names}; an input needs an 'id' and a "
            "'messages' column (and, for image bytes, optionally 'images')"
        )
    return file


def _parquet_ids(path: Path) -> list[Any]:
    import pyarrow as pa

    file = _parquet_file(path)
    try:
        ids: list[Any] = file.read(columns=["id"]).column("id").to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"cannot read the Parquet input {str(path)!r}: {exc}") from None
    return ids


def find_duplicate(index: Iterable[tuple[int, str | None]]) -> tuple[str, list[int]] | None:
    """The first id that occurs more than once, with every position it is at; None if all
    ids are unique."""
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


def _and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


@dataclass(frozen=True, slots=True, kw_only=True)
class InputIndex:
    """Every input of a job, in order: its ledger key, with the ids checked unique."""

    paths: tuple[Path, ...]
    keys: tuple[Key, ...]

    def pending(self, ledger: Ledger, *, retry_errors: bool = False) -> set[Key]:
        """The keys without a row in ``ledger`` (and, with ``retry_errors``, those whose
        row is an error row)."""
        return {
            key
            for key in self.keys
            if not ledger.has(key) or (retry_errors and ledger.is_error(key))
        }


def index_inputs(paths: Sequence[Path]) -> InputIndex:
    """Read the ids of every input (JSONL lines parsed, Parquet ``id`` columns) and check
    them unique across all files.

    A Parquet row without a non-empty string id is refused (there is no line to name
    in its row); a JSONL line without one gets an error row later. Raises
    :class:`~idefics_kit.UsageError`.
    """
    several = len(paths) > 1
    keys: list[Key] = []
    places: list[tuple[str, int, str]] = []  # (file, number, "line"/"row") per position
    ids: list[tuple[int, str | None]] = []
    for path in paths:
        source = _source(path) if several else None
        if input_format(path) == "parquet":
            for row, record_id in enumerate(_parquet_ids(path), start=1):
                if not isinstance(record_id, str) or not record_id:
                    raise UsageError(
                        f'row {row} of {path}: "id" must be a non-empty string, got '
                        f"{record_id!r}; every row needs a unique string id"
                    )
                ids.append((len(places), record_id))
                places.append((str(path), row, "row"))
                keys.append(record_id)
            continue
        for number, raw in _jsonl_lines(path):
            record = parse_record(number, raw, source=source)
            ids.append((len(places), record.id))
            places.append((str(path), number, "line"))
            keys.append(record.key)
    duplicate = find_duplicate(ids)
    if duplicate is not None:
        record_id, positions = duplicate
        raise UsageError(
            f"duplicate id {record_id!r} on {_where([places[p] for p in positions])}; "
            "every id must be unique"
        )
    return InputIndex(paths=tuple(paths), keys=tuple(keys))


def _source(path: Path) -> str:
    """How rows name their input file in a job of several: its absolute path (the
    manifest's too, so that :func:`status` finds them from any folder)."""
    return str(path.resolve())


def _where(places: Sequence[tuple[str, int, str]]) -> str:
    if len({(name, kind) for name, _, kind in places}) == 1:
        name, _, kind = places[0]
        return f"{kind}s {_and([str(number) for _, number, _ in places])} of {name}"
    return _and([f"{kind} {number} of {name}" for name, number, kind in places])


def read_records(paths: Sequence[Path]) -> Iterator[Record]:
    """Every input of ``paths``, parsed, in order (lazily: any size in bounded memory).

    JSONL: each non-blank line. Parquet: each row, its ``messages`` (JSON text or
    nested values) with the ``images`` column filled in (:func:`messages_of_row`).
    """
    several = len(paths) > 1
    for path in paths:
        source = _source(path) if several else None
        if input_format(path) == "jsonl":
            for number, raw in _jsonl_lines(path):
                yield parse_record(number, raw, source=source)
            continue
        file = _parquet_file(path)
        columns = [name for name in ("id", "messages", "images") if name in file.schema_arrow.names]
        number = 0
        for batch in file.iter_batches(batch_size=256, columns=columns):
            for row in batch.to_pylist():
                number += 1
                record_id = row["id"] if isinstance(row["id"], str) and row["id"] else None
                try:
                    messages = messages_of_row(row)
                except IdeficsKitError as exc:
                    yield Record(line=number, id=record_id, error=exc, source=source)
                else:
                    yield Record(line=number, id=record_id, messages=messages, source=source)


# -- messages of a table row (Parquet, Ray Data) ---------------------------------------------


def messages_of_row(row: Mapping[str, Any]) -> Any:
    """The ``messages`` of a table row as plain Python, ready for
    :meth:`Conversation.from_messages`.

    ``messages`` may be JSON text or nested values (Arrow structs, NumPy arrays).
    Image blocks may carry ``bytes`` (binary) or no source at all, then filled in
    order from the row's ``images`` column (a list of binary); both become base64
    blocks that the SDK decodes with its usual checks. Raises
    :class:`RecordError`/:class:`~idefics_kit.ConversationError`.
    """
    if "messages" not in row:
        raise RecordError(
            'no "messages" column; expected a list of chat messages '
            f"(Conversation.to_messages() format), found {sorted(row)}"
        )
    messages = _messages(row["messages"])
    images = row.get("images")
    if images is not None or _has_byte_blocks(messages):
        messages = _attach_images(messages, _plain(images) if images is not None else [])
    return messages


def _messages(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise RecordError(f'"messages" is a string but not valid JSON ({exc})') from None
    return _plain(value)


def _plain(value: Any) -> Any:
    """NumPy arrays as lists and mappings without null fields (Arrow structs fill absent
    keys with null), recursively."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _blocks(messages: Any) -> Iterator[dict[str, Any]]:
    if not isinstance(messages, list):
        return
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            yield from (block for block in content if isinstance(block, dict))


def _has_byte_blocks(messages: Any) -> bool:
    return any(block.get("type") == "image" and "bytes" in block for block in _blocks(messages))


def _attach_images(messages: Any, images: Any) -> Any:
    import base64

    if not isinstance(images, list):
        raise ConversationError(f'"images" must be a list of binary values, got {images!r:.60}')
    pending = list(images)
    used = 0
    for block in _blocks(messages):
        if block.get("type") != "image":
            continue
        if "bytes" in block:
            data = block.pop("bytes")
        elif not any(key in block for key in _IMAGE_SOURCES):
            if not pending:
                raise ConversationError(
                    f'the messages have more image blocks without a source than the "images" '
                    f"column has images ({len(images)})"
                )
            data = pending.pop(0)
            used += 1
        else:
            continue
        if not isinstance(data, (bytes, bytearray)):
            raise ConversationError(
                f"an image from a bytes column must be binary, got {type(data).__name__}"
            )
        block["base64"] = base64.b64encode(bytes(data)).decode("ascii")
    if pending:
        raise ConversationError(
            f'the "images" column has {len(images)} images but the messages use {used}; '
            'give every image an {"type": "image"} block without a source'
        )
    return messages


# -- rows ----------------------------------------------------------------------------------


def _row(record: Record, **fields: Any) -> Row:
    row: Row = {"id": record.id}
    if record.id is None:
        row["line"] = record.line
        if record.source is not None:
            row["input"] = record.source
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
    The keyword hint of a refused URL is given as the command-line flag too.
    """
    message = str(exc).replace("pass allow_private_network=True", "pass --allow-private-network")
    return _row(
        record,
        text=None,
        finish_reason=None,
        usage=None,
        error={"type": type(exc).__name__, "message": message},
    )


def row_key(row: object) -> Key | None:
    """The ledger key of an output row; None if ``row`` is not a row of a batch job."""
    if not isinstance(row, dict):
        return None
    record_id, line, source = row.get("id"), row.get("line"), row.get("input")
    if isinstance(record_id, str):
        return record_id
    if (
        record_id is None
        and isinstance(line, int)
        and not isinstance(line, bool)
        and (source is None or isinstance(source, str))
    ):
        return (source, line)
    return None


# -- answering -----------------------------------------------------------------------------


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


# -- the manifest ------------------------------------------------------------------------------


def _sdk_version() -> str:
    from idefics_kit import __version__

    return __version__


def _folder_fingerprint(folder: Path) -> str:
    """sha256 over every file's relative path and size, and the bytes of its small JSON
    files (config, tokenizer, processor): cheap for any checkpoint size, and any change of
    weights' size, configuration or vocabulary changes it."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in Path(relative).parts):
            continue
        size = path.stat().st_size
        digest.update(f"{relative}\0{size}\0".encode())
        if path.suffix == ".json" and size <= 4 * 1024**2:
            digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()


def _hub_revision(model_id: str) -> str | None:
    """The commit the local Hugging Face cache resolves ``main`` of ``model_id`` to, if any."""
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    ref = Path(constants.HF_HUB_CACHE) / f"models--{model_id.replace('/', '--')}" / "refs" / "main"
    with contextlib.suppress(OSError):
        return ref.read_text().strip() or None
    return None


def _plain_options(options: GenerationOptions) -> dict[str, Any]:
    fields = dataclasses.asdict(options)
    plain: dict[str, Any] = json.loads(json.dumps(fields, sort_keys=True, default=str))
    return plain


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """What writes an output: checked on every run, so that one output holds the answers
    of one model with one set of options.

    ``model`` is the id or the folder (resolved) the job loads; ``revision`` the
    hub commit in the local cache (None if not cached) or, for a folder, its
    fingerprint; ``options`` the :class:`GenerationOptions` as JSON values;
    ``inputs`` the input files (resolved paths), or a description of a dataset.
    """

    model: str
    revision: str | None
    options: Mapping[str, Any]
    inputs: tuple[str, ...]
    sdk_version: str

    @classmethod
    def create(
        cls,
        *,
        model: str | os.PathLike[str],
        options: GenerationOptions,
        inputs: Sequence[Path | str],
    ) -> Manifest:
        """The manifest of a job with these settings (reads a model folder's fingerprint)."""
        name = os.fspath(model)
        folder = Path(name)
        revision: str | None
        if name != "toy" and folder.is_dir():
            name, revision = str(folder.resolve()), _folder_fingerprint(folder)
        else:
            revision = None if name == "toy" else _hub_revision(name)
        return cls(
            model=name,
            revision=revision,
            options=_plain_options(options),
            inputs=tuple(str(Path(p).resolve()) if isinstance(p, Path) else p for p in inputs),
            sdk_version=_sdk_version(),
        )

    def to_json(self) -> dict[str, Any]:
        """The manifest file's content."""
        return {
            "format": MANIFEST_FORMAT,
            "model": self.model,
            "revision": self.revision,
            "options": dict(self.options),
            "inputs": list(self.inputs),
            "sdk_version": self.sdk_version,
        }

    @classmethod
    def from_json(cls, data: object, *, where: str) -> Manifest:
        """Read a manifest file's content; :class:`~idefics_kit.UsageError` if malformed."""
        try:
            if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
                raise TypeError("format")
            inputs = data["inputs"]
            options = data["options"]
            if not isinstance(inputs, list) or not isinstance(options, dict):
                raise TypeError("inputs")
            return cls(
                model=str(data["model"]),
                revision=None if data["revision"] is None else str(data["revision"]),
                options=options,
                inputs=tuple(str(item) for item in inputs),
                sdk_version=str(data["sdk_version"]),
            )
        except (KeyError, TypeError):
            raise UsageError(
                f"{where} is not a manifest of {MANIFEST_FORMAT!r}; fix or remove it, or start "
                "over with overwrite"
            ) from None

    def differences(self, other: Manifest) -> list[str]:
        """What differs from ``other`` (this one is the output's), one phrase each."""
        found: list[str] = []

        def differ(name: str, mine: object, theirs: object) -> None:
            if mine != theirs:
                found.append(f"{name} {_short(mine)} then, {_short(theirs)} now")

        differ("model", self.model, other.model)
        if self.model == other.model:
            differ("model revision", self.revision, other.revision)
        for name in sorted(set(self.options) | set(other.options)):
            differ(f"option {name}", self.options.get(name), other.options.get(name))
        differ("inputs", list(self.inputs), list(other.inputs))
        differ("SDK version", self.sdk_version, other.sdk_version)
        return found


def _short(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# -- the lock ----------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return data
    return {}


class _Lock:
    """One writer per output: an exclusive ``flock`` on a lock file holding the owner's pid.

    The kernel drops the lock when its process ends, however it ends, so the
    lock of a process that is gone is simply taken over; the file's content
    (pid, host, start time) is only for messages. The file is removed on
    release; a process that locked the removed file notices and tries again.
    """

    def __init__(self, path: Path, what: Path) -> None:
        self.path = path
        self.previous: dict[str, Any] = {}
        self._fd: int | None = None
        for _ in range(100):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UsageError(
                    f"cannot create the lock file {str(path)!r} of {what}: "
                    f"{exc.strerror or exc}; check that its folder is writable"
                ) from None
            if not _try_lock(fd):
                os.close(fd)
                owner = _owner(path)
                who = f"process {owner.get('pid', '?')} on {owner.get('host', '?')}"
                raise OutputBusyError(
                    f"{what} is being written by another job ({who}, since "
                    f"{owner.get('started', '?')}); wait for it to end, or stop it first"
                )
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the owner released (and removed) it meanwhile: lock the new one
        else:  # pragma: no cover - 100 owners in a row released it under us
            raise OutputBusyError(f"{what}: could not take its lock {path}")
        self._fd = fd
        self.previous = _owner(path)
        content = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(content).encode() + b"\n", 0)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - byte-range lock, dropped on exit too
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


# -- the ledger and row files ----------------------------------------------------------------


@dataclass(slots=True)
class Ledger:
    """The inputs of an output that have their row: key -> whether that row is an error."""

    rows: dict[Key, bool] = field(default_factory=dict)

    def add(self, key: Key, error: bool) -> None:
        """Record (or replace) the row of ``key``."""
        self.rows[key] = error

    def has(self, key: Key) -> bool:
        """Whether ``key`` has a row."""
        return key in self.rows

    def is_error(self, key: Key) -> bool:
        """Whether ``key``'s row is an error row."""
        return self.rows.get(key, False)

    @property
    def done(self) -> int:
        """Rows with an answer."""
        return sum(not error for error in self.rows.values())

    @property
    def errors(self) -> int:
        """Error rows."""
        return sum(self.rows.values())


def _encode_row(row: Row) -> bytes:
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (from a JSON escape in the input)
        return (json.dumps(row) + "\n").encode("ascii")


def _jsonl_rows(path: Path, *, repair: bool) -> Iterator[tuple[Key, Row, bytes]]:
    """The rows of a row file, in order. A partial last line (a crash mid-write) is cut
    away with ``repair``, else skipped; a line that is not a row raises UsageError."""
    try:
        file = open(path, "r+b" if repair else "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"cannot open output file {str(path)!r}: {exc.strerror or exc}") from None
    with file:
        offset = 0
        for number, raw in enumerate(file, start=1):
            if not raw.endswith(b"\n"):
                if repair:
                    file.truncate(offset)
                break
            offset += len(raw)
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (ValueError, RecursionError):
                row = None
            key = row_key(row)
            if key is None:
                raise UsageError(
                    f"line {number} of the output file {str(path)!r} is not a row of a batch "
                    "job; use another output, or fix or remove that file"
                )
            assert isinstance(row, dict)
            yield key, row, raw


def _has_partial_line(path: Path) -> bool:
    with contextlib.suppress(OSError), open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        if file.tell() == 0:
            return False
        file.seek(-1, os.SEEK_END)
        return file.read(1) != b"\n"
    return False


def _fsync_dir(folder: Path) -> None:
    if sys.platform == "win32":  # pragma: no cover - directories cannot be opened there
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Write ``target`` anew through a temporary file beside it: written, fsync'd, renamed
    over ``target`` (atomic), directory fsync'd. A crash leaves the old or the new file."""
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    _fsync_dir(target.parent)


class RowWriter:
    """Appends rows to a JSONL file; each row is one write, flushed and fsync'd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        try:
            self._file: BinaryIO = open(path, "ab")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise UsageError(
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


# -- outputs -----------------------------------------------------------------------------------


class JobOutput:
    """An output being written by one job: locked, manifest checked, repaired, its ledger
    read. Use :meth:`JsonlOutput.open` or :meth:`PartsOutput.open`.

    :meth:`write` appends a row; a row for an input that already has a row (an
    error row being retried) goes to the retry journal, merged into the output
    by :meth:`close` (and, after a crash, by the next open). Counts of this
    run: ``written``, ``errors`` (of those, error rows), ``retried`` (of those,
    replacing an earlier error row).
    """

    manifest_path: Path
    lock_path: Path
    journal_path: Path

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ledger = Ledger()
        self.notes: list[str] = []
        self.written = 0
        self.errors = 0
        self.retried = 0
        self._lock: _Lock | None = None
        self._journal: RowWriter | None = None

    # -- opening

    def _open(
        self, manifest: Manifest | None, *, overwrite: bool, note: Callable[[str], None]
    ) -> None:
        self._lock = _Lock(self.lock_path, self.path)
        try:
            if self._lock.previous.get("pid") is not None:
                note(
                    f"took over the lock of {self.path} from process {self._lock.previous['pid']}, "
                    "which is gone"
                )
            found = _read_manifest(self.manifest_path)
            if manifest is not None and found is not None and not overwrite:
                differences = found.differences(manifest)
                if differences:
                    raise OutputMismatchError(
                        f"{self.path} was written with other settings: {'; '.join(differences)}. "
                        "Rerun with the same settings to resume, write to another output, or "
                        "start over with overwrite=True",
                        differences,
                    )
            if overwrite:
                self._remove_rows()
                with contextlib.suppress(FileNotFoundError):
                    self.journal_path.unlink()
                if self.has_rows():
                    raise UsageError(f"could not remove the rows of {self.path}")
            self._remove_temporaries()
            merged = self._merge_journal()
            if merged:
                note(f"merged {merged} rows of an interrupted retry into {self.path}")
            if self._scan(repair=True):
                note(f"removed a partial last line from {self.path} (an interrupted write)")
            if manifest is not None and (found is None or overwrite):
                if found is None and self.ledger.rows:
                    note(
                        f"{self.path} had no manifest (an older idefics-kit): recording this run's"
                    )
                _write_manifest(self.manifest_path, manifest)
        except BaseException:
            self._lock.release()
            raise

    # -- subclass hooks

    def has_rows(self) -> bool:
        raise NotImplementedError

    def _scan(self, *, repair: bool) -> bool:
        """Read the ledger; True if a partial line was cut (or, without repair, found)."""
        raise NotImplementedError

    def _remove_rows(self) -> None:
        raise NotImplementedError

    def _remove_temporaries(self) -> None:
        raise NotImplementedError

    def _apply(self, replacements: Mapping[Key, tuple[Row, bytes]]) -> None:
        """Rewrite the row files so that each key of ``replacements`` has that row."""
        raise NotImplementedError

    def _append(self, row: Row) -> None:
        raise NotImplementedError

    def _close_rows(self) -> None:
        raise NotImplementedError

    # -- writing

    def write(self, row: Row) -> None:
        """Write the row of an input: appended, or journaled if it replaces an error row."""
        key = row_key(row)
        if key is None:
            raise UsageError(f"not a row of a batch job: {str(row)[:80]}")
        error = row.get("error") is not None
        # A Ctrl-C meanwhile takes effect once the row is written and counted.
        with _sigint_deferred():
            if self.ledger.has(key):
                if self._journal is None:
                    self._journal = RowWriter(self.journal_path)
                self._journal.write(row)
                self.retried += 1
            else:
                self._append(row)
            self.ledger.add(key, error)
            self.written += 1
            self.errors += error

    def _merge_journal(self) -> int:
        """Merge the retry journal into the row files (atomically per file); its row count."""
        if not self.journal_path.exists():
            return 0
        replacements = {
            key: (row, raw) for key, row, raw in _jsonl_rows(self.journal_path, repair=True)
        }
        if replacements:
            self._apply(replacements)
        self.journal_path.unlink()
        _fsync_dir(self.journal_path.parent)
        return len(replacements)

    def close(self) -> None:
        """Merge this run's retried rows, close the files, release the lock."""
        try:
            self._close_rows()
            if self._journal is not None:
                self._journal.close()
                self._journal = None
                with _sigint_deferred():
                    self._merge_journal()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    def __enter__(self) -> JobOutput:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _read_manifest(path: Path) -> Manifest | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"cannot read the manifest {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    return Manifest.from_json(data, where=str(path))


def _write_manifest(path: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.to_json(), indent=2, ensure_ascii=False) + "\n"

    def write(temporary: Path) -> None:
        temporary.write_text(text, encoding="utf-8")

    _replace_atomically(path, write)


class JsonlOutput(JobOutput):
    """One JSONL file of rows (``idefics-kit batch -o answers.jsonl``), in input order.

    Beside it: ``answers.jsonl.manifest.json``, while a job runs
    ``answers.jsonl.lock``, and while a retry runs ``answers.jsonl.retry``.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.manifest_path = path.with_name(path.name + ".manifest.json")
        self.lock_path = path.with_name(path.name + ".lock")
        self.journal_path = path.with_name(path.name + ".retry")
        self._writer: RowWriter | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        manifest: Manifest | None,
        *,
        overwrite: bool = False,
        note: Callable[[str], None] = lambda text: None,
    ) -> JsonlOutput:
        """Lock, check, repair and read the output file; close it (or use ``with``) after.

        ``manifest``: this run's settings, checked against the output's manifest
        (and recorded when there is none); None skips the check (tools that only
        repair or read). ``overwrite`` removes the rows first. ``note`` receives
        what was repaired or taken over.
        """
        output = cls(Path(path))
        if output.path.is_dir():
            raise UsageError(f"the output {str(path)!r} is a folder; give a file")
        if not output.path.parent.is_dir():
            raise UsageError(f"cannot write output file {str(path)!r}: no such folder")
        output._open(manifest, overwrite=overwrite, note=note)
        return output

    def has_rows(self) -> bool:
        return self.path.exists()

    def _scan(self, *, repair: bool) -> bool:
        self.ledger = Ledger()
        partial = not repair and _has_partial_line(self.path)
        cut = repair and _has_partial_line(self.path)
        for key, row, _ in _jsonl_rows(self.path, repair=repair):
            self.ledger.add(key, row.get("error") is not None)
        return cut or partial

    def _remove_rows(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _remove_temporaries(self) -> None:
        for leftover in self.path.parent.glob(f".{_glob_escape(self.path.name)}.*.tmp"):
            leftover.unlink()

    def _apply(self, replacements: Mapping[Key, tuple[Row, bytes]]) -> None:
        _rewrite_jsonl(self.path, replacements)

    def _append(self, row: Row) -> None:
        if self._writer is None:
            self._writer = RowWriter(self.path)
        self._writer.write(row)

    def _close_rows(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> JsonlOutput:
        return self


def _glob_escape(name: str) -> str:
    """``name`` with glob characters escaped, for a pattern in its folder."""
    return re.sub(r"([*?[])", r"[\1]", name)


def _rewrite_jsonl(path: Path, replacements: Mapping[Key, tuple[Row, bytes]]) -> None:
    rows = list(_jsonl_rows(path, repair=True))
    if not any(key in replacements for key, _, _ in rows):
        return

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as file:
            for key, _, raw in rows:
                file.write(replacements[key][1] if key in replacements else raw)

    _replace_atomically(path, write)


_PART = re.compile(r"part-(\d{5})(?:-[0-9a-f]{8})?(?:-\d{5})?\.(jsonl|parquet)")


def row_schema() -> Any:
    """The Arrow schema of answer rows (``id``, ``text``, ``finish_reason``, ``usage``,
    ``error``); needs pyarrow."""
    import pyarrow as pa

    usage = pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())])
    error = pa.struct([("type", pa.string()), ("message", pa.string())])
    return pa.schema(
        [
            ("id", pa.string()),
            ("text", pa.string()),
            ("finish_reason", pa.string()),
            ("usage", usage),
            ("error", error),
        ]
    )


def _part_schema() -> Any:
    """Parquet parts also hold the ``line`` and ``input`` of rows without a readable id."""
    import pyarrow as pa

    schema = row_schema()
    fields = [schema.field("id"), pa.field("line", pa.int64()), pa.field("input", pa.string())]
    return pa.schema([*fields, *list(schema)[1:]])


def _part_row(row: Row) -> Row:
    return {"line": None, "input": None, **row}


def _plain_part_row(row: Row) -> Row:
    """A Parquet part's row as a JSONL row (no null ``line``/``input``)."""
    plain = {key: value for key, value in row.items() if key not in ("line", "input")}
    if row.get("id") is None:
        plain = {"id": None, "line": row.get("line"), **plain}
        if row.get("input") is not None:
            plain["input"] = row["input"]
    return plain


class PartsOutput(JobOutput):
    """A folder of part files (``batch --ray -o answers/``): ``part-RRRRR-TTTTTTTT.jsonl``
    per run (``RRRRR`` counts runs, ``TTTTTTTT`` is random, so no two runs share a
    name), or Parquet parts ``part-RRRRR-TTTTTTTT-SSSSS.parquet`` written aside and
    renamed into place every ``flush_rows`` rows. Rows come in the order they finish.

    In the folder: ``_manifest.json``, while a job runs ``.lock``, while a retry
    runs ``.retry.jsonl``.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        # "_" and "." names are skipped by pyarrow's (and Spark's) folder readers.
        self.manifest_path = path / "_manifest.json"
        self.lock_path = path / ".lock"
        self.journal_path = path / ".retry.jsonl"
        self.format: OutputFormat | None = None
        self.run = 0
        self._kind: OutputFormat = "jsonl"
        self._flush_rows = 1000
        self._token = uuid.uuid4().hex[:8]
        self._buffer: list[Row] = []
        self._seq = 0
        self._jsonl: RowWriter | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        manifest: Manifest | None,
        *,
        output_format: OutputFormat | None = None,
        flush_rows: int = 1000,
        overwrite: bool = False,
        note: Callable[[str], None] = lambda text: None,
    ) -> PartsOutput:
        """Create (if needed), lock, check, repair and read the folder; close it after.

        ``output_format``: the parts' format; default the format of the parts
        already there, else Parquet if the folder name ends in ``.parquet``.
        """
        output = cls(Path(path))
        if output.path.exists() and not output.path.is_dir():
            raise UsageError(
                f"the output {str(path)!r} is a file; a Ray job writes a folder of part files"
            )
        output.path.mkdir(parents=True, exist_ok=True)
        output._open(manifest, overwrite=overwrite, note=note)
        try:
            output._kind = output._choose_format(output_format)
        except BaseException:
            output.close()
            raise
        output._flush_rows = flush_rows
        return output

    def _parts(self) -> list[tuple[int, Path]]:
        return sorted(
            (int(match.group(1)), path)
            for path in self.path.iterdir()
            if (match := _PART.fullmatch(path.name))
        )

    def _choose_format(self, requested: OutputFormat | None) -> OutputFormat:
        found = self.format
        kind = (
            requested or found or ("parquet" if self.path.suffix.lower() == ".parquet" else "jsonl")
        )
        if kind not in ("jsonl", "parquet"):
            raise UsageError(f"output_format must be 'jsonl' or 'parquet', got {kind!r}")
        if found is not None and found != kind:
            raise UsageError(
                f"the output folder {str(self.path)!r} already holds {found} parts; "
                f"cannot add {kind} parts to it"
            )
        return kind

    def has_rows(self) -> bool:
        return bool(self._parts())

    def _scan(self, *, repair: bool) -> bool:
        self.ledger = Ledger()
        parts = self._parts()
        formats = {path.suffix for _, path in parts}
        if len(formats) > 1:
            raise UsageError(
                f"the output folder {str(self.path)!r} holds both JSONL and Parquet parts"
            )
        self.format = None if not formats else ("parquet" if formats == {".parquet"} else "jsonl")
        self.run = parts[-1][0] + 1 if parts else 0
        partial = False
        for _, path in parts:
            if path.suffix == ".jsonl":
                partial |= _has_partial_line(path)
                for key, row, _ in _jsonl_rows(path, repair=repair):
                    self.ledger.add(key, row.get("error") is not None)
                continue
            for row in _read_part_table(path).to_pylist():
                self.ledger.add(_part_key(path, row), row.get("error") is not None)
        return partial

    def _remove_rows(self) -> None:
        for _, path in self._parts():
            path.unlink()

    def _remove_temporaries(self) -> None:
        for leftover in self.path.glob(".*.tmp"):  # an interrupted flush or rewrite
            leftover.unlink()

    def _apply(self, replacements: Mapping[Key, tuple[Row, bytes]]) -> None:
        for _, path in self._parts():
            if path.suffix == ".jsonl":
                _rewrite_jsonl(path, replacements)
                continue
            rows = _read_part_table(path).to_pylist()
            keys = [_part_key(path, row) for row in rows]
            if any(key in replacements for key in keys):
                new = [
                    _part_row(replacements[key][0]) if key in replacements else row
                    for key, row in zip(keys, rows, strict=True)
                ]
                _replace_atomically(path, functools.partial(_write_parquet, rows=new))

    def _append(self, row: Row) -> None:
        if self._kind == "jsonl":
            if self._jsonl is None:
                name = f"part-{self.run:05d}-{self._token}.jsonl"
                self._jsonl = RowWriter(self.path / name)
            self._jsonl.write(row)
            return
        self._buffer.append(row)
        if len(self._buffer) >= self._flush_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered Parquet rows as one part file (written aside, then renamed)."""
        if not self._buffer:
            return
        target = self.path / f"part-{self.run:05d}-{self._token}-{self._seq:05d}.parquet"
        rows = [_part_row(row) for row in self._buffer]
        _replace_atomically(target, lambda temporary: _write_parquet(temporary, rows))
        self._buffer.clear()
        self._seq += 1

    def _close_rows(self) -> None:
        self.flush()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> PartsOutput:
        return self


def _part_key(path: Path, row: Row) -> Key:
    key = row_key(_plain_part_row(row))
    if key is None:
        raise UsageError(f"a row of {path} is not a row of a batch job: {str(row)[:80]}")
    return key


def _read_part_table(path: Path) -> Any:
    pq = _parquet()
    import pyarrow as pa

    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"cannot read the output part {str(path)!r}: {exc}") from None


def _write_parquet(path: Path, rows: list[Row]) -> None:
    import pyarrow as pa

    _parquet().write_table(pa.Table.from_pylist(rows, schema=_part_schema()), path)


# -- status ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class JobStatus:
    """How far an output is, read without running anything (:func:`status`)."""

    output: Path
    manifest: Manifest | None
    """What wrote it (None for an output of an older idefics-kit)."""
    inputs: int | None
    """Inputs of the job (None when unknown: no manifest, or an input is gone)."""
    done: int
    """Rows with an answer."""
    errors: int
    """Error rows (``--retry-errors`` runs them again)."""
    remaining: int | None
    """Inputs without a row yet (None when unknown)."""
    retry_pending: int
    """Rows of an unfinished retry, merged by the next run."""
    running: int | None
    """The pid of the job writing it now, or None."""
    note: str | None = None
    """Why ``inputs``/``remaining`` are unknown, when they are."""

    def to_json(self) -> dict[str, Any]:
        """The status as JSON values."""
        return {
            "output": str(self.output),
            "manifest": None if self.manifest is None else self.manifest.to_json(),
            "inputs": self.inputs,
            "done": self.done,
            "errors": self.errors,
            "remaining": self.remaining,
            "retry_pending": self.retry_pending,
            "running": self.running,
            "note": self.note,
        }


def status(output: str | os.PathLike[str]) -> JobStatus:
    """How far ``output`` (a JSONL file, or a folder of part files) is: rows done, error
    rows, inputs remaining (from the inputs its manifest records) and the pid of a job
    writing it now. Reads only; :class:`~idefics_kit.UsageError` if there is no output."""
    path = Path(output)
    job: JobOutput = PartsOutput(path) if path.is_dir() else JsonlOutput(path)
    if not any(p.exists() for p in (path, job.manifest_path, job.lock_path)):
        raise UsageError(f"no batch output at {str(path)!r}")
    manifest = _read_manifest(job.manifest_path)
    job._scan(repair=False)
    pending = 0
    if job.journal_path.exists():
        for key, row, _ in _jsonl_rows(job.journal_path, repair=False):
            pending += 1
            job.ledger.add(key, row.get("error") is not None)
    owner = _owner(job.lock_path) if job.lock_path.exists() else {}
    pid = owner.get("pid")
    running = (
        pid
        if isinstance(pid, int) and owner.get("host") == socket.gethostname() and _alive(pid)
        else None
    )
    inputs: int | None = None
    remaining: int | None = None
    note: str | None = None
    if manifest is None:
        note = "no manifest (an older idefics-kit): the inputs are unknown"
    else:
        try:
            paths = [Path(item) for item in manifest.inputs]
            if not all(path.is_file() for path in paths):
                raise UsageError("an input file of the manifest is gone")
            index = index_inputs(paths)
        except UsageError as exc:
            note = f"cannot count the inputs: {exc}"
        else:
            inputs = len(index.keys)
            remaining = sum(not job.ledger.has(key) for key in index.keys)
    return JobStatus(
        output=path,
        manifest=manifest,
        inputs=inputs,
        done=job.ledger.done,
        errors=job.ledger.errors,
        remaining=remaining,
        retry_pending=pending,
        running=running,
        note=note,
    )
