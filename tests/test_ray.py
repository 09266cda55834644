"""idefics_kit.ray on a local Ray cluster that this module starts once per test run.

The cluster over-declares its CPUs (4, on a 2-core machine) and each model
actor asks for 1, so two actors, Ray Data's read tasks and the actors of a
CLI driver in a subprocess never wait on each other (Ray also starts one idle
worker process per declared CPU, so declaring more costs start-up time); the object store is capped
at 200 MB; usage stats, the dashboard, progress bars and worker logs on the
driver are off. The toy model answers: the rows must be exactly the rows the
local ``idefics-kit batch`` command writes for the same file.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ray = pytest.importorskip("ray")
ray_data = pytest.importorskip("ray.data")

from idefics_kit import Conversation, GenerationOptions, ImagePart, UsageError, jobs  # noqa: E402
from idefics_kit.cli import main as cli_main  # noqa: E402
from idefics_kit.ray import ROW_SCHEMA, Predictor, run_batch  # noqa: E402
from idefics_kit.toy.scenes import QUESTIONS, draw_count_scene, draw_scene  # noqa: E402

pytestmark = pytest.mark.slow  # minutes on 2 cores: outside the fast loop (-m 'not slow')

ROOT = Path(__file__).resolve().parent.parent
Row = dict[str, Any]
GOOD = 200


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """One local Ray instance for the whole test run; its GCS address."""
    if ray.is_initialized():  # pragma: no cover - another module's session
        yield str(ray.get_runtime_context().gcs_address)
        return
    ray.init(
        num_cpus=4,
        object_store_memory=200 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    with warnings.catch_warnings():
        # Ray 2.60's DataContext() warns about its own deprecated defaults.
        warnings.filterwarnings("ignore", r"`\w+` is deprecated", DeprecationWarning)
        context = ray_data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


def _good_rows(folder: Path, count: int) -> list[Row]:
    """``count`` toy questions, every kind; the images alternate inline base64 and files."""
    rng = random.Random(12)
    kinds = list(QUESTIONS)
    rows = []
    for number in range(count):
        kind = kinds[number % len(kinds)]
        size = (rng.randint(64, 144), rng.randint(64, 144))
        scene = draw_count_scene(rng, size=size) if kind == "count" else draw_scene(rng, size=size)
        if number % 2:
            path = folder / f"scene{number}.png"
            scene.image.save(path)
            image = ImagePart.from_path(str(path))
        else:
            image = ImagePart.from_pil(scene.image)
        conversation = Conversation().user(image, QUESTIONS[kind])
        rows.append({"id": f"g{number:03d}", "messages": conversation.to_messages()})
    return rows


def _ask(image: dict[str, str]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [image, {"type": "text", "text": "What shape is it?"}]}]


BAD_LINES = {
    "bad-image-missing": _ask({"type": "image", "path": "/nonexistent/idefics-kit/x.png"}),
    "bad-image-bytes": _ask(
        {"type": "image", "base64": base64.b64encode(b"not an image at all").decode()}
    ),
    "bad-messages-type": "hello",
    "bad-messages-assistant": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ],
    "private-url": _ask({"type": "image", "url": "http://127.0.0.1:9/x.png"}),
}


def _write_jsonl(path: Path, rows: list[Row], extra_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(row) for row in rows]
    for position, line in sorted((extra_lines or {}).items()):
        lines.insert(position, line)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _local_rows(input_path: Path, output: Path) -> list[Row]:
    assert cli_main(["batch", "--quiet", str(input_path), "-o", str(output)]) == 0
    return [json.loads(line) for line in output.read_text().splitlines()]


def _part_rows(folder: Path) -> list[Row]:
    return [
        json.loads(line)
        for part in sorted(folder.glob("part-*.jsonl"))
        for line in part.read_text().splitlines()
    ]


def _key(row: Row) -> str:
    return str(row["id"]) if row["id"] is not None else f"line:{row['line']}"


def _by_key(rows: list[Row]) -> dict[str, Row]:
    keyed = {_key(row): row for row in rows}
    assert len(keyed) == len(rows), "a row was written twice"
    return keyed


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The 200 good rows with bad ones among them, as JSONL, and the local command's rows."""
    folder = tmp_path_factory.mktemp("ray_job")
    rows = _good_rows(folder, GOOD)
    for number, (record_id, messages) in enumerate(BAD_LINES.items()):
        rows.insert(17 + 31 * number, {"id": record_id, "messages": messages})
    extra = {5: '{"id": "broken json', 90: '{"id": "no-messages"}'}
    input_path = _write_jsonl(folder / "in.jsonl", rows, extra)
    local = _local_rows(input_path, folder / "local.jsonl")
    assert len(local) == GOOD + len(BAD_LINES) + len(extra)
    return {"folder": folder, "rows": rows, "input": input_path, "local": _by_key(local)}


