#!/usr/bin/env python3
"""Dispatch benchmark (not a test): how close p3s gets to the bare HTTP server it is built on.

    python bench/dispatch.py [--pilots 8] [--jobs 400] [--latency-jobs 40] [--queued 100000]
    python bench/dispatch.py --against REV [--repeat 3] [--pilots 8] [--jobs 1500] [--protocol | --cycle]
    python bench/dispatch.py --systems 1,4,8 [--huey-venv DIR] [--repeat 3] [--jobs 2000]

Prints, from one run on this machine:
  - the bare http.server request rate (ThreadingHTTPServer answering a small JSON, same client
    concurrency as the pilots),
  - end-to-end jobs/s for N pilots running /bin/true (submit -> claim -> run -> report),
  - their ratio, the server's CPU milliseconds per job and the HTTP requests it served per job,
  - with --queued N: the same rate again once N jobs wait for a site no pilot serves (after
    ANALYZE), beside the empty-queue rate, and the round trip of a job request that finds
    nothing to claim; in two cases: the backlog arrives after jobs ran, and a fresh server
    whose backlog arrives before any job ran (statistics then see only queued jobs, `pilot`
    NULL in every row),
  - submit-to-start latency of an idle pilot, and with --idle-pilots waiting: median and p95,
  - the true ceiling at the same pilot count (bench/ceiling.py: the least pilot-based system
    built of the same parts, one durable commit a job over kept-alive connections) and p3s's
    share of it.
With --systems, p3s, the ceiling and (with --huey-venv) huey at each pilot count, alternating,
--repeat times, as a table of medians and min-max. With --against REV, only the throughput and
CPU figures, for this checkout and REV (a git worktree of it) in turn, --repeat times: on a
shared machine only alternating runs compare. With --protocol besides, the server's own CPU a
job: one pilot played by this script (the pilot protocol, no payload), nothing else competing.
With --cycle instead, one real pilot's cycle of short jobs taken apart, its report exchanges
timed: from an answer to the next report (the pilot's own work on the critical path), the report
going out, the reserve's spawn, the wait for the answer.
Everything listens on 127.0.0.1 only; every loop is bounded in count and in time.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import sqlite3
import tempfile
import threading
import time
import urllib.request
import uuid as uuidlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from serverAPI import Client  # noqa: E402
import ceiling  # noqa: E402  (bench/, this script's directory)
from ceiling import answer, cpu_seconds, machine_cpu_seconds  # noqa: E402

TIME_LIMIT = 300    # seconds any one phase may take


class Bare(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        answer(self, b'{"job": null}')

    def log_message(self, *args):
        pass


def bare_rate(concurrency, total):
    """Requests/s of a do-nothing ThreadingHTTPServer driven by urllib from `concurrency` threads."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Bare)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    per_thread = total // concurrency

    def hammer():
        for _ in range(per_thread):
            urllib.request.urlopen(urllib.request.Request(url, b"{}", method="POST"), timeout=10).read()

    threads = [threading.Thread(target=hammer) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIME_LIMIT)
    elapsed = time.perf_counter() - started
    httpd.shutdown()
    return per_thread * concurrency / elapsed


