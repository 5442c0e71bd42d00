"""
Report on collected files: whether they hold every record of every process, then per run and request name
the exact response time percentiles.

Usage::

    python report.py requests.jsonl                           # a sink's file
    python report.py requests.jsonl local.*.jsonl --require-complete   # fill its gaps from local copies
    python report.py requests.jsonl --run RUN_ID --timeline timeline.csv --json
    python report.py requests.jsonl --html report.html        # a page with charts (pip install plotly)
    python report.py requests.jsonl --follow                  # while the test runs; the report when it ends
    python report.py requests.jsonl --skip-first 30s --check 'each: p95 < 500' --check 'failures < 1%' \
        --baseline last-week.jsonl --check 'p95 < baseline + 10%' --junit checks.xml   # a verdict for CI

Files are read as one: a record in several of them (the same ``worker`` and ``seq``) counts once. Each
process numbers its records 1, 2, 3, ... and ends with a record that says how many it made, so a gap in the
numbers is a missing record, and a process without that end record did not quit cleanly: what it made
after its last record here is unknown. Records without ``seq`` (from other clients) count as they are,
but cannot be checked. ``--require-complete`` exits 1 unless every process is there whole.

Then per run: per request name and in total, requests, failures, requests/s and the 50th, 90th, 95th and
99th percentile and the maximum, from every raw response time; the status codes per name; the failures,
grouped as Locust's failures table groups them (by Locust's error text, which is the record's); each
worker's peak CPU and memory from its resource samples. ``--timeline`` also writes one CSV row per second
of each run, ``--html`` one self-contained page with the tables and charts per second. ``--json`` prints
it all as one JSON object.

Then the verdict, for CI: each ``--check`` rule on each run (exit 1 if one fails), a ``--baseline`` run
compared name by name, within ``--skip-first`` and ``--skip-last`` of each run. Each percentile carries its
95% confidence interval: two of the sorted values, at ranks from the binomial distribution, whatever the
distribution of the times; each failure rate its own (Clopper-Pearson). A check whose interval reaches across
its threshold is within the noise, and ``--noise`` says how to judge it. ``--junit`` and ``--markdown`` write
the verdict for a CI system. Exit status: 0, or 1 for FAIL or files it cannot use, 2 for a bad command line.
"""

import argparse
import contextlib
import csv
import heapq
import html
import json
import math
import operator
import os
import re
import signal
import sys
import time
from array import array
from bisect import bisect_right
from collections import Counter, defaultdict
from datetime import datetime, timezone
from fractions import Fraction
from itertools import chain
from xml.etree import ElementTree

from sink import BOM, decoder, simdjson, simdjson_parser  # what a record is, decided as the sink decides it

