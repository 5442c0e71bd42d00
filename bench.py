"""
Benchmark: what logging every request costs a Locust process, and how fast one sink writes.

    python bench.py                 # about 40 minutes on a 2-core machine; --rounds N for more repeats

Everything runs on 127.0.0.1 and is started and stopped here:

1. Hook cost. One saturated Locust process (FastHttpUser, 10 users, no wait) against a minimal HTTP
   target, in turns inside each run: no hooks; Locust's own CsvRequestLogger; this project's locustfile
   with a local file and a running sink. Each run measures its own CPU time (all threads, so libzmq's I/O
   thread counts) and requests over a steady window after warm-up. The same runs again with CURVE on.
2. Sink ceiling. Two pusher processes send realistic records as our handler does (frames of records
   separated by line breaks) to sink.py (also with CURVE), to two sink.py side by side (one a core), and to a
   bare PULL loop that only counts them. Every line the sinks wrote is then parsed with json.loads. Target:
   100 times the request rate of one saturated Locust process from part 1.
3. Memory. The sink's RSS while it writes; a Locust process's RSS while its sink is down and its queue fills.
4. Report. `report.py --timeline` on a collected file of 2 million records: time and peak RSS, with and
   without simdjson, merging the file with itself (every record twice), with --html, and deciding (a window,
   three checks, then also the file itself as its baseline); --html over one hour of 50 names, and how long
   headless Chromium (if installed) takes to open that page.
5. Restart. A sink started on that file: the time to its first acknowledgement, without and with its index.
6. Many load generators: 50, 200 and 1000 of the locustfile's own push handlers against one sink on one core.
7. Following. `report.py --follow` (off a terminal, every 2 s) on a file that grows at 100,000 records a
   second: from a line's write to the view that counts it. And --follow against the plain report on a
   collected file of 2 million records.

    python bench.py --start-and-scale   # only parts 5 and 6
    python bench.py --follow            # only part 7
    python bench.py --against COMMIT --rounds 0 --sink-rounds 6   # one sink and the plain report, old and new
"""

import argparse
import json
import math
import os
import random
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import shutil
import tempfile
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil
import zmq
import zmq.auth

REPO = Path(__file__).resolve().parent
# Part 1: each Locust run ignores WARMUP seconds, then turns the variants on in turn for SLICE seconds
# each, for WINDOW seconds. On this VM the same CPU-bound loop takes up to 40% longer from one second to
# the next, and whole runs differ by ±12% in CPU per request whatever they run; so variants are compared
# inside one process, in slices shorter than that drift, not across runs. Two identical variants measured
# this way differ by up to 3.5% in a run.
WARMUP, SLICE, WINDOW = 2.0, 0.25, 48.0
# Measured processes get core 0 to themselves and their helpers share the other one.
MEASURED_CORE, HELPER_CORE = {0}, {os.cpu_count() - 1}
# A saturated worker's handler sends ~150 records a frame (its queue every 50 ms); 200 is close to that.
PUSHERS, RECORDS_PER_PUSHER, RECORDS_PER_FRAME = 2, 500_000, 200
REPORT_RECORDS = 2_000_000
HOUR_RECORDS = 1_800_000  # one hour of 50 names at 500 requests a second, for --html
SCALE = [(50, 500), (200, 250), (1000, 50)]  # part 6: load generators x records a second each
VARIANTS = ["no hooks", "CsvRequestLogger", "this project", "this project, json module"]

MEASURED_LOCUSTFILE = """
import json, os, resource, sys, time
import gevent
from locust import FastHttpUser, constant, events, task
from locust.contrib.csv_request_logger import CsvRequestLogger

sys.path.insert(0, {repo!r})
import locustfile  # this project's hooks, registered in events.init like any user's

if os.environ.get("BENCH_RESULT"):  # unset: only this project's hooks run, as in any locustfile
    csv_logger = CsvRequestLogger(os.environ["BENCH_CSV"])
    events.init.add_listener(lambda environment, **kwargs: csv_logger.register(environment))
    events.test_start.add_listener(lambda environment, **kwargs: gevent.spawn(measure_in_slices, environment))

with_orjson = locustfile.dumps
with_json_module = lambda value: locustfile.json_encoder.encode(value).encode()


def measure_in_slices(environment):
    listeners = {{"no hooks": None, "CsvRequestLogger": csv_logger._on_request,
                  "this project": locustfile.request_log.on_request,
                  "this project, json module": locustfile.request_log.on_request}}
    request = environment.events.request
    for registered in (csv_logger._on_request, locustfile.request_log.on_request):
        request.remove_listener(registered)
    active = [None]

    def switch_to(variant):
        if active[0] is not None:
            request.remove_listener(active[0])
        active[0] = listeners[variant]
        if active[0] is not None:
            request.add_listener(active[0])
        locustfile.dumps = with_json_module if variant.endswith("json module") else with_orjson

    def sample():
        usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread: libzmq's I/O thread counts
        return usage.ru_utime + usage.ru_stime, environment.stats.total.num_requests, time.monotonic()

    switch_to("no hooks")
    gevent.sleep({warmup})
    cycles = []  # per cycle, {{variant: [cpu seconds, requests, seconds]}}
    variants = list(listeners)
    for cycle in range(int({window} / ({slice} * len(variants)))):
        cycles.append({{}})
        shift = cycle % len(variants)  # rotate, so no variant always follows the same one
        for variant in variants[shift:] + variants[:shift]:
            switch_to(variant)
            start = sample()
            gevent.sleep({slice})
            locustfile.request_log.write_pending()  # this slice's requests are encoded in this slice
            cycles[-1][variant] = [e - s for e, s in zip(sample(), start)]
    switch_to("no hooks")
    with open(os.environ["BENCH_RESULT"], "w") as result:
        json.dump(cycles, result)


class BenchUser(FastHttpUser):
    wait_time = constant(0)

    @task
    def index(self):
        self.client.get("/")
"""


