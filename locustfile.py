"""
Log every Locust request as one JSON line: to a local file, and over ZeroMQ to ``sink.py``.

Usage::

    python sink.py                  # listens on tcp://127.0.0.1:5555, appends to requests.jsonl
    locust -f locustfile.py         # pushes every record there, until the sink acknowledges it
    python report.py requests.jsonl # is every record there? the percentiles

Across machines, run ``python sink.py --bind 'tcp://*:5555'`` and set ZMQ_SINK_ADDRESS=tcp://10.0.0.5:5555 on each
load generator; ZMQ_SINK_ADDRESS= (empty) turns pushing off.

Settings (environment variables):

``LOCUST_LOG_FILE``           local JSON-lines file; unset: none. A worker process writes
                              ``<name>.<worker>.jsonl`` instead, so no two processes share a file.
``ZMQ_SINK_ADDRESS``          where ``sink.py`` listens (``tcp://127.0.0.1:5555``, its default), acknowledging on the
                              next port; empty: no pushing. Several sinks, comma-separated: ZeroMQ spreads the frames
                              among those connected.
``ZMQ_SINK_QUEUE``            records a process holds until a sink acknowledges them (100000).
``ZMQ_SINK_FLUSH_TIMEOUT``    seconds a process waits for acknowledgements when it quits (2).
``ZMQ_SINK_WARN_AFTER``       seconds records wait for an acknowledgement before Locust's log says so (5); 0: never.
``ZMQ_SINK_CURVE_PUBLIC``     with CURVE: the sink's public ``.key`` file (``python sink.py --make-keys``).
``LOCUST_CURVE_SECRET``       with CURVE: this load generator's ``.key_secret`` file. Set both, or neither.
``HOST``                      the ``hostname`` label on records (default: this machine's host name).
``LOCUST_RESOURCE_INTERVAL``  seconds between a process's resource samples while a test runs (2); 0: none.

Each line is one JSON object (spaces added here)::

    {"time": "2026-11-28T16:10:35.587Z", "loglevel": "INFO", "hostname": "loadgen-1",
     "worker": "loadgen-1_5f0c...", "run_id": "20261128T161020Z-9c1e04d2", "seq": 42, "message": ...}

``time`` is UTC. ``worker`` is Locust's id for the process (``hostname_uuid``), or one made like it for a
local run or a master: unique for all time, never a pid. ``run_id`` names the test: one id for every
process of a test, a new one for each test (``null`` before the first). ``seq`` numbers the records of a
process 1, 2, 3, ..., whatever their kind, so (``worker``, ``seq``) names one record and a gap shows a lost
one. For a request the message is an object::

    {"class": "request", "request_type": "GET", "name": "/", "result": "success" | "error", "status": 200,
     "response_time": 1.84, "response_length": 612, "exception": "<errors only: Locust's text for it>",
     "start_time": 1795882235.585, "url": "http://127.0.0.1:8089/", "other": <request context>}

``status`` is 0 where no response came, and absent for a client that passes no response object.

Every process that runs users adds, every ``LOCUST_RESOURCE_INTERVAL`` seconds while a test runs::

    {"class": "resources", "cpu_percent": 23.5, "rss_bytes": 61440000, "user_count": 10}

Anything else logged on ``logger`` (``logger.info("Task started")``) gives ``"message": "Task started"``.
The last record of a process that quits cleanly, after its users have stopped, says how many it made::

    {"class": "end", "records": 1234, "requests": 1200, "dropped": 0, "role": "worker"}

``records`` counts this one too, so it equals its ``seq``; ``dropped``: records its full queue refused, or
over 1 MiB; ``role``: ``master``, ``worker`` or ``local`` (a run in one process).
Everything above ``class WebsiteUser`` can be copied into another locustfile as it is; it needs Locust
and pyzmq, and uses orjson, if installed, to encode ~10 times faster.
"""

import argparse
import atexit
import json
import logging
import math
import os
import secrets
import socket
import struct
import sys
import time
import types
from collections import deque
from pathlib import Path

import gevent
import psutil
import zmq
import zmq.auth
from locust import FastHttpUser, between, events, task
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import StatsError

try:
    import orjson  # optional: encodes a record in ~1 µs instead of ~10 (README, Performance)
except ImportError:
    orjson = None

DEFAULT_SINK_ADDRESS = "tcp://127.0.0.1:5555"  # where `python sink.py` listens when given no address


def setting(name, default, parse, expected):
    """The environment variable through `parse`, or Locust stops here with one line: a test must not run
    without the logging that was asked for."""
    value = os.environ.get(name, default)
    try:
        return parse(value)
    except ValueError as error:
        sys.exit(f"request_log: {name}={value!r}: {f'{error}; ' if str(error) else ''}expected {expected}")


