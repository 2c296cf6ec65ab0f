#!/usr/bin/env python3
"""Page benchmark (not a test): render times of the status pages over a database of 1M jobs.

    python bench/pages.py [--jobs 1000000] [--pilots 100000] [--repeat 7]

Fills a temporary database through the server's own schema and triggers (a realistic mix: 30
days of jobs, mostly finished, some failed with reasons, a queue of defined ones, 10 job types, 5
sites, 20 users, 100k pilots, most of them long gone, 400k published images, a busy day of activity
and error counts), starts the real server.py on it on 127.0.0.1, and prints the median and max
wall time of each page as a client sees it. Bounded: one fill, `repeat` requests per page.
"""
import argparse
import json
import os
import shutil
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import server  # noqa: E402

STATES = (("finished", 0.90), ("failed", 0.04), ("timeout", 0.005), ("pilotTO", 0.005),
          ("cancelled", 0.01), ("defined", 0.035), ("running", 0.005))


def job_rows(n, t_end, rng, pilots):
    states = [s for s, _ in STATES]
    weights = [w for _, w in STATES]
    for i in range(n):
        state = rng.choices(states, weights)[0]
        ts_def = t_end - 30 * 86400 * (1 - i / n)        # submission order follows time
        started = state not in ("defined", "cancelled")
        ended = state not in ("defined", "running")
        yield (str(uuid.UUID(int=rng.getrandbits(128), version=4)), f"job {i}", f"user{i % 20}",
               f"type{i % 10}", "/bin/true", rng.randrange(5), f"site{i % 5}" if i % 3 else "",
               state, ts_def, ts_def + 1 if started else None, ts_def + 5 if ended else None,
               (0 if state == "finished" else 1) if ended else None, "vm" if started else "",
               pilots[i % len(pilots)] if started else None,       # 10 job types on each file
               f"/eos/np04/run_{i // 1000:06d}_{i // 10 % 100:04d}.root",
               REASONS[i % len(REASONS)].format(i % 7, i % 97) if state in server.FAILED_STATES else "",
               f"site{i % 5}" if started else None)


REASONS = ["ERROR: RawDecoder: APA{} FEMB {} returned no frames", "disk quota exceeded on /scratch{}",
           "segmentation violation in module {}", "cannot open input file run {} event {}",
           "killed at its time limit of 3600 s"] + [f"reason family {k}: item {{}} {{}}" for k in range(15)]


