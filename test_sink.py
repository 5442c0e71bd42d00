"""
End-to-end tests: real sink.py processes, real ZeroMQ sockets, real Locust runs against an HTTP
target on 127.0.0.1 (200 on /, 404 elsewhere). Every test checks the data that came out.
"""

import csv
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import zmq

REPO = Path(__file__).resolve().parent
LOCUSTFILE = REPO / "locustfile.py"
RUN_TIME = 3  # seconds of load per Locust run


# --- the HTTP target --------------------------------------------------------------------------

class Target(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real server would

    def do_GET(self):
        found = self.path == "/"
        body = b"hello" if found else b"not found"
        self.send_response(200 if found else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def target():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Target)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --- processes --------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tag():
    """A mark in the environment of every process a test starts, to find any it left behind."""
    mark = uuid.uuid4().hex
    yield mark
    leftovers = tagged_processes(mark)
    for proc in leftovers:
        proc.kill()
    assert not leftovers, f"processes left running: {[p.cmdline() for p in leftovers]}"


def tagged_processes(mark):
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("LOCUST_LOG_TEST_TAG") == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def locust_processes(mark):
    return [p for p in tagged_processes(mark) if "locust" in " ".join(p.cmdline())]


def environment(tag, **settings):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCUST_LOG_FILE", "ZMQ_SINK_ADDRESS", "HOST")}
    env.update(LOCUST_LOG_TEST_TAG=tag, PYTHONUNBUFFERED="1", **settings)
    return env


@pytest.fixture(scope="session")
def without_accelerators(tmp_path_factory):
    """Settings under which orjson and simdjson fail to import, as where only Locust and pyzmq are installed."""
    shadow = tmp_path_factory.mktemp("without_accelerators")
    for module in ("orjson", "simdjson"):
        (shadow / f"{module}.py").write_text(f"raise ImportError('{module} is hidden by the test')\n")
    return {"PYTHONPATH": str(shadow)}


class SinkProcess:
    def __init__(self, tmp_path, tag, address=None, name="sink", settings=None):
        self.address = address or f"tcp://127.0.0.1:{free_port()}"
        self.log_file = tmp_path / f"{name}.jsonl"
        self.stderr_path = tmp_path / f"{name}.err"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "sink.py"), "--bind", self.address, "--log-file", str(self.log_file)],
                stderr=stderr, env=environment(tag, **(settings or {})),
            )
        wait_for(lambda: "listening on" in self.stderr(), what="the sink to bind")

    def stderr(self):
        return self.stderr_path.read_text()

    def stop(self, signum=signal.SIGTERM):
        self.proc.send_signal(signum)
        assert self.proc.wait(timeout=30) == 0, self.stderr()
        return self.stderr()


@pytest.fixture
def sinks(tmp_path, tag):
    started = []

    def start(**kwargs):
        started.append(SinkProcess(tmp_path, tag, **kwargs))
        return started[-1]

    yield start
    for sink in started:
        if sink.proc.poll() is None:
            sink.proc.kill()
            sink.proc.wait()


def wait_for(condition, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def write_locustfile(path, source):
    """A locustfile that can import ours, which registers the hooks when imported."""
    path.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + textwrap.dedent(source))
    return path


def locust_command(target, *args, locustfile=LOCUSTFILE):
    return [sys.executable, "-m", "locust", "-f", str(locustfile), "-H", target, "--exit-code-on-error", "0",
            "--loglevel", "INFO", *args]


def run_locust(tmp_path, tag, target, *args, settings=None, locustfile=LOCUSTFILE, name="locust"):
    """Run Locust headless for RUN_TIME seconds; return its exit code, stderr and --json-file stats."""
    stats = tmp_path / f"{name}-stats"
    command = locust_command(target, "--headless", "-u", "4", "-r", "4", "-t", f"{RUN_TIME}s",
                             "--json-file", str(stats), *args, locustfile=locustfile)
    result = subprocess.run(command, cwd=tmp_path, env=environment(tag, **(settings or {})),
                            capture_output=True, text=True, timeout=90)
    return result.returncode, result.stderr, json.loads((tmp_path / f"{name}-stats.json").read_text())


# --- reading results --------------------------------------------------------------------------

def read_records(path):
    """Every line must be a complete JSON object; returns them in file order."""
    text = Path(path).read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "last line is incomplete"
    records = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(r, dict) for r in records)
    return records


def requests_of(records):
    return [r for r in records if isinstance(r["message"], dict) and r["message"].get("class") == "request"]


def request_counts(records):
    return Counter((r["message"]["request_type"], r["message"]["name"], r["message"]["result"])
                   for r in requests_of(records))


def locust_counts(stats):
    counts = Counter()
    for entry in stats:
        counts[(entry["method"], entry["name"], "success")] += entry["num_requests"] - entry["num_failures"]
        counts[(entry["method"], entry["name"], "error")] += entry["num_failures"]
    return +counts  # drop zeros


def assert_same_counts(records, stats):
    expected = locust_counts(stats)
    assert expected[("GET", "/", "success")] > 0 and expected[("GET", "/does-not-exist", "error")] > 0
    assert request_counts(records) == expected


