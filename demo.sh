#!/usr/bin/env bash
# A complete run on this machine: a sink, an HTTP target, and Locust with 2 worker processes
# pushing every request to the sink for 30 seconds, 40 users started at 4 a second. Ends by itself,
# shows what was collected and prints the report of it (is every record there? the percentiles), with a
# per-second timeline and a page with charts beside it.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
out=$(mktemp -d)
mkdir "$out/www"  # an empty folder: http.server answers 200 on / and 404 elsewhere

.venv/bin/python -m http.server --bind 127.0.0.1 --directory "$out/www" 8000 >/dev/null 2>&1 &
target=$!
.venv/bin/python sink.py --bind tcp://127.0.0.1:5555 --log-file "$out/requests.jsonl" &
sink=$!
trap 'kill $target $sink 2>/dev/null || true' EXIT

ZMQ_SINK_ADDRESS=tcp://127.0.0.1:5555 LOCUST_LOG_FILE="$out/local.jsonl" \
  .venv/bin/locust -f locustfile.py --headless --processes 2 -u 40 -r 4 -t 30s \
  -H http://127.0.0.1:8000 --exit-code-on-error 0 --only-summary --json-file "$out/locust-stats"

kill -TERM $sink && wait $sink
echo
echo "Collected $(wc -l < "$out/requests.jsonl") records from every process in $out/requests.jsonl:"
grep -m 1 '"Task started"' "$out/requests.jsonl"
grep -m 1 '"result":"success"' "$out/requests.jsonl"
grep -m 1 '"result":"error"' "$out/requests.jsonl"
echo "Requests Locust counted: $(.venv/bin/python -c 'import json, sys; print(sum(e["num_requests"] for e in json.load(open(sys.argv[1]))))' "$out/locust-stats.json");" \
  "request records in the file: $(grep -c '"class":"request"' "$out/requests.jsonl")"
echo "Each worker's own copy: $(ls "$out"/local.*.jsonl | tr '\n' ' ')"
echo
.venv/bin/python report.py "$out/requests.jsonl" --timeline "$out/timeline.csv" --html "$out/report.html"
echo
echo "Locust's own percentiles of the same run (its --json-file, through Locust's own function), from response"
echo "times it rounds on arrival: to whole ms, and above 100 ms to 2 significant digits (1035.8 ms counts as 1000):"
.venv/bin/python - "$out/locust-stats.json" <<'PY'
import json, sys
from collections import Counter
from locust.stats import calculate_response_time_percentile

print(f"{'Type':<6} {'Name':<15} {'requests':>9} " + " ".join(f"{c:>9}" for c in ("p50", "p90", "p95", "p99", "max")))
total, slowest = Counter(), 0
for entry in json.load(open(sys.argv[1])):
    times = Counter({int(ms): n for ms, n in entry["response_times"].items()})
    total, slowest = total + times, max(slowest, entry["max_response_time"])
    row = [calculate_response_time_percentile(times, entry["num_requests"], p / 100) for p in (50, 90, 95, 99)]
    print(f"{entry['method']:<6} {entry['name']:<15} {entry['num_requests']:>9} "
          + " ".join(f"{ms:>9}" for ms in row) + f" {entry['max_response_time']:>9.2f}")
row = [calculate_response_time_percentile(total, total.total(), p / 100) for p in (50, 90, 95, 99)]
print(f"{'':<6} {'Aggregated':<15} {total.total():>9} " + " ".join(f"{ms:>9}" for ms in row) + f" {slowest:>9.2f}")
PY
