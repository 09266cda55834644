"""``idefics-kit batch`` and ``idefics-kit batch-status``: the command line over
:mod:`idefics_kit.jobs`.

Input: JSONL lines ``{"id": "a1", "messages": [...]}`` (or Parquet rows),
from one or more files, folders or glob patterns, ids unique across them.
Output: one JSON row per input, in input order, appended and fsync'd row by
row; a manifest beside it records what wrote it, a lock keeps a second
command out, and ``--retry-errors`` replaces error rows crash-safely. The
answering itself (checks, image decoding, length-aware batches, per-input
errors) is :meth:`Generator.iter_batch`, through :func:`idefics_kit.jobs.answer`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from idefics_kit import jobs
from idefics_kit._cli_common import PROG, CliExit
from idefics_kit.options import GenerationOptions

if TYPE_CHECKING:
    from idefics_kit.generator import Generator

__all__ = [
    "BatchJob",
    "Progress",
    "format_status",
    "job_errors",
    "run_batch",
    "run_status",
    "summary_line",
]

Row = dict[str, Any]


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


# -- shared with --ray --------------------------------------------------------------------


@contextlib.contextmanager
def job_errors() -> Iterator[None]:
    """A manifest mismatch is a usage error (exit 2), told in the command's flags."""
    try:
        yield
    except jobs.OutputMismatchError as exc:
        message = str(exc).replace("start over with overwrite=True", "start over with --overwrite")
        raise CliExit(message, 2) from None


def summary_line(
    output: Path, *, written: int, errors: int, skipped: int, retried: int, seconds: float
) -> str:
    """The end-of-run line: counts of done, error, skipped and retried rows."""
    return (
        f"wrote {written} rows to {output} in {seconds:.1f} s: {written - errors} done, "
        f"{errors} with an error, {skipped} skipped (already there), {retried} retried"
    )


def nothing_to_do(total: int, output: Path, errors: int) -> str:
    """The note of a run that finds every input with its row."""
    hint = f" ({errors} with an error; --retry-errors runs them again)" if errors else ""
    return f"nothing to do: all {total} inputs already have a row in {output}{hint}"


# -- the command ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchJob:
    """What ``idefics-kit batch`` was asked to do."""

    inputs: tuple[Path, ...]
    output: Path
    model: str
    options: GenerationOptions
    batch_size: int
    quiet: bool
    allow_private_network: bool = False
    overwrite: bool = False
    retry_errors: bool = False


def _notifier(quiet: bool, err: TextIO) -> Callable[[str], None]:
    def note(text: str) -> None:
        if not quiet:
            print(f"{PROG}: {text}", file=err)

    return note


def _check_distinct(inputs: Sequence[Path], output: Path) -> None:
    for path in inputs:
        try:
            same = output.exists() and os.path.samefile(path, output)
        except OSError:
            same = False
        if same:
            raise CliExit(f"the output file {str(output)!r} is an input file; pass another -o")


def run_batch(job: BatchJob, load: Callable[[], Generator], err: TextIO) -> int:
    """Check the inputs, open (lock, check, repair) the output, answer what is left;
    return the exit code.

    ``load`` is called only when there is work to do, after every check that
    needs no model.
    """
    started = time.monotonic()
    note = _notifier(job.quiet, err)
    with job_errors():
        paths = jobs.expand_inputs(job.inputs)
        index = jobs.index_inputs(paths)
        _check_distinct(paths, job.output)
        manifest = jobs.Manifest.create(model=job.model, options=job.options, inputs=paths)
        with jobs.JsonlOutput.open(
            job.output, manifest, overwrite=job.overwrite, note=note
        ) as output:
            pending = index.pending(output.ledger, retry_errors=job.retry_errors)
            total = len(index.keys)
            skipped = total - len(pending)
            if not pending:
                errors = sum(output.ledger.is_error(key) for key in index.keys)
                note(nothing_to_do(total, job.output, errors))
                return 0
            if skipped:
                note(f"resuming: {skipped} of {total} inputs already in {job.output}")
            retrying = sum(output.ledger.has(key) for key in pending)
            if retrying:
                note(f"retrying {retrying} error rows")
            gen = load()
            records = (r for r in jobs.read_records(paths) if r.key in pending)
            rows = jobs.answer(
                gen,
                records,
                job.options,
                batch_size=job.batch_size,
                trust=job.allow_private_network,
            )
            with contextlib.closing(rows):
                progress = Progress(len(pending), enabled=not job.quiet, err=err)
                try:
                    for row in rows:
                        output.write(row)
                        progress.advance(row)
                except KeyboardInterrupt:
                    raise CliExit(
                        f"interrupted; {output.written} rows written to {job.output} "
                        f"({len(output.ledger.rows)} in total); rerun the same command to "
                        "resume",
                        130,
                        label=None,
                    ) from None
                finally:
                    progress.close()
    note(
        summary_line(
            job.output,
            written=output.written,
            errors=output.errors,
            skipped=skipped,
            retried=output.retried,
            seconds=time.monotonic() - started,
        )
    )
    return 0


# -- batch-status -----------------------------------------------------------------------


def format_status(state: jobs.JobStatus) -> str:
    """``batch-status`` as aligned ``label: value`` lines."""
    lines = [("output", str(state.output))]
    manifest = state.manifest
    if manifest is not None:
        model = (
            manifest.model
            if manifest.revision is None
            else (f"{manifest.model} ({manifest.revision})")
        )
        lines.append(("model", model))
        lines.append(("inputs", ", ".join(manifest.inputs)))
    lines.append(("done", str(state.done)))
    errors = str(state.errors)
    if state.errors:
        errors += " (--retry-errors runs them again)"
    lines.append(("errors", errors))
    if state.remaining is None:
        lines.append(("remaining", f"unknown: {state.note}"))
    else:
        lines.append(("remaining", f"{state.remaining} of {state.inputs} inputs"))
    if state.retry_pending:
        lines.append(("retry", f"{state.retry_pending} rows to merge (the next run merges them)"))
    running = "no" if state.running is None else f"yes, process {state.running}"
    lines.append(("running", running))
    width = max(len(label) for label, _ in lines) + 2
    return "\n".join(f"{label + ':':<{width}}{value}" for label, value in lines)


def run_status(output: Path, as_json: bool, out: TextIO) -> int:
    """Print how far ``output`` is; return the exit code."""
    state = jobs.status(output)
    if as_json:
        print(json.dumps(state.to_json(), ensure_ascii=False), file=out)
    else:
        print(format_status(state), file=out)
    return 0
