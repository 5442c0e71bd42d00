"""
Collect the records that every Locust process pushes into one JSON-lines file.

Usage::

    python sink.py                                  # tcp://127.0.0.1:5555, acknowledgements on port 5556
    python sink.py --bind 'tcp://*:5555' --log-file requests.jsonl   # for load generators on other machines

Framing: every frame of a message holds one record, or several separated by line breaks (\\n), each a
JSON object in UTF-8; a final line break is allowed. A frame is written whole, as it came, or rejected
whole and counted by reason: empty, an empty line, a carriage return, a line over 1 MiB, not UTF-8, not
JSON (NaN and Infinity included), JSON but not an object, or numbered unlike its records. Rejecting whole
frames means a fragment of a bad message, such as one line of a pretty-printed object, can never pass for a
record. ZeroMQ drops the connection of a client that sends a frame over 1 MiB + 1 byte. Records are appended
in arrival order, not time order.

A message of two frames whose first is ``<seq> <worker>`` (as the locustfile sends) is numbered: its
records are that process's records seq, seq + 1, ... The sink writes only those its file does not hold yet,
then publishes ``[worker, b"<seq> <count> <seq> <count> ..."]`` (its frames written since the last) on a PUB
socket at the next port (5556), where the load generator subscribes to its own worker id: the
acknowledgement that lets it forget them. ZeroMQ drops what is published before a subscription reaches the
sink, so the sink answers each subscription with ``[worker, b""]``: from then on nothing is dropped, and the
load generator sends again what it had sent before.

Each valid frame goes to the file in one unbuffered write before it is counted or acknowledged: a reader
sees every counted record, and a sink killed at any moment leaves at most its last line incomplete. A sink
that starts on a file first reads which records it holds, and cuts an incomplete last line, which was
never acknowledged, so the load generator sends it again.

Progress goes to stderr every few seconds while records arrive. SIGINT or SIGTERM: the sink writes
what it has received, closes the file and prints a summary. ``python report.py`` reports on the file.

Across untrusted networks (CURVE: encrypted, and only the load generators whose keys you gave)::

    python sink.py --make-keys keys       # a key pair for the sink, one for the load generators
    python sink.py --curve-secret keys/sink.key_secret --curve-clients keys/clients
"""

import argparse
import errno
import json
import os
import resource
import signal
import socket as sockets
import struct
import sys
import threading
import time
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict, deque
from pathlib import Path

import zmq

try:
    import simdjson  # optional (pysimdjson): checks a record without building it, ~10x the json module's speed
except ImportError:
    simdjson = None

MAX_RECORD_BYTES = 1 << 20
# ZeroMQ drops the connection of a client that sends a larger frame before it buffers any of it: one record
# and its line break is the most a frame needs, and the locustfile never makes a larger one.
MAX_FRAME_BYTES = MAX_RECORD_BYTES + 1
# Messages ZeroMQ holds for us per connection while we write. With the one it is reading, the sink buffers
# at most connections x (RCVHWM + 1) x MAX_FRAME_BYTES (ZeroMQ's default of 1000 let a run reach 600 MB).
RCVHWM = 1
PROGRESS_EVERY = 2.0  # seconds
ACK_EVERY = 0.1  # seconds: while draining too, well inside a load generator's shortest timeout (1 s)
# Descriptors kept for other uses than load generators (2 each: records and acknowledgements), one of them spare:
# see refuse_waiting().
RESERVED_DESCRIPTORS = 16
RETRY_EVERY, STALLED_EVERY = 0.5, 5.0  # seconds: a file that refuses writes is tried again, and reported
REFUSED_EVERY = 10.0  # seconds: a refused client tries again every 100 ms; its line is printed no oftener


def ack_address(address):
    """Where a sink at `address` publishes its acknowledgements: the next port (the locustfile has the same rule)."""
    head, colon, port = address.rpartition(":")
    if not (address.startswith("tcp://") and colon and port.isdigit() and 0 < int(port) < 65535):
        raise ValueError("not tcp://HOST:PORT, and acknowledgements go to the next port")
    return f"{head}:{int(port) + 1}"


