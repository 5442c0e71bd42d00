"""
Breaks the code on purpose, one way at a time, in a scratch copy, and runs the test that must then fail:
each promise of the README, with the test that keeps it.

    python breaks.py              # every break, one after the other (about 9 minutes on 2 cores)
    python breaks.py queue run_id # only the breaks whose promise or test names one of these words
    python breaks.py --check      # only check that every break still applies to today's code

A break replaces texts that must each occur exactly once in its file, so a break that no longer fits the
code fails loudly instead of passing quietly. Exit status 1 if any test passed on its break. Not run in CI:
it runs the slower tests once per break.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
REAL_SLEEP = 'gevent.monkey.get_original("time", "sleep")(1)'  # not gevent's: blocks every greenlet

# (promise, file, [(text, replaced by), ...], the test that must fail)
BREAKS = [
    # --- the locustfile
    ("the push handler never blocks the process, while a sink refuses frames or none is there", "locustfile.py",
     [("return  # no sink connected: keep the frames, try again later",
       f"{REAL_SLEEP}\n{' ' * 20}return")],
     "test_sink_never_started_run_ends_and_reports_what_was_lost"),
    ("a frame holds at most 64 KiB of records, so that the sink accepts it", "locustfile.py",
     [("    FRAME_BYTES = 64 << 10\n", "    FRAME_BYTES = 1 << 40\n")],
     "test_records_of_kilobytes_go_in_frames_the_sink_accepts"),
    ("a process whose records reach no sink says so in ZMQ_SINK_WARN_AFTER seconds", "locustfile.py",
     [("        if self.alarm is None and self.warn_after and self.queued and", "        if False and")],
     "test_a_process_whose_records_reach_no_sink_says_so_in_seconds_and_again_when_a_sink_acknowledges"),
    ("the alarm is said once, not at every look", "locustfile.py",
     [("            self.alarm = (self.acked, self.unanswered_since)\n", "")],
     "test_a_process_whose_records_reach_no_sink_says_so_in_seconds_and_again_when_a_sink_acknowledges"),
    ("the alarm counts from the last acknowledgement or the first record since, not from the process's start",
     "locustfile.py", [("        if not self.queued:\n            self.unanswered_since = now\n", "")],
     "test_a_process_whose_records_reach_no_sink_says_so_in_seconds_and_again_when_a_sink_acknowledges"),
    ("a sink that acknowledges after the alarm is said", "locustfile.py",
     [("        elif self.alarm is not None and self.acked > self.alarm[0]:", "        elif False:")],
     "test_a_process_whose_records_reach_no_sink_says_so_in_seconds_and_again_when_a_sink_acknowledges"),
    ("the last line says where the records not acknowledged are", "locustfile.py",
     [('f"in the local file {self.local_file}" if self.local_file else', '"" if self.local_file else')],
     "test_stalled_sink_does_not_slow_the_run"),
    ("at most 8 frames in flight, whatever waits to be sent", "locustfile.py",
     [("    WINDOW = 8  #", "    WINDOW = 1_000_000  #")],
     "test_a_sink_that_never_acknowledges_gets_a_window_of_frames_each_again_ever_more_rarely"),
    ("the resend timeout doubles at each expiry: a slow sink is not flooded with copies", "locustfile.py",
     [("self.waiting_since, self.backoff = now, self.backoff * 2", "self.waiting_since, self.backoff = now, 1")],
     "test_a_sink_that_never_acknowledges_gets_a_window_of_frames_each_again_ever_more_rarely"),
    ("every send is non-blocking: a blocking one would freeze every user", "locustfile.py",
     [("self.socket.send_multipart(frame.message, zmq.NOBLOCK)", "self.socket.send_multipart(frame.message)")],
     "test_sink_never_started_run_ends_and_reports_what_was_lost"),
    ("ZMQ_SINK_ADDRESS= (empty) turns pushing off", "locustfile.py",
     [("value = os.environ.get(name, default)", "value = os.environ.get(name) or default")],
     "test_values_json_cannot_encode_become_strings"),
    ("ZMQ_SINK_FLUSH_TIMEOUT: a quitting process waits at most that long", "locustfile.py",
     [("deadline = time.monotonic() + self.flush_timeout", "deadline = time.monotonic() + self.flush_timeout + 5")],
     "test_sink_never_started_run_ends_and_reports_what_was_lost"),
    ("ZMQ_SINK_QUEUE: records a process holds until acknowledged", "locustfile.py",
     [("room = max(0, self.queue_limit - self.queued)", "room = max(0, 100000 - self.queued)")],
     "test_sink_never_started_run_ends_and_reports_what_was_lost"),
    ("a request's line reaches the handlers within 50 ms", "locustfile.py",
     [("gevent.sleep(0.05)\n            self.write_pending()", "gevent.sleep(1)\n            self.write_pending()")],
     "test_response_times_are_locusts_own_and_time_is_when_a_request_ended"),
    ("a request's time is when it ended", "locustfile.py",
     [("self.pending.append((time.time(), request_type,", 'self.pending.append((kwargs["start_time"], request_type,')],
     "test_response_times_are_locusts_own_and_time_is_when_a_request_ended"),
    ("response_time is Locust's, unrounded", "locustfile.py",
     [('message["response_time"], message["response_length"] = response_time,',
       'message["response_time"], message["response_length"] = math.ceil(response_time),')],
     "test_response_times_are_locusts_own_and_time_is_when_a_request_ended"),
    ("datetimes in a context become their str(), with orjson too", "locustfile.py",
     [("orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME |", "orjson.OPT_NON_STR_KEYS |")],
     "test_values_json_cannot_encode_become_strings"),
    ("the end record's dropped counts what the full queue refused", "locustfile.py",
     [('"dropped": self.pusher.dropped if self.pusher else 0,', '"dropped": 0,')],
     "test_stalled_sink_does_not_slow_the_run"),
    ("run ids are <UTC start time>-<8 hex digits>", "locustfile.py",
     [('time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()) + secrets.token_hex(4)', "secrets.token_hex(12)")],
     "test_local_run_delivers_every_request"),
    ("workers take the master's run id", "locustfile.py",
     [("run_id = environment.parsed_options.request_log_run_id", "run_id = secrets.token_hex(4)")],
     "test_master_and_workers_deliver_every_request"),
    ("a worker is named by Locust's own id for it", "locustfile.py",
     [('worker = getattr(environment.runner, "client_id", None) or', "worker = None or")],
     "test_master_and_workers_deliver_every_request"),
    ("a worker's local file is <name>.<worker>.jsonl", "locustfile.py",
     [('path = path.with_name(f"{path.stem}.{worker}{path.suffix}")', "pass")],
     "test_processes_run_delivers_every_request_from_each_process"),
    ("HOST labels the records", "locustfile.py",
     [('HOSTNAME = os.environ.get("HOST") or socket.gethostname()', "HOSTNAME = socket.gethostname()")],
     "test_record_format"),
    ("a resource sample measures its own process: a worker, not the master it was forked from", "locustfile.py",
     [("            self.process = psutil.Process()  # this process, after any fork: made at import, it was the parent\n",
       ""), ("        self.process = self.sampler = None\n", "        self.process, self.sampler = psutil.Process(), None\n")],
     "test_resource_samples_come_from_each_worker_at_the_interval"),
    ("LOCUST_RESOURCE_INTERVAL: seconds between resource samples", "locustfile.py",
     [("gevent.sleep(self.interval)", "gevent.sleep(2)")],
     "test_resource_samples_come_from_each_worker_at_the_interval"),
    ("status is the response's status code", "locustfile.py",
     [('getattr(kwargs.get("response"), "status_code", None)', "None")],
     "test_status_codes_and_failures_as_locust_groups_them"),
    ("exception is Locust's own text for the error", "locustfile.py",
     [("StatsError.parse_error(exception if isinstance(exception, str)\n",
       "str(exception if isinstance(exception, str)\n"),
      ("else _safe_repr(exception))", "else exception)")],
     "test_status_codes_and_failures_as_locust_groups_them"),
    ("Locust used as a library: the tail is written at exit", "locustfile.py",
     [("            atexit.register(self.close)\n", "")],
     "test_locust_used_as_a_library_writes_every_request_and_the_end_record"),
    ("heartbeats notice a sink host that vanished in seconds", "locustfile.py",
     [("        self.acks.setsockopt(zmq.HEARTBEAT_IVL, self.HEARTBEAT_IVL)\n", "")],
     "test_a_sink_host_that_vanished_is_noticed_in_seconds_and_nothing_is_lost"),
    ("delivered means written: a frame is kept until acknowledged", "locustfile.py",
     [("                self.in_flight[frame.first] = frame\n", "                del self.unacked[frame.first]\n"
       "                self.acked += frame.count\n                self.queued -= frame.count\n")],
     "test_a_frozen_sink_whose_connections_are_reset_loses_nothing"),
    ("no heartbeats toward the sink's PULL socket: libzmq 4.3.5 aborted the sink", "locustfile.py",
     [("        self.socket.setsockopt(zmq.IMMEDIATE, 1)\n", "        self.socket.setsockopt(zmq.IMMEDIATE, 1)\n"
       "        self.socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)\n"
       "        self.socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)\n")],
     "test_past_its_capacity_the_sink_slows_down_and_no_record_is_sent_twice"),
    ("one timer, run from the last acknowledgement: a sink that is behind gets its frames late, not twice",
     "locustfile.py",
     [("now - max(oldest.sent_at, self.waiting_since) >= self.timeout()", "now - oldest.sent_at >= 1")],
     "test_past_its_capacity_the_sink_slows_down_and_no_record_is_sent_twice"),
    ("the timeout follows the acknowledgement times measured: late ones are waited for, not sent again",
     "locustfile.py",
     [("        return min(self.MAX_TIMEOUT, max(self.MIN_TIMEOUT, measured) * self.backoff)",
       "        return min(self.MAX_TIMEOUT, self.MIN_TIMEOUT * self.backoff)")],
     "test_acknowledgements_seconds_late_are_waited_for_not_answered_with_copies"),
    ("an acknowledgement time counts from a frame's first send, also when it was sent again", "locustfile.py",
     [("                    self._measure(now - frame.first_sent)\n",
       "                    if frame.tries == 1:\n                        self._measure(now - frame.first_sent)\n")],
     "test_acknowledgements_seconds_late_are_waited_for_not_answered_with_copies"),
    ("an acknowledgement time counts from a frame's first send since it may have been lost, not across an outage",
     "locustfile.py",
     [("                frame.first_sent = None  # timed anew", "                pass  # timed anew")],
     "test_what_the_sink_acknowledged_before_a_new_subscription_reached_it_is_sent_again_at_once"),
    ("the sink answers each subscription: what it acknowledged before that is sent again at once", "sink.py",
     [("                sink.welcome()\n", "                pass\n")],
     "test_what_the_sink_acknowledged_before_a_new_subscription_reached_it_is_sent_again_at_once"),
    ("a load generator at a low rate sends one full frame a second, not one every 50 ms", "locustfile.py",
     [("    LINGER = 1.0  #", "    LINGER = 0.05  #")],
     "test_many_load_generators_deliver_every_record_once"),
    ("past half of ZMQ_SINK_QUEUE, Locust's log says so once", "locustfile.py",
     [("                self.warned = True\n", "")],
     "test_sink_never_started_run_ends_and_reports_what_was_lost"),
    ("the address check at import connects to no one: a correct CURVE setup gets no line of refusal",
     "locustfile.py", [("            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)\n",
                        "            zmq.Context().socket(zmq.PUSH).connect(address)\n")],
     "test_each_side_says_exactly_why_nothing_was_acknowledged"),
    ("the last line says the sink refused this process's CURVE key", "locustfile.py",
     [("        if zmq.EVENT_HANDSHAKE_FAILED_AUTH in self.heard:\n", "        if False:\n")],
     "test_each_side_says_exactly_why_nothing_was_acknowledged"),
    ("the last line says which side lacks CURVE", "locustfile.py",
     [('"--curve-clients, or unset ZMQ_SINK_CURVE_PUBLIC and LOCUST_CURVE_SECRET" if self.curve else',
       '"--curve-clients, or unset ZMQ_SINK_CURVE_PUBLIC and LOCUST_CURVE_SECRET" if not self.curve else')],
     "test_each_side_says_exactly_why_nothing_was_acknowledged"),
    ("the pasted block keeps working below code that rebinds the names it uses", "locustfile.py",
     [("\nkeep_own_names(globals())\n", "\n")],
     "test_imported_or_pasted_below_code_that_rebinds_its_names_the_block_logs_and_says_the_same"),
    ("the end record names the process's role", "locustfile.py",
     [('"role": self.role})', '})')],
     "test_processes_run_delivers_every_request_from_each_process"),
    ("with CURVE, nothing readable crosses the network", "locustfile.py",
     [("            if curve_keys:  # encrypted", "            if False:  # encrypted")],
     "test_with_curve_nothing_readable_crosses_the_network"),
    ("the last requests are written when the process quits", "locustfile.py",
     [("        self.writer.kill()\n        self.write_pending()\n", "        self.writer.kill()\n")],
     "test_locust_used_as_a_library_writes_every_request_and_the_end_record"),
    ("a failed request's loglevel is ERROR", "locustfile.py",
     [('"INFO" if exception is None else "ERROR", message)', '"INFO", message)')],
     "test_record_format"),
    ("seq numbers a process's records 1, 2, 3, ...", "locustfile.py",
     [("        self.seq += 1\n", "        self.seq += 1 + (self.seq == 5)\n")],
     "test_record_format"),
    ("the end record's records counts itself too", "locustfile.py",
     [('"records": self.formatter.seq + 1,', '"records": self.formatter.seq,')],
     "test_record_format"),
    # --- the sink
    ("the sink acknowledges at least every 100 ms, also in the middle of a long drain", "sink.py",
     [("ACK_EVERY = 0.1  #", "ACK_EVERY = 10.0  #")],
     "test_a_long_drain_is_acknowledged_as_it_goes"),
    ("the sink raises its soft descriptor limit to the hard one", "sink.py",
     [("        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n", "")],
     "test_a_sink_short_of_descriptors_raises_its_limit_or_names_each_connection_it_refuses"),
    ("the sink names a connection it refuses for lack of descriptors", "sink.py",
     [("                refused, spare = refuse_waiting(listeners, spare)\n", "                refused = []\n")],
     "test_a_sink_short_of_descriptors_raises_its_limit_or_names_each_connection_it_refuses"),
    ("a restart reads only what the index does not cover, and still writes each record once", "sink.py",
     [("        if covered > size or os.pread(out.fileno(), len(tail), covered - len(tail)) != tail:\n",
       "        if False:\n")],
     "test_a_record_sent_again_is_written_once_also_by_a_sink_started_again"),
    ("a full disk loses nothing: the sink keeps what it could not write", "sink.py",
     [("                self.held[0] = (data, records, ack)\n", "                self.held.popleft()\n")],
     "test_a_full_disk_stalls_the_sink_and_loses_nothing"),
    ("a stalled sink takes nothing more from ZeroMQ", "sink.py",
     [("        while not self.held:\n", "        while True:\n"),
      ("            if sink.held:  # stalled", "            if False:  # stalled")],
     "test_sigterm_while_stalled_says_what_it_could_not_write"),
    ("the sink's memory has one bound: RCVHWM", "sink.py",
     [("    pull.setsockopt(zmq.RCVHWM, RCVHWM)\n", "")],
     "test_the_sinks_memory_has_one_bound_while_its_file_refuses_writes"),
    ("the sink's memory has one bound: the frame size limit", "sink.py",
     [("    pull.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)\n", "")],
     "test_the_sinks_memory_has_one_bound_for_huge_frames"),
    ("ZMQ_SINK_BIND sets the sink's address", "sink.py",
     [('default=os.environ.get("ZMQ_SINK_BIND", "tcp://127.0.0.1:5555")', 'default="tcp://127.0.0.1:5555"')],
     "test_local_run_delivers_every_request"),
    ("ZMQ_SINK_LOG_FILE sets the sink's file", "sink.py",
     [('default=os.environ.get("ZMQ_SINK_LOG_FILE", "requests.jsonl")', 'default="requests.jsonl"')],
     "test_local_run_delivers_every_request"),
    ("python sink.py listens on 127.0.0.1 only", "sink.py",
     [('default=os.environ.get("ZMQ_SINK_BIND", "tcp://127.0.0.1:5555")',
       'default=os.environ.get("ZMQ_SINK_BIND", "tcp://*:5555")')],
     "test_the_two_commands_work_as_a_pair_with_no_settings"),
    ("on SIGTERM the sink writes what has already arrived", "sink.py",
     [("        sink.drain(pull, max_seconds=2.0)\n", "")],
     "test_on_sigterm_the_sink_writes_what_has_already_arrived"),
    ("the sink prints the first rejection of each reason", "sink.py",
     [('say(f"rejected a frame ({reason}): {frame[:80]!r}")', "pass")],
     "test_bad_input_is_counted_and_never_written"),
    ("the sink's lines from its two threads are each written whole", "sink.py",
     [('    with SAYING:\n        sys.stderr.write(f"sink: {line}\\n")\n        sys.stderr.flush()\n',
       '    print(f"sink: {line}", file=sys.stderr, flush=True)\n')],
     "test_the_sinks_lines_from_two_threads_are_each_written_whole"),
    ("the sink names each kind of refused client, at most every 10 seconds", "sink.py",
     [("        if printed is not None and now - printed < self.every:\n", "        if False:\n")],
     "test_each_side_says_exactly_why_nothing_was_acknowledged"),
    ("the sink tells a keyless client from one with keys when it runs without CURVE", "sink.py",
     [('"a client with CURVE keys: this sink runs without CURVE")', '"a client without CURVE keys")')],
     "test_each_side_says_exactly_why_nothing_was_acknowledged"),
    ("a connection closed after its process's end record is no news in the sink's summary", "sink.py",
     [("                    self.closes_expected += 1\n", "")],
     "test_processes_run_delivers_every_request_from_each_process"),
    ("a line with a carriage return is rejected", "sink.py",
     [('if b"\\r" in frame:', "if False:")],
     "test_bad_input_is_counted_and_never_written"),
    ("the sink writes each (worker, seq) once", "sink.py",
     [("new = self.seqs[worker].missing(first, first + len(lines))", "new = [(first, first + len(lines))]")],
     "test_a_record_sent_again_is_written_once_also_by_a_sink_started_again"),
    ("a sink started on a file cuts its incomplete last line", "sink.py",
     [("    if end < size:\n", "    if False:\n")],
     "test_sink_appends_and_cuts_only_an_incomplete_last_line"),
    ("the sink acknowledges only what is in its file", "sink.py",
     [("        self.held.append((memoryview(data), records, (worker, first, len(lines), new, ends)))",
       "        self.acks_due[worker].append(b\"%d %d\" % (first, len(lines)))\n"
       "        self.held.append((memoryview(data), records, (worker, first, len(lines), new, ends)))"),
      ('                self.acks_due[worker].append(b"%d %d" % (first, count))\n', "")],
     "test_a_sink_acknowledges_only_what_its_file_holds"),
    # --- the README's recipes for your own tools
    ("the DuckDB recipe takes each record once, from the sink's file and the local ones", "README.md",
     [("SELECT DISTINCT ON (worker, seq)\n", "SELECT\n")],
     "test_report_of_a_real_run_matches_locust_and_the_raw_values"),
    ("the pandas recipe's percentiles are the report's nearest ranks", "README.md",
     [('method="inverted_cdf"))', 'method="linear"))')],
     "test_report_of_a_real_run_matches_locust_and_the_raw_values"),
    ("the recipes read a file with an incomplete last line, and say they skipped it", "README.md",
     [("    ignore_errors = true, columns", "    columns")],
     "test_report_of_a_real_run_matches_locust_and_the_raw_values"),
    # --- the report
    ("--follow reads a line only once its line break has come: a torn one is never counted", "report.py",
     [('                    end = block.rfind(b"\\n") + 1\n', '                    end = len(block)\n')],
     "test_the_report_follows_a_file_that_a_killed_sink_left_torn_and_its_next_one_cut"),
    ("--follow ends when every process it has seen has ended, not when the files stop growing", "report.py",
     [("        done = collected.processes and all(process.ended for process in collected.processes.values()) \\\n",
       "        done = True \\\n")],
     "test_the_report_follows_a_run_from_before_it_starts_and_ends_with_the_report_it_would_print_after"),
    ("--follow's last page does not reload itself", "report.py",
     [("""    refresh = f"<meta http-equiv='refresh' content='{reload:g}'>" if reload else ""\n""",
       """    refresh = "<meta http-equiv='refresh' content='1'>"\n""")],
     "test_the_followed_page_is_written_again_whole_and_reloads_itself_until_the_end"),
    ("--follow's screen fits the terminal", "report.py",
     [("    return [line[:width] for line in lines[:height]]\n", "    return lines\n")],
     "test_on_a_terminal_the_follower_redraws_one_screen_in_place_that_fits_it"),
    ("percentiles are the nearest rank", "report.py",
     [("return ordered[-(-len(ordered) * percent // 100) - 1]", "return ordered[len(ordered) * percent // 100]")],
     "test_report_percentiles_counts_and_timeline_on_hand_checkable_data"),
    ("req/s is requests over the time from the first request's end to the last one's", "report.py",
     [('"requests_per_second": len(ordered) / span if span else None,',
       '"requests_per_second": len(ordered) / (span + 1) if span else None,')],
     "test_report_percentiles_counts_and_timeline_on_hand_checkable_data"),
    ("a record in several files counts once", "report.py",
     [('        elif not process.first_sight(seq):\n            return "duplicate"\n',
       "        else:\n            process.first_sight(seq)\n")],
     "test_report_merges_files_by_worker_and_seq_and_finds_what_is_missing"),
    ("--require-complete exits 1 unless complete", "report.py",
     [(' and (report["complete"] or not report["require_complete"])', "")],
     "test_report_of_an_empty_file_an_unknown_run_or_a_missing_file"),
    ("--run with an unknown id lists the ids the files hold", "report.py",
     [(". Its runs: {runs}", "")],
     "test_report_of_an_empty_file_an_unknown_run_or_a_missing_file"),
    ("the failures table groups as Locust does", "report.py",
     [("self.errors[(*key, error)] += 1", "self.errors[(*key, error[:12])] += 1")],
     "test_status_codes_and_failures_as_locust_groups_them"),
    ("status codes are counted per name", "report.py",
     [("self.statuses[key, status] += 1", "self.statuses[key, status] += 1 + (status == 404)")],
     "test_status_codes_and_failures_as_locust_groups_them"),
    ("--html needs no network", "report.py",
     [("include_plotlyjs=next(scripts, False)", 'include_plotlyjs="cdn"')],
     "test_the_html_report_opens_offline_in_a_real_browser"),
    ("--html escapes every text from the files", "report.py",
     [("<{tag} class='text'>{html.escape(v)}</{tag}>", "<{tag} class='text'>{v}</{tag}>")],
     "test_the_html_report_opens_offline_in_a_real_browser"),
    ("a failed check exits 1", "report.py",
     [('return 0 if report["passed"] else 1', "return 0")],
     "test_checks_pass_and_fail_per_name_on_a_real_run"),
    ("each: checks every name, each its own verdict", "report.py",
     [('            return run["names"]\n', '            return run["names"][:1]\n')],
     "test_checks_pass_and_fail_per_name_on_a_real_run"),
    ("a rule names a name as the tables write it, with or without its type", "report.py",
     [('self.scope in (row["name"], row_name(row))', 'self.scope == row["name"]')],
     "test_checks_pass_and_fail_per_name_on_a_real_run"),
    ("a threshold in s is a thousand ms", "report.py",
     [('* (1000 if unit == "s" else 1)', "* 1")],
     "test_checks_pass_and_fail_per_name_on_a_real_run"),
    ("failures with % is the failure rate", "report.py",
     [('            return 100 * row["failures"] / row["requests"]\n', '            return row["failures"]\n')],
     "test_checks_pass_and_fail_per_name_on_a_real_run"),
    ("a JUnit failure carries the measured value and the threshold", "report.py",
     [("""            + f", threshold {check['op']} {shown(check['threshold'], check['unit'])}"\n""", "")],
     "test_checks_pass_and_fail_per_name_on_a_real_run"),
    ("a bad rule exits 2", "report.py",
     [('            ("every", True), ("window", True), ("idle", False)))\n    except ValueError as error:\n'
       '        print(f"report: {error}", file=sys.stderr)\n        return 2\n',
       '            ("every", True), ("window", True), ("idle", False)))\n    except ValueError as error:\n'
       '        print(f"report: {error}", file=sys.stderr)\n        return 1\n')],
     "test_every_bad_rule_is_one_line_and_exit_2_before_any_reading"),
    ("the window keeps both its ends", "report.py",
     [("if window and not window[0] <= when <= window[1]:", "if window and not window[0] < when <= window[1]:")],
     "test_a_window_leaves_out_each_runs_first_and_last_seconds_exactly"),
    ("Markdown: a name is text, never markup", "report.py",
     [('return re.sub(r"[\\\\`*_\\[\\]|~]|<(?=[A-Za-z/!?])|&(?=#?\\w+;)", lambda match: "\\\\" + match[0], text)',
       "return text")],
     "test_a_window_leaves_out_each_runs_first_and_last_seconds_exactly"),
    ("the 95% interval holds the true percentile in at least 95% of samples", "report.py",
     [("q, tail = float(percent) / 100, (1 - confidence) / 2", "q, tail = float(percent) / 100, 1 - confidence")],
     "test_a_percentiles_95_percent_interval_holds_the_true_one_in_at_least_95_percent_of_samples"),
    ("a change is within the noise when the two intervals overlap", "report.py",
     [('entry["within_noise"] = None if None in (a, b) else overlap(*entry["intervals"])',
       'entry["within_noise"] = None if None in (a, b) else now == before')],
     "test_a_baseline_flags_exactly_what_got_worse_and_the_same_code_stays_within_the_noise"),
    ("baseline + 10% is 1.1 times the baseline's value", "report.py",
     [("1 + float(relative[1] + relative[2]) / 100", "1 + float(relative[1] + relative[2])")],
     "test_a_baseline_flags_exactly_what_got_worse_and_the_same_code_stays_within_the_noise"),
    ("a name the baseline lacks is not checked, and the decision does not count it as passed", "report.py",
     [('passes, every = sum(check["verdict"] in ("pass", "warn") for check in checks)',
       "passes, every = len(checks)")],
     "test_a_baseline_flags_exactly_what_got_worse_and_the_same_code_stays_within_the_noise"),
    ("<= is at most: a value at its threshold passes", "report.py",
     [('"<=": operator.le', '"<=": operator.lt')],
     "test_a_verdict_is_exact_at_its_threshold_and_the_noise_is_judged_as_asked"),
    ("baseline - 80% is 0.2 times the baseline's value", "report.py",
     [("1 + float(relative[1] + relative[2]) / 100", "1 + float(relative[2]) / 100")],
     "test_a_verdict_is_exact_at_its_threshold_and_the_noise_is_judged_as_asked"),
    ("two intervals that share one value overlap: within the noise", "report.py",
     [("other[0] <= one[1]))", "other[0] < one[1]))")],
     "test_a_verdict_is_exact_at_its_threshold_and_the_noise_is_judged_as_asked"),
    ("--noise pass, warn, fail decides a check within the noise", "report.py",
     [('decided = noise if within and noise != "measured" else', "decided =")],
     "test_a_verdict_is_exact_at_its_threshold_and_the_noise_is_judged_as_asked"),
    ("a failure rate's 95% interval holds the true rate with at least 95% probability", "report.py",
     [("    tail = (1 - confidence) / 2\n    low =", "    tail = 1 - confidence\n    low =")],
     "test_a_percentiles_95_percent_interval_holds_the_true_one_in_at_least_95_percent_of_samples"),
    ("a JUnit suite and case keep their names from build to build", "report.py",
     [('name="report.py" + (f" run {number}" * (len(runs) > 1))', 'name=f"run {run and run[\'run_id\']}"')],
     "test_checks_pass_and_fail_per_name_on_a_real_run"),
    ("the HTML page and the Markdown show failed checks first", "report.py",
     [('return sorted(checks, key=lambda check: {"fail": 0, "warn": 1}.get(check["verdict"], 2))',
       "return checks")],
     "test_the_html_report_opens_offline_in_a_real_browser"),
    ("progress shows on a terminal only", "report.py",
     [("if seconds > 1 and sys.stderr.isatty():", "if seconds > 1:")],
     "test_progress_shows_on_a_terminal_only_while_reading_takes_more_than_a_second"),
]


def apply(folder, path, replacements):
    """Break the file; a broken Python file must still compile, so that its test fails on what it broke."""
    file = folder / path
    text = file.read_text()
    for old, new in replacements:
        if text.count(old) != 1:
            raise SystemExit(f"breaks: {path}: {old!r} occurs {text.count(old)} times, not once; update the break")
        text = text.replace(old, new)
    file.write_text(text)
    if path.endswith(".py"):
        compile(text, path, "exec")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("words", nargs="*", help="only the breaks whose promise or test holds one of these")
    parser.add_argument("--check", action="store_true", help="only check that every break applies")
    args = parser.parse_args()
    chosen = [b for b in BREAKS if not args.words or any(w in b[0] or w in b[3] for w in args.words)]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    tests = (REPO / "test_sink.py").read_text()
    if missing := [test for *_, test in chosen if f"\ndef {test}(" not in tests]:
        raise SystemExit(f"breaks: no test {missing[0]} in test_sink.py; update the break")
    survived = []
    for number, (promise, path, replacements, test) in enumerate(chosen, 1):
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            for name in tracked:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, folder / name)
            apply(folder, path, replacements)
            if args.check:
                continue
            started = time.monotonic()
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                     f"test_sink.py::{test}"], cwd=folder, capture_output=True, text=True)
        caught = result.returncode == 1 and " failed" in result.stdout
        print(f"{number:2}. {promise}\n    {path}: {'caught by' if caught else 'NOT CAUGHT by'} {test} "
              f"({time.monotonic() - started:.0f} s)", flush=True)
        # why it failed: the first line pytest marks as the error
        lines = result.stdout.splitlines()
        print("    " + next((line for line in lines if line.startswith("E ")), lines[-1] if lines else "")[:200],
              flush=True)
        if not caught:
            survived.append(promise)
    if args.check:
        print(f"every one of the {len(chosen)} breaks applies")
    elif survived:
        print(f"\n{len(survived)} of {len(chosen)} breaks passed their test: {'; '.join(survived)}")
        return 1
    else:
        print(f"\nevery one of the {len(chosen)} breaks made its test fail")
    return 0


if __name__ == "__main__":
    sys.exit(main())
