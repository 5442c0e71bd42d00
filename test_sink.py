"""
End-to-end tests: real sink.py processes, real ZeroMQ sockets, real Locust runs against an HTTP
target on 127.0.0.1 (200 on /, 404 elsewhere). Every test checks the data that came out.
"""

import contextlib
import csv
import dis
import io
import fcntl
import html
import json
import pty
import math
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import struct
import sys
import termios
import textwrap
import threading
import time
import types
import urllib.parse
import urllib.request
import uuid
from array import array
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import version
from pathlib import Path

import cmarkgfm
import junitparser
import psutil
import pytest
import zmq
import zmq.auth

REPO = Path(__file__).resolve().parent
LOCUSTFILE = REPO / "locustfile.py"
RUN_TIME = 3  # seconds of load per Locust run
# The Locust under test: CI runs the real Locust runs on the oldest supported too, which lacks newer options.
LOCUST_VERSION = tuple(map(int, version("locust").split(".")[:2]))
HAS_PROCESSES, HAS_JSON_FILE = LOCUST_VERSION >= (2, 19), LOCUST_VERSION >= (2, 37)
needs_processes = pytest.mark.skipif(not HAS_PROCESSES, reason="--processes came with Locust 2.19")


# --- the HTTP target --------------------------------------------------------------------------

# "/wait/N/RUN" waits N ms plus 0.0, 0.2, ... 9.8 ms in a shuffled order, one step per request of that path: 50
# requests of one path wait the same times in any run, so two runs of the same code differ only by their noise.
WAITS = random.Random(20).sample([step / 5 for step in range(50)], 50)
waited = Counter()


class Target(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real server would
    disable_nagle_algorithm = True  # headers and body are two writes: without it, each response waits ~40 ms

    def do_GET(self):
        # "/": 200; "/slow": 200 after 20 ms; "/status/201": 201, and so on; "/wait/N/RUN": 200, see WAITS; else 404
        status = int(self.path[8:]) if self.path.startswith("/status/") else 200 if self.path in ("/", "/slow") or (
            self.path.startswith("/wait/")) else 404
        if self.path == "/slow":
            time.sleep(0.02)
        elif self.path.startswith("/wait/"):
            waited[self.path] += 1  # one user at a time asks each path: no two threads count at once
            time.sleep((int(self.path.split("/")[2]) + WAITS[waited[self.path] % len(WAITS)]) / 1000)
        body = b"hello" if status < 400 else b"not found"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class TargetServer(ThreadingHTTPServer):
    daemon_threads = True
    # Connections wait in the kernel until accepted. With socketserver's queue of 5, a run of the tests two at a
    # time overflowed it (ListenOverflows in /proc/net/netstat), and a 3 s run whose users' connections were
    # dropped, to be tried again 1 s, then 3 s later, made no request at all.
    request_queue_size = 128

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # Locust drops its connections when it is killed
            super().handle_error(request, client_address)


@pytest.fixture(scope="session")
def target():
    server = TargetServer(("127.0.0.1", 0), Target)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --- processes --------------------------------------------------------------------------------

def free_port():
    """A port that is free on 127.0.0.1, and so is the next one, where a sink publishes acknowledgements."""
    while True:
        with socket.socket() as s, socket.socket() as next_one:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            try:
                next_one.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                pass


@pytest.fixture
def tag():
    """A mark in the environment of every process a test starts, to find any it left behind."""
    mark = uuid.uuid4().hex
    yield mark
    leftovers = {}
    for proc in tagged_processes(mark):
        try:
            leftovers[proc.pid] = " ".join(proc.cmdline())
            proc.kill()
        except psutil.NoSuchProcess:
            pass  # it ended meanwhile
    assert not leftovers, f"processes left running: {leftovers}"


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
    env = {k: v for k, v in os.environ.items() if k not in (
        "LOCUST_LOG_FILE", "ZMQ_SINK_ADDRESS", "HOST", "ZMQ_SINK_CURVE_PUBLIC", "LOCUST_CURVE_SECRET",
        "ZMQ_SINK_CURVE_SECRET", "ZMQ_SINK_CURVE_CLIENTS")}
    # No pushing unless a test asks: the default address may be a real sink's, running on this machine.
    env.update({"LOCUST_LOG_TEST_TAG": tag, "PYTHONUNBUFFERED": "1", "ZMQ_SINK_ADDRESS": "", **settings})
    return {name: value for name, value in env.items() if value is not None}  # None: unset


@pytest.fixture(scope="session")
def without_accelerators(tmp_path_factory):
    """Settings under which orjson, simdjson and plotly fail to import, as where only Locust and pyzmq are
    installed."""
    shadow = tmp_path_factory.mktemp("without_accelerators")
    for module in ("orjson", "simdjson", "plotly"):
        (shadow / f"{module}.py").write_text(f"raise ImportError('{module} is hidden by the test')\n")
    return {"PYTHONPATH": str(shadow)}


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """A sink's key pair and a load generator's, made as the README says, and a stranger's pair."""
    folder = tmp_path_factory.mktemp("keys") / "keys"
    made = subprocess.run([sys.executable, str(REPO / "sink.py"), "--make-keys", str(folder)], capture_output=True,
                          text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    zmq.auth.create_certificates(folder.parent, "stranger")
    return folder


@pytest.fixture(params=[False, True], ids=["plain", "CURVE"])
def curve(request, keys):
    """Settings for the sink and for Locust: none, or CURVE keys on both sides."""
    if not request.param:
        return {}, {}
    return ({"ZMQ_SINK_CURVE_SECRET": str(keys / "sink.key_secret"), "ZMQ_SINK_CURVE_CLIENTS": str(keys / "clients")},
            {"ZMQ_SINK_CURVE_PUBLIC": str(keys / "sink.key"), "LOCUST_CURVE_SECRET": str(keys / "loadgen.key_secret")})


class SinkProcess:
    def __init__(self, tmp_path, tag, address=None, name="sink", settings=None, file_size_limit=None, log_file=None,
                 flags=True, descriptors=None):
        self.address = address or f"tcp://127.0.0.1:{free_port()}"
        self.log_file = log_file or tmp_path / f"{name}.jsonl"
        self.stderr_path = tmp_path / f"{name}.err"
        # A full disk without root: past RLIMIT_FSIZE a write fails with EFBIG (Python ignores SIGXFSZ).
        # Only the soft limit: raising a hard one, even the test's own child's, needs CAP_SYS_RESOURCE.
        def limit():
            if file_size_limit:
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))
            if descriptors:  # (soft, hard) open descriptors
                resource.setrlimit(resource.RLIMIT_NOFILE, descriptors)
        with open(self.stderr_path, "w") as stderr:
            where = {"ZMQ_SINK_BIND": self.address, "ZMQ_SINK_LOG_FILE": str(self.log_file)}
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "sink.py"), *(["--bind", self.address, "--log-file", str(self.log_file)]
                                                          if flags else [])],
                stderr=stderr, env=environment(tag, **(settings or {}), **({} if flags else where)), preexec_fn=limit,
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


def two_processes():
    """Options for `--processes 2`, its master on a free port of 127.0.0.1."""
    port = str(free_port())
    return ["--processes", "2", "--master-bind-host", "127.0.0.1", "--master-bind-port", port, "--master-port", port]


@contextmanager
def two_workers(tmp_path, tag, target, sink_address, settings=None, locustfile=LOCUSTFILE):
    """Options for a master with two workers: `--processes 2`, or before Locust 2.19 two `--worker` processes
    started here, and stopped when the block ends."""
    if HAS_PROCESSES:
        yield two_processes()
        return
    port = str(free_port())
    workers = start_workers(tmp_path, tag, target, port, sink_address, settings=settings, locustfile=locustfile)
    try:
        yield ["--master", "--expect-workers", "2", "--master-bind-host", "127.0.0.1", "--master-bind-port", port]
    finally:
        deadline = time.monotonic() + 30  # a worker quits when its master does
        for worker in workers:
            try:
                worker.wait(timeout=max(0.1, deadline - time.monotonic()))
            finally:
                worker.kill()
                worker.wait()


def locust_command(target, *args, locustfile=LOCUSTFILE):
    return [sys.executable, "-m", "locust", "-f", str(locustfile), "-H", target, "--exit-code-on-error", "0",
            "--loglevel", "INFO", *args]


def run_locust(tmp_path, tag, target, *args, settings=None, locustfile=LOCUSTFILE, name="locust"):
    """Run Locust headless for RUN_TIME seconds; return its exit code, stderr and --json-file stats."""
    return finish_locust(start_locust(tmp_path, tag, target, *args, settings=settings, locustfile=locustfile,
                                      name=name))


