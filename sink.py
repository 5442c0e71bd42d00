"""
Collect the records that every Locust process pushes into one JSON-lines file.

Usage::

    python sink.py --bind 'tcp://*:5555' --log-file requests.jsonl

Framing: every frame of a message holds one record, or several separated by line breaks (\\n), each a
JSON object in UTF-8; a final line break is allowed. A frame is written whole, as it came, or rejected
whole and counted by reason: empty, an empty line, a carriage return, a line over 1 MiB, not UTF-8, not
JSON (NaN and Infinity included), or JSON but not an object. Rejecting whole frames means a fragment of a
bad message, such as one line of a pretty-printed object, can never pass for a record. Records are
appended in arrival order, not time order.

Progress goes to stderr every few seconds while records arrive. SIGINT or SIGTERM: the sink writes
what it has received, closes the file and prints a summary.

Report::

    python sink.py --report requests.jsonl [--run RUN_ID] [--timeline timeline.csv]

reads a collected file (the sink's, or a process's local one) and prints, per run and per request name,
requests, failures, requests/s and the response time percentiles, computed from every raw value; then
each worker's peak CPU and memory from its resource samples. ``--timeline`` also writes one CSV row per
second of each run.
"""

import argparse
import csv
import heapq
import json
import math
import os
import re
import signal
import sys
import time
from array import array
from collections import Counter, defaultdict
from datetime import datetime, timezone

import zmq

try:
    import simdjson  # optional (pysimdjson): checks a record without building it, ~10x the json module's speed
except ImportError:
    simdjson = None

MAX_RECORD_BYTES = 1 << 20
# A frame larger than this makes ZeroMQ drop the sender's connection before we see it: a memory guard.
MAX_FRAME_BYTES = 64 << 20
# Messages ZeroMQ holds for us per connected process, a frame of up to 1000 records each: the bound on
# what the sink buffers when it falls behind (ZeroMQ's default of 1000 let a test run reach 600 MB).
RCVHWM = 10
PROGRESS_EVERY = 2.0  # seconds


def reject_constant(name):
    raise ValueError(f"{name} is not JSON")


# The reference for what a record is: Python's own decoder, without the NaN and Infinity it allows.
decoder = json.JSONDecoder(parse_constant=reject_constant)
# simdjson, when installed, only ever answers faster. It skips a UTF-8 byte order mark, which Python's
# decoder refuses, so a line that starts with one always goes to the json module.
simdjson_parser = simdjson.Parser() if simdjson else None
BOM = b"\xef\xbb\xbf"


def why_not_a_record(line):
    """Return why one line is not a record, or None if it is one."""
    if not line:
        return "empty line"
    if len(line) > MAX_RECORD_BYTES:
        return "over 1 MiB"
    try:
        value = decoder.decode(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8"
    except (ValueError, RecursionError):
        return "not JSON"
    return None if isinstance(value, dict) else "not an object"


def all_records_quick(lines):
    """True only if every line is surely a record; False means: ask why_not_a_record, line by line."""
    # simdjson refuses what Python's decoder refuses, and more (lone surrogates, integers over 64 bits),
    # except for two things: it skips a UTF-8 byte order mark, and it allows 1024 levels of nesting where
    # json.loads allows fewer than 1000. A line under 1000 bytes cannot nest 500 deep. 600,000 fuzzed lines
    # found no other disagreement. Any doubt, exceptions included, goes to the json module.
    try:
        for line in lines:
            if len(line) >= 1000 or line.startswith(BOM) or type(simdjson_parser.parse(line)) is not simdjson.Object:
                return False
    except Exception:
        return False
    return True


def record_lines(frame):
    """The frame's lines, not counting the final line break it may end with."""
    lines = frame.split(b"\n")
    if frame.endswith(b"\n"):
        lines.pop()
    return lines


def why_rejected(frame, lines):
    """Return why a frame is rejected, or None if every one of its lines is a record."""
    if not frame:
        return "empty"
    if b"\r" in frame:
        return "carriage return"  # readers that split on any line break would cut the record there
    if simdjson is not None and all_records_quick(lines):
        return None
    for line in lines:
        reason = why_not_a_record(line)
        if reason is not None:
            return reason
    return None


class Sink:
    """Receives frames, appends the valid ones to the file and counts the rest."""

    def __init__(self, out):
        self.out = out
        self.written = 0
        self.rejected = Counter()
        self.first_arrival = self.last_arrival = None

    def take(self, frames):
        self.last_arrival = time.monotonic()
        if self.first_arrival is None:
            self.first_arrival = self.last_arrival
        for frame in frames:
            lines = record_lines(frame)
            reason = why_rejected(frame, lines)
            if reason is None:
                self.out.write(frame)
                if not frame.endswith(b"\n"):
                    self.out.write(b"\n")
                self.written += len(lines)
            else:
                if not self.rejected[reason]:
                    print(f"sink: rejected a frame ({reason}): {frame[:80]!r}", file=sys.stderr)
                self.rejected[reason] += 1

    def drain(self, socket, max_seconds):
        """Take every message already waiting, for at most max_seconds."""
        deadline = time.monotonic() + max_seconds
        while time.monotonic() < deadline:
            try:
                self.take(socket.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return

    def counts(self):
        return self.written, sum(self.rejected.values())

    def summary(self):
        seconds = (self.last_arrival - self.first_arrival) if self.first_arrival else 0.0
        rate = self.written / seconds if seconds > 0 else 0.0
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.rejected.items()))
        return (f"{self.written} records written in {seconds:.1f}s ({rate:.0f}/s), "
                f"{sum(self.rejected.values())} frames rejected" + (f" ({reasons})" if reasons else ""))


