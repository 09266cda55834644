"""Batch jobs on a Ray Data cluster: one Generator per actor, every input answered once.

Needs the ``ray`` extra (``pip install 'idefics-kit[ray]'``); ``import
idefics_kit`` never imports this module or Ray.

Two entry points:

* :class:`Predictor`, a callable class for ``Dataset.map_batches(...,
  compute=ActorPoolStrategy(...))``. Each actor loads one
  :class:`~idefics_kit.Generator` and answers its batch with
  ``generate_batch(on_error="return")``; a bad row becomes an error row, never
  a failed block. Input rows have an ``id`` and ``messages`` (the
  :meth:`Conversation.to_messages` format, as nested values or as a JSON
  string); images are ``path``/``url``/``base64`` blocks, ``bytes`` blocks
  (binary), or ``{"type": "image"}`` placeholders filled in order from an
  ``images`` column (a list of binary). Output columns: ``id``, ``text``,
  ``finish_reason``, ``usage`` (``prompt_tokens``, ``completion_tokens``) and
  ``error`` (``type``, ``message``): :data:`ROW_SCHEMA`.
* :func:`run_batch`, a one-call job: JSONL or Parquet files (or a Dataset) in,
  a folder of part files out whose rows are exactly those of ``idefics-kit
  batch``. Duplicate ids are refused before any model work; a rerun skips the
  ids already written (the output folder is the checkpoint); the driver is
  the only writer and writes each id once, so retried Ray tasks (a killed
  actor is restarted and its batch retried) cannot duplicate a row.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data

from idefics_kit._cli_batch import (
    Done,
    Record,
    RecordError,
    RowWriter,
    _check_unique,
    conversation_of,
    error_row,
    find_duplicate,
    read_done,
    read_records,
    result_row,
)
from idefics_kit._cli_common import CliExit
from idefics_kit.conversation import Conversation
from idefics_kit.errors import (
    ConversationError,
    IdeficsKitError,
    InvalidParameterError,
    RuntimeFailure,
    UsageError,
)
from idefics_kit.options import GenerationOptions

if TYPE_CHECKING:
    from idefics_kit.devices import DeviceLike, DTypeLike
    from idefics_kit.generator import Generator

__all__ = ["ROW_SCHEMA", "JobSummary", "Predictor", "run_batch"]

Row = dict[str, Any]
OutputFormat = Literal["jsonl", "parquet"]

_USAGE = pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())])
_ERROR = pa.struct([("type", pa.string()), ("message", pa.string())])

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("usage", _USAGE),
        ("error", _ERROR),
    ]
)
"""The columns :class:`Predictor` returns (usage and error are null when absent)."""

# Parquet part files also hold the rows of input lines without a readable id.
_PARQUET_SCHEMA = pa.schema([ROW_SCHEMA.field("id"), ("line", pa.int64()), *list(ROW_SCHEMA)[1:]])

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_PART = re.compile(r"part-(\d{5})(?:-\d{5})?\.(jsonl|parquet)")
_IMAGE_SOURCES = ("path", "url", "base64", "image")
_DEFAULT_BATCH_SIZE = 8


# -- the actor ---------------------------------------------------------------------


class Predictor:
    """Answers a Ray Data batch with one Generator; use it with ``map_batches``.

    >>> ds.map_batches(  # doctest: +SKIP
    ...     Predictor,
    ...     fn_constructor_kwargs={"model": "HuggingFaceM4/idefics2-8b"},
    ...     compute=ray.data.ActorPoolStrategy(size=4),
    ...     num_gpus=1,
    ...     batch_size=32,
    ...     batch_format="pyarrow",
    ... )

    ``model``, ``device``, ``dtype`` and ``load_options`` go to
    :meth:`Generator.from_pretrained`. ``batch_size`` is the model batch
    inside one call (a Ray batch of 32 rows runs as 4 model calls of 8,
    grouped by prompt length). On the CPU, torch gets ``num_threads`` threads
    (default: the CPUs Ray assigned to this actor, at least 1).
    ``allow_private_network`` lets URL images come from loopback and private
    addresses (refused by default, in every actor).

    A call returns a ``pyarrow.Table`` with :data:`ROW_SCHEMA`, one row per
    input row in input order. A row that cannot be answered (no id, bad
    messages, an unreadable or refused image, a prompt too long...) gets an
    ``error`` and null ``text``/``finish_reason``/``usage``; the others go on.
    """

    def __init__(
        self,
        model: str = "toy",
        *,
        device: DeviceLike = "auto",
        dtype: DTypeLike = "auto",
        options: GenerationOptions | Mapping[str, Any] | None = None,
        batch_size: int = _DEFAULT_BATCH_SIZE,
        allow_private_network: bool = False,
        num_threads: int | None = None,
        load_options: Mapping[str, Any] | None = None,
    ) -> None:
        from idefics_kit import Generator

        self.options = (
            options
            if isinstance(options, GenerationOptions)
            else GenerationOptions(**dict(options or {}))
        )
        self.batch_size = batch_size
        self.allow_private_network = allow_private_network
        if _in_actor():  # an actor's own process: no weight-loading bars in the driver's log
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        self.generator: Generator = Generator.from_pretrained(
            model, device=device, dtype=dtype, **dict(load_options or {})
        )
        self.threads: int | None = None
        if self.generator.device.type == "cpu":
            import torch

            threads = num_threads if num_threads is not None else _assigned_cpus()
            # Ray's CPUs are a scheduling promise; never more threads than the node has.
            self.threads = max(1, min(threads, os.cpu_count() or threads))
            torch.set_num_threads(self.threads)

    def __call__(self, batch: Any) -> pa.Table:
        """Answer every row of ``batch`` (a pyarrow Table, pandas DataFrame or dict of arrays)."""
        rows = _rows_of(batch)
        out: list[Row | None] = [None] * len(rows)
        waiting: list[tuple[int, Record]] = []
        conversations: list[Conversation] = []
        for position, row in enumerate(rows):
            record_id = row.get("id")
            record = Record(0, str(record_id) if isinstance(record_id, str) and record_id else None)
            try:
                if record.id is None:
                    raise RecordError(f'"id" must be a non-empty string, got {record_id!r}')
                conversation = self._conversation(row)
            except IdeficsKitError as exc:
                out[position] = error_row(record, exc)
            else:
                waiting.append((position, record))
                conversations.append(conversation)
        if conversations:
            results = self.generator.generate_batch(
                conversations, self.options, batch_size=self.batch_size, on_error="return"
            )
            for (position, record), result in zip(waiting, results, strict=True):
                out[position] = result_row(record, result)
        return pa.Table.from_pylist(out, schema=ROW_SCHEMA)

    def _conversation(self, row: Mapping[str, Any]) -> Conversation:
        if "messages" not in row:
            raise RecordError(
                'no "messages" column; expected a list of chat messages '
                f"(Conversation.to_messages() format), found {sorted(row)}"
            )
        messages = _messages(row["messages"])
        images = row.get("images")
        if images is not None or _has_byte_blocks(messages):
            messages = _attach_images(messages, _plain(images) if images is not None else [])
        return conversation_of(messages, allow_private_network=self.allow_private_network)


def _in_actor() -> bool:
    with contextlib.suppress(Exception):
        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    return False


def _assigned_cpus() -> int:
    """The CPUs Ray assigned to this worker (at least 1), else OMP_NUM_THREADS, else 1."""
    cpus: float | None = None
    with contextlib.suppress(Exception):
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if cpus is None:
        with contextlib.suppress(ValueError):
            cpus = float(os.environ.get("OMP_NUM_THREADS", "1"))
    return max(1, int(cpus or 1))


def _rows_of(batch: Any) -> list[dict[str, Any]]:
    if isinstance(batch, pa.Table):
        rows: list[dict[str, Any]] = batch.to_pylist()
        return rows
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas.DataFrame
        return list(batch.to_dict("records"))
    if isinstance(batch, Mapping):
        columns = {str(name): list(values) for name, values in batch.items()}
        count = len(next(iter(columns.values()), []))
        return [{name: values[i] for name, values in columns.items()} for i in range(count)]
    raise TypeError(
        f"Predictor expects a pyarrow Table, pandas DataFrame or dict of arrays, got "
        f"{type(batch).__name__}"
    )


def _messages(value: Any) -> Any:
    """Messages as plain Python: a JSON string is parsed, Arrow/NumPy values made plain."""
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
    """Give ``bytes`` blocks and source-less image blocks (filled in order from the
    ``images`` column) the base64 source the SDK decodes with its usual checks."""
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


# -- inputs ---------------------------------------------------------------------------


@dataclass
class _Inputs:
    """The inputs of a job: how many, which ids are left, and how to build their dataset."""

    total: int
    pending_ids: set[str] = field(default_factory=set)
    driver_rows: list[Row] = field(default_factory=list)
    """Rows the driver writes itself: JSONL lines that are not records (no model work)."""
    build: Callable[[], Any] | None = None
    """Makes the ray Dataset of the pending rows (called once Ray is up)."""
    spare_cpus: int = 1
    """CPUs to leave to Ray Data's read tasks (none for rows the driver hands over)."""