PERCENTILES = (50, 90, 95, 99)
TIMELINE_PERCENTILES = (50, 95, 99)
CPU_WARNING = 90  # percent of one core, where Locust warns that a worker's response times are suspect
# The locustfile's `time`: fixed width, so that comparing two as strings compares them as times.
TIME_FORMAT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
OBJECTS = (dict, simdjson.Object) if simdjson else (dict,)
MAX_SEQ = 1 << 63  # a seq this large is a broken line, not a count: no process makes that many records


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
    return ordered[-(-len(ordered) * percent // 100) - 1]  # rank ceil(n * percent / 100), exact (int or Fraction)


def rank_interval(n, percent, confidence=0.95):
    """The ranks (from 1) of two of n sorted values between which the true percentile lies with at least
    `confidence`, whatever the distribution: how many values fall below it is binomial(n, percent / 100).
    The lower rank is the highest whose binomial tail below is at most (1 - confidence) / 2, the upper the
    lowest whose tail above is; None where n is too small for one (the interval is open on that side)."""
    q, tail = float(percent) / 100, (1 - confidence) / 2
    spread = math.sqrt(n * q * (1 - q))
    k = max(0, int(n * q - 8 * spread) - 8)  # the binomial mass below this is under 1e-15
    probability = math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                           + k * math.log(q) + (n - k) * math.log1p(-q))
    below = 0.0  # P(count < k)
    lower = None
    while k <= n:
        if below >= 1 - tail:
            return lower, k
        if below <= tail and k:
            lower = k
        below += probability
        probability *= (n - k) / (k + 1) * q / (1 - q)
        k += 1
    return lower, None


def percentile_interval(ordered, percent):
    """The 95% confidence interval of a percentile of these sorted values, [low, high]; None for an open side."""
    return [None if rank is None else ordered[rank - 1] for rank in rank_interval(len(ordered), percent)]


def rate_interval(failures, requests, confidence=0.95):
    """The 95% confidence interval of a failure rate, in percent: Clopper and Pearson's, which holds the true
    rate with at least that probability, as the percentiles' intervals do, also near 0% (where Wilson's holds it
    in as few as 85% of runs of 50 requests). Its ends are where the binomial tail of the failures counted is
    (1 - confidence) / 2: beta distribution quantiles."""
    tail = (1 - confidence) / 2
    low = beta_quantile(failures, requests - failures + 1, tail) if failures else 0.0
    high = 1.0 if failures == requests else beta_quantile(failures + 1, requests - failures, 1 - tail)
    return [100 * low, 100 * high]


def beta_quantile(a, b, probability):
    """The x where the regularized incomplete beta function I_x(a, b) reaches probability, by bisection."""
    low, high = 0.0, 1.0
    while high - low > 1e-12:
        middle = (low + high) / 2
        low, high = (middle, high) if incomplete_beta(a, b, middle) < probability else (low, middle)
    return (low + high) / 2


def incomplete_beta(a, b, x):
    """I_x(a, b), from its continued fraction (Numerical Recipes, 6.4), which converges fast below its mean."""
    if x > (a + 1) / (a + b + 2):
        return 1 - incomplete_beta(b, a, 1 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    c, d, m = 1.0, 1 / (1 - (a + b) * x / (a + 1) or 1e-300), 1  # Lentz's method
    fraction = d
    while True:
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d, c = 1 / (1 + numerator * d or 1e-300), 1 + numerator / c or 1e-300
            fraction *= d * c
        if abs(d * c - 1) < 1e-14 or m > 100_000:
            return front * fraction
        m += 1


class Process:
    """Which records of one process the files hold: its seqs as sorted, disjoint ranges [start, end), so
    memory grows with the gaps, not with the records; and whether its end record is there."""

    def __init__(self, hostname):
        self.hostname = hostname
        self.starts, self.ends = [], []
        self.numbered = self.unnumbered = self.duplicates = 0
        self.ended = False
        self.role = None  # from its end record: master, worker or local

    def first_sight(self, seq):
        """Note seq as read; False if it was read before."""
        starts, ends = self.starts, self.ends
        if ends and ends[-1] == seq:  # the next record in order, as files almost always hold them
            ends[-1] = seq + 1
        else:
            i = bisect_right(starts, seq)  # ranges that start at or before seq
            if i and seq < ends[i - 1]:
                self.duplicates += 1
                return False
            joins_left, joins_right = i and ends[i - 1] == seq, i < len(starts) and starts[i] == seq + 1
            if joins_left and joins_right:
                ends[i - 1] = ends.pop(i)
                del starts[i]
            elif joins_left:
                ends[i - 1] = seq + 1
            elif joins_right:
                starts[i] = seq
            else:
                starts.insert(i, seq)
                ends.insert(i, seq + 1)
        self.numbered += 1
        return True

    def missing(self):
        """Records not read up to the highest seq read: up to the end record, if it is there."""
        return (self.ends[-1] - 1 if self.ends else 0) - self.numbered

    def complete(self):
        return self.ended and not self.missing() and not self.unnumbered


class Worker:
    """One worker's part of a run."""

    def __init__(self, hostname):
        self.hostname = hostname
        self.requests = self.samples = 0
        self.peak_cpu = self.peak_rss = 0
        self.cpu = []  # (time, cpu_percent) of each resource sample: one every few seconds


class Second:
    """One second of a run, for the timeline and the charts."""

    def __init__(self):
        self.response_times = defaultdict(lambda: array("d"))  # (request_type, name) -> milliseconds
        self.failures = Counter()  # (request_type, name) -> failed requests
        self.peak_cpu = None

    def requests(self, key=None):
        """The sorted response times and the failures of one name, or of every request when key is None; then
        p50, p95, p99 and max, or Nones for a second without requests."""
        if key is None:
            ordered, failures = sorted(chain.from_iterable(self.response_times.values())), self.failures.total()
        else:
            ordered, failures = sorted(self.response_times.get(key, ())), self.failures.get(key, 0)
        times = [percentile(ordered, p) for p in TIMELINE_PERCENTILES] + [ordered[-1]] if ordered else [None] * 4
        return len(ordered), failures, times


class Run:
    """What the report keeps of one run: counts, and each response time as an 8-byte float."""

    def __init__(self, over_time):
        self.outside = 0  # requests left out by --skip-first and --skip-last
        self.response_times = defaultdict(lambda: array("d"))  # (request_type, name) -> milliseconds
        self.failures = Counter()  # (request_type, name) -> failed requests
        self.errors = Counter()  # (request_type, name, error) -> failed requests, as Locust's failures table
        self.statuses = Counter()  # ((request_type, name), status code) -> requests
        self.first_end = self.last_end = None  # of any request, as `time` strings
        self.workers = {}
        self.seconds = defaultdict(Second) if over_time else None  # "2026-11-28T19:04:20" -> Second

    def worker(self, worker, hostname):
        if worker not in self.workers:
            self.workers[worker] = Worker(hostname)
        return self.workers[worker]

    def add_request(self, when, worker, hostname, key, response_time, failed, status, error):
        self.worker(worker, hostname).requests += 1
        self.response_times[key].append(response_time)
        if failed:
            self.failures[key] += 1
            self.errors[(*key, error)] += 1
        if status is not None:
            self.statuses[key, status] += 1
        if self.first_end is None or when < self.first_end:
            self.first_end = when
        if self.last_end is None or when > self.last_end:
            self.last_end = when
        if self.seconds is not None:
            second = self.seconds[when[:19]]
            second.response_times[key].append(response_time)
            if failed:
                second.failures[key] += 1

    def add_sample(self, when, worker, hostname, cpu, rss):
        worker = self.worker(worker, hostname)
        worker.samples += 1
        worker.peak_cpu = max(worker.peak_cpu, cpu)
        worker.peak_rss = max(worker.peak_rss, rss)
        worker.cpu.append((when, cpu))
        if self.seconds is not None:
            second = self.seconds[when[:19]]
            second.peak_cpu = cpu if second.peak_cpu is None else max(second.peak_cpu, cpu)


class Collected:
    """Reads collected files line by line, keeping per process the seqs read, and per run what the report
    needs; never the records."""

    def __init__(self, only_run, over_time, windows):
        self.only_run = only_run
        self.over_time = over_time
        self.windows = windows  # run id -> (from, to): the `time`s of the records it keeps of that run
        self.processes = {}  # worker -> Process
        self.runs = {}  # run id -> Run, in the order of each run's first line
        self.run_ids = set()
        self.lines = Counter()  # request, sample, other (records), another run, duplicate, skipped, unreadable
        self.first_unreadable = None

    def read(self, path, progress):
        with open(path, "rb") as file:
            self.take_lines(file, path, 1, lambda: progress.show(file.tell(), self.lines.total()))
            progress.done += file.tell()

    def take_lines(self, lines, path, first_line, every_65536_lines=None):
        """Count each line, numbered from first_line in the file at path."""
        for line_number, line in enumerate(lines, first_line):
            try:
                self.lines[self.take(read_json(line))] += 1
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                self.lines["unreadable"] += 1
                self.first_unreadable = self.first_unreadable or f"{path} line {line_number}"
            if not line_number & 0xFFFF and every_65536_lines:
                every_65536_lines()

    def take(self, record):
        """Count one record and say what it was, or raise ValueError, before counting anything, if it lacks
        what a record of locustfile.py has."""
        message = record.get("message") if type(record) in OBJECTS else None
        if message is None:
            return "skipped"  # JSON, but no record of a process
        when, worker, hostname = record["time"], record["worker"], record["hostname"]
        run_id, seq = record.get("run_id"), record.get("seq")
        if not (type(when) is type(worker) is type(hostname) is str and TIME_FORMAT.fullmatch(when)
                and (run_id is None or type(run_id) is str)
                and (seq is None or type(seq) is int and 0 < seq < MAX_SEQ)):
            raise ValueError("not a record of locustfile.py")
        kind = message.get("class") if type(message) in OBJECTS else None
        if kind == "request":
            request_type, name, result, response_time = (message["request_type"], message["name"], message["result"],
                                                         message["response_time"])
            status, error = message.get("status"), message.get("exception") if result != "success" else None
            if not (type(request_type) is type(name) is type(result) is str and is_number(response_time)
                    and (status is None or type(status) is int) and (error is None or type(error) is str)):
                raise ValueError("not a request record")
        elif kind == "resources":
            cpu, rss = message["cpu_percent"], message["rss_bytes"]
            if not (is_number(cpu) and is_number(rss)):
                raise ValueError("not a resource record")
        elif kind == "end" and (seq is None or message["records"] != seq):
            raise ValueError("an end record counts the records of its process, itself included: its seq")

        process = self.processes.get(worker)
        if process is None:
            process = self.processes[worker] = Process(hostname)
        if seq is None:
            process.unnumbered += 1
        elif not process.first_sight(seq):
            return "duplicate"
        self.run_ids.add(run_id)
        if kind == "end":
            process.ended, process.role = True, message.get("role")
        if kind not in ("request", "resources"):
            return "other"
        if self.only_run is not None and run_id != self.only_run:
            return "another run"
        run = self.runs.get(run_id) or self.runs.setdefault(run_id, Run(self.over_time))
        window = self.windows.get(run_id)
        if window and not window[0] <= when <= window[1]:
            run.outside += kind == "request"
            return "outside_window"
        if kind == "request":
            run.add_request(when, worker, hostname, (request_type, name), response_time, result != "success", status,
                            error)
            return "request"
        run.add_sample(when, worker, hostname, cpu, rss)
        return "sample"


def collect(paths, only_run, over_time, skip):
    """The files read as one. With a window, read twice: first to learn when each run's requests ended."""
    windows = {}
    if any(skip):
        whole = collect(paths, only_run, False, (0, 0))
        windows = {run_id: window_of(run, *skip) for run_id, run in whole.runs.items() if run.first_end}
    collected = Collected(only_run, over_time, windows)
    progress = Progress(sum(os.path.getsize(path) for path in paths))
    for path in paths:
        collected.read(path, progress)
    progress.end()
    return collected


def window_of(run, skip_first, skip_last):
    """The `time`s of the requests a run's window keeps, both ends included: from skip_first ms after its
    first request ended to skip_last ms before its last one did; then when those two ended."""
    first, last = (int(epoch(when[:19])) * 1000 + int(when[20:23]) for when in (run.first_end, run.last_end))
    return time_text(first + skip_first), time_text(last - skip_last), run.first_end, run.last_end


def seconds_of(value, option, above_zero):
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (0 < seconds if above_zero else 0 <= seconds) or not math.isfinite(seconds):
        raise ValueError(f"--{option} {value!r}: expected seconds, {'above 0' if above_zero else '0 or more'}")
    return seconds


def time_text(milliseconds):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(milliseconds // 1000)) + f".{milliseconds % 1000:03d}Z"


def milliseconds_of(duration, option):
    match = re.fullmatch(NUMBER + r"\s*(ms|s|m)?", duration.strip())
    if not match:
        raise ValueError(f"{option} {duration!r}: expected a duration, as 30s, 500ms or 2m")
    return round(float(match[1]) * {"ms": 1, "s": 1000, "m": 60_000, None: 1000}[match[2]])


class Progress:
    """Bytes read of all files and records a second, on stderr, once reading has taken a second; only on a
    terminal, where a line that redraws itself is seen, not stored in a log."""

    def __init__(self, total_bytes):
        self.total, self.done, self.started, self.shown = total_bytes, 0, time.monotonic(), False

    def show(self, position, records):
        seconds = time.monotonic() - self.started
        if seconds > 1 and sys.stderr.isatty():
            print(f"\rreport: read {(self.done + position) / 1e6:,.0f} of {self.total / 1e6:,.0f} MB, "
                  f"{records / seconds:,.0f} records/s", end="", file=sys.stderr, flush=True)
            self.shown = True

    def end(self):
        if self.shown:
            print(file=sys.stderr)


def is_number(value):
    return type(value) in (int, float) and math.isfinite(value)


def epoch(when):
    """Unix seconds of a `time` string, with or without its milliseconds and Z."""
    return datetime.fromisoformat(when.rstrip("Z")).replace(tzinfo=timezone.utc).timestamp()


# --- What a run must hold to pass: --check rules, and a baseline run to hold it against -----------

# [NAME:] METRIC OP VALUE. NAME is greedy: a name may hold a colon ("GET http://host/a: p95 < 300").
RULE = re.compile(r"(?:(?P<scope>.*\S)\s*:)?\s*(?P<metric>[a-z][a-z0-9.]*)\s*(?P<op><=|>=|<|>|=)\s*(?P<value>.*?)\s*")
NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
ABSOLUTE, RELATIVE = re.compile(NUMBER + r"\s*(ms|s|%)?"), re.compile(r"baseline(?:\s*([+-])\s*" + NUMBER + r"\s*%)?")
OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "=": operator.eq}
UNITS = {"requests": (None,), "failures": (None, "%"), "rps": (None,), "max": (None, "ms", "s")}  # and percentiles
METRICS = "requests, failures, rps, max or a percentile (p50, p95, p99.9, ...)"


class Check:
    """One --check rule, read before the files are: a mistake in it costs no minutes of reading."""

    def __init__(self, rule, baseline):
        def mistake(what):
            return ValueError(f"--check {rule!r}: {what}")
        match = RULE.fullmatch(rule)
        if not match:
            raise mistake("expected [NAME:] METRIC OP VALUE, as 'p95 < 300ms' or 'each: failures < 1%'")
        self.rule, self.scope, self.metric, self.op, value = rule, *match.group("scope", "metric", "op", "value")
        self.condition = rule[match.start("metric"):].strip()  # the rule without its name: "p95 < 300"
        if re.fullmatch(r"p" + NUMBER, self.metric) and 0 < float(self.metric[1:]) < 100:
            self.metric = "p" + repr(float(self.metric[1:])).removesuffix(".0")  # p95.0 and p95 are one column
        elif self.metric not in UNITS:
            raise mistake(f"unknown metric {self.metric!r}: expected {METRICS}")
        relative, absolute = RELATIVE.fullmatch(value), ABSOLUTE.fullmatch(value)
        if relative:
            if not baseline:
                raise mistake("refers to a baseline: give its files with --baseline FILE...")
            self.threshold, self.factor = None, 1 + float(relative[1] + relative[2]) / 100 if relative[1] else 1
        elif absolute:
            unit = absolute[2]
            if unit not in UNITS.get(self.metric, UNITS["max"]):
                units = " or ".join(u or "a bare number" for u in UNITS.get(self.metric, UNITS["max"]))
                raise mistake(f"{self.metric} takes {units}, not {unit or 'a bare number'}")
            self.threshold = float(absolute[1]) * (1000 if unit == "s" else 1)
        else:
            raise mistake(f"bad value {value!r}: expected a number (ms, s, % where they fit) or baseline, "
                          "baseline + N%, baseline - N%")
        self.rate = self.metric == "failures" and (relative or absolute[2] == "%")  # failures as % of requests
        self.unit = "%" if self.rate else {"requests": "", "failures": "", "rps": "/s"}.get(self.metric, "ms")
        self.interval = "failure_percent" if self.rate else self.metric  # its key in a row's intervals

    def value(self, row):
        if self.rate:
            return 100 * row["failures"] / row["requests"]
        return row["requests_per_second" if self.metric == "rps" else self.metric]

    def rows(self, run):
        """The rows of a run this rule checks; ValueError if it names a name the run does not hold."""
        if self.scope is None:
            return [run["total"]]
        if self.scope == "each":
            return run["names"]
        rows = [row for row in run["names"] if self.scope in (row["name"], row_name(row))]
        if not rows:
            raise ValueError(f"--check {self.rule!r}: run {run['run_id']} has no requests named {self.scope!r}; its "
                             f"names: {', '.join(row_name(row) for row in run['names'])}")
        return rows

    def evaluate(self, row, baseline_row, noise):
        """The verdict on one row. One within the noise (its 95% interval reaches across the threshold, or the
        baseline's interval, so that it could go either way) is the measured value's, or `noise`: pass, warn, fail."""
        measured, interval = self.value(row), row["intervals"].get(self.interval)
        verdict = {"rule": self.rule, "condition": self.condition, "name": row_name(row), "metric": self.metric,
                   "unit": self.unit, "op": self.op, "measured": measured, "interval": interval,
                   "threshold": self.threshold, "threshold_interval": None}
        if self.threshold is None:
            if baseline_row is None:
                return {**verdict, "verdict": "no baseline", "within_noise": None}
            base = self.value(baseline_row)
            verdict["threshold"] = None if base is None else base * self.factor
            if interval:
                verdict["threshold_interval"] = [None if b is None else b * self.factor
                                                 for b in baseline_row["intervals"][self.interval]]
        threshold = verdict["threshold"]
        passed = None not in (measured, threshold) and OPERATORS[self.op](measured, threshold)
        within = bool(interval) and threshold is not None and overlap(interval, verdict["threshold_interval"]
                                                                       or [threshold, threshold])
        decided = noise if within and noise != "measured" else "pass" if passed else "fail"
        return {**verdict, "verdict": decided, "within_noise": within}


def overlap(one, other):
    """Whether two intervals [low, high] share a value; None is an open side."""
    return ((one[0] is None or other[1] is None or one[0] <= other[1])
            and (other[0] is None or one[1] is None or other[0] <= one[1]))


def row_name(row):
    return f"{row['request_type']} {row['name']}".strip()


def rows_of(run):
    """A run's rows: one per name, then the total, named Aggregated as in Locust's tables."""
    return run["names"] + ([run["total"]] if run["total"] else [])


def check_run(run, checks, baseline, noise):
    """Each rule's verdict on each row it checks; baseline is the baseline run's summary, or None."""
    base = {row_name(row): row for row in rows_of(baseline)} if baseline else {}
    return [check.evaluate(row, base.get(row_name(row)), noise) for check in checks for row in check.rows(run)]


COMPARED = {"requests": "", "failure_percent": "%", "requests_per_second": "/s", "p50": "ms", "p95": "ms",
            "p99": "ms", "max": "ms"}  # with the unit each is shown in


NOISY = ("failure_percent", "p50", "p95", "p99")  # what has a 95% interval, compared run against run


def compare(run, baseline):
    """Per name and in total, this run's numbers beside the baseline's, with the change: in percent, in
    points for the failure rate. A failure rate or percentile whose two 95% intervals overlap has changed
    within the noise of the two runs; `changed` lists those that moved beyond it."""
    def rows(summary):
        return {row_name(row): {**row, "failure_percent": 100 * row["failures"] / row["requests"]}
                for row in rows_of(summary)}
    this, base = rows(run), rows(baseline)
    comparison = []
    for name in sorted(this.keys() - {"Aggregated"} | base.keys() - {"Aggregated"}) + ["Aggregated"]:
        a, b = this.get(name), base.get(name)
        metrics = {}
        for metric in COMPARED:
            now, before = a and a[metric], b and b[metric]
            entry = metrics[metric] = {"this": now, "baseline": before, "change": None}
            if None not in (now, before):
                entry["change"] = now - before if metric == "failure_percent" else (
                    100 * (now - before) / before if before else None)
            if metric in NOISY:
                entry["intervals"] = [a and a["intervals"][metric], b and b["intervals"][metric]]
                entry["within_noise"] = None if None in (a, b) else overlap(*entry["intervals"])
        comparison.append({"name": name, "metrics": metrics,
                           "changed": [m for m in NOISY if metrics[m]["within_noise"] is False]})
    return comparison


# --- What the report says, as one object: printed as tables, or as JSON with --json ------------------

def summarize(files, collected, percentiles):
    processes = [{"worker": worker, "hostname": process.hostname, "records": process.numbered + process.unnumbered,
                  "missing": process.missing(), "ended": process.ended, "role": process.role,
                  "duplicates": process.duplicates, "unnumbered": process.unnumbered}
                 for worker, process in sorted(collected.processes.items())]
    return {
        "files": files,
        "complete": bool(processes) and all(process.complete() for process in collected.processes.values()),
        "missing": sum(process["missing"] for process in processes),
        "lines": {**{kind: collected.lines[kind] for kind in ("request", "sample", "outside_window", "other",
                                                              "duplicate", "skipped", "unreadable")},
                  "first_unreadable": collected.first_unreadable},
        "processes": processes,
        "runs": [summarize_run(run_id, run, percentiles, collected.windows.get(run_id))
                 for run_id, run in collected.runs.items()],
    }


def summarize_run(run_id, run, percentiles, window=None):
    span = epoch(run.last_end) - epoch(run.first_end) if run.first_end else 0.0
    statuses, every_status = defaultdict(dict), Counter()  # (request_type, name) -> {"200": requests, ...}
    for (key, status), requests in sorted(run.statuses.items(), key=lambda item: item[0][1]):
        statuses[key][str(status)] = requests
        every_status[str(status)] += requests
    names = []
    for key in sorted(run.response_times, key=lambda key: (key[1], key[0])):
        ordered = sorted(run.response_times[key])
        run.response_times[key] = array("d", ordered)  # sorted, for the total's merge; the list is freed
        names.append({"request_type": key[0], "name": key[1],
                      **request_stats(ordered, run.failures[key], span, percentiles), "status": statuses[key]})
    total = None
    if names:
        ordered = array("d", heapq.merge(*run.response_times.values()))
        total = {"request_type": "", "name": "Aggregated",
                 **request_stats(ordered, sum(run.failures.values()), span, percentiles), "status": dict(every_status)}
    failures = [{"request_type": request_type, "name": name, "error": error, "occurrences": occurrences}
                for (request_type, name, error), occurrences in sorted(
                    run.errors.items(), key=lambda item: (-item[1], item[0][1], item[0][0], str(item[0][2])))]
    workers = [{"worker": name, "hostname": worker.hostname, "requests": worker.requests, "samples": worker.samples,
                "peak_cpu_percent": worker.peak_cpu if worker.samples else None,
                "peak_rss_bytes": worker.peak_rss if worker.samples else None}
               for name, worker in sorted(run.workers.items())]
    return {"run_id": run_id, "first_end": run.first_end, "last_end": run.last_end, "seconds": span,
            "window": window and dict(zip(("from", "to", "run_first_end", "run_last_end"), window),
                                      requests_outside=run.outside),
            "names": names, "total": total, "failures": failures, "workers": workers}


def request_stats(ordered, failures, span, percentiles):
    return {"requests": len(ordered), "failures": failures,
            "requests_per_second": len(ordered) / span if span else None,
            **{key: percentile(ordered, p) for key, p in percentiles.items()}, "max": ordered[-1],
            "intervals": {**{key: percentile_interval(ordered, p) for key, p in percentiles.items()},
                          "failure_percent": rate_interval(failures, len(ordered))}}


def print_report(report, only_run):
    print(verdict(report))
    lines = report["lines"]
    print(f"{', '.join(report['files'])}: request records {lines['request']}, resource samples {lines['sample']}"
          + (f" (of run {only_run})" if only_run is not None else "")
          + (f", records outside the window {lines['outside_window']}" if report["skip"] else "")
          + f", other records {lines['other']}, duplicates merged {lines['duplicate']}, lines skipped "
          f"{lines['skipped']} (JSON, but not records), unreadable lines {lines['unreadable']}"
          + (f" (the first: {lines['first_unreadable']})" if lines["unreadable"] else ""))
    print()
    if report["processes"]:
        print_processes(report)
    if not report["runs"]:
        print("No request records and no resource samples: nothing more to report.")
    for run in report["runs"]:
        print_run(run)
        print_workers(run["workers"])
        if run.get("comparison"):
            print_comparison(run["comparison"], report["baseline"])
    for run in report["runs"]:
        if run.get("checks"):
            print(f"Checks of run {run['run_id']}")
            print_table(["rule", "name", "measured", "95% interval", "threshold", "verdict"],
                        [check_row(check) for check in run["checks"]])
            print()


def print_table(header, rows):
    widths = [max(map(len, column)) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def shown(value, unit):
    """A measured value or threshold as the tables write it."""
    if value is None:
        return "-"
    return f"{value:.2f}{unit}" if unit == "%" else f"{value:.2f} ms" if unit == "ms" else (
        f"{value:.1f}/s" if unit == "/s" else f"{value:g}")


def shown_interval(interval, unit):
    """A 95% interval, of response times in ms or of a failure rate in %, "…" on a side that too few values
    leave open."""
    return "" if not interval else "–".join("…" if end is None else f"{end:.2f}" for end in interval) + (
        "%" if unit == "%" else " ms")


VERDICTS = {"pass": "pass", "warn": "WARN", "fail": "FAIL", "no baseline": "no baseline: not checked"}


def check_row(check):
    note = VERDICTS[check["verdict"]]
    if check["within_noise"]:
        note += ", within the noise: the 95% interval reaches across the threshold"
    threshold = f"{check['op']} {shown(check['threshold'], check['unit'])}"
    if check["threshold_interval"]:
        threshold += f" ({shown_interval(check['threshold_interval'], check['unit'])} from the baseline's interval)"
    return [check["rule"], check["name"], shown(check["measured"], check["unit"]),
            shown_interval(check["interval"], check["unit"]), threshold, note]


def print_comparison(comparison, baseline):
    """This run, the baseline and the change, three lines per name."""
    print(f"Against the baseline ({', '.join(baseline['files'])}, run {baseline['run_id']}): {COMPARISON_KEY}")
    print_table(COMPARISON_HEADER, comparison_rows(comparison))
    print()


COMPARISON_KEY = ("failure rates and percentiles with their 95% intervals; change in %, of the failure rate in "
                  "points; ~ marks a change within the noise of the two runs (their intervals overlap)")
COMPARISON_HEADER = ["name", "", "requests", "failures", "req/s", "p50", "p95", "p99", "max", ""]


def comparison_rows(comparison):
    rows = []
    for row in comparison:
        metrics = [(row["metrics"][metric], unit) for metric, unit in COMPARED.items()]
        for side, (label, key) in enumerate((("this run", "this"), ("baseline", "baseline"))):
            rows.append([row["name"] if not side else "", label, *(shown(m[key], unit) + (
                f" ({shown_interval(m['intervals'][side], unit)})" if m.get("intervals") and m["intervals"][side]
                else "") for m, unit in metrics), ""])
        rows.append(["", "change", *(("~" if m.get("within_noise") else "") + (
            "-" if m["change"] is None else f"{m['change']:+.1f}" + (" pt" if unit == "%" else "%"))
            for m, unit in metrics),
            "beyond the noise: " + ", ".join("failures" if m == "failure_percent" else m for m in row["changed"])
            if row["changed"] else ""])
    return rows


def decides(report):
    """Whether the report has a verdict beyond completeness to give: rules to check, or --require-complete."""
    return bool(report["rules"] or report["require_complete"])


NOISE = {"measured": "decided by the measured value", "pass": "passed (--noise pass)",
         "warn": "passed with a warning (--noise warn)", "fail": "failed (--noise fail)"}


def decide(report):
    """PASS or FAIL; a headline, "FAIL: 2 of 9 checks failed"; and one line that says why: the checks and, with
    --require-complete, completeness."""
    checks = [check for run in report["runs"] for check in run.get("checks") or ()]
    failed = [f"{check['rule']} ({check['name']}: {shown(check['measured'], check['unit'])})"
              for check in checks if check["verdict"] == "fail"]
    findings = []
    if report["rules"] and not checks:
        findings.append("no run has requests to check")
    elif failed:
        findings.append(f"{len(failed)} of {count(len(checks), 'check')} failed")
    elif report["rules"]:
        passes, every = sum(check["verdict"] in ("pass", "warn") for check in checks), count(len(checks), "check")
        findings.append(f"{passes} of {every} passed" if passes < len(checks) else f"all {every} passed" if passes > 1
                        else f"{every} passed")
    noisy = sum(bool(check["within_noise"]) for check in checks)
    if noisy:
        findings.append(f"{count(noisy, 'check')} within the noise, {NOISE[report['noise']]}")
    if any(check["verdict"] == "no baseline" for check in checks):
        findings.append("names the baseline lacks were not checked")
    if report["require_complete"]:
        findings.append("every record is there" if report["complete"] else "records are missing")
    passed = not failed and (checks or not report["rules"]) and (report["complete"] or not report["require_complete"])
    word = "PASS" if passed else "FAIL"
    line = "; ".join([findings[0] + (f": {', '.join(failed)}" if failed else ""), *findings[1:]]) if findings else ""
    return bool(passed), f"{word}: {findings[0]}" if findings else word, f"{word}: {line or 'nothing to check'}."


def verdict(report):
    """One line: are all records of every process in the files?"""
    processes = report["processes"]
    if not processes:
        return "INCOMPLETE: no records of any process."
    if report["complete"]:
        return f"Complete: all {sum(p['records'] for p in processes)} records of {count(len(processes), 'process')}."
    missing = [p for p in processes if p["missing"]]
    not_ended = [p for p in processes if not p["ended"]]
    unnumbered = [p for p in processes if p["unnumbered"]]
    findings = []
    if missing:
        findings.append(f"{report['missing']} records missing from {len(missing)} of "
                        f"{count(len(processes), 'process')}")
    if not_ended:
        findings.append(f"{len(not_ended)} of {count(len(processes), 'process')} did not end cleanly, so what they "
                        "made last is unknown")
    if unnumbered:
        findings.append(f"{sum(p['unnumbered'] for p in unnumbered)} records without seq, from "
                        f"{count(len(unnumbered), 'process')}, cannot be checked")
    return f"INCOMPLETE: {'; '.join(findings)}."


def print_processes(report):
    """Each process: its records in the files, how many are missing, and whether it ended cleanly."""
    processes = report["processes"]
    worker_width = max(len("Process"), *(len(p["worker"]) for p in processes))
    host_width = max(len("host"), *(len(p["hostname"]) for p in processes))
    print(f"{'Process':<{worker_width}} {'host':<{host_width}} {'records':>9} {'missing':>9}  ended")
    for p in processes:
        ended = (ended_text(p) if p["ended"] else "no: did not end cleanly, its tail is unknown") + (
            f"; {p['unnumbered']} records without seq: not checkable" if p["unnumbered"] else "")
        print(f"{p['worker']:<{worker_width}} {p['hostname']:<{host_width}} {p['records']:>9} {p['missing']:>9}  "
              f"{ended}")
    if not report["complete"] and len(report["files"]) == 1:
        print("A process's own local file (LOCUST_LOG_FILE) can fill the gaps: python report.py FILE local.*.jsonl")
    print()


def ended_text(process):
    """"yes", and the process's part in the test: a master's only record is its end record."""
    return f"yes ({process['role']})" if process["role"] else "yes"


def count(n, noun):
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("s") else f"{n} {noun}s"


def print_run(run):
    run_id = run["run_id"] if run["run_id"] is not None else "null (records made before any test started)"
    if run["first_end"]:
        print(f"Run {run_id}: requests ended from {run['first_end']} to {run['last_end']} "
              f"({run['seconds']:.1f} s)")
    else:
        print(f"Run {run_id}: no requests")
    if run["window"]:
        print(window_text(run["window"]))
    width = max([len(row["name"]) for row in run["names"]] + [len("Aggregated")])
    print(table_row("Type", "Name", width, ["requests", "failures", "req/s", *(f"p{p}" for p in PERCENTILES), "max"])
          + "   (response times in ms)")
    for row in rows_of(run):
        rate = f"{row['requests_per_second']:.1f}" if row["requests_per_second"] else "-"
        times = [f"{row[f'p{p}']:.2f}" for p in PERCENTILES] + [f"{row['max']:.2f}"]
        print(table_row(row["request_type"], row["name"], width, [row["requests"], row["failures"], rate, *times]))
    print()
    if any(row["status"] for row in run["names"]):
        print(f"{'Type':<6} {'Name':<{width}} status codes: requests (0: no response)")
        for row in run["names"]:
            codes = ", ".join(f"{code}: {requests}" for code, requests in row["status"].items()) or "-"
            print(f"{row['request_type']:<6} {row['name']:<{width}} {codes}")
        print()
    if run["failures"]:
        print(f"{'Type':<6} {'Name':<{width}} {'failures':>9}  error, as Locust groups failures")
        for failure in run["failures"]:
            print(f"{failure['request_type']:<6} {failure['name']:<{width}} {failure['occurrences']:>9}  "
                  f"{failure['error']}")
        print()


def window_text(window):
    return (f"Window: requests that ended from {window['from']} to {window['to']}, of the run's, which ended from "
            f"{window['run_first_end']} to {window['run_last_end']}; {window['requests_outside']} left out "
            "(--skip-first, --skip-last)")


def table_row(request_type, name, width, columns):
    return f"{request_type:<6} {name:<{width}} " + " ".join(f"{column:>9}" for column in columns)


def print_workers(workers):
    """Each worker of a run: its requests and resource samples, and a warning for each one that ran hot."""
    worker_width = max([len("Worker")] + [len(w["worker"]) for w in workers])
    host_width = max([len("host")] + [len(w["hostname"]) for w in workers])
    print(f"{'Worker':<{worker_width}} {'host':<{host_width}} {'requests':>9} {'samples':>8} {'peak CPU':>9} "
          f"{'peak RSS':>10}")
    for w in workers:
        cpu, rss = ((f"{w['peak_cpu_percent']:.1f}%", f"{w['peak_rss_bytes'] / 1e6:.1f} MB") if w["samples"]
                    else ("-", "-"))
        print(f"{w['worker']:<{worker_width}} {w['hostname']:<{host_width}} {w['requests']:>9} {w['samples']:>8} "
              f"{cpu:>9} {rss:>10}")
    for w in workers:
        if w["samples"] and w["peak_cpu_percent"] > CPU_WARNING:
            print(f"WARNING: worker {w['worker']} reached {w['peak_cpu_percent']:.1f}% CPU, above {CPU_WARNING}%: its "
                  f"response times include time its requests waited for the CPU.")
    print()


def every_second(run):
    """("2026-11-28T19:04:20", Second) for each second of a run, from its first record to its last, empty
    seconds included."""
    for moment in range(int(epoch(min(run.seconds))), int(epoch(max(run.seconds))) + 1):
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment))
        yield when, run.seconds.get(when) or Second()


def write_timeline(path, runs):
    """One row per second of each run."""
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["run_id", "second", "requests", "failures", *(f"p{p}_ms" for p in TIMELINE_PERCENTILES),
                         "max_ms", "max_worker_cpu_percent"])
        for run_id, run in runs:
            for when, second in every_second(run):
                requests, failures, times = second.requests()  # csv writes None as an empty field
                writer.writerow([run_id or "", when + "Z", requests, failures, *times,
                                 "" if second.peak_cpu is None else second.peak_cpu])