def reject_constant(name):
    raise ValueError(f"{name} is not JSON")


# The reference for what a record is: Python's own decoder, without the NaN and Infinity it allows.
decoder = json.JSONDecoder(parse_constant=reject_constant)
# simdjson, when installed, only ever answers faster. It skips a UTF-8 byte order mark, which Python's
# decoder refuses, so a line that starts with one always goes to the json module.
simdjson_parser = simdjson.Parser() if simdjson else None
BOM = b"\xef\xbb\xbf"


SAYING = threading.Lock()


def say(line):
    """One line to stderr, written whole: the ZAP thread names refusals while the main loop says the rest, and
    print's separate write of the line break let one thread's line run into the other's."""
    with SAYING:
        sys.stderr.write(f"sink: {line}\n")
        sys.stderr.flush()


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


def all_records_quick(frame, lines):
    """True only if every line is surely a record; False means: ask why_not_a_record, line by line."""
    # simdjson refuses what Python's decoder refuses, and more (lone surrogates, integers over 64 bits),
    # except for two things: it skips a UTF-8 byte order mark, and it allows 1024 levels of nesting where
    # json.loads allows fewer than 1000. A line under 1000 bytes cannot nest 500 deep. 600,000 fuzzed lines
    # found no other disagreement. Any doubt, exceptions included, goes to the json module. The loops run in
    # C: map() drops each parsed object before the next parse, as simdjson needs; `b"\xef" in` is a memchr,
    # where a search for the whole BOM costs as much as parsing the frame.
    try:
        return (max(map(len, lines)) < 1000
                and not (b"\xef" in frame and any(line.startswith(BOM) for line in lines))
                and set(map(type, map(simdjson_parser.parse, lines))) == {simdjson.Object})
    except Exception:
        return False


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
    if simdjson is not None and all_records_quick(frame, lines):
        return None
    for line in lines:
        reason = why_not_a_record(line)
        if reason is not None:
            return reason
    return None


def is_end_record(line):
    """True for the last record of a process, {"class": "end", ...}: its connection closes next, as news to no one."""
    if b'"end"' not in line:
        return False
    message = decoder.decode(line.decode("utf-8")).get("message")
    return isinstance(message, dict) and message.get("class") == "end"


def record_id(line):
    """(worker, seq) of a record, as the file and numbered frames name it, or None."""
    try:
        if simdjson_parser is not None and not line.startswith(BOM):
            record = simdjson_parser.parse(line)
            worker, seq = record.get("worker"), record.get("seq")
            del record  # simdjson refuses to parse again while a result of its parser is alive
        else:
            record = decoder.decode(line.decode("utf-8"))
            worker, seq = record.get("worker"), record.get("seq")
    except Exception:
        return None
    return (worker.encode(), seq) if isinstance(worker, str) and type(seq) is int else None


class Seqs:
    """The seqs of one process that the file holds, as sorted, disjoint ranges [start, end)."""

    def __init__(self):
        self.starts, self.ends = [], []

    def missing(self, start, end):
        """The parts of [start, end) not held, as ranges."""
        parts, i = [], bisect_right(self.ends, start)
        while start < end:
            if i == len(self.starts) or end <= self.starts[i]:
                parts.append((start, end))
                break
            if start < self.starts[i]:
                parts.append((start, self.starts[i]))
            start, i = max(start, self.ends[i]), i + 1
        return parts

    def add(self, start, end):
        if self.ends and self.ends[-1] == start:  # the next records in order, as they almost always come
            self.ends[-1] = end
            return
        i, j = bisect_left(self.ends, start), bisect_right(self.starts, end)  # the ranges it touches
        if i < j:
            start, end = min(start, self.starts[i]), max(end, self.ends[j - 1])
        self.starts[i:j], self.ends[i:j] = [start], [end]


