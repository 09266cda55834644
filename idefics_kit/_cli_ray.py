"""``idefics-kit batch --ray``: the same job on a Ray cluster (the ``[ray]`` extra).

The flags are added to the ``batch`` parser here; Ray itself is imported only
when ``--ray`` is given (:mod:`idefics_kit.ray`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from idefics_kit._cli_batch import Progress, job_errors, summary_line
from idefics_kit._cli_common import PROG, CliExit, positive_float, positive_int
from idefics_kit.options import GenerationOptions

__all__ = ["add_ray_flags", "run_ray_batch", "wants_ray"]

_RAY_ONLY = ("ray_address", "actors", "cpus_per_actor", "gpus_per_actor", "rows_per_task")


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """``--ray`` and the flags that go with it (cluster address, actors and their resources)."""
    group = parser.add_argument_group("Ray cluster (needs the [ray] extra)")
    group.add_argument(
        "--ray",
        action="store_true",
        help="run on a Ray cluster, one model per actor; -o is then a folder of part files "
        "(Parquet when its name ends in .parquet)",
    )
    group.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the cluster to use (auto, HOST:6379, ray://HOST:10001); default: RAY_ADDRESS, "
        "else a local Ray instance started for this run",
    )
    group.add_argument(
        "--actors",
        type=positive_int,
        metavar="N",
        help="model actors (default: one per GPU of the cluster, else 1)",
    )
    group.add_argument(
        "--cpus-per-actor",
        type=positive_float,
        metavar="N",
        help="CPUs per actor; on the CPU also torch's threads (default: 1 on GPU clusters, "
        "else the cluster's CPUs shared out)",
    )
    group.add_argument(
        "--rows-per-task",
        type=positive_int,
        metavar="N",
        help="rows per actor call, answered in model batches of --batch-size; a killed actor "
        "redoes at most this many (default: 4 x --batch-size, at least 32)",
    )
    group.add_argument(
        "--gpus-per-actor",
        type=positive_float,
        metavar="N",
        help="GPUs per actor (default: 1 when the cluster has GPUs)",
    )


@contextmanager
def _quiet_ray(quiet: bool) -> Iterator[None]:
    """Ray Data's progress bars and INFO lines off (the command has its own bar)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    context.enable_progress_bars = False
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR if quiet else logging.WARNING)
    try:
        yield
    finally:
        context.enable_progress_bars = bars
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def wants_ray(args: argparse.Namespace) -> bool:
    """Whether any Ray flag was given (``run_ray_batch`` then insists on ``--ray``)."""
    return bool(args.ray) or any(getattr(args, name, None) is not None for name in _RAY_ONLY)


def run_ray_batch(
    args: argparse.Namespace, model: str, options: GenerationOptions, err: TextIO
) -> int:
    """Run ``idefics-kit batch --ray``; return the exit code."""
    if not args.ray:
        given = [name for name in _RAY_ONLY if getattr(args, name, None) is not None]
        flag = "--" + given[0].replace("_", "-")
        raise CliExit(f"{flag} needs --ray (see '{PROG} batch --help')", 2)
    try:
        from idefics_kit import ray as ray_job
    except ImportError as exc:
        raise CliExit(
            f"--ray needs the [ray] extra ({exc}); install it with: pip install 'idefics-kit[ray]'"
        ) from None

    quiet: bool = args.quiet

    def note(text: str) -> None:
        if not quiet:
            print(f"{PROG}: {text}", file=err)

    written = 0
    progress: Progress | None = None

    def started(pending: int) -> None:
        nonlocal progress
        progress = Progress(pending, enabled=not quiet, err=err)

    def on_row(row: dict[str, Any]) -> None:
        nonlocal written
        written += 1
        if progress is not None:
            progress.advance(row)

    try:
        with _quiet_ray(quiet), job_errors():
            summary = ray_job.run_batch(
                args.inputs,
                args.output,
                model=model,
                actors=args.actors,
                batch_size=args.batch_size,
                rows_per_task=args.rows_per_task,
                options=options,
                device=args.device,
                dtype=args.dtype,
                num_cpus_per_actor=args.cpus_per_actor,
                num_gpus_per_actor=args.gpus_per_actor,
                allow_private_network=args.allow_private_network,
                address=args.ray_address,
                retry_errors=args.retry_errors,
                overwrite=args.overwrite,
                log_to_driver=not quiet,
                notes=note,
                on_start=started,
                on_row=on_row,
            )
    except KeyboardInterrupt:
        raise CliExit(
            f"interrupted; {written} rows written to {args.output}; "
            "rerun the same command to resume",
            130,
            label=None,
        ) from None
    finally:
        if progress is not None:
            progress.close()
    if summary.written:
        note(
            summary_line(
                args.output,
                written=summary.written,
                errors=summary.errors,
                skipped=summary.already_done,
                retried=summary.retried,
                seconds=summary.seconds,
            )
        )
    return 0
