"""
Log every Locust request as one JSON line: to a local file, and over ZeroMQ to ``sink.py``.

Usage::

    python sink.py --log-file requests.jsonl                  # on the collecting machine
    ZMQ_SINK_ADDRESS=tcp://10.0.0.5:5555 LOCUST_LOG_FILE=local.jsonl \\
        locust -f locustfile.py --processes 4                 # on each load generator

Settings (environment variables):

``LOCUST_LOG_FILE``         local JSON-lines file; unset: none. A worker process writes
                            ``<name>.<worker>.jsonl`` instead, so no two processes share a file.
``ZMQ_SINK_ADDRESS``        where ``sink.py`` listens, e.g. ``tcp://10.0.0.5:5555``; unset: no pushing.
``ZMQ_SINK_QUEUE``          records a process holds while the sink is unreachable or slow (100000).
``ZMQ_SINK_FLUSH_TIMEOUT``  seconds a process spends delivering its queue when it quits (2).
``HOST``                    the ``hostname`` label on records (default: this machine's host name).

Each line is one JSON object::

    {"time": "2026-11-28T16:10:35.587Z", "loglevel": "INFO", "hostname": "loadgen-1",
     "worker": "loadgen-1_5f0c...", "message": ...}

``time`` is UTC. ``worker`` is Locust's id for the process (``hostname_uuid``). For a request the
message is an object::

    {"class": "request", "request_type": "GET", "name": "/", "result": "success" | "error",
     "response_time": 1.84, "response_length": 612, "exception": "<errors only>",
     "start_time": 1795882235.585, "url": "http://127.0.0.1:8089/", "other": <request context>}

Anything else logged on ``logger`` (``logger.info("Task started")``) gives ``"message": "Task started"``.
Everything above ``class WebsiteUser`` can be copied into another locustfile as it is.
"""

import json
import logging
import os
import socket
import time
from collections import deque
from itertools import islice
from pathlib import Path

import gevent
import zmq
from locust import FastHttpUser, between, events, task
from locust.runners import WorkerRunner

LOG_FILE = os.environ.get("LOCUST_LOG_FILE")
SINK_ADDRESS = os.environ.get("ZMQ_SINK_ADDRESS")
QUEUE_LIMIT = int(os.environ.get("ZMQ_SINK_QUEUE", "100000"))
FLUSH_TIMEOUT = float(os.environ.get("ZMQ_SINK_FLUSH_TIMEOUT", "2"))
HOSTNAME = os.environ.get("HOST") or socket.gethostname()