def open_log(path):
    """Open the file to append to, unbuffered; cut an incomplete last line, and read which records the file
    holds: from its index, and the lines after what the index covers. Returns the file, {worker: Seqs} and what
    was done to it, for the start line."""
    out = open(path, "ab+", buffering=0)
    size = end = os.fstat(out.fileno()).st_size
    while end and os.pread(out.fileno(), 1, end - 1) != b"\n":
        # A killed sink's last write: never acknowledged, so the load generator sends it again. Ended with a
        # line break instead, it would be an unreadable line forever.
        start = max(0, end - MAX_FRAME_BYTES)
        end = start + os.pread(out.fileno(), end - start, start).rfind(b"\n") + 1
    note = ""
    if end < size:
        os.ftruncate(out.fileno(), end)
        note = f" (cut its incomplete last line, {size - end} bytes, never acknowledged)"
    started = time.monotonic()
    held, covered = read_index(path, out, end) or (defaultdict(Seqs), 0)
    with open(path, "rb") as lines:
        lines.seek(covered)
        for numbered in map(record_id, lines):
            if numbered is not None:
                held[numbered[0]].add(numbered[1], numbered[1] + 1)
    if size:
        note = (f" (holding records of {len(held)} processes: {(end - covered) / 1e6:.0f} MB read in "
                f"{time.monotonic() - started:.1f}s{', the rest known from its index' if covered else ''})" + note)
    return out, held, note


def read_index(path, out, size):
    """({worker: Seqs}, bytes of the file it covers) from the file's index, or None if there is none for this
    file: one whose last covered bytes are not the file's."""
    try:
        with open(f"{path}.index") as file:
            index = json.load(file)
        covered, tail = index["bytes"], bytes.fromhex(index["tail"])
        if covered > size or os.pread(out.fileno(), len(tail), covered - len(tail)) != tail:
            return None
        held = defaultdict(Seqs)
        for worker, (starts, ends) in index["seqs"].items():
            held[worker.encode()].starts, held[worker.encode()].ends = starts, ends
        return held, covered
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_index(path, out, held):
    """Write beside the file which records it holds, so that a sink started on it reads only the lines added
    after: 2 M lines take seconds to read, their index milliseconds. Called only when every line is whole."""
    covered = os.fstat(out.fileno()).st_size
    tail = os.pread(out.fileno(), 64, max(0, covered - 64))
    seqs = {worker.decode(): [ranges.starts, ranges.ends] for worker, ranges in held.items()}
    try:
        with open(f"{path}.index.tmp", "w") as file:
            json.dump({"bytes": covered, "tail": tail.hex(), "seqs": seqs}, file)
        os.replace(f"{path}.index.tmp", f"{path}.index")  # whole or not at all
    except OSError:
        pass  # a full disk: a later start reads more of the file, that is all


def numbering(message):
    """(worker, first seq) of a numbered message, [b"<seq> <worker>", frame], or None."""
    if len(message) == 2:
        seq, space, worker = message[0].partition(b" ")
        if space and worker and seq.isdigit() and len(seq) < 19:
            return worker, int(seq)
    return None