def on_core(cores):
    return lambda: os.sched_setaffinity(0, cores)


# --- helper processes (this script runs itself in these roles) ---------------------------------

def serve(port):
    """The smallest keep-alive HTTP server: every request head gets the same 200, so Locust is the bottleneck."""
    from gevent.server import StreamServer

    response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

    def handle(sock, _address):
        pending = b""
        try:
            while data := sock.recv(65536):
                pending += data
                while b"\r\n\r\n" in pending:
                    _head, pending = pending.split(b"\r\n\r\n", 1)
                    sock.sendall(response)
        except ConnectionResetError:
            pass  # Locust ends its connections abruptly when it quits

    StreamServer(("127.0.0.1", int(port)), handle).serve_forever()


def sample_messages(records, worker):
    """Messages as the locustfile sends them: [b"<first seq> <worker>", frame], the records shaped like its
    own (compact JSON, varying values), made before the clock starts."""
    now, head = time.time(), time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time()))
    line = ('{"time":"%s.%%03dZ","loglevel":"INFO","hostname":"loadgen-1","worker":"%s",'
            '"run_id":"20261128T161020Z-9c1e04d2","seq":%%d,"message":{"class":"request","request_type":"GET",'
            '"name":"/","result":"success","response_time":%%r,"response_length":5,"start_time":%%r,'
            '"url":"http://127.0.0.1:8000/","other":{}}}' % (head, worker)).encode()
    return [[b"%d %s" % (first, worker.encode()),
             b"\n".join(line % (seq % 1000, seq, 1.5 + seq % 997 / 997, now + seq / 1000)
                        for seq in range(first, first + RECORDS_PER_FRAME))]
            for first in range(1, records + 1, RECORDS_PER_FRAME)]


def push(addresses, records, numbered, keys=None):
    """Send `records` as fast as ZeroMQ takes them; numbered, also count the acknowledgements that come back."""
    worker = f"loadgen-1_{os.getpid():032x}"
    messages = sample_messages(int(records), worker)
    with zmq.Context() as context, context.socket(zmq.PUSH) as pusher, context.socket(zmq.SUB) as acks:
        acks.rcvhwm = 0  # keep every acknowledgement until counted
        acks.subscribe(worker.encode())
        for socket_ in (pusher, acks) if keys else ():  # encrypt as a load generator does
            socket_.curve_serverkey = zmq.auth.load_certificate(Path(keys) / "sink.key")[0]
            socket_.curve_publickey, socket_.curve_secretkey = zmq.auth.load_certificate(
                Path(keys) / "loadgen.key_secret")
        for address in addresses.split(","):
            pusher.connect(address)
            acks.connect(f"{address.rsplit(':', 1)[0]}:{int(address.rsplit(':', 1)[1]) + 1}")
        print("ready", flush=True)  # the subscriptions reach the sinks meanwhile
        sys.stdin.readline()  # all pushers start together, none still making its messages
        for message in messages:
            if numbered == "numbered":
                pusher.send_multipart(message)
            else:
                pusher.send(message[1])
        acknowledged, deadline = 0, time.monotonic() + 60
        while numbered == "numbered" and acknowledged < int(records) and time.monotonic() < deadline:
            if acks.poll(1000):
                acknowledged += sum(map(int, acks.recv_multipart()[1].split()[1::2]))
        print(json.dumps({"acknowledged": acknowledged}), flush=True)
        pusher.close(linger=-1)


def bare_pull(address, expected):
    """A PULL loop that only counts records: the ceiling for any sink written in Python with pyzmq."""
    with zmq.Context() as context, context.socket(zmq.PULL) as pull:
        pull.bind(address)
        print("ready", flush=True)
        received, first = 0, None
        while received < int(expected):
            received += pull.recv().count(b"\n") + 1
            first = first or time.monotonic()
        print(json.dumps({"records": received, "seconds": time.monotonic() - first}), flush=True)


def load_generators(address, count, rate, seconds, tag="sim"):
    """`count` load generators in this process, each the locustfile's own ZmqPushHandler with its own worker id
    and sockets, each making `rate` records a second for `seconds`, then closing as a quitting Locust process
    does. Prints one JSON line: the totals of their counters, how many warned that their queue was half full,
    and each one's records made and dropped. Tests and part 6 judge the handler users run, not a copy."""
    from gevent import monkey

    monkey.patch_all()  # as Locust does: the handler's greenlets and non-blocking sends are what is measured
    import gevent
    import logging

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # each generator holds its own sockets
    os.environ["ZMQ_SINK_ADDRESS"] = address
    sys.path.insert(0, str(REPO))
    import locustfile

    warnings = []
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger().handlers[0].addFilter(lambda record: warnings.append(record.getMessage()) or True)
    count, rate, seconds = int(count), float(rate), float(seconds)
    queue = int(os.environ.get("ZMQ_SINK_QUEUE", "100000"))
    flush = float(os.environ.get("ZMQ_SINK_FLUSH_TIMEOUT", "2"))
    ack_times = []

    class Measured(locustfile.ZmqPushHandler):
        def _measure(self, seconds):  # every acknowledgement time the handler itself measures
            ack_times.append(round(seconds, 4))
            super()._measure(seconds)

    handlers, lines = [], []
    for n in range(count):
        worker = f"{tag}-{n}_{os.getpid()}_{random.getrandbits(64):016x}"
        handlers.append(Measured([address], worker, queue, flush))
        lines.append(b'{"time":"2026-12-01T10:00:00.000Z","loglevel":"INFO","hostname":"%s","worker":"%s",'
                     b'"run_id":null,"seq":%%d,"message":{"class":"request","request_type":"GET","name":"/",'
                     b'"result":"success","status":200,"response_time":1.5,"response_length":5,'
                     b'"start_time":1795882235.585,"url":"http://127.0.0.1:8089/","other":{}}}'
                     % (tag.encode(), worker.encode()))
    made = [0] * count
    print("ready", flush=True)
    started = time.monotonic()
    while (now := time.monotonic()) < started + seconds:
        for n, handler in enumerate(handlers):  # each generator's records so far, in batches as RequestLog's
            due = int((now - started) * rate) - made[n]
            if due > 0:
                handler.write_lines([lines[n] % seq for seq in range(made[n] + 1, made[n] + due + 1)], made[n] + 1)
                made[n] += due
        gevent.sleep(0.05)
    gevent.joinall([gevent.spawn(handler.close) for handler in handlers])
    totals = {key: sum(getattr(h, key) for h in handlers) for key in ("made", "acked", "dropped", "sent", "resent")}
    totals["warned"] = sum("over half of ZMQ_SINK_QUEUE" in warning for warning in warnings)
    totals["workers"] = {h.worker.decode(): [h.made, h.dropped] for h in handlers}
    totals["ack_times"] = ack_times
    print(json.dumps(totals), flush=True)