def whole_number(text):
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError()
    return int(text)


def seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # Python's message about it would be noise beside ours
    if not 0 <= value < math.inf:
        raise ValueError()
    return value


def ack_address(address):
    """Where a sink at `address` publishes its acknowledgements: the next port (sink.py has the same rule)."""
    head, colon, port = address.rpartition(":")
    if not (address.startswith("tcp://") and colon and port.isdigit() and 0 < int(port) < 65535):
        raise ValueError(f"{address!r} is not tcp://HOST:PORT, and acknowledgements come from the next port")
    return f"{head}:{int(port) + 1}"


def sink_addresses(text):
    addresses = [address.strip() for address in text.split(",") if address.strip()]
    for address in addresses:
        ack_address(address)
        # Resolving the host opens no connection: a probe would be a client that the sink sees, and, under CURVE,
        # refuses. "SOURCE;HOST" is libzmq's form for a connection from a given interface.
        host = address.removeprefix("tcp://").rpartition(":")[0].rpartition(";")[2].strip("[]")
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as error:
            raise ValueError(f"{host!r} in {address!r} is no host this machine can resolve "
                             f"({getattr(error, 'strerror', None) or error})") from None
    return addresses


def key_file(holds_secret):
    """A parser for a pyzmq certificate file, giving (public key, secret key or None); empty: None."""
    def parse(path):
        if not path:
            return None
        if not zmq.has("curve"):
            raise ValueError("this pyzmq's libzmq has no CURVE: install pyzmq's wheel")
        try:
            public, secret = zmq.auth.load_certificate(path)
        except (OSError, ValueError) as error:  # pyzmq says "invalid" for a file that does not exist
            raise ValueError("no such file" if not os.path.exists(path) else getattr(error, "strerror", None) or error)
        if holds_secret and secret is None:
            raise ValueError("holds no secret key, only a public one")
        return public, secret
    return parse


def log_file(text):
    if text and not Path(text).parent.is_dir():
        raise ValueError(f"there is no folder {Path(text).parent}")
    if text and Path(text).is_dir():
        raise ValueError("that is a folder")
    if text and not os.access(Path(text).parent, os.W_OK):
        raise ValueError("this user cannot write there")
    return text or None


LOG_FILE = setting("LOCUST_LOG_FILE", "", log_file, "a file in a folder this user can write to")
SINK_ADDRESSES = setting("ZMQ_SINK_ADDRESS", DEFAULT_SINK_ADDRESS, sink_addresses,
                         "addresses such as tcp://10.0.0.5:5555, comma-separated; empty: no pushing")
QUEUE_LIMIT = setting("ZMQ_SINK_QUEUE", "100000", whole_number, "a whole number of records, 1 or more")
FLUSH_TIMEOUT = setting("ZMQ_SINK_FLUSH_TIMEOUT", "2", seconds, "seconds, 0 or more")
WARN_AFTER = setting("ZMQ_SINK_WARN_AFTER", "5", seconds, "seconds, 0 or more (0: never)")
HOSTNAME = os.environ.get("HOST") or socket.gethostname()
SINK_CERTIFICATE = setting("ZMQ_SINK_CURVE_PUBLIC", "", key_file(holds_secret=False), "the sink's public .key file")
OWN_CERTIFICATE = setting("LOCUST_CURVE_SECRET", "", key_file(holds_secret=True),
                          "this load generator's .key_secret file")
if bool(SINK_CERTIFICATE) != bool(OWN_CERTIFICATE):
    sys.exit("request_log: ZMQ_SINK_CURVE_PUBLIC and LOCUST_CURVE_SECRET go together: set both, or neither")
# What a CURVE client's socket needs: the sink's public key, then ours and our secret one.
CURVE_KEYS = (SINK_CERTIFICATE[0], *OWN_CERTIFICATE) if OWN_CERTIFICATE else None
RESOURCE_INTERVAL = setting("LOCUST_RESOURCE_INTERVAL", "2", seconds, "seconds between samples, 0 or more (0: none)")

# Records go to our own handlers only; propagating would print every request on Locust's console.
logger = logging.getLogger("request_log")
logger.setLevel(logging.INFO)
logger.propagate = False
# Our own lines, for Locust's log, on a logger apart: a locustfile imported as `request_log` would share `logger`.
console = logging.getLogger("locust.request_log")


# default=str turns exceptions, bytes and custom context objects into text; NaN is not JSON. Compact
# separators, as orjson writes, so lines from processes with and without orjson sort alike.
json_encoder = json.JSONEncoder(default=str, allow_nan=False, separators=(",", ":"))

if orjson is not None:
    # Options that make orjson write what json_encoder writes: int keys as strings, datetimes and
    # dataclasses through default=str. One difference is left: orjson writes NaN as null.
    ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS

    def dumps(value):
        return orjson.dumps(value, default=str, option=ORJSON_OPTIONS)