def samples_of(records):
    return [r for r in records if isinstance(r["message"], dict) and r["message"].get("class") == "resources"]


def the_run_id(records):
    """The one run id that every record carries."""
    run_ids = {r["run_id"] for r in records}
    assert len(run_ids) == 1, run_ids
    run_id = run_ids.pop()
    assert isinstance(run_id, str) and run_id
    return run_id


# --- every Locust mode ------------------------------------------------------------------------

def test_local_run_delivers_every_request(tmp_path, tag, target, sinks):
    sink = sinks()
    code, stderr, stats = run_locust(tmp_path, tag, target, settings={
        "ZMQ_SINK_ADDRESS": sink.address, "LOCUST_RESOURCE_INTERVAL": "0"})
    assert code == 0, stderr
    sink.stop()
    records = read_records(sink.log_file)
    assert_same_counts(records, stats)
    the_run_id(records)
    assert not samples_of(records), "LOCUST_RESOURCE_INTERVAL=0 turns resource samples off"
    assert not locust_processes(tag)


def test_processes_run_delivers_every_request_from_each_process(tmp_path, tag, target, sinks):
    sink = sinks()
    port = str(free_port())
    code, stderr, stats = run_locust(
        tmp_path, tag, target, "--processes", "2", "--master-bind-host", "127.0.0.1",
        "--master-bind-port", port, "--master-port", port,
        settings={"ZMQ_SINK_ADDRESS": sink.address, "LOCUST_LOG_FILE": str(tmp_path / "local.jsonl")},
    )
    assert code == 0, stderr
    assert not locust_processes(tag), "a forked Locust process outlived the run"
    sink.stop()
    records = read_records(sink.log_file)
    assert_same_counts(records, stats)
    workers = {r["worker"] for r in requests_of(records)}
    assert len(workers) == 2
    the_run_id(records)
    # Each worker wrote its own local file, and together they hold what the sink got.
    local_files = sorted(tmp_path.glob("local.*.jsonl"))
    assert [f.name for f in local_files] == sorted(f"local.{w}.jsonl" for w in workers)
    local = [r for f in local_files for r in read_records(f)]
    assert sorted(map(json.dumps, local)) == sorted(map(json.dumps, records))