def _actor_pids() -> set[int]:
    """The processes of this cluster's live Predictor actors."""
    from ray._private import state

    return {
        int(actor["Pid"])
        for actor in state.actors().values()
        if actor["ActorClassName"].startswith("MapWorker(MapBatches(Predictor))")
        and actor["State"] == "ALIVE"
        and actor.get("Pid")
    }


@pytest.fixture(scope="module")
def ray_run(ray_address: str, job: dict[str, Any]) -> dict[str, Any]:
    """The job over 2 actors; when its first row arrives, one actor is killed (SIGKILL)."""
    output = job["folder"] / "ray_out"
    killed: list[int] = []
    before: set[int] = set()
    after: set[int] = set()

    def kill_one(row: Row) -> None:
        pids = _actor_pids()
        if killed:
            after.update(pids)
            if not after - before:
                # The surviving actor can finish every row before the restarted
                # one is up: hold the driver briefly (at most ~10 s in all)
                # until the restart shows.
                time.sleep(0.05)
        elif pids:
            before.update(pids)
            killed.append(min(pids))
            os.kill(killed[0], signal.SIGKILL)

    summary = run_batch(
        job["input"],
        output,
        actors=2,
        num_cpus_per_actor=1,
        batch_size=8,
        rows_per_task=16,
        on_row=kill_one,
    )
    rows = _part_rows(output)
    return {"summary": summary, "rows": rows, "killed": killed, "before": before, "after": after}


@pytest.fixture(scope="module")
def ray_rows(ray_run: dict[str, Any]) -> list[Row]:
    rows: list[Row] = ray_run["rows"]
    return rows


def test_200_rows_over_two_actors_equal_the_local_batch_command(
    ray_rows: list[Row], job: dict[str, Any]
) -> None:
    got = _by_key(ray_rows)
    assert set(got) == set(job["local"])
    for key, row in job["local"].items():
        assert got[key] == row, key
    answered = [row for row in ray_rows if row["error"] is None]
    assert len(answered) == GOOD
    assert all(row["usage"]["completion_tokens"] >= 1 for row in answered)


def test_bad_rows_become_error_rows(ray_rows: list[Row]) -> None:
    got = _by_key(ray_rows)
    types = {key: got[key]["error"]["type"] for key in BAD_LINES}
    assert types == {
        "bad-image-missing": "ImageLoadError",
        "bad-image-bytes": "ImageLoadError",
        "bad-messages-type": "ConversationError",
        "bad-messages-assistant": "ConversationError",
        "private-url": "ImageLoadError",
    }
    assert "loopback" in got["private-url"]["error"]["message"]
    assert "--allow-private-network" in got["private-url"]["error"]["message"]
    assert got["line:6"]["error"]["type"] == "RecordError"
    assert got["no-messages"]["error"]["type"] == "RecordError"
    for key in (*BAD_LINES, "line:6", "no-messages"):
        assert got[key]["text"] is got[key]["usage"] is got[key]["finish_reason"] is None