@contextlib.contextmanager
def _usage_errors() -> Iterator[None]:
    """The CLI helpers raise CliExit; the Python API raises UsageError."""
    try:
        yield
    except CliExit as exc:
        raise UsageError(exc.message) from None


def _paths(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    raw = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not raw:
        raise UsageError("no input files given")
    paths: list[Path] = []
    for item in raw:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.iterdir() if p.suffix.lower() in _JSONL_SUFFIXES + _PARQUET_SUFFIXES
            )
            if not found:
                raise UsageError(f"input folder {str(path)!r} holds no .jsonl or .parquet files")
            paths.extend(found)
        elif not path.is_file():
            raise UsageError(f"input file {str(path)!r} not found")
        else:
            paths.append(path)
    return paths


def _format_of(paths: list[Path]) -> Literal["jsonl", "parquet"]:
    kinds = {"parquet" if p.suffix.lower() in _PARQUET_SUFFIXES else "jsonl" for p in paths}
    if len(kinds) > 1:
        raise UsageError("the input files mix JSONL and Parquet; give one format at a time")
    if kinds == {"jsonl"} and len(paths) > 1:
        raise UsageError(
            f"give one JSONL input file (or any number of Parquet files); got {len(paths)}"
        )
    return "parquet" if kinds == {"parquet"} else "jsonl"