# --- part 1: hook cost -------------------------------------------------------------------------

def free_port():
    """A free port on 127.0.0.1 whose next one is free too: a sink acknowledges there."""
    while True:
        with socket.socket() as s, socket.socket() as next_one:
            s.bind(("127.0.0.1", 0))
            try:
                next_one.bind(("127.0.0.1", s.getsockname()[1] + 1))
                return s.getsockname()[1]
            except OSError:
                pass


def locust(workdir, host, env, seconds, **popen):
    locustfile = workdir / "bench_locustfile.py"
    locustfile.write_text(MEASURED_LOCUSTFILE.format(repo=str(REPO), warmup=WARMUP, slice=SLICE, window=WINDOW))
    return subprocess.Popen([sys.executable, "-m", "locust", "-f", str(locustfile), "-H", host, "--headless",
                             "-u", "10", "-r", "10", "-t", f"{seconds:.0f}s", "--only-summary"],
                            cwd=workdir, env=env, stdout=subprocess.DEVNULL, preexec_fn=on_core(MEASURED_CORE), **popen)


def curve_settings(keys):
    """The sink's flags and the load generator's environment for CURVE with the keys in the folder."""
    return (["--curve-secret", str(keys / "sink.key_secret"), "--curve-clients", str(keys / "clients")],
            {"ZMQ_SINK_CURVE_PUBLIC": str(keys / "sink.key"), "LOCUST_CURVE_SECRET": str(keys / "loadgen.key_secret")})


def hook_cost(workdir, host, rounds, keys=None):
    """Every cycle of every run: {variant: [cpu seconds, requests, seconds]} of that variant's slice."""
    sink_flags, curve_env = curve_settings(keys) if keys else ([], {})
    sink_address = f"tcp://127.0.0.1:{free_port()}"
    sink = subprocess.Popen([sys.executable, str(REPO / "sink.py"), "--bind", sink_address,
                             "--log-file", str(workdir / "hook-sink.jsonl"), *sink_flags], stderr=subprocess.DEVNULL,
                            preexec_fn=on_core(HELPER_CORE))
    env = dict(os.environ, ZMQ_SINK_ADDRESS=sink_address, LOCUST_LOG_FILE=str(workdir / "local.jsonl"),
               BENCH_CSV=str(workdir / "requests.csv"), BENCH_RESULT=str(workdir / "result.json"), **curve_env)
    cycles = []
    try:
        for n in range(rounds):
            run = locust(workdir, host, env, WARMUP + WINDOW + 2, stderr=subprocess.DEVNULL)
            assert run.wait(timeout=120) == 0
            cycles += json.loads((workdir / "result.json").read_text())
            print(f"  run {n + 1}/{rounds}: {len(cycles)} cycles so far", file=sys.stderr)
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait()
    return cycles


# --- part 2 and 3: sink ceiling and memory -----------------------------------------------------

def without_accelerators(workdir):
    """Environment in which orjson and simdjson fail to import, as where only Locust and pyzmq are installed."""
    shadow = workdir / "without_accelerators"
    shadow.mkdir(exist_ok=True)
    for module in ("orjson", "simdjson"):
        (shadow / f"{module}.py").write_text("raise ImportError\n")
    return dict(os.environ, PYTHONPATH=str(shadow))


def start_pushers(addresses, numbered=True, keys=None):
    return [subprocess.Popen([sys.executable, __file__, "push", ",".join(addresses), str(RECORDS_PER_PUSHER),
                              "numbered" if numbered else "plain", *([str(keys)] if keys else [])],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=on_core(HELPER_CORE))
            for _ in range(PUSHERS)]


def go(pushers):
    """Start the pushers' clocks together, once each has made its messages and connected."""
    for pusher in pushers:
        assert pusher.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # the last one's subscriptions reach the sinks
    for pusher in pushers:
        pusher.stdin.write("go\n")
        pusher.stdin.flush()