def test_import_idefics_kit_and_its_cli_never_import_ray() -> None:
    code = (
        "import sys, idefics_kit, idefics_kit.cli; "
        "assert 'ray' not in sys.modules and 'pyarrow' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_duplicate_ids_are_refused_before_any_work(tmp_path: Path) -> None:
    rows = [{"id": "a", "messages": "x"}, {"id": "b", "messages": "x"}, {"id": "a", "messages": 1}]
    input_path = _write_jsonl(tmp_path / "dup.jsonl", rows)
    with pytest.raises(UsageError, match=r"duplicate id 'a' on lines 1 and 3"):
        run_batch(input_path, tmp_path / "out", address="127.0.0.1:1")  # never connected to
    assert not (tmp_path / "out").exists()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its parent does not)."""
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_killed_actor_is_restarted_and_nothing_is_lost_or_duplicated(
    ray_run: dict[str, Any], job: dict[str, Any]
) -> None:
    """The 200-row job above lost an actor to SIGKILL after its first rows: Ray restarted
    it and retried its batches; the driver wrote each id once (checked in full above)."""
    assert ray_run["killed"], "no actor was alive to kill"
    assert not _alive(ray_run["killed"][0])
    restarted = ray_run["after"] - ray_run["before"]
    assert restarted, "no new actor process came up after the kill"
    summary = ray_run["summary"]
    assert summary.written == len(ray_run["rows"]) == len(job["local"])
    assert summary.already_done == 0
    assert len({_key(row) for row in ray_run["rows"]}) == len(job["local"])


class _SlowImages(http.server.ThreadingHTTPServer):
    """Loopback image server; each answer waits ``delay`` s until ``fast`` is set."""

    daemon_threads = True

    def __init__(self, images: dict[str, bytes], delay: float) -> None:
        super().__init__(("127.0.0.1", 0), _SlowImageHandler)
        self.images, self.delay, self.fast = images, delay, threading.Event()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"

    def __enter__(self) -> _SlowImages:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.fast.set()
        self.shutdown()
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # an actor stopped with the interrupted CLI hangs up mid-answer


class _SlowImageHandler(http.server.BaseHTTPRequestHandler):
    server: _SlowImages

    def do_GET(self) -> None:
        self.server.fast.wait(self.server.delay)
        body = self.server.images.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _image_bytes(block: dict[str, str]) -> bytes:
    if "path" in block:
        return Path(block["path"]).read_bytes()
    return base64.b64decode(block["base64"].split(",", 1)[1])


def test_an_interrupted_cli_job_rerun_ends_with_every_id_once(
    ray_address: str, job: dict[str, Any], tmp_path: Path
) -> None:
    # The toy answers 100+ rows a second, and Ray hands results over in bursts: a
    # job of local images could be done before the signal lands (CI, exit 0). Its
    # images come from a loopback server that takes 1 s an answer until the CLI has
    # exited, so the job is seconds from done whenever its first row shows.
    rows = [dict(row) for row in job["rows"][:60] if row["id"].startswith("g")]
    images: dict[str, bytes] = {}
    with _SlowImages(images, delay=1.0) as server:
        for row in rows:
            row["messages"] = json.loads(json.dumps(row["messages"]))  # a copy
            for block in row["messages"][0]["content"]:
                if block["type"] == "image":
                    name = f"{row['id']}-{len(images)}.png"
                    images[name] = _image_bytes(block)
                    block.clear()
                    block.update(type="image", url=server.url(name))
        input_path = _write_jsonl(tmp_path / "in.jsonl", rows)
        output = tmp_path / "out"
        command = [
            sys.executable,
            "-m",
            "idefics_kit",
            "batch",
            "--ray",
            "--ray-address",
            ray_address,
            "--actors",
            "2",
            "--cpus-per-actor",
            "1",
            "--rows-per-task",
            "4",
            "--allow-private-network",
            "--quiet",
            str(input_path),
            "-o",
            str(output),
        ]
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        process = subprocess.Popen(
            command, env=environment, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and process.poll() is None:
            if any(part.read_text().count("\n") >= 1 for part in output.glob("part-*.jsonl")):
                break
            time.sleep(0.05)
        assert process.poll() is None, (
            f"the job ended before it could be interrupted: {process.stderr}"
        )
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        server.fast.set()
        assert process.returncode == 130, stderr
        assert "interrupted;" in stderr
        assert "rerun the same command to resume" in stderr
        first = _part_rows(output)
        assert 0 < len(first) < len(rows)

        summary = run_batch(
            input_path, output, actors=1, num_cpus_per_actor=1, allow_private_network=True
        )
    assert summary.already_done == len(first)
    # One part per run, never shared: the run number and a random token in each name.
    names = sorted(part.name for part in output.glob("part-*.jsonl"))
    assert len(names) == 2, names
    assert [name[:11] for name in names] == ["part-00000-", "part-00001-"]
    assert all(re.fullmatch(r"part-0000[01]-[0-9a-f]{8}\.jsonl", name) for name in names)
    assert names[0][11:] != names[1][11:]
    got = _by_key(_part_rows(output))
    assert set(got) == {row["id"] for row in rows}
    for row in rows:
        assert got[row["id"]] == job["local"][row["id"]]

    again = run_batch(input_path, output, actors=1)  # nothing left: Ray is not even used
    assert again.written == 0
    assert again.already_done == len(rows)


def test_parquet_in_and_out_with_images_in_a_binary_column(
    ray_address: str, job: dict[str, Any], tmp_path: Path
) -> None:
    """Image bytes in a list<binary> column, filled into source-less image blocks in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = job["rows"][:6]
    table_rows = []
    for row in rows:
        messages = json.loads(json.dumps(row["messages"]))
        images = []
        for block in messages[0]["content"]:
            if block["type"] == "image":
                if "path" in block:
                    images.append(Path(block.pop("path")).read_bytes())
                else:
                    images.append(base64.b64decode(block.pop("base64").split(",", 1)[1]))
        table_rows.append({"id": row["id"], "messages": json.dumps(messages), "images": images})
    pq.write_table(pa.Table.from_pylist(table_rows), tmp_path / "in.parquet")
    # A first run wrote two rows (one Parquet part): the rerun must answer only the others.
    output = tmp_path / "out.parquet"
    output.mkdir()
    first = [{"line": None, "input": None, **job["local"][row["id"]]} for row in rows[:2]]
    id_line_input = [ROW_SCHEMA.field("id"), ("line", pa.int64()), ("input", pa.string())]
    schema = pa.schema([*id_line_input, *list(ROW_SCHEMA)[1:]])
    pq.write_table(pa.Table.from_pylist(first, schema), output / "part-00000-00000.parquet")

    summary = run_batch(tmp_path / "in.parquet", output, actors=1, num_cpus_per_actor=1)
    assert summary.already_done == 2
    assert summary.written == len(rows) - 2
    table = pq.read_table(output)
    assert table.num_rows == len(rows)
    got = {row["id"]: row for row in table.to_pylist()}
    for row in rows:
        assert got[row["id"]] == {"line": None, "input": None, **job["local"][row["id"]]}
    assert table.schema.field("usage").type == ROW_SCHEMA.field("usage").type