class Sink:
    """Receives messages, appends the valid records to the file, acknowledges numbered ones and counts the rest."""

    def __init__(self, out, name, held, acks):
        self.out, self.name, self.acks = out, name, acks
        self.seqs = held  # {worker: Seqs} in the file
        self.acks_due = defaultdict(list)  # worker -> [b"<first seq> <count>", ...] written, not yet acknowledged
        self.written = self.resent = 0
        # A process closes its connection after its end record, and libzmq one whose handshake it refused; any other
        # closed connection is news.
        self.ended, self.closes_expected, self.closed_early = set(), 0, 0
        self.rejected = Counter()
        self.first_arrival = self.last_arrival = None
        # Valid frames the file has not taken yet, as (bytes left, records, acknowledgement): while there are
        # any, the sink is stalled and takes nothing more from ZeroMQ, so the load generators keep what
        # follows, counted.
        self.held = deque()
        self.stalled_since = None
        # Behind: a drain ended with frames still waiting. A load generator's frame then waits its turn among all
        # of theirs, about as long as the gap since the one before it.
        self.behind_since, self.last_frame_of, self.waiting, self.longest_wait = None, {}, set(), 0.0

    def take(self, message):
        self.last_arrival = time.monotonic()
        if self.first_arrival is None:
            self.first_arrival = self.last_arrival
        numbered = numbering(message)
        if numbered:
            previous = self.last_frame_of.get(numbered[0])
            self.last_frame_of[numbered[0]] = self.last_arrival
            if self.behind_since is not None:
                self.waiting.add(numbered[0])
                if previous is not None and previous >= self.behind_since:
                    self.longest_wait = max(self.longest_wait, self.last_arrival - previous)
        for frame in message[1:] if numbered else message:
            self.take_frame(frame, numbered)
        self.write_held()

    def take_frame(self, frame, numbered):
        lines = record_lines(frame)
        reason = why_rejected(frame, lines)
        if reason is None and numbered:
            worker, first = numbered
            if record_id(lines[0]) != (worker, first) or record_id(lines[-1]) != (worker, first + len(lines) - 1):
                reason = "numbered unlike its records"
        if reason is not None:
            if not self.rejected[reason]:
                say(f"rejected a frame ({reason}): {frame[:80]!r}")
            self.rejected[reason] += 1
            return
        data = frame if frame.endswith(b"\n") else frame + b"\n"
        if not numbered:
            self.held.append((memoryview(data), len(lines), None))
            return
        new = self.seqs[worker].missing(first, first + len(lines))
        if new != [(first, first + len(lines))]:  # sent again: only what the file does not hold yet
            data = b"".join(lines[seq - first] + b"\n" for start, end in new for seq in range(start, end))
        records = sum(end - start for start, end in new)
        self.resent += len(lines) - records
        ends = bool(new) and new[-1][1] == first + len(lines) and is_end_record(lines[-1])
        self.held.append((memoryview(data), records, (worker, first, len(lines), new, ends)))

    def write_held(self):
        """Write the held frames in order, each in one write when the file takes it whole. On a write error
        (disk full, a file size limit, a read-only or failing file system) keep the rest, to the byte, so that
        once writing works again no line is left cut short. True when nothing is held."""
        while self.held:
            data, records, ack = self.held[0]
            try:
                while data:
                    data = data[self.out.write(data):]
            except OSError as error:
                self.held[0] = (data, records, ack)
                if self.stalled_since is None:
                    self.stalled_since = time.monotonic()
                    say(f"cannot write to {self.name}: {error.strerror}; holding {self.held_records()} "
                        f"records and taking no more until it can")
                return False
            self.held.popleft()
            self.written += records
            if ack is not None:  # in the file now: the load generator may forget these records
                worker, first, count, new, ends = ack
                for start, end in new:
                    self.seqs[worker].add(start, end)
                if ends:
                    self.ended.add(worker)
                    self.closes_expected += 1
                self.acks_due[worker].append(b"%d %d" % (first, count))
        if self.stalled_since is not None:
            say(f"writing to {self.name} again after {time.monotonic() - self.stalled_since:.1f}s")
            self.stalled_since = None
        return True

    def acknowledge(self):
        """Publish what was written since the last call, one message per process: a message per frame cost
        0.6 µs a record in bench.py. PUB never blocks: it drops for a subscriber that is gone or behind, which
        then sends again."""
        for worker, acks in self.acks_due.items():
            self.acks.send_multipart([worker, b" ".join(acks)])
        self.acks_due.clear()

    def welcome(self):
        """Answer each new subscription with an empty acknowledgement, which can no longer be dropped for want of
        it: what the load generator sent before may have been acknowledged to no one, and it sends that again."""
        while self.acks.poll(0):
            subscription = self.acks.recv()
            if subscription[:1] == b"\x01":
                self.acks.send_multipart([subscription[1:], b""])

    def held_records(self):
        return sum(records for _, records, _ in self.held)

    def drain(self, socket, max_seconds):
        """Take every message already waiting, for at most max_seconds, unless the file refuses writes, and
        acknowledge every ACK_EVERY: a load generator sends more as soon as its frames are acknowledged."""
        now = time.monotonic()
        deadline, ack_due = now + max_seconds, now + ACK_EVERY
        while not self.held:
            try:
                self.take(socket.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                self.behind_since = None
                break
            now = self.last_arrival
            if now >= ack_due:
                self.acknowledge()
                ack_due = now + ACK_EVERY
            if now >= deadline:
                self.behind_since = self.behind_since or now
                break
        self.acknowledge()

    def behind(self, now):
        """How far behind the sink is, for its progress line, since the last call."""
        said = (f"; behind for {now - self.behind_since:.0f}s: {len(self.waiting)} load generators waiting their "
                f"turn, up to {self.longest_wait:.1f}s between two frames of one" if self.behind_since is not None
                else "")
        self.waiting, self.longest_wait = set(), 0.0
        return said

    def counts(self):
        return self.written, sum(self.rejected.values())

    def closed(self):
        """A connection closed: news unless its process's end record, or a refused handshake, came first."""
        if self.closes_expected:
            self.closes_expected -= 1
        else:
            self.closed_early += 1

    def summary(self, refused):
        """What the sink did, and then what went wrong, if anything: a normal run names no trouble."""
        seconds = (self.last_arrival - self.first_arrival) if self.first_arrival else 0.0
        rate = self.written / seconds if seconds > 0 else 0.0
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.rejected.items()))
        processes, ended = len(self.last_frame_of), len(self.ended)
        which_ended = f"{ended} of which" if ended < processes else "each of which" if ended > 1 else "which"
        troubles = [text for count, text in (
            (self.closed_early, f"{self.closed_early} connections closed without an end record (by the network, a "
                                f"killed process, a plain client, or ZeroMQ for a frame over {MAX_FRAME_BYTES} bytes)"),
            (refused, f"{refused} connections refused (the lines above say why)"),
            (self.held, f"{self.held_records()} records received but not written: the file refused them")) if count]
        return (f"{self.written} records written to {self.name} in {seconds:.2f}s ({rate:.0f}/s)"
                + (f" from {processes} process{'es' * (processes > 1)}, {which_ended} ended" if processes else "")
                + f"; {sum(self.rejected.values())} frames rejected" + (f" ({reasons})" if reasons else "")
                + f", {self.resent} records sent again and already in the file"
                + ("; but " + ", ".join(troubles) if troubles else ""))


