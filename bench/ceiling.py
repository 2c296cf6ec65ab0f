#!/usr/bin/env python3
"""The true ceiling for p3s's dispatch (a benchmark's yardstick, not a tool): the least a
pilot-based job system can do on this machine with the same parts.

One stdlib http.server process keeps the jobs in sqlite (WAL, synchronous=FULL: one durable
commit per job, which both records the last job's end and claims the next one); each worker
asks over one kept-alive connection, spawns /bin/true with subprocess and waits for it. No
leases, history, validation, pages or watchdog: what p3s does beyond this is its own cost.

    python bench/ceiling.py run --workers 4 --jobs 2000      # prints {"jobs_per_s": ..., ...}

It reports the CPU its server, its workers and their payloads spent a job, beside p3s's server,
pilots and payloads.

dispatch.py --systems runs it beside p3s (and huey). Loopback only; bounded in time.
"""
import argparse
import http.client
import json
import os
import resource
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TIME_LIMIT = 300


class Queue:
    """The jobs table behind one lock: one writer, as sqlite allows."""

    def __init__(self, path, n_jobs):
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; "
                                "CREATE TABLE jobs(id INTEGER PRIMARY KEY, state TEXT NOT NULL, worker TEXT); "
                                "CREATE INDEX jobs_state ON jobs(state, id);")
        self.conn.executemany("INSERT INTO jobs(state) VALUES('queued')", [()] * n_jobs)
        self.lock = threading.Lock()

    def next(self, worker, done):
        """Record the worker's finished job and claim the oldest queued one, in one commit."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            if done is not None:
                self.conn.execute("UPDATE jobs SET state='finished' WHERE id=? AND state='running' AND worker=?",
                                  (done, worker))
            row = self.conn.execute("SELECT id FROM jobs WHERE state='queued' ORDER BY id LIMIT 1").fetchone()
            if row:
                self.conn.execute("UPDATE jobs SET state='running', worker=? WHERE id=? AND state='queued'",
                                  (worker, row[0]))
            self.conn.execute("COMMIT")
            return row and row[0]


def answer(handler, body):
    """Send a JSON body with the least an HTTP answer needs."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def serve(queue):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"       # kept-alive connections
        disable_nagle_algorithm = True

        def do_POST(self):
            asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            answer(self, json.dumps({"job": queue.next(asked["worker"], asked.get("done"))}).encode())

        def log_message(self, *args):
            pass
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    return httpd


def work(port, name):
    """A worker: connected, it says so and waits for the go (its Python's start is not timed);
    then claim, run /bin/true, report with the next claim, until nothing is queued. Last, it
    prints the CPU seconds it and its payloads spent from the go: [own, payloads']."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)     # headers and body: no 40 ms wait
    print("ready", flush=True)
    sys.stdin.readline()
    before = cpu_spent()
    done, deadline = None, time.monotonic() + TIME_LIMIT
    while time.monotonic() < deadline:
        conn.request("POST", "/next", json.dumps({"worker": name, "done": done}),
                     {"Content-Type": "application/json"})
        done = json.loads(conn.getresponse().read())["job"]
        if done is None:
            break
        subprocess.run(["/bin/true"], check=False)
    print(json.dumps([after - start for after, start in zip(cpu_spent(), before)]), flush=True)


def cpu_spent():
    """(this process's CPU seconds, its reaped children's), user and system time each."""
    return tuple(sum(resource.getrusage(who)[:2]) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def cpu_seconds(pid):
    """A process's own CPU (user + system), its children not included."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds():
    """The whole machine's busy CPU (every process, the kernel's threads), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")     # less idle and iowait


def run(workers, n_jobs):
    """Jobs/s, the server's and the whole machine's CPU ms a job, `workers` worker processes,
    the queue prefilled."""
    with tempfile.TemporaryDirectory(prefix="p3s-ceiling-") as tmp:
        server = subprocess.Popen([sys.executable, __file__, "serve", os.path.join(tmp, "jobs.db"), str(n_jobs)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            port = int(server.stdout.readline())
            procs = [subprocess.Popen([sys.executable, __file__, "work", str(port), f"w{i}"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True) for i in range(workers)]
            for p in procs:
                p.stdout.readline()
            cpu, machine_cpu = cpu_seconds(server.pid), machine_cpu_seconds()
            started = time.perf_counter()
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.close()
            for p in procs:
                p.wait(TIME_LIMIT)
            elapsed = time.perf_counter() - started
            server_ms = (cpu_seconds(server.pid) - cpu) * 1000 / n_jobs
            machine_ms = (machine_cpu_seconds() - machine_cpu) * 1000 / n_jobs
            spent = [json.loads(p.stdout.readline()) for p in procs]
        finally:
            server.terminate()
            server.wait(10)
    return {"jobs_per_s": round(n_jobs / elapsed, 1), "server_cpu_ms_per_job": round(server_ms, 3),
            "worker_cpu_ms_per_job": round(sum(w for w, _ in spent) * 1000 / n_jobs, 3),
            "payload_cpu_ms_per_job": round(sum(c for _, c in spent) * 1000 / n_jobs, 3),
            "machine_cpu_ms_per_job": round(machine_ms, 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--jobs", type=int, default=2000)
    s = sub.add_parser("serve")
    s.add_argument("db")
    s.add_argument("jobs", type=int)
    w = sub.add_parser("work")
    w.add_argument("port", type=int)
    w.add_argument("name")
    args = p.parse_args(argv)
    if args.what == "run":
        print(json.dumps(run(args.workers, args.jobs)))
    elif args.what == "serve":
        httpd = serve(Queue(args.db, args.jobs))
        print(httpd.server_address[1], flush=True)
        httpd.serve_forever()
    else:
        work(args.port, args.name)


if __name__ == "__main__":
    main()
