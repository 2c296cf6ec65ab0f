#!/usr/bin/env python3
"""A short, realistic DQM shift on this machine (not a test): look at what a shifter sees.

    python bench/shift.py [--minutes 4] [--pilots 4] [--outage 20]

A server on 127.0.0.1 with a temporary database; the site of the original's lxvm.json (its
P3S_DATA pointed at a temporary directory); pilots started through pgen.sh; an injector fed a
fake raw file every few seconds; per file a monitor job that draws PNG plots (standard library
only), a purity job that sometimes fails like the real one (a ROOT-style error on stderr, an
out-of-range exit code) and otherwise judges its data (verdict.json, metrics.json: now and then
a BAD run) and an event display that times out now and then; a workflow of the
original's 3filters DAG; halfway, the server killed (kill -9) and restarted --outage seconds later
(0: none), as a crashed or rebooted server is; bands on the monitor's two metrics (its pedestal
creeps up run after run), a reference run and a note; 45 s before the end, the real outage:
every pilot killed (kill -9) while data keeps arriving. At the end, two named users work from
the browser alone (headless Chromium driven as a person would, when installed): the shifter
signs in, acknowledges the top alarm, retries the failed jobs of a run after its confirmation
page, notes the run, pauses and resumes a job type; the expert caps one. Then screenshots of every
page as the signed-in shifter sees it, in the work directory, whose path is printed. Bounded in
time; loopback only.
"""
import argparse
import json
import os
import pathlib
import random
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from serverAPI import Client  # noqa: E402
try:
    from conftest import CHROMIUM, Browser  # noqa: E402  (the tests' browser, driven as a person would)
except ImportError:                         # no pytest here: the shift runs, nobody acts from a browser
    CHROMIUM = Browser = None