def load_curve(secret_file, clients_folder):
    """The sink's CURVE key pair and the public keys of the clients it accepts; exits with one line when a
    setting is missing or a file unusable: a sink must never run open when it was asked to run closed."""
    if not secret_file and not clients_folder:
        return None
    import zmq.auth  # here, not at the top: report.py imports this file, and would carry it (+1 MB) for nothing
    if not (secret_file and clients_folder):
        sys.exit("sink: --curve-secret (ZMQ_SINK_CURVE_SECRET) and --curve-clients (ZMQ_SINK_CURVE_CLIENTS) go "
                 "together: set both, or neither")
    if not zmq.has("curve"):
        sys.exit("sink: --curve-secret is set, but this pyzmq's libzmq has no CURVE: install pyzmq's wheel")
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as error:
        sys.exit(f"sink: --curve-secret {secret_file}: {why_unusable(secret_file, error)}; expected the "
                 f"sink's .key_secret file, as python sink.py --make-keys writes it")
    if secret is None:
        sys.exit(f"sink: --curve-secret {secret_file}: holds no secret key; expected the sink's .key_secret file, "
                 "not its public .key")
    try:
        clients = set(zmq.auth.load_certificates(clients_folder))
    except (OSError, ValueError) as error:
        sys.exit(f"sink: --curve-clients {clients_folder}: {why_unusable(clients_folder, error)}; expected a "
                 "folder of the load generators' public .key files")
    if not clients:
        sys.exit(f"sink: --curve-clients {clients_folder}: holds no .key file, so no load generator could connect")
    return public, secret, clients


def why_unusable(path, error):
    """What is wrong with a key file or folder, in words; pyzmq says "invalid" for a path that does not exist."""
    return "no such file or folder" if not os.path.exists(path) else getattr(error, "strerror", None) or error


