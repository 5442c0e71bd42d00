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

Each valid frame goes to the file in one unbuffered write before it is counted: a reader sees every
counted record, and a sink killed at any moment leaves at most its last line incomplete. A sink that
starts on a file whose last line is incomplete first ends that line, and says so; it never truncates.

Progress goes to stderr every few seconds while records arrive. SIGINT or SIGTERM: the sink writes
what it has received, closes the file and prints a summary. ``python report.py`` reports on the file.
"""

import argparse
import json
import os
import signal
import sys
import time
from collections import Counter

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


def write_whole(out, data):
    """Write all of data to an unbuffered file, where one write may take only part (a signal, a full disk)."""
    view = memoryview(data)
    while view:
        view = view[out.write(view):]


def open_log(path):
    """Open the file to append to, unbuffered; end a line that a killed sink left incomplete. Returns the file
    and what was done to it, for the start line."""
    out = open(path, "ab+", buffering=0)
    size = os.fstat(out.fileno()).st_size
    if size and os.pread(out.fileno(), 1, size - 1) != b"\n":
        # Without it, the next record would be glued onto the fragment, and both lost to a line reader.
        out.write(b"\n")
        return out, " (its last line was incomplete: ended it with a line break)"
    return out, ""


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
                write_whole(self.out, frame if frame.endswith(b"\n") else frame + b"\n")
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


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bind", default=os.environ.get("ZMQ_SINK_BIND", "tcp://*:5555"),
                        help="ZeroMQ address to bind the PULL socket to (env ZMQ_SINK_BIND; default %(default)s)")
    parser.add_argument("--log-file", default=os.environ.get("ZMQ_SINK_LOG_FILE", "requests.jsonl"),
                        help="JSON-lines file to append to, never truncated (env ZMQ_SINK_LOG_FILE; default %(default)s)")
    return parser.parse_args()


def main():
    args = parse_args()
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
    out, mended = open_log(args.log_file)
    print(f"sink: listening on {endpoint}, appending to {args.log_file}{mended}, checking records with "
          f"{'simdjson' if simdjson else 'the json module'}", file=sys.stderr, flush=True)

    with out:
        sink = Sink(out)
        last_counts, last_time = sink.counts(), time.monotonic()
        while not stopping:
            if pull.poll(100):
                sink.drain(pull, max_seconds=0.5)
            now = time.monotonic()
            if now - last_time >= PROGRESS_EVERY:
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