def sink_run(workdir, env, cores=(MEASURED_CORE,), keys=None, numbered=True):
    """One sink.py on each of the cores; the pushers spread their frames over them."""
    addresses = [f"tcp://127.0.0.1:{free_port()}" for _ in cores]
    outs = [workdir / f"sink{n}.jsonl" for n in range(len(cores))]
    stderrs = [workdir / f"sink{n}.err" for n in range(len(cores))]
    sink_flags = curve_settings(keys)[0] if keys else []
    sinks = [subprocess.Popen([sys.executable, str(REPO / "sink.py"), "--bind", address, "--log-file", str(out),
                               *sink_flags], stderr=stderr.open("w"), env=env, preexec_fn=on_core(core))
             for address, out, stderr, core in zip(addresses, outs, stderrs, cores)]
    while not all("listening on" in stderr.read_text() for stderr in stderrs):
        time.sleep(0.05)
    rss = []
    processes = [psutil.Process(sink.pid) for sink in sinks]
    # CPU time (both threads) as well as the rate: the rate moves by a third between runs on this VM.
    cpu_before = sum(sum(p.cpu_times()[:2]) for p in processes)
    pushers = start_pushers(addresses, numbered, keys)
    go(pushers)
    process = processes[0]
    # The sinks' progress lines show when they have written everything; each one's rate is from its first
    # to its last arrival, and they start together, so together they wrote everything in the longest time.
    while sum(max(map(int, re.findall(r"sink: (\d+) records", stderr.read_text())), default=0)
              for stderr in stderrs) < PUSHERS * RECORDS_PER_PUSHER:
        rss.append(process.memory_info().rss)
        time.sleep(0.5)
    cpu = sum(sum(p.cpu_times()[:2]) for p in processes) - cpu_before
    acknowledged = sum(json.loads(p.communicate()[0])["acknowledged"] for p in pushers)
    written, seconds, parsed = 0, 0.0, 0
    for sink, out, stderr in zip(sinks, outs, stderrs):
        sink.send_signal(signal.SIGTERM)
        sink.wait()
        records, took = re.search(r"(\d+) records written (?:to \S+ )?in ([\d.]+)s", stderr.read_text()).groups()
        written, seconds = written + int(records), max(seconds, float(took))
        with open(out, "rb") as lines:
            parsed += sum(1 for line in lines if isinstance(json.loads(line), dict))
        out.unlink()
    return {"records": written, "seconds": seconds, "parsed": parsed, "rss": rss, "cpu": cpu,
            "acknowledged": acknowledged if numbered else written}


def bare_run():
    address = f"tcp://127.0.0.1:{free_port()}"
    expected = PUSHERS * RECORDS_PER_PUSHER
    pull = subprocess.Popen([sys.executable, __file__, "bare-pull", address, str(expected)],
                            stdout=subprocess.PIPE, text=True, preexec_fn=on_core(MEASURED_CORE))
    assert pull.stdout.readline().strip() == "ready"
    pushers = start_pushers([address], numbered=False)
    go(pushers)
    result = json.loads(pull.stdout.readline())
    for p in pushers + [pull]:
        p.communicate()
    return result


def queue_memory(workdir, host, queue_limit=20_000, seconds=16):
    """RSS of a saturated Locust process whose sink never comes: it must stop growing once the queue is full."""
    env = dict(os.environ, ZMQ_SINK_ADDRESS=f"tcp://127.0.0.1:{free_port()}", ZMQ_SINK_QUEUE=str(queue_limit))
    env.pop("LOCUST_LOG_FILE", None)
    run = locust(workdir, host, env, seconds, stderr=subprocess.PIPE, text=True)
    process, rss = psutil.Process(run.pid), []
    while run.poll() is None:
        try:
            rss.append(process.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(1)
    report = [line for line in run.stderr.read().splitlines() if "records acknowledged" in line]
    return rss, report[0].split(": ", 1)[1] if report else "no report"


# --- part 4: the report ------------------------------------------------------------------------

def write_collected(path, records, names=5, seconds=None):
    """A collected file as a sink writes one: 8 workers, 10% failures (status 500, Locust's error text),
    random response times (sorting them costs more than sorting repeats would), a resource sample every 375
    records, from each worker in turn, and each worker's end record; 3000 records a second unless seconds
    says how long the run was."""
    rng = random.Random(1)
    start = time.time()
    seqs = [0] * 8
    paths = ["/", "/login", "/items", "/items/{id}", "/does-not-exist", *(f"/page/{n}" for n in range(5, names))]
    with open(path, "w") as out:
        for i in range(records + 8):
            when = start + i * (seconds or records / 3000) / records
            worker = (i // 375 if i % 375 == 0 else i) % 8 if i < records else i - records
            seqs[worker] += 1
            record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1000):03d}Z",
                      "loglevel": "INFO", "hostname": f"loadgen-{worker % 4}",
                      "worker": f"loadgen-{worker % 4}_{worker:032x}", "run_id": "20261128T161020Z-9c1e04d2",
                      "seq": seqs[worker]}
            if i >= records:
                record["message"] = {"class": "end", "records": seqs[worker], "requests": 0, "dropped": 0}
            elif i % 375 == 0:
                record["message"] = {"class": "resources", "cpu_percent": rng.uniform(20, 95), "rss_bytes": 60_000_000,
                                     "user_count": 10}
            else:
                name, failed = paths[i % names], rng.random() < 0.1
                record["message"] = {"class": "request", "request_type": "GET", "name": name,
                                     "result": "error" if failed else "success", "status": 500 if failed else 200,
                                     "response_time": rng.lognormvariate(2.5, 1), "response_length": 612,
                                     **({"exception": "LocustBadStatusCode(code=500)"} if failed else {}),
                                     "start_time": when - 0.01, "url": "http://127.0.0.1:8000" + name, "other": {}}
            out.write(json.dumps(record, separators=(",", ":")) + "\n")


DECIDING = ["--skip-first", "30s", "--skip-last", "10s", "--check", "each: p99 < 10s", "--check", "failures < 20%",
            "--check", "rps > 100"]  # rules the bench file passes


def report_run(files, env, records=REPORT_RECORDS, html=None, extra=()):
    """Seconds and peak RSS of one `report.py --timeline --require-complete` over the files, with --html if
    given a page to write, and any extra arguments."""
    started = time.monotonic()
    report = subprocess.Popen([sys.executable, str(REPO / "report.py"), *map(str, files), "--require-complete",
                               "--timeline", str(files[0].with_suffix(".csv")),
                               *(["--html", str(html)] if html else []), *extra],
                              stdout=subprocess.PIPE, text=True, env=env, preexec_fn=on_core(MEASURED_CORE))
    output = report.stdout.read()
    _, status, usage = os.wait4(report.pid, 0)  # wait4, for the peak RSS of this process alone
    report.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    samples = len(range(0, records, 375))
    expected = (f"request records {records - samples}, resource samples {samples}, other records 8, "
                f"duplicates merged {(len(files) - 1) * (records + 8)},")
    assert report.returncode == 0 and (expected in output if not extra else "\nPASS: all " in output), output
    return {"seconds": time.monotonic() - started, "max_rss": usage.ru_maxrss * 1024}