class Refusals:
    """Connections refused, counted, and printed by kind: at once, then at most every `every` seconds with how
    many came meanwhile, as a refused client tries again and again."""

    def __init__(self, every=REFUSED_EVERY):
        self.every = every
        self.count = 0
        self.printed = {}  # what -> (when last printed, refused since)

    def add(self, what):
        self.count += 1
        now = time.monotonic()
        printed, since = self.printed.get(what, (None, 0))
        if printed is not None and now - printed < self.every:
            self.printed[what] = (printed, since + 1)
            return
        more = f"; {since} more like it in the last {now - printed:.1f}s" if since else ""
        say(f"refused {what}{more}")
        self.printed[what] = (now, 0)


def authenticate(zap, clients, refusals):
    """Answers libzmq's ZAP requests (RFC 27) for the CURVE socket: a client whose public key is in `clients`
    is let in, any other refused, and named by its address."""
    from zmq.utils import z85

    try:
        while True:
            version, request_id, _domain, address, _identity, mechanism, *credentials = zap.recv_multipart()
            allowed = mechanism == b"CURVE" and z85.encode(credentials[0]) in clients
            if not allowed:
                refusals.add(f"{address.decode()}: its CURVE key is not in --curve-clients")
            zap.send_multipart([version, request_id, b"200" if allowed else b"400",
                                b"OK" if allowed else b"unknown key", b"", b""])
    except zmq.ContextTerminated:
        zap.close()


def raise_descriptor_limit():
    """Raise the soft limit on open descriptors to the hard one: (the limit, what was done), for the start line."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard, f"raised from {soft}" if soft < hard else "its hard limit"
    except (ValueError, OSError):  # an unlimited hard limit, which Linux refuses as a soft one
        return soft, f"which it could not raise to {hard}"


def listen(socket, address):
    """Bind the ZeroMQ socket through a listening socket of our own (ZMQ_USE_FD); returns its descriptor, for
    refuse_waiting()."""
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    host = "" if host == "*" else host.strip("[]")
    listener = sockets.create_server((host, int(port)), family=sockets.AF_INET6 if ":" in host else sockets.AF_INET,
                                     backlog=1024)
    socket.setsockopt(zmq.USE_FD, listener.fileno())
    socket.bind(address)
    return listener.detach()  # libzmq's now, to close


def refuse_waiting(listeners, spare):
    """Accept and close the connections waiting on the listening sockets: libzmq cannot accept one with no
    descriptor left, and tries again at once, at full CPU, for as long as it waits. The spare descriptor,
    closed for the moment, makes room for each in turn. Returns their addresses, and the spare (None while
    libzmq took its place)."""
    if spare is not None:
        os.close(spare)
    refused = []
    for fd in listeners:
        listener = sockets.socket(fileno=fd)
        listener.setblocking(False)
        try:
            while True:
                connection, address = listener.accept()
                connection.close()
                refused.append(address)
        except OSError:
            pass  # none waits any more, or no room: libzmq took it
        finally:
            listener.detach()
    try:
        return refused, os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return refused, None


def read_events(monitor, sink, refusals, curve):
    """Count closed connections and refused handshakes, which libzmq reports with our own address only, not the
    client's. True if a connection could not be accepted for lack of descriptors."""
    out_of_descriptors = False
    while monitor.poll(0):
        # Frame 1: event (16 bits) and value (32), native order; zmq.utils.monitor would import asyncio, +8 MB.
        event, code = struct.unpack("=HI", monitor.recv_multipart()[0][:6])
        if event == zmq.EVENT_ACCEPT_FAILED:
            out_of_descriptors |= code in (errno.EMFILE, errno.ENFILE)
            continue
        if event == zmq.EVENT_DISCONNECTED:
            sink.closed()
            continue
        sink.closes_expected += 1  # a handshake failed, and libzmq closes its connection
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            refusals.count += 1  # named by the ZAP handler, which knows the client's address
            continue
        if code == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            kind = ("a client without CURVE keys" if curve else
                    "a client with CURVE keys: this sink runs without CURVE")
        elif code == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            kind = "a client that encrypts to another sink's public key"
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            # Both sides see a mechanism mismatch: whichever sees it first closes, and when that is the client, the
            # sink learns no more than this.
            kind = (f"a client that closed its connection during the handshake, as one {'without' if curve else 'with'}"
                    " CURVE keys does")
        else:
            kind = f"a client whose handshake failed (ZeroMQ protocol error {code:#x})"
        refusals.add(f"{kind} (its address is not known)")
    return out_of_descriptors