def start_server(workdir, root=ROOT):
    os.makedirs(workdir, exist_ok=True)
    log = open(os.path.join(workdir, "server.log"), "wb")
    token = os.path.join(workdir, "token")
    with open(token, "w") as f:
        f.write("bench-token\n")
    proc = subprocess.Popen([sys.executable, os.path.join(root, "server.py"), "--port", "0",
                             "--db", os.path.join(workdir, "p3s.db"), "--token-file", token,
                             "--log-level", "INFO"], stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = open(os.path.join(workdir, "server.log")).read()
        if "serving on http://127.0.0.1:" in text:
            port = int(text.split("serving on http://127.0.0.1:")[1].split()[0])
            return proc, f"http://127.0.0.1:{port}", token
        time.sleep(0.05)
    raise SystemExit("server did not start: " + open(os.path.join(workdir, "server.log")).read())


def start_pilots(n, url, token, workdir, extra=(), root=ROOT):
    env = dict(os.environ, P3S_SERVER=url, P3S_TOKEN_FILE=token)
    return [subprocess.Popen([sys.executable, os.path.join(root, "pilot.py"), "-p", "10", "-b", "5",
                              "-L", os.path.join(workdir, "logs"), *extra],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]


def wait_idle(client, n):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sum(p["state"] == "no jobs" for p in client.list_pilots()) >= n:
            return
        time.sleep(0.05)
    raise SystemExit("pilots did not become idle")


def wait_ended(client, uuids):
    deadline = time.monotonic() + TIME_LIMIT
    while time.monotonic() < deadline:
        states = client.job_states(uuids)
        if all(s["state"] in ("finished", "failed") for s in states.values()) and len(states) == len(uuids):
            return states
        time.sleep(0.02)
    raise SystemExit("jobs did not end in time")


def metrics(client):
    return client.call("GET", "/metrics", query={"format": "json"})


def ended(figures, jobtype):
    """Jobs of `jobtype` ended, from one cheap read of the counts table (/metrics), not every uuid."""
    return sum(c["n"] for c in figures["jobs"] if c["jobtype"] == jobtype and c["state"] in ("finished", "failed"))


def throughput(client, n_jobs, jobtype):
    """(jobs/s, HTTP requests the server served per job, not counting this script's own, and
    the write blocks each commit carried: the group commit's batch)."""
    jobs = [{"payload": "/bin/true", "name": "bench", "jobtype": jobtype} for _ in range(n_jobs)]
    counters = metrics(client)["counters"]
    before = counters.get("http_requests", 0)
    started = time.perf_counter()
    ours = len(list(batches_of(jobs)))
    client.submit_jobs(jobs)
    deadline = time.monotonic() + TIME_LIMIT
    while True:
        figures = metrics(client)
        ours += 1
        done = ended(figures, jobtype)
        if done >= n_jobs:
            break
        if time.monotonic() > deadline:
            raise SystemExit("jobs did not end in time")
        time.sleep(poll_pause(done, n_jobs, time.perf_counter() - started))
    rate = n_jobs / (time.perf_counter() - started)
    served = figures["counters"].get("http_requests", 0) - before - ours
    commits = figures["counters"].get("commits", 0) - counters.get("commits", 0)
    blocks = figures["counters"].get("write_blocks", 0) - counters.get("write_blocks", 0)
    return (rate, served / n_jobs if "http_requests" in figures["counters"] else None,
            blocks / commits if commits else None)


def poll_pause(done, total, elapsed):
    """Seconds to the next look at the count: a quarter of the time the rest should take (each
    look costs the server a third of a millisecond, which would count as the jobs' CPU), never
    more than 0.25 s nor less than 0.02 s (the end is seen within 20 ms)."""
    left = elapsed * (total - done) / done if done else 0.25
    return min(0.25, max(0.02, left / 4))


def batches_of(jobs):
    return range(0, len(jobs), 1000)        # Client.submit_jobs sends at most 1000 jobs a request


def prefill(client, db, n):
    """N jobs queued for a site no pilot serves, then ANALYZE (as PRAGMA optimize may run it)."""
    for start in range(0, n, 10000):
        client.submit_jobs([{"payload": "/bin/true", "site": "nowhere"} for _ in range(min(10000, n - start))])
    conn = sqlite3.connect(db, timeout=60)
    conn.execute("ANALYZE")
    conn.close()


def fresh_backlog(args, workdir):
    """A fresh server gets its backlog before any job ran, then ANALYZE: (jobs/s, empty claim ms)."""
    server, url, token = start_server(workdir)
    pilots = []
    try:
        client = Client(url, token_file=token, retry_for=10)
        prefill(client, os.path.join(workdir, "p3s.db"), args.queued)
        pilots = start_pilots(args.pilots, url, token, workdir)
        wait_idle(client, args.pilots)
        return throughput(client, args.jobs, "bench-fresh")[0], empty_claim_ms(client)
    finally:
        stop(server, pilots)


def empty_claim_ms(client, n=50):
    """Median round trip of a job request (no waiting) that finds nothing to claim, while the
    backlog waits: a pilot of a jobtype nobody submitted."""
    pilot = client.register_pilot(jobtypes=["nothing-queued"], heartbeat=60)["uuid"]
    times = []
    for _ in range(n):
        started = time.perf_counter()
        assert client.request_job(pilot, 0)["job"] is None
        times.append(time.perf_counter() - started)
    client.deregister_pilot(pilot)
    return statistics.median(times) * 1000


def server_cpu_seconds(proc):
    return cpu_seconds(proc.pid)


def pilots_cpu_seconds(pilots):
    """The pilots' own CPU and their watchdogs' (each pilot's `python -c` child), payloads not included."""
    parents = {p.pid for p in pilots}
    pids = set(parents)
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                watchdog = b"-c" in f.read().split(b"\0")[1:5]      # python -I -S -c WATCHDOG
        except (OSError, ValueError, IndexError):
            continue
        if ppid in parents and watchdog:
            pids.add(int(name))
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


def payloads_cpu_seconds(pilots):
    """The CPU of the payloads the pilots have waited for (their reaped children, as the
    kernel counts them)."""
    total = 0.0
    for pilot in pilots:
        try:
            with open(f"/proc/{pilot.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    return total


def protocol_figures(server, client, n_jobs):
    """The server's CPU a job, with one pilot played by this script: it speaks the protocol as
    pilot.py does (an end report a job, holding the job in reserve and claiming the next one)
    but runs no payload, so nothing on the machine competes with the server: its own cost, the
    least noisy figure of it."""
    answer = client.register_pilot(uuid=str(uuidlib.uuid4()), host="bench", pid=os.getpid(), site="",
                                   jobtypes=[], extra="", log="")
    pilot, ahead = answer["uuid"], "ahead" in answer.get("features", ())
    client.submit_jobs([{"payload": "/bin/true", "name": "bench", "jobtype": "bench-protocol"}
                        for _ in range(n_jobs)])
    job, held, done = client.request_job(pilot, 0)["job"], None, 0
    cpu, started = server_cpu_seconds(server), time.perf_counter()
    while job and done < n_jobs:
        report = {"state": "finished", "exit_code": 0, "errmsg": "", "stdout": "", "stderr": "", "pid": 1,
                  "stdout_path": "/bench/job.out", "stderr_path": "/bench/job.err", "runtime": 0.001,
                  "usage": {"cpu_user": 0.0, "cpu_sys": 0.0, "max_rss_mb": 1.0}, "pilot": pilot,
                  "attempt": job["attempt"], "next": True, **({"ahead": True} if ahead else {}),
                  **({"holding": held["uuid"]} if held else {})}
        claimed = client.report(job["uuid"], report)["next"] or {}
        done += 1
        job, held = (held, claimed.get("job")) if held else (claimed.get("job"), claimed.get("reserve"))
    elapsed = time.perf_counter() - started
    return {"protocol_jobs_per_s": round(done / elapsed, 1),
            "server_cpu_ms_per_job": round((server_cpu_seconds(server) - cpu) * 1000 / done, 3)}


# One pilot with its report exchanges timed (serverAPI's, patched in this process only): for each
# end report, when it began to go out, when it was out (the reserve is spawned then, in `sent`),
# when that returned, and when the answer was in. Written as JSON when the pilot exits.
TIMED_PILOT = r"""
import json, os, runpy, sys, time
root, out = sys.argv[1], sys.argv[2]
sys.argv = [os.path.join(root, "pilot.py")] + sys.argv[3:]
sys.path.insert(0, root)
import serverAPI
marks, exchange = [], serverAPI.Connection.exchange
def timed(self, method, target, headers, body=None, sent=None):
    t = [time.perf_counter()]
    def said(*sock):
        t.append(time.perf_counter())
        if sent is not None:
            sent(*sock)
        t.append(time.perf_counter())
    try:
        return exchange(self, method, target, headers, body, said)
    finally:
        if target.endswith("/report") and len(t) == 3:
            marks.append(t + [time.perf_counter()])
serverAPI.Connection.exchange = timed
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(out, "w") as f:
        json.dump(marks, f)
"""


def cycle_figures(client, url, token, workdir, root, n_jobs):
    """One real pilot's cycle of short jobs, taken apart (medians, ms): from one end report's
    start to the next's; from an answer to the next report (the pilot's own work between, on
    the critical path); the report going out; its `sent` callback (the reserve spawned); the
    wait for the answer after it."""
    out = os.path.join(workdir, "cycle.json")
    env = dict(os.environ, P3S_SERVER=url, P3S_TOKEN_FILE=token)
    pilot = subprocess.Popen([sys.executable, "-c", TIMED_PILOT, root, out, "-p", "10", "-b", "5", "--max-idle", "1",
                              "-L", os.path.join(workdir, "logs")], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_idle(client, 1)
        rate = throughput(client, n_jobs, "bench-cycle")[0]
        pilot.wait(TIME_LIMIT)
    finally:
        pilot.kill()
    with open(out) as f:
        marks = json.load(f)[1:]        # the first report follows the job request, not a report

    def median_ms(values):
        return round(statistics.median(values) * 1000, 3)
    return {"p3s_jobs_per_s": round(rate, 1),
            "cycle_ms": median_ms([b[0] - a[0] for a, b in zip(marks, marks[1:])]),
            "answer_to_next_report_ms": median_ms([b[0] - a[3] for a, b in zip(marks, marks[1:])]),
            "report_out_ms": median_ms([m[1] - m[0] for m in marks]),
            "sent_callback_ms": median_ms([m[2] - m[1] for m in marks]),
            "answer_wait_ms": median_ms([m[3] - m[2] for m in marks])}


def latencies(client, n_jobs):
    """Submit one job at a time to an idle pilot; seconds from submission to dispatch and start."""
    to_start = []
    for _ in range(n_jobs):
        [uuid] = client.submit_jobs([{"payload": "/bin/true"}])
        wait_ended(client, [uuid])
        job = client.get_job(uuid)
        to_start.append(job["ts_sta"] - job["ts_def"])
        time.sleep(0.05)        # let the pilot go back to its long poll
    return to_start


def p95(values):
    return sorted(values)[max(0, int(round(0.95 * len(values))) - 1)]


def ms(values, statistic):
    """A latency figure in ms, or None where none was measured (--latency-jobs 0)."""
    return round(statistic(values) * 1000, 1) if values else None


def throughput_figures(server, client, pilots, args, bare):
    """Throughput and CPU a job of the running pilots, against the bare rate measured beside it."""
    cpu, pilot_cpu = server_cpu_seconds(server), pilots_cpu_seconds(pilots)
    payload_cpu, machine_cpu = payloads_cpu_seconds(pilots), machine_cpu_seconds()
    jobs_per_s, requests_per_job, per_commit = throughput(client, args.jobs, "bench-empty")
    server_ms = (server_cpu_seconds(server) - cpu) * 1000 / args.jobs
    pilots_ms = (pilots_cpu_seconds(pilots) - pilot_cpu) * 1000 / args.jobs
    payloads_ms = (payloads_cpu_seconds(pilots) - payload_cpu) * 1000 / args.jobs
    machine_ms = (machine_cpu_seconds() - machine_cpu) * 1000 / args.jobs
    return {
        "bare_http_requests_per_s": round(bare, 1),
        "p3s_jobs_per_s": round(jobs_per_s, 1),
        "ratio_jobs_per_s_to_bare_requests_per_s": round(jobs_per_s / bare, 3),
        "server_cpu_ms_per_job": round(server_ms, 2),
        "pilots_cpu_ms_per_job": round(pilots_ms, 2),
        "total_cpu_ms_per_job": round(server_ms + pilots_ms, 2),
        "payloads_cpu_ms_per_job": round(payloads_ms, 2),
        "machine_cpu_ms_per_job": round(machine_ms, 2),     # everything: p3s, payloads, kernel, the rest
        "http_requests_per_job": requests_per_job and round(requests_per_job, 2),
        "write_blocks_per_commit": per_commit and round(per_commit, 2),
    }


def stop(server, pilots):
    for pilot in pilots:
        pilot.terminate()
    server.terminate()
    server.wait(10)
    for pilot in pilots:
        pilot.wait(30)


def one_side(args, root, workdir):
    """One run of the checkout at `root` for --against: its throughput figures, or with
    --protocol the server's own cost (protocol_figures), or with --cycle one pilot's cycle
    (cycle_figures)."""
    bare = None if args.protocol or args.cycle else bare_rate(args.pilots, 2000)
    server, url, token = start_server(workdir, root)
    pilots = []
    try:
        client = Client(url, token_file=token, retry_for=10)
        if args.protocol:
            return protocol_figures(server, client, args.jobs)
        if args.cycle:
            return cycle_figures(client, url, token, workdir, root, args.jobs)
        pilots = start_pilots(args.pilots, url, token, workdir, root=root)
        wait_idle(client, args.pilots)
        return throughput_figures(server, client, pilots, args, bare)
    finally:
        stop(server, pilots)


def in_turn(sides, turn):
    """The sides to run, in the order of this turn: each turn starts with the next side (with two,
    ABBA). This machine drifts within minutes (three copies of the same code, run in a fixed
    order five times: 446-448 jobs/s in the first turn, 546-598 in the fourth, as file creation
    sped up after a removal), and a fixed order hands the drift to one side."""
    k = turn % len(sides)
    return sides[k:] + sides[:k]


def compare(args):
    """This checkout against REV, alternating, --repeat times each: the throughput figures of
    every run, and each side's median."""
    here = tempfile.mkdtemp(prefix="p3s-against-")
    other = os.path.join(here, "rev")
    if subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", "-q", other, args.against]).returncode:
        shutil.rmtree(here, ignore_errors=True)
        raise SystemExit(f"--against {args.against}: git could not check it out (see above)")
    runs = {"this": [], args.against: []}
    try:
        for turn in range(args.repeat):
            for label, root in in_turn((("this", ROOT), (args.against, other)), turn):
                runs[label].append(one_side(args, root, tempfile.mkdtemp(prefix="p3s-bench-", dir=here)))
                print(label, json.dumps(runs[label][-1]), flush=True)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", other], check=False)
        shutil.rmtree(here, ignore_errors=True)
    medians = {label: {key: statistics.median(r[key] for r in results) for key in results[0]
                       if all(r[key] is not None for r in results)}
               for label, results in runs.items()}
    this, other = medians["this"], medians[args.against]
    print(json.dumps({"pilots": args.pilots, "jobs": args.jobs, "repeat": args.repeat, "median": medians,
                      "this_to_" + args.against: {key: round(this[key] / other[key], 3)
                                                  for key in this if other.get(key)}}, indent=2))
    return 0


def file_create_us(directory, n=200):
    """System CPU microseconds to create one empty file in `directory` (n files, left there). A
    p3s payload creates its two logs before it execs: where the file system is ext4 without a
    journal (this machine), that costs ten times more while many inodes freed in the last
    minutes lie before a free one (docs/benchmarks.md, tenth pass), and the payload column with it."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    for i in range(n):
        os.close(os.open(os.path.join(directory, f"probe-{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return round((resource.getrusage(resource.RUSAGE_SELF).ru_stime - before) * 1e6 / n, 1)


QUIET_CREATE_US = 20        # creating a file costs less than this (µs) when no mass removal is recent
QUIET_WAIT = 600            # seconds --systems waits for that at most before it starts


def wait_for_quiet_files(parent):
    """Wait (QUIET_WAIT at most, saying so) until creating a file in `parent` costs less than
    QUIET_CREATE_US: after a mass removal (a CI run, a test suite) it costs up to 240 µs here
    for minutes, and p3s's payloads, which create their logs, with it (see file_create_us).
    Returns the last cost measured."""
    deadline = time.monotonic() + QUIET_WAIT
    while True:
        probe = tempfile.mkdtemp(prefix="quiet-", dir=parent)
        cost = file_create_us(probe)
        if cost < QUIET_CREATE_US or time.monotonic() > deadline:
            return cost
        print(f"creating a file costs {cost:g} µs (a removal minutes ago?): waiting for it to fall below "
              f"{QUIET_CREATE_US} µs", flush=True)
        time.sleep(30)


def p3s_run(n_pilots, args, parent):
    """One p3s throughput run with n_pilots pilots on a fresh server (dispatch figures, and what
    creating a file costs there as it starts), its files left in `parent` until every run is
    over (see systems)."""
    workdir = tempfile.mkdtemp(prefix="p3s-bench-", dir=parent)
    logs = os.path.join(workdir, "logs", time.strftime("%Y%m%d-%H"))     # where the payloads' logs go
    os.makedirs(logs)
    create_us = file_create_us(logs)
    bare = bare_rate(n_pilots, 2000)
    server, url, token = start_server(workdir)
    pilots = []
    try:
        client = Client(url, token_file=token, retry_for=10)
        pilots = start_pilots(n_pilots, url, token, workdir)
        wait_idle(client, n_pilots)
        return {**throughput_figures(server, client, pilots, args, bare), "file_create_us": create_us}
    finally:
        stop(server, pilots)


def huey_run(python, workers, n_jobs):
    """A run of bench/huey_run.py under the huey environment's Python: the JSON line it prints."""
    command = [python, os.path.join(ROOT, "bench", "huey_run.py"), "--workers", str(workers), "--jobs", str(n_jobs)]
    ran = subprocess.run(command, capture_output=True, text=True, timeout=TIME_LIMIT)
    if ran.returncode:
        raise SystemExit(f"{command[1]}: {ran.stderr.strip()[-500:]}")
    return json.loads(ran.stdout)


def huey_python(venv):
    """The Python of a virtual environment with huey, made where missing (a bench may use one;
    the tools may not)."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    if subprocess.run([python, "-c", "import huey"], capture_output=True).returncode:
        subprocess.run([python, "-m", "pip", "install", "-q", "huey"], check=True)
    return python


def spread(values, digits=0):
    """'median (min-max)'."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def systems(args):
    """p3s, the true ceiling (bench/ceiling.py) and, with --huey-venv, huey, side by side at each
    pilot count, alternating, --repeat times: jobs/s as median (min-max) and the ratios. The
    p3s runs' files (a log pair a job) are removed only after the last run: on this virtual
    machine, the payloads spawned after such a removal cost more than twice their CPU, in part
    because creating their logs then does (journal-less ext4; see file_create_us and
    docs/benchmarks.md, ninth and tenth passes); for the same reason the runs start once
    creating a file is cheap again (wait_for_quiet_files)."""
    counts = [int(n) for n in args.systems.split(",")]
    huey = huey_python(args.huey_venv) if args.huey_venv else None
    runs, parent = {}, tempfile.mkdtemp(prefix="p3s-systems-")
    try:
        print(f"creating a file costs {wait_for_quiet_files(parent):g} µs as the runs start", flush=True)
        for turn in range(args.repeat):
            for n in counts:
                sides = [("p3s", lambda: p3s_run(n, args, parent)), ("ceiling", lambda: ceiling.run(n, args.jobs))]
                sides += [("huey", lambda: huey_run(huey, n, args.jobs))] if huey else []
                for system, run in in_turn(sides, turn):
                    runs.setdefault((system, n), []).append(run())
                print(json.dumps({f"{system} {k}": r[-1] for (system, k), r in runs.items() if k == n}), flush=True)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    print(f"\n{args.jobs} /bin/true jobs a run, {args.repeat} runs of each, alternated; median (min-max)\n")
    print("| N | p3s jobs/s | server CPU ms/job | pilot CPU ms/job | payload CPU ms/job | file create µs | "
          "ceiling jobs/s | its server, worker, payload CPU ms/job | p3s / ceiling | huey jobs/s | p3s / huey |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")
    for n in counts:
        p3s = [r["p3s_jobs_per_s"] for r in runs[("p3s", n)]]
        top = [r["jobs_per_s"] for r in runs[("ceiling", n)]]
        hue = [r["jobs_per_s"] for r in runs.get(("huey", n), [])]
        print(f"| {n} | {spread(p3s)} | {spread([r['server_cpu_ms_per_job'] for r in runs[('p3s', n)]], 2)} | "
              f"{spread([r['pilots_cpu_ms_per_job'] for r in runs[('p3s', n)]], 2)} | "
              f"{spread([r['payloads_cpu_ms_per_job'] for r in runs[('p3s', n)]], 2)} | "
              f"{spread([r['file_create_us'] for r in runs[('p3s', n)]])} | {spread(top)} | "
              + ", ".join(spread([r[key] for r in runs[("ceiling", n)]], 2) for key in
                          ("server_cpu_ms_per_job", "worker_cpu_ms_per_job", "payload_cpu_ms_per_job"))
              + f" | {spread([a / b for a, b in zip(p3s, top)], 2)} | "
              + (f"{spread(hue)} | {spread([a / b for a, b in zip(p3s, hue)], 2)} |" if hue else "- | - |"))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pilots", type=int, default=8)
    p.add_argument("--jobs", type=int, default=400)
    p.add_argument("--latency-jobs", type=int, default=40, help="0: no latency figures")
    p.add_argument("--idle-pilots", type=int, default=50,
                   help="latency again with this many idle pilots waiting (one is woken per job)")
    p.add_argument("--queued", type=int, default=0,
                   help="then prefill this many jobs for a site no pilot serves, ANALYZE, and measure again")
    p.add_argument("--against", metavar="REV",
                   help="only throughput and CPU, this checkout and git revision REV in turn")
    p.add_argument("--repeat", type=int, default=3, help="runs of each side with --against or --systems")
    p.add_argument("--protocol", action="store_true",
                   help="with --against: the server's own CPU a job, one pilot played by this script "
                        "(the pilot protocol, no payload)")
    p.add_argument("--cycle", action="store_true",
                   help="with --against: one real pilot's cycle of short jobs taken apart (its report "
                        "exchanges timed; --pilots is ignored)")
    p.add_argument("--systems", metavar="N,N,...",
                   help="p3s beside the true ceiling (bench/ceiling.py) and huey at these pilot counts")
    p.add_argument("--huey-venv", metavar="DIR", help="with --systems: huey from this virtual environment "
                   "(made, and huey installed, where missing)")
    args = p.parse_args(argv)
    if (args.protocol or args.cycle) and not args.against:
        p.error("--protocol and --cycle: only with --against REV")
    if args.against:
        return compare(args)
    if args.systems:
        return systems(args)
    workdir = tempfile.mkdtemp(prefix="p3s-bench-")
    bare = bare_rate(args.pilots, 2000)
    server, url, token = start_server(workdir)
    pilots = []
    try:
        client = Client(url, token_file=token, retry_for=10)
        pilots = start_pilots(args.pilots, url, token, workdir)
        wait_idle(client, args.pilots)
        result = {"pilots": args.pilots, "jobs": args.jobs,
                  **throughput_figures(server, client, pilots, args, bare)}
        jobs_per_s = result["p3s_jobs_per_s"]
        queued_per_s = empty_claim = fresh_per_s = fresh_empty_claim = None
        if args.queued:
            prefill(client, os.path.join(workdir, "p3s.db"), args.queued)
            queued_per_s = throughput(client, args.jobs, "bench-queued")[0]
            empty_claim = empty_claim_ms(client)
            fresh_per_s, fresh_empty_claim = fresh_backlog(args, os.path.join(workdir, "fresh"))
        for pilot in pilots:
            pilot.terminate()
        for pilot in pilots:
            pilot.wait(30)
        lat = crowd = []
        if args.latency_jobs > 0:
            pilots = start_pilots(1, url, token, workdir)
            wait_idle(client, 1)
            lat = latencies(client, args.latency_jobs)
            pilots += start_pilots(args.idle_pilots - 1, url, token, workdir)
            wait_idle(client, args.idle_pilots)
            crowd = latencies(client, args.latency_jobs)
    finally:
        stop(server, pilots)
    shutil.rmtree(workdir, ignore_errors=True)      # with --queued 1000000, most of a gigabyte
    top = ceiling.run(args.pilots, args.jobs)
    result.update({"ceiling_jobs_per_s": top["jobs_per_s"],
                   "p3s_to_ceiling": round(jobs_per_s / top["jobs_per_s"], 2),
                   "ceiling_server_cpu_ms_per_job": top["server_cpu_ms_per_job"],
                   "ceiling_worker_cpu_ms_per_job": top["worker_cpu_ms_per_job"],
                   "ceiling_machine_cpu_ms_per_job": top["machine_cpu_ms_per_job"]})
    result.update({
        "queued": args.queued,
        "p3s_jobs_per_s_with_queued": queued_per_s and round(queued_per_s, 1),
        "queued_to_empty_ratio": queued_per_s and round(queued_per_s / jobs_per_s, 2),
        "empty_claim_round_trip_ms_with_queued": empty_claim and round(empty_claim, 2),
        "p3s_jobs_per_s_queued_on_a_fresh_server": fresh_per_s and round(fresh_per_s, 1),
        "fresh_queued_to_empty_ratio": fresh_per_s and round(fresh_per_s / jobs_per_s, 2),
        "empty_claim_round_trip_ms_queued_on_a_fresh_server": fresh_per_s and round(fresh_empty_claim, 2),
        "submit_to_start_median_ms": ms(lat, statistics.median),
        "submit_to_start_p95_ms": ms(lat, p95),
        "idle_pilots": args.idle_pilots,
        "submit_to_start_median_ms_with_idle_pilots": ms(crowd, statistics.median),
        "submit_to_start_p95_ms_with_idle_pilots": ms(crowd, p95),
    })
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