def start_locust(tmp_path, tag, target, *args, settings=None, locustfile=LOCUSTFILE, name="locust"):
    command = locust_command(target, "--headless", "-u", "4", "-r", "4", "-t", f"{RUN_TIME}s",
                             *stats_options(tmp_path / f"{name}-stats"), *args, locustfile=locustfile)
    locust = subprocess.Popen(command, cwd=tmp_path, env=environment(tag, **(settings or {})),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    locust.stats_file = tmp_path / f"{name}-stats.json"
    return locust


def stats_options(path):
    """Locust's exact final counts in the file path.json; before Locust 2.37, on its standard output (--json)."""
    return ["--json-file", str(path)] if HAS_JSON_FILE else ["--json"]


def final_stats(stats_file, stdout):
    if HAS_JSON_FILE:
        return json.loads(stats_file.read_text())
    # With --processes, every process prints its own: the workers' are empty, the master's holds every request.
    documents, position, decoder = [], 0, json.JSONDecoder()
    while stdout[position:].strip():
        document, position = decoder.raw_decode(stdout, len(stdout) - len(stdout[position:].lstrip()))
        documents.append(document)
    return max(documents, key=len)


def finish_locust(locust):
    stdout, stderr = locust.communicate(timeout=90)
    return locust.returncode, stderr, final_stats(locust.stats_file, stdout)


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
    """{(type, name): (requests, failures)} of the request records."""
    return by_name((r["message"]["request_type"], r["message"]["name"], 1, r["message"]["result"] != "success")
                   for r in requests_of(records))


def by_name(rows):
    """{(type, name): (requests, failures)} from rows of (type, name, requests, failures): every count, zeros
    included (a Counter would compare a missing count as 0, and hide a name whose every request failed)."""
    counts = {}
    for request_type, name, requests, failures in rows:
        before = counts.get((request_type, name), (0, 0))
        counts[(request_type, name)] = (before[0] + requests, before[1] + failures)
    return counts


def locust_counts(stats):
    return by_name((entry["method"], entry["name"], entry["num_requests"], entry["num_failures"]) for entry in stats)


def assert_same_counts(records, stats):
    expected = locust_counts(stats)
    assert expected[("GET", "/")][0] > 0 == expected[("GET", "/")][1]
    assert expected[("GET", "/does-not-exist")][0] == expected[("GET", "/does-not-exist")][1] > 0
    assert request_counts(records) == expected


def samples_of(records):
    return [r for r in records if isinstance(r["message"], dict) and r["message"].get("class") == "resources"]


def the_run_id(records):
    """The one run id that every record carries."""
    run_ids = {r["run_id"] for r in records}
    assert len(run_ids) == 1, run_ids
    run_id = run_ids.pop()
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{8}", run_id), run_id  # <UTC start time>-<8 random hex digits>
    return run_id


# --- every Locust mode ------------------------------------------------------------------------

def test_local_run_delivers_every_request(tmp_path, tag, target, sinks, curve):
    sink = sinks(settings=curve[0], flags=False)  # ZMQ_SINK_BIND and ZMQ_SINK_LOG_FILE instead
    code, stderr, stats = run_locust(tmp_path, tag, target, settings={
        "ZMQ_SINK_ADDRESS": sink.address, "LOCUST_RESOURCE_INTERVAL": "0", **curve[1]})
    assert code == 0, stderr
    assert ("for only CURVE clients with one of the 1 keys" in sink.stderr()) == bool(curve[0])
    sink.stop()
    records = read_records(sink.log_file)
    assert_same_counts(records, stats)
    the_run_id(records)
    assert not samples_of(records), "LOCUST_RESOURCE_INTERVAL=0 turns resource samples off"
    assert not locust_processes(tag)
    assert_complete(sink.log_file, processes=1)


@needs_processes
def test_processes_run_delivers_every_request_from_each_process(tmp_path, tag, target, sinks, curve):
    sink = sinks(settings=curve[0])
    code, stderr, stats = run_locust(tmp_path, tag, target, *two_processes(), settings={
        "ZMQ_SINK_ADDRESS": sink.address, "LOCUST_LOG_FILE": str(tmp_path / "local.jsonl"), **curve[1]})
    assert code == 0, stderr
    assert not locust_processes(tag), "a forked Locust process outlived the run"
    # A normal run: each process closed its connection after its end record, and the summary names no trouble.
    assert re.search(r"\) from 3 processes, each of which ended; 0 frames rejected, 0 records sent again and already "
                     r"in the file$", sink.stop()), sink.stderr()
    records = read_records(sink.log_file)
    assert_same_counts(records, stats)
    workers = {r["worker"] for r in requests_of(records)}
    assert len(workers) == 2
    the_run_id(records)
    # Each worker wrote its own local file, the master local.jsonl, and together they hold what the sink got.
    local_files = sorted(tmp_path.glob("local.*.jsonl"))
    assert [f.name for f in local_files] == sorted(f"local.{w}.jsonl" for w in workers)
    local = [r for f in local_files + [tmp_path / "local.jsonl"] for r in read_records(f)]
    assert sorted(map(json.dumps, local)) == sorted(map(json.dumps, records))
    # The master logs its end record, and the report says which process it was.
    roles = {p["worker"]: p["role"] for p in assert_complete(sink.log_file, processes=3)["processes"]}
    assert sorted(roles.values()) == ["master", "worker", "worker"] and roles.keys() - workers
    master = next(worker for worker, role in roles.items() if role == "master")
    assert re.search(rf"^{master} .* 1 +0  yes \(master\)$", report(sink.log_file)[1], re.MULTILINE)


def start_workers(tmp_path, tag, target, master_port, sink_address, settings=None, locustfile=LOCUSTFILE,
                  stderr=subprocess.DEVNULL):
    """Two `--worker` processes, labelled loadgen-1 and loadgen-2, pushing to the sink."""
    return [subprocess.Popen(locust_command(target, "--worker", "--master-host", "127.0.0.1", "--master-port",
                                            master_port, locustfile=locustfile),
                             cwd=tmp_path, env=environment(tag, ZMQ_SINK_ADDRESS=sink_address, HOST=f"loadgen-{i}",
                                                           **(settings or {})),
                             stdout=subprocess.DEVNULL, stderr=stderr, text=True)
            for i in (1, 2)]


def test_master_and_workers_deliver_every_request(tmp_path, tag, target, sinks, curve):
    sink = sinks(settings=curve[0])
    port = str(free_port())
    workers = start_workers(tmp_path, tag, target, port, sink.address, settings=curve[1])
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
    # Each worker is named by Locust's own id for it, as the master's log names it
    ready = re.findall(r"(\S+) \(index \d+\) reported as ready\.", stderr)
    assert {r["worker"] for r in requests_of(records)} == set(ready) and len(ready) == 2
    assert {r["hostname"] for r in requests_of(records)} == {"loadgen-1", "loadgen-2"}
    the_run_id(records)
    assert_complete(sink.log_file, processes=2)


def test_web_ui_run_with_processes_delivers_every_request(tmp_path, tag, target, sinks, curve):
    sink = sinks(settings=curve[0])
    stats_file = tmp_path / "ui-stats"
    with two_workers(tmp_path, tag, target, sink.address, settings=curve[1]) as workers:
        command = locust_command(
            target, "--autostart", "--autoquit", "0", "-u", "4", "-r", "4", "-t", f"{RUN_TIME}s",
            "--web-host", "127.0.0.1", "--web-port", str(free_port()), *workers, *stats_options(stats_file),
        )
        result = subprocess.run(command, cwd=tmp_path, env=environment(tag, ZMQ_SINK_ADDRESS=sink.address, **curve[1]),
                                capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert "Starting web interface" in result.stderr
    assert not locust_processes(tag)
    sink.stop()
    records = read_records(sink.log_file)
    assert_same_counts(records, final_stats(Path(f"{stats_file}.json"), result.stdout))
    assert len({r["worker"] for r in requests_of(records)}) == 2
    assert_complete(sink.log_file, processes=3)


# --- every record accounted for, also when something dies --------------------------------------

FULL_SPEED_LOCUSTFILE = """
    import logging
    import locustfile  # the hooks register themselves on import
    from locust import FastHttpUser, constant, task

    locustfile.logger.setLevel(logging.WARNING)  # lines of your own off: requests and end records stay

    class FullSpeedUser(FastHttpUser):
        wait_time = constant(0)

        @task
        def index(self):
            self.client.get("/")  # and nothing else is logged: the records are the requests and the end records
"""


def report_counts_of(run):
    """{(type, name): (requests, failures)} from a run of report.py's JSON."""
    return by_name((row["request_type"], row["name"], row["requests"], row["failures"]) for row in run["names"])


def full_speed_locust(tmp_path, tag, target, sink_address, *args, seconds=8, settings=None):
    """Locust at full speed, no local file, pushing to the sink; returns the running process."""
    locustfile = write_locustfile(tmp_path / "full_speed_locustfile.py", FULL_SPEED_LOCUSTFILE)
    command = locust_command(target, "--headless", "-u", "10", "-r", "10", "-t", f"{seconds}s", *args,
                             "--json-file", str(tmp_path / "stats"), locustfile=locustfile)
    return subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=environment(tag, ZMQ_SINK_ADDRESS=sink_address, LOCUST_RESOURCE_INTERVAL="0",
                                            **(settings or {})))


def finish(locust):
    """Wait for Locust to end; its stderr."""
    try:
        _, stderr = locust.communicate(timeout=90)
    finally:
        locust.kill()
        locust.wait()
    assert locust.returncode == 0, stderr
    return stderr


def assert_nothing_lost(sink_file, stderr, tmp_path, tag, processes):
    """The sink's file alone holds every request Locust counted, each record once and every line whole, and
    each process's last line says that a sink acknowledged all of its records."""
    assert not locust_processes(tag)
    records = read_records(sink_file)
    assert len({(r["worker"], r["seq"]) for r in records}) == len(records), "each (worker, seq) once"
    assert request_counts(records) == locust_counts(json.loads((tmp_path / "stats.json").read_text()))
    assert_complete(sink_file, processes=processes)
    acknowledged = re.findall(r"ZeroMQ sink \S+: all (\d+) records acknowledged, (\d+) sent again", stderr)
    assert len(acknowledged) == processes and "not (" not in stderr, stderr
    assert sum(int(made) for made, _ in acknowledged) == len(records)
    return sum(int(again) for _, again in acknowledged)


def wait_for_full_speed(sink):
    wait_for(lambda: len(re.findall(r"sink: \d+ records \(", sink.stderr())) >= 2, what="records at full speed")


def kill_frozen(sink):
    """Its host freezes for a second, then the sink dies: what sat in its buffers dies with it."""
    sink.proc.send_signal(signal.SIGSTOP)
    time.sleep(1)
    sink.proc.kill()
    sink.proc.wait()


def reset_connections(port):
    """Reset every TCP connection to the sink's two ports, both ends, as a network fault does."""
    reset = subprocess.run(["ss", "-K", "-t", f"( sport = :{port} or dport = :{port} or sport = :{port + 1} or "
                                              f"dport = :{port + 1} )"], capture_output=True, text=True, timeout=30)
    assert reset.returncode == 0, reset.stderr
    return reset.stdout.count("ESTAB")


def test_a_frozen_sink_whose_connections_are_reset_loses_nothing(tmp_path, tag, target, sinks, curve):
    sink = sinks(settings=curve[0])
    locust = full_speed_locust(tmp_path, tag, target, sink.address, *two_processes(), settings=curve[1])
    try:
        wait_for_full_speed(sink)
        sink.proc.send_signal(signal.SIGSTOP)  # its host freezes: frames pile up in ZeroMQ's and the kernel's buffers
        time.sleep(2)
        assert reset_connections(int(sink.address.rsplit(":", 1)[1])) >= 3  # a PUSH connection of each process at least
        sink.proc.send_signal(signal.SIGCONT)
    finally:
        stderr = finish(locust)
    sink.stop()
    assert_nothing_lost(sink.log_file, stderr, tmp_path, tag, processes=3)


def test_a_sink_killed_and_started_again_on_its_file_loses_nothing(tmp_path, tag, target, sinks):
    sink = sinks()
    locust = full_speed_locust(tmp_path, tag, target, sink.address, *two_processes())
    try:
        wait_for_full_speed(sink)
        kill_frozen(sink)
        time.sleep(2)
        restarted = sinks(address=sink.address)  # on the same file
    finally:
        stderr = finish(locust)
    restarted.stop()
    resent = assert_nothing_lost(sink.log_file, stderr, tmp_path, tag, processes=3)
    assert resent > 0, "what the killed sink had not acknowledged was sent again"


def next_port(address):
    """Where a sink at `address` publishes its acknowledgements, as the README says."""
    host, port = address.rsplit(":", 1)
    return f"{host}:{int(port) + 1}"


def acknowledgements(acks, frames, timeout=30):
    """(worker, first seq, count) of that many frames, read from the acknowledgements that a sink publishes:
    [worker, b"<first seq> <count> <first seq> <count> ..."]."""
    read, deadline = [], time.monotonic() + timeout
    while len(read) < frames:
        assert acks.poll(max(0.0, deadline - time.monotonic()) * 1000), f"{len(read)} of {frames} acknowledgements"
        read += frames_in(*acks.recv_multipart())
    return read


def frames_in(worker, numbers):
    """(worker, first seq, count) of each frame in one acknowledgement; none in the sink's empty answer to a new
    subscription."""
    numbers = list(map(int, numbers.split()))
    return [(worker, first, count) for first, count in zip(numbers[::2], numbers[1::2])]


def sent_until_acknowledged(push, acks, message, timeout=30):
    """Send a numbered message until its acknowledgement comes, as a load generator does: a sink drops the
    acknowledgements it publishes before a new subscription has reached it. Returns how many copies went."""
    first, worker = message[0].split(b" ")
    wanted, copies, deadline = (worker, int(first), message[1].count(b"\n") + 1), 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        push.send_multipart(message)
        copies += 1
        heard = time.monotonic() + 0.5
        while acks.poll(max(0.0, heard - time.monotonic()) * 1000):
            if wanted in frames_in(*acks.recv_multipart()):  # not waiting for one more: this copy may be lost
                return copies
    raise AssertionError(f"no acknowledgement of {wanted} in {timeout}s")


def numbered(worker, first, count):
    """A numbered message as the locustfile sends it, of records first, first + 1, ..."""
    return [b"%d %s" % (first, worker.encode()), b"\n".join(json.dumps(
        {"worker": worker, "seq": seq, "message": "x"}).encode() for seq in range(first, first + count))]


@contextmanager
def load_generator(sink):
    """A PUSH socket to the sink, and a SUB socket for its acknowledgements to the worker "w" (and "w2", as
    subscriptions match prefixes)."""
    with zmq.Context() as context, context.socket(zmq.PUSH) as push, context.socket(zmq.SUB) as acks:
        push.linger = 0  # what a stopped sink did not take is dropped with the socket
        acks.connect(next_port(sink.address))
        acks.subscribe(b"w")
        push.connect(sink.address)
        yield push, acks


def test_a_record_sent_again_is_written_once_also_by_a_sink_started_again(tmp_path, tag, sinks):
    sink = sinks()
    with load_generator(sink) as (push, acks):
        # Once this frame is acknowledged, the subscription has surely reached the sink; copies of it may be too.
        copies = sent_until_acknowledged(push, acks, numbered("w", 1, 3))
        for message in (numbered("w", 2, 2), numbered("w2", 1, 2), numbered("w", 4, 2)):
            push.send_multipart(message)
        # Every frame is acknowledged once written, one whose records the file holds too; "w"'s subscription
        # hears "w2"'s as well (subscriptions match prefixes).
        heard = acknowledgements(acks, 3)
        while not {(b"w", 2, 2), (b"w2", 1, 2), (b"w", 4, 2)} <= set(heard):
            heard += acknowledgements(acks, 1)
        assert sorted(ack for ack in heard if ack != (b"w", 1, 3)) == [(b"w", 2, 2), (b"w", 4, 2), (b"w2", 1, 2)]
        push.send_multipart([b"7 w", numbered("w", 6, 1)[1]])  # numbered unlike its records: rejected
        push.send_multipart([b"8 w", numbered("w", 8, 1)[1], b"{}"])  # three frames: plain, and one is not JSON
        wait_for(lambda: len(complete_lines(sink.log_file)) == 9, what="the records")
        summary = sink.stop()
        assert "9 records written" in summary and "2 frames rejected (1 not JSON, 1 numbered unlike its records)" \
            in summary
        assert f"{2 + 3 * (copies - 1)} records sent again and already in the file" in summary, summary
        # A sink killed in a write leaves the start of a line: the next one cuts it, and knows the rest from the
        # index the first wrote as it stopped.
        index = Path(f"{sink.log_file}.index")
        stale_index = index.read_bytes()
        with open(sink.log_file, "ab") as log_file:
            log_file.write(numbered("w", 6, 1)[1][:20])
        restarted = sinks(address=sink.address)
        assert re.search(r"\(holding records of 2 processes: 0 MB read in [\d.]+s, the rest known from its index\) "
                         r"\(cut its incomplete last line, 20 bytes, never acknowledged\)", restarted.stderr()), \
            restarted.stderr()
        # Both connections come back to the new sink; 4 and 5 are in the file, 6 and 7 are not.
        copies = sent_until_acknowledged(push, acks, numbered("w", 4, 4))
        summary = restarted.stop()
    # Copies after the one acknowledged may have come too late to count.
    assert "2 records written" in summary and re.search(r"(\d+) records sent again and already in the file",
                                                         summary)[1] in {str(2 + 4 * n) for n in range(copies)}, summary
    ids = [(r.get("worker"), r.get("seq")) for r in read_records(sink.log_file)]
    assert ids == [("w", 1), ("w", 2), ("w", 3), ("w2", 1), ("w2", 2), ("w", 4), ("w", 5), ("w", 8), (None, None),
                   ("w", 6), ("w", 7)]
    # An index older than the file (a sink killed between two): what it does not cover is read from the file. One
    # for another file (its last covered bytes differ) is not used.
    for used, index_bytes in ((True, stale_index), (False, stale_index.replace(b'"tail": "', b'"tail": "00'))):
        index.write_bytes(index_bytes)
        started_again = sinks(address=sink.address, name=f"again{used}", log_file=sink.log_file)
        said = re.search(r"\(holding records of 2 processes: 0 MB read in [\d.]+s(, the rest known from its index)?\)",
                         started_again.stderr())
        assert said and bool(said.group(1)) == used, started_again.stderr()
        with load_generator(started_again) as (push, acks):
            copies = sent_until_acknowledged(push, acks, numbered("w", 6, 2))
            summary = started_again.stop()
        assert "0 records written" in summary and re.search(r"(\d+) records sent again and already in the file",
                                                            summary)[1] in {str(2 * n) for n in range(1, copies + 1)}
    assert [(r.get("worker"), r.get("seq")) for r in read_records(sink.log_file)] == ids


def test_a_sink_acknowledges_only_what_its_file_holds(tmp_path, tag, sinks):
    sink = sinks(file_size_limit=3000)  # about 6 of the 10 frames below
    with load_generator(sink) as (push, acks):
        sent_until_acknowledged(push, acks, numbered("w", 1, 10))
        for first in range(11, 100, 10):
            push.send_multipart(numbered("w", first, 10))
        wait_for(lambda: "sink: cannot write to" in sink.stderr(), what="the sink to stall")
        in_file = [json.loads(line)["seq"] for line in sink.log_file.read_bytes().split(b"\n")[:-1]]
        # What the file holds when the sink stalls is acknowledged, each frame whole; then nothing more, until the file
        # takes the rest.
        written = [(b"w", first, 10) for first in range(11, in_file[-1] - 8, 10)]
        acknowledged = [ack for ack in acknowledgements(acks, len(written)) if ack != (b"w", 1, 10)]
        while len(acknowledged) < len(written):
            acknowledged += [ack for ack in acknowledgements(acks, 1) if ack != (b"w", 1, 10)]
        assert 0 < len(written) < 9 and acknowledged == written, "only frames whose every record is in the file"
        assert not acks.poll(500), "nothing more while the file refuses writes"
        resource.prlimit(sink.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        acknowledged += acknowledgements(acks, 9 - len(acknowledged))
    sink.stop()
    assert sorted(acknowledged) == [(b"w", first, 10) for first in range(11, 100, 10)]
    assert [r["seq"] for r in read_records(sink.log_file)] == list(range(1, 101))


def test_a_long_drain_is_acknowledged_as_it_goes(tmp_path, tag, sinks, without_accelerators):
    # A sender far faster than the sink (the json module only) keeps a queue of 3000 frames full, seconds of the
    # sink's work, so that the sink's drains never run dry: each ends at its deadline, and in between the
    # acknowledgements must still come.
    sink = sinks(settings=without_accelerators)
    sent, stop = [0], threading.Event()

    def send_until_stopped(push, first=1001):
        while not stop.is_set():
            push.send_multipart([b"%d w" % first, b"\n".join(b'{"worker":"w","seq":%d,"message":"x"}' % seq
                                                              for seq in range(first, first + 1000))])
            sent[0], first = sent[0] + 1, first + 1000

    with load_generator(sink) as (push, acks):
        sent_until_acknowledged(push, acks, numbered("w", 1, 1000))
        push.sndhwm, push.sndtimeo = 3000, 30_000  # a sink that died ends the sender too
        sending = threading.Thread(target=send_until_stopped, args=(push,))
        sending.start()
        try:
            wait_for(lambda: sent[0] >= push.sndhwm, what="a full queue of frames")
            acknowledged = 0
            while acks.poll(0):
                acknowledged += sum(first != 1 for _, first, _ in acknowledgements(acks, 1))
            arrivals, deadline = [], time.monotonic() + 60
            while not arrivals or arrivals[-1][0] - arrivals[0][0] < 3:  # (when, frames acknowledged, backlog)
                assert time.monotonic() < deadline, "3 s of acknowledgements"
                acknowledged += sum(first != 1 for _, first, _ in acknowledgements(acks, 1))
                arrivals.append((time.monotonic(), acknowledged, sent[0] - acknowledged))
        finally:
            stop.set()
            sending.join()
    sink.stop()
    (started, first, _), (ended, last, _) = arrivals[0], arrivals[-1]
    # At each acknowledgement more frames were waiting than the sink takes in a drain (at most 0.5 s): none ran dry.
    assert min(backlog for _, _, backlog in arrivals) > 0.5 * (last - first) / (ended - started), arrivals
    gaps = [later - earlier for (earlier, _, _), (later, _, _) in zip(arrivals, arrivals[1:])]
    assert max(gaps) < 0.25, f"{max(gaps):.2f}s without an acknowledgement"


def test_a_sink_down_for_the_first_seconds_gets_every_record_of_master_and_workers(tmp_path, tag, target, sinks):
    address = f"tcp://127.0.0.1:{free_port()}"
    port = str(free_port())
    locustfile = write_locustfile(tmp_path / "full_speed_locustfile.py", FULL_SPEED_LOCUSTFILE)
    workers = start_workers(tmp_path, tag, target, port, address, settings={"LOCUST_RESOURCE_INTERVAL": "0"},
                            locustfile=locustfile, stderr=subprocess.PIPE)
    master = full_speed_locust(tmp_path, tag, target, address, "--master", "--expect-workers", "2",
                               "--master-bind-host", "127.0.0.1", "--master-bind-port", port)
    try:
        time.sleep(3)
        sink = sinks(address=address)
        stderr = finish(master)
        stderr += "".join(worker.communicate(timeout=30)[1] for worker in workers)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    sink.stop()
    assert_nothing_lost(sink.log_file, stderr, tmp_path, tag, processes=3)


def test_two_sinks_one_killed_and_never_restarted_lose_nothing_together(tmp_path, tag, target, sinks):
    first, second = sinks(name="first"), sinks(name="second")
    locust = full_speed_locust(tmp_path, tag, target, f"{first.address},{second.address}", *two_processes())
    try:
        wait_for_full_speed(first)
        kill_frozen(first)
    finally:
        stderr = finish(locust)
    second.stop()
    assert not locust_processes(tag)
    merged = report_json(first.log_file, second.log_file)
    assert report_counts_of(merged["runs"][0]) == locust_counts(json.loads((tmp_path / "stats.json").read_text()))
    assert_complete(first.log_file, second.log_file, processes=3)
    assert len(re.findall(r"all \d+ records acknowledged", stderr)) == 3, stderr


def test_a_worker_killed_mid_run_is_named_as_not_ended(tmp_path, tag, target, sinks):
    sink = sinks()
    port = str(free_port())
    workers = start_workers(tmp_path, tag, target, port, sink.address)
    command = locust_command(target, "--headless", "-u", "4", "-r", "4", "-t", "6s", "--master", "--expect-workers",
                             "2", "--master-bind-host", "127.0.0.1", "--master-bind-port", port)
    master = subprocess.Popen(command, cwd=tmp_path, env=environment(tag, ZMQ_SINK_ADDRESS=sink.address),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: {"loadgen-1", "loadgen-2"} <= {r["hostname"] for r in requests_of(
            map(json.loads, complete_lines(sink.log_file)))}, what="requests from both workers")
        workers[0].kill()
        _, stderr = master.communicate(timeout=90)
        assert workers[1].wait(timeout=30) == 0
    finally:
        for process in (master, *workers):
            process.kill()
            process.wait()
    assert not locust_processes(tag)
    sink.stop()
    verdict = report_json(sink.log_file, "--require-complete", expect_code=1)
    processes = {p["hostname"]: p for p in verdict["processes"]}
    assert sorted(processes) == ["loadgen-1", "loadgen-2", socket.gethostname()]  # the master logs its end
    killed, survivor = processes["loadgen-1"], processes["loadgen-2"]
    assert (killed["ended"], killed["missing"], survivor["ended"], survivor["missing"]) == (False, 0, True, 0)
    assert killed["records"] > 0 and not verdict["complete"]
    output = report(sink.log_file)[1]
    assert "INCOMPLETE: 1 of 3 processes did not end cleanly, so what they made last is unknown." in output
    assert re.search(rf"^{killed['worker']} +loadgen-1 +\d+ +0  no: did not end cleanly", output, re.MULTILINE)
    assert re.search(rf"^{survivor['worker']} +loadgen-2 +\d+ +0  yes \(worker\)$", output, re.MULTILINE)


def test_two_sinks_each_get_part_and_the_report_merges_them(tmp_path, tag, target, sinks):
    first, second = sinks(name="first"), sinks(name="second")
    code, stderr, stats = run_locust(tmp_path, tag, target, *two_processes(), settings={
        "ZMQ_SINK_ADDRESS": f"{first.address}, {second.address}"})
    assert code == 0, stderr
    first.stop()
    second.stop()
    parts = [read_records(sink.log_file) for sink in (first, second)]
    assert all(len(requests_of(part)) > 10 for part in parts), "each sink got a part"
    assert not {(r["worker"], r["seq"]) for r in parts[0]} & {(r["worker"], r["seq"]) for r in parts[1]}
    merged = assert_complete(first.log_file, second.log_file, processes=3)
    assert merged["lines"]["duplicate"] == 0
    assert report_counts_of(merged["runs"][0]) == locust_counts(stats)


def test_the_two_commands_work_as_a_pair_with_no_settings(tmp_path, tag, target):
    # Nothing listens at the default address yet: the run says so, and how to start a sink or stop pushing.
    code, stderr, _ = run_locust(tmp_path, tag, target, name="alone", settings={
        "ZMQ_SINK_ADDRESS": None, "ZMQ_SINK_FLUSH_TIMEOUT": "0.2"})
    assert code == 0, stderr
    assert re.search(r"0 records acknowledged, 0 sent again; (\d+) not \(0 dropped: a full queue of 100000, or over "
                     r"1 MiB; \1 unacknowledged after 0.2s\): no sink was reached at tcp://127.0.0.1:5555, the "
                     r"default address; start one there with `python sink.py`, or set ZMQ_SINK_ADDRESS= \(empty\) to "
                     r"turn pushing off", stderr), stderr
    with open(tmp_path / "sink.err", "w") as sink_stderr:
        sink = subprocess.Popen([sys.executable, str(REPO / "sink.py")], cwd=tmp_path, stderr=sink_stderr,
                                env=environment(tag))
    try:
        wait_for(lambda: "listening on tcp://127.0.0.1:5555 (acknowledgements on tcp://127.0.0.1:5556)" in
                 (tmp_path / "sink.err").read_text(), what="the sink")
        # On the loopback interface only: nobody on the network can write to it or read its acknowledgements.
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(sink.pid).net_connections("inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", 5555), ("127.0.0.1", 5556)}
        code, stderr, stats = run_locust(tmp_path, tag, target, settings={"ZMQ_SINK_ADDRESS": None})
        assert code == 0, stderr
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(timeout=30) == 0
    finally:
        sink.kill()
        sink.wait()
    assert_same_counts(read_records(tmp_path / "requests.jsonl"), stats)
    assert_complete(tmp_path / "requests.jsonl", processes=1)
    assert re.search(r"all \d+ records acknowledged, 0 sent again", stderr), stderr


# --- across untrusted networks: CURVE ---------------------------------------------------------

class Relay:
    """A TCP relay to the sink's two ports that keeps every byte it passes on, both ways: what the network
    would see. vanish() makes it a host that vanished: its connections pass nothing more and stay open. What
    the sink's acknowledgement port sends arrives ack_delay seconds late; what it is sent (subscriptions,
    heartbeats), subscription_delay seconds late."""

    def __init__(self, to_address):
        to_port = int(to_address.rsplit(":", 1)[1])
        port = free_port()
        self.address = f"tcp://127.0.0.1:{port}"
        self.seen = bytearray()
        self.vanished = set()  # connections that pass nothing more
        self.connections, self.closed, self.ack_delay, self.subscription_delay = [], False, 0.0, 0.0
        self.listeners = [socket.create_server(("127.0.0.1", port + i)) for i in (0, 1)]
        for i, listener in enumerate(self.listeners):
            threading.Thread(target=self._accept, args=(listener, ("127.0.0.1", to_port + i), i == 1),
                             daemon=True).start()

    def _accept(self, listener, to, acknowledgements):
        while True:
            try:
                client = listener.accept()[0]
            except OSError:
                return  # closed
            sink = socket.create_connection(to)
            self.connections.append(client)
            for source, destination, delay in ((client, sink, "subscription_delay"), (sink, client, "ack_delay")):
                delay = delay if acknowledgements else None
                threading.Thread(target=self._pump, args=(source, destination, client, delay), daemon=True).start()

    def _pump(self, source, destination, connection, delay):
        held = []  # (when due, bytes) that a thread of its own passes on, the attribute `delay` names late
        if delay:
            threading.Thread(target=self._pass_late, args=(held, destination), daemon=True).start()
        with source, destination:
            try:
                while data := source.recv(65536):
                    while connection in self.vanished and not self.closed:
                        time.sleep(0.1)  # neither passed on nor answered: as if the host had gone
                    self.seen += data
                    if delay:
                        held.append((time.monotonic() + getattr(self, delay), data))
                    else:
                        destination.sendall(data)
            except OSError:
                pass  # the other side went away

    def _pass_late(self, held, destination):
        while not self.closed:
            if held and held[0][0] <= time.monotonic():
                try:
                    destination.sendall(held.pop(0)[1])
                except OSError:
                    return
            else:
                time.sleep(0.01)

    def vanish(self):
        self.vanished.update(self.connections)

    def close(self):
        self.closed = True
        for listener in self.listeners + self.connections:
            listener.close()


def test_a_sink_host_that_vanished_is_noticed_in_seconds_and_nothing_is_lost(tmp_path, tag, target, sinks):
    sink = sinks()
    relay = Relay(sink.address)
    try:
        # What the vanished connections held is sent again once the heartbeats have found them dead: the process
        # may wait for its acknowledgements as long as a slow machine needs.
        locust = full_speed_locust(tmp_path, tag, target, relay.address, seconds=10,
                                   settings={"ZMQ_SINK_FLUSH_TIMEOUT": "30"})
        wait_for_full_speed(sink)
        relay.vanish()  # its connections fall silent, not closed: no FIN, no RST, no answer to anything
        stderr = finish(locust)
    finally:
        relay.close()
    sink.stop()
    # The heartbeats found the connections dead within seconds; the new ones carried the records again.
    assert assert_nothing_lost(sink.log_file, stderr, tmp_path, tag, processes=1) > 0


def test_what_the_sink_acknowledged_before_a_new_subscription_reached_it_is_sent_again_at_once(tag, sinks):
    # One load generator, its window of 8 frames full. Its sink host vanishes; the heartbeats find it dead in 3 s.
    # Then what the new acknowledgement connection sends the sink (its subscription) arrives half a second late,
    # so that what the sink acknowledges meanwhile goes to no one: as on any network, only more often.
    sink = sinks()
    relay = Relay(sink.address)
    try:
        simulated = simulated_load_generators(tag, relay.address, count=1, rate=2000, seconds=10, processes=1)
        wait_for(lambda: len(complete_lines(sink.log_file)) >= 1000, what="the first records")
        relay.subscription_delay = 0.5
        relay.vanish()
        result = finish_simulated(simulated)
    finally:
        relay.close()
    written, _ = sink_summary(sink.stop())
    # All acknowledged by the end, within the usual 2 s: the sink's answer to the subscription has the generator send
    # again what it had in flight, where the timeout would have found one frame a second at best.
    assert result["acked"] == result["made"] == written > 1000
    # Each time from a frame's first send since the connections were lost: not one spans the 3 s they were gone,
    # which would teach the timeout to wait seconds for what comes in milliseconds.
    assert max(result["ack_times"]) < 3.0, sorted(result["ack_times"])[-5:]


def test_acknowledgements_seconds_late_are_waited_for_not_answered_with_copies(tag, sinks):
    # One load generator at a low rate: a frame every 1.5 s, each of one record sent after it waited 1 s for
    # others. Once it is connected, a relay delays each acknowledgement by 2 s, as a sink that is behind and comes
    # to this generator's frames seconds apart would. Each frame then waits past the first timeout of 1 s, and past
    # the last acknowledgement by more than a second: the timeout must learn the time acknowledgements take.
    sink = sinks()
    relay = Relay(sink.address)
    try:
        simulated = simulated_load_generators(tag, relay.address, count=1, rate=2 / 3, seconds=24, processes=1,
                                              settings={"ZMQ_SINK_FLUSH_TIMEOUT": "10"})
        wait_for(lambda: len(complete_lines(sink.log_file)) >= 2, what="the first records")
        relay.ack_delay = 2.0
        result = finish_simulated(simulated)
    finally:
        relay.close()
    written, again = sink_summary(sink.stop())
    assert result["acked"] == result["made"] == written >= 15
    assert again <= 2, f"{again} of {written} records received again"  # one frame or two, while it learns


def test_with_curve_nothing_readable_crosses_the_network(tmp_path, tag, target, sinks, curve):
    sink = sinks(settings=curve[0])
    relay = Relay(sink.address)
    try:
        code, stderr, stats = run_locust(tmp_path, tag, target, settings={
            "ZMQ_SINK_ADDRESS": relay.address, "LOCUST_RESOURCE_INTERVAL": "0.5", **curve[1]})
        assert code == 0, stderr
        sink.stop()
    finally:
        relay.close()
    records = read_records(sink.log_file)
    assert_same_counts(records, stats)
    texts = [b"/does-not-exist", b'"request_type"', b"Task started", b"cpu_percent", b'"seq"',
             the_run_id(records).encode(), records[0]["worker"].encode()]
    assert len(relay.seen) > sum(len(line) for line in sink.log_file.read_bytes().splitlines())
    assert [text for text in texts if text in relay.seen] == ([] if curve[0] else texts)


def test_each_side_says_exactly_why_nothing_was_acknowledged(tmp_path, tag, target, sinks, keys):
    curve_sink = sinks(name="curve", settings={"ZMQ_SINK_CURVE_SECRET": str(keys / "sink.key_secret"),
                                               "ZMQ_SINK_CURVE_CLIENTS": str(keys / "clients")})
    plain_sink = sinks(name="plain")
    public = {"ZMQ_SINK_CURVE_PUBLIC": str(keys / "sink.key")}
    with_keys = {**public, "LOCUST_CURVE_SECRET": str(keys / "loadgen.key_secret")}
    # A correct setup gets no line of refusal (a check of the address at import once connected without keys).
    code, stderr, stats = run_locust(tmp_path, tag, target, name="correct",
                                     settings={"ZMQ_SINK_ADDRESS": curve_sink.address, **with_keys})
    assert code == 0 and re.search(r"all \d+ records acknowledged", stderr), stderr
    wait_for(lambda: re.search(r"sink: \d+ records", curve_sink.stderr()), what="a progress line")
    assert "refused" not in curve_sink.stderr()
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    # Without keys on one side, both sides see a mismatch of mechanisms, and whichever sees it first closes: the
    # other then knows only that the connection closed during the handshake. So two lines can be right there.
    runs = {  # name: (address, settings, what the load generator may say last)
        "keyless": (curve_sink.address, {}, {
            "the sink requires CURVE and this process has no keys: set ZMQ_SINK_CURVE_PUBLIC and LOCUST_CURVE_SECRET",
            "the sink closed every handshake: it requires CURVE keys (ZMQ_SINK_CURVE_PUBLIC, LOCUST_CURVE_SECRET), or "
            "it is no sink"}),
        "stranger": (curve_sink.address, {**public, "LOCUST_CURVE_SECRET": str(keys.parent / "stranger.key_secret")},
                     {"the sink refused this process's CURVE key: copy the public .key that goes with "
                      "LOCUST_CURVE_SECRET into the sink's --curve-clients folder"}),
        "keys-to-a-plain-sink": (plain_sink.address, with_keys, {
            "the sink runs without CURVE and this process with it: give the sink --curve-secret and "
            "--curve-clients, or unset ZMQ_SINK_CURVE_PUBLIC and LOCUST_CURVE_SECRET",
            "the sink closed every CURVE handshake: it runs without CURVE, or ZMQ_SINK_CURVE_PUBLIC is not its public "
            "key"}),
        "nowhere": (nowhere, {}, {"nothing accepted a connection there: no sink is listening, or a firewall is in "
                                  "the way"}),
    }
    started = {name: start_locust(tmp_path, tag, target, name=name, settings={
        "ZMQ_SINK_ADDRESS": address, "ZMQ_SINK_FLUSH_TIMEOUT": "0.5", **settings})
        for name, (address, settings, _) in runs.items()}
    for name, (address, _, whys) in runs.items():
        code, stderr, _ = finish_locust(started[name])
        assert code == 0, stderr
        last = re.findall(r"^\[[\d :,-]+\] \S+/WARNING/locust\.request_log: ZeroMQ sink (\S+): 0 records "
                          r"acknowledged, 0 sent again; (\d+) not \(0 dropped: a full queue of 100000, or over 1 MiB; "
                          r"(\d+) unacknowledged after 0\.5s\): (.*); they are lost: in no file \(LOCUST_LOG_FILE is "
                          r"unset\)$", stderr, re.MULTILINE)
        assert len(last) == 1 and last[0][:2] == (address, last[0][2]) and last[0][3] in whys, (name, stderr)
    curve_said, plain_said = curve_sink.stop(), plain_sink.stop()
    assert_same_counts(read_records(curve_sink.log_file), stats)
    assert not plain_sink.log_file.read_bytes()
    # Each kind of refusal is named once in these seconds, though refused ten times a second: a line at most every
    # 10 s. Without keys, the client may see the mismatch first and close: the sink then knows only that.
    curve_lines = Counter(re.findall(r"^sink: refused .*", curve_said, re.MULTILINE))
    plain_lines = Counter(re.findall(r"^sink: refused .*", plain_said, re.MULTILINE))
    keyless = {"sink: refused a client without CURVE keys (its address is not known)",
               "sink: refused a client that closed its connection during the handshake, as one without CURVE keys "
               "does (its address is not known)"}
    assert set(curve_lines.values()) == {1} and curve_lines.keys() & keyless, curve_said
    assert curve_lines.keys() - keyless == {"sink: refused 127.0.0.1: its CURVE key is not in --curve-clients"}
    assert set(plain_lines.values()) == {1} and set(plain_lines) <= {
        "sink: refused a client with CURVE keys: this sink runs without CURVE (its address is not known)",
        "sink: refused a client that closed its connection during the handshake, as one with CURVE keys does (its "
        "address is not known)"} and plain_lines, plain_said
    # A refused connection is closed, as expected: the summary counts it once, as refused.
    for said in (curve_said, plain_said):
        assert re.search(r"; but \d+ connections refused \(the lines above say why\)$", said), said
    assert re.search(r"from 1 process, which ended;", curve_said), curve_said


def test_a_process_whose_records_reach_no_sink_says_so_in_seconds_and_again_when_a_sink_acknowledges(tmp_path, tag,
                                                                                                      target, sinks):
    # A one-hour test whose records go nowhere is said in ZMQ_SINK_WARN_AFTER seconds, by each process once, not at
    # its end: where the records are kept meanwhile, and then that a sink started late acknowledges them.
    addresses = {name: f"tcp://127.0.0.1:{free_port()}" for name in ("kept", "unkept")}
    # name: (options, settings, the processes that make requests and so sound the alarm; a master makes none)
    runs = {"kept": (two_processes(), {"LOCUST_LOG_FILE": str(tmp_path / "local.jsonl")}, 2), "unkept": ([], {}, 1)}
    started = {}
    for name, (options, settings, _) in runs.items():
        with open(tmp_path / f"{name}-locust.err", "w") as stderr:
            started[name] = subprocess.Popen(
                locust_command(target, "--headless", "-u", "4", "-r", "4", "-t", "20s", *options,
                               *stats_options(tmp_path / f"{name}-stats"), locustfile=LOCUSTFILE),
                cwd=tmp_path, env=environment(tag, ZMQ_SINK_ADDRESS=addresses[name], ZMQ_SINK_FLUSH_TIMEOUT="10",
                                              **settings), stdout=subprocess.PIPE, stderr=stderr, text=True)
    alarm = (r"^\[([\d :,-]+)\] \S+/WARNING/locust\.request_log: ZeroMQ sink {}: no acknowledgement for 5\.\ds, \d+ "
             r"records waiting: nothing accepted a connection there: no sink is listening, or a firewall is in the way; "
             r"they are (.*)$")

    def said(name):
        return (tmp_path / f"{name}-locust.err").read_text()

    def alarms(name):
        return re.findall(alarm.format(addresses[name]), said(name), re.MULTILINE)

    try:
        wait_for(lambda: all(len(alarms(name)) >= alarmed for name, (*_, alarmed) in runs.items()),
                 what="an alarm of each process")
        collected = {name: sinks(name=name, address=address) for name, address in addresses.items()}
        for name, locust in started.items():
            stdout, _ = locust.communicate(timeout=90)
            assert locust.returncode == 0, said(name)
            stats = final_stats(tmp_path / f"{name}-stats.json", stdout)
            records = read_records(collected[name].log_file)
            assert_same_counts(records, stats)
            # Each process once: the alarm 5 s after its first record, what keeps its records, then the recovery.
            firsts = {}
            for record in records:
                firsts.setdefault(record["worker"], record["time"])
            kept = {f"also in the local file {tmp_path / f'local.{worker}.jsonl'}" for worker in firsts} if \
                name == "kept" else {"in no file (LOCUST_LOG_FILE is unset): lost if this process quits before a "
                                     "sink acknowledges them"}
            assert len(alarms(name)) == runs[name][2] and {where for _, where in alarms(name)} <= kept, said(name)
            for when, where in alarms(name):
                worker = next(iter(firsts)) if name == "unkept" else where.rpartition("local.")[2][:-len(".jsonl")]
                first = datetime.strptime(firsts[worker], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
                alarmed = datetime.strptime(when, "%Y-%m-%d %H:%M:%S,%f").astimezone(timezone.utc)
                assert 4.9 <= (alarmed - first).total_seconds() < 7, (first, alarmed)
            recovered = re.findall(rf"/INFO/locust\.request_log: ZeroMQ sink {addresses[name]}: records acknowledged "
                                   rf"now, after [\d.]+s without$", said(name), re.MULTILINE)
            assert len(recovered) == len(alarms(name)), said(name)
            assert len(re.findall(r"all \d+ records acknowledged", said(name))) == len(firsts), said(name)
    finally:
        for locust in started.values():
            if locust.poll() is None:  # a failed wait: its forked workers too, or the tag fixture finds them
                for child in psutil.Process(locust.pid).children(recursive=True):
                    child.kill()
                locust.kill()
            locust.wait()


def test_the_sink_names_a_refusal_at_once_and_then_at_most_every_interval_with_how_many_came_meanwhile(capfd):
    sys.path.insert(0, str(REPO))
    import sink

    refusals = sink.Refusals(every=0.3)
    for what in ("a client without CURVE keys", "a client without CURVE keys", "10.0.0.7: its CURVE key is not in "
                 "--curve-clients", "a client without CURVE keys"):
        refusals.add(what)
    time.sleep(0.35)
    refusals.add("a client without CURVE keys")
    refusals.add("a client without CURVE keys")
    assert refusals.count == 6
    assert re.fullmatch(r"sink: refused a client without CURVE keys\n"
                        r"sink: refused 10\.0\.0\.7: its CURVE key is not in --curve-clients\n"
                        r"sink: refused a client without CURVE keys; 2 more like it in the last 0\.[34]s\n",
                        capfd.readouterr().err)


def test_the_sinks_lines_from_two_threads_are_each_written_whole():
    # The ZAP thread names refusals while the main loop says the rest: print's separate write of the line break
    # ran one line into the next (CI: "...not in --curve-clientssink: refused a client that closed...").
    two_threads = ("import sys, threading; sys.path.insert(0, sys.argv[1]); import sink\n"
                   "say = lambda who: [sink.say(f'{who} {n}') for n in range(20_000)]\n"
                   "threads = [threading.Thread(target=say, args=(who,)) for who in 'ab']\n"
                   "[thread.start() for thread in threads]; [thread.join() for thread in threads]")
    said = subprocess.run([sys.executable, "-c", two_threads, str(REPO)], capture_output=True, text=True,
                          timeout=60).stderr
    lines = said.splitlines()
    assert len(lines) == 40_000 and all(re.fullmatch(r"sink: [ab] \d+", line) for line in lines), said[:300]


def test_bad_settings_and_unusable_keys_stop_either_side_at_start_with_one_line(tmp_path, tag, target, keys):
    not_a_key = tmp_path / "not_a.key"
    not_a_key.write_text("hello\n")
    (tmp_path / "empty").mkdir()
    secret, clients = str(keys / "sink.key_secret"), str(keys / "clients")
    busy = socket.create_server(("127.0.0.1", 0))
    busy_address = f"tcp://127.0.0.1:{busy.getsockname()[1]}"
    started = []
    for flags, expected in [
        (["--bind", busy_address], f"sink: --bind {busy_address} (ZMQ_SINK_BIND): Address already in use"),
        (["--bind", f"tcp://127.0.0.1:{busy.getsockname()[1] - 1}"], "sink: --bind tcp://127.0.0.1:"),  # acks' port
        (["--bind", "garbage"], "sink: --bind garbage (ZMQ_SINK_BIND): not tcp://HOST:PORT, and acknowledgements go "
                                "to the next port; expected tcp://HOST:PORT with PORT and PORT + 1 free"),
        (["--log-file", str(tmp_path / "missing" / "x.jsonl")],
         f"sink: --log-file {tmp_path / 'missing' / 'x.jsonl'} (ZMQ_SINK_LOG_FILE): No such file or directory; "
         "expected a file it can append to, in a folder that exists"),
        (["--curve-secret", secret], "sink: --curve-secret (ZMQ_SINK_CURVE_SECRET) and --curve-clients "
                                     "(ZMQ_SINK_CURVE_CLIENTS) go together: set both, or neither"),
        (["--curve-secret", str(tmp_path / "missing"), "--curve-clients", clients],
         f"sink: --curve-secret {tmp_path / 'missing'}: no such file or folder; expected the sink's .key_secret file"),
        (["--curve-secret", str(not_a_key), "--curve-clients", clients],
         f"sink: --curve-secret {not_a_key}: No public key found in {not_a_key}; expected the sink's .key_secret"),
        (["--curve-secret", str(keys / "sink.key"), "--curve-clients", clients],
         f"sink: --curve-secret {keys / 'sink.key'}: holds no secret key"),
        (["--curve-secret", secret, "--curve-clients", str(tmp_path / "empty")],
         f"sink: --curve-clients {tmp_path / 'empty'}: holds no .key file, so no load generator could connect"),
        (["--curve-secret", secret, "--curve-clients", str(tmp_path / "missing")],
         f"sink: --curve-clients {tmp_path / 'missing'}: no such file or folder; expected a folder"),
        (["--make-keys", str(keys)],
         f"sink: --make-keys {keys}: {keys / 'sink.key'} exists; keys are never overwritten"),
    ]:
        started.append((flags, expected, subprocess.Popen(
            [sys.executable, str(REPO / "sink.py"), "--bind", f"tcp://127.0.0.1:{free_port()}", "--log-file",
             str(tmp_path / "never.jsonl"), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for flags, expected, sink in started:  # all at once: each stops at its start
        stderr = sink.communicate(timeout=60)[1]
        assert sink.returncode == 1 and stderr.startswith(expected), (flags, stderr)
        assert stderr.count("\n") == 1, stderr
    busy.close()
    assert not (tmp_path / "never.jsonl").exists()
    assert {path.name: path.stat().st_mode & 0o777 for path in keys.glob("*.key_secret")} == {
        "sink.key_secret": 0o600, "loadgen.key_secret": 0o600}

    sink_public, secret = str(keys / "sink.key"), str(keys / "loadgen.key_secret")
    started = []
    for settings, expected in [
        ({"ZMQ_SINK_ADDRESS": "garbage"}, "request_log: ZMQ_SINK_ADDRESS='garbage': 'garbage' is not tcp://HOST:PORT, "
                                          "and acknowledgements come from the next port; expected addresses such as "
                                          "tcp://10.0.0.5:5555, comma-separated; empty: no pushing"),
        ({"ZMQ_SINK_ADDRESS": "tcp://127.0.0.1:9, tcp://no-port"},
         "request_log: ZMQ_SINK_ADDRESS='tcp://127.0.0.1:9, tcp://no-port': 'tcp://no-port' is not tcp://HOST:PORT"),
        ({"ZMQ_SINK_ADDRESS": "tcp://*:5555"},  # the sink's --bind for every interface, copied
         "request_log: ZMQ_SINK_ADDRESS='tcp://*:5555': '*' in 'tcp://*:5555' is no host this machine can resolve ("),
        ({"ZMQ_SINK_ADDRESS": "tcp://sink.invalid:5555"},
         "request_log: ZMQ_SINK_ADDRESS='tcp://sink.invalid:5555': 'sink.invalid' in 'tcp://sink.invalid:5555' is no "
         "host this machine can resolve ("),
        ({"ZMQ_SINK_ADDRESS": "tcp://127.0.0.1:5x"},
         "request_log: ZMQ_SINK_ADDRESS='tcp://127.0.0.1:5x': 'tcp://127.0.0.1:5x' is not tcp://HOST:PORT"),
        ({"ZMQ_SINK_QUEUE": "abc"}, "request_log: ZMQ_SINK_QUEUE='abc': expected a whole number of records, 1 or more"),
        ({"ZMQ_SINK_QUEUE": "0"}, "request_log: ZMQ_SINK_QUEUE='0': expected a whole number of records, 1 or more"),
        ({"ZMQ_SINK_FLUSH_TIMEOUT": "soon"}, "request_log: ZMQ_SINK_FLUSH_TIMEOUT='soon': expected seconds, 0 or more"),
        ({"ZMQ_SINK_FLUSH_TIMEOUT": "-1"}, "request_log: ZMQ_SINK_FLUSH_TIMEOUT='-1': expected seconds, 0 or more"),
        ({"ZMQ_SINK_WARN_AFTER": "x"}, "request_log: ZMQ_SINK_WARN_AFTER='x': expected seconds, 0 or more (0: never)"),
        ({"LOCUST_RESOURCE_INTERVAL": "-1"},
         "request_log: LOCUST_RESOURCE_INTERVAL='-1': expected seconds between samples, 0 or more (0: none)"),
        ({"LOCUST_RESOURCE_INTERVAL": "inf"},
         "request_log: LOCUST_RESOURCE_INTERVAL='inf': expected seconds between samples, 0 or more (0: none)"),
        ({"LOCUST_LOG_FILE": str(tmp_path / "missing" / "x.jsonl")},
         f"request_log: LOCUST_LOG_FILE='{tmp_path / 'missing' / 'x.jsonl'}': there is no folder "
         f"{tmp_path / 'missing'}"),
        ({"LOCUST_LOG_FILE": str(tmp_path)}, f"request_log: LOCUST_LOG_FILE='{tmp_path}': that is a folder"),
        ({"LOCUST_CURVE_SECRET": secret}, "request_log: ZMQ_SINK_CURVE_PUBLIC and LOCUST_CURVE_SECRET go together"),
        ({"ZMQ_SINK_CURVE_PUBLIC": str(tmp_path / "missing"), "LOCUST_CURVE_SECRET": secret},
         f"request_log: ZMQ_SINK_CURVE_PUBLIC='{tmp_path / 'missing'}': no such file; expected the sink's "
         "public .key file"),
        ({"ZMQ_SINK_CURVE_PUBLIC": sink_public, "LOCUST_CURVE_SECRET": str(not_a_key)},
         f"request_log: LOCUST_CURVE_SECRET='{not_a_key}': No public key found in {not_a_key}; expected this load "
         "generator's .key_secret file"),
        ({"ZMQ_SINK_CURVE_PUBLIC": sink_public, "LOCUST_CURVE_SECRET": str(keys / "clients" / "loadgen.key")},
         f"request_log: LOCUST_CURVE_SECRET='{keys / 'clients' / 'loadgen.key'}': holds no secret key, only a "
         "public one; expected this load generator's .key_secret file"),
    ]:
        started.append((settings, expected, subprocess.Popen(
            locust_command(target, "--headless", "-t", "5s"), cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=environment(tag, **{"ZMQ_SINK_ADDRESS": "tcp://127.0.0.1:9",
                                                                      **settings}))))
    for settings, expected, locust in started:  # all at once: each stops at its start
        stderr = locust.communicate(timeout=60)[1]
        assert locust.returncode == 1 and stderr.startswith(expected), (settings, stderr)
        assert stderr.count("\n") <= 1 and "Traceback" not in stderr, stderr


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
    assert re.search(r"all \d+ records acknowledged", stderr), stderr


def test_sink_never_started_run_ends_and_reports_what_was_lost(tmp_path, tag, target):
    local_file = tmp_path / "local.jsonl"
    queue_limit = 50
    locustfile = write_locustfile(tmp_path / "probed_locustfile.py", PROBED_LOCUSTFILE)
    code, stderr, stats = run_locust(tmp_path, tag, target, locustfile=locustfile, settings={
        "ZMQ_SINK_ADDRESS": f"tcp://127.0.0.1:{free_port()}", "ZMQ_SINK_QUEUE": str(queue_limit),
        "LOCUST_LOG_FILE": str(local_file), "ZMQ_SINK_FLUSH_TIMEOUT": "1",
    })
    assert code == 0, stderr
    assert largest_gap(stderr) < 0.5, f"the process stood still for {largest_gap(stderr):.2f}s"
    # The users kept their pace: the local file holds every request Locust counted.
    records = read_records(local_file)
    assert_same_counts(records, stats)
    assert len(records) > queue_limit
    reported = re.search(r"0 records acknowledged, 0 sent again; (\d+) not \((\d+) dropped: a full queue of (\d+), "
                         r"or over 1 MiB; (\d+) unacknowledged", stderr)
    assert reported, stderr
    undelivered, dropped, limit, queued = map(int, reported.groups())
    assert (undelivered, dropped, limit, queued) == (len(records), len(records) - queue_limit, queue_limit,
                                                     queue_limit)
    assert records[-1]["message"]["dropped"] == dropped - 1, "all but the end record, which found the queue full too"
    # Locust's log said, while the test ran, that the queue was past half full: once, as it never emptied.
    assert len(re.findall(rf"WARNING/locust.request_log: ZeroMQ sink \S+: \d+ records wait for "
                          rf"acknowledgement, over half of ZMQ_SINK_QUEUE \({queue_limit}\)", stderr)) == 1, stderr
    # It waited ZMQ_SINK_FLUSH_TIMEOUT for acknowledgements that could not come, and no longer.
    assert 0.9 <= flush_wait(stderr) <= 1.9, f"waited {flush_wait(stderr):.2f}s for acknowledgements"


GAP_PROBE = """
    import sys, time
    import gevent
    from locust import events

    largest_gap = [0.0]

    def tick():  # anything that blocks the whole process shows as a gap between two ticks
        last = time.monotonic()
        while True:
            gevent.sleep(0.01)
            now = time.monotonic()
            largest_gap[0], last = max(largest_gap[0], now - last), now

    events.test_start.add_listener(lambda **kwargs: gevent.spawn(tick))
    events.test_stop.add_listener(lambda **kwargs: print(f"largest gap: {largest_gap[0]:.3f}s", file=sys.stderr))
"""


def flush_wait(stderr):
    """Seconds from Locust's "Shutting down" line to the push handler's last line, logged when it stopped
    waiting for acknowledgements."""
    def logged(text):
        stamp = re.search(rf"^\[([\d-]+ [\d:]+,\d+)\] .*{text}", stderr, re.MULTILINE).group(1)
        return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return logged(r"ZeroMQ sink \S+: (all )?\d+ records acknowledged") - logged("Shutting down")


PROBED_LOCUSTFILE = """
    from locustfile import WebsiteUser
""" + GAP_PROBE


def largest_gap(stderr):
    """Seconds of the longest time the process did nothing else, from GAP_PROBE: a loop of 10 ms sleeps."""
    return float(re.search(r"largest gap: ([\d.]+)s", stderr).group(1))


BIG_RECORDS_LOCUSTFILE = """
    import locustfile  # the hooks register themselves on import
    from locust import FastHttpUser, constant, task

    class BigRecordUser(FastHttpUser):
        wait_time = constant(0.01)

        @task
        def big(self):
            self.client.get("/", context={"padding": "x" * 100_000})
"""


WIDE_RECORDS_LOCUSTFILE = """
    import locustfile  # the hooks register themselves on import
    from locust import FastHttpUser, constant, task

    class WideRecordUser(FastHttpUser):
        wait_time = constant(0)

        @task
        def wide(self):
            self.client.get("/", name="/" + "x" * 5000)  # 210 such records are over the sink's 1 MiB a frame
"""


def test_records_of_kilobytes_go_in_frames_the_sink_accepts(tmp_path, tag, target, sinks):
    # A frame holds up to 1000 records, and the sink drops a connection that sends over 1 MiB in a message:
    # without the handler's cap on a frame's bytes, a second of these records would never be acknowledged. A fast
    # machine makes more of them than a sink sharing its cores writes in the default 2 s of flushing: 30 s here.
    sink = sinks()
    code, stderr, stats = run_locust(tmp_path, tag, target, settings={"ZMQ_SINK_ADDRESS": sink.address,
                                                                      "ZMQ_SINK_FLUSH_TIMEOUT": "30"},
                                     locustfile=write_locustfile(tmp_path / "wide.py", WIDE_RECORDS_LOCUSTFILE))
    assert code == 0, stderr
    sink.stop()
    assert len(requests_of(read_records(sink.log_file))) == locust_total(stats) > 1000, stderr
    assert re.search(r"all \d+ records acknowledged, 0 sent again", stderr), stderr


def test_a_sink_that_never_acknowledges_gets_a_window_of_frames_each_again_ever_more_rarely(tag):
    # A load generator sends at most 8 frames before an acknowledgement, whatever it has waiting (here 10 frames a
    # second); and the resend timeout doubles at each expiry, so a slow sink is not flooded with copies: over 8 s
    # without an acknowledgement, the oldest frame goes again 1 s after its first send, 2 s after that and 4 s
    # after that; not each second.
    address = f"tcp://127.0.0.1:{free_port()}"
    with zmq.Context() as context, context.socket(zmq.PULL) as pull:
        pull.bind(address)
        simulated = simulated_load_generators(tag, address, count=1, rate=2000, seconds=8, processes=1,
                                              settings={"ZMQ_SINK_FLUSH_TIMEOUT": "0.1"})
        frames, deadline = Counter(), time.monotonic() + 8
        while time.monotonic() < deadline:
            if pull.poll(100):
                frames[pull.recv_multipart()[0]] += 1
        totals = finish_simulated(simulated)
    assert totals["acked"] == 0 and totals["made"] >= 10_000, totals
    assert len(frames) == 8, f"{len(frames)} frames sent before any acknowledgement"
    assert 2 <= sum(frames.values()) - len(frames) <= 3, frames


def test_stalled_sink_does_not_slow_the_run(tmp_path, tag, target):
    # A sink that accepts the connection and never reads: ZeroMQ and TCP buffers fill, then our queue.
    context = zmq.Context()
    stalled = context.socket(zmq.PULL)
    stalled.setsockopt(zmq.RCVHWM, 1)
    port = stalled.bind_to_random_port("tcp://127.0.0.1")
    locustfile = write_locustfile(tmp_path / "big_locustfile.py", BIG_RECORDS_LOCUSTFILE + GAP_PROBE)
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
    # A sink that takes frames but never acknowledges them: the records count as not acknowledged, and it says so.
    reported = re.search(r"0 records acknowledged, \d+ sent again; (\d+) not \((\d+) dropped: a full queue of 10, or "
                         r"over 1 MiB; (\d+) unacknowledged after [\d.]+s\): records were sent, but no sink "
                         rf"acknowledged any \(.*\); they are in the local file {re.escape(str(local_file))}$", stderr,
                         re.MULTILINE)
    assert reported, stderr
    not_acknowledged, dropped, queued = map(int, reported.groups())
    assert dropped > 0 and queued == 10
    assert not_acknowledged == dropped + queued == len(records)
    assert records[-1]["message"]["dropped"] == dropped - 1, "all but the end record, which found the queue full too"
    # The process went on while the sink refused frames: nothing blocked it for as long as a blocked loop would.
    assert largest_gap(stderr) < 0.5, f"the process stood still for {largest_gap(stderr):.2f}s"


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
        assert list(record) == ["time", "loglevel", "hostname", "worker", "run_id", "seq", "message"]
        assert TIME_FORMAT.match(record["time"]), record["time"]
        when = datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        assert abs((when - started).total_seconds()) < 120
        assert record["hostname"] == "loadgen-test"
    # Made like Locust's worker ids, not from the pid, which repeats: (worker, seq) names one record.
    assert {r["worker"] for r in records} == {records[0]["worker"]}
    assert re.fullmatch(re.escape(socket.gethostname()) + "_[0-9a-f]{32}", records[0]["worker"])
    # Numbered in the order they were made, which is the local file's; the last says how many.
    local = read_records(local_file)
    assert [r["seq"] for r in local] == list(range(1, len(local) + 1))
    assert local[-1]["message"] == {"class": "end", "records": len(local), "requests": locust_total(stats),
                                    "dropped": 0, "role": "local"}
    assert local[-1]["loglevel"] == "INFO"

    ok = next(r for r in requests_of(records) if r["message"]["result"] == "success")
    assert ok["loglevel"] == "INFO"
    assert set(ok["message"]) == {"class", "request_type", "name", "result", "status", "response_time",
                                  "response_length", "start_time", "url", "other"}
    assert ok["message"]["status"] == 200
    assert ok["message"]["name"] == "/" and ok["message"]["url"] == f"{target}/"
    assert ok["message"]["response_length"] == len(b"hello")
    assert ok["message"]["response_time"] > 0
    assert abs(ok["message"]["start_time"] - started.timestamp()) < 120
    failed = next(r for r in requests_of(records) if r["message"]["result"] == "error")
    assert failed["loglevel"] == "ERROR"
    assert failed["message"]["exception"] == "LocustBadStatusCode(code=404)"  # Locust's own text for it
    assert failed["message"]["status"] == 404
    assert failed["message"]["name"] == "/does-not-exist"

    plain = [r for r in records if not isinstance(r["message"], dict)]
    assert plain and all(r["message"] == "Task started" and r["loglevel"] == "INFO" for r in plain)


STATUS_LOCUSTFILE = """
    import random
    import locustfile
    from locust import FastHttpUser, HttpUser, constant

    def answers(user):
        for status in (200, 201, 404, 500):
            user.client.get(f"/status/{status}", name=f"{user.kind} /status/{status}")
        user.client.get(f"/item?id={random.randrange(1000)}", name=f"{user.kind} /item?id=[id]")  # one name, many URLs
        with user.client.get("/", name=f"{user.kind} caught", catch_response=True) as response:
            response.failure("a 200 that the user calls a failure")
        user.client.get("http://127.0.0.1:{refused_port}/", name=f"{user.kind} refused")

    class Fast(FastHttpUser):
        kind, tasks, wait_time = "fast", [answers], constant(0.05)

    class Plain(HttpUser):
        kind, tasks, wait_time = "requests", [answers], constant(0.05)
"""
STATUS_OF = {"/status/200": 200, "/status/201": 201, "/status/404": 404, "/status/500": 500, "/item?id=[id]": 404,
             "caught": 200, "refused": 0}


LIBRARY_SCRIPT = """
    # Locust's examples/use_as_lib.py, with the block pasted in (here: imported), and no line added for it
    import gevent
    import locustfile
    from locust import HttpUser, constant, events, task
    from locust.env import Environment
    from locust.log import setup_logging

    setup_logging("INFO")

    class MyUser(HttpUser):
        host = "{target}"
        wait_time = constant(0)

        @task
        def index(self):
            self.client.get("/")

    env = Environment(user_classes=[MyUser], events=events)
    runner = env.create_local_runner()
    env.events.init.fire(environment=env, runner=runner, web_ui=None)
    runner.start(4, spawn_rate=4)
    gevent.spawn_later(2, runner.quit)
    runner.greenlet.join()
    print(env.stats.total.num_requests)
"""


def test_imported_or_pasted_below_code_that_rebinds_its_names_the_block_logs_and_says_the_same(tmp_path, tag, target,
                                                                                              sinks):
    shutil.copy(LOCUSTFILE, tmp_path / "request_log.py")  # the README's import route
    imported = tmp_path / "imported.py"
    imported.write_text("from request_log import logger  # registers the request hooks\n" + OWN_USER)
    pasted = tmp_path / "pasted.py"
    pasted.write_text(pasted_below_code_that_rebinds_its_names())
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    runs = {name: (locustfile, sinks(name=name) if sink else None) for name, locustfile, sink in (
        ("imported", imported, True), ("pasted", pasted, True), ("imported-alone", imported, False),
        ("pasted-alone", pasted, False))}
    started = {name: start_locust(tmp_path, tag, target, name=name, locustfile=locustfile, settings={
        "ZMQ_SINK_ADDRESS": sink.address if sink else nowhere, "ZMQ_SINK_FLUSH_TIMEOUT": "0.5"})
        for name, (locustfile, sink) in runs.items()}
    said = {}
    for name, (_, sink) in runs.items():
        code, stderr, stats = finish_locust(started[name])
        assert code == 0 and "Traceback" not in stderr, stderr
        # The handler's lines go to Locust's log, formatted as Locust's own; the records do not.
        said[name] = re.findall(r"^\[[\d :,-]+\] \S+/(\w+/locust\.request_log: .*)", stderr, re.MULTILINE)
        assert "Task started" not in stderr
        if sink:
            sink.stop()
            records = read_records(sink.log_file)
            assert request_counts(records) == locust_counts(stats) and locust_total(stats) > 0
            # A task interrupted at the end logged its line but made no request: one at most per user.
            assert 0 <= sum(r["message"] == "Task started" for r in records) - locust_total(stats) <= 4
            assert records[-1]["message"] == {"class": "end", "records": len(records), "requests": locust_total(stats),
                                              "dropped": 0, "role": "local"}
            assert said[name] == [f"INFO/locust.request_log: ZeroMQ sink {sink.address}: all {len(records)} records "
                                  f"acknowledged, 0 sent again"], said
    assert len(said["pasted-alone"]) == 1 and re.fullmatch(
        rf"WARNING/locust\.request_log: ZeroMQ sink {nowhere}: 0 records acknowledged, 0 sent again; (\d+) not \(0 "
        rf"dropped: a full queue of 100000, or over 1 MiB; \1 unacknowledged after 0\.5s\): nothing accepted a "
        rf"connection there: no sink is listening, or a firewall is in the way; they are lost: in no file "
        rf"\(LOCUST_LOG_FILE is unset\)", said["pasted-alone"][0]), said
    assert [re.sub(r"\d+", "N", line) for line in said["imported-alone"]] == [
        re.sub(r"\d+", "N", line) for line in said["pasted-alone"]]


OWN_USER = """
import logging as own_logging
import locust as own_locust


class OwnUser(own_locust.FastHttpUser):
    wait_time = own_locust.constant(0.1)

    @own_locust.task
    def index(self):
        own_logging.getLogger("request_log").info("Task started")
        self.client.get("/")
"""


def pasted_below_code_that_rebinds_its_names():
    """locustfile.py's block, and below it code that binds, at module level, every name the block's functions look
    up as they run (time, json, os, logger, len, ...), as `from time import time` would; then a user of its own."""
    block = LOCUSTFILE.read_text().split("\nclass WebsiteUser")[0]
    names, code_objects = set(), [compile(block, "block", "exec")]
    while code_objects:
        code = code_objects.pop()
        names |= {op.argval for op in dis.get_instructions(code) if op.opname == "LOAD_GLOBAL"}
        code_objects += [const for const in code.co_consts if isinstance(const, types.CodeType)]
    names = {name for name in names if not name.startswith("__")}
    assert {"time", "json_encoder", "os", "socket", "math", "zmq", "gevent", "len", "isinstance"} <= names, names
    return block + "".join(f"{name} = None\n" for name in sorted(names)) + OWN_USER


def test_locust_used_as_a_library_writes_every_request_and_the_end_record(tmp_path, tag, target, sinks):
    sink, local_file = sinks(), tmp_path / "local.jsonl"
    script = write_locustfile(tmp_path / "use_as_lib.py", LIBRARY_SCRIPT.replace("{target}", target))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env=environment(tag, ZMQ_SINK_ADDRESS=sink.address, LOCUST_LOG_FILE=str(local_file)))
    assert result.returncode == 0, result.stderr
    sink.stop()
    requests = int(result.stdout.split()[-1])
    for path in (local_file, sink.log_file):  # the quit event never came: both still got the tail
        records = read_records(path)
        assert len(requests_of(records)) == requests > 100
        assert records[-1]["message"] == {"class": "end", "records": len(records), "requests": requests, "dropped": 0,
                                          "role": "local"}
        assert_complete(path, processes=1)
    assert re.search(r"all \d+ records acknowledged", result.stderr), result.stderr


TIMES_LOCUSTFILE = """
    import json, sys, time
    from datetime import datetime
    import locustfile
    from locust import FastHttpUser, constant, events, task

    class Delay(locustfile.LinesHandler):  # how long after its end a request's line reaches the handlers
        largest = 0.0

        def write_lines(self, lines, first_seq):
            for line in lines:
                ended = datetime.fromisoformat(json.loads(line)["time"].replace("Z", "+00:00")).timestamp()
                Delay.largest = max(Delay.largest, time.time() - ended)

    events.init.add_listener(lambda **kwargs: locustfile.request_log.handlers.append(Delay()))
    events.test_stop.add_listener(lambda **kwargs: print(f"largest delay: {Delay.largest:.3f}s", file=sys.stderr))

    class TimedUser(FastHttpUser):
        wait_time = constant(0.01)

        @task
        def pages(self):
            self.client.get("/slow")  # 20 ms and more: a request's start and end are apart
            self.client.get("/")
"""


def test_response_times_are_locusts_own_and_time_is_when_a_request_ended(tmp_path, tag, target):
    local_file = tmp_path / "local.jsonl"
    code, stderr, stats = run_locust(tmp_path, tag, target, settings={"LOCUST_LOG_FILE": str(local_file)},
                                     locustfile=write_locustfile(tmp_path / "times_locustfile.py", TIMES_LOCUSTFILE))
    assert code == 0, stderr
    records = requests_of(read_records(local_file))
    assert request_counts(records) == locust_counts(stats)
    for entry in stats:  # Locust's own sum of the unrounded response times
        times = [r["message"]["response_time"] for r in records if r["message"]["name"] == entry["name"]]
        assert math.isclose(math.fsum(times), entry["total_response_time"], rel_tol=1e-9), entry["name"]
    for r in records:
        ended = datetime.fromisoformat(r["time"].replace("Z", "+00:00")).timestamp()
        # `time` has whole milliseconds; the request ended response_time after it started
        assert -0.0011 < ended - r["message"]["start_time"] - r["message"]["response_time"] / 1000 < 0.1, r
    assert min(r["message"]["response_time"] for r in records if r["message"]["name"] == "/slow") >= 20
    # Within 50 ms of its end, a request's line reaches the handlers (up to 1 ms more: `time` is cut to ms)
    delay = float(re.search(r"largest delay: ([\d.]+)s", stderr).group(1))
    assert 0 < delay < 0.3, f"a line reached the handlers {delay:.3f}s after its request ended"


def test_status_codes_and_failures_as_locust_groups_them(tmp_path, tag, target, sinks):
    sink = sinks()
    locustfile = write_locustfile(tmp_path / "status_locustfile.py",
                                  STATUS_LOCUSTFILE.replace("{refused_port}", str(free_port())))
    code, stderr, stats = run_locust(tmp_path, tag, target, *two_processes(), "--csv", str(tmp_path / "locust"),
                                     settings={"ZMQ_SINK_ADDRESS": sink.address}, locustfile=locustfile)
    assert code == 0, stderr
    sink.stop()
    records = requests_of(read_records(sink.log_file))
    assert request_counts(records) == locust_counts(stats)
    statuses = Counter((r["message"]["name"], r["message"]["status"]) for r in records)
    assert {(name, status) for name, status in statuses} == {
        (f"{kind} {name}", status) for kind in ("fast", "requests") for name, status in STATUS_OF.items()}
    run = report_json(sink.log_file)["runs"][0]
    assert {row["name"]: row["status"] for row in run["names"]} == {
        f"{kind} {name}": {str(status): statuses[f"{kind} {name}", status]}
        for kind in ("fast", "requests") for name, status in STATUS_OF.items()}
    every_status = Counter(r["message"]["status"] for r in records)
    assert run["total"]["status"] == {str(status): every_status[status] for status in sorted(every_status)}
    # The failures table groups as Locust's: the same groups, the same counts, whatever the URL.
    with open(tmp_path / "locust_failures.csv", newline="") as failures_csv:
        expected = sorted((row["Method"], row["Name"], row["Error"], int(row["Occurrences"]))
                          for row in csv.DictReader(failures_csv))
    assert sorted(tuple(failure.values()) for failure in run["failures"]) == expected
    assert {name for _, name, _, _ in expected} == {f"{kind} {name}" for kind in ("fast", "requests")
                                                    for name in ("/status/404", "/status/500", "/item?id=[id]",
                                                                 "caught", "refused")}
    assert all(error for _, _, error, _ in expected)
    _, output = report(sink.log_file)
    for request_type, name, error, occurrences in expected:
        assert re.search(rf"^{request_type} +{re.escape(name)} +{occurrences}  {re.escape(error)}$", output, re.M)


ODD_VALUES_LOCUSTFILE = """
    from datetime import datetime, timezone
    from locustfile import logger  # the hooks register themselves on import
    from locust import FastHttpUser, constant, task

    class Opaque:
        def __repr__(self):
            return "<opaque>"

    class Broken:
        def __str__(self):
            raise RuntimeError("no text for you")

        __repr__ = __str__

    class UnprintableError(Exception):
        __repr__ = Broken.__str__  # Locust's own listener fails on it, after counting the request

    class OddUser(FastHttpUser):
        wait_time = constant(0.1)

        @task
        def odd(self):
            circular = {}
            circular["self"] = circular
            for context in ({"bytes": b"\\xff\\x00", "object": Opaque(), "error": ValueError("boom"),
                             "when": datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)},
                            {(1, 2): "tuple key"}, {"nan": float("nan")}, circular, {"broken": Broken()}):
                with self.client.get("/", name="odd", context=context, catch_response=True) as response:
                    response.failure(ValueError("custom failure"))
            with self.client.get("/", name="unprintable", catch_response=True) as response:
                response.failure(UnprintableError())
            logger.info("%s and %s", b"\\xfe", Opaque())
"""


@pytest.mark.parametrize("orjson", [True, False], ids=["orjson", "json module"])
def test_values_json_cannot_encode_become_strings(tmp_path, tag, target, without_accelerators, orjson):
    locustfile = write_locustfile(tmp_path / "odd_locustfile.py", ODD_VALUES_LOCUSTFILE)
    local_file = tmp_path / "local.jsonl"
    code, stderr, stats = run_locust(tmp_path, tag, target, locustfile=locustfile, settings={
        "LOCUST_LOG_FILE": str(local_file), **({} if orjson else without_accelerators)})
    assert code == 0, stderr
    # Tracebacks from Locust's own listener only (UnprintableError), none from the hooks
    assert stderr.count("Traceback") == stderr.count("Uncaught exception in event handler"), stderr
    assert "ZeroMQ sink" not in stderr, "ZMQ_SINK_ADDRESS= (empty): no pushing, so no push handler to report"
    records = read_records(local_file)
    assert request_counts(records) == locust_counts(stats) and stats[0]["num_failures"] >= 5
    others = [r["message"]["other"] for r in requests_of(records)]
    assert {"bytes": "b'\\xff\\x00'", "object": "<opaque>", "error": "boom",
            "when": "2026-11-28 10:00:00+00:00"} in others
    assert "{(1, 2): 'tuple key'}" in others
    # The one difference between the two encoders: orjson writes NaN as null.
    assert ({"nan": None} if orjson else "{'nan': nan}") in others
    assert any("{...}" in other for other in others if isinstance(other, str))  # the circular one
    assert "<unprintable dict>" in others  # its repr() calls Broken.__repr__, which raises
    assert {r["message"]["name"]: r["message"]["exception"] for r in requests_of(records)} == {
        "odd": "ValueError('custom failure')", "unprintable": "<unprintable UnprintableError>"}
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
    "huge": [b'{"a": "' + b"x" * ((1 << 20) - 8) + b'"}'],  # a line of 1 MiB + 1 byte: the largest frame
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
    reasons = re.search(r"frames rejected \((.*?)\)", summary).group(1)
    counts = {reason: int(n) for n, reason in re.findall(r"(\d+) ([^,]+)", reasons)}
    assert set(counts) == {"empty", "empty line", "over 1 MiB", "carriage return", "not UTF-8", "not JSON",
                           "not an object"} and sum(counts.values()) == bad_frames
    # The first frame rejected for each reason is shown, once, with its start.
    shown = re.findall(r"^sink: rejected a frame \((.+?)\): b", sink.stderr(), re.MULTILINE)
    assert sorted(shown) == sorted(counts)


def complete_lines(path):
    """The complete lines a running sink has written so far."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    return text.splitlines() if text.endswith("\n") else []


def test_a_sink_that_does_not_acknowledge_still_gets_every_record(tmp_path, tag, target):
    # As a sink.py from before acknowledgements: a PULL socket that takes every frame, and no PUB beside it.
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    port = free_port()
    pull.bind(f"tcp://127.0.0.1:{port}")
    frames, stop = [], threading.Event()

    def take():
        while not stop.is_set():
            if pull.poll(50):
                frames.extend(pull.recv_multipart())

    reader = threading.Thread(target=take)
    reader.start()
    try:
        code, stderr, stats = run_locust(tmp_path, tag, target, settings={
            "ZMQ_SINK_ADDRESS": f"tcp://127.0.0.1:{port}", "ZMQ_SINK_FLUSH_TIMEOUT": "0.5"})
    finally:
        stop.set()
        reader.join()
        pull.close(linger=0)
        context.term()
    assert code == 0, stderr
    received = {}  # (worker, seq) -> record: the frames that a frame's header names are skipped, copies merged
    for frame in frames:
        if frame.startswith(b"{"):
            for record in map(json.loads, frame.split(b"\n")):
                received[(record["worker"], record["seq"])] = record
    assert_same_counts(list(received.values()), stats)
    reported = re.search(r"0 records acknowledged, \d+ sent again; (\d+) not \(0 dropped: a full queue of 100000, or "
                         r"over 1 MiB; \1 unacknowledged after 0.5s\): records were sent, but no sink acknowledged "
                         r"any", stderr)
    assert reported, stderr
    assert int(reported.group(1)) == len(received), "every record made was received, and none acknowledged"


def test_a_plain_push_client_delivers_and_a_frame_over_the_limit_is_refused(tmp_path, tag, sinks):
    sink = sinks()
    record = b'{"pad":"' + b"x" * ((1 << 20) - 10) + b'"}'  # 1 MiB exactly, the longest record
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.connect(sink.address)
        push.send(record + b"\n")  # the largest frame the sink takes: 1 MiB + 1 byte
        push.send(b'{"n":1}\n{"n":2}')
        wait_for(lambda: len(complete_lines(sink.log_file)) == 3, what="the plain client's records")
        push.send(b"\n".join([b'{"n":3}', record[:1 << 19], record[1 << 19:]]))  # 1 MiB + 2 bytes
        time.sleep(0.5)  # sent with it, it could be lost with the connection the sink drops
        push.send(b'{"n":4}')  # after the refused frame, the same client, connected again
        wait_for(lambda: len(complete_lines(sink.log_file)) == 4, what="the frame after the refused one")
        summary = sink.stop()
    assert complete_lines(sink.log_file)[1:] == ['{"n":1}', '{"n":2}', '{"n":4}']
    assert re.search(r"4 records written .*; 0 frames rejected, 0 records sent again and already in the file; but "
                     r"[12] connections closed without an end record \(by the network, a killed process, a plain "
                     r"client, or ZeroMQ for a frame over 1048577 bytes\)$", summary), summary


FLOODER = """
import sys, time, zmq
address, connections, seconds, *sizes = sys.argv[1:]
line = b'{"n":1,"pad":"' + b"x" * 280 + b'"}'
frames = [b"\\n".join([line] * (int(size) // (len(line) + 1))) for size in sizes]
context = zmq.Context()
pushes = [context.socket(zmq.PUSH) for _ in range(int(connections))]
for push in pushes:
    push.connect(address)
deadline, n = time.monotonic() + float(seconds), 0
while time.monotonic() < deadline:
    for push in pushes:
        try:
            push.send(frames[n % len(frames)], zmq.NOBLOCK, copy=False)
            n += 1
        except zmq.Again:
            pass
    time.sleep(0.001)
for push in pushes:
    push.close(linger=0)
context.term()
"""


def peak_rss_while_flooded(sink, tag, connections, *frame_sizes, seconds=5):
    """The sink's peak RSS (VmHWM) while that many connections push frames of those sizes as fast as they can."""
    flooder = subprocess.Popen([sys.executable, "-c", FLOODER, sink.address, str(connections), str(seconds),
                                *map(str, frame_sizes)], env=environment(tag))
    try:
        assert flooder.wait(timeout=seconds + 60) == 0
    finally:
        flooder.kill()
        flooder.wait()
    status = Path(f"/proc/{sink.proc.pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


def test_the_sinks_memory_has_one_bound_for_huge_frames(tmp_path, tag, sinks):
    sink = sinks(log_file=Path("/dev/null"))  # written at full speed
    peak = peak_rss_while_flooded(sink, tag, 8, 60_000_000, 16_000_000, 4_000_000, 1_000_000)
    summary = sink.stop()
    assert peak <= 256 << 20, f"peak RSS {peak >> 20} MB"
    written, closed = map(int, re.search(r"(\d+) records written .* (\d+) connections closed", summary).groups())
    assert written > 0 and closed > 8, summary  # 1 MB frames were written, larger ones refused


def test_the_sinks_memory_has_one_bound_while_its_file_refuses_writes(tmp_path, tag, sinks):
    sink = sinks(file_size_limit=20_000)
    peak = peak_rss_while_flooded(sink, tag, 100, 1000 * 300)  # frames of 1000 records from 100 connections
    assert "sink: cannot write to" in sink.stderr()
    sink.stop()
    assert peak <= 256 << 20, f"peak RSS {peak >> 20} MB"


# --- many load generators, and past the sink's capacity ------------------------------------------

def simulated_load_generators(tag, address, count, rate, seconds, processes=2, settings=None):
    """`count` load generators in `processes` processes, each the locustfile's own push handler with its own
    sockets and worker id (bench.py load-generators), each making `rate` records a second for `seconds`."""
    started = [subprocess.Popen([sys.executable, str(REPO / "bench.py"), "load-generators", address,
                                 str(count // processes), str(rate), str(seconds), f"sim{n}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=environment(tag, **(settings or {})))
               for n in range(processes)]
    for generators in started:
        assert generators.stdout.readline() == "ready\n"
    return started


def finish_simulated(started):
    """Their counters, summed, once every one has closed; "workers": {worker: [made, dropped]}; "ack_times": every
    acknowledgement time the handlers measured, one a frame acknowledged."""
    totals = Counter()
    workers, ack_times = {}, []
    for generators in started:
        out, err = generators.communicate(timeout=300)
        assert generators.returncode == 0, err[-2000:]
        result = json.loads(out.splitlines()[-1])
        workers.update(result.pop("workers"))
        ack_times += result.pop("ack_times")
        totals.update(result)
    return {**totals, "workers": workers, "ack_times": ack_times}


NUMBERED = re.compile(rb'"worker":"([^"]+)","run_id":(?:null|"[^"]*"),"seq":(\d+),')


def assert_each_record_once(sink_file, simulated):
    """Each simulated load generator's records are in the file once each, but for those it counted as dropped;
    returns how many records of others (real Locust processes) the file holds."""
    seqs = {}
    for worker, seq in NUMBERED.findall(Path(sink_file).read_bytes()):
        seqs.setdefault(worker.decode(), array("q")).append(int(seq))
    for worker, (made, dropped) in simulated["workers"].items():
        held = sorted(seqs.pop(worker, []))
        assert len(held) == len(set(held)) == made - dropped and set(held) <= set(range(1, made + 1)), worker
    return sum(map(len, seqs.values()))


def sink_summary(stderr):
    """(records written, records received again that the file already held) from the sink's last line."""
    written, again = re.search(r"(\d+) records written .* (\d+) records sent again and already in the file", stderr
                               ).groups()
    return int(written), int(again)


def test_past_its_capacity_the_sink_slows_down_and_no_record_is_sent_twice(tmp_path, tag, sinks,
                                                                           without_accelerators):
    # A sink with a fifth of a core or less (0.05 s running, 0.2 s stopped, by signals) and the json module only,
    # against more than it writes in that time, for 30 s; then quiet while the load generators empty their queues.
    # Where the machine is fast enough for the sink to keep up, it gets less: half as much each time its progress
    # line says it is not behind.
    sink = sinks(settings=without_accelerators)
    simulated = simulated_load_generators(tag, sink.address, count=100, rate=400, seconds=30,
                                          settings={"ZMQ_SINK_FLUSH_TIMEOUT": "120"})
    process, peak_rss, running, lines_seen = psutil.Process(sink.proc.pid), 0, 0.05, 0
    throttled_until = time.monotonic() + 30
    while time.monotonic() < throttled_until:
        sink.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        sink.proc.send_signal(signal.SIGCONT)
        time.sleep(running)
        peak_rss = max(peak_rss, process.memory_info().rss)
        progress = re.findall(r"^sink: \d+ records \(.*$", sink.stderr(), re.M)
        if len(progress) > lines_seen:
            lines_seen = len(progress)
            running = running if "behind for" in progress[-1] or lines_seen < 2 else max(0.005, running / 2)
    result = finish_simulated(simulated)
    summary = sink.stop()
    written, again = sink_summary(summary)
    assert sink.proc.returncode == 0, "no abort"
    assert peak_rss <= 256 << 20, f"peak RSS {peak_rss >> 20} MB"
    assert written == result["made"] - result["dropped"] == result["acked"]
    assert_each_record_once(sink.log_file, result)
    assert again <= 0.1 * result["made"], f"{again} of {result['made']} records received again"
    assert re.search(r"behind for \d+s: \d+ load generators waiting their turn, up to [\d.]+s between two frames "
                     r"of one", summary), summary
    print(f"made {result['made']}, dropped {result['dropped']}, received again {again}, peak RSS {peak_rss >> 20} MB")


def test_a_file_that_refuses_writes_for_20s_under_full_load_loses_nothing(tmp_path, tag, target, sinks):
    # No ZMTP heartbeats reach the sink's PULL socket: with them, libzmq 4.3.5 aborted it here when it read again.
    sink = sinks(file_size_limit=20 << 20)
    locust = full_speed_locust(tmp_path, tag, target, sink.address, *two_processes(), seconds=40)
    simulated = simulated_load_generators(tag, sink.address, count=100, rate=100, seconds=35)
    try:
        wait_for(lambda: "sink: cannot write to" in sink.stderr(), what="the sink to stall", timeout=60)
        time.sleep(20)
        assert sink.proc.poll() is None, sink.stderr()[-2000:]
        resource.prlimit(sink.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        result = finish_simulated(simulated)
    finally:
        stderr = finish(locust)
    summary = sink.stop()
    assert re.search(r"sink: still cannot write to \S+ after 1\d+s", summary), summary
    assert result["acked"] == result["made"] and not result["dropped"]
    locust_records = assert_each_record_once(sink.log_file, result)
    assert not locust_processes(tag)
    assert len(re.findall(r"ZeroMQ sink \S+: all \d+ records acknowledged", stderr)) == 3, stderr
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert locust_records == locust_total(stats) + 3, "every request, and each process's end record"


@pytest.mark.parametrize("count, rate", [(1000, 2), (500, 50)])
def test_many_load_generators_deliver_every_record_once(tmp_path, tag, sinks, count, rate):
    sink = sinks()
    # 250 load generators a process close together: they take longer than one alone to hear their last acknowledgements
    result = finish_simulated(simulated_load_generators(tag, sink.address, count, rate, seconds=6, processes=4,
                                                        settings={"ZMQ_SINK_FLUSH_TIMEOUT": "30"}))
    written, again = sink_summary(sink.stop())
    assert result["acked"] == result["made"] == written >= count * rate * 5
    # Fewer, fuller frames: one a second each, not one every 50 ms, and the last ones at the end.
    assert len(result["ack_times"]) <= count * 8, len(result["ack_times"])
    # Each record once in the file. How many the sink received again depends on the machine: 1000 simulated load
    # generators on 2 busy cores read acknowledgements late enough to time out 0 to 11% of their records.
    assert_each_record_once(sink.log_file, result)
    assert again <= result["resent"]


@pytest.mark.parametrize("hard_limit", [False, True], ids=["raised", "hard limit"])
def test_a_sink_short_of_descriptors_raises_its_limit_or_names_each_connection_it_refuses(tmp_path, tag, sinks,
                                                                                          hard_limit):
    hard = 256 if hard_limit else resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    sink = sinks(descriptors=(256, hard))
    started = sink.stderr()
    room = int(re.search(r"room for (\d+) load generators", started).group(1))
    result = finish_simulated(simulated_load_generators(tag, sink.address, 200, rate=5, seconds=5,
                                                        settings={"ZMQ_SINK_FLUSH_TIMEOUT": "1"}))
    summary = sink.stop()
    if not hard_limit:
        assert f"({hard} descriptors, raised from 256)" in started and room > 200, started
        assert result["acked"] == result["made"] and "refused" not in summary
        return
    assert "(256 descriptors, its hard limit)" in started and room < 200, started
    # Named once in the 5 seconds, though refused again and again: a line at most every 10 seconds. By its address,
    # unless libzmq, which tries again at once, took the descriptor the sink keeps free to accept and name it.
    said = re.findall(r"^sink: refused (127\.0\.0\.1|clients): no descriptor left, 256 in all", summary, re.M)
    assert said and len(said) == len(set(said)), summary
    assert int(re.search(r"(\d+) connections refused \(the lines above say why\)$", summary).group(1)) > 1
    # What got in was written once; what did not is still counted by its load generator.
    written, _ = sink_summary(summary)
    ids = NUMBERED.findall(sink.log_file.read_bytes())
    assert len(ids) == len(set(ids)) == written and 0 < result["acked"] <= written <= result["made"]


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
    written = int(re.search(r"(\d+) records written to \S+ in [\d.]+s \((\d+)/s\); 0 frames rejected",
                            summary).group(1))
    assert written == len(records) > 0
    # Frames arrive in the order each pusher sent them: the file holds a gapless prefix of the stream.
    assert [r["n"] for r in records] == list(range(len(records)))
    assert f"stopped by {signal.Signals(signum).name}" in summary


def test_sink_appends_and_cuts_only_an_incomplete_last_line(tmp_path, tag, sinks):
    first = sinks()
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.connect(first.address)
        push.send(b'{"run": 1}')
        wait_for(lambda: len(complete_lines(first.log_file)) == 1, what="the first record")
        assert "1 records written" in first.stop()
        second = sinks(address=first.address)
        assert "incomplete" not in second.stderr()
        push.send(b'{"run": 2}')
        wait_for(lambda: len(complete_lines(second.log_file)) == 2, what="the second record")
        assert "1 records written" in second.stop()
        assert read_records(second.log_file) == [{"run": 1}, {"run": 2}]
        # What a sink killed in the middle of a write leaves: the start of a line.
        with open(second.log_file, "ab") as log_file:
            log_file.write(b'{"run": 3, "cut sh')
        third = sinks(address=first.address)
        assert "(cut its incomplete last line, 18 bytes, never acknowledged)" in third.stderr()
        push.send(b'{"run": 4}')
        wait_for(lambda: third.log_file.read_bytes().endswith(b"\n{\"run\": 4}\n"), what="the fourth record")
    assert "1 records written" in third.stop()
    assert third.log_file.read_bytes() == b'{"run": 1}\n{"run": 2}\n{"run": 4}\n'


def test_a_full_disk_stalls_the_sink_and_loses_nothing(tmp_path, tag, target, sinks):
    sink = sinks(file_size_limit=20_000)
    command = locust_command(target, "--headless", "-u", "4", "-r", "4", "-t", "12s", "--json-file",
                             str(tmp_path / "stats"))
    locust = subprocess.Popen(command, cwd=tmp_path, env=environment(tag, ZMQ_SINK_ADDRESS=sink.address),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: "sink: still cannot write to" in sink.stderr(), what="the sink to stall and say so again")
        assert sink.log_file.stat().st_size <= 20_000 and not sink.log_file.read_bytes().endswith(b"\n")
        resource.prlimit(sink.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        wait_for(lambda: "sink: writing to" in sink.stderr(), what="the sink to write again")
        _, stderr = locust.communicate(timeout=90)
    finally:
        locust.kill()
        locust.wait()
    assert locust.returncode == 0, stderr
    assert re.search(r"all \d+ records acknowledged", stderr), "the load generator held the records meanwhile"
    summary = sink.stop()
    assert re.search(r"sink: cannot write to \S+: File too large; holding \d+ records and taking no more until it "
                     r"can\n", summary), summary
    assert re.search(r"sink: writing to \S+ again after [\d.]+s\n", summary)
    records = read_records(sink.log_file)  # the record cut short at the limit was finished: every line whole
    assert len({(r["worker"], r["seq"]) for r in records}) == len(records), "each record once"
    assert_same_counts(records, json.loads((tmp_path / "stats.json").read_text()))
    assert_complete(sink.log_file, processes=1)


@contextmanager
def stalled_sink(sinks):
    """A sink whose file refused a write after about 45 of the 100 records pushed to it, while the pushing
    socket is still connected."""
    sink = sinks(file_size_limit=10_000)
    with zmq.Context() as context, context.socket(zmq.PUSH) as push:
        push.connect(sink.address)
        for n in range(100):
            push.send(json.dumps({"n": n, "pad": "x" * 200}).encode())
        wait_for(lambda: "sink: cannot write to" in sink.stderr(), what="the sink to stall")
        yield sink
        push.close(linger=0)


def test_sigterm_while_stalled_says_what_it_could_not_write(tmp_path, tag, sinks):
    with stalled_sink(sinks) as sink:
        summary = sink.stop()
    written, held = map(int, re.search(r"(\d+) records written .*; but (\d+) records received but not written: the "
                                       r"file refused them", summary).groups())
    lines = sink.log_file.read_bytes().split(b"\n")
    # Stalled, it takes nothing more from ZeroMQ: it holds only the record whose write failed.
    assert written == len(lines) - 1 and held == 1
    assert [json.loads(line)["n"] for line in lines[:-1]] == list(range(written))
    assert lines[-1] and b'"n": %d' % written in lines[-1], "the record cut short is the first one held"


def test_on_sigterm_the_sink_writes_what_has_already_arrived(tmp_path, tag, sinks):
    with stalled_sink(sinks) as sink:
        time.sleep(0.5)  # meanwhile ZeroMQ fills the sink's queue: the next message has arrived
        whole_lines = sink.log_file.read_bytes().count(b"\n")
        # The file takes writes again, and SIGTERM comes while the sink waits to try again: its loop ends right
        # after it wrote what it held, with that message waiting. Only its last drain writes it.
        resource.prlimit(sink.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        summary = sink.stop()
    records = read_records(sink.log_file)
    assert [r["n"] for r in records] == list(range(len(records)))
    assert len(records) >= whole_lines + 2, "the record it held, and what had arrived"
    assert f"{len(records)} records written" in summary and "not written" not in summary


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
    locustfile = write_locustfile(tmp_path / "busy_locustfile.py", BUSY_LOCUSTFILE)
    code, stderr, stats = run_locust(tmp_path, tag, target, *two_processes(), locustfile=locustfile, settings={
        "ZMQ_SINK_ADDRESS": sink.address, "LOCUST_RESOURCE_INTERVAL": "0.5"})
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
        assert all(0.45 <= gap <= 1.0 for gap in gaps), gaps  # late when its users keep the CPU busy
        for record in mine:
            message = record["message"]
            assert set(message) == {"class", "cpu_percent", "rss_bytes", "user_count"}
            assert record["run_id"] == run_id and record["loglevel"] == "INFO"
            assert 0 <= message["cpu_percent"] <= 200
            assert 20e6 < message["rss_bytes"] < 1e9
            assert message["user_count"] in (0, 1, 2, 3, 4)
        assert mine[-1]["message"]["user_count"] == 2, "4 users over 2 workers"
        # The worker's own CPU, not its idle master's (under 2% when the sampler measured the master, before the
        # fork): the users spin between requests, for as much of a core as the machine gives the worker.
        peak = max(r["message"]["cpu_percent"] for r in mine)
        assert peak > 20, [r["message"]["cpu_percent"] for r in mine]
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


def stop_from_web_ui(port):
    """Stop the test as the web UI's button does: a POST, or in older Locusts a GET."""
    try:
        web_ui(port, "/stop", {})
    except urllib.error.HTTPError as error:
        if error.code != 405:
            raise
        web_ui(port, "/stop")


def test_each_test_started_from_the_web_ui_gets_a_new_run_id(tmp_path, tag, target, sinks):
    sink = sinks()
    locustfile = write_locustfile(tmp_path / "run_id_locustfile.py", RUN_ID_LOCUSTFILE)
    web_port = free_port()
    with two_workers(tmp_path, tag, target, sink.address, locustfile=locustfile) as workers:
        command = locust_command(target, "--web-host", "127.0.0.1", "--web-port", str(web_port), *workers,
                                 locustfile=locustfile)
        master = subprocess.Popen(command, cwd=tmp_path, env=environment(tag, ZMQ_SINK_ADDRESS=sink.address),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: master_ready(web_port), what="the web UI and 2 workers")
            for _ in range(2):
                assert web_ui(web_port, "/swarm", {"user_count": 4, "spawn_rate": 4, "host": target})["success"]
                time.sleep(2)
                stop_from_web_ui(web_port)
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
        return len(web_ui(web_port, "/stats/requests").get("workers", ())) == 2
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

def run_report(*args, expect_code=0, env=None):
    result = subprocess.run([sys.executable, str(REPO / "report.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=120, env=env and {**os.environ, **env})
    assert result.returncode == expect_code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result


def report_json(*args, expect_code=0):
    return json.loads(run_report(*args, "--json", expect_code=expect_code).stdout)


def report(*args, expect_code=0):
    """Run report.py; return its tables, {run_id: {(type, name): row}} with rows as text columns, and all it
    printed."""
    result = run_report(*args, expect_code=expect_code)
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
    """{(type, name): (requests, failures)} from a report's printed table."""
    return by_name((request_type, name, int(requests), int(failures))
                   for (request_type, name), (requests, failures, *_) in table.items() if name != "Aggregated")


def assert_complete(*files, processes):
    """The report over the files: every record of each of that many processes is there, and it says so."""
    verdict = report_json(*files, "--require-complete")
    assert verdict["complete"] and verdict["missing"] == 0, verdict["processes"]
    assert len(verdict["processes"]) == processes
    assert all(p["ended"] and not p["missing"] and not p["unnumbered"] for p in verdict["processes"])
    _, output = report(*files, "--require-complete")
    assert re.search(rf"^Complete: all \d+ records of {processes} process", output, re.MULTILINE), output
    return verdict


def nearest_rank(values, percent):
    """The percentile as the report defines it, computed another way: sort, then count."""
    ordered = sorted(values)
    return ordered[math.ceil(len(ordered) * percent / 100) - 1]


def expected_row(values, failures, seconds):
    return [str(len(values)), str(failures), f"{len(values) / seconds:.1f}",
            *(f"{nearest_rank(values, p):.2f}" for p in (50, 90, 95, 99)), f"{max(values):.2f}"]


def test_report_of_a_real_run_matches_locust_and_the_raw_values(tmp_path, tag, target, sinks, monkeypatch):
    sink = sinks()
    code, stderr, stats = run_locust(tmp_path, tag, target, *two_processes(), settings={
        "ZMQ_SINK_ADDRESS": sink.address, "LOCUST_LOG_FILE": str(tmp_path / "local.jsonl")})
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
    # The README's DuckDB and pandas recipes, run as printed over the sink's file and every process's own (each
    # record twice, then), one of them ending in an incomplete line as a killed sink leaves it, give the unrounded
    # values of --json: counts, failures and exact percentiles; they say the line they skipped, and print every
    # column and row.
    expected = {(run_id, row["request_type"], row["name"]): [row[key] for key in OWN_TOOLS_COLUMNS]
                for row in report_json(sink.log_file)["runs"][0]["names"]}
    locals_ = sorted(tmp_path.glob("local.*.jsonl"))
    assert len(locals_) == 2
    with open(locals_[0], "ab") as local:
        local.write(complete_lines(sink.log_file)[-1][:40].encode())
    monkeypatch.chdir(tmp_path)
    recipes = []
    for snippet in own_tools_snippets():
        recipes.append({})
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(snippet, recipes[-1])
        printed = printed.getvalue()
        assert re.match(r"lines skipped, not (records|JSON): 1\n", printed), printed
        assert all(column in printed for column in ["run_id", "request_type", *OWN_TOOLS_COLUMNS]), printed
        assert all(f" {name} " in printed for _, _, name in expected) and "shown" not in printed, printed
    duckdb_summary, recipe = recipes[0]["summary"], recipes[1]
    rows = duckdb_summary.fetchall()
    assert {tuple(row[:3]): list(row[3:]) for row in rows} == expected
    summary = recipe["summary"].reset_index()
    assert {(row.run_id, row.request_type, row.name): [row.requests, row.failures, row.p50, row.p95, row.p99, row.max]
            for row in summary.itertuples()} == expected
    # Both times read right: a request's end, to the millisecond, is its start plus its response time.
    requests = recipe["requests"]
    took = (requests["ended"] - requests["started"]).dt.total_seconds() * 1000 - requests["response_time"]
    assert took.between(-1, 50).all(), took.describe()


OWN_TOOLS_COLUMNS = ["requests", "failures", "p50", "p95", "p99", "max"]


def own_tools_snippets():
    """The DuckDB and the pandas recipes of the README's section "Your own tools", as printed."""
    section = (REPO / "README.md").read_text().split("\n## Your own tools\n")[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def locust_total(stats):
    return sum(entry["num_requests"] for entry in stats)


def stats_failures(stats):
    return sum(entry["num_failures"] for entry in stats)


RUN_A, RUN_B = "20261128T100000Z-aaaaaaaa", "20261128T110000Z-bbbbbbbb"


def record_line(second, run_id, message, worker="w1", millisecond=None, seq=None):
    millisecond = random.randrange(1000) if millisecond is None else millisecond
    return json.dumps({"time": f"2026-11-28T{second}.{millisecond:03d}Z", "loglevel": "INFO", "hostname": "h-" + worker,
                       "worker": worker, "run_id": run_id, **({"seq": seq} if seq else {}), "message": message})


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
    assert (f"{collected}: request records 114, resource samples 3, other records 2, duplicates merged 0, lines "
            f"skipped 3 (JSON, but not records), unreadable lines 9 (the first: {collected} line "
            f"{lines.index('garbage') + 1})") in output
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
    assert ("resource samples 0 (of run 20261128T110000Z-bbbbbbbb), other records 2, duplicates merged 0, lines "
            "skipped 3 (JSON, but not records), unreadable lines 9") in output


def end(seq):
    return {"class": "end", "records": seq, "requests": 0, "dropped": 0}


def test_report_merges_files_by_worker_and_seq_and_finds_what_is_missing(tmp_path):
    rng = random.Random(8)
    files = [[], [], []]
    # "whole": 300 records, each in one to three of the files, every file in a shuffled order.
    duplicates = 0
    for seq in range(1, 301):
        line = record_line("10:00:01", RUN_A, end(seq) if seq == 300 else request("GET", "/", seq), "whole", seq=seq)
        copies = rng.sample(range(3), rng.randint(1, 3))
        duplicates += len(copies) - 1
        for n in copies:
            files[n].append(line)
    # "gappy" ended, but 7 of its records are in no file; "cut" did not end, and lacks 10 and 11.
    lost = set(rng.sample(range(1, 100), 7))
    files[0] += [record_line("10:00:02", RUN_A, end(seq) if seq == 100 else "Task started", "gappy", seq=seq)
                 for seq in range(1, 101) if seq not in lost]
    files[1] += [record_line("10:00:03", RUN_A, request("GET", "/", 1), "cut", seq=seq) for seq in range(1, 51)
                 if seq not in (10, 11)]
    files[2] += [record_line("10:00:04", RUN_A, request("GET", "/", 1), "foreign") for _ in range(5)]  # no seq
    paths = []
    for n, lines in enumerate(files):
        rng.shuffle(lines)
        paths.append(tmp_path / f"part{n}.jsonl")
        paths[-1].write_text("\n".join(lines) + "\n")

    verdict = report_json(*paths, "--require-complete", expect_code=1)
    assert not verdict["complete"] and verdict["missing"] == 9
    assert verdict["lines"]["duplicate"] == duplicates > 100
    assert {p["worker"]: [p["records"], p["missing"], p["ended"], p["unnumbered"]] for p in verdict["processes"]} == {
        "whole": [300, 0, True, 0], "gappy": [93, 7, True, 0], "cut": [48, 2, False, 0], "foreign": [5, 0, False, 5]}
    # A record counts once however many files hold it.
    assert verdict["runs"][0]["total"]["requests"] == 299 + 48 + 5
    _, output = report(*paths)
    assert ("INCOMPLETE: 9 records missing from 2 of 4 processes; 2 of 4 processes did not end cleanly, so what they "
            "made last is unknown; 5 records without seq, from 1 process, cannot be checked.") in output
    assert f"duplicates merged {duplicates}," in output
    assert re.search(r"^gappy +h-gappy +93 +7  yes$", output, re.MULTILINE)
    assert re.search(r"^foreign +h-foreign +5 +0  no: .*; 5 records without seq: not checkable$", output, re.MULTILINE)

    # Only the files that hold "whole": complete, whichever order they are read in.
    only_whole = []
    for n, lines in enumerate(files):
        only_whole.append(tmp_path / f"whole{n}.jsonl")
        only_whole[-1].write_text("".join(line + "\n" for line in lines if '"worker": "whole"' in line))
    assert_complete(*only_whole, processes=1)
    assert_complete(*reversed(only_whole), processes=1)


def test_report_of_an_empty_file_an_unknown_run_or_a_missing_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    tables, output = report(empty)
    assert run_report(empty, "--check", "p95 < 300", expect_code=1).stdout.endswith(
        "\nFAIL: no run has requests to check.\n"), "no requests pass no check"
    assert tables == {}
    assert "INCOMPLETE: no records of any process" in output
    assert "No request records and no resource samples: nothing more to report" in output
    assert not report_json(empty, "--require-complete", expect_code=1)["complete"], "an empty file proves nothing"
    # A file with no record but lines that are none (a CSV, another tool's JSON): a mistake, said in one line.
    unreadable, other = tmp_path / "stats.csv", tmp_path / "other.jsonl"
    unreadable.write_text("Type,Name\nGET,/\n")
    other.write_text('{"level": "info"}\n')
    result = run_report(unreadable, other, "--json", expect_code=1)
    assert (result.stdout, result.stderr) == ("", f"report: no records in {unreadable}, {other}: of 3 lines, 2 "
                                              f"unreadable (the first: {unreadable} line 1), 1 JSON but not records; "
                                              "expected the JSON lines that locustfile.py and sink.py write\n")
    one_run = tmp_path / "one_run.jsonl"
    one_run.write_text(record_line("10:00:00", RUN_A, request("GET", "/", 1)) + "\n")
    output = report(unreadable, one_run)[1]
    assert f"unreadable lines 2 (the first: {unreadable} line 1)" in output, "beside records, they are counted"
    missing = run_report(empty, tmp_path / "missing.jsonl", expect_code=1)
    assert missing.stdout == ""
    assert missing.stderr == f"report: cannot read {tmp_path / 'missing.jsonl'}: No such file or directory\n"
    nowhere = tmp_path / "no such folder" / "page.html"
    unwritable = run_report(one_run, "--html", nowhere, expect_code=1)
    assert unwritable.stderr == f"report: cannot write {nowhere}: No such file or directory\n"
    unknown = run_report(one_run, one_run, "--run", RUN_B, expect_code=1)
    assert unknown.stdout == ""
    assert unknown.stderr == f"report: no run {RUN_B} in {one_run}, {one_run}. Its runs: {RUN_A}\n"


def page_requests(net_log):
    """The URLs a page asked the network for, from Chromium's net log. The browser's own calls home belong to
    no page: they carry no file:// isolation key."""
    urls, from_page = {}, set()
    for event in json.loads(net_log.read_text())["events"]:
        params, source = event.get("params", {}), event["source"]["id"]
        if "url" in params:
            urls.setdefault(source, set()).add(params["url"])
        if str(params.get("network_isolation_key", "")).startswith("file://"):
            from_page.add(source)
    return set().union(*(urls[source] for source in from_page if source in urls))


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Chromium: apt-get install chromium (.ci/run does)")
def test_the_html_report_opens_offline_in_a_real_browser(tmp_path, without_accelerators):
    names = ["/", "/search?q=<b>bold</b>", "/fail"]
    lines, seqs = [], Counter()
    for second in range(6):
        for worker in ("w1", "w2"):
            for name in names:
                seqs[worker] += 1
                failed = name == "/fail"
                message = {**request("GET", name, 1 + second * 10, failed=failed), "status": 500 if failed else 200,
                           **({"exception": "LocustBadStatusCode(code=500)"} if failed else {})}
                lines.append(record_line(f"10:00:0{second}", RUN_A, message, worker=worker, seq=seqs[worker]))
            seqs[worker] += 1
            lines.append(record_line(f"10:00:0{second}", RUN_A, {"class": "resources", "cpu_percent": 10.0 * second,
                                                                  "rss_bytes": 10 ** 7, "user_count": 1},
                                     worker=worker, seq=seqs[worker]))
    lines += [record_line("10:00:06", RUN_A, end(seqs[w] + 1), worker=w, seq=seqs[w] + 1) for w in ("w1", "w2")]
    collected, page = tmp_path / "collected.jsonl", tmp_path / "report.html"
    collected.write_text("\n".join(lines) + "\n")
    assert f"HTML report: {page}" in run_report(collected, "--html", page, "--check", "requests > 10", "--check",
                                                "max < 50", expect_code=1).stdout
    net_log = tmp_path / "net_log.json"
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--log-net-log={net_log}",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=60).stdout
    assert dom.count('class="main-svg"') >= 6, "3 charts drawn by plotly, two layers each"
    # The verdict first, then completeness, then the checks, the failed one first.
    verdict = "FAIL: 1 of 2 checks failed: max &lt; 50 (Aggregated: 51.00 ms)."
    assert dom.index(verdict) < dom.index("Complete: all 50 records of 2 processes.") < dom.index(
        "max &lt; 50</td>") < dom.index("requests &gt; 10</td>")
    assert dom.count('data-unformatted="all requests"') == 2, "two charts with a menu of names"
    assert all(dom.count(f">{html.escape(name)}</td>") == 1 + (name == "/fail") for name in names)
    assert "<b>bold</b>" not in dom and "LocustBadStatusCode(code=500)" in dom
    assert not page_requests(net_log)
    # Where plotly is not installed: one line that says what to install.
    result = run_report(collected, "--html", page, expect_code=2, env=without_accelerators)
    assert result.stderr == "report: --html needs plotly, to draw its charts: pip install plotly\n"


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Chromium: apt-get install chromium (.ci/run does)")
def test_the_followed_page_is_written_again_whole_and_reloads_itself_until_the_end(tmp_path):
    collected, page = tmp_path / "collected.jsonl", tmp_path / "live.html"
    follower = subprocess.Popen([sys.executable, str(REPO / "report.py"), str(collected), "--follow", "--every", "1",
                                 "--idle", "1", "--html", str(page), "--check", "p95 < 1000"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    doms, seq = [], 0
    try:
        with open(collected, "w") as out:  # a second of records at a time, while a browser opens the page
            while len(doms) < 3:
                for _ in range(50):
                    seq += 1
                    out.write(record_line(f"10:00:{seq // 50 % 60:02d}", RUN_A, request("GET", "/", seq % 7), seq=seq)
                              + "\n")
                out.flush()
                if page.exists() and page.stat().st_size:
                    doms.append(subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                                                "--dump-dom", page.as_uri()], capture_output=True, text=True,
                                               timeout=60).stdout)
                time.sleep(0.2)
            out.write(record_line("10:01:00", RUN_A, end(seq + 1), seq=seq + 1) + "\n")
        stdout, stderr = follower.communicate(timeout=60)
    finally:
        follower.kill()
        follower.wait()
    assert follower.returncode == 0 and "HTML report: " in stdout, stdout + stderr
    for dom in doms:  # each whole: its last chart drawn, and a reload to come
        assert dom.count('class="main-svg"') >= 6 and "PASS: 1 check passed" in dom, dom[-2000:]
        assert '<meta http-equiv="refresh" content="1">' in dom
    final = page.read_text()
    assert "http-equiv" not in final and f"Complete: all {seq + 1} records of 1 process." in final


def test_progress_shows_on_a_terminal_only_while_reading_takes_more_than_a_second(tmp_path):
    collected = tmp_path / "collected.jsonl"
    line = record_line("10:00:00", RUN_A, request("GET", "/", 1.5), millisecond=0, seq=999_999).replace("999999", "%d")
    collected.write_text("".join(line % seq + "\n" for seq in range(1, 400_001)))  # ~2 s to read
    on_a_pipe = subprocess.Popen([sys.executable, str(REPO / "report.py"), str(collected)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)  # meanwhile, on the other core
    main, terminal = os.openpty()
    try:
        report = subprocess.run([sys.executable, str(REPO / "report.py"), str(collected)], stdout=subprocess.DEVNULL,
                                stderr=terminal, timeout=120)
        os.close(terminal)
        shown = b""
        while select.select([main], [], [], 0)[0]:
            try:
                shown += os.read(main, 4096)
            except OSError:  # EIO: all was read, and the terminal's other end is closed
                break
    finally:
        os.close(main)
    assert report.returncode == 0
    size = collected.stat().st_size / 1e6
    assert re.fullmatch(rb"(\rreport: read \d+ of %d MB, [\d,]+ records/s)+\r?\n" % round(size), shown), shown
    assert on_a_pipe.communicate(timeout=120) == (None, b"") and on_a_pipe.returncode == 0  # not a terminal: nothing


# --- the report decides: checks, a window, a baseline ------------------------------------------

SHOP_LOCUSTFILE = """
    import os
    import random
    import gevent
    import locustfile
    from locust import FastHttpUser, task
    from locust.exception import StopUser

    RUN = os.environ["SHOP_RUN"]  # each run its own paths
    ITEMS = f"/wait/{os.environ['ITEMS_WAIT_MS']}/{RUN}"  # 0 ms more in a baseline run, 20 ms more in a worse one
    # A search fails by chance, as a random mix of tasks would: the same chance in two runs of the same code, each
    # its own draws (a seed, so that every run of the tests draws the same).
    FAILS, CHANCE = random.Random(int(os.environ["SEARCH_SEED"])), float(os.environ["SEARCH_FAILURES"])

    class Shop(FastHttpUser):
        @task
        def fifty_rounds(self):  # one path per name and run: each waits the target's 50 steps, once each
            for _ in range(50):
                self.client.get(ITEMS, name="/items")
                self.client.get(f"/wait/0/{RUN}", name="/cart")
                self.client.get(f"/wait/30/{RUN}", name="/slow")
                with self.client.get(f"/wait/1/{RUN}", name="/pay", catch_response=True) as response:
                    response.failure("declined")
                with self.client.get(f"/wait/2/{RUN}", name="/search", catch_response=True) as response:
                    if FAILS.random() < CHANCE:
                        response.failure("no results")
            gevent.spawn(self.environment.runner.quit)  # not from this greenlet, which quitting stops
            raise StopUser()
"""


@pytest.fixture(scope="module")
def shop_runs(tmp_path_factory, target):
    """Three runs of one user, 50 rounds each, one after the other: a baseline, the same code again, and a worse
    one: /items 20 ms slower, /search failing 60% of the time, not 25%; their searches fail 10, 16 and 28 times.
    (At once, the three shared two cores, and a p95 of 50 values moved by more than 10% one time in ten.)"""
    mark, folder = uuid.uuid4().hex, tmp_path_factory.mktemp("shop")
    locustfile = write_locustfile(folder / "shop.py", SHOP_LOCUSTFILE)
    files = {}
    for run, items_wait, search_failures, seed in (("baseline", 0, 0.25, 2), ("again", 0, 0.25, 1),
                                                   ("worse", 20, 0.6, 3)):
        files[run] = folder / f"{run}.jsonl"
        result = subprocess.run(locust_command(target, "--headless", "-u", "1", "-r", "1", "-t", "60s",
                                               locustfile=locustfile),
                                cwd=folder, env=environment(mark, LOCUST_LOG_FILE=str(files[run]), SHOP_RUN=run,
                                                            ITEMS_WAIT_MS=str(items_wait), SEARCH_SEED=str(seed),
                                                            SEARCH_FAILURES=str(search_failures)),
                                capture_output=True, text=True, timeout=90)
        assert result.returncode == 0, result.stderr
    assert not tagged_processes(mark)
    return files


def checks_of(report):
    """{(rule, name): verdict} of a report's only run."""
    [run] = report["runs"]
    return {(check["rule"], check["name"]): check["verdict"] for check in run["checks"]}


@pytest.mark.xdist_group("shop_runs")  # one worker makes the three runs, once
def test_checks_pass_and_fail_per_name_on_a_real_run(tmp_path, shop_runs):
    run = shop_runs["baseline"]
    names = ["GET /cart", "GET /items", "GET /pay", "GET /search", "GET /slow"]
    passing = ["p95 < 300", "GET /slow: p50 > 30ms", "/slow: p99.9 < 2s", "each: p99 < 500", "GET /cart: failures = 0",
               "failures < 30%", "GET /pay: failures = 100%", "rps > 5", "requests >= 250", "max < 2s"]
    failing = {"GET /slow: p95 < 30": ["GET /slow"], "each: p50 < 25": ["GET /slow"], "failures < 1%": ["Aggregated"],
               "rps > 100000": ["Aggregated"], "GET /pay: failures = 0": ["GET /pay"]}
    rules = [f"--check={rule}" for rule in passing + list(failing)]
    junit, summary = tmp_path / "checks.xml", tmp_path / "checks.md"
    report = report_json(run, *rules, "--require-complete", "--junit", junit, "--markdown", summary, expect_code=1)
    def rows(rule):  # what a rule checks: the total, every name, or the one it names (with or without its type)
        scope = rule.split(": ")[0] if ": " in rule else None
        return ["Aggregated"] if scope is None else names if scope == "each" else [
            name for name in names if scope in (name, name[4:])]
    expected = {(rule, name): "fail" if name in failing.get(rule, ()) else "pass"
                for rule in passing + list(failing) for name in rows(rule)}
    assert checks_of(report) == expected and len(expected) == 23
    # The measured values are the report's exact ones: nearest rank over the raw values.
    slow = [r["message"]["response_time"] for r in requests_of(read_records(run)) if r["message"]["name"] == "/slow"]
    [p95] = [c["measured"] for c in report["runs"][0]["checks"] if c["rule"] == "GET /slow: p95 < 30"]
    assert len(slow) == 50 and p95 == nearest_rank(slow, 95) > 30
    assert report["passed"] is False
    # Passing rules alone, also with --require-complete, exit 0; the last line says why.
    result = run_report(run, *(f"--check={rule}" for rule in passing), "--require-complete", "--json")
    noisy = sum(check["within_noise"] for check in json.loads(result.stdout)["runs"][0]["checks"])
    assert noisy and json.loads(result.stdout)["decision"] == (
        f"PASS: all 14 checks passed; {noisy} checks within the noise, decided by the measured value; every record is "
        "there.")
    assert run_report(run, "--check", "GET /nowhere: p95 < 300", expect_code=2).stderr == (
        f"report: --check 'GET /nowhere: p95 < 300': run {report['runs'][0]['run_id']} has no requests named "
        f"'GET /nowhere'; its names: {', '.join(names)}\n")

    # The JUnit file as a JUnit reader reads it: one suite, the report, with the run's id as a property; a case per
    # check and row, named by the row and the rule without its name, and one for completeness. Every case says
    # what was measured, its interval and the threshold; a failure says it in its message too.
    [suite] = junitparser.JUnitXml.fromfile(str(junit))
    assert suite.name == "report.py" and {p.name: p.value for p in suite.properties()}["run_id"] == \
        report["runs"][0]["run_id"]
    cases = {(case.classname, case.name): case for case in suite}
    condition = {rule: rule.split(": ")[-1] for rule in passing + list(failing)}
    assert set(cases) == {(name, condition[rule]) for rule, name in expected} | {
        ("completeness", "every record is there")}
    assert (suite.tests, suite.failures) == (len(cases), 5) == (24, 5)
    slow_p95 = cases["GET /slow", "p95 < 30"]
    assert re.fullmatch(r"GET /slow: p95 [\d.]+ ms \(95% interval [\d.]+–… ms\), threshold < 30\.00 ms",
                        slow_p95.result[0].message) and slow_p95.system_out == slow_p95.result[0].message
    passed = cases["Aggregated", "failures < 30%"]
    assert not passed.result and re.fullmatch(r"Aggregated: failures 24\.00% \(95% interval [\d.]+–[\d.]+%\), "
                                              r"threshold < 30\.00%(: within the noise)?", passed.system_out)
    values = {(case.classname, case.name): {p.get("name"): p.get("value") for p in case._elem.iter("property")}
              for case in suite}
    assert values["Aggregated", "failures < 30%"]["measured"] == "24.0"
    assert values["GET /slow", "p95 < 30"]["measured"] == repr(p95) and values["GET /slow", "p95 < 30"]["threshold"] \
        == "30.0" and values["GET /slow", "p95 < 30"]["verdict"] == "fail"
    assert all({"measured", "threshold", "verdict"} <= set(v) for key, v in values.items() if key[0] != "completeness")
    # Another run, another build: the same suite and case names, for a CI system to follow from one to the next.
    again = tmp_path / "again.xml"
    run_report(shop_runs["again"], *rules, "--require-complete", "--junit", again, expect_code=1)
    [other] = junitparser.JUnitXml.fromfile(str(again))
    assert other.name == suite.name and [(c.classname, c.name) for c in other] == [(c.classname, c.name) for c in suite]

    # The Markdown as GitHub renders it: a short heading, the line that says why, then the checks, failures first,
    # and the names; in the file, characters as themselves where they are no markup.
    page = github_markdown(summary.read_text())
    tables = html_tables(page)
    assert page.startswith("<h2>FAIL: 5 of 23 checks failed</h2>\n<p>FAIL: 5 of 23 checks failed: GET /slow: p95 &lt; 30")
    assert [row[-1].split(",")[0] for row in tables[0][1:]] == ["FAIL"] * 5 + ["pass"] * 18
    assert [row[1] for row in tables[1][1:]] == ["/cart", "/items", "/pay", "/search", "/slow", "Aggregated"]
    assert "| p95 < 300 | Aggregated |" in summary.read_text()


def github_markdown(text):
    """The page GitHub makes of a Markdown text: its own renderer, cmark-gfm, with its tables."""
    return cmarkgfm.github_flavored_markdown_to_html(text, options=cmarkgfm.cmark.Options.CMARK_OPT_UNSAFE)


def html_tables(page):
    """Each <table> of a page as rows of cell texts, the header row first."""
    return [[[html.unescape(re.sub("<[^>]+>", "", cell)) for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)]
             for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)] for table in re.findall(r"<table>(.*?)</table>",
                                                                                             page, re.S)]


@pytest.mark.xdist_group("shop_runs")  # one worker makes the three runs, once
def test_a_baseline_flags_exactly_what_got_worse_and_the_same_code_stays_within_the_noise(tmp_path, shop_runs):
    def comparison(run, *args, expect_code=0):
        report = report_json(shop_runs[run], "--baseline", shop_runs["baseline"], *args, expect_code=expect_code)
        return report, {row["name"]: row for row in report["runs"][0]["comparison"]}

    report, same = comparison("again", "--check", "each: failures <= baseline", expect_code=1)
    for name, row in same.items():
        assert row["changed"] == [] and all(row["metrics"][m]["within_noise"] for m in
                                            ("failure_percent", "p50", "p95", "p99")), row
    # The same code, another random mix: 16 failed searches of 50 where the baseline had 10, a false alarm when
    # the measured rates decide; both within the other's noise. --noise pass lets it pass, --noise warn too, saying so.
    [search] = [check for check in report["runs"][0]["checks"] if check["name"] == "GET /search"]
    assert (search["measured"], search["threshold"], search["verdict"], search["within_noise"]) == (32, 20, "fail", True)
    assert search["interval"] == [pytest.approx(19.5, abs=0.05), pytest.approx(46.7, abs=0.05)]
    assert search["threshold_interval"] == [pytest.approx(10.0, abs=0.05), pytest.approx(33.7, abs=0.05)]
    assert report["decision"].startswith("FAIL: 1 of 5 checks failed: each: failures <= baseline (GET /search: "
                                         "32.00%); 5 checks within the noise, decided by the measured value")
    for noise, verdict in (("pass", "pass"), ("warn", "warn")):
        report = report_json(shop_runs["again"], "--baseline", shop_runs["baseline"], "--check",
                             "each: failures <= baseline", "--noise", noise)
        assert [check["verdict"] for check in report["runs"][0]["checks"] if check["name"] == "GET /search"] == [verdict]
        assert report["decision"] == f"PASS: all 5 checks passed; 5 checks within the noise, {NOISE_SAID[noise]}."
    # A worse run fails however the noise is judged: 28 failed searches of 50, and /items 20 ms slower, each beyond
    # the noise. (Not its p95: of 50 values, its 95% interval is open above, and so within any threshold's noise.)
    report, worse = comparison("worse", "--check", "each: p50 < baseline + 10%", "--check", "each: failures <= baseline",
                               "--noise", "pass", expect_code=1)
    assert {name: row["changed"] for name, row in worse.items() if row["changed"] and name != "Aggregated"} == {
        "GET /items": ["p50"], "GET /search": ["failure_percent"]}  # p95 and p99 of 50 values: open above
    assert worse["GET /items"]["metrics"]["p50"]["change"] > 100  # 20 ms on about 5 ms
    assert worse["GET /search"]["metrics"]["failure_percent"]["change"] == pytest.approx(56 - 20)  # points
    assert {(check["rule"], check["name"]): check["verdict"] for check in report["runs"][0]["checks"]
            if check["verdict"] != "pass"} == {("each: p50 < baseline + 10%", "GET /items"): "fail",
                                               ("each: failures <= baseline", "GET /search"): "fail"}
    assert report["decision"].startswith("FAIL: 2 of 10 checks failed: each: p50 < baseline + 10% (GET /items: ")
    [p95] = [check for check in report_json(shop_runs["worse"], "--baseline", shop_runs["baseline"], "--check",
                                            "GET /items: p95 < baseline + 10%", "--noise", "pass")["runs"][0]["checks"]]
    assert p95["interval"][1] is None and p95["within_noise"] and p95["verdict"] == "pass"
    report, slower = comparison("worse", "--check", "each: p95 < baseline + 10%", expect_code=1)
    check = next(c for c in report["runs"][0]["checks"] if c["name"] == "GET /items")
    base_p95 = nearest_rank([r["message"]["response_time"] for r in requests_of(read_records(shop_runs["baseline"]))
                             if r["message"]["name"] == "/items"], 95)
    assert check["threshold"] == pytest.approx(base_p95 * 1.1)
    # A baseline of two runs must say which; then it is that run.
    both = [shop_runs["baseline"], shop_runs["again"]]
    result = run_report(shop_runs["worse"], "--baseline", *both, expect_code=2)
    run_ids = [the_run_id(read_records(path)) for path in both]
    assert result.stderr == (f"report: --baseline {' '.join(map(str, both))} holds 2 runs with requests "
                             f"({', '.join(run_ids)}): choose one with --baseline-run RUN_ID\n")
    chosen = report_json(shop_runs["worse"], "--baseline", *both, "--baseline-run", run_ids[0])
    assert chosen["baseline"]["run_id"] == run_ids[0]
    assert chosen["runs"][0]["comparison"] == report["runs"][0]["comparison"]
    text = run_report(shop_runs["worse"], "--baseline", shop_runs["baseline"]).stdout
    assert re.search(r"^ +change .* beyond the noise: p50$", text, re.M)
    assert re.search(r"^ +change .* beyond the noise: failures$", text, re.M)
    # A name the baseline lacks is not checked against it: not a failure, a skipped case for JUnit.
    without_pay, junit = tmp_path / "without-pay.jsonl", tmp_path / "checks.xml"
    without_pay.write_text("".join(line for line in shop_runs["baseline"].open() if '"name":"/pay"' not in line))
    text = run_report(shop_runs["worse"], "--baseline", without_pay, "--check", "each: p50 < baseline + 1000%",
                      "--junit", junit).stdout
    assert text.splitlines()[-1] == "PASS: 4 of 5 checks passed; names the baseline lacks were not checked."
    [suite] = junitparser.JUnitXml.fromfile(str(junit))
    assert (suite.tests, suite.failures, suite.skipped) == (5, 0, 1)
    [skipped] = [case.result[0] for case in suite if case.result]
    assert isinstance(skipped, junitparser.Skipped) and skipped.message == "the baseline has no requests named GET /pay"


def test_a_verdict_is_exact_at_its_threshold_and_the_noise_is_judged_as_asked(tmp_path):
    # This run: 1, 2, ... 10 ms: p50 5 ms, its 95% interval from the 2nd to the 9th value, 2 to 9 ms. The baseline:
    # 1, 9, 20, 21, ... 27 ms: p50 22 ms, its interval 9 to 26 ms, which touches this run's at 9 ms.
    this, baseline, empty = tmp_path / "this.jsonl", tmp_path / "baseline.jsonl", tmp_path / "empty.jsonl"
    for path, run_id, times in ((this, RUN_A, range(1, 11)), (baseline, RUN_B, [1, 9, *range(20, 28)])):
        path.write_text("".join(record_line("10:00:00", run_id, request("GET", "/t", float(ms))) + "\n"
                                for ms in random.sample(list(times), 10)))
    empty.write_text("")
    rules = {"p50 <= 5": "pass", "p50 < 5": "fail", "p50 >= 5": "pass", "p50 > 5": "fail", "p50 = 5": "pass",
             "p50 > baseline - 80%": "pass", "p50 < baseline - 80%": "fail", "p50 < baseline + 10%": "pass",
             "p50 < 9": "pass", "p50 < 9.5": "pass"}
    report = report_json(this, "--baseline", baseline, *(f"--check={rule}" for rule in rules), expect_code=1)
    checks = {check["rule"]: check for check in report["runs"][0]["checks"]}
    assert {rule: check["verdict"] for rule, check in checks.items()} == rules
    assert checks["p50 > baseline - 80%"]["threshold"] == pytest.approx(22 * 0.2)
    assert checks["p50 < baseline + 10%"]["threshold"] == pytest.approx(22 * 1.1)
    assert checks["p50 < baseline + 10%"]["threshold_interval"] == [pytest.approx(9 * 1.1), pytest.approx(26 * 1.1)]
    # Within the noise: the interval reaches the threshold (9 ms, one of its ends); not so for 9.5 ms, nor the
    # baseline's interval times 1.1 (9.9 to 28.6 ms), where times 0.2 (1.8 to 5.2 ms) overlaps it. The two runs'
    # intervals, which share one value, overlap: their p50s differ within the noise.
    assert {rule for rule, check in checks.items() if not check["within_noise"]} == {"p50 < 9.5",
                                                                                     "p50 < baseline + 10%"}
    [row, _] = report["runs"][0]["comparison"]
    assert row["metrics"]["p50"]["intervals"] == [[2, 9], [9, 26]] and row["metrics"]["p50"]["within_noise"]
    assert row["changed"] == []
    for noise, verdict in (("measured", "pass"), ("pass", "pass"), ("warn", "warn"), ("fail", "fail")):
        junit = tmp_path / f"{noise}.xml"
        judged = report_json(this, "--check", "p50 < 9", "--check", "p50 < 9.5", "--noise", noise, "--junit", junit,
                             expect_code=1 if verdict == "fail" else 0)
        assert [check["verdict"] for check in judged["runs"][0]["checks"]] == [verdict, "pass"]
        assert judged["decision"] == (("FAIL: 1 of 2 checks failed: p50 < 9 (Aggregated: 5.00 ms)" if verdict == "fail"
                                       else "PASS: all 2 checks passed") + f"; 1 check within the noise, "
                                                                            f"{NOISE_SAID[noise]}.")
        [suite] = junitparser.JUnitXml.fromfile(str(junit))
        noisy = next(case for case in suite if case.name == "p50 < 9")
        assert bool(noisy.result) == (verdict == "fail") and noisy.system_out == (
            ("WARNING: " if verdict == "warn" else "") + "Aggregated: p50 5.00 ms (95% interval 2.00–9.00 ms), "
            "threshold < 9.00 ms: within the noise")
    # No run to check: each rule fails, as the case it is in a run.
    junit = tmp_path / "none.xml"
    run_report(empty, "--check", "GET /t: p50 < 9", "--check", "p50 < 9", "--junit", junit, expect_code=1)
    [suite] = junitparser.JUnitXml.fromfile(str(junit))
    assert [(case.classname, case.name, case.result[0].message) for case in suite] == [
        ("GET /t", "p50 < 9", "no run has requests to check"), ("Aggregated", "p50 < 9", "no run has requests to check")]


def test_a_window_leaves_out_each_runs_first_and_last_seconds_exactly(tmp_path):
    # Run A: a request every 250 ms from 10:00:00.000 to 10:00:09.750, taking 1, 2, ... 40 ms; run B: one a second.
    lines, seq = [], 0
    for i in range(40):
        seq += 1
        second, millisecond = divmod(i * 250, 1000)
        name = "/a" if i % 2 else "/b|<b>"  # a name that would be Markdown if it were not escaped
        lines.append(record_line(f"10:00:0{second}", RUN_A, request("GET", name, i + 1.0), millisecond=millisecond,
                                 seq=seq))
    for second, cpu in ((1, 99.0), (5, 50.0)):
        seq += 1
        lines.append(record_line(f"10:00:0{second}", RUN_A, {"class": "resources", "cpu_percent": cpu,
                                                              "rss_bytes": 1e7, "user_count": 1}, seq=seq))
    for second in range(5):
        seq += 1
        lines.append(record_line(f"11:00:0{second}", RUN_B, request("GET", "/a", 100.0 + second), millisecond=0,
                                 seq=seq))
    lines.append(record_line("11:00:05", RUN_B, end(seq + 1), seq=seq + 1))
    collected, timeline, summary = tmp_path / "collected.jsonl", tmp_path / "timeline.csv", tmp_path / "summary.md"
    collected.write_text("\n".join(lines) + "\n")
    window = ["--skip-first", "2s", "--skip-last", "1500ms"]

    junit = tmp_path / "checks.xml"
    report = report_json(collected, *window, "--require-complete", "--check", "requests = 26", "--check", "p50 = 21",
                         "--timeline", timeline, "--markdown", summary, "--junit", junit, expect_code=1)  # B fails
    assert report["complete"] and not report["passed"] and report["lines"]["outside_window"] == 14 + 1 + 4
    run_a, run_b = report["runs"]
    # Two runs, two suites, named by their order and each with its run's id.
    suites = list(junitparser.JUnitXml.fromfile(str(junit)))
    assert [(suite.name, {p.name: p.value for p in suite.properties()}["run_id"], suite.failures) for suite in suites] \
        == [("report.py run 1", RUN_A, 0), ("report.py run 2", RUN_B, 2)]
    assert [(case.classname, case.name) for case in suites[0]] == [("Aggregated", "requests = 26"),
                                                                  ("Aggregated", "p50 = 21"),
                                                                  ("completeness", "every record is there")]
    # Kept: the requests that ended from 10:00:02.000 to 10:00:08.250, both included: i = 8 ... 33, 9 ... 34 ms.
    assert run_a["window"] == {"from": "2026-11-28T10:00:02.000Z", "to": "2026-11-28T10:00:08.250Z",
                               "run_first_end": "2026-11-28T10:00:00.000Z",
                               "run_last_end": "2026-11-28T10:00:09.750Z", "requests_outside": 14}
    total = run_a["total"]
    assert [total[key] for key in ("requests", "p50", "p90", "p95", "p99", "max")] == [26, 21, 32, 33, 34, 34]
    assert {row["name"]: row["requests"] for row in run_a["names"]} == {"/a": 13, "/b|<b>": 13}
    assert [w["peak_cpu_percent"] for w in run_a["workers"]] == [50.0], "the sample at 10:00:01 is outside"
    assert run_b["window"]["requests_outside"] == 4 and run_b["total"]["requests"] == 1 and run_b["total"]["max"] == 102
    assert [c["verdict"] for c in run_a["checks"]] == ["pass", "pass"]
    assert [c["verdict"] for c in run_b["checks"]] == ["fail", "fail"]  # 1 request, of 102 ms
    rows = [row for row in csv.DictReader(timeline.open()) if row["run_id"] == RUN_A]
    assert [row["second"][11:19] for row in rows] == [f"10:00:0{n}" for n in range(2, 9)]
    assert sum(int(row["requests"]) for row in rows) == 26
    # The Markdown, rendered: the window is said, and the name with | and <b> stays one cell of text.
    page = github_markdown(summary.read_text())
    assert "Window: requests that ended from 2026-11-28T10:00:02.000Z to 2026-11-28T10:00:08.250Z" in page
    names_table = html_tables(page)[1]
    assert all(len(row) == 10 for row in names_table) and names_table[2][:3] == ["GET", "/b|<b>", "13"]
    text = run_report(collected, *window, "--require-complete").stdout
    assert "Complete: all 48 records of 1 process." in text and "records outside the window 19" in text
    assert ("Window: requests that ended from 2026-11-28T10:00:02.000Z to 2026-11-28T10:00:08.250Z, of the run's, "
            "which ended from 2026-11-28T10:00:00.000Z to 2026-11-28T10:00:09.750Z; 14 left out") in text


def test_a_percentiles_95_percent_interval_holds_the_true_one_in_at_least_95_percent_of_samples(tmp_path):
    # Coverage: 2000 random samples of 10 to 100 values, each its own run of one file, from an exponential
    # distribution (mean 10 ms), half of them rounded up to whole ms (ties); the true percentiles are known.
    rng, samples = random.Random(7), tmp_path / "samples.jsonl"
    truth = {}
    with samples.open("w") as out:
        for r in range(2000):
            run_id, whole_ms = f"sample-{r}", r % 2
            truth[run_id] = {p: (math.ceil if whole_ms else float)(-10 * math.log(1 - p / 100))
                             for p in (50, 90, 95, 99)}
            for _ in range((10, 30, 60, 100)[r // 2 % 4]):
                value = rng.expovariate(0.1)
                out.write(record_line("10:00:00", run_id, request("GET", "/", float(math.ceil(value)) if whole_ms
                                                                  else value), millisecond=0) + "\n")
    held = Counter()
    for run in report_json(samples)["runs"]:
        for p, true in truth[run["run_id"]].items():
            low, high = run["names"][0]["intervals"][f"p{p}"]
            held[p] += (low is None or low <= true) and (high is None or true <= high)
    assert all(held[p] / 2000 >= 0.95 for p in (50, 90, 95, 99)), held

    # Hand-checkable ranks: of 1..10, the median lies between the 2nd and 9th values (each binomial tail 11/1024);
    # the 90th percentile above the 7th (a tail of 0.013), with no upper bound from 10 values (0.9^10 = 0.35 is
    # more than 0.025). Of 1..100, the median's classic ranks 40 and 61.
    small = tmp_path / "small.jsonl"
    small.write_text("".join(record_line("10:00:00", RUN_A, request("GET", "/ten", float(v))) + "\n"
                             for v in random.sample(range(1, 11), 10))
                     + "".join(record_line("11:00:00", RUN_B, request("GET", "/hundred", float(v))) + "\n"
                               for v in random.sample(range(1, 101), 100)))
    ten, hundred = (run["names"][0]["intervals"] for run in report_json(small, "--check", "p99.9 > 0")["runs"])
    # No failure in n requests: the rate is below 1 - 0.025^(1/n) with 95% confidence (the binomial tail at 0).
    assert ten.pop("failure_percent") == [0, pytest.approx(100 * (1 - 0.025 ** (1 / 10)))]
    assert hundred.pop("failure_percent") == [0, pytest.approx(100 * (1 - 0.025 ** (1 / 100)))]
    assert ten == {"p50": [2, 9], "p90": [7, None], "p95": [8, None], "p99": [9, None], "p99.9": [10, None]}
    assert hundred == {"p50": [40, 61], "p90": [84, 96], "p95": [90, 100], "p99": [97, None], "p99.9": [99, None]}

    # A failure rate's interval, of each count of failures in 20 requests: for any true rate, the runs whose
    # interval holds it have at least 95% of the probability, exactly (near 0%, Wilson's had 85%).
    rates = tmp_path / "rates.jsonl"
    rates.write_text("".join(record_line("10:00:00", f"failed-{k}", request("GET", "/", 1.0, failed=i < k)) + "\n"
                             for k in range(21) for i in range(20)))
    intervals = {int(run["run_id"][7:]): run["total"]["intervals"]["failure_percent"]
                 for run in report_json(rates)["runs"]}
    assert intervals[0][0] == 0 and intervals[20][1] == 100 and intervals[10] == [pytest.approx(27.2, abs=0.05),
                                                                                   pytest.approx(72.8, abs=0.05)]
    for rate in [p / 1000 for p in range(1, 1000)]:
        held = sum(math.comb(20, k) * rate ** k * (1 - rate) ** (20 - k)
                   for k, (low, high) in intervals.items() if low <= 100 * rate <= high)
        assert held >= 0.95, (rate, held)


NOISE_SAID = {"measured": "decided by the measured value", "pass": "passed (--noise pass)",
              "warn": "passed with a warning (--noise warn)", "fail": "failed (--noise fail)"}

BAD_COMMANDS = {
    ("--check", "p95 << 300"): "--check 'p95 << 300': bad value '< 300': expected a number (ms, s, % where they "
                               "fit) or baseline, baseline + N%, baseline - N%",
    ("--check", "p95 < 300 parsecs"): "--check 'p95 < 300 parsecs': bad value '300 parsecs': expected a number (ms, "
                                      "s, % where they fit) or baseline, baseline + N%, baseline - N%",
    ("--check", "latency < 300"): "--check 'latency < 300': unknown metric 'latency': expected requests, failures, "
                                  "rps, max or a percentile (p50, p95, p99.9, ...)",
    ("--check", "p100 < 300"): "--check 'p100 < 300': unknown metric 'p100': expected requests, failures, rps, max "
                               "or a percentile (p50, p95, p99.9, ...)",
    ("--check", "p95 < 5%"): "--check 'p95 < 5%': p95 takes a bare number or ms or s, not %",
    ("--check", "rps > 5ms"): "--check 'rps > 5ms': rps takes a bare number, not ms",
    ("--check", "failures < 2s"): "--check 'failures < 2s': failures takes a bare number or %, not s",
    ("--check", "each p95 < 300"): "--check 'each p95 < 300': expected [NAME:] METRIC OP VALUE, as 'p95 < 300ms' or "
                                   "'each: failures < 1%'",
    ("--check", ""): "--check '': expected [NAME:] METRIC OP VALUE, as 'p95 < 300ms' or 'each: failures < 1%'",
    ("--check", "p95 < baseline + 10"): "--check 'p95 < baseline + 10': bad value 'baseline + 10': expected a number "
                                        "(ms, s, % where they fit) or baseline, baseline + N%, baseline - N%",
    ("--check", "p95 < baseline + 10%"): "--check 'p95 < baseline + 10%': refers to a baseline: give its files with "
                                         "--baseline FILE...",
    ("--skip-first", "ten"): "--skip-first 'ten': expected a duration, as 30s, 500ms or 2m",
    ("--skip-last=-5s",): "--skip-last '-5s': expected a duration, as 30s, 500ms or 2m",
    ("--baseline-run", "R"): "--baseline-run: names a run of the baseline: give its files with --baseline FILE...",
    ("--follow", "--every", "0"): "--every '0': expected seconds, above 0",
    ("--follow", "--window", "-1"): "--window '-1': expected seconds, above 0",
    ("--follow", "--idle", "soon"): "--idle 'soon': expected seconds, 0 or more",
}


def follow_report(*args):
    """report.py --follow, off a terminal, its final report as JSON."""
    return subprocess.Popen([sys.executable, str(REPO / "report.py"), *map(str, args), "--follow", "--every", "0.5",
                             "--idle", "2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def followed(follower):
    """The live lines and the final report of report.py --follow, once it has ended by itself."""
    stdout, stderr = follower.communicate(timeout=90)
    assert "Traceback" not in stderr and stdout.endswith("}\n"), stdout + stderr
    *live, final = stdout.splitlines()
    assert all(line.startswith("report: ") or not line for line in live), live
    return [line for line in live if line], json.loads(final)


def test_the_report_follows_a_run_from_before_it_starts_and_ends_with_the_report_it_would_print_after(
        tmp_path, tag, target, sinks):
    assert run_report("--follow", expect_code=2).stderr == ("report: no FILE to read: give the collected files, as in "
                                                            "report.py requests.jsonl\n")
    log_file, checks = tmp_path / "sink.jsonl", ["--check", "failures < 1%", "--check", "p99 < 10s"]
    follower = follow_report(log_file, *checks)  # before the sink makes the file
    try:
        sink = sinks(log_file=log_file)
        code, stderr, stats = run_locust(tmp_path, tag, target, *two_processes(), settings={
            "ZMQ_SINK_ADDRESS": sink.address})
        assert code == 0, stderr
        live, final = followed(follower)
    finally:
        follower.kill()
        follower.wait()
    sink.stop()
    assert follower.returncode == 1, "the example user's failures fail the first check"
    # A line per interval, as the requests come: counts that grow, the failed check shown while processes run.
    counts = [int(match[1]) for match in map(re.compile(r"run \S+: (\d+) requests").search, live) if match]
    assert len(set(counts)) >= 3 and counts == sorted(counts), live
    running = [line for line in live if line.endswith("; checks: 1 FAIL, 1 pass") and int.__gt__(
        *map(int, re.search(r" (\d+) process(?:es)?, (\d+) ended", line).groups()))]
    assert running, live
    assert re.search(r" 3 processes, 3 ended, 0 records missing so far", live[-1]), live
    assert final == report_json(log_file, *checks, expect_code=1)
    assert report_counts_of(final["runs"][0]) == locust_counts(stats) and final["complete"]


def test_the_report_follows_a_file_that_a_killed_sink_left_torn_and_its_next_one_cut(tmp_path, tag, target, sinks):
    sink = sinks()
    follower = follow_report(sink.log_file)
    locust = full_speed_locust(tmp_path, tag, target, sink.address, *two_processes())
    try:
        wait_for_full_speed(sink)
        kill_frozen(sink)
        with open(sink.log_file, "ab") as torn:  # what a sink killed in a write leaves, whatever this one left
            torn.write(b'{"time":"2026-12-04T19:0')
        time.sleep(1)  # the follower sees the torn line
        restarted = sinks(address=sink.address, log_file=sink.log_file)
    finally:
        stderr = finish(locust)
    try:
        live, final = followed(follower)
    finally:
        follower.kill()
        follower.wait()
    restarted.stop()
    assert "cut its incomplete last line" in restarted.stderr()
    assert all(", 0 unreadable;" in line for line in live) and final["lines"]["unreadable"] == 0, live
    assert_nothing_lost(sink.log_file, stderr, tmp_path, tag, processes=3)
    assert final == report_json(sink.log_file)


def test_on_a_terminal_the_follower_redraws_one_screen_in_place_that_fits_it(tmp_path):
    names = [f"/items/{n}" for n in range(40)]  # more than fit: the busiest first, then the total
    lines = [record_line(f"10:00:{n % 60:02d}", RUN_A, request("GET", name, 1 + n), seq=n + 1)
             for n, name in enumerate(names * 3)]
    lines.append(record_line("10:01:00", RUN_A, {"class": "end", "records": 121}, seq=121))
    (tmp_path / "run.jsonl").write_text("\n".join(lines) + "\n")
    pid, terminal = pty.fork()
    if pid == 0:  # the child: report.py on a terminal of 90 columns and 20 lines
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 20, 90, 0, 0))
        os.execv(sys.executable, [sys.executable, str(REPO / "report.py"), str(tmp_path / "run.jsonl"), "--follow",
                                  "--idle", "0", "--check", "p95 < 1"])
    said = b""
    try:
        while select.select([terminal], [], [], 30)[0]:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # the child ended
                break
            if not chunk:
                break
            said += chunk
    finally:
        os.waitpid(pid, 0)
    screen = said.decode().split("\x1b[H", 1)[1].split("\x1b[J", 1)[0]
    rows = [row.removesuffix("\x1b[K") for row in screen.replace("\r\n", "\n").split("\n")[:-1]]
    assert 10 < len(rows) <= 19 and all(len(row) <= 90 for row in rows), rows
    assert rows[0].startswith("report.py --follow: ") and "1 process, 1 ended, 0 records missing so far" in rows[0]
    shown_names = [row.split()[1] for row in rows if row.startswith("GET ")]
    assert len(set(shown_names)) == len(shown_names) >= 5, rows
    assert any(row.strip().startswith("Aggregated") for row in rows) and any("FAIL" in row for row in rows), rows
    assert "FAIL: 1 of 1 check failed" in said.decode()


@pytest.mark.parametrize("args", BAD_COMMANDS, ids=[" ".join(args) for args in BAD_COMMANDS])
def test_every_bad_rule_is_one_line_and_exit_2_before_any_reading(tmp_path, args):
    # The file does not exist: reading it would exit 1 with "cannot read".
    result = run_report(tmp_path / "not-read.jsonl", *args, expect_code=2)
    assert (result.stdout, result.stderr) == ("", f"report: {BAD_COMMANDS[args]}\n")