def make_keys(folder):
    """A key pair for the sink and one for the load generators, with the latter's public key in clients/."""
    folder = Path(folder)
    made = [folder / "sink.key", folder / "sink.key_secret", folder / "clients" / "loadgen.key",
            folder / "loadgen.key_secret"]
    for path in made:
        if path.exists():
            sys.exit(f"sink: --make-keys {folder}: {path} exists; keys are never overwritten")
    import zmq.auth

    os.umask(0o077)  # secret keys readable by their owner only, from the moment they exist
    try:
        (folder / "clients").mkdir(parents=True, exist_ok=True)
        zmq.auth.create_certificates(folder, "sink")
        zmq.auth.create_certificates(folder / "clients", "loadgen")
        (folder / "clients" / "loadgen.key_secret").rename(folder / "loadgen.key_secret")
    except OSError as error:
        sys.exit(f"sink: --make-keys {folder}: {error.strerror}: {error.filename}")
    print(f"""{made[1]}  the sink's secret key: stays on its machine (--curve-secret)
{made[2].parent}/  the load generators' public keys that the sink accepts (--curve-clients)
{made[0]}  the sink's public key: copy it to every load generator (ZMQ_SINK_CURVE_PUBLIC)
{made[3]}  the load generators' secret key: copy it to them only (LOCUST_CURVE_SECRET)""")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bind", default=os.environ.get("ZMQ_SINK_BIND", "tcp://127.0.0.1:5555"),
                        help="tcp://HOST:PORT to bind the PULL socket to, and PORT + 1 the acknowledgements' PUB "
                             "socket; 'tcp://*:5555' for load generators on other machines (env ZMQ_SINK_BIND; "
                             "default %(default)s)")
    parser.add_argument("--log-file", default=os.environ.get("ZMQ_SINK_LOG_FILE", "requests.jsonl"),
                        help="JSON-lines file to append to, never truncated (env ZMQ_SINK_LOG_FILE; "
                             "default %(default)s)")
    parser.add_argument("--curve-secret", metavar="FILE", default=os.environ.get("ZMQ_SINK_CURVE_SECRET"),
                        help="the sink's .key_secret file: encrypt, and accept only the keys in --curve-clients "
                             "(env ZMQ_SINK_CURVE_SECRET)")
    parser.add_argument("--curve-clients", metavar="FOLDER", default=os.environ.get("ZMQ_SINK_CURVE_CLIENTS"),
                        help="folder of the public .key files of the load generators to accept "
                             "(env ZMQ_SINK_CURVE_CLIENTS)")
    parser.add_argument("--make-keys", metavar="FOLDER", help="write a key pair for the sink and one for the load "
                                                              "generators into FOLDER, and exit")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.make_keys:
        return make_keys(args.make_keys)
    curve = load_curve(args.curve_secret, args.curve_clients)
    stopping = []
    # The handler only sets a flag: an exception raised inside a write could leave half a line.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: stopping.append(signum))

    descriptors, raised = raise_descriptor_limit()
    context = zmq.Context()
    pull, acks = context.socket(zmq.PULL), context.socket(zmq.XPUB)
    acks.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, also to a worker id it has: each is a new connection
    pull.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
    pull.setsockopt(zmq.RCVHWM, RCVHWM)
    refusals = Refusals()
    if curve:
        public, secret, clients = curve
        # Bound before the PULL socket is: libzmq lets every CURVE client in while no ZAP handler is bound.
        zap = context.socket(zmq.REP)
        zap.linger = 0
        zap.bind("inproc://zeromq.zap.01")
        threading.Thread(target=authenticate, args=(zap, clients, Refusals()), daemon=True).start()
        for socket in (pull, acks):
            socket.curve_server, socket.curve_publickey, socket.curve_secretkey = True, public, secret
    try:
        listeners = [listen(acks, ack_address(args.bind)), listen(pull, args.bind)]
    except (ValueError, OSError, zmq.ZMQError) as error:
        why = os.strerror(error.errno) if isinstance(error, OSError) and error.errno else error  # no "[Errno 98]"
        sys.exit(f"sink: --bind {args.bind} (ZMQ_SINK_BIND): {why}; expected tcp://HOST:PORT with PORT and PORT + 1 "
                 "free, such as tcp://127.0.0.1:5555")
    endpoint = pull.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        out, held, mended = open_log(args.log_file)
    except OSError as error:
        sys.exit(f"sink: --log-file {args.log_file} (ZMQ_SINK_LOG_FILE): {error.strerror}; expected a file it can "
                 "append to, in a folder that exists")
    spare = os.open(os.devnull, os.O_RDONLY)
    room = (descriptors - len(os.listdir("/dev/fd")) - RESERVED_DESCRIPTORS) // 2
    access = (f"only CURVE clients with one of the {len(curve[2])} keys in {args.curve_clients}" if curve
              else "anyone who can connect, unencrypted")
    say(f"listening on {endpoint} (acknowledgements on {acks.getsockopt_string(zmq.LAST_ENDPOINT)}) for "
        f"{access}, appending to {args.log_file}{mended}, checking records with "
        f"{'simdjson' if simdjson else 'the json module'}; room for {room} load generators ({descriptors} "
        f"descriptors, {raised})")

    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    poller.register(acks, zmq.POLLIN)
    events = (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
              | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPT_FAILED)
    monitors = [pull.get_monitor_socket(events), acks.get_monitor_socket(zmq.EVENT_ACCEPT_FAILED)]
    for monitor in monitors:
        poller.register(monitor, zmq.POLLIN)
    with out:
        sink = Sink(out, args.log_file, held, acks)
        last_counts, last_time, last_stalled_line = sink.counts(), time.monotonic(), 0.0
        while not stopping:
            if sink.held:  # stalled: the file refuses writes
                time.sleep(RETRY_EVERY)
                now = time.monotonic()
                if sink.write_held():
                    sink.acknowledge()
                elif now - max(sink.stalled_since, last_stalled_line) >= STALLED_EVERY:
                    say(f"still cannot write to {args.log_file} after {now - sink.stalled_since:.0f}s; "
                        f"holding {sink.held_records()} records")
                    last_stalled_line = now
                continue
            ready = dict(poller.poll(100))
            if pull in ready:
                sink.drain(pull, max_seconds=0.5)
            if acks in ready:
                sink.welcome()
            if any([read_events(monitor, sink, refusals, curve) for monitor in monitors if monitor in ready]):
                refused, spare = refuse_waiting(listeners, spare)
                for host, *_ in refused:
                    refusals.add(f"{host}: no descriptor left, {descriptors} in all")
                if spare is None and not refused:  # libzmq, trying at once, took the one kept free to name them
                    refusals.add(f"clients: no descriptor left, {descriptors} in all (their addresses are not known)")
            now = time.monotonic()
            if now - last_time >= PROGRESS_EVERY:
                if sink.counts() != last_counts:
                    new = sink.counts()[0] - last_counts[0]
                    say(f"{sink.written} records (+{new / (now - last_time):.0f}/s), "
                        f"{sink.counts()[1]} frames rejected{sink.behind(now)}")
                    if not sink.held:  # every line whole
                        write_index(args.log_file, out, sink.seqs)
                last_counts, last_time = sink.counts(), now
        # What already arrived is written; the file is then closed holding whole lines only, unless it
        # refuses writes, which the summary then counts.
        sink.drain(pull, max_seconds=2.0)
        if sink.write_held():
            write_index(args.log_file, out, sink.seqs)
        sink.acknowledge()
    for socket, monitor in zip((pull, acks), monitors):
        socket.disable_monitor()
        monitor.close(linger=0)
    pull.close(linger=0)
    acks.close(linger=1000)  # the last acknowledgements, to load generators still connected
    context.term()
    say(f"stopped by {signal.Signals(stopping[0]).name}: {sink.summary(refusals.count)}")


if __name__ == "__main__":
    main()