def fill(path, n_jobs, n_pilots):
    store = server.Store(path)
    rng = random.Random(7)
    t = time.time()
    pilots = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n_pilots)]

    def insert(conn):
        conn.executemany("INSERT INTO jobs(uuid,name,user,jobtype,payload,priority,site,state,ts_def,ts_sta,"
                         "ts_sto,exit_code,host,pilot,infile,reason,ran_site) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         job_rows(n_jobs, t, rng, pilots))
        fill_activity(conn, t, rng)
        fill_quality(conn)
        conn.executemany("INSERT INTO images(job, name, type, size, jobtype, infile, ts) "   # 20 plots a job
                         "SELECT uuid, ?, 'image/png', 50000, jobtype, infile, ts_sto FROM jobs "
                         "WHERE state='finished' AND id % 50 = 0", [(f"plot{k}.png",) for k in range(20)])
        conn.executemany("INSERT INTO pilots(uuid,host,pid,site,state,heartbeat,ts_reg,ts_beat,jobs_done) "
                         "VALUES(?,?,?,?,?,?,?,?,?)",
                         ((p, f"node{i % 50}", 1000 + i, f"site{i % 5}", "running" if i % 100 == 0 else "stopped",
                           10, t - 3600, t - 5, i) for i, p in enumerate(pilots)))
        conn.executemany("INSERT INTO job_ends VALUES(?,?,?)",     # a day of end buckets, as triggers make
                         ((b, s, rng.randrange(1, 20)) for b in range(int(t - 86400) // 10, int(t) // 10)
                          for s in ("finished", "failed")))
    store.write(insert)
    store.read("ANALYZE")
    store.close()


def fill_quality(conn):
    """Verdicts on the finished jobs (5 % BAD, 5 % WARNING, their checks), and a metric on every
    tenth finished job for the trend pages, as the pilots' end reports leave them."""
    conn.execute("UPDATE jobs SET verdict = CASE WHEN id % 20 = 0 THEN 'BAD' WHEN id % 20 = 1 THEN 'WARNING' "
                 "ELSE 'OK' END, verdict_check = 'check' || (id % 5) WHERE state = 'finished'")
    conn.execute("INSERT INTO checks SELECT uuid, verdict_check, verdict, 'bench' FROM jobs "
                 "WHERE verdict IN ('BAD', 'WARNING')")
    conn.execute("INSERT INTO metrics SELECT uuid, 'noise', (id % 97) / 10.0, jobtype, infile, ts_sto FROM jobs "
                 "WHERE state = 'finished' AND id % 10 = 0")


def fill_activity(conn, t, rng):
    """A busy day of the counts the summary's charts and error summary read, as triggers and
    housekeeping make them: per-minute ends by jobtype, site and state, claims, samples, and
    failures by 10 minutes, jobtype and reason (a noisy 200 distinct reasons)."""
    minutes = range(int(t - 86400) // 60, int(t) // 60 + 1)
    conn.executemany("INSERT INTO ends VALUES(?,?,?,?,?)",
                     ((m, f"type{k}", f"site{k % 5}", state, rng.randrange(1, 30)) for m in minutes
                      for k in range(10) for state in ("finished", "failed")))
    conn.executemany("INSERT INTO job_starts VALUES(?,?)", ((m, rng.randrange(50, 300)) for m in minutes))
    conn.executemany("INSERT INTO samples VALUES(?,?,?,?)",
                     ((m, rng.randrange(900, 1000), rng.randrange(800, 1000), rng.randrange(0, 5000)) for m in minutes))
    buckets = range(int(t - 86400) // server.ERROR_BUCKET, int(t) // server.ERROR_BUCKET + 1)
    conn.executemany("INSERT INTO errors VALUES(?,?,?,?,?,?)",
                     ((b, f"type{k}", f"reason family {r}: item # #", rng.randrange(1, 9), b * 600.0, b * 600.0 + 599)
                      for b in buckets for k in range(10) for r in range(20)))
    conn.executemany("INSERT OR IGNORE INTO error_places VALUES(?,?,?,?,?,?)",      # each on a few of 50 nodes
                     ((b, f"site{k % 5}", f"node{rng.randrange(50)}", f"type{k}", f"reason family {r}: item # #",
                       rng.randrange(1, 9)) for b in buckets for k in range(10) for r in range(20) for _ in range(3)))
    conn.execute("INSERT INTO error_hosts SELECT bucket, site, host, SUM(n) FROM error_places GROUP BY bucket, site, host")
    failed = [r[0] for r in conn.execute("SELECT uuid FROM jobs WHERE state = 'failed' LIMIT 20000")] or ["gone"]
    conn.executemany("INSERT INTO attempt_failures(ts, uuid, attempt, jobtype, state, exit_code, site, host, reason, "
                     "line) VALUES(?,?,?,?,?,?,?,?,?,?)",      # the attempts those counts stand for, 4 a count
                     ((b * 600.0 + rng.randrange(600), rng.choice(failed), 1, f"type{k}", "failed", 1, f"site{k % 5}",
                       f"node{rng.randrange(50)}", f"reason family {r}: item # #", f"reason family {r}: item 3 {k}")
                      for b in buckets for k in range(10) for r in range(20) for _ in range(4)))
    week = range(int(t - 8 * 86400) // server.PROFILE_BUCKET, int(t) // server.PROFILE_BUCKET + 1)
    conn.executemany("INSERT OR IGNORE INTO profiles VALUES(?,?,?,?,?)",      # a week of profiles by type
                     ((b, f"type{k}", metric, server.profile_bin(rng.uniform(5, 600)), rng.randrange(1, 40))
                      for b in week for k in range(10) for metric in ("duration", "memory", "cpu_eff")
                      for _ in range(8)))


def timed_get(url):
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as answer:
        answer.read()
    return time.perf_counter() - started


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=1_000_000)
    p.add_argument("--pilots", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="p3s-pages-")
    db = os.path.join(work, "p3s.db")
    started = time.perf_counter()
    fill(db, args.jobs, args.pilots)
    fill_s = time.perf_counter() - started
    token = os.path.join(work, "token")
    with open(token, "w") as f:
        f.write("bench\n")
    log = open(os.path.join(work, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "server.py"), "--port", "0", "--db", db,
                             "--token-file", token], stdout=log, stderr=log)
    try:
        base = wait_for_port(os.path.join(work, "server.log"))
        some = json.loads(urllib.request.urlopen(base + "/jobs?format=json&state=failed").read())["jobs"][0]
        with open(os.path.join(ROOT, "tests", "compat", "3filters.graphml")) as f:
            register = urllib.request.Request(base + "/api/dags", data=json.dumps(
                {"name": "3filters", "graphml": f.read()}).encode(), headers={"Authorization": "Bearer bench"})
        urllib.request.urlopen(register).read()
        pilot = json.loads(urllib.request.urlopen(base + "/pilots?format=json").read())["pilots"][0]
        deep = args.jobs // 25
        pages = ["/", "/?format=json", "/jobs", "/jobs?page=100", f"/jobs?page={deep // 2}", f"/jobs?page={deep}",
                 "/jobs?state=failed", "/jobs?state=defined&sort=priority", "/jobs?jobtype=type3&limit=400",
                 "/jobs?user=user7&site=site2", "/jobs?age=1h", "/jobs?sort=ended", "/jobs?sort=priority&order=asc",
                 "/jobs?state=problems", "/jobs?state=error", "/jobs?state=failed,timeout&jobtype=type3",
                 "/jobs?" + urllib.parse.urlencode({"state": "problems", "jobtype": "type3",
                                                    "reason": "ERROR: RawDecoder: APA# FEMB # returned no frames"}),
                 f"/job/{some['uuid']}", "/pilots", f"/pilot/{pilot['uuid']}", "/metrics", "/errors", "/plots",
                 "/plots?jobtype=type3&infile=run_0099", "/plots?group=run", "/sites", "/?range=7d", "/?range=1h",
                 "/runs", "/runs?limit=400", "/runs?limit=400&verdict=BAD", "/runs?limit=400&format=csv",
                 "/trend/type3/noise", "/runs?page=100", "/runs?runs=5000-5010", "/runs?jobtype=type3",
                 "/jobtype/type3", "/jobtype/type3?range=7d", "/jobs?ran_site=site2", "/jobs?ran_site=site2&host=vm",
                 "/jobs?" + urllib.parse.urlencode({"infile": some["infile"]}), "/workflows", "/dags",
                 "/dag/3filters", "/datasets", "/datatypes", "/failures", "/failures?page=100",
                 "/failures?" + urllib.parse.urlencode({"jobtype": "type3", "reason": "reason family 3: item # #",
                                                        "since": "1h"}),
                 "/failures?host=node7&since=24h", "/failures?site=site2"]
        results = {}
        for path in pages:
            times = [timed_get(base + path) for _ in range(args.repeat)]
            results[path] = {"median_ms": round(statistics.median(times) * 1000, 1),
                             "max_ms": round(max(times) * 1000, 1)}
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)     # a million jobs is most of a gigabyte
    print(json.dumps({"jobs": args.jobs, "pilots": args.pilots, "fill_s": round(fill_s, 1), "pages": results}, indent=2))
    return 0


def wait_for_port(log_path):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = open(log_path).read()
        if "serving on http://127.0.0.1:" in text:
            return "http://127.0.0.1:" + text.split("serving on http://127.0.0.1:")[1].split()[0]
        time.sleep(0.1)
    raise SystemExit("server did not start: " + open(log_path).read())


if __name__ == "__main__":
    sys.exit(main())