def test_predictor_takes_every_batch_format_and_byte_blocks(job: dict[str, Any]) -> None:
    """The actor class on its own, in this process: Arrow, pandas and NumPy batches."""
    import numpy as np
    import pyarrow as pa

    predictor = Predictor("toy", device="cpu", num_threads=1)
    row = job["rows"][0]  # an inline base64 image
    block = row["messages"][0]["content"][0]
    data = base64.b64decode(block["base64"].split(",", 1)[1])
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "bytes": data}, *row["messages"][0]["content"][1:]],
        }
    ]
    expected = job["local"][row["id"]]
    arrow = predictor(pa.Table.from_pylist([{"id": row["id"], "messages": messages}]))
    assert arrow.schema.equals(ROW_SCHEMA)
    assert arrow.to_pylist() == [expected]
    text = json.dumps(row["messages"])
    assert predictor(pa.table({"id": [row["id"]], "messages": [text]})).to_pylist() == [expected]
    frame = pa.table({"id": [row["id"], ""], "messages": [text, text]}).to_pandas()
    out = predictor(frame).to_pylist()
    assert out[0] == expected
    assert out[1]["error"]["type"] == "RecordError"
    numpy = {"id": np.array([row["id"]], dtype=object), "messages": np.array([text], dtype=object)}
    assert predictor(numpy).to_pylist() == [expected]
    assert predictor.threads == 1


# -- retry, several inputs, manifest, lock, status (issue 22) -----------------------------------