else:
    def dumps(value):
        return json_encoder.encode(value).encode()


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON that any JSON parser accepts."""

    def __init__(self, hostname, worker):
        super().__init__()
        self.hostname, self.worker = hostname, worker
        self.second, self.time_head = None, b""
        self.seq = 0  # records this process has made
        self.set_run_id(None)

    def set_run_id(self, run_id):
        # What every line of this process repeats until the next test is encoded once; per record only
        # the message is.
        self.identity = b'"hostname":%s,"worker":%s,"run_id":%s,' % tuple(
            json_encoder.encode(value).encode() for value in (self.hostname, self.worker, run_id))

    def format(self, record):
        return self.line(record).decode()

    def line(self, record):
        """The record's line. Every handler gets the same one, with one seq: the first to ask keeps it on the
        record, as logging keeps a formatted traceback there."""
        if not hasattr(record, "json_line"):
            message = record.msg if isinstance(record.msg, dict) else record.getMessage()
            record.json_line, record.json_seq = self.to_json(record.created, record.levelname, message), self.seq
        return record.json_line

    def to_json(self, created, level, message):
        """One record as UTF-8 JSON bytes, without a line break, numbered with this process's next seq."""
        second = int(created)
        if second != self.second:  # strftime costs ~2 µs; one second holds thousands of records
            self.second = second
            self.time_head = b'{"time":"' + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
        try:
            body = dumps(message)
        except Exception:
            # A tuple key, a cycle, NaN, a __str__ that raises, or (for orjson) a lone surrogate: keep the
            # record, stringify what fails, and let the json module, which escapes surrogates, write it.
            if isinstance(message, dict):
                message = {key if isinstance(key, str) else _safe_repr(key): _encodable(value)
                           for key, value in message.items()}
            body = json_encoder.encode(message).encode()
        self.seq += 1
        # `time` first, in UTC at a fixed width, so plain `sort` orders lines by time.
        return b'%s.%03dZ","loglevel":"%s",%s"seq":%d,"message":%s}' % (
            self.time_head, (created - second) * 1000, level.encode(), self.identity, self.seq, body)


def _encodable(value):
    """value if the json module can encode it, else its repr()."""
    try:
        json_encoder.encode(value)
        return value
    except Exception:
        return _safe_repr(value)