def _jsonl_inputs(path: Path, done: Done, per_task: int) -> _Inputs:
    """Index, check and parse a JSONL file in the driver (the same checks as the local
    command); the pending records travel to the actors with their messages as JSON text."""
    with _usage_errors():
        index = [(record.line, record.id) for record in read_records(path)]
        _check_unique(index, path)
        inputs = _Inputs(total=len(index), spare_cpus=0)
        items: list[Row] = []
        for record in read_records(path):
            if done.has(record.line, record.id):
                continue
            if record.error is not None or record.id is None:
                inputs.driver_rows.append(error_row(record, record.error or RecordError("no id")))
                continue
            # ensure_ascii: Arrow strings must be valid UTF-8, and a lone surrogate is not.
            items.append({"id": record.id, "messages": json.dumps(record.messages)})
            inputs.pending_ids.add(record.id)

    def build() -> Any:
        return ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / per_task))

    inputs.build = build if items else None
    return inputs


def _where(positions: Sequence[tuple[str, int]], numbers: Sequence[int]) -> str:
    places = [positions[number] for number in numbers]
    if len({name for name, _ in places}) == 1:
        rows = [str(row) for _, row in places]
        joined = rows[0] if len(rows) == 1 else f"{', '.join(rows[:-1])} and {rows[-1]}"
        return f"rows {joined} of {places[0][0]}"
    return " and ".join(f"row {row} of {name}" for name, row in places)


def _table_inputs(
    make: Callable[[], Any], ids: list[Any], positions: list[tuple[str, int]], done: Done
) -> _Inputs:
    """Check the ids of a Parquet/Dataset input; build its dataset without the done rows."""
    for number, record_id in enumerate(ids):
        if not isinstance(record_id, str) or not record_id:
            name, row = positions[number]
            raise UsageError(
                f'row {row} of {name}: "id" must be a non-empty string, got {record_id!r}; '
                "every row needs a unique string id"
            )
    duplicate = find_duplicate(enumerate(ids))
    if duplicate is not None:
        record_id, numbers = duplicate
        raise UsageError(
            f"duplicate id {record_id!r} on {_where(positions, numbers)}; every id must be unique"
        )
    pending = {record_id for record_id in ids if record_id not in done.ids}
    inputs = _Inputs(total=len(ids), pending_ids=pending)

    def build() -> Any:
        dataset = make()
        if len(pending) == len(ids):
            return dataset
        return dataset.map_batches(
            _keep_pending,
            fn_kwargs={"pending": pa.array(sorted(pending), type=pa.string())},
            batch_format="pyarrow",
            batch_size=None,
        )

    inputs.build = build if pending else None
    return inputs


