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
  batch``. Inputs, rows, the manifest, the lock, the retry journal and the
  ledger are :mod:`idefics_kit.jobs`, shared with the local command:
  duplicate ids are refused before any model work; a rerun skips the ids
  already written (the output folder is the checkpoint) and is refused if
  the model, options or inputs differ; the driver is the only writer and
  writes each id once, so retried Ray tasks (a killed actor is restarted and
  its batch retried) cannot duplicate a row.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray
import ray.data

from idefics_kit import jobs
from idefics_kit.conversation import Conversation
from idefics_kit.errors import IdeficsKitError, InvalidParameterError, RuntimeFailure, UsageError
from idefics_kit.jobs import OutputFormat, Record, RecordError
from idefics_kit.options import GenerationOptions

if TYPE_CHECKING:
    from idefics_kit.devices import DeviceLike, DTypeLike
    from idefics_kit.generator import Generator

__all__ = ["ROW_SCHEMA", "JobSummary", "Predictor", "run_batch"]

Row = dict[str, Any]

ROW_SCHEMA = jobs.row_schema()
"""The columns :class:`Predictor` returns (usage and error are null when absent)."""

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
            record = Record(
                line=0, id=record_id if isinstance(record_id, str) and record_id else None
            )
            try:
                if record.id is None:
                    raise RecordError(f'"id" must be a non-empty string, got {record_id!r}')
                conversation = self._conversation(row)
            except IdeficsKitError as exc:
                out[position] = jobs.error_row(record, exc)
            else:
                waiting.append((position, record))
                conversations.append(conversation)
        if conversations:
            results = self.generator.generate_batch(
                conversations, self.options, batch_size=self.batch_size, on_error="return"
            )
            for (position, record), result in zip(waiting, results, strict=True):
                out[position] = jobs.result_row(record, result)
        return pa.Table.from_pylist(out, schema=ROW_SCHEMA)

    def _conversation(self, row: Mapping[str, Any]) -> Conversation:
        return jobs.conversation_of(
            jobs.messages_of_row(row), allow_private_network=self.allow_private_network
        )


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


# -- inputs ---------------------------------------------------------------------------


@dataclass
class _Inputs:
    """What a run has to do: the pending ids, the rows the driver writes itself, and how
    to build the Ray dataset of the pending rows."""

    index: jobs.InputIndex
    manifest_inputs: list[Path | str]
    make: Callable[[], Any] | None = None
    """The whole input as a Ray dataset (Parquet files, a Dataset); None for JSONL."""
    paths: list[Path] | None = None
    """JSONL input files, read by the driver."""