def _safe_repr(value):
    try:
        return repr(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


class LinesHandler(logging.Handler):
    """A handler that takes encoded lines in batches; a record logged on `logger` is a batch of one."""

    def emit(self, record):
        try:
            self.write_lines([self.formatter.line(record)], record.json_seq)
        except Exception:
            self.handleError(record)

    def write_lines(self, lines, first_seq):
        """Lines numbered first_seq, first_seq + 1, ..."""
        raise NotImplementedError


class JsonLinesFileHandler(LinesHandler):
    """Appends formatted records to a local file, buffered rather than flushed per record."""

    def __init__(self, path):
        super().__init__()
        self.file = open(path, "ab")

    def write_lines(self, lines, first_seq):
        self.file.write(b"\n".join(lines) + b"\n")

    def close(self):
        if not self.file.closed:
            self.file.close()
        super().close()


class Frame:
    """Consecutive records of this process, as sent: [b"<first seq> <worker>", lines], until acknowledged."""
    __slots__ = ("first", "count", "message", "first_sent", "sent_at", "tries")

    def __init__(self, first, lines, worker):
        self.first, self.count = first, len(lines)
        # Joining makes exact-size frames: orjson's own bytes keep ~4 KB each, too much for a long queue.
        self.message = [b"%d %s" % (first, worker), b"\n".join(lines)]
        self.first_sent = self.sent_at = None
        self.tries = 0


class ZmqPushHandler(LinesHandler):
    """Pushes formatted records to ZeroMQ sinks and keeps each frame until a sink has written and
    acknowledged it, never blocking the gevent loop and never sending more than a slow sink takes.

    Every 50 ms a greenlet reads the acknowledgements and sends while fewer than WINDOW frames are in flight:
    first the frames to send again, then new ones. A new frame leaves when it is full or its first record has
    waited LINGER: a process at a low rate sends few, full frames, and while the window is full the records
    gather into full frames, so the sink's cost per record falls as its load rises. Frames are sent again when
    what carried them may be lost (a connection dropped, or a sink answered a new subscription of ours: what it
    acknowledged before went to no one), and the oldest alone when no acknowledgement came for a timeout. As
    TCP's one retransmission timer (RFC 6298), it runs from the last acknowledgement, follows the
    acknowledgement times measured, and doubles at each expiry: a sink that is behind, even one that comes to
    each load generator's frames seconds apart, gets its frames late, not twice. Every send is non-blocking: a
    plain pyzmq send that blocks would freeze every greenlet of the worker, users and heartbeats included.
    IMMEDIATE keeps ZeroMQ from accepting frames while no sink is connected, so records stay in our queue, where
    they are counted.

    ZMTP heartbeats run on the acknowledgement socket only. The sink's PULL socket stops reading a connection
    while the sink is behind or its file refuses writes, and libzmq 4.3.5 aborts the sink's process when it then
    answers a heartbeat on a connection that was dropped meanwhile. The sink's PUB socket never stops reading,
    so heartbeats there find a sink host that vanished in seconds; the push connection to it is then made anew,
    and what was in flight on it is sent again.
    """

    WINDOW = 8  # frames in flight, unacknowledged, at most
    BATCH = 1000  # records per frame at most
    # Bytes per frame at most, but for a single larger record: the sink holds up to two frames a connection.
    FRAME_BYTES = 64 << 10
    RECORD_BYTES = 1 << 20  # the sink drops a connection that sends a larger record
    LINGER = 1.0  # seconds a record may wait for others to fill its frame
    MIN_TIMEOUT, MAX_TIMEOUT = 1.0, 60.0  # seconds, for an acknowledgement
    HEARTBEAT_IVL, HEARTBEAT_TIMEOUT = 1000, 3000  # ms: a sink host that vanished is noticed in seconds
    TOLD = (zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

    def __init__(self, addresses, worker, queue_limit, flush_timeout, curve_keys=None, warn_after=0,
                 local_file=None):
        super().__init__()
        self.address = ",".join(addresses)
        self.sinks = {ack_address(address): address for address in addresses}
        self.worker = worker.encode()
        self.queue_limit = queue_limit
        self.flush_timeout = flush_timeout
        self.pending = deque()  # records not in a frame yet, seqs pending_first, pending_first + 1, ...
        self.pending_first = self.pending_since = None
        self.pending_bytes = 0
        self.unacked = {}  # first seq -> Frame: every frame not acknowledged yet
        self.to_send = deque()  # frames to send, or send again, in order
        self.in_flight = {}  # first seq -> Frame sent and not acknowledged, in the order sent
        self.round_trip = self.deviation = None  # seconds: acknowledgement time, smoothed, and its deviation
        # As TCP's one timer: the oldest frame in flight is sent again once it has waited the timeout since it
        # was sent or since the last acknowledgement or timeout, whichever came last; backoff doubles the timeout
        # until an acknowledgement comes. The frames behind it wait behind it, not for nothing.
        self.waiting_since, self.backoff = 0.0, 1
        self.made = self.queued = self.acked = self.dropped = self.sent = self.resent = 0
        self.warned = False
        # The alarm: records that waited warn_after seconds for an acknowledgement are said once, and so is the
        # next acknowledgement; at 2000 records a second, a one-hour test lost is said in seconds, not at its end.
        self.warn_after, self.local_file = warn_after, local_file
        self.unanswered_since, self.alarm = 0.0, None  # since the last acknowledgement; (acked, since) while alarmed
        self.context = zmq.Context()  # never zmq.Context.instance(): it could be one shared across a fork
        self.socket, self.acks = self.context.socket(zmq.PUSH), self.context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.setsockopt(zmq.SNDHWM, self.WINDOW)
        self.acks.setsockopt(zmq.SUBSCRIBE, self.worker)
        # Acknowledgements are small: a SUB socket that stopped reading at a high-water mark could abort us.
        self.acks.setsockopt(zmq.RCVHWM, 0)
        self.acks.setsockopt(zmq.HEARTBEAT_IVL, self.HEARTBEAT_IVL)
        self.acks.setsockopt(zmq.HEARTBEAT_TIMEOUT, self.HEARTBEAT_TIMEOUT)
        for socket_ in (self.socket, self.acks):
            if curve_keys:  # encrypted, to a sink that knows our public key; without a handshake nothing leaves
                socket_.curve_serverkey, socket_.curve_publickey, socket_.curve_secretkey = curve_keys
        # What was in flight on a connection that dropped is lost with it: the monitors say when to resend. The
        # push connection's other events say, in the last line, why no sink acknowledged anything.
        self.curve, self.heard = bool(curve_keys), {}  # event -> the last value it came with
        self.monitors = [self.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | self.TOLD),
                         self.acks.get_monitor_socket(zmq.EVENT_DISCONNECTED)]
        for address in addresses:  # several sinks: PUSH sends each frame to one of those connected, in turn
            self.socket.connect(address)
            self.acks.connect(ack_address(address))
        self.forwarder = gevent.spawn(self._forward_forever)

    def write_lines(self, lines, first_seq):
        self.made += len(lines)
        room = max(0, self.queue_limit - self.queued)
        if len(lines) > room:
            self.dropped += len(lines) - room
            lines = lines[:room]
        if self.pending and self.pending_first + len(self.pending) != first_seq:
            while self._pack(0, flushing=True):  # a gap (records dropped): a frame holds consecutive seqs only
                pass
        now = time.monotonic()
        if not self.pending:
            self.pending_first, self.pending_since = first_seq, now
        if not self.queued:
            self.unanswered_since = now
        self.pending += lines
        self.pending_bytes += sum(map(len, lines)) + len(lines)
        self.queued += len(lines)
        if self.queued > self.queue_limit // 2:
            if not self.warned:
                console.warning("ZeroMQ sink %s: %d records wait for acknowledgement, over half of ZMQ_SINK_QUEUE "
                                "(%d): the sink is behind or out of reach; records past the limit are dropped and "
                                "counted", self.address, self.queued, self.queue_limit)
                self.warned = True
        elif self.queued < self.queue_limit // 4:
            self.warned = False

    def _pack(self, now, flushing):
        """Make a frame of the oldest pending records if it is due: full, or its first record waited LINGER,
        or flushing. True if it did."""
        while self.pending and (flushing or len(self.pending) >= self.BATCH or self.pending_bytes >= self.FRAME_BYTES
                                or now - self.pending_since >= self.LINGER):
            first, lines = self.pending_first, [self.pending.popleft()]
            size = len(lines[0]) + 1
            while self.pending and len(lines) < self.BATCH and size + len(self.pending[0]) < self.FRAME_BYTES:
                lines.append(self.pending.popleft())
                size += len(lines[-1]) + 1
            self.pending_first, self.pending_since = first + len(lines), now
            self.pending_bytes -= size
            if size > self.RECORD_BYTES + 1:  # one record (frames exceed FRAME_BYTES alone) the sink would refuse
                self.dropped += 1
                self.queued -= 1
                continue
            self.unacked[first] = Frame(first, lines, self.worker)
            self.to_send.append(self.unacked[first])
            return True
        return False

    def _forward_forever(self):
        while True:
            self._forward()
            gevent.sleep(0.05)

    def _forward(self, flushing=False):
        now = time.monotonic()
        if self._read_acks(now) | self._lost_in_flight():
            for frame in self.in_flight.values():
                frame.first_sent = None  # timed anew: how long a connection was lost says nothing of the sink
            self.to_send.extendleft(reversed(self.in_flight.values()))
            self.in_flight.clear()
        self._sound_alarm(now)
        oldest = next(iter(self.in_flight.values()), None)
        if oldest and now - max(oldest.sent_at, self.waiting_since) >= self.timeout():
            del self.in_flight[oldest.first]
            self.to_send.appendleft(oldest)
            self.waiting_since, self.backoff = now, self.backoff * 2
        while len(self.in_flight) < self.WINDOW and (self.to_send or self._pack(now, flushing)):
            frame = self.to_send[0]
            if frame.first in self.unacked:
                try:
                    self.socket.send_multipart(frame.message, zmq.NOBLOCK)
                except zmq.Again:
                    return  # no sink connected: keep the frames, try again later
                if frame.tries:
                    self.resent += frame.count
                else:
                    self.sent += frame.count
                frame.tries, frame.sent_at, frame.first_sent = frame.tries + 1, now, frame.first_sent or now
                self.in_flight[frame.first] = frame
            self.to_send.popleft()

    def _sound_alarm(self, now):
        """Say once when records have waited warn_after seconds without an acknowledgement, and once when one
        comes."""
        if self.alarm is None and self.warn_after and self.queued and now - self.unanswered_since >= self.warn_after:
            self.alarm = (self.acked, self.unanswered_since)
            console.warning("ZeroMQ sink %s: no acknowledgement for %.1fs, %d records waiting%s; they are %s",
                            self.address, now - self.unanswered_since, self.queued, self.why_not_acknowledged() or
                            ": the sink stopped acknowledging: it is stopped, cannot write, or is out of reach",
                            f"also in the local file {self.local_file}" if self.local_file else
                            "in no file (LOCUST_LOG_FILE is unset): lost if this process quits before a sink "
                            "acknowledges them")
        elif self.alarm is not None and self.acked > self.alarm[0]:
            console.info("ZeroMQ sink %s: records acknowledged now, after %.1fs without", self.address,
                         now - self.alarm[1])
            self.alarm = None

    def _lost_in_flight(self):
        """True if a connection dropped since the last call. An acknowledgement connection whose heartbeats went
        unanswered also drops the push connection to its sink, which has no heartbeats."""
        lost = False
        for monitor in self.monitors:
            while monitor.poll(0):
                message, endpoint = monitor.recv_multipart()
                event, value = struct.unpack("=HI", message[:6])  # native order; zmq.utils.monitor imports asyncio
                if monitor is self.monitors[0]:
                    self.heard[event] = value
                    lost |= event == zmq.EVENT_DISCONNECTED
                    continue
                lost = True
                if event == zmq.EVENT_DISCONNECTED:
                    sink = self.sinks.get(endpoint.decode())
                    for address in [sink] if sink else self.sinks.values():
                        self.socket.disconnect(address)
                        self.socket.connect(address)
        return lost

    def timeout(self):
        """Seconds the oldest frame in flight waits for its acknowledgement before it is sent again."""
        measured = self.MIN_TIMEOUT if self.round_trip is None else self.round_trip + 4 * self.deviation
        return min(self.MAX_TIMEOUT, max(self.MIN_TIMEOUT, measured) * self.backoff)

    def _read_acks(self, now):
        """Forget the frames acknowledged. True if a sink answered a new subscription of ours (an empty
        acknowledgement): what it acknowledged before went to no one."""
        answered = False
        while True:
            try:
                worker, ack = self.acks.recv_multipart(zmq.NOBLOCK)
                numbers = list(map(int, ack.split()))  # b"<first seq> <count> <first seq> <count> ..."
            except zmq.Again:
                return answered
            except ValueError:
                continue  # not an acknowledgement
            if worker != self.worker:
                continue  # a longer id that starts with ours: subscriptions match prefixes
            answered |= not numbers
            for first, count in zip(numbers[::2], numbers[1::2]):
                frame = self.unacked.get(first)
                if frame is not None and frame.count == count:
                    del self.unacked[first]
                    self.in_flight.pop(first, None)
                    self.acked += count
                    self.queued -= count
                    self.waiting_since, self.backoff, self.unanswered_since = now, 1, now
                    # From its first send since it may have been lost, whichever copy was acknowledged: TCP's rule
                    # (Karn's) takes no time of a frame sent again, and then, where every frame is sent again, learns
                    # nothing and times out each one. Too long a time only makes the timeout longer, the safe side.
                    self._measure(now - frame.first_sent)

    def _measure(self, seconds):
        if self.round_trip is None:
            self.round_trip, self.deviation = seconds, seconds / 2
        else:
            self.deviation += (abs(self.round_trip - seconds) - self.deviation) / 4
            self.round_trip += (seconds - self.round_trip) / 8

    def why_not_acknowledged(self):
        """What this process knows of why no sink acknowledged a record, for its last line."""
        if self.acked:
            return ""
        if self.sent:
            return (": records were sent, but no sink acknowledged any (a sink.py without acknowledgements, or the "
                    "port after its address unreachable)")
        if zmq.EVENT_HANDSHAKE_FAILED_AUTH in self.heard:
            return (": the sink refused this process's CURVE key: copy the public .key that goes with "
                    "LOCUST_CURVE_SECRET into the sink's --curve-clients folder")
        if self.heard.get(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL) == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return (": the sink runs without CURVE and this process with it: give the sink --curve-secret and "
                    "--curve-clients, or unset ZMQ_SINK_CURVE_PUBLIC and LOCUST_CURVE_SECRET" if self.curve else
                    ": the sink requires CURVE and this process has no keys: set ZMQ_SINK_CURVE_PUBLIC and "
                    "LOCUST_CURVE_SECRET")
        # Both sides see a mismatch of mechanisms, and whichever sees it first closes: the other learns no more.
        if zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL in self.heard:
            return (": the sink closed every CURVE handshake: it runs without CURVE, or ZMQ_SINK_CURVE_PUBLIC is not "
                    "its public key" if self.curve else
                    ": the sink closed every handshake: it requires CURVE keys (ZMQ_SINK_CURVE_PUBLIC, "
                    "LOCUST_CURVE_SECRET), or it is no sink")
        if zmq.EVENT_CONNECTED in self.heard:
            return ": connections were made, but no handshake began: is that a sink's address?"
        if self.address == DEFAULT_SINK_ADDRESS:
            return (f": no sink was reached at {DEFAULT_SINK_ADDRESS}, the default address; start one there with "
                    "`python sink.py`, or set ZMQ_SINK_ADDRESS= (empty) to turn pushing off")
        return ": nothing accepted a connection there: no sink is listening, or a firewall is in the way"

    def close(self):
        """Wait at most flush_timeout seconds until a sink has acknowledged every record; say how many it has."""
        if self.socket is not None:
            self.forwarder.kill()
            deadline = time.monotonic() + self.flush_timeout
            self._forward(flushing=True)
            while (self.unacked or self.pending) and time.monotonic() < deadline:
                gevent.sleep(0.01)
                self._forward(flushing=True)
            for socket_ in (self.socket, self.acks):
                socket_.disable_monitor()
            for socket_ in (*self.monitors, self.socket, self.acks):
                socket_.close(linger=0)
            self.context.term()
            self.socket = None
            if self.made > self.acked:
                console.warning(
                    "ZeroMQ sink %s: %d records acknowledged, %d sent again; %d not (%d dropped: a full queue of %d, "
                    "or over 1 MiB; %d unacknowledged after %.1fs)%s; they are %s",
                    self.address, self.acked, self.resent, self.made - self.acked, self.dropped, self.queue_limit,
                    self.queued, self.flush_timeout, self.why_not_acknowledged(),
                    f"in the local file {self.local_file}" if self.local_file else
                    "lost: in no file (LOCUST_LOG_FILE is unset)",
                )
            elif self.made:
                console.info("ZeroMQ sink %s: all %d records acknowledged, %d sent again", self.address, self.acked,
                             self.resent)
        super().close()


class RequestLog:
    """Collects the requests of one Locust process and writes them through `logger`'s handlers in batches."""

    def __init__(self, logger):
        self.logger = logger
        self.handlers = []
        self.formatter = None
        self.pending = []  # requests seen but not yet encoded
        self.requests = 0  # requests encoded
        self.pusher = self.writer = None
        self.role = None

    def register(self, environment):
        # Called from events.init: `locust --processes N` forks after importing this file, so files and
        # sockets are opened here, once the process is what it will stay, and none is shared.
        # A worker's id is Locust's; a local run or a master makes one the same way, never from its pid,
        # which repeats: (worker, seq) must name one record in any file, for all time.
        worker = getattr(environment.runner, "client_id", None) or f"{socket.gethostname()}_{secrets.token_hex(16)}"
        self.role = ("master" if isinstance(environment.runner, MasterRunner) else
                     "worker" if isinstance(environment.runner, WorkerRunner) else "local")
        self.formatter = JsonFormatter(HOSTNAME, worker)
        path = LOG_FILE and Path(LOG_FILE)
        if path:
            if isinstance(environment.runner, WorkerRunner):
                path = path.with_name(f"{path.stem}.{worker}{path.suffix}")
            self.handlers.append(JsonLinesFileHandler(path))
        if SINK_ADDRESSES:
            self.pusher = ZmqPushHandler(SINK_ADDRESSES, worker, QUEUE_LIMIT, FLUSH_TIMEOUT, CURVE_KEYS, WARN_AFTER,
                                         path)
            self.handlers.append(self.pusher)
        for handler in self.handlers:
            handler.setFormatter(self.formatter)
            self.logger.addHandler(handler)
        # Even a master with nothing to log names each test: its workers take the id from it.
        environment.events.test_start.add_listener(self.on_test_start)
        if self.handlers:
            environment.events.request.add_listener(self.on_request)
            # `quit` fires after the runner has stopped every user, so no request comes after it.
            environment.events.quit.add_listener(self.close)
            # Locust used as a library (Environment, create_local_runner) never fires quit: the end of the
            # script is the last moment to write the last requests and the end record.
            atexit.register(self.close)
            self.writer = gevent.spawn(self._write_forever)

    def on_test_start(self, environment, **kwargs):
        if isinstance(environment.runner, WorkerRunner):
            # Locust copies the master's custom arguments into every spawn message, and a worker takes
            # them in before it fires test_start and starts users: its first record already has the id.
            run_id = environment.parsed_options.request_log_run_id
        else:
            # A local run or the master names each test, in UTC so that ids sort by start time.
            run_id = time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()) + secrets.token_hex(4)
            if isinstance(environment.runner, MasterRunner):
                environment.parsed_options.request_log_run_id = run_id
        self.write_pending()  # requests that ended before this test belong to the one before
        self.formatter.set_run_id(run_id)

    def on_request(self, request_type, name, response_time, response_length, exception=None, context=None,
                   **kwargs):
        # Only remember the request. Encoding and writing it here, between two requests, cost ~15 µs in a
        # busy Locust process, twice as much as in a loop over many requests, where that code and its
        # data stay in the CPU's caches; so a greenlet does it in batches, every 50 ms.
        self.pending.append((time.time(), request_type, name, response_time, response_length, exception,
                             context, kwargs.get("start_time"), kwargs.get("url"),
                             getattr(kwargs.get("response"), "status_code", None)))

    def _write_forever(self):
        while True:
            gevent.sleep(0.05)
            self.write_pending()

    def write_pending(self):
        pending, self.pending = self.pending, []
        if pending:
            lines = [self.to_line(*request) for request in pending]
            self.requests += len(lines)
            # No handler lock is taken: greenlets share one thread and no write yields to another.
            for handler in self.handlers:
                handler.write_lines(lines, self.formatter.seq - len(lines) + 1)

    def to_line(self, created, request_type, name, response_time, response_length, exception, context,
                start_time, url, status):
        message = {"class": "request", "request_type": request_type, "name": name,
                   "result": "success" if exception is None else "error"}
        if status is not None:  # 0 where Locust has no response; none from a client without response objects
            message["status"] = status
        message["response_time"], message["response_length"] = response_time, response_length
        if exception is not None:
            # Locust's own text for it, as in its failures table, which groups failures by it
            message["exception"] = StatsError.parse_error(exception if isinstance(exception, str)
                                                          else _safe_repr(exception))
        if start_time is not None:
            message["start_time"] = start_time
        if url is not None:
            message["url"] = url
        message["other"] = context
        return self.formatter.to_json(created, "INFO" if exception is None else "ERROR", message)

    def close(self, **kwargs):
        if not self.handlers:
            return  # nothing to log to, or closed already: on quit, then at the exit
        self.writer.kill()
        self.write_pending()
        # The last record says how many this process made, itself included: a reader of any file can then
        # tell whether it holds all of them. Straight to the handlers, like requests, whatever the logger's
        # level. Records dropped after it, or not acknowledged, are counted in the push handler's last line.
        end = self.formatter.to_json(time.time(), "INFO", {
            "class": "end", "records": self.formatter.seq + 1, "requests": self.requests,
            "dropped": self.pusher.dropped if self.pusher else 0, "role": self.role})
        for handler in self.handlers:
            handler.write_lines([end], self.formatter.seq)
        for handler in self.handlers:
            self.logger.removeHandler(handler)
            handler.close()
        self.handlers = []