# --- The verdict for a CI system: JUnit XML (--junit), Markdown for a summary page (--markdown) ------

def write_junit(path, report, rules):
    """A test suite per run that keeps its name from build to build, so that a CI system follows each case's
    history: "report.py", or "report.py run N" where the files hold several runs, with the run's id as a
    property. A case per check and name: its classname the name as the tables write it, its name the rule
    without its name ("GET /" and "p95 < 500"), with the measured value, its interval and the threshold as
    properties and in its output. With --require-complete, one case more: every record is there."""
    runs = [run for run in report["runs"] if run["total"]]
    suites = ElementTree.Element("testsuites", name="report.py")
    # No run to check: every rule fails, under the names it has when there is one.
    for number, run in enumerate(runs or [None], 1):
        checks = run["checks"] if run else [
            {"rule": rule.rule, "condition": rule.condition, "name": rule.scope or "Aggregated", "verdict": "fail",
             "message": "no run has requests to check"} for rule in rules]
        suite = ElementTree.SubElement(suites, "testsuite", name="report.py" + (f" run {number}" * (len(runs) > 1)))
        properties = ElementTree.SubElement(suite, "properties")
        for name, value in (("run_id", run and run["run_id"]), ("files", " ".join(report["files"])),
                            ("noise", report["noise"])):
            ElementTree.SubElement(properties, "property", name=name, value=str(value))
        cases = [(check["name"], check["condition"], check["verdict"], check.get("message") or message(check),
                  measured_properties(check)) for check in checks]
        if report["require_complete"] and number == 1:
            outcome = "pass" if report["complete"] else "fail"
            cases.append(("completeness", "every record is there", outcome, verdict(report),
                          {"verdict": outcome, "missing": report["missing"], "processes": len(report["processes"])}))
        for classname, name, outcome, text, values in cases:
            case = ElementTree.SubElement(suite, "testcase", classname=classname, name=name, time="0")
            properties = ElementTree.SubElement(case, "properties")
            for key, value in values.items():
                ElementTree.SubElement(properties, "property", name=key, value=str(value))
            if outcome in ("fail", "no baseline"):
                ElementTree.SubElement(case, "failure" if outcome == "fail" else "skipped", message=text).text = text
            ElementTree.SubElement(case, "system-out").text = ("WARNING: " if outcome == "warn" else "") + text
        suite.set("tests", str(len(cases)))
        suite.set("failures", str(sum(outcome == "fail" for _, _, outcome, _, _ in cases)))
        suite.set("skipped", str(sum(outcome == "no baseline" for _, _, outcome, _, _ in cases)))
    ElementTree.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