def _keep_pending(batch: pa.Table, pending: pa.Array) -> pa.Table:
    """Drop the rows whose id already has an output row (fused into the read tasks)."""
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch.column("id").cast(pa.string()), value_set=pending))


def _parquet_inputs(paths: list[Path], done: Done) -> _Inputs:
    ids: list[Any] = []
    positions: list[tuple[str, int]] = []
    columns: set[str] = set()
    for path in paths:
        try:
            schema = pq.read_schema(path)
            if "id" not in schema.names or "messages" not in schema.names:
                raise UsageError(
                    f"{path} has the columns {schema.names}; an input needs an 'id' and a "
                    "'messages' column (and, for image bytes, optionally 'images')"
                )
            column = pq.read_table(path, columns=["id"]).column("id").to_pylist()
        except (OSError, pa.ArrowException) as exc:
            raise UsageError(f"cannot read the Parquet input {str(path)!r}: {exc}") from None
        columns.update(name for name in ("id", "messages", "images") if name in schema.names)
        ids.extend(column)
        positions.extend((str(path), row) for row in range(1, len(column) + 1))
    files = [str(path.resolve()) for path in paths]
    return _table_inputs(
        lambda: ray.data.read_parquet(files).select_columns(sorted(columns)), ids, positions, done
    )


def _dataset_inputs(dataset: Any, done: Done) -> _Inputs:
    names = dataset.columns()
    if "id" not in names or "messages" not in names:
        raise UsageError(f"the dataset has the columns {names}; it needs 'id' and 'messages'")
    ids: list[Any] = []
    for batch in dataset.select_columns(["id"]).iter_batches(
        batch_size=None, batch_format="pyarrow"
    ):
        ids.extend(batch.column("id").to_pylist())
    positions = [("the dataset", row) for row in range(1, len(ids) + 1)]
    return _table_inputs(lambda: dataset, ids, positions, done)


# -- output: a folder of part files ------------------------------------------------------


def _read_output(folder: Path) -> tuple[Done, OutputFormat | None, int]:
    """The rows already written (the job's checkpoint), the parts' format, the next run."""
    done = Done()
    if not folder.exists():
        return done, None, 0
    if not folder.is_dir():
        raise UsageError(
            f"the output {str(folder)!r} is a file; a Ray job writes a folder of part files"
        )
    for leftover in folder.glob(".part-*.tmp"):  # an interrupted Parquet flush
        leftover.unlink()
    parts = sorted(
        (int(match.group(1)), path)
        for path in folder.iterdir()
        if (match := _PART.fullmatch(path.name))
    )
    formats = {path.suffix for _, path in parts}
    if len(formats) > 1:
        raise UsageError(f"the output folder {str(folder)!r} holds both JSONL and Parquet parts")
    for _, path in parts:
        if path.suffix == ".jsonl":
            with _usage_errors():
                part = read_done(path)
            done.ids |= part.ids
            done.lines |= part.lines
            done.rows += part.rows
            done.truncated |= part.truncated
            continue
        try:
            table = pq.read_table(path, columns=["id", "line"])
        except (OSError, pa.ArrowException) as exc:
            raise UsageError(f"cannot read the output part {str(path)!r}: {exc}") from None
        for row in table.to_pylist():
            done.add(row if row["id"] is None else {"id": row["id"]})
    found: OutputFormat | None = None
    if formats:
        found = "parquet" if formats == {".parquet"} else "jsonl"
    return done, found, (parts[-1][0] + 1 if parts else 0)


class _Writer:
    """This run's part file(s). JSONL: one file, each row appended, flushed and fsync'd.
    Parquet: a new file every ``flush_rows`` rows, written aside and renamed into place."""

    def __init__(self, folder: Path, run: int, kind: OutputFormat, flush_rows: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.run, self.flush_rows = folder, run, flush_rows
        self.count = 0
        self._buffer: list[Row] = []
        self._seq = 0
        self._jsonl: RowWriter | None = None
        if kind == "jsonl":
            with _usage_errors():
                self._jsonl = RowWriter(folder / f"part-{run:05d}.jsonl")

    def write(self, row: Row) -> None:
        if self._jsonl is not None:
            self._jsonl.write(row)
        else:
            self._buffer.append(row)
            if len(self._buffer) >= self.flush_rows:
                self.flush()
        self.count += 1

    def flush(self) -> None:
        if not self._buffer:
            return
        name = f"part-{self.run:05d}-{self._seq:05d}.parquet"
        temporary = self.folder / f".{name}.tmp"
        rows = [{"line": None, **row} for row in self._buffer]
        pq.write_table(pa.Table.from_pylist(rows, schema=_PARQUET_SCHEMA), temporary)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, self.folder / name)
        self._buffer.clear()
        self._seq += 1

    def close(self) -> None:
        if self._jsonl is None:
            self.flush()
            return
        self._jsonl.close()
        if self._jsonl.count == 0:
            with contextlib.suppress(OSError):
                self._jsonl.path.unlink()