class ResourceSampler:
    """Logs the CPU, memory and user count of a process that runs users, every few seconds of a test."""

    def __init__(self, logger, interval):
        self.logger = logger
        self.interval = interval
        self.process = self.sampler = None

    def register(self, environment):
        if self.interval > 0 and self.logger.handlers and not isinstance(environment.runner, MasterRunner):
            self.process = psutil.Process()  # this process, after any fork: made at import, it was the parent
            environment.events.test_start.add_listener(self.start)
            environment.events.test_stop.add_listener(self.stop)  # also fired on quit, by runner.quit()

    def start(self, environment, **kwargs):
        self.process.cpu_percent()  # from now on; psutil measures CPU between two calls
        self.sampler = gevent.spawn(self._sample_forever, environment.runner)

    def _sample_forever(self, runner):
        while True:
            gevent.sleep(self.interval)
            # Percent of one core, as Locust's own warning above 90% counts it.
            self.logger.info({"class": "resources", "cpu_percent": self.process.cpu_percent(),
                              "rss_bytes": self.process.memory_info().rss, "user_count": runner.user_count})

    def stop(self, **kwargs):
        if self.sampler is not None:
            self.sampler.kill()
            self.sampler = None


request_log = RequestLog(logger)
resource_sampler = ResourceSampler(logger, RESOURCE_INTERVAL)