def browser_load(page):
    """Seconds for headless Chromium to open the page and run its scripts, which draw the charts."""
    started = time.monotonic()
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, check=True).stdout
    assert dom.count('class="main-svg"') >= 6, "every chart drawn"
    return time.monotonic() - started


def sink_start(collected, index):
    """Seconds from starting sink.py on a collected file until it acknowledges a first numbered record: it first
    learns which records the file holds, from its index beside it if there is one (then the file keeps the new
    record, and the index covers it), or from every line."""
    if not index:
        Path(f"{collected}.index").unlink(missing_ok=True)
    address = f"tcp://127.0.0.1:{free_port()}"
    size = collected.stat().st_size
    worker = f"bench_{os.getpid():032x}"
    started = time.monotonic()
    sink = subprocess.Popen([sys.executable, str(REPO / "sink.py"), "--bind", address, "--log-file", str(collected)],
                            stderr=subprocess.PIPE, text=True, preexec_fn=on_core(MEASURED_CORE))
    with zmq.Context() as context, context.socket(zmq.PUSH) as pusher, context.socket(zmq.SUB) as acks:
        acks.subscribe(worker.encode())
        acks.connect(f"{address.rsplit(':', 1)[0]}:{int(address.rsplit(':', 1)[1]) + 1}")
        pusher.connect(address)
        while True:  # sent again until acknowledged: an acknowledgement before the subscription arrived is lost
            pusher.send_multipart([b"1 " + worker.encode(), json.dumps({"worker": worker, "seq": 1}).encode()])
            if acks.poll(20) and acks.recv_multipart()[1]:  # not the sink's empty answer to the subscription
                break
            if sink.poll() is not None:
                sys.exit(f"bench: the sink stopped: {sink.stderr.read()}")
        took = time.monotonic() - started
    sink.send_signal(signal.SIGTERM)
    start_line = sink.communicate()[1].splitlines()[0]
    if not index:
        with open(collected, "r+b") as restore:  # the report's file as it was
            restore.truncate(size)
    return took, start_line