def _as_row(row: Row) -> Row:
    """An output-table row as ``idefics-kit batch`` writes it (same keys, same order)."""
    return {key: row[key] for key in ("id", "text", "finish_reason", "usage", "error")}


# -- the job --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobSummary:
    """What :func:`run_batch` did."""

    output: Path
    total: int
    """Input rows."""
    written: int
    """Rows this run wrote."""
    errors: int
    """Rows this run wrote with an error."""
    already_done: int
    """Input rows that already had their output row, so were skipped."""
    seconds: float
    """Wall time of this run, Ray start-up and model loading included."""


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameterError(name, f"{name} must be an int >= 1, got {value!r}", value)


def _output_format(
    folder: Path, requested: OutputFormat | None, found: OutputFormat | None
) -> OutputFormat:
    kind = requested or found or ("parquet" if folder.suffix.lower() == ".parquet" else "jsonl")
    if kind not in ("jsonl", "parquet"):
        raise InvalidParameterError(
            "output_format", f"output_format must be 'jsonl' or 'parquet', got {kind!r}", kind
        )
    if found is not None and found != kind:
        raise UsageError(
            f"the output folder {str(folder)!r} already holds {found} parts; "
            f"cannot add {kind} parts to it"
        )
    return kind


@contextlib.contextmanager
def _ray_session(address: str | None, log_to_driver: bool) -> Iterator[None]:
    """This process's Ray session if it has one, else connect to ``address`` (or start a
    local instance) for the duration."""
    if ray.is_initialized():
        yield
        return
    ray.init(address=address, log_to_driver=log_to_driver)
    try:
        yield
    finally:
        ray.shutdown()