def add_run_id_argument(parser):
    # Not for users to set: the master fills it in at each test start, and Locust passes custom arguments
    # to the workers with their spawn messages.
    parser.add_argument("--request-log-run-id", help=argparse.SUPPRESS, include_in_web_ui=False)


def on_locust_init(environment, **kwargs):
    request_log.register(environment)
    resource_sampler.register(environment)


def keep_own_names(names):
    """Give every function and method defined above the module's names as they are now. A locustfile's own code
    below this block may bind the same names (`from time import time`, as some of Locust's examples do, or a
    `logger` of its own), and the hooks, which look names up at every call, would then call that."""
    own = dict(names)

    def rebound(function):
        copy = types.FunctionType(function.__code__, own, function.__name__, function.__defaults__,
                                  function.__closure__)  # the closure keeps super()'s class
        copy.__kwdefaults__, copy.__qualname__, copy.__doc__ = (function.__kwdefaults__, function.__qualname__,
                                                                function.__doc__)
        return copy

    for name, value in own.items():
        if isinstance(value, types.FunctionType) and value.__module__ == __name__:
            own[name] = rebound(value)
        elif isinstance(value, type) and value.__module__ == __name__:
            for attribute, member in vars(value).items():
                if isinstance(member, types.FunctionType):
                    setattr(value, attribute, rebound(member))
    names.update(own)


keep_own_names(globals())
events.init_command_line_parser.add_listener(add_run_id_argument)
events.init.add_listener(on_locust_init)


class WebsiteUser(FastHttpUser):
    wait_time = between(0.1, 0.5)

    @task
    def index(self):
        logger.info("Task started")
        self.client.get("/")
        self.client.get("/does-not-exist")