def test_retry_errors_with_several_inputs_even_when_killed_mid_retry(
    ray_address: str, job: dict[str, Any], tmp_path: Path
) -> None:
    """Two JSONL inputs (one as a glob); three rows fail (their images are not served
    yet) and one line is broken. Once the images are there, ``batch --ray
    --retry-errors`` is killed (SIGKILL) after its first retried rows; the rerun
    merges what it wrote and retries the rest: each id once, rows equal to the
    local command's."""
    good = [dict(row) for row in job["rows"][:4] if row["id"].startswith("g")]
    images: dict[str, bytes] = {}
    output = tmp_path / "out"
    with _SlowImages(images, delay=0.0) as server:
        failing = [
            {"id": f"later{n}", "messages": _ask({"type": "image", "url": server.url(f"{n}.png")})}
            for n in range(3)
        ]
        first = _write_jsonl(tmp_path / "a.jsonl", [good[0], failing[0], good[1]])
        second = _write_jsonl(
            tmp_path / "b.jsonl", [failing[1], good[2], failing[2]], {1: "{broken"}
        )
        inputs = [str(first), str(tmp_path / "b*.jsonl")]
        summary = run_batch(
            inputs, output, actors=1, num_cpus_per_actor=1, allow_private_network=True
        )
        assert (summary.total, summary.written, summary.errors) == (7, 7, 4)
        rows = _by_key(_part_rows(output))
        broken = [row for row in rows.values() if row["id"] is None]
        assert [(row["line"], row["input"]) for row in broken] == [(2, str(second.resolve()))]
        assert {key for key, row in rows.items() if row["error"]} == {
            "later0", "later1", "later2", "line:2"
        }  # fmt: skip
        assert "404" in rows["later0"]["error"]["message"]
        again = run_batch(inputs, output, actors=1)  # error rows count as done
        assert (again.written, again.already_done) == (0, 7)

        for number in range(3):
            images[f"{number}.png"] = _image_bytes(good[number]["messages"][0]["content"][0])
        reference = tmp_path / "reference.jsonl"
        argv = ["batch", "--quiet", "--allow-private-network", *inputs]
        assert cli_main([*argv, "-o", str(reference)]) == 0
        before = _snapshot(output)

        # Each image now takes 2 s: kill the retry once its first rows are in the journal
        # (the broken line's row comes first, from the driver, then the actor's).
        server.delay = 2.0
        command = [
            sys.executable, "-m", "idefics_kit", *argv, "--ray", "--ray-address", ray_address,
            "--actors", "1", "--cpus-per-actor", "1", "--rows-per-task", "1", "--retry-errors",
            "-o", str(output),
        ]  # fmt: skip
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        process = subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, cwd=ROOT)
        journal = output / ".retry.jsonl"
        try:
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline and process.poll() is None:
                if journal.exists() and journal.read_bytes().count(b"\n") >= 2:
                    break
                time.sleep(0.05)
            assert process.poll() is None, process.communicate()[1]
        finally:
            process.kill()
            process.communicate(timeout=60)
        written = journal.read_bytes().count(b"\n")
        assert 2 <= written < 4
        # The parts are untouched; the killed driver left its journal and its lock file.
        after = _snapshot(output)
        assert set(after) == {*before, ".retry.jsonl", ".lock"}
        assert {name: after[name] for name in before} == before
        assert jobs.status(output).retry_pending == written

        server.delay = 0.0
        notes: list[str] = []
        retried = run_batch(
            inputs, output, actors=1, num_cpus_per_actor=1, allow_private_network=True,
            retry_errors=True, notes=notes.append,
        )  # fmt: skip
    assert f"merged {written} rows of an interrupted retry into {output}" in notes
    assert any(note.startswith(f"took over the lock of {output}") for note in notes)
    # The rest of the three, and the broken line again (an error row like any other).
    assert (retried.written, retried.retried, retried.errors) == (5 - written, 5 - written, 1)
    assert len(list(output.glob("part-*.jsonl"))) == 1  # merged into the first run's part
    assert not journal.exists()
    expected = _by_key([json.loads(line) for line in reference.read_text().splitlines()])
    assert _by_key(_part_rows(output)) == expected
    state = jobs.status(output)
    assert (state.done, state.errors, state.remaining, state.inputs) == (6, 1, 0, 7)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_a_ray_output_refuses_other_settings_and_a_second_writer(
    ray_run: dict[str, Any], job: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """No Ray work: each refusal comes before any (the folder of the 200-row job above)."""
    folder = job["folder"] / "ray_out"
    state = jobs.status(folder)
    total = len(job["local"])
    assert (state.done, state.errors, state.remaining, state.running) == (
        GOOD, total - GOOD, 0, None
    )  # fmt: skip
    before = _snapshot(folder)
    assert "_manifest.json" in before

    with pytest.raises(jobs.OutputMismatchError, match="option max_new_tokens 256 then, 3 now"):
        run_batch(job["input"], folder, options=GenerationOptions(max_new_tokens=3))
    with pytest.raises(jobs.OutputMismatchError, match=r"model 'toy' then, 'other/model' now"):
        run_batch(job["input"], folder, model="other/model")
    argv = ["batch", "--ray", "--quiet", str(job["input"]), "-o", str(folder)]
    assert cli_main([*argv, "--max-new-tokens", "3"]) == 2
    assert "start over with --overwrite" in capsys.readouterr().err
    assert _snapshot(folder) == before

    with jobs.PartsOutput.open(folder, None):
        with pytest.raises(jobs.OutputBusyError, match=f"process {os.getpid()} "):
            run_batch(job["input"], folder)
        assert cli_main(argv) == 1
        assert "is being written by another job" in capsys.readouterr().err
        assert jobs.status(folder).running == os.getpid()
    assert _snapshot(folder) == before
    assert cli_main(["batch-status", str(folder)]) == 0
    assert f"remaining: 0 of {total} inputs\n" in capsys.readouterr().out


# -- a cluster started with `ray start`, in another process, on loopback ------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop ``ray start --block`` and every process it started (its own process group):
    SIGINT, then SIGKILL for what is left after 30 s."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            process.poll()  # reap the leader: a zombie would keep the group alive
            try:
                os.killpg(process.pid, 0)
            except ProcessLookupError:
                process.wait(timeout=5)
                return
            time.sleep(0.2)
    process.wait(timeout=5)


def test_batch_ray_address_on_a_cluster_started_with_ray_start(
    job: dict[str, Any], tmp_path: Path
) -> None:
    """The docs' cluster path: ``ray start --head`` (here in another process, on
    loopback only), then ``idefics-kit batch --ray --ray-address HOST:PORT``.

    On Linux Ray replaces a loopback ``--node-ip-address`` with the machine's
    routable address (``resolve_ip_for_localhost``), unless clusters are
    declared single-machine with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: then
    the node is 127.0.0.1 and the GCS listens on 127.0.0.1 only. Ray 2.60 turns
    on token authentication for a cluster that ``ray start`` creates, so head
    and driver share a token (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN``).
    """
    port = _free_port()
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    temp_dir = Path(tempfile.mkdtemp(prefix="ik-ray-"))  # short: Ray's socket paths
    log = tmp_path / "head.log"
    ray_cli = str(Path(sys.executable).with_name("ray"))
    with open(log, "wb") as sink:
        head = subprocess.Popen(
            [
                ray_cli, "start", "--head", "--block", f"--port={port}",
                "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                "--disable-usage-stats", "--num-cpus=4", "--object-store-memory=200000000",
                f"--temp-dir={temp_dir}",
            ],
            env=environment,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while b"Ray runtime started" not in log.read_bytes():
            assert head.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert b"Local node IP: 127.0.0.1" in log.read_bytes()
        rows = [row for row in job["rows"][:8] if row["id"].startswith("g")][:4]
        input_path = _write_jsonl(tmp_path / "in.jsonl", rows)
        output = tmp_path / "out"
        command = [
            sys.executable, "-m", "idefics_kit", "batch", "--ray",
            "--ray-address", f"127.0.0.1:{port}", "--actors", "1", "--cpus-per-actor", "1",
            str(input_path), "-o", str(output),
        ]  # fmt: skip
        done = subprocess.run(
            command, env=environment, capture_output=True, text=True, timeout=180, cwd=ROOT
        )
        assert done.returncode == 0, done.stderr
        assert "Connected to Ray cluster" in done.stderr or "wrote 4 rows" in done.stderr
        assert re.search(r"wrote 4 rows to \S+ in [\d.]+ s: 4 done, 0 with an error", done.stderr)
        got = _by_key(_part_rows(output))
        assert got == {row["id"]: job["local"][row["id"]] for row in rows}
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