def measured_properties(check):
    """What a check measured and held it against, unrounded, for a machine to read."""
    values = {"verdict": check["verdict"], "measured": check.get("measured"), "unit": check.get("unit"),
              "threshold": check.get("threshold"), "op": check.get("op"), "within_noise": check.get("within_noise")}
    for name in ("interval", "threshold_interval"):
        for side, end in zip(("low", "high"), check.get(name) or ()):
            values[f"{name}_{side}"] = end
    return {key: value for key, value in values.items() if value is not None}


def message(check):
    """What a check found, in one line."""
    if check["verdict"] == "no baseline":
        return f"the baseline has no requests named {check['name']}"
    return (f"{check['name']}: {check['metric']} {shown(check['measured'], check['unit'])}"
            + (f" (95% interval {shown_interval(check['interval'], check['unit'])})" if check["interval"] else "")
            + f", threshold {check['op']} {shown(check['threshold'], check['unit'])}"
            + (": within the noise" if check["within_noise"] else ""))


def markdown(report):
    """For a CI job's summary page: a short heading, PASS or FAIL with the count, and the line that says why;
    then per run its checks (failed first), its comparison with the baseline, and its table per name."""
    decided = decides(report)
    out = [f"## {md(report['headline'] if decided else verdict(report))}", "",
           *([md(report["decision"]), ""] * decided), md(verdict(report))]
    for run in report["runs"]:
        if not run["total"]:
            continue
        out += ["", f"### Run {md(str(run['run_id']))}", ""]
        if run["window"]:
            out += [md(window_text(run["window"])), ""]
        if run["checks"]:
            out += md_table(["check", "name", "measured", "95% interval", "threshold", "verdict"],
                            [check_row(check) for check in failed_first(run["checks"])]) + [""]
        if run["comparison"]:
            baseline = report["baseline"]
            out += [md(f"Against the baseline ({', '.join(baseline['files'])}, run {baseline['run_id']}): "
                       f"{COMPARISON_KEY}"), "", *md_table(COMPARISON_HEADER, comparison_rows(run["comparison"])), ""]
        out += md_table(["type", "name", "requests", "failures", "req/s", *(f"p{p} ms" for p in PERCENTILES),
                         "max ms"],
                        [[row["request_type"], row["name"], str(row["requests"]), str(row["failures"]),
                          shown(row["requests_per_second"], "/s"), *(f"{row[f'p{p}']:.2f}" for p in PERCENTILES),
                          f"{row['max']:.2f}"] for row in rows_of(run)])
    return "\n".join(out) + "\n"