# --- The report: `python sink.py --report FILE` ---------------------------------------------------

PERCENTILES = (50, 90, 95, 99)
TIMELINE_PERCENTILES = (50, 95, 99)
CPU_WARNING = 90  # percent of one core, where Locust warns that a worker's response times are suspect
# The locustfile's `time`: fixed width, so that comparing two as strings compares them as times.
TIME_FORMAT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
OBJECTS = (dict, simdjson.Object) if simdjson else (dict,)


def read_json(line):
    """One line's JSON value as Python's decoder reads it; from simdjson, a read-only mapping."""
    if simdjson_parser is not None and not line.startswith(BOM):
        try:
            return simdjson_parser.parse(line)
        except Exception:
            pass  # Python's decoder reads some of what simdjson refuses: integers over 64 bits, lone surrogates
    return decoder.decode(line.decode("utf-8"))


def percentile(ordered, percent):
    """Nearest rank: the smallest value that at least `percent` % of the values do not exceed."""
    return ordered[-(-len(ordered) * percent // 100) - 1]  # rank ceil(n * percent / 100), exact in integers


class Worker:
    """One worker's part of a run."""

    def __init__(self, hostname):
        self.hostname = hostname
        self.requests = self.samples = 0
        self.peak_cpu = self.peak_rss = 0


class Second:
    """One second of a run, for the timeline."""

    def __init__(self):
        self.response_times = array("d")
        self.failures = 0
        self.peak_cpu = None


class Run:
    """What the report keeps of one run: counts, and each response time as an 8-byte float."""

    def __init__(self, timeline):
        self.response_times = defaultdict(lambda: array("d"))  # (request_type, name) -> milliseconds
        self.failures = Counter()  # (request_type, name) -> failed requests
        self.first_end = self.last_end = None  # of any request, as `time` strings
        self.workers = {}
        self.seconds = defaultdict(Second) if timeline else None  # "2026-11-28T19:04:20" -> Second

    def worker(self, worker, hostname):
        if worker not in self.workers:
            self.workers[worker] = Worker(hostname)
        return self.workers[worker]

    def add_request(self, when, worker, hostname, key, response_time, failed):
        self.worker(worker, hostname).requests += 1
        self.response_times[key].append(response_time)
        self.failures[key] += failed
        if self.first_end is None or when < self.first_end:
            self.first_end = when
        if self.last_end is None or when > self.last_end:
            self.last_end = when
        if self.seconds is not None:
            second = self.seconds[when[:19]]
            second.response_times.append(response_time)
            second.failures += failed

    def add_sample(self, when, worker, hostname, cpu, rss):
        worker = self.worker(worker, hostname)
        worker.samples += 1
        worker.peak_cpu = max(worker.peak_cpu, cpu)
        worker.peak_rss = max(worker.peak_rss, rss)
        if self.seconds is not None:
            second = self.seconds[when[:19]]
            second.peak_cpu = cpu if second.peak_cpu is None else max(second.peak_cpu, cpu)


class Collected:
    """Reads a collected file line by line, keeping per run only what the report needs."""

    def __init__(self, only_run, timeline):
        self.only_run = only_run
        self.timeline = timeline
        self.runs = {}  # run id -> Run, in the order of each run's first line
        self.run_ids = set()
        self.requests = self.samples = self.other = self.unreadable = 0
        self.first_unreadable = None

    def read(self, path):
        with open(path, "rb") as lines:
            for line_number, line in enumerate(lines, 1):
                try:
                    self.take(read_json(line))
                except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                    self.unreadable += 1
                    self.first_unreadable = self.first_unreadable or line_number

    def take(self, record):
        """Count one record, or raise ValueError, before counting anything, if it lacks what is needed."""
        message = record.get("message") if type(record) in OBJECTS else None
        kind = message.get("class") if type(message) in OBJECTS else None
        if kind == "request":
            request_type, name, result, response_time = (message["request_type"], message["name"], message["result"],
                                                         message["response_time"])
            if not (type(request_type) is type(name) is type(result) is str and is_number(response_time)):
                raise ValueError("not a request record")
        elif kind == "resources":
            cpu, rss = message["cpu_percent"], message["rss_bytes"]
            if not (is_number(cpu) and is_number(rss)):
                raise ValueError("not a resource record")
        else:
            self.other += 1
            return
        when, worker, hostname, run_id = record["time"], record["worker"], record["hostname"], record.get("run_id")
        if not (type(when) is type(worker) is type(hostname) is str and TIME_FORMAT.fullmatch(when)
                and (run_id is None or type(run_id) is str)):
            raise ValueError("not a record of locustfile.py")
        self.run_ids.add(run_id)
        if self.only_run is not None and run_id != self.only_run:
            return
        run = self.runs.get(run_id) or self.runs.setdefault(run_id, Run(self.timeline))
        if kind == "request":
            run.add_request(when, worker, hostname, (request_type, name), response_time, result != "success")
            self.requests += 1
        else:
            run.add_sample(when, worker, hostname, cpu, rss)
            self.samples += 1

    def summary(self, path):
        found = (f"{path}: request records {self.requests}, resource samples {self.samples}"
                 + (f" (of run {self.only_run})" if self.only_run is not None else "")
                 + f", other lines skipped {self.other}, unreadable lines {self.unreadable}")
        return found + (f" (the first: line {self.first_unreadable})" if self.unreadable else "")


def is_number(value):
    return type(value) in (int, float) and math.isfinite(value)


def epoch(when):
    """Unix seconds of a `time` string, with or without its milliseconds and Z."""
    return datetime.fromisoformat(when.rstrip("Z")).replace(tzinfo=timezone.utc).timestamp()


def print_run(run_id, run):
    """One run's table, per request name and in total."""
    span = epoch(run.last_end) - epoch(run.first_end) if run.first_end else 0.0
    label = run_id if run_id is not None else "null (records made before any test started)"
    if run.first_end:
        print(f"Run {label}: requests ended from {run.first_end} to {run.last_end} ({span:.1f} s)")
    else:
        print(f"Run {label}: no requests")
    keys = sorted(run.response_times, key=lambda key: (key[1], key[0]))
    width = max([len(name) for _, name in keys] + [len("Aggregated")])
    print(table_row("Type", "Name", width, ["requests", "failures", "req/s", *(f"p{p}" for p in PERCENTILES), "max"])
          + "   (response times in ms)")
    for key in keys:
        ordered = sorted(run.response_times[key])
        run.response_times[key] = array("d", ordered)  # sorted, for the total's merge; the list is freed
        print(table_row(*key, width, request_columns(ordered, run.failures[key], span)))
    if keys:
        ordered = array("d", heapq.merge(*run.response_times.values()))
        print(table_row("", "Aggregated", width, request_columns(ordered, sum(run.failures.values()), span)))
    print()


def print_workers(run):
    """Each worker of a run: its requests and resource samples, and a warning for each one that ran hot."""
    workers = sorted(run.workers.items())
    worker_width = max([len("Worker")] + [len(name) for name, _ in workers])
    host_width = max([len("host")] + [len(worker.hostname) for _, worker in workers])
    print(f"{'Worker':<{worker_width}} {'host':<{host_width}} {'requests':>9} {'samples':>8} {'peak CPU':>9} "
          f"{'peak RSS':>10}")
    for name, worker in workers:
        cpu, rss = (f"{worker.peak_cpu:.1f}%", f"{worker.peak_rss / 1e6:.1f} MB") if worker.samples else ("-", "-")
        print(f"{name:<{worker_width}} {worker.hostname:<{host_width}} {worker.requests:>9} {worker.samples:>8} "
              f"{cpu:>9} {rss:>10}")
    for name, worker in workers:
        if worker.peak_cpu > CPU_WARNING:
            print(f"WARNING: worker {name} reached {worker.peak_cpu:.1f}% CPU, above {CPU_WARNING}%: its response "
                  f"times include time its requests waited for the CPU.")
    print()


def request_columns(ordered, failures, span):
    rate = f"{len(ordered) / span:.1f}" if span > 0 else "-"
    return [len(ordered), failures, rate, *(f"{percentile(ordered, p):.2f}" for p in PERCENTILES),
            f"{ordered[-1]:.2f}"]


def table_row(request_type, name, width, columns):
    return f"{request_type:<6} {name:<{width}} " + " ".join(f"{column:>9}" for column in columns)


def write_timeline(path, runs):
    """One row per second of each run, from its first record to its last, empty seconds included."""
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["run_id", "second", "requests", "failures", *(f"p{p}_ms" for p in TIMELINE_PERCENTILES),
                         "max_ms", "max_worker_cpu_percent"])
        for run_id, run in runs:
            for moment in range(int(epoch(min(run.seconds))), int(epoch(max(run.seconds))) + 1):
                key = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment))
                second = run.seconds.get(key) or Second()
                ordered = sorted(second.response_times)
                times = [percentile(ordered, p) for p in TIMELINE_PERCENTILES] + [ordered[-1]] if ordered else [""] * 4
                writer.writerow([run_id or "", key + "Z", len(ordered), second.failures, *times,
                                 "" if second.peak_cpu is None else second.peak_cpu])