# Records go to our own handlers only; propagating would print every request on Locust's console.
logger = logging.getLogger("request_log")
logger.setLevel(logging.INFO)
logger.propagate = False


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON that any JSON parser accepts."""

    def __init__(self, hostname, worker):
        super().__init__()
        self.hostname = hostname
        self.worker = worker

    def format(self, record):
        message = record.msg if isinstance(record.msg, dict) else record.getMessage()
        entry = {
            # ISO 8601 in UTC with a fixed width, so plain `sort` orders lines by time.
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + ".%03dZ" % record.msecs,
            "loglevel": record.levelname,
            "hostname": self.hostname,
            "worker": self.worker,
            "message": message,
        }
        try:
            # default=str turns exceptions, bytes and custom context objects into text.
            return json.dumps(entry, default=str, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            # Still unencodable (non-string keys, a cycle, NaN): keep the record, stringify what fails.
            entry["message"] = {str(key): _encodable(value) for key, value in message.items()}
            return json.dumps(entry, default=str, allow_nan=False)


def _encodable(value):
    try:
        json.dumps(value, default=str, allow_nan=False)
        return value
    except (TypeError, ValueError, RecursionError):
        return repr(value)


class JsonLinesFileHandler(logging.Handler):
    """Appends formatted records to a local file, buffered rather than flushed per record."""

    def __init__(self, path):
        super().__init__()
        self.file = open(path, "a", encoding="utf-8")

    def emit(self, record):
        try:
            self.file.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)

    def close(self):
        if not self.file.closed:
            self.file.close()
        super().close()


class ZmqPushHandler(logging.Handler):
    """Pushes formatted records to a ZeroMQ sink without ever blocking the gevent loop.

    Records wait in a bounded queue and a greenlet hands them to ZeroMQ in batches, one record per
    frame of a multipart message. Every send is non-blocking: a plain pyzmq send that blocks would
    freeze every greenlet of the worker, users and heartbeats included. IMMEDIATE keeps ZeroMQ from
    accepting messages while no sink is connected, so records that never left this process stay in
    our queue, where they can be counted.
    """

    BATCH = 1000  # records per message
    SNDHWM = 10  # messages ZeroMQ holds for a connected sink: at most 10 * BATCH records

    def __init__(self, address, queue_limit, flush_timeout):
        super().__init__()
        self.address = address
        self.queue_limit = queue_limit
        self.flush_timeout = flush_timeout
        self.queue = deque()
        self.sent = 0
        self.dropped = 0
        self.context = zmq.Context()  # never zmq.Context.instance(): it could be one shared across a fork
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.setsockopt(zmq.SNDHWM, self.SNDHWM)
        self.socket.connect(address)
        self.forwarder = gevent.spawn(self._forward_forever)

    def emit(self, record):
        if len(self.queue) >= self.queue_limit:
            self.dropped += 1
            return
        try:
            self.queue.append(self.format(record).encode())
        except Exception:
            self.handleError(record)

    def _forward_forever(self):
        while True:
            self._forward()
            gevent.sleep(0.05)

    def _forward(self):
        while self.queue:
            batch = list(islice(self.queue, self.BATCH))
            try:
                self.socket.send_multipart(batch, zmq.NOBLOCK)
            except zmq.Again:
                return  # no sink connected, or it is behind: keep the records, try again later
            for _ in batch:
                self.queue.popleft()
            self.sent += len(batch)

    def close(self):
        """Deliver what is queued, waiting at most flush_timeout seconds, and report what was not."""
        if self.socket is not None:
            self.forwarder.kill()
            deadline = time.monotonic() + self.flush_timeout
            self._forward()
            while self.queue and time.monotonic() < deadline:
                gevent.sleep(0.01)
                self._forward()
            linger = max(0.0, deadline - time.monotonic())
            self.socket.close(linger=int(linger * 1000))
            self.context.term()
            self.socket = None
            undelivered = self.dropped + len(self.queue)
            report = logging.getLogger(__name__)
            if undelivered:
                report.warning(
                    "ZeroMQ sink %s: %d records not delivered (%d dropped on a full queue of %d, "
                    "%d still queued after %.1fs); %d sent",
                    self.address, undelivered, self.dropped, self.queue_limit, len(self.queue),
                    self.flush_timeout, self.sent,
                )
            elif self.sent:
                report.info("ZeroMQ sink %s: %d records sent", self.address, self.sent)
        super().close()


@events.init.add_listener
def attach_handlers(environment, **kwargs):
    # `locust --processes N` forks after importing this file: files and sockets are opened here,
    # once the process is what it will stay, so none is shared between processes.
    worker = getattr(environment.runner, "client_id", None) or f"{socket.gethostname()}_{os.getpid()}"
    formatter = JsonFormatter(HOSTNAME, worker)
    handlers = []
    if LOG_FILE:
        path = Path(LOG_FILE)
        if isinstance(environment.runner, WorkerRunner):
            path = path.with_name(f"{path.stem}.{worker}{path.suffix}")
        handlers.append(JsonLinesFileHandler(path))
    if SINK_ADDRESS:
        handlers.append(ZmqPushHandler(SINK_ADDRESS, QUEUE_LIMIT, FLUSH_TIMEOUT))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)

    @environment.events.quit.add_listener
    def detach_handlers(**kwargs):
        # `quit` fires after the runner has stopped every user, so no request comes after this.
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()


@events.request.add_listener
def log_request(request_type, name, response_time, response_length, exception=None, context=None, **kwargs):
    message = {
        "class": "request",
        "request_type": request_type,
        "name": name,
        "result": "success" if exception is None else "error",
        "response_time": response_time,
        "response_length": response_length,
    }
    if exception is not None:
        message["exception"] = exception
    for optional in ("start_time", "url"):
        if kwargs.get(optional) is not None:
            message[optional] = kwargs[optional]
    message["other"] = context
    logger.log(logging.INFO if exception is None else logging.ERROR, message)


class WebsiteUser(FastHttpUser):
    wait_time = between(0.1, 0.5)

    @task
    def index(self):
        logger.info("Task started")
        self.client.get("/")
        self.client.get("/does-not-exist")