def _resources(
    actors: int | None, cpus: float | None, gpus: float | None, spare_cpus: int
) -> tuple[int, float, float]:
    """Actors and per-actor CPUs/GPUs, defaults taken from the cluster's resources.

    Without GPUs the actors share the cluster's CPUs, less ``spare_cpus`` left
    for Ray Data's read tasks (an actor pool holding every CPU would wait on
    reads forever)."""
    cluster = ray.cluster_resources()
    cluster_gpus = int(cluster.get("GPU", 0))
    if gpus is None:
        gpus = 1.0 if cluster_gpus else 0.0
    if actors is None:
        actors = max(1, int(cluster_gpus // gpus)) if gpus else 1
    if cpus is None:
        free = int(cluster.get("CPU", 1)) - spare_cpus
        cpus = 1.0 if gpus else float(max(1, free // actors))
    return actors, cpus, gpus


def run_batch(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | Any,
    output: str | os.PathLike[str],
    *,
    model: str = "toy",
    actors: int | None = None,
    batch_size: int = _DEFAULT_BATCH_SIZE,
    rows_per_task: int | None = None,
    options: GenerationOptions | None = None,
    device: DeviceLike = "auto",
    dtype: DTypeLike = "auto",
    num_cpus_per_actor: float | None = None,
    num_gpus_per_actor: float | None = None,
    allow_private_network: bool = False,
    address: str | None = None,
    output_format: OutputFormat | None = None,
    flush_rows: int = 1000,
    log_to_driver: bool = True,
    notes: Callable[[str], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> JobSummary:
    """Answer every input row on a Ray cluster; write one row per input to ``output``.

    ``inputs``: a JSONL file, Parquet files (or a folder of them), or a
    ``ray.data.Dataset`` with ``id`` and ``messages`` columns (see
    :class:`Predictor`). ``output``: a folder that receives part files
    (``part-NNNNN.jsonl``; Parquet when its name ends in ``.parquet`` or with
    ``output_format="parquet"``) whose rows are those of ``idefics-kit
    batch``, in the order they finish.

    Before any model work the ids are checked (a duplicate, or a missing id in
    a Parquet/Dataset input, raises :class:`~idefics_kit.UsageError`) and the
    rows already in ``output`` are read: their ids are skipped, so rerunning
    an interrupted job finishes it. With nothing left to do, Ray is not used.

    Ray: the session this process already has (``ray.init(...)``, or ``ray
    job submit``) is used; else ``address`` (``"auto"``, ``"host:6379"``,
    ``"ray://host:10001"``; ``RAY_ADDRESS`` when None) is connected to, or a
    local instance started, and shut down at the end. ``actors`` (default:
    one per GPU of the cluster, else 1) each load ``model`` with ``device`` and
    ``dtype``, on ``num_gpus_per_actor`` GPUs (default 1 on a GPU cluster) and
    ``num_cpus_per_actor`` CPUs (default 1 with GPUs, else the cluster's CPUs
    shared out; on the CPU torch gets that many threads), and answer
    ``rows_per_task`` rows per call (default ``4 * batch_size``, at least 32)
    in model batches of ``batch_size``. ``notes`` receives notes (resuming,
    nothing to do), ``on_start`` the number of rows to write, before any
    model work, and ``on_row`` each row as it is written.
    """
    started = time.monotonic()
    note = notes or (lambda text: None)
    _check_positive("batch_size", batch_size)
    if actors is not None:
        _check_positive("actors", actors)
    per_task = rows_per_task if rows_per_task is not None else max(32, 4 * batch_size)
    _check_positive("rows_per_task", per_task)
    _check_positive("flush_rows", flush_rows)
    folder = Path(output)
    done, found, run = _read_output(folder)
    kind = _output_format(folder, output_format, found)

    if isinstance(inputs, (str, os.PathLike, list, tuple)):
        paths = _paths(inputs)
        if _format_of(paths) == "jsonl":
            job = _jsonl_inputs(paths[0], done, per_task)
        else:
            job = _parquet_inputs(paths, done)
    elif callable(getattr(inputs, "select_columns", None)):
        job = _dataset_inputs(inputs, done)
    else:
        raise UsageError(
            "inputs must be a path, a list of paths or a ray.data.Dataset, got "
            f"{type(inputs).__name__}"
        )
    if done.truncated:
        note(f"removed a partial last line from a part file in {folder} (an interrupted write)")
    pending = len(job.pending_ids) + len(job.driver_rows)
    already = job.total - pending

    def summary(writer: _Writer | None, errors: int) -> JobSummary:
        written = 0 if writer is None else writer.count
        return JobSummary(folder, job.total, written, errors, already, time.monotonic() - started)

    if pending == 0:
        note(f"nothing to do: all {job.total} inputs already have a row in {folder}")
        return summary(None, 0)
    if already:
        note(f"resuming: {already} of {job.total} inputs already in {folder}")

    if on_start is not None:
        on_start(pending)
    writer = _Writer(folder, run, kind, flush_rows)
    errors = 0

    def emit(row: Row) -> None:
        nonlocal errors
        writer.write(row)
        done.add(row)
        errors += row["error"] is not None
        if on_row is not None:
            on_row(row)

    try:
        for row in job.driver_rows:
            emit(row)
        if job.build is not None:
            with _ray_session(address, log_to_driver):
                count, cpus, gpus = _resources(
                    actors, num_cpus_per_actor, num_gpus_per_actor, job.spare_cpus
                )
                dataset = job.build().map_batches(
                    Predictor,
                    fn_constructor_kwargs={
                        "model": model,
                        "device": device,
                        "dtype": dtype,
                        "options": options or GenerationOptions(),
                        "batch_size": batch_size,
                        "allow_private_network": allow_private_network,
                    },
                    compute=ray.data.ActorPoolStrategy(size=count),
                    batch_size=per_task,
                    batch_format="pyarrow",
                    num_cpus=cpus,
                    num_gpus=gpus,
                )
                for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for row in block.to_pylist():
                        # A retried task (a restarted actor) may send a row again: once only.
                        if row["id"] in job.pending_ids and row["id"] not in done.ids:
                            emit(_as_row(row))
    finally:
        writer.close()
    missing = job.pending_ids - done.ids
    if missing:
        raise RuntimeFailure(
            f"{len(missing)} inputs got no row (for example {sorted(missing)[0]!r}); "
            "rerun the same job to answer them"
        )
    return summary(writer, errors)