def report(path, only_run, timeline_path):
    collected = Collected(only_run, timeline=timeline_path is not None)
    try:
        collected.read(path)
    except OSError as error:
        print(f"sink: cannot read {path}: {error.strerror}", file=sys.stderr)
        return 1
    print(collected.summary(path))
    print()
    if not collected.runs:
        if only_run is not None and collected.run_ids:
            runs = ", ".join(sorted(str(run_id) for run_id in collected.run_ids))
            print(f"No run {only_run} in {path}. Its runs: {runs}", file=sys.stderr)
            return 1
        print(f"{path} holds no request records and no resource samples: nothing to report.")
        return 0
    for run_id, run in collected.runs.items():
        print_run(run_id, run)
        print_workers(run)
    if timeline_path:
        write_timeline(timeline_path, collected.runs.items())
        print(f"Timeline: {timeline_path}")
    return 0


# --- The command line: collect, or report ---------------------------------------------------------

def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bind", default=os.environ.get("ZMQ_SINK_BIND", "tcp://*:5555"),
                        help="ZeroMQ address to bind the PULL socket to (env ZMQ_SINK_BIND; default %(default)s)")
    parser.add_argument("--log-file", default=os.environ.get("ZMQ_SINK_LOG_FILE", "requests.jsonl"),
                        help="JSON-lines file to append to, never truncated (env ZMQ_SINK_LOG_FILE; default %(default)s)")
    parser.add_argument("--report", metavar="FILE", help="instead of collecting, print a report of a collected file")
    parser.add_argument("--run", metavar="RUN_ID", help="with --report: only this run")
    parser.add_argument("--timeline", metavar="OUT.csv", help="with --report: also write one CSV row per second and run")
    args = parser.parse_args()
    if (args.run or args.timeline) and not args.report:
        parser.error("--run and --timeline go with --report")
    return args