def md(text):
    """Text as itself in GitHub's Markdown: a backslash before each character there that could start markup
    (emphasis, code, links, tables, strikethrough, an HTML tag or an entity), and only there."""
    return re.sub(r"[\\`*_\[\]|~]|<(?=[A-Za-z/!?])|&(?=#?\w+;)", lambda match: "\\" + match[0], text)


def md_table(header, rows):
    return ["| " + " | ".join(map(md, header)) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(md(cell) for cell in row) + " |" for row in rows)]


def failed_first(checks):
    return sorted(checks, key=lambda check: {"fail": 0, "warn": 1}.get(check["verdict"], 2))


# --- The same report as one page, with charts over time (--html) -------------------------------------

PAGE_STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.6em 0} td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
td.text,th.text{text-align:left}
.verdict{font-size:1.3em;font-weight:bold} .complete{color:#17692c} .incomplete{color:#b00020}"""
CHART_CONFIG = {"displaylogo": False, "responsive": True}


def write_html(path, report, runs, reload=None):
    """The verdict and the tables, then per run its charts; plotly's script is inlined once, so the page
    needs no network. Written whole or not at all, as --follow writes it again and again, then reloaded every
    `reload` seconds, if given, by the browser that shows it."""
    import plotly.io  # main() made sure it is there
    kinds = ("request", "sample", "outside_window", "other", "duplicate", "skipped", "unreadable")
    decided = decides(report)
    page = [f"<p class='verdict {'complete' if report['passed'] else 'incomplete'}'>"
            f"{html.escape(report['decision'])}</p>" if decided else "",
            f"<p class='{'' if decided else 'verdict '}{'complete' if report['complete'] else 'incomplete'}'>"
            f"{html.escape(verdict(report))}</p>",
            *(f"<h3>Checks of run {html.escape(str(run['run_id']))}</h3>" + html_table(
                ["check", "name", "measured", "95% interval", "threshold", "verdict"],
                [check_row(check) for check in failed_first(run["checks"])])
              for run in report["runs"] if run.get("checks")),
            f"<p>{html.escape(', '.join(report['files']))}: "
            + ", ".join(f"{kind} {report['lines'][kind]}" for kind in kinds
                        if report["skip"] or kind != "outside_window") + "</p>",
            html_table(["process", "host", "records", "missing", "ended"],
                       [[p["worker"], p["hostname"], p["records"], p["missing"], ended_text(p) if p["ended"] else "no"]
                        for p in report["processes"]])]
    scripts = iter([True])  # plotly.js goes into the first chart only
    for summary in report["runs"]:
        run = runs[summary["run_id"]]
        ended = (f"requests ended from {summary['first_end']} to {summary['last_end']} ({summary['seconds']:.1f} s)"
                 if summary["first_end"] else "no requests")
        page.append(f"<h2>Run {html.escape(str(summary['run_id']))}</h2><p>{ended}</p>")
        if summary["window"]:
            page.append(f"<p>{html.escape(window_text(summary['window']))}</p>")
        rows = rows_of(summary)
        page.append(html_table(
            ["type", "name", "requests", "failures", "req/s", *(f"p{p} ms" for p in PERCENTILES), "max ms",
             "status codes"],
            [[row["request_type"], row["name"], row["requests"], row["failures"],
              f"{row['requests_per_second']:.1f}" if row["requests_per_second"] else "-",
              *(f"{row[f'p{p}']:.2f}" for p in PERCENTILES), f"{row['max']:.2f}",
              ", ".join(f"{code}: {n}" for code, n in row["status"].items())] for row in rows]))
        if summary["failures"]:
            page.append("<h3>Failures, as Locust groups them</h3>" + html_table(
                ["type", "name", "error", "occurrences"],
                [[f["request_type"], f["name"], f["error"], f["occurrences"]] for f in summary["failures"]]))
        page.append(html_table(["worker", "host", "requests", "samples", "peak CPU %", "peak RSS MB"], [
            [w["worker"], w["hostname"], w["requests"], w["samples"], w["peak_cpu_percent"] or "-",
             f"{w['peak_rss_bytes'] / 1e6:.1f}" if w["samples"] else "-"] for w in summary["workers"]]))
        if summary.get("comparison"):
            page.append(f"<h3>Against the baseline: {html.escape(', '.join(report['baseline']['files']))}, run "
                        f"{html.escape(str(report['baseline']['run_id']))}</h3><p>{COMPARISON_KEY}</p>"
                        + html_table(COMPARISON_HEADER, comparison_rows(summary["comparison"])))
        for figure in run_figures(run):
            page.append(plotly.io.to_html(figure, full_html=False, include_plotlyjs=next(scripts, False),
                                          config=CHART_CONFIG, validate=False))
    refresh = f"<meta http-equiv='refresh' content='{reload:g}'>" if reload else ""
    with open(f"{path}.tmp", "w", encoding="utf-8") as out:
        out.write(f"<!doctype html><html><head><meta charset='utf-8'>{refresh}<title>Locust requests: "
                  f"{html.escape(', '.join(report['files']))}</title><style>{PAGE_STYLE}</style></head><body>"
                  + "\n".join(page) + "</body></html>\n")
    os.replace(f"{path}.tmp", path)


def html_table(header, rows):
    def cells(tag, values):
        return "".join(f"<{tag} class='text'>{html.escape(v)}</{tag}>" if isinstance(v, str)
                       else f"<{tag}>{v}</{tag}>" for v in values)
    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def run_figures(run):
    """Per second of a run: the response time percentiles, and the requests and failures, of all requests
    or of one name (a menu picks which); each worker's CPU at each resource sample."""
    keys = sorted(run.response_times, key=lambda key: (key[1], key[0]))
    series = defaultdict(list)  # (key or None for all requests, what) -> one value per second
    seconds = list(every_second(run))
    for _, second in seconds:
        for key in (None, *keys):
            requests, failures, times = second.requests(key)
            series[key, "requests"].append(requests)
            series[key, "failures"].append(failures)
            for what, value in zip(("p50", "p95", "p99", "max"), times):
                series[key, what].append(None if value is None else round(value, 3))
    # Evenly spaced: x0 and dx (ms) instead of a time for every point keep an hour of 50 names small.
    x = {"x0": seconds[0][0].replace("T", " "), "dx": 1000}
    xaxis = {"type": "date", "title": {"text": "UTC"}, "range": [x["x0"], seconds[-1][0].replace("T", " ") + ".999"]}
    menu = ["all requests", *(f"{request_type} {name}" for request_type, name in keys)]

    def over_time(title, whats, yaxis):
        traces = [{"type": "scatter", "mode": "lines", "name": what, "y": series[key, what], "visible": not i,
                   "connectgaps": False, **x} for i, key in enumerate((None, *keys)) for what in whats]
        buttons = [{"label": label, "method": "restyle",
                    "args": [{"visible": [j // len(whats) == i for j in range(len(traces))]}]}
                   for i, label in enumerate(menu)]
        return {"data": traces, "layout": {
            "title": {"text": title}, "height": 380, "hovermode": "x unified", "yaxis": yaxis,
            "xaxis": xaxis,
            "updatemenus": [{"buttons": buttons, "x": 1, "xanchor": "right", "y": 1.2, "yanchor": "top"}]}}

    cpu = [{"type": "scatter", "mode": "lines", "name": worker_id[-12:], "hovertext": worker_id,
            "x": [when.replace("T", " ").rstrip("Z") for when, _ in worker.cpu],
            "y": [value for _, value in worker.cpu]}
           for worker_id, worker in sorted(run.workers.items()) if worker.cpu]
    return [over_time("Response times per second (ms)", ("p50", "p95", "p99", "max"),
                      {"type": "log", "title": {"text": "ms"}}),
            over_time("Requests and failures per second", ("requests", "failures"), {"rangemode": "tozero"}),
            {"data": cpu, "layout": {"title": {"text": "CPU of each worker (% of one core)"}, "height": 320,
                                     "yaxis": {"rangemode": "tozero"}, "xaxis": xaxis}}]


# --- While the run goes on (--follow): the files read as they grow, and what they hold so far -----------

class Follower:
    """The files as they grow: each complete line once, in order. A partial last line is read once its line
    break has come, so one that a restarted sink cuts is never read; a file not there yet is waited for."""

    BLOCK = 1 << 24  # bytes read at a time: records are at most 1 MiB

    def __init__(self, paths):
        self.read_to = dict.fromkeys(paths, 0)  # path -> bytes read, up to a line break
        self.lines_read = dict.fromkeys(paths, 0)

    def read_new(self, collected):
        """Count the lines the files gained; return how many."""
        new = 0
        for path in self.read_to:
            try:
                file = open(path, "rb")
            except FileNotFoundError:
                continue
            with file:
                while True:
                    file.seek(self.read_to[path])
                    block = file.read(self.BLOCK)
                    end = block.rfind(b"\n") + 1
                    if not end:
                        break
                    lines = block[:end - 1].split(b"\n")
                    collected.take_lines(lines, path, self.lines_read[path] + 1)
                    self.read_to[path] += end
                    self.lines_read[path] += len(lines)
                    new += len(lines)
        return new


def live_runs(collected, percentiles, checks, baseline, noise, window, forget):
    """Per run, the latest first: each name's numbers over the last `window` seconds of its requests and since
    its first, the busiest first; each worker's peak CPU in that window; each check's verdict now. Seconds older
    than the window are forgotten, if `forget`, and memory stays 8 bytes a request; a page keeps them."""
    runs = []
    for run_id, run in sorted(collected.runs.items(), key=lambda item: item[1].last_end or "", reverse=True):
        if not run.first_end:
            continue
        since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch(run.last_end[:19]) - window + 1))
        for second in [second for second in run.seconds if second < since] if forget else ():
            del run.seconds[second]
        seconds = min(window, epoch(run.last_end[:19]) - epoch(run.first_end[:19]) + 1)
        summary = summarize_run(run_id, run, percentiles)
        recent = Second()  # the window's seconds as one, whose numbers the timeline's seconds have
        for second in (second for when, second in run.seconds.items() if when >= since):
            for key, times in second.response_times.items():
                recent.response_times[key].extend(times)
            recent.failures.update(second.failures)
        rows = []
        for row in sorted(summary["names"], key=lambda row: -row["requests"]) + [summary["total"]]:
            requests, failures, times = recent.requests(
                None if row is summary["total"] else (row["request_type"], row["name"]))
            rows.append((row, {"requests": requests, "failures": failures, "requests_per_second": requests / seconds,
                               **dict(zip([*(f"p{p}" for p in TIMELINE_PERCENTILES), "max"], times))}))
        cpu = {name: max((percent for when, percent in worker.cpu if when >= since), default=None)
               for name, worker in sorted(run.workers.items())}
        try:
            verdicts = check_run(summary, checks, baseline, noise)
        except ValueError as error:  # a rule names a name that has had no request yet
            verdicts = str(error)
        runs.append({"run_id": run_id, "summary": summary, "rows": rows, "cpu": cpu, "checks": verdicts})
    return runs


def live_header(collected):
    processes = collected.processes.values()
    return (f"{time.strftime('%H:%M:%S')} {count(len(processes), 'process')}, {sum(p.ended for p in processes)} "
            f"ended, {sum(p.missing() for p in processes)} records missing so far; {collected.lines.total()} lines "
            f"read, {collected.lines['unreadable']} unreadable")


def check_words(verdicts):
    if isinstance(verdicts, str):
        return [f"not yet: {verdicts}"]
    return [f"{check['rule']} [{check['name']}]: {shown(check['measured'], check['unit'])} "
            f"{VERDICTS[check['verdict']]}" for check in verdicts]


def live_line(collected, runs, window):
    """One short line of the latest run, for a log."""
    if not runs:
        return f"report: {live_header(collected)}; no requests yet"
    run = runs[0]
    total, recent = run["rows"][-1]
    verdicts = Counter(check["verdict"] for check in run["checks"]) if isinstance(run["checks"], list) else {}
    return (f"report: {live_header(collected)}; run {run['run_id']}: {total['requests']} requests, "
            f"{total['failures']} failures; last {window:g} s: {recent['requests_per_second']:.1f} req/s, p95 "
            f"{shown(recent['p95'], 'ms')}, max {shown(recent['max'], 'ms')}" + "".join(
                f"; checks: {', '.join(f'{n} {VERDICTS[v]}' for v, n in sorted(verdicts.items()))}" * bool(verdicts)))


def live_screen(collected, runs, window, width, height):
    """The screen: per run, its names, the busiest first, as many as fit (requests and failures since its first
    request, req/s in the window, the percentiles of both); its workers' CPU, the hottest first; its checks."""
    lines = [f"report.py --follow: {live_header(collected)}"]
    times = [*(f"p{p}" for p in TIMELINE_PERCENTILES), "max"]
    for run in runs:
        rows, summary = run["rows"], run["summary"]
        cpu = sorted(((percent, name) for name, percent in run["cpu"].items() if percent is not None), reverse=True)
        tail = [f"CPU, the peak in the last {window:g} s: " + ", ".join(
            f"{name} {percent:.0f}%" + " (at 90% or more: its times are suspect)" * (percent >= CPU_WARNING)
            for percent, name in cpu)] * bool(cpu) + ["Check now: " + line for line in check_words(run["checks"])]
        room = max(1, height - len(lines) - 4 - len(tail))
        name_width = min(30, max(len(row["name"]) for row, _ in rows))
        lines += ["", f"Run {run['run_id']}: requests ended from {summary['first_end'][11:19]} to "
                      f"{summary['last_end'][11:19]} UTC ({summary['seconds']:.1f} s); response times in ms",
                  f"{'':<{7 + name_width + 27}}| the last {window:g} s{'':<{32 - len(f'the last {window:g} s')}}"
                  "| since the first request",
                  live_row("Type", "Name", name_width, ["requests", "failures", "req/s"], times, times)]
        for row, recent in rows[:room - 1] + rows[-1:] if len(rows) > room else rows:
            lines.append(live_row(row["request_type"], row["name"][:name_width], name_width, [
                str(row["requests"]), str(row["failures"]), f"{recent['requests_per_second']:.1f}"],
                [live_time(recent[column]) for column in times], [live_time(row[column]) for column in times]))
        lines += tail
    return [line[:width] for line in lines[:height]]


def live_row(request_type, name, width, counts, recent, since):
    return (f"{request_type:<6} {name:<{width}}" + "".join(f"{cell:>9}" for cell in counts) + " |"
            + "".join(f"{cell:>8}" for cell in recent) + " |" + "".join(f"{cell:>8}" for cell in since))


def live_time(milliseconds):
    return "-" if milliseconds is None else f"{milliseconds:.1f}"


def follow(args, percentiles, checks, baseline, every, window, idle):
    """Show what the files hold every `every` seconds, and write --html's page again, until every process seen
    has ended and nothing came for `idle` seconds, or SIGINT or SIGTERM came: then main() reads them again for
    the final report, which is then exactly report.py's without --follow."""
    stopped = []
    previous = {signum: signal.signal(signum, lambda signum, frame: stopped.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    collected, follower, terminal = Collected(args.run, True, {}), Follower(args.files), sys.stdout.isatty()
    last_line = shown_at = 0.0
    while not stopped:
        if follower.read_new(collected):
            last_line = time.monotonic()
        now = time.monotonic()
        done = collected.processes and all(process.ended for process in collected.processes.values()) \
            and now - last_line >= idle
        if now - shown_at >= every or done:
            runs = live_runs(collected, percentiles, checks, baseline, args.noise, window, not args.html)
            if args.html:
                with contextlib.suppress(ValueError):  # a rule names a name that has had no request yet
                    write_html(args.html, decided(collected, args, (0, 0), percentiles, checks, baseline),
                               collected.runs, reload=every)
            if terminal:
                size = os.get_terminal_size()
                screen = live_screen(collected, runs, window, size.columns, size.lines - 1)
                print("\x1b[H" + "".join(f"{line}\x1b[K\n" for line in screen) + "\x1b[J", end="", flush=True)
            else:
                print(live_line(collected, runs, window), flush=True)
            shown_at = now
            if done:
                break
        time.sleep(0.1)
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    print(flush=True)


def decided(collected, args, skip, percentiles, checks, baseline):
    """The report of what was collected, each run checked and compared with the baseline, and the verdict."""
    report = summarize(args.files, collected, percentiles)
    report["skip"] = {"first": args.skip_first, "last": args.skip_last} if any(skip) else None
    if baseline:
        report["baseline"] = {"files": args.baseline, "run_id": baseline["run_id"]}
    for run in report["runs"]:
        if run["total"] is not None:  # else resource samples only, as before a test starts: nothing to check
            run["checks"] = check_run(run, checks, baseline, args.noise)
            run["comparison"] = compare(run, baseline) if baseline else None
    report.update(rules=args.check, require_complete=args.require_complete, noise=args.noise)
    report["passed"], report["headline"], report["decision"] = decide(report)
    return report


def no_such_run(files, wanted, found):
    """True, having said so, if --run or --baseline-run names a run the files do not hold."""
    if wanted is not None and not found.runs and found.run_ids:
        runs = ", ".join(sorted(str(run_id) for run_id in found.run_ids))
        print(f"report: no run {wanted} in {', '.join(files)}. Its runs: {runs}", file=sys.stderr)
        return True
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", metavar="FILE", help="collected JSON-lines files, read as one")
    parser.add_argument("--run", metavar="RUN_ID", help="only this run's tables (completeness is over every run)")
    parser.add_argument("--check", action="append", default=[], metavar="RULE",
                        help="exit 1 unless each run holds to it: 'p95 < 300', 'each: failures < 1%%', "
                             "'GET /items: p99 < baseline + 10%%'; repeatable")
    parser.add_argument("--skip-first", metavar="DURATION", default="0", help="leave out each run's first "
                        "seconds (ramp-up) from tables, checks, timeline and charts: 30s, 500ms, 2m")
    parser.add_argument("--skip-last", metavar="DURATION", default="0", help="and its last ones (ramp-down)")
    parser.add_argument("--baseline", nargs="+", metavar="FILE", help="an earlier run's files, to compare with")
    parser.add_argument("--baseline-run", metavar="RUN_ID", help="the run to compare with, where they hold several")
    parser.add_argument("--timeline", metavar="OUT.csv", help="also write one CSV row per second and run")
    parser.add_argument("--html", metavar="OUT.html", help="also write the report as one page with charts over time")
    parser.add_argument("--junit", metavar="OUT.xml", help="also write the checks as JUnit XML, for a CI system")
    parser.add_argument("--markdown", metavar="OUT.md", help="also write the verdict, checks and tables as Markdown")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object instead of tables")
    parser.add_argument("--noise", choices=NOISE, default="measured",
                        help="the verdict on a check within the noise, whose 95%% interval reaches across its threshold: "
                             "its measured value's (the default), or pass, warn (pass, and say so) or fail")
    parser.add_argument("--require-complete", action="store_true",
                        help="exit 1 if a record is missing or a process did not end cleanly")
    parser.add_argument("--follow", action="store_true", help="follow the files as they grow, showing what they "
                        "hold, until every process has ended; then the report, as without --follow")
    parser.add_argument("--every", metavar="SECONDS", default="2", help="with --follow: seconds between two views")
    parser.add_argument("--window", metavar="SECONDS", default="10",
                        help="with --follow: the last seconds of requests that the view's recent numbers cover")
    parser.add_argument("--idle", metavar="SECONDS", default="5",
                        help="with --follow: seconds without a new line, once every process has ended, before it ends")
    args = parser.parse_args()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `report.py FILE | head` ends quietly, as any Unix tool does

    try:  # every mistake in the command line is found before minutes of reading
        skip = [milliseconds_of(value, option) for value, option in ((args.skip_first, "--skip-first"),
                                                                      (args.skip_last, "--skip-last"))]
        checks = [Check(rule, args.baseline) for rule in args.check]
        if args.baseline_run and not args.baseline:
            raise ValueError("--baseline-run: names a run of the baseline: give its files with --baseline FILE...")
        if not args.files:
            raise ValueError("no FILE to read: give the collected files, as in report.py requests.jsonl")
        every, window, idle = (seconds_of(getattr(args, option), option, above_zero) for option, above_zero in (
            ("every", True), ("window", True), ("idle", False)))
    except ValueError as error:
        print(f"report: {error}", file=sys.stderr)
        return 2
    if args.html:
        try:
            import plotly.io  # noqa: F401 (here, not above: importing it costs every report 60 ms and 6 MB)
        except ImportError:
            print("report: --html needs plotly, to draw its charts: pip install plotly", file=sys.stderr)
            return 2
    for path in filter(None, (args.timeline, args.html, args.junit, args.markdown)):
        try:
            open(path, "a").close()  # can be written, before minutes of reading
        except OSError as error:
            print(f"report: cannot write {path}: {error.strerror}", file=sys.stderr)
            return 1
    percentiles = dict(sorted({**{f"p{p}": p for p in PERCENTILES},
                               **{c.metric: Fraction(c.metric[1:]) for c in checks if c.metric[0] == "p"}}.items(),
                              key=lambda item: item[1]))
    try:
        baseline = args.baseline and collect(args.baseline, args.baseline_run, False, skip)
        if baseline:  # before the files: --follow checks against it as the run goes on
            if no_such_run(args.baseline, args.baseline_run, baseline):
                return 1
            baseline_runs = [(run_id, run) for run_id, run in baseline.runs.items() if run.response_times]
            if len(baseline_runs) != 1:
                names = ", ".join(str(run_id) for run_id, _ in baseline_runs)
                print(f"report: --baseline {' '.join(args.baseline)} holds " + (
                    f"{len(baseline_runs)} runs with requests ({names}): choose one with --baseline-run RUN_ID"
                    if baseline_runs else "no requests"), file=sys.stderr)
                return 2
            baseline = summarize_run(*baseline_runs[0], percentiles)
        if args.follow:
            follow(args, percentiles, checks, baseline, every, window, idle)
        collected = collect(args.files, args.run, bool(args.timeline or args.html), skip)
    except OSError as error:
        print(f"report: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return 1
    if no_such_run(args.files, args.run, collected):
        return 1
    lines = collected.lines
    if not collected.processes and lines["unreadable"] + lines["skipped"]:  # a CSV, say, or another tool's JSON
        found = [f"{lines['unreadable']} unreadable (the first: {collected.first_unreadable})"] * bool(
            lines["unreadable"]) + [f"{lines['skipped']} JSON but not records"] * bool(lines["skipped"])
        print(f"report: no records in {', '.join(args.files)}: of {lines.total()} lines, {', '.join(found)}; "
              "expected the JSON lines that locustfile.py and sink.py write", file=sys.stderr)
        return 1
    if args.timeline:
        write_timeline(args.timeline, collected.runs.items())
    try:
        report = decided(collected, args, skip, percentiles, checks, baseline)
    except ValueError as error:  # a rule that names a name the run does not hold: known only now
        print(f"report: {error}", file=sys.stderr)
        return 2
    if args.html:
        write_html(args.html, report, collected.runs)
    if args.junit:
        write_junit(args.junit, report, checks)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as out:
            out.write(markdown(report))
    if args.json:
        print(json.dumps({**report, "timeline": args.timeline, "html": args.html}))
    else:
        print_report(report, args.run)
        for what, path in (("Timeline", args.timeline), ("HTML report", args.html), ("JUnit XML", args.junit),
                           ("Markdown", args.markdown)):
            if path:
                print(f"{what}: {path}")
        if decides(report):
            print(report["decision"])
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