def _path_inputs(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> _Inputs:
    paths = jobs.expand_inputs(inputs)
    kinds = {jobs.input_format(path) for path in paths}
    if len(kinds) > 1:
        raise UsageError("the input files mix JSONL and Parquet; give one format at a time")
    index = jobs.index_inputs(paths)
    if kinds == {"jsonl"}:
        return _Inputs(index=index, manifest_inputs=list(paths), paths=paths)
    import pyarrow.parquet as pq

    columns = sorted(
        {
            name
            for path in paths
            for name in pq.read_schema(path).names
            if name in ("id", "messages", "images")
        }
    )
    files = [str(path.resolve()) for path in paths]
    return _Inputs(
        index=index,
        manifest_inputs=list(paths),
        make=lambda: ray.data.read_parquet(files).select_columns(columns),
    )


def _dataset_inputs(dataset: Any) -> _Inputs:
    names = dataset.columns()
    if "id" not in names or "messages" not in names:
        raise UsageError(f"the dataset has the columns {names}; it needs 'id' and 'messages'")
    ids: list[Any] = []
    for batch in dataset.select_columns(["id"]).iter_batches(
        batch_size=None, batch_format="pyarrow"
    ):
        ids.extend(batch.column("id").to_pylist())
    for row, record_id in enumerate(ids, start=1):
        if not isinstance(record_id, str) or not record_id:
            raise UsageError(
                f'row {row} of the dataset: "id" must be a non-empty string, got '
                f"{record_id!r}; every row needs a unique string id"
            )
    duplicate = jobs.find_duplicate(enumerate(ids, start=1))
    if duplicate is not None:
        record_id, rows = duplicate
        where = ", ".join(str(row) for row in rows)
        raise UsageError(
            f"duplicate id {record_id!r} on rows {where} of the dataset; every id must be unique"
        )
    index = jobs.InputIndex(paths=(), keys=tuple(ids))
    return _Inputs(index=index, manifest_inputs=["a ray.data.Dataset"], make=lambda: dataset)


def _keep_pending(batch: pa.Table, pending: pa.Array) -> pa.Table:
    """Drop the rows whose id already has an output row (fused into the read tasks)."""
    import pyarrow.compute as pc

    return batch.filter(pc.is_in(batch.column("id").cast(pa.string()), value_set=pending))


@dataclass
class _Plan:
    """The pending work of one run."""

    pending_ids: set[str]
    driver_rows: list[Row]
    """Rows the driver writes itself: JSONL lines that are not records (no model work)."""
    build: Callable[[], Any] | None
    """Makes the Ray dataset of the pending rows (called once Ray is up)."""
    spare_cpus: int
    """CPUs to leave to Ray Data's read tasks (none for rows the driver hands over)."""


def _plan(inputs: _Inputs, pending: set[jobs.Key], per_task: int) -> _Plan:
    if inputs.paths is not None:  # JSONL: parsed and checked in the driver
        items: list[Row] = []
        driver_rows: list[Row] = []
        for record in jobs.read_records(inputs.paths):
            if record.key not in pending:
                continue
            if record.error is not None or record.id is None:
                driver_rows.append(jobs.error_row(record, record.error or RecordError("no id")))
                continue
            # ensure_ascii: Arrow strings must be valid UTF-8, and a lone surrogate is not.
            items.append({"id": record.id, "messages": json.dumps(record.messages)})
        blocks = math.ceil(len(items) / per_task)
        return _Plan(
            pending_ids={item["id"] for item in items},
            driver_rows=driver_rows,
            build=(lambda: ray.data.from_items(items, override_num_blocks=blocks))
            if items
            else None,
            spare_cpus=0,
        )
    make = inputs.make
    assert make is not None
    ids = {key for key in pending if isinstance(key, str)}
    everything = len(ids) == len(inputs.index.keys)

    def build() -> Any:
        dataset = make()
        if everything:
            return dataset
        return dataset.map_batches(
            _keep_pending,
            fn_kwargs={"pending": pa.array(sorted(ids), type=pa.string())},
            batch_format="pyarrow",
            batch_size=None,
        )

    return _Plan(pending_ids=ids, driver_rows=[], build=build if ids else None, spare_cpus=1)


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
    """Rows this run wrote (answers and error rows)."""
    errors: int
    """Rows this run wrote with an error."""
    already_done: int
    """Input rows that already had their output row, so were skipped."""
    seconds: float
    """Wall time of this run, Ray start-up and model loading included."""
    retried: int = 0
    """Rows this run wrote in place of an earlier error row (``retry_errors``)."""

    @property
    def done(self) -> int:
        """Rows this run wrote with an answer."""
        return self.written - self.errors


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameterError(name, f"{name} must be an int >= 1, got {value!r}", value)


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
    retry_errors: bool = False,
    overwrite: bool = False,
    log_to_driver: bool = True,
    notes: Callable[[str], None] | None = None,
    on_start: Callable[[int], None] | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> JobSummary:
    """Answer every input row on a Ray cluster; write one row per input to ``output``.

    ``inputs``: JSONL files or Parquet files (paths, folders or glob patterns;
    one format per job; ids unique across all of them), or a
    ``ray.data.Dataset`` with ``id`` and ``messages`` columns (see
    :class:`Predictor`). ``output``: a folder that receives part files
    (``part-RRRRR-TTTTTTTT.jsonl``, a new name each run; Parquet when its name
    ends in ``.parquet`` or with ``output_format="parquet"``) whose rows are
    those of ``idefics-kit batch``, in the order they finish. The output
    machinery is :mod:`idefics_kit.jobs`: a lock (a second job on the same
    folder raises :class:`~idefics_kit.jobs.OutputBusyError`), a manifest (a
    rerun with another model, other options or other inputs raises
    :class:`~idefics_kit.jobs.OutputMismatchError`, the folder untouched;
    ``overwrite=True`` removes its rows and starts over) and a ledger.

    Before any model work the ids are checked (a duplicate, or a missing id in
    a Parquet/Dataset input, raises :class:`~idefics_kit.UsageError`) and the
    rows already in ``output`` are read: their ids are skipped, so rerunning
    an interrupted job finishes it; with ``retry_errors`` the inputs whose row
    is an error row run again, and each new row replaces the old one (through
    a journal merged atomically at the end, crash-safe). With nothing left to
    do, Ray is not used.

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
    if output_format not in (None, "jsonl", "parquet"):
        raise InvalidParameterError(
            "output_format",
            f"output_format must be 'jsonl' or 'parquet', got {output_format!r}",
            output_format,
        )
    folder = Path(output)

    if isinstance(inputs, (str, os.PathLike, list, tuple)):
        job = _path_inputs(inputs)
    elif callable(getattr(inputs, "select_columns", None)):
        job = _dataset_inputs(inputs)
    else:
        raise UsageError(
            "inputs must be a path, a list of paths or a ray.data.Dataset, got "
            f"{type(inputs).__name__}"
        )
    manifest = jobs.Manifest.create(
        model=model, options=options or GenerationOptions(), inputs=job.manifest_inputs
    )
    total = len(job.index.keys)
    with jobs.PartsOutput.open(
        folder,
        manifest,
        output_format=output_format,
        flush_rows=flush_rows,
        overwrite=overwrite,
        note=note,
    ) as out:
        pending = job.index.pending(out.ledger, retry_errors=retry_errors)
        already = total - len(pending)

        def summary() -> JobSummary:
            seconds = time.monotonic() - started
            return JobSummary(folder, total, out.written, out.errors, already, seconds, out.retried)

        if not pending:
            errors = sum(out.ledger.is_error(key) for key in job.index.keys)
            hint = f" ({errors} with an error; retry_errors runs them again)" if errors else ""
            note(f"nothing to do: all {total} inputs already have a row in {folder}{hint}")
            return summary()
        if already:
            note(f"resuming: {already} of {total} inputs already in {folder}")
        plan = _plan(job, pending, per_task)
        if on_start is not None:
            on_start(len(pending))
        seen: set[str] = set()

        def emit(row: Row) -> None:
            out.write(row)
            if on_row is not None:
                on_row(row)

        for row in plan.driver_rows:
            emit(row)
        if plan.build is not None:
            with _ray_session(address, log_to_driver):
                count, cpus, gpus = _resources(
                    actors, num_cpus_per_actor, num_gpus_per_actor, plan.spare_cpus
                )
                dataset = plan.build().map_batches(
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
                        if row["id"] in plan.pending_ids and row["id"] not in seen:
                            seen.add(row["id"])
                            emit(_as_row(row))
        result = summary()
    missing = plan.pending_ids - seen
    if missing:
        raise RuntimeFailure(
            f"{len(missing)} inputs got no row (for example {sorted(missing)[0]!r}); "
            "rerun the same job to answer them"
        )
    return result