PLOT = r'''
import os, struct, sys, zlib, random
def png(path, values, colour):
    w, h = 320, 200
    rows = []
    top = max(values) or 1
    for y in range(h):
        row = bytearray(b"\0")
        for x in range(w):
            v = values[x * len(values) // w] / top
            row += bytes(colour) if h - y <= v * (h - 20) else b"\xff\xff\xff"
        rows.append(bytes(row))
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
out = os.environ["P3S_JOB_DIR"]
run = os.path.basename(os.environ.get("P3S_INPUT_FILE", "run"))
print("monitor of", run)
for apa in (1, 2, 3):
    png(os.path.join(out, f"adc_mean_apa{apa}.png"), [random.gauss(50, 10) for _ in range(64)], (40, 90, 200))
digits = "".join(c for c in run.split("run")[-1][:6] if c.isdigit()) or "5000"
drift = (int(digits) - 5000) * 0.4            # the pedestal creeps up, run after run
with open(os.path.join(out, "metrics.json"), "w") as f:      # numbers only: the bands judge them
    f.write('{"adc_mean": %.2f, "noise_rms": %.2f}' % (random.gauss(50 + drift, 1), random.gauss(3.0, 0.3)))
'''
PURITY = r'''
import os, random, sys, time
time.sleep(random.uniform(0.5, 2))
if random.random() < 0.3:
    print("Processing run", os.environ.get("P3S_INPUT_FILE"))
    print("%MSG-s ArtException: ProductNotFound: no RawDigits for APA3 FEMB 12 in run", file=sys.stderr)
    sys.exit(65)
lifetime = random.gauss(2.1, 0.1)
dead = 312 if random.random() < 0.15 else random.randint(0, 6)      # now and then an APA trips
out = os.environ["P3S_JOB_DIR"]
with open(os.path.join(out, "metrics.json"), "w") as f:
    f.write('{"electron_lifetime_ms": %.3f, "dead_channels": %d}' % (lifetime, dead))
checks = [("dead_channels", "BAD" if dead > 100 else "OK", "%d dead channels" % dead),
          ("lifetime", "WARNING" if lifetime < 1.95 else "OK", "electron lifetime %.2f ms" % lifetime)]
with open(os.path.join(out, "verdict.json"), "w") as f:
    f.write("[" + ",".join('{"check": "%s", "result": "%s", "message": "%s"}' % c for c in checks) + "]")
print("purity %.2f ms" % lifetime)
'''


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=4)
    p.add_argument("--pilots", type=int, default=4)
    p.add_argument("--outage", type=float, default=20, help="seconds the server is down halfway (0: none)")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="p3s-shift-")
    data, logs = os.path.join(work, "eos", "output"), os.path.join(work, "logs")
    inbox = os.path.join(data, "inbox")
    os.makedirs(inbox)
    for name, text in (("plot.py", PLOT), ("purity.py", PURITY)):
        with open(os.path.join(work, name), "w") as f:
            f.write(text)
    token = os.path.join(work, "token")
    subprocess.run([sys.executable, os.path.join(ROOT, "server.py"), "--new-token", token], check=True,
                   stdout=subprocess.DEVNULL)
    server, url = start_server(work, token, "0")
    env = dict(os.environ, P3S_SERVER=url, P3S_TOKEN_FILE=token, P3S_RUNDIR=os.path.join(work, "run"),
               P3S_PYTHON=sys.executable)
    client = Client(url, token_file=token)
    procs = []
    try:
        site = json.load(open(os.path.join(ROOT, "tests", "compat", "lxvm.json")))
        site["env"]["P3S_DATA"] = data
        site["pilots"] = args.pilots
        site_file = os.path.join(work, "lxvm.json")
        with open(site_file, "w") as f:
            json.dump(site, f)
        run(env, "pilot.py", "--define-site", "-j", site_file)
        jobs = [{"name": "Monitor:Main", "jobtype": "monitor", "payload": sys.executable,    # as the original's:
                 "params": os.path.join(work, "plot.py"), "timeout": 60},                    # naming no site
                {"name": "Purity", "jobtype": "purity", "payload": sys.executable,
                 "params": os.path.join(work, "purity.py"), "timeout": 60, "max_attempts": 2},
                {"name": "EvDisp", "jobtype": "evdisp",
                 "payload": "sleep $(shuf -i 0-8 -n 1); echo event display done", "timeout": 6,
                 "env": {"P3S_EXECMODE": "SHELL"}}]
        jobs_file = os.path.join(work, "dqm.json")
        with open(jobs_file, "w") as f:
            json.dump(jobs, f)
        subprocess.run([os.path.join(ROOT, "pgen.sh"), str(args.pilots), "-s", "lxvm", "-p", "5", "-b", "2",
                        "-L", logs, "-l", os.path.join(work, "pilot-logs")], env=env, check=True)
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "injector.py"), "-d", inbox, "-j",
                                       jobs_file, "-p", "2", "--settle", "1", "--bare-name"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "injector.log"), "w")))
        run(env, "workflow.py", "-g", os.path.join(ROOT, "tests", "compat", "3filters.graphml"))
        bands = os.path.join(work, "bands.json")
        with open(bands, "w") as f:
            json.dump({"adc_mean": {"warn": [None, 56], "error": [None, 60]}, "noise_rms": {"warn": [None, 4]}}, f)
        run(env, "job.py", "--bands", f"monitor:{bands}")
        deadline = time.monotonic() + args.minutes * 60
        crash = time.monotonic() + args.minutes * 30 if args.outage else float("inf")
        pilots_die = deadline - 45         # the real outage: every pilot of the site killed
        reference = time.monotonic() + 25
        number = 5000
        while time.monotonic() < deadline:
            if time.monotonic() > crash:
                server = outage(server, work, token, url, args.outage)
                crash = float("inf")
            if time.monotonic() > reference:
                subprocess.run([sys.executable, os.path.join(ROOT, "job.py"), "--reference", "monitor:5000", "-m",
                                "quiet run, all APAs on"], env=env, stdout=subprocess.DEVNULL)
                run(env, "job.py", "--note", "run:5003", "-m", "HV trip on APA 3 at the start of the run")
                reference = float("inf")
            if time.monotonic() > pilots_die:
                kill_pilots(os.path.join(work, "run"))
                pilots_die = float("inf")
            for sub in (1, 2):
                with open(os.path.join(inbox, f"np04_raw_run{number:06d}_{sub:04d}_dl1.root"), "wb") as f:
                    f.write(os.urandom(2048))
            number += 1
            time.sleep(random.uniform(6, 10))
        time.sleep(15)
        done, shots = from_the_browser(url, client, work) if CHROMIUM else ([], [])
        print(json.dumps({"work": work, "url": url, "done from the browser": done, "screenshots": shots,
                          "jobs": client.call("GET", "/", query={"format": "json"})["jobs_by_state"]}, indent=2))
    finally:
        for proc in procs:
            proc.terminate()
        subprocess.run([os.path.join(ROOT, "pkill.sh"), "-t", "5"], env=env, stdout=subprocess.DEVNULL)
        server.terminate()
        server.wait(10)
    return 0


def kill_pilots(rundir):
    """kill -9 every pilot pgen.sh started here (its pid files): a node lost, as it happens."""
    for name in os.listdir(rundir):
        if name.endswith(".pid"):
            with open(os.path.join(rundir, name)) as f:
                try:
                    os.kill(int(f.read().split()[0]), 9)
                except (OSError, ValueError, IndexError):
                    pass


def start_server(work, token, port):
    """(the server process, its URL); its log appended to work/server.log."""
    log = open(os.path.join(work, "server.log"), "a")
    starts = open(log.name).read().count("serving on ")
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "server.py"), "--port", port, "--db",
                               os.path.join(work, "p3s.db"), "--token-file", token, "--files-root", work,
                               "--housekeeping", "1"], stdout=log, stderr=log)
    return server, wait_for_url(log.name, starts)