def main():
    args = parse_args()
    if args.report:
        sys.exit(report(args.report, args.run, args.timeline))
    stopping = []
    # The handler only sets a flag: an exception raised inside a write could leave half a line.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: stopping.append(signum))

    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    pull.setsockopt(zmq.RCVHWM, RCVHWM)
    pull.bind(args.bind)
    endpoint = pull.getsockopt_string(zmq.LAST_ENDPOINT)
    print(f"sink: listening on {endpoint}, appending to {args.log_file}, checking records with "
          f"{'simdjson' if simdjson else 'the json module'}", file=sys.stderr, flush=True)

    with open(args.log_file, "ab") as out:
        sink = Sink(out)
        last_counts, last_time = sink.counts(), time.monotonic()
        while not stopping:
            if pull.poll(100):
                sink.drain(pull, max_seconds=0.5)
            now = time.monotonic()
            if now - last_time >= PROGRESS_EVERY:
                out.flush()  # so a reader of the file sees what we have counted
                if sink.counts() != last_counts:
                    new = sink.counts()[0] - last_counts[0]
                    print(f"sink: {sink.written} records (+{new / (now - last_time):.0f}/s), "
                          f"{sink.counts()[1]} frames rejected", file=sys.stderr, flush=True)
                last_counts, last_time = sink.counts(), now
        # What already arrived is written; the file is then closed holding whole lines only.
        sink.drain(pull, max_seconds=2.0)
    pull.close(linger=0)
    context.term()
    print(f"sink: stopped by {signal.Signals(stopping[0]).name}: {sink.summary()} to {args.log_file}",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