def test_master_and_workers_deliver_every_request(tmp_path, tag, target, sinks):
    sink = sinks()
    port = str(free_port())
    workers = [
        subprocess.Popen(locust_command(target, "--worker", "--master-host", "127.0.0.1", "--master-port", port),
                         cwd=tmp_path, env=environment(tag, ZMQ_SINK_ADDRESS=sink.address, HOST=f"loadgen-{i}"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for i in (1, 2)
    ]
    try:
        # The master logs nothing of its own here, and still names the run for its workers.
        code, stderr, stats = run_locust(
            tmp_path, tag, target, "--master", "--expect-workers", "2", "--master-bind-host", "127.0.0.1",
            "--master-bind-port", port,
        )
        assert code == 0, stderr
        assert [w.wait(timeout=30) for w in workers] == [0, 0]
        assert not locust_processes(tag)
    finally:
        for w in workers:
            w.kill()
            w.wait()
    sink.stop()
    records = read_records(sink.log_file)
    assert_same_counts(records, stats)
    assert len({r["worker"] for r in requests_of(records)}) == 2
    assert {r["hostname"] for r in requests_of(records)} == {"loadgen-1", "loadgen-2"}
    the_run_id(records)


def test_web_ui_run_with_processes_delivers_every_request(tmp_path, tag, target, sinks):
    sink = sinks()
    port = str(free_port())
    stats_file = tmp_path / "ui-stats"
    command = locust_command(
        target, "--autostart", "--autoquit", "0", "-u", "4", "-r", "4", "-t", f"{RUN_TIME}s",
        "--web-host", "127.0.0.1", "--web-port", str(free_port()), "--processes", "2",
        "--master-bind-host", "127.0.0.1", "--master-bind-port", port, "--master-port", port,
        "--json-file", str(stats_file),
    )
    result = subprocess.run(command, cwd=tmp_path, env=environment(tag, ZMQ_SINK_ADDRESS=sink.address),
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert "Starting web interface" in result.stderr
    assert not locust_processes(tag)
    sink.stop()
    records = read_records(sink.log_file)
    assert_same_counts(records, json.loads(Path(f"{stats_file}.json").read_text()))
    assert len({r["worker"] for r in requests_of(records)}) == 2


# --- an absent or late sink -------------------------------------------------------------------

def test_sink_started_late_still_gets_every_record(tmp_path, tag, target, sinks):
    address = f"tcp://127.0.0.1:{free_port()}"
    command = locust_command(target, "--headless", "-u", "4", "-r", "4", "-t", f"{RUN_TIME + 2}s",
                             "--json-file", str(tmp_path / "stats"))
    locust = subprocess.Popen(command, cwd=tmp_path, env=environment(tag, ZMQ_SINK_ADDRESS=address),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.5)
        sink_started = datetime.now(timezone.utc)
        sink = sinks(address=address)
        _, stderr = locust.communicate(timeout=90)
    finally:
        locust.kill()
        locust.wait()
    assert locust.returncode == 0, stderr
    sink.stop()
    records = read_records(sink.log_file)
    assert_same_counts(records, json.loads((tmp_path / "stats.json").read_text()))
    first = min(datetime.fromisoformat(r["time"].replace("Z", "+00:00")) for r in records)
    assert first < sink_started, "no record was made before the sink started, so nothing was queued"
    assert "not delivered" not in stderr


def test_sink_never_started_run_ends_and_reports_what_was_lost(tmp_path, tag, target):
    local_file = tmp_path / "local.jsonl"
    queue_limit = 50
    code, stderr, stats = run_locust(tmp_path, tag, target, settings={
        "ZMQ_SINK_ADDRESS": f"tcp://127.0.0.1:{free_port()}", "ZMQ_SINK_QUEUE": str(queue_limit),
        "LOCUST_LOG_FILE": str(local_file),
    })
    assert code == 0, stderr
    # The users kept their pace: the local file holds every request Locust counted.
    records = read_records(local_file)
    assert_same_counts(records, stats)
    assert len(records) > queue_limit
    reported = re.search(r"(\d+) records not delivered \((\d+) dropped on a full queue of (\d+), (\d+) still queued",
                         stderr)
    assert reported, stderr
    undelivered, dropped, limit, queued = map(int, reported.groups())
    assert (undelivered, dropped, limit, queued) == (len(records), len(records) - queue_limit, queue_limit,
                                                     queue_limit)


BIG_RECORDS_LOCUSTFILE = """
    import locustfile  # the hooks register themselves on import
    from locust import FastHttpUser, constant, task

    class BigRecordUser(FastHttpUser):
        wait_time = constant(0.01)

        @task
        def big(self):
            self.client.get("/", context={"padding": "x" * 100_000})
"""


def test_stalled_sink_does_not_slow_the_run(tmp_path, tag, target):
    # A sink that accepts the connection and never reads: ZeroMQ and TCP buffers fill, then our queue.
    context = zmq.Context()
    stalled = context.socket(zmq.PULL)
    stalled.setsockopt(zmq.RCVHWM, 1)
    port = stalled.bind_to_random_port("tcp://127.0.0.1")
    locustfile = write_locustfile(tmp_path / "big_locustfile.py", BIG_RECORDS_LOCUSTFILE)
    local_file = tmp_path / "local.jsonl"
    try:
        code, stderr, stats = run_locust(tmp_path, tag, target, locustfile=locustfile, settings={
            "ZMQ_SINK_ADDRESS": f"tcp://127.0.0.1:{port}", "ZMQ_SINK_QUEUE": "10", "LOCUST_LOG_FILE": str(local_file),
        })
    finally:
        stalled.close(linger=0)
        context.term()
    assert code == 0, stderr
    records = read_records(local_file)
    assert request_counts(records) == locust_counts(stats)
    reported = re.search(r"(\d+) records not delivered \((\d+) dropped on a full queue of 10, (\d+) still queued.*; "
                         r"(\d+) sent", stderr)
    assert reported, stderr
    undelivered, dropped, queued, sent = map(int, reported.groups())
    assert dropped > 0 and queued == 10
    assert undelivered + sent == len(records)


# --- the record -------------------------------------------------------------------------------

TIME_FORMAT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_record_format(tmp_path, tag, target, sinks):
    sink = sinks()
    local_file = tmp_path / "local.jsonl"
    started = datetime.now(timezone.utc)
    # A time zone far from UTC, so a formatter printing local time would be caught.
    code, stderr, stats = run_locust(tmp_path, tag, target, settings={
        "ZMQ_SINK_ADDRESS": sink.address, "LOCUST_LOG_FILE": str(local_file), "HOST": "loadgen-test",
        "TZ": "Asia/Kathmandu",
    })
    assert code == 0, stderr
    sink.stop()
    records = read_records(sink.log_file)
    assert sorted(map(json.dumps, records)) == sorted(map(json.dumps, read_records(local_file)))
    for record in records:
        assert list(record) == ["time", "loglevel", "hostname", "worker", "run_id", "message"]
        assert TIME_FORMAT.match(record["time"]), record["time"]
        when = datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        assert abs((when - started).total_seconds()) < 120
        assert record["hostname"] == "loadgen-test"
    assert len({r["worker"] for r in records}) == 1

    ok = next(r for r in requests_of(records) if r["message"]["result"] == "success")
    assert ok["loglevel"] == "INFO"
    assert set(ok["message"]) == {"class", "request_type", "name", "result", "response_time", "response_length",
                                  "start_time", "url", "other"}
    assert ok["message"]["name"] == "/" and ok["message"]["url"] == f"{target}/"
    assert ok["message"]["response_length"] == len(b"hello")
    assert ok["message"]["response_time"] > 0
    assert abs(ok["message"]["start_time"] - started.timestamp()) < 120
    failed = next(r for r in requests_of(records) if r["message"]["result"] == "error")
    assert failed["loglevel"] == "ERROR"
    assert "404" in failed["message"]["exception"]
    assert failed["message"]["name"] == "/does-not-exist"

    plain = [r for r in records if not isinstance(r["message"], dict)]
    assert plain and all(r["message"] == "Task started" and r["loglevel"] == "INFO" for r in plain)


ODD_VALUES_LOCUSTFILE = """
    from locustfile import logger  # the hooks register themselves on import
    from locust import FastHttpUser, constant, task

    class Opaque:
        def __repr__(self):
            return "<opaque>"

    class Broken:
        def __str__(self):
            raise RuntimeError("no text for you")

        __repr__ = __str__

    class OddUser(FastHttpUser):
        wait_time = constant(0.1)

        @task
        def odd(self):
            circular = {}
            circular["self"] = circular
            for context in ({"bytes": b"\\xff\\x00", "object": Opaque(), "error": ValueError("boom")},
                            {(1, 2): "tuple key"}, {"nan": float("nan")}, circular, {"broken": Broken()}):
                with self.client.get("/", name="odd", context=context, catch_response=True) as response:
                    response.failure(ValueError("custom failure"))
            logger.info("%s and %s", b"\\xfe", Opaque())
"""


@pytest.mark.parametrize("orjson", [True, False], ids=["orjson", "json module"])
def test_values_json_cannot_encode_become_strings(tmp_path, tag, target, without_accelerators, orjson):
    locustfile = write_locustfile(tmp_path / "odd_locustfile.py", ODD_VALUES_LOCUSTFILE)
    local_file = tmp_path / "local.jsonl"
    code, stderr, stats = run_locust(tmp_path, tag, target, locustfile=locustfile, settings={
        "LOCUST_LOG_FILE": str(local_file), **({} if orjson else without_accelerators)})
    assert code == 0, stderr
    assert "Traceback" not in stderr
    records = read_records(local_file)
    assert request_counts(records) == locust_counts(stats) and stats[0]["num_failures"] >= 5
    others = [r["message"]["other"] for r in requests_of(records)]
    assert {"bytes": "b'\\xff\\x00'", "object": "<opaque>", "error": "boom"} in others
    assert "{(1, 2): 'tuple key'}" in others
    # The one difference between the two encoders: orjson writes NaN as null.
    assert ({"nan": None} if orjson else "{'nan': nan}") in others
    assert any("{...}" in other for other in others if isinstance(other, str))  # the circular one
    assert "<unprintable dict>" in others  # its repr() calls Broken.__repr__, which raises
    assert all(r["message"]["exception"] == "custom failure" for r in requests_of(records))
    assert "b'\\xfe' and <opaque>" in [r["message"] for r in records]


# --- bad input to the sink --------------------------------------------------------------------

BAD_MESSAGES = {
    "empty": [b""],
    "empty line": [b'{"a": 1}\n\n{"b": 2}'],
    "only a line break": [b"\n"],
    "byte order mark": [b'\xef\xbb\xbf{"a": 1}'],
    "huge integer, then a BOM": [b'{"a": 123456789012345678901234567890}\n\xef\xbb\xbf{"b": 1}'],
    "not UTF-8": [b'{"text": "\xff\xfe"}'],
    "UTF-16": ['{"a": 1}'.encode("utf-16")],
    "not JSON": [b"hello sink"],
    "truncated JSON": [b'{"a": '],
    "NaN": [b'{"a": NaN}'],
    "array": [b"[1, 2]"],
    "string": [b'"just a string"'],
    "number": [b"42"],
    "null": [b"null"],
    "newline inside": [b'{"a":\n1}'],
    "pretty-printed, with a line that is an object": [b'{"outer":\n{"inner": 1}\n}'],
    "a batch with one bad line": [b'{"good": 1}\nnot json\n{"good": 2}'],
    "carriage return": [b'{"a": 1}\r'],
    "huge": [b'{"a": "' + b"x" * (2 << 20) + b'"}'],
    "deeply nested": [b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"],
    "multipart garbage": [b"\x00\x01\x02", b"", b"{", b"\xc3\x28", b"]"],
}


@pytest.mark.parametrize("simdjson", [True, False], ids=["simdjson", "json module"])
def test_bad_input_is_counted_and_never_written(tmp_path, tag, sinks, without_accelerators, simdjson):
    sink = sinks(settings=None if simdjson else without_accelerators)
    assert ("checking records with simdjson" in sink.stderr()) == simdjson
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.connect(sink.address)
    valid = []
    for n, (kind, frames) in enumerate(BAD_MESSAGES.items()):
        push.send_multipart(frames)
        valid.append({"n": n, "after": kind, "text": "ünïcödé"})
        push.send(json.dumps(valid[-1], ensure_ascii=False).encode())
    # A message may mix good and bad frames: the good ones are written.
    valid.append({"n": "in a message"})
    push.send_multipart([b"oops", json.dumps(valid[-1]).encode(), b"[]"])
    # Records simdjson refuses but Python's decoder reads: the sink's verdict must not depend on simdjson.
    valid.extend([{"big": 123456789012345678901234567890}, {"lone surrogate": "\ud800"}])
    push.send(b'{"big": 123456789012345678901234567890}')
    push.send(b'{"lone surrogate": "\\ud800"}')
    # A frame may hold several records, one a line, with or without a final line break.
    valid.extend([{"batch": 1}, {"batch": 2}, {"batch": 3}])
    push.send(b'{"batch": 1}\n{"batch": 2}\n')
    push.send(b'{"batch": 3}')
    push.close(linger=10_000)
    context.term()
    wait_for(lambda: len(complete_lines(sink.log_file)) == len(valid), what="the valid records")
    assert sink.proc.poll() is None, "bad input stopped the sink"
    summary = sink.stop()
    assert read_records(sink.log_file) == valid
    bad_frames = sum(len(frames) for frames in BAD_MESSAGES.values()) + 2
    assert f"{len(valid)} records written" in summary
    assert f"{bad_frames} frames rejected" in summary
    for reason in ("empty", "empty line", "over 1 MiB", "carriage return", "not UTF-8", "not JSON", "not an object"):
        assert reason in summary


def complete_lines(path):
    """What a running sink has flushed so far (it flushes every few seconds)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    return text.splitlines() if text.endswith("\n") else []


# --- stopping the sink ------------------------------------------------------------------------

PUSHER = """
import json, sys, time, zmq
push = zmq.Context().socket(zmq.PUSH)
push.connect(sys.argv[1])
n = 0
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    push.send(b"\\n".join(json.dumps({"n": n + i, "pad": "x" * 200}).encode() for i in range(100)))
    n += 100
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_streaming_leaves_whole_lines_and_a_summary(tmp_path, tag, sinks, signum):
    sink = sinks()
    pusher = subprocess.Popen([sys.executable, "-c", PUSHER, sink.address], env=environment(tag))
    try:
        wait_for(lambda: re.search(r"sink: \d+ records \(\+\d+/s\), 0 frames rejected", sink.stderr()),
                 what="a progress line")
        summary = sink.stop(signum)
    finally:
        pusher.kill()
        pusher.wait()
    records = read_records(sink.log_file)
    written = int(re.search(r"(\d+) records written in [\d.]+s \((\d+)/s\), 0 frames rejected", summary).group(1))
    assert written == len(records) > 0
    # Frames arrive in the order each pusher sent them: the file holds a gapless prefix of the stream.
    assert [r["n"] for r in records] == list(range(len(records)))
    assert f"stopped by {signal.Signals(signum).name}" in summary


def test_sink_appends_and_never_truncates(tmp_path, tag, sinks):
    first = sinks()
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.connect(first.address)
        push.send(b'{"run": 1}')
        wait_for(lambda: len(complete_lines(first.log_file)) == 1, what="the first record")
        assert "1 records written" in first.stop()
        second = sinks(address=first.address)
        push.send(b'{"run": 2}')
        wait_for(lambda: len(complete_lines(second.log_file)) == 2, what="the second record")
    assert "1 records written" in second.stop()
    assert read_records(second.log_file) == [{"run": 1}, {"run": 2}]


# --- runs and resource samples ----------------------------------------------------------------

BUSY_LOCUSTFILE = """
    import time
    import locustfile  # the hooks register themselves on import
    from locust import FastHttpUser, constant, task

    class BusyUser(FastHttpUser):
        wait_time = constant(0)

        @task
        def busy(self):
            self.client.get("/")
            deadline = time.perf_counter() + 0.02
            while time.perf_counter() < deadline:
                pass  # keeps the worker's CPU busy, and its master's idle
"""


def test_resource_samples_come_from_each_worker_at_the_interval(tmp_path, tag, target, sinks):
    sink = sinks()
    port = str(free_port())
    locustfile = write_locustfile(tmp_path / "busy_locustfile.py", BUSY_LOCUSTFILE)
    code, stderr, stats = run_locust(
        tmp_path, tag, target, "--processes", "2", "--master-bind-host", "127.0.0.1",
        "--master-bind-port", port, "--master-port", port, locustfile=locustfile,
        settings={"ZMQ_SINK_ADDRESS": sink.address, "LOCUST_RESOURCE_INTERVAL": "0.5"},
    )
    assert code == 0, stderr
    sink.stop()
    records = read_records(sink.log_file)
    run_id = the_run_id(records)
    workers = {r["worker"] for r in requests_of(records)}
    samples = samples_of(records)
    assert {r["worker"] for r in samples} == workers and len(workers) == 2, "only processes running users sample"
    _, output = report(sink.log_file)
    for worker in workers:
        mine = [r for r in samples if r["worker"] == worker]
        times = [datetime.fromisoformat(r["time"].replace("Z", "+00:00")).timestamp() for r in mine]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert RUN_TIME / 0.5 - 2 <= len(mine) <= RUN_TIME / 0.5 + 1, times
        assert all(0.45 <= gap <= 0.8 for gap in gaps), gaps
        for record in mine:
            message = record["message"]
            assert set(message) == {"class", "cpu_percent", "rss_bytes", "user_count"}
            assert record["run_id"] == run_id and record["loglevel"] == "INFO"
            assert 0 <= message["cpu_percent"] <= 200
            assert 20e6 < message["rss_bytes"] < 1e9
            assert message["user_count"] in (0, 1, 2, 3, 4)
        assert mine[-1]["message"]["user_count"] == 2, "4 users over 2 workers"
        # The worker's own CPU, not its idle master's: the users spin between requests.
        peak = max(r["message"]["cpu_percent"] for r in mine)
        assert peak > 50, [r["message"]["cpu_percent"] for r in mine]
        row = re.search(rf"^{worker} +\S+ +(\d+) +(\d+) +([\d.]+)% +([\d.]+) MB$", output, re.MULTILINE)
        assert row.groups() == (str(len(requests_of([r for r in records if r["worker"] == worker]))), str(len(mine)),
                                f"{peak:.1f}", f"{max(r['message']['rss_bytes'] for r in mine) / 1e6:.1f}")
        warned = f"WARNING: worker {worker} reached {peak:.1f}% CPU, above 90%" in output
        assert warned == (peak > 90)


RUN_ID_LOCUSTFILE = """
    from locustfile import WebsiteUser, logger  # the hooks register themselves on import
    from locust import events

    @events.init.add_listener
    def say_ready(environment, **kwargs):
        logger.info("ready")  # before any test: run_id null
"""


def web_ui(port, path, form=None):
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", data=data, timeout=10) as response:
        return json.loads(response.read() or b"null") if path != "/" else response.status


def test_each_test_started_from_the_web_ui_gets_a_new_run_id(tmp_path, tag, target, sinks):
    sink = sinks()
    locustfile = write_locustfile(tmp_path / "run_id_locustfile.py", RUN_ID_LOCUSTFILE)
    web_port, master_port = free_port(), str(free_port())
    command = locust_command(target, "--web-host", "127.0.0.1", "--web-port", str(web_port), "--processes", "2",
                             "--master-bind-host", "127.0.0.1", "--master-bind-port", master_port,
                             "--master-port", master_port, locustfile=locustfile)
    master = subprocess.Popen(command, cwd=tmp_path, env=environment(tag, ZMQ_SINK_ADDRESS=sink.address),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: master_ready(web_port), what="the web UI and 2 workers")
        for _ in range(2):
            assert web_ui(web_port, "/swarm", {"user_count": 4, "spawn_rate": 4, "host": target})["success"]
            time.sleep(2)
            web_ui(web_port, "/stop", {})
            wait_for(lambda: web_ui(web_port, "/stats/requests")["state"] == "stopped", what="the test to stop")
            wait_for(lambda: all(w["state"] == "ready" for w in web_ui(web_port, "/stats/requests")["workers"]),
                     what="the workers to be ready again")
        master.send_signal(signal.SIGTERM)
        _, stderr = master.communicate(timeout=30)
    finally:
        master.kill()
        master.wait()
    assert master.returncode == 0, stderr
    assert not locust_processes(tag)
    sink.stop()
    records = read_records(sink.log_file)
    run_ids = sorted({r["run_id"] for r in requests_of(records)})
    assert len(run_ids) == 2 and None not in run_ids
    workers = {r["worker"] for r in requests_of(records)}
    assert len(workers) == 2
    for run_id in run_ids:
        assert {r["worker"] for r in requests_of(records) if r["run_id"] == run_id} == workers
    # Each process's records arrive in the order it made them: null until its first test, then the first
    # test's id until the second test starts, then the second's. No request of a test carries another id.
    for worker in workers:
        mine = [r for r in records if r["worker"] == worker]
        assert mine[0]["message"] == "ready" and mine[0]["run_id"] is None
        run_ids_in_order = [r["run_id"] for r in mine]
        assert run_ids_in_order == sorted(run_ids_in_order, key=lambda run_id: (run_id is not None, run_id))
    assert [r["run_id"] for r in records if r["message"] == "ready"] == [None] * 3  # master and 2 workers


def master_ready(web_port):
    try:
        return web_ui(web_port, "/stats/requests").get("worker_count") == 2
    except OSError:
        return False


def test_two_runs_into_one_file_get_two_run_ids_that_the_report_separates(tmp_path, tag, target, sinks):
    sink = sinks()
    stats = {}
    for name in ("first", "second"):
        code, stderr, stats[name] = run_locust(tmp_path, tag, target, name=name,
                                               settings={"ZMQ_SINK_ADDRESS": sink.address})
        assert code == 0, stderr
    sink.stop()
    records = read_records(sink.log_file)
    run_ids = list(dict.fromkeys(r["run_id"] for r in records))  # in file order: the first run's first
    assert len(run_ids) == 2 and None not in run_ids
    for run_id, name in zip(run_ids, ("first", "second")):
        assert_same_counts([r for r in records if r["run_id"] == run_id], stats[name])
        tables, _ = report(sink.log_file, "--run", run_id)
        assert list(tables) == [run_id]
        assert report_counts(tables[run_id]) == locust_counts(stats[name])
    tables, _ = report(sink.log_file)
    assert list(tables) == run_ids


# --- the report -------------------------------------------------------------------------------

def report(path, *args, expect_code=0):
    """Run `sink.py --report`; return its tables, {run_id: {(type, name): row}} with rows as text columns, and
    all it printed."""
    result = subprocess.run([sys.executable, str(REPO / "sink.py"), "--report", str(path), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == expect_code, result.stderr
    assert "Traceback" not in result.stderr
    tables, run_id = {}, None
    for line in result.stdout.splitlines():
        if line.startswith("Run "):
            run_id = line.split()[1].rstrip(":")
            tables[run_id] = {}
        row = re.fullmatch(r"(\S*) +(\S+) +(\d+) +(\d+) +(\S+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)", line)
        if row:
            request_type, name, *columns = row.groups()
            tables[run_id][(request_type, name)] = columns
    return tables, result.stdout


def report_counts(table):
    """Per (type, name, result), like request_counts(), from a report's table."""
    counts = Counter()
    for (request_type, name), (requests, failures, *_) in table.items():
        if name != "Aggregated":
            counts[(request_type, name, "success")] += int(requests) - int(failures)
            counts[(request_type, name, "error")] += int(failures)
    return +counts


def nearest_rank(values, percent):
    """The percentile as the report defines it, computed another way: sort, then count."""
    ordered = sorted(values)
    return ordered[math.ceil(len(ordered) * percent / 100) - 1]


def expected_row(values, failures, seconds):
    return [str(len(values)), str(failures), f"{len(values) / seconds:.1f}",
            *(f"{nearest_rank(values, p):.2f}" for p in (50, 90, 95, 99)), f"{max(values):.2f}"]


def test_report_of_a_real_run_matches_locust_and_the_raw_values(tmp_path, tag, target, sinks):
    sink = sinks()
    port = str(free_port())
    code, stderr, stats = run_locust(
        tmp_path, tag, target, "--processes", "2", "--master-bind-host", "127.0.0.1",
        "--master-bind-port", port, "--master-port", port, settings={"ZMQ_SINK_ADDRESS": sink.address},
    )
    assert code == 0, stderr
    sink.stop()
    records = read_records(sink.log_file)
    run_id = the_run_id(records)
    timeline = tmp_path / "timeline.csv"
    table = report(sink.log_file, "--timeline", str(timeline))[0][run_id]
    assert report_counts(table) == locust_counts(stats)
    ends = [datetime.fromisoformat(r["time"].replace("Z", "+00:00")).timestamp() for r in requests_of(records)]
    seconds = max(ends) - min(ends)
    for key in [("GET", "/"), ("GET", "/does-not-exist")]:
        values = [r["message"]["response_time"] for r in requests_of(records)
                  if (r["message"]["request_type"], r["message"]["name"]) == key]
        assert table[key] == expected_row(values, key[1] == "/does-not-exist" and len(values) or 0, seconds)
    every = [r["message"]["response_time"] for r in requests_of(records)]
    assert table[("", "Aggregated")] == expected_row(every, stats_failures(stats), seconds)
    rows = list(csv.DictReader(timeline.open()))
    assert sum(int(row["requests"]) for row in rows) == len(every)
    assert {row["run_id"] for row in rows} == {run_id}


def stats_failures(stats):
    return sum(entry["num_failures"] for entry in stats)


RUN_A, RUN_B = "20261128T100000Z-aaaaaaaa", "20261128T110000Z-bbbbbbbb"


def record_line(second, run_id, message, worker="w1", millisecond=None):
    millisecond = random.randrange(1000) if millisecond is None else millisecond
    return json.dumps({"time": f"2026-11-28T{second}.{millisecond:03d}Z", "loglevel": "INFO", "hostname": "h-" + worker,
                       "worker": worker, "run_id": run_id, "message": message})


def request(request_type, name, response_time, failed=False):
    return {"class": "request", "request_type": request_type, "name": name, "result": "error" if failed else "success",
            "response_time": response_time, "response_length": 5, "other": {}}


def test_report_percentiles_counts_and_timeline_on_hand_checkable_data(tmp_path):
    random.seed(4)
    seconds = [f"10:00:{n:02d}" for n in (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)]  # nothing in 10:00:05
    run_a = [("GET", "/a", float(v), v % 15 == 0) for v in range(1, 101)] + [("POST", "/b", v - 0.5, False)
                                                                          for v in range(1, 11)]
    random.shuffle(run_a)
    placed = [(seconds[n % len(seconds)], *request_) for n, request_ in enumerate(run_a)]
    lines = [record_line(second, RUN_A, request(*request_), worker=("w1", "w2")[n % 2],
                         millisecond=0 if second in ("10:00:00", "10:00:10") else None)
             for n, (second, *request_) in enumerate(placed)]
    lines += [
        record_line("10:00:02", RUN_A, {"class": "resources", "cpu_percent": 95.5, "rss_bytes": 61e6, "user_count": 5}),
        record_line("10:00:07", RUN_A, {"class": "resources", "cpu_percent": 40, "rss_bytes": 62e6, "user_count": 5}),
        record_line("10:00:02", RUN_A, {"class": "resources", "cpu_percent": 50.0, "rss_bytes": 63e6, "user_count": 5},
                    worker="w2"),
        *(record_line("11:00:00", RUN_B, request("GET", "/a", v), millisecond=0) for v in (5, 1, 3)),
        record_line("09:59:59", None, request("GET", "/a", 7)),
        # Skipped: JSON, but not a request or resource record.
        record_line("10:00:01", RUN_A, "Task started"),
        record_line("10:00:01", RUN_A, {"class": "custom", "value": 1}),
        '{"a": 1}', "[1, 2]", '"text"',
        # Unreadable: not JSON, or a request or resource record without what the report needs.
        "garbage", '{"time": ', "",
        record_line("10:00:01", RUN_A, {**request("GET", "/a", 1), "response_time": "fast"}),
        record_line("10:00:01", RUN_A, request("GET", "/a", 1)).replace('"worker": "w1", ', ""),
        record_line("10:00:01", RUN_A, request("GET", "/a", 1)).replace("2026-11-28T", "28/11/2026 "),
        record_line("10:00:01", RUN_A, request("GET", "/a", 1)).replace("1.0", "NaN").replace(': 1,', ": NaN,"),
        record_line("10:00:01", RUN_A, {"class": "resources", "cpu_percent": None, "rss_bytes": 1, "user_count": 0}),
    ]
    collected = tmp_path / "collected.jsonl"
    collected.write_bytes(("\n".join(lines) + "\n").encode() + b'{"bad": "\xff"}\n')
    timeline = tmp_path / "timeline.csv"

    tables, output = report(collected, "--timeline", str(timeline))
    assert list(tables) == [RUN_A, RUN_B, "null"]
    # 100 values 1..100, 10 values 0.5..9.5; 10.000 s from the first request's end to the last's.
    assert tables[RUN_A] == {
        ("GET", "/a"): ["100", "6", "10.0", "50.00", "90.00", "95.00", "99.00", "100.00"],
        ("POST", "/b"): ["10", "0", "1.0", "4.50", "8.50", "9.50", "9.50", "9.50"],
        ("", "Aggregated"): ["110", "6", "11.0", "45.00", "89.00", "95.00", "99.00", "100.00"],
    }
    assert tables[RUN_B] == {("GET", "/a"): ["3", "0", "-", "3.00", "5.00", "5.00", "5.00", "5.00"],
                             ("", "Aggregated"): ["3", "0", "-", "3.00", "5.00", "5.00", "5.00", "5.00"]}
    assert tables["null"][("GET", "/a")][0] == "1"
    assert (f"{collected}: request records 114, resource samples 3, other lines skipped 5, unreadable lines 9 "
            f"(the first: line {lines.index('garbage') + 1})") in output
    warnings = [line for line in output.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: worker w1 reached 95.5% CPU, above 90%")
    assert re.search(r"^w1 +h-w1 +55 +2 +95.5% +62.0 MB$", output, re.MULTILINE)
    assert re.search(r"^w2 +h-w2 +55 +1 +50.0% +63.0 MB$", output, re.MULTILINE)

    rows = list(csv.reader(timeline.open()))
    assert rows[0] == ["run_id", "second", "requests", "failures", "p50_ms", "p95_ms", "p99_ms", "max_ms",
                       "max_worker_cpu_percent"]
    run_a_rows = [row for row in rows if row[0] == RUN_A]
    assert [row[1] for row in run_a_rows] == [f"2026-11-28T10:00:{n:02d}Z" for n in range(11)]
    cpu = {"10:00:02": "95.5", "10:00:07": "40"}
    for row in run_a_rows:
        second = row[1][11:19]
        values = [v for s, _, _, v, _ in placed if s == second]
        failures = sum(failed for s, _, _, _, failed in placed if s == second)
        assert row[2:4] == [str(len(values)), str(failures)]
        assert row[4:8] == ([repr(nearest_rank(values, p)) for p in (50, 95, 99)] + [repr(max(values))]
                            if values else [""] * 4)
        assert row[8] == cpu.get(second, "")
    assert [row for row in rows if row[0] == RUN_B] == [
        [RUN_B, "2026-11-28T11:00:00Z", "3", "0", "3.0", "5.0", "5.0", "5.0", ""]]
    assert [row[:3] for row in rows if row[0] == ""] == [["", "2026-11-28T09:59:59Z", "1"]]

    # --run keeps one run; what the other runs hold is still read, so the counts of lines stay the same.
    only_b, output = report(collected, "--run", RUN_B)
    assert only_b == {RUN_B: tables[RUN_B]}
    assert "resource samples 0 (of run 20261128T110000Z-bbbbbbbb), other lines skipped 5, unreadable lines 9" in output


def test_report_of_an_empty_file_or_an_unknown_run(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    tables, output = report(empty)
    assert tables == {}
    assert "holds no request records and no resource samples: nothing to report" in output
    unreadable = tmp_path / "unreadable.jsonl"
    unreadable.write_text("not json\n{\n")
    tables, output = report(unreadable)
    assert tables == {}
    assert "unreadable lines 2 (the first: line 1)" in output
    one_run = tmp_path / "one_run.jsonl"
    one_run.write_text(record_line("10:00:00", RUN_A, request("GET", "/", 1)) + "\n")
    assert report(one_run, "--run", RUN_B, expect_code=1)[0] == {}
