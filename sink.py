"""
Collect the records that every Locust process pushes into one JSON-lines file.

Usage::

    python sink.py --bind 'tcp://*:5555' --log-file requests.jsonl

A message is one or more frames; each frame is one record: a JSON object, UTF-8, on one line.
Valid frames are appended to the file as they arrive (arrival order, not time order). A frame that is
empty, over 1 MiB, not UTF-8, holds a line break, is not JSON, or is JSON but not an object is
rejected and counted by reason; the other frames of its message are still written.

Progress goes to stderr every few seconds while records arrive. SIGINT or SIGTERM: the sink writes
what it has received, closes the file and prints a summary.
"""

import argparse
import json
import os
import signal
import sys
import time
from collections import Counter

import zmq

MAX_RECORD_BYTES = 1 << 20
# Frames larger than this make ZeroMQ drop the sender's connection before we see them: a memory guard.
MAX_FRAME_BYTES = 64 << 20
PROGRESS_EVERY = 2.0  # seconds


def reject_constant(name):
    raise ValueError(f"{name} is not JSON")


# NaN and Infinity are Python's extensions, not JSON: other tools would choke on them.
decoder = json.JSONDecoder(parse_constant=reject_constant)


def why_invalid(frame):
    """Return why a frame is not a record, or None if it is one."""
    if not frame:
        return "empty"
    if len(frame) > MAX_RECORD_BYTES:
        return "over 1 MiB"
    if b"\n" in frame or b"\r" in frame:
        return "line break"  # it would split its line in the output
    try:
        value = decoder.decode(frame.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8"
    except (ValueError, RecursionError):
        return "not JSON"
    if not isinstance(value, dict):
        return "not an object"
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
            reason = why_invalid(frame)
            if reason is None:
                self.out.write(frame + b"\n")
                self.written += 1
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
                f"{sum(self.rejected.values())} rejected" + (f" ({reasons})" if reasons else ""))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
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
    pull.bind(args.bind)
    endpoint = pull.getsockopt_string(zmq.LAST_ENDPOINT)
    print(f"sink: listening on {endpoint}, appending to {args.log_file}", file=sys.stderr, flush=True)

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
                          f"{sink.counts()[1]} rejected", file=sys.stderr, flush=True)
                last_counts, last_time = sink.counts(), now
        # What already arrived is written; the file is then closed holding whole lines only.
        sink.drain(pull, max_seconds=2.0)
    pull.close(linger=0)
    context.term()
    print(f"sink: stopped by {signal.Signals(stopping[0]).name}: {sink.summary()} to {args.log_file}",
          file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