def outage(server, work, token, url, seconds):
    """The server killed (kill -9), then started again on its port `seconds` later."""
    server.kill()
    server.wait()
    time.sleep(seconds)
    return start_server(work, token, url.rsplit(":", 1)[1])[0]


def run(env, tool, *args):
    subprocess.run([sys.executable, os.path.join(ROOT, tool), *args], env=env, check=True, stdout=subprocess.DEVNULL)


def wait_for_url(path, starts=0):
    """The URL the server's log announces, once it has announced more than `starts` times."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = open(path).read()
        if text.count("serving on ") > starts:
            return text.split("serving on ")[-1].split()[0]
        time.sleep(0.1)
    raise SystemExit("the server did not start: " + open(path).read())


def add_user(work, name, role):
    """A named user of the shift's database, as an admin adds one; returns their token."""
    path = os.path.join(work, "users", name + ".token")
    subprocess.run([sys.executable, os.path.join(ROOT, "server.py"), "--db", os.path.join(work, "p3s.db"),
                    "--add-user", name, "--role", role, "--user-token-file", path], check=True, stdout=subprocess.DEVNULL)
    return open(path).read().strip()


def sign_in(browser, url, token):
    browser.open(url + "/signin")
    return browser.press("sign in", {"token": token})


def from_the_browser(url, client, work):
    """The shift's console: a shifter and an expert act from the pages alone; then every page,
    as the signed-in shifter sees it. Returns (what was done, the screenshots)."""
    done = []
    ana = Browser(pathlib.Path(work))
    try:
        assert "ana (shifter)" in sign_in(ana, url, add_user(work, "ana", "shifter"))
        text = ana.open(url + "/")
        if "Acknowledge" in text:
            ana.press("Acknowledge", {"why": "ana: on it, pilots being restarted"})
            done.append("acknowledged the top alarm")
        failed = client.list_jobs(state="failed", jobtype="purity", limit=1)
        if failed:
            run = int(re.search(r"run0*(\d+)", failed[0]["infile"]).group(1))
            ana.open(f"{url}/runs?runs={run}")
            confirm = ana.press(f"Retry failed jobs of runs {run}", {"why": "ana: calibration DB was down"})
            ana.screenshot(pathlib.Path(work) / "screenshots" / "confirm-retry.png")
            count = re.search(r"This will retry (\d+) failed", confirm).group(1)
            ana.press("Retry these")
            ana.press("Add note", {"why": f"ana: purity failures of run {run} retried"})
            done.append(f"retried {count} failed job(s) of run {run} and noted the run")
        ana.open(url + "/jobtype/evdisp")
        ana.press("Pause", {"why": "ana: event display times out, checking"})
        ana.press("Resume", {"why": "ana: timeouts are the payload's own"})
        done.append("paused and resumed evdisp")
        ben = Browser(pathlib.Path(work))
        try:
            token = add_user(work, "ben", "expert")
            sign_in(ben, url, token)
            ben.open(url + "/jobtype/purity")
            ben.press("Set cap", {"cap": "3"})
            done.append("ben (expert) capped purity at 3")
        finally:
            ben.close()
        subprocess.run([sys.executable, os.path.join(ROOT, "job.py"), "--reprocess", "--runs", "5000-5001", "--jobtype",
                        "purity", "--tag", "v10", "--set-env", "DUNETPCVER=v10_02"], check=True, stdout=subprocess.DEVNULL,
                       env=dict(os.environ, P3S_SERVER=url, P3S_TOKEN=token))
        done.append("ben reprocessed runs 5000-5001 as purity@v10")
        return done, screenshots(ana, url, client, work)
    finally:
        ana.close()


def screenshots(browser, url, client, work):
    failed = client.list_jobs(state="failed", limit=1)
    judged = client.list_jobs(jobtype="monitor", state="finished", limit=1)
    pilot = client.list_pilots()[0]["uuid"]
    pages = {"summary": "/", "runs": "/runs", "runs-reprocessed": "/runs?runs=5000-5001", "missing": "/files?missing=yes",
             "plots": "/plots", "plots-by-run": "/plots?group=run",
             "trend": "/trend/monitor/adc_mean",
             "errors": "/errors", "failures": "/failures?jobtype=purity", "jobs": "/jobs", "pilots": "/pilots", "pilot": f"/pilot/{pilot}", "sites": "/sites",
             "site": "/site/lxvm", "services": "/services", "alarms": "/alarms", "jobtype": "/jobtype/purity",
             "dags": "/dags", "dag": "/dag/3filters", "workflows": "/workflows", "datasets": "/datasets"}
    if failed:
        pages["failed-job"] = f"/job/{failed[0]['uuid']}"
    if judged:
        pages["monitor-job"] = f"/job/{judged[0]['uuid']}"
    shots = []
    for name, path in pages.items():
        shot = pathlib.Path(work) / "screenshots" / f"{name}.png"
        browser.open(url + path)
        browser.screenshot(shot)
        shots.append(str(shot))
    return shots


if __name__ == "__main__":
    sys.exit(main())