def scale_run(workdir, generators, rate, seconds=30, processes=4):
    """sink.py on one core, `generators` load generators (bench.py load-generators, the locustfile's own push
    handler) in `processes` processes on the other, each at `rate` records a second."""
    address, out = f"tcp://127.0.0.1:{free_port()}", workdir / "scale.jsonl"
    sink = subprocess.Popen([sys.executable, str(REPO / "sink.py"), "--bind", address, "--log-file", str(out)],
                            stderr=subprocess.PIPE, text=True, preexec_fn=on_core(MEASURED_CORE))
    sink.stderr.readline()
    process = psutil.Process(sink.pid)
    started = [subprocess.Popen([sys.executable, __file__, "load-generators", address, str(generators // processes),
                                 str(rate), str(seconds), f"p{n}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=dict(os.environ, ZMQ_SINK_FLUSH_TIMEOUT="30"),
                                preexec_fn=on_core(HELPER_CORE)) for n in range(processes)]
    for generator in started:
        assert generator.stdout.readline() == "ready\n"
    # Read as they write: their last line, every acknowledgement time, can be more than a pipe holds.
    outputs = {}
    readers = [threading.Thread(target=lambda g: outputs.setdefault(g, g.stdout.read()), args=(generator,))
               for generator in started]
    for reader in readers:
        reader.start()
    cpu_before, rss = sum(process.cpu_times()[:2]), []
    while any(generator.poll() is None for generator in started):
        rss.append(process.memory_info().rss)
        time.sleep(0.5)
    cpu = sum(process.cpu_times()[:2]) - cpu_before
    for reader in readers:
        reader.join()
    results = [json.loads(outputs[generator].splitlines()[-1]) for generator in started]
    sink.send_signal(signal.SIGTERM)
    summary = sink.communicate()[1].splitlines()[-1]
    out.unlink()
    Path(f"{out}.index").unlink(missing_ok=True)
    written, took, again = map(float, re.search(
        r"(\d+) records written (?:to \S+ )?in ([\d.]+)s .* (\d+) records sent again", summary).groups())
    acks = sorted(t for r in results for t in r["ack_times"])
    return {"generators": generators, "rate": rate, "made": sum(r["made"] for r in results),
            "acked": sum(r["acked"] for r in results), "written": written, "seconds": took, "again": again,
            "frames": len(acks), "cpu": cpu, "rss": max(rss),
            "ack_p50": acks[len(acks) // 2], "ack_p99": acks[len(acks) * 99 // 100]}


def bytes_as_dicts(collected, records=100_000):
    """Memory a record takes when read with json.loads and kept, as any list-of-dicts reader keeps it."""
    process = psutil.Process()
    before = process.memory_info().rss
    with open(collected, "rb") as lines:
        kept = [json.loads(line) for line, _ in zip(lines, range(records))]
    return (process.memory_info().rss - before) / len(kept)


# --- the table ---------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5,
                        help="Locust runs, each measuring every variant in turns (default 5)")
    parser.add_argument("--sink-rounds", type=int, default=3, help="runs of the sink and of the bare loop (default 3)")
    parser.add_argument("--start-and-scale", action="store_true", help="only parts 5 and 6 (about 4 minutes)")
    parser.add_argument("--follow", action="store_true", help="only part 7 (about 3 minutes)")
    parser.add_argument("--against", metavar="COMMIT", help="only part 1 (--rounds runs, 0 for none), and part 2's "
                                                            "sink acknowledging and part 4's plain report "
                                                            "(--sink-rounds runs), for this code and COMMIT's in turns")
    args = parser.parse_args()
    if args.against:
        return against(args.against, args.rounds, args.sink_rounds)
    if args.follow:
        with tempfile.TemporaryDirectory() as tmp:
            print(platform_line())
            return print_follow(*follow_runs(Path(tmp), args.sink_rounds))
    if args.start_and_scale:
        with tempfile.TemporaryDirectory() as tmp:
            collected = Path(tmp) / "collected.jsonl"
            write_collected(collected, REPORT_RECORDS)
            results = start_and_scale(Path(tmp), collected, args.sink_rounds)
        print(platform_line())
        return print_start_and_scale(*results)

    port = free_port()
    target = subprocess.Popen([sys.executable, __file__, "serve", str(port)], preexec_fn=on_core(HELPER_CORE))
    host = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        try:
            print(f"part 1: hook cost, {args.rounds} runs", file=sys.stderr)
            keys = workdir / "keys"
            subprocess.run([sys.executable, str(REPO / "sink.py"), "--make-keys", str(keys)], check=True,
                           stdout=subprocess.DEVNULL)
            cycles = hook_cost(workdir, host, args.rounds)
            print(f"part 1 with CURVE: hook cost, {args.rounds} runs", file=sys.stderr)
            curve_cycles = hook_cost(workdir, host, args.rounds, keys)
            print("part 2: sink ceiling", file=sys.stderr)
            bares, sinks, unacknowledged, curve_sinks, two_sinks, plain_sinks = [], [], [], [], [], []
            for _ in range(args.sink_rounds):
                bares.append(bare_run())
                sinks.append(sink_run(workdir, os.environ))
                unacknowledged.append(sink_run(workdir, os.environ, numbered=False))
                curve_sinks.append(sink_run(workdir, os.environ, keys=keys))
                two_sinks.append(sink_run(workdir, os.environ, cores=(MEASURED_CORE, HELPER_CORE)))
                plain_sinks.append(sink_run(workdir, without_accelerators(workdir)))
            print("part 3: a Locust process's queue while its sink is down", file=sys.stderr)
            queue_rss, queue_report = queue_memory(workdir, host)
            print("part 4: the report", file=sys.stderr)
            collected = workdir / "collected.jsonl"
            write_collected(collected, REPORT_RECORDS)
            reports = {"with simdjson": [], "json module only": [], "with simdjson, the file merged with itself": []}
            for _ in range(args.sink_rounds):
                reports["with simdjson"].append(report_run([collected], os.environ))
                reports["json module only"].append(report_run([collected], without_accelerators(workdir)))
                reports["with simdjson, the file merged with itself"].append(
                    report_run([collected, collected], os.environ))
            collected_bytes = collected.stat().st_size
            dict_bytes = bytes_as_dicts(collected)
            page, hour, hour_page = workdir / "report.html", workdir / "hour.jsonl", workdir / "hour.html"
            reports["with simdjson, --html"] = [report_run([collected], os.environ, html=page)
                                                for _ in range(args.sink_rounds)]
            reports["with simdjson, a window and 3 checks, reading twice"] = [
                report_run([collected], os.environ, extra=DECIDING) for _ in range(args.sink_rounds)]
            reports["with simdjson, a window, 3 checks and the file itself as --baseline"] = [
                report_run([collected], os.environ, extra=[*DECIDING, "--baseline", str(collected)])
                for _ in range(args.sink_rounds)]
            write_collected(hour, HOUR_RECORDS, names=50, seconds=3600)
            hour_runs = [report_run([hour], os.environ, records=HOUR_RECORDS, html=hour_page)
                         for _ in range(args.sink_rounds)]
            page_bytes, hour_bytes, hour_page_bytes = page.stat().st_size, hour.stat().st_size, hour_page.stat().st_size
            loads = [browser_load(hour_page) for _ in range(args.sink_rounds)] if shutil.which("chromium") else []
            starts_and_scale = start_and_scale(workdir, collected, args.sink_rounds)
        finally:
            target.kill()
            target.wait()

    cost = {v: [c[v][0] / c[v][1] * 1e6 for c in cycles] for v in VARIANTS}
    rate = {v: [c[v][1] / c[v][2] for c in cycles] for v in VARIANTS}
    print(f"\n{platform_line()}")
    print(f"\nHook cost: one Locust process, FastHttpUser, 10 users, no wait. {args.rounds} runs, each turning the "
          f"variants on in turn for {SLICE} s, {len(cycles)} cycles in all; each variant is compared with the "
          f"no-hooks slice of the same cycle; medians and quartiles over the cycles")
    print("| variant | CPU per request | requests/s | vs no hooks: median (quartiles) |")
    print("|---|---|---|---|")
    curve_cost = {v: [c[v][0] / c[v][1] * 1e6 for c in curve_cycles] for v in ("no hooks", "this project")}
    rows = [(v, cost[v], cost["no hooks"], rate[v]) for v in VARIANTS] + [
        ("this project, CURVE (its own runs, against their no-hooks slices)", curve_cost["this project"],
         curve_cost["no hooks"], [c["this project"][1] / c["this project"][2] for c in curve_cycles])]
    for label, costs, base_costs, rates in rows:
        ratios = [c / base for c, base in zip(costs, base_costs)]
        low, _, high = statistics.quantiles(ratios, n=4)
        print(f"| {label} | {statistics.median(costs):.1f} µs | {statistics.median(rates):.0f} | "
              f"{statistics.median(ratios):.3f}× ({low:.3f}–{high:.3f}) |")

    worker_rate = statistics.median(rate["no hooks"])
    bare_rate = statistics.median(b["records"] / b["seconds"] for b in bares)
    print(f"\nSink ceiling: {PUSHERS} pushers x {RECORDS_PER_PUSHER} records, {RECORDS_PER_FRAME} records a frame; "
          f"median of {args.sink_rounds}")
    print("| loop | records/s | worker-equivalents | of the bare loop | sink CPU per record |")
    print("|---|---|---|---|---|")
    print(f"| bare PULL loop (receive, count, discard) | {bare_rate:,.0f} | {bare_rate / worker_rate:.0f} | 100% | |")
    for label, runs_of_sink in (("sink.py with simdjson", sinks),
                                ("sink.py with simdjson, frames without numbers: not acknowledged", unacknowledged),
                                ("sink.py with simdjson, CURVE", curve_sinks),
                                ("two sink.py with simdjson, one a core", two_sinks),
                                ("sink.py, json module only", plain_sinks)):
        rate = statistics.median(s["records"] / s["seconds"] for s in runs_of_sink)
        cpu = statistics.median(s["cpu"] / s["records"] * 1e6 for s in runs_of_sink)
        print(f"| {label} (validate, write) | {rate:,.0f} | {rate / worker_rate:.0f} | {rate / bare_rate:.0%} | "
              f"{cpu:.2f} µs |")
    every_line = all(s["parsed"] == s["records"] == s["acknowledged"] == PUSHERS * RECORDS_PER_PUSHER
                     for s in sinks + unacknowledged + curve_sinks + two_sinks + plain_sinks)
    print(f"(one worker-equivalent = {worker_rate:.0f} requests/s, the median no-hooks rate above; every line "
          f"written, in every run, parsed as a JSON object with json.loads, and every numbered record was "
          f"acknowledged to its pusher: {every_line})")

    mb = 1 << 20
    rss = sinks[-1]["rss"]
    print("\nMemory")
    print(f"- sink RSS while writing {PUSHERS * RECORDS_PER_PUSHER:,} records: "
          f"{' '.join(f'{x / mb:.1f}' for x in rss)} MB (one sample each 0.5 s)")
    print(f"- Locust process, sink down, ZMQ_SINK_QUEUE=20000: RSS {' '.join(f'{x / mb:.0f}' for x in queue_rss)} MB "
          f"(one sample a second); at exit: {queue_report}")

    print(f"\nReport: report.py --timeline over {REPORT_RECORDS:,} records ({collected_bytes / 1e6:.0f} MB); "
          f"median of {args.sink_rounds}")
    print("| report.py | seconds | lines/s | peak RSS |")
    print("|---|---|---|---|")
    for label, runs_of_report in reports.items():
        seconds = statistics.median(r["seconds"] for r in runs_of_report)
        peak = max(r["max_rss"] for r in runs_of_report)
        lines = REPORT_RECORDS * (2 if "merged" in label else 1)
        print(f"| {label} | {seconds:.1f} | {lines / seconds:,.0f} | {peak / mb:.0f} MB |")
    print(f"(--html wrote a page of {page_bytes / 1e6:.1f} MB)")
    print(f"--html over one hour of 50 names, {HOUR_RECORDS:,} records ({hour_bytes / 1e6:.0f} MB): "
          f"{statistics.median(r['seconds'] for r in hour_runs):.1f} s, peak RSS "
          f"{max(r['max_rss'] for r in hour_runs) / mb:.0f} MB, a page of {hour_page_bytes / 1e6:.1f} MB; "
          + (f"headless Chromium opened it and drew its charts in {statistics.median(loads):.1f} s (median of "
             f"{len(loads)})" if loads else "no chromium here to open it"))
    print(f"(the same records kept as dicts from json.loads: {dict_bytes / 1000:.1f} kB each over the first 100,000, "
          f"so {dict_bytes * REPORT_RECORDS / 1e9:.1f} GB for the file)")
    print_start_and_scale(*starts_and_scale)


def start_and_scale(workdir, collected, rounds):
    """Parts 5 and 6."""
    print("part 5: a sink starting on the collected file", file=sys.stderr)
    starts = [sink_start(collected, index=False) for _ in range(rounds)]
    indexed = [sink_start(collected, index=True) for _ in range(rounds + 1)][1:]  # the first one writes the index
    print("part 6: many load generators", file=sys.stderr)
    return starts, indexed, [scale_run(workdir, generators, rate) for generators, rate in SCALE]


def against(commit, rounds, sink_rounds):
    """What the hooks cost, how fast one sink writes and how long the plain report takes, measured for this code
    and for `commit`'s (checked out into a scratch folder) in turns, so that the VM's drift falls on both alike."""
    port = free_port()
    target = subprocess.Popen([sys.executable, __file__, "serve", str(port)], preexec_fn=on_core(HELPER_CORE))
    here, results = REPO, {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            subprocess.run(["git", "-C", str(here), "worktree", "add", "-q", "--detach", str(workdir / "old"), commit],
                           check=True)
            collected = workdir / "collected.jsonl"
            write_collected(collected, REPORT_RECORDS)
            for n in range(max(rounds, sink_rounds)):
                for label, repo in ((commit, workdir / "old"), ("this code", here)):
                    globals()["REPO"] = repo  # the locustfile, sink.py and report.py start from there
                    cycles, sinks, reports = results.setdefault(label, ([], [], []))
                    if n < rounds:
                        cycles += hook_cost(workdir, f"http://127.0.0.1:{port}", 1)
                    if n < sink_rounds:
                        sinks.append(sink_run(workdir, os.environ))
                        reports.append(report_run([collected], os.environ)["seconds"])
    finally:
        globals()["REPO"] = here
        subprocess.run(["git", "-C", str(here), "worktree", "prune"], check=False)
        target.kill()
        target.wait()
    print(platform_line())
    for label, (cycles, sinks, reports) in results.items():
        if cycles:
            ratios = [c["this project"][0] / c["this project"][1] / (c["no hooks"][0] / c["no hooks"][1])
                      for c in cycles]
            low, _, high = statistics.quantiles(ratios, n=4)
            print(f"{label}: hooks {statistics.median(ratios):.3f}× ({low:.3f}–{high:.3f}, {len(ratios)} cycles)")
        rates = [s["records"] / s["seconds"] for s in sinks]
        cpu = statistics.median(s["cpu"] / s["records"] * 1e6 for s in sinks)
        print(f"{label}: one sink acknowledging {statistics.median(rates):,.0f} records/s (runs: "
              f"{', '.join(f'{r:,.0f}' for r in rates)}), {cpu:.2f} µs of CPU a record; every record acknowledged: "
              f"{all(s['acknowledged'] == s['records'] == s['parsed'] for s in sinks)}; the plain report "
              f"(--timeline --require-complete) over {REPORT_RECORDS:,} records: {statistics.median(reports):.1f} s "
              f"(runs: {', '.join(f'{r:.1f}' for r in reports)})")


def print_start_and_scale(starts, indexed, scale):
    for label, runs in (("without an index", starts), ("with its index", indexed)):
        print(f"\nSink start on that file, {label}: {statistics.median(took for took, _ in runs):.2f} s to its first "
              f"acknowledgement (median of {len(runs)}: {', '.join(f'{took:.2f}' for took, _ in runs)}); it said: "
              f"{runs[-1][1]}")
    print("\nMany load generators: sink.py on one core, the locustfile's push handler in 4 processes on the other, "
          "each generator with its own sockets, for 30 s; ack: the time from a frame's send to its acknowledgement, "
          "as the handler measures it")
    print("| load generators x records/s | made | written | received again | sink records/s | frames/s | "
          "sink CPU | ack p50 | ack p99 | sink peak RSS |")
    # frames/s: those acknowledged, whose acknowledgement times the handler measures
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in scale:
        print(f"| {r['generators']} x {r['rate']} | {r['made']:,} | {r['written']:,.0f} | {r['again']:,.0f} | "
              f"{r['written'] / r['seconds']:,.0f} | {r['frames'] / r['seconds']:,.0f} | "
              f"{r['cpu'] / r['seconds']:.0%} | {r['ack_p50'] * 1000:.0f} ms | {r['ack_p99'] * 1000:.0f} ms | "
              f"{r['rss'] / (1 << 20):.0f} MB |")


FOLLOW_RATE, FOLLOW_SECONDS, FOLLOW_EVERY = 100_000, 20, 2  # part 7: records a second, for how long, views


def follow_runs(workdir, rounds):
    """Part 7: the lag of report.py --follow's views behind a file that grows at FOLLOW_RATE records a second,
    in batches every 0.1 s; then --follow (--idle 0, which reads the file, then again for the report) against
    the plain report on the collected file."""
    print("part 7: report.py --follow", file=sys.stderr)
    source, grown = workdir / "source.jsonl", workdir / "grown.jsonl"
    write_collected(source, FOLLOW_RATE * FOLLOW_SECONDS, seconds=FOLLOW_SECONDS)
    follower = subprocess.Popen([sys.executable, str(REPO / "report.py"), str(grown), "--follow", "--every",
                                 str(FOLLOW_EVERY), "--idle", "1"], stdout=subprocess.PIPE, text=True)
    views = []  # (when it came, lines it counted)

    def read_views():
        for line in follower.stdout:
            counted = re.search(r"; (\d+) lines read", line)
            if counted:
                views.append((time.monotonic(), int(counted[1])))
    reader = threading.Thread(target=read_views)
    reader.start()
    written, batch = [], FOLLOW_RATE // 10  # (when, lines written by then)
    with open(source, "rb") as lines, open(grown, "wb") as out:
        started, total = time.monotonic(), 0
        while chunk := [line for _, line in zip(range(batch), lines)]:
            time.sleep(max(0.0, started + total / FOLLOW_RATE - time.monotonic()))
            out.write(b"".join(chunk))
            out.flush()
            total += len(chunk)
            written.append((time.monotonic(), total))
    follower.wait(timeout=600)
    reader.join()
    lags = [next((seen for seen, counted in views if counted >= total), math.inf) - when for when, total in written]
    reads = {}
    for label, extra in (("plain", []), ("--follow --idle 0", ["--follow", "--idle", "0"])):
        reads[label] = []
        for _ in range(rounds):
            started = time.monotonic()
            subprocess.run([sys.executable, str(REPO / "report.py"), str(source), *extra], check=True,
                           stdout=subprocess.DEVNULL)
            reads[label].append(time.monotonic() - started)
    return lags, (written[-1][0] - written[0][0]), reads


def print_follow(lags, writing, reads):
    print(f"\nreport.py --follow --every {FOLLOW_EVERY} off a terminal, on a file written at {FOLLOW_RATE:,} records/s "
          f"for {writing:.1f} s: a line is in a view {statistics.median(lags):.2f} s after its write (median), "
          f"{max(lags):.2f} s at most (two intervals: {2 * FOLLOW_EVERY} s)")
    records = FOLLOW_RATE * FOLLOW_SECONDS
    for label, runs in reads.items():
        print(f"report.py {label} on those {records:,} records: {statistics.median(runs):.2f} s "
              f"({records / statistics.median(runs):,.0f} records/s; median of {len(runs)}: "
              f"{', '.join(f'{took:.2f}' for took in runs)})")


def platform_line():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return (f"Machine: {os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / (1 << 30):.0f} GiB; "
            f"Python {sys.version.split()[0]}, Locust {version('locust')}, pyzmq {zmq.__version__}, "
            f"libzmq {zmq.zmq_version()}, " + ", ".join(f"{name} {installed(name)}" for name in OPTIONAL))


OPTIONAL = ("orjson", "pysimdjson", "plotly")  # requirements.txt's, each measured where it is used


def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    roles = {"serve": serve, "push": push, "bare-pull": bare_pull, "load-generators": load_generators}
    if len(sys.argv) > 1 and sys.argv[1] in roles:
        roles[sys.argv[1]](*sys.argv[2:])
    else:
        main()
