"""Nothing is lost and nothing runs twice when payloads hang, pilots die or the server dies."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from conftest import ROOT, alive, blocked_signals, shell_job, wait_until
from serverAPI import P3SError


def running(p3s, uuid, marker=None):
    return wait_until(lambda: p3s.job(uuid)["state"] == "running" and (marker is None or marker.exists()),
                      15, what=f"job {uuid} to run")


def sleeping_job_on_a_pilot(p3s, spawn="", *pilot_args):
    """Submit a job that runs `spawn`, records its pid and sleeps; start a pilot; return once
    it runs."""
    pidfile = p3s.dir / "payload.pid"
    [uuid] = p3s.submit([shell_job(f"{spawn + '; ' if spawn else ''}echo $$ > {pidfile}; exec sleep 60")])
    pilot = p3s.pilot("-p", "1", *pilot_args)
    running(p3s, uuid, pidfile)
    return uuid, pilot, int(wait_until(lambda: pidfile.read_text().strip(), 5, what="the pid written"))


def test_time_limit_kills_payload_and_its_children(p3s):
    pids = p3s.dir / "pids"
    payload = f"sleep 300 & echo $! >> {pids}; (sleep 300; true) & echo $! >> {pids}; echo $$ >> {pids}; wait"
    [uuid] = p3s.submit([shell_job(payload, timeout=1)])
    started = time.monotonic()
    p3s.run("pilot.py", "-c", "1", "-p", "1", "--kill-grace", "1", "-L", p3s.logs)
    job = p3s.job(uuid)
    assert job["state"] == "timeout" and "time limit" in job["errmsg"]
    assert time.monotonic() - started < 20
    spawned = [int(p) for p in pids.read_text().split()]
    assert len(spawned) == 3
    wait_until(lambda: not any(alive(p) for p in spawned), 5, what="every payload process to be gone")


def test_payload_ignoring_sigterm_is_killed_after_grace(p3s):
    [uuid] = p3s.submit([shell_job("trap '' TERM; sleep 30", timeout=1)])
    started = time.monotonic()
    p3s.run("pilot.py", "-c", "1", "-p", "1", "--kill-grace", "1", "-L", p3s.logs)
    assert p3s.job(uuid)["state"] == "timeout"
    assert time.monotonic() - started < 15


def test_pilot_killed_mid_job_takes_its_payload_along_and_the_lease_ends_the_job(tmp_path, start_server):
    """kill -9 of a pilot: its payload and the payload's children die at once (the watchdog);
    the pilot is shown lost within 3 heartbeats, its job ends pilotTO when the lease runs out."""
    server = start_server(["--lease-beats", "6"])    # lease: 6 x 0.5 s
    children = server.dir / "children"
    uuid, pilot, payload_pid = sleeping_job_on_a_pilot(
        server, f"sleep 60 & echo $! >> {children}; sleep 60 & echo $! >> {children}", "-b", "0.5")
    spawned = [payload_pid] + [int(p) for p in children.read_text().split()]
    pilot.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: not any(alive(p) for p in spawned), 2, what="the payload and its children to die")
    wait_until(lambda: server.api.list_pilots()[0]["state"] == "lost", 5, what="the pilot shown lost")
    assert time.monotonic() - killed < 3 * 0.5 + 0.9, "lost pilot not noticed within 3 heartbeats"
    assert server.job(uuid)["state"] == "running", "the job was given away before its lease ran out"
    wait_until(lambda: server.job(uuid)["state"] == "pilotTO", 10, what="pilotTO")
    assert time.monotonic() - killed > 6 * 0.5 - 0.5


def test_pilot_killed_mid_job_is_retried_when_attempts_remain(start_server):
    p3s = start_server(["--lease-beats", "6"])     # the retry waits for the lease: 6 x 0.5 s
    marker, ledger = p3s.dir / "first-attempt", p3s.dir / "ledger"
    payload = (f"echo $P3S_JOB_UUID >> {ledger}; if [ ! -e {marker} ]; then touch {marker}; exec sleep 60; fi")
    [uuid] = p3s.submit([shell_job(payload, max_attempts=2)])
    first = p3s.pilot("-p", "1", "-b", "0.5")
    running(p3s, uuid, marker)
    first.send_signal(signal.SIGKILL)
    p3s.pilot("-p", "1", "-b", "0.5")
    p3s.wait_jobs([uuid], timeout=20)
    job = p3s.job(uuid)
    assert job["state"] == "finished" and job["attempt"] == 2
    states = [e["new"] for e in job["events"]]
    assert states == ["defined", "dispatched", "running", "pilotTO", "defined", "dispatched", "running",
                      "finished"]
    assert ledger.read_text().split() == [uuid, uuid]


def test_sigterm_to_pilot_stops_payload_reports_and_deregisters(p3s):
    uuid, pilot, payload_pid = sleeping_job_on_a_pilot(p3s, "", "--kill-grace", "1")
    pilot.send_signal(signal.SIGTERM)
    assert pilot.wait(15) == 0
    job = p3s.job(uuid)
    assert job["state"] == "pilotTO" and "SIGTERM" in job["errmsg"]
    assert not alive(payload_pid)
    [record] = p3s.api.list_pilots()
    assert record["state"] == "stopped" and record["job"] is None


def test_sigterm_to_idle_pilot_exits_at_once(p3s):
    pilot = p3s.pilot("-p", "25")
    wait_until(lambda: any(p["state"] == "no jobs" for p in p3s.api.list_pilots()), 10, what="idle pilot")
    started = time.monotonic()
    pilot.send_signal(signal.SIGTERM)
    assert pilot.wait(10) == 0
    assert time.monotonic() - started < 3, "the pilot sat out its long poll"
    assert p3s.api.list_pilots()[0]["state"] == "stopped"


def test_server_killed_and_restarted_loses_nothing_and_runs_nothing_twice(p3s):
    ledger = p3s.dir / "ledger"
    uuids = p3s.submit([shell_job(f'sleep 0.2; echo "$P3S_JOB_UUID" >> {ledger}')] * 60)
    for _ in range(4):
        p3s.pilot("-p", "2", "--max-idle", "90")
    wait_until(lambda: ledger.exists() and len(ledger.read_text().split()) >= 10, 30, what="some progress")
    p3s.kill9()
    time.sleep(1.5)         # pilots finish payloads and keep their reports while the server is away
    p3s.start()
    states = p3s.wait_jobs(uuids, timeout=120)
    assert Counter(s["state"] for s in states.values()) == {"finished": 60}
    runs = Counter(ledger.read_text().split())
    assert set(runs) == set(uuids) and max(runs.values()) == 1
    assert all(p["state"] != "lost" for p in p3s.api.list_pilots()), "pilots blamed for the outage"


def test_a_pilot_told_to_stop_leaves_though_its_server_is_gone_for_good(p3s):
    """It keeps an end report it cannot deliver for a few kill graces, then leaves (a server
    moved elsewhere must not leave pilots behind that SIGTERM cannot end)."""
    [uuid] = p3s.submit([shell_job("sleep 0.5")])
    pilot = p3s.pilot("-p", "2", "--kill-grace", "0.5")
    wait_until(lambda: p3s.job(uuid)["state"] in ("dispatched", "running"), 20, what="the job to start")
    p3s.kill9()
    time.sleep(1)           # the payload ends; its report finds no server
    started = time.monotonic()
    pilot.send_signal(signal.SIGTERM)
    pilot.wait(60)
    assert time.monotonic() - started < 40, "the pilot stayed for its undelivered report"


def test_an_end_report_left_behind_is_delivered_by_the_next_pilot_and_the_job_runs_once(p3s):
    """A pilot told to stop while its server is away leaves its end report in its job log
    directory (its user's alone); the next pilot there delivers it in the first one's name: the
    job ends finished, once, instead of pilotTO at its lease or run again."""
    ledger = p3s.dir / "ledger"
    [uuid] = p3s.submit([shell_job(f"echo ran >> {ledger}; sleep 0.3")])
    pilot = p3s.pilot("-p", "2", "--kill-grace", "0.5")
    wait_until(lambda: p3s.job(uuid)["state"] in ("dispatched", "running"), 20, what="the job to start")
    first = p3s.job(uuid)["pilot"]
    p3s.kill9()
    time.sleep(1)           # the payload ends; its report finds no server
    pilot.send_signal(signal.SIGTERM)
    assert pilot.wait(60) == 0
    left_at = time.time()
    [left] = (p3s.logs / "undelivered").iterdir()
    assert left.name == f"{uuid}.json" and left.stat().st_mode & 0o777 == 0o600
    said = (p3s.dir / "pilots.log").read_text()
    assert "leaving it in" in said and "not deregistering" in said, "its job would be given away" 
    p3s.start()
    p3s.pilot("-p", "1")
    p3s.wait_jobs([uuid], timeout=30)
    job = p3s.job(uuid)
    assert (job["state"], job["attempt"], job["pilot"]) == ("finished", 1, first)
    assert ledger.read_text().split() == ["ran"], "the job ran again"
    assert job["ts_sta"] < job["ts_sto"] < left_at, "dated when the report was delivered, not when the job ended"
    assert [e["ts"] for e in job["events"] if e["new"] == "finished"] == [job["ts_sto"]]
    wait_until(lambda: not left.exists(), 10, what="the delivered report to be removed")
    wait_until(lambda: {p["uuid"]: p["state"] for p in p3s.api.list_pilots()}[first] == "stopped", 10,
               what="the pilot that left to be deregistered")


def test_a_report_delivered_late_dates_the_job_by_when_it_ended(p3s):
    """The server is down while a job ends: its end report arrives seconds later, saying how
    long ago the job ended, and the job's history, runtime and failure list say when it did."""
    [uuid] = p3s.submit([shell_job("sleep 1; exit 3")])
    p3s.pilot("-p", "1")
    running(p3s, uuid)
    p3s.kill9()
    time.sleep(3.5)             # the job ends a second in; its report waits for the server
    resumed = time.time()
    p3s.start()
    p3s.wait_jobs([uuid], timeout=30)
    job = p3s.job(uuid)
    assert job["state"] == "failed"
    assert job["ts_sto"] < resumed - 1.5, "the end dated by when the server heard of it"
    assert 0.9 < job["ts_sto"] - job["ts_sta"] < 2.5
    assert [e["ts"] for e in job["events"] if e["new"] == "failed"] == [job["ts_sto"]]
    [failure] = p3s.api.call("GET", "/failures", query={"format": "json"})["failures"]
    assert failure["ts"] == job["ts_sto"]


def test_a_late_report_claiming_an_end_before_its_job_started_is_dated_at_its_start(p3s):
    """ended_ago comes from the pilot: the server's own dates bound it, and a bad one is a 400."""
    [uuid] = p3s.submit([shell_job("true")])
    pilot = p3s.api.register_pilot()["uuid"]
    assert p3s.api.request_job(pilot, 0)["job"]["uuid"] == uuid
    for bad, field in (({"state": "running", "ended_ago": 1}, "ended_ago"), ({"ended_ago": -1}, "ended_ago"),
                       ({"ended_ago": "soon"}, "ended_ago")):
        with pytest.raises(P3SError, match=field):
            p3s.api.report(uuid, {"pilot": pilot, "attempt": 1, "state": "finished", **bad}, retry_for=0)
    p3s.api.report(uuid, {"pilot": pilot, "attempt": 1, "state": "finished", "runtime": 5, "ended_ago": 3600})
    job = p3s.job(uuid)
    assert job["ts_sta"] == job["ts_sto"] == job["ts_dis"]


def test_a_left_report_the_server_no_longer_takes_is_dropped_and_changes_nothing(p3s):
    [uuid] = p3s.submit([shell_job("true")])
    p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs)
    before = p3s.job(uuid)
    assert before["state"] == "finished"
    gone = p3s.api.register_pilot()["uuid"]
    spool = p3s.logs / "undelivered"
    spool.mkdir()
    (spool / f"{uuid}.json").write_text(json.dumps({"job": uuid, "pilot": gone, "secret": p3s.api.pilot_secrets[gone],
                                                    "report": {"pilot": gone, "attempt": 1, "state": "failed"}}))
    (spool / "0b7e3c1e-98f4-4a8e-9d2b-6d7b3f1a2c3d.json").write_text("{half a rep")
    (spool / "1b7e3c1e-98f4-4a8e-9d2b-6d7b3f1a2c3d.json").write_text(json.dumps({"job": "../x", "pilot": gone,
                                                                                  "secret": "s", "report": []}))
    said = p3s.run("pilot.py", "-c", "1", "-p", "0", "-L", p3s.logs).stderr
    assert list(spool.iterdir()) == []
    after = p3s.job(uuid)
    assert after["state"] == "finished" and after["events"] == before["events"]
    assert f"job {uuid}: the end report pilot {gone} left is no longer taken" in said
    assert "not an end report a pilot left" in said


def test_stale_report_is_refused_and_changes_nothing(p3s):
    [uuid] = p3s.submit([shell_job("true")])
    pilot = p3s.api.register_pilot()["uuid"]              # this client acts as the pilot
    assert p3s.api.request_job(pilot, 0)["job"]["uuid"] == uuid
    p3s.api.report(uuid, {"pilot": pilot, "attempt": 1, "state": "finished", "exit_code": 0})
    job = p3s.job(uuid)
    late = {"pilot": pilot, "attempt": 1, "state": "failed", "exit_code": 9}
    wrong_attempt = dict(late, attempt=2, state="finished")
    for report in (late, wrong_attempt):
        with pytest.raises(P3SError) as refused:
            p3s.api.report(uuid, report)
        assert refused.value.status == 409, refused.value
    again = p3s.job(uuid)
    assert again["state"] == "finished" and again["exit_code"] == 0
    assert len(again["events"]) == len(job["events"])
    repeated = {"pilot": pilot, "attempt": 1, "state": "finished", "exit_code": 0}
    assert p3s.api.report(uuid, repeated)["duplicate"] is True     # a lost answer, retried


def test_time_limit_holds_while_the_server_is_down(p3s):
    pidfile = p3s.dir / "payload.pid"
    [uuid] = p3s.submit([shell_job(f"echo $$ > {pidfile}; exec sleep 60", timeout=2)])
    p3s.pilot("-p", "1", "-b", "0.5", "--kill-grace", "1")
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 15, what="the payload to start")
    p3s.kill9()                                   # maybe before the running report, maybe after
    started = time.monotonic()
    payload = int(pidfile.read_text())
    wait_until(lambda: not alive(payload), 10, what="the payload to be killed at its time limit")
    assert time.monotonic() - started < 6
    p3s.start()
    p3s.wait_jobs([uuid], timeout=60)
    assert p3s.job(uuid)["state"] == "timeout"


def test_payload_that_cannot_start_is_reported_failed(p3s):
    [uuid] = p3s.submit([{"payload": "/nonexistent/bin/reco", "params": "--fast"}])
    p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs)
    job = p3s.job(uuid)
    assert job["state"] == "failed" and job["exit_code"] == 127
    assert "cannot start payload" in job["errmsg"] and "/nonexistent/bin/reco" in job["errmsg"]


def test_a_payload_gets_the_signals_python_ignores_back(p3s):
    """Python ignores SIGPIPE; a payload must not inherit that (`yes | head` would end in
    "Broken pipe" errors, a reader of a closed pipe would never stop)."""
    [uuid] = p3s.submit([shell_job("yes | head -1 >/dev/null; grep SigIgn /proc/self/status")])
    p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs)
    job = p3s.job(uuid)
    assert job["state"] == "finished" and "Broken pipe" not in job["stderr_tail"], job["stderr_tail"]
    ignored = int(job["stdout_tail"].split()[-1], 16)
    assert not ignored & (1 << (13 - 1)), "SIGPIPE is ignored in the payload"


def test_a_payload_that_swaps_its_log_for_a_named_pipe_hangs_no_pilot(p3s):
    """A payload may do anything to its own log files: one that replaces its stdout log with a
    named pipe must not leave its pilot blocked for good opening it to read the tail (opening a
    FIFO waits for a writer that never comes). The job is reported, the pilot runs the next."""
    swap = 'log=$(readlink /proc/$$/fd/1); rm "$log"; mkfifo "$log"; echo swapped >&2; exit 3'
    first, second = p3s.submit([shell_job(swap), shell_job("echo next")])
    result = p3s.run("pilot.py", "-c", "2", "-p", "1", "-L", p3s.logs, timeout=30)
    assert result.returncode == 0, result.stderr
    job = p3s.job(first)
    assert job["state"] == "failed" and job["exit_code"] == 3 and "swapped" in job["stderr_tail"], job
    assert job["stdout_tail"] == ""
    assert p3s.job(second)["state"] == "finished"


def test_pilot_refuses_an_unwritable_log_directory(p3s):
    blocker = p3s.dir / "a-file"
    blocker.write_text("")
    result = p3s.run("pilot.py", "-c", "1", "-L", blocker / "logs")
    assert result.returncode == 2 and "-L" in result.stderr
    assert p3s.api.list_pilots() == [], "a pilot that cannot log registered anyway"


def test_dispatched_job_of_a_lost_pilot_ends_pilotTO_but_a_deregistered_pilot_gives_it_back(start_server):
    p3s = start_server(["--lease-beats", "6"])     # pilotTO waits for the lease: 6 x 0.3 s
    first, second = p3s.submit([shell_job("true"), shell_job("true")])
    silent = p3s.api.register_pilot(heartbeat=0.3)["uuid"]        # claims, then never speaks again
    assert p3s.api.request_job(silent, 0)["job"]["uuid"] == first
    wait_until(lambda: p3s.job(first)["state"] == "pilotTO", 10, what="pilotTO for the lost pilot's job")
    polite = p3s.api.register_pilot(heartbeat=5)["uuid"]
    assert p3s.api.request_job(polite, 0)["job"]["uuid"] == second
    p3s.api.deregister_pilot(polite, "going away before starting it")
    job = p3s.job(second)
    assert job["state"] == "defined" and job["attempt"] == 1 and job["pilot"] is None


def test_retried_creations_are_stored_once(p3s):
    import uuid
    pilot = str(uuid.uuid4())
    secret = "the same secret, asked twice"
    assert p3s.api.register_pilot(uuid=pilot, secret=secret)["uuid"] == pilot
    assert p3s.api.register_pilot(uuid=pilot, secret=secret)["uuid"] == pilot  # the answer was lost
    assert [p["uuid"] for p in p3s.api.list_pilots()] == [pilot]
    job = dict(shell_job("true"), uuid=str(uuid.uuid4()))
    assert p3s.api.submit_jobs([job]) == p3s.api.submit_jobs([job]) == [job["uuid"]]
    assert len(p3s.api.list_jobs()) == 1
    path = p3s.dir / "one.graphml"
    path.write_text(open(f"{ROOT}/tests/compat/1filter.graphml").read())
    assert p3s.run("workflow.py", "-g", path).returncode == 0
    wf = str(uuid.uuid4())
    assert p3s.api.create_workflow("one", uuid=wf)["uuid"] == p3s.api.create_workflow("one", uuid=wf)["uuid"] == wf
    assert len(p3s.api.list_workflows()) == 1 and len(p3s.api.list_jobs()) == 1 + 3


def test_a_pilot_waiting_for_an_unreachable_server_stops_on_sigterm(p3s):
    pilot = p3s.pilot("-p", "1", env=dict(p3s.env, P3S_SERVER="http://127.0.0.1:9"))
    time.sleep(1.0)                         # retrying its registration
    assert pilot.poll() is None
    started = time.monotonic()
    pilot.send_signal(signal.SIGTERM)
    assert pilot.wait(10) == 0 and time.monotonic() - started < 3


def watchdogs_of(pilot_pid):
    """The pids of the watchdog processes whose parent is this pilot."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if int(fields[1]) == pilot_pid and fields[0] != "Z" and b"select" in cmdline:
            found.append(int(name))
    return found


def failing_threads(which):
    """Python to run before a real pilot.py: the threads for which `which` (an expression of
    the thread, `self`) holds cannot start, as at ulimit -u."""
    return ("import os, threading\n"
            "start = threading.Thread.start\n"
            "def limited(self):\n"
            f"    if {which}:\n"
            "        raise RuntimeError(\"can't start new thread\")\n"
            "    return start(self)\n"
            "threading.Thread.start = limited\n")


def real_pilot_where(patch, *args):
    """The command of a real pilot.py with these arguments, `patch` (Python) run before it."""
    return [sys.executable, "-c", f"import runpy, sys\n{patch}sys.argv = ['pilot.py', *{list(args)!r}]\n"
                                  f"runpy.run_path({os.path.join(ROOT, 'pilot.py')!r}, run_name='__main__')\n"]


def run_real_pilot_where(patch, p3s, *args, timeout=60):
    """A real pilot.py run to its end, `patch` run before it; its CompletedProcess."""
    return subprocess.run(real_pilot_where(patch, *args), env=p3s.env, capture_output=True, text=True,
                          timeout=timeout)


def failing_call(where, error, when="True"):
    """Python to run before a real pilot.py: the function `where` (module.name) raises `error`
    (an expression) while `when` (another) holds."""
    module, name = where.rsplit(".", 1)
    return (f"import errno, os, threading, {module}\n"
            f"real_{name} = {where}\n"
            "def failing(*args, **kwargs):\n"
            f"    if {when}:\n"
            f"        raise {error}\n"
            f"    return real_{name}(*args, **kwargs)\n"
            f"{where} = failing\n")


NO_THREAD = "[Errno 11] no thread to watch it: can't start new thread"

# A real pilot.py started where its watchdog cannot be: no memfd_create (a sandbox), or no
# thread to watch it (ulimit -u); and the one line it must say.
WITHOUT_A_WATCHDOG = {
    "memfd": (failing_call("os.memfd_create", "OSError(errno.ENOSYS, 'Function not implemented')"),
              "[Errno 38] Function not implemented"),
    "thread": (failing_threads("self.name == 'watchdog'"), NO_THREAD),
}


@pytest.mark.parametrize("missing", sorted(WITHOUT_A_WATCHDOG))
def test_a_pilot_that_cannot_start_its_watchdog_takes_no_job_and_says_why_in_one_line(p3s, missing):
    """A node that cannot give the watchdog what it needs (a sandbox without memfd_create; a
    crowd of pilots at ulimit -u or -n) stops the pilot with one line and exit code 1, never a
    traceback, and no job of the queue is taken to run unwatched."""
    [uuid] = p3s.submit([shell_job("true")])
    patch, error = WITHOUT_A_WATCHDOG[missing]
    done = run_real_pilot_where(patch, p3s, "-p", "1", "-L", str(p3s.logs))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"pilot.py: cannot start the pilot's watchdog, without which no payload may run: {error}"]
    assert p3s.job(uuid)["state"] == "defined" and p3s.api.list_pilots() == []


def wakeups(pid):
    """How many times the process has gone to sleep and been woken (voluntary context switches)."""
    with open(f"/proc/{pid}/status") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


def test_the_watchdog_sleeps_through_a_run_of_short_jobs_and_no_payload_holds_its_table(p3s):
    """The running payloads' groups are in a table the pilot and its watchdog share: 300 short
    jobs cost the watchdog no wake-up each (a line a job woke it at least once a job), and a
    payload does not inherit the table, where it could strike its own group out, or add another."""
    fds = p3s.dir / "fds"
    p3s.submit([shell_job(f"ls -l /proc/$$/fd > {fds}")])
    pilot = p3s.pilot("-p", "1")
    [watchdog] = wait_until(lambda: watchdogs_of(pilot.pid), 5, what="the watchdog")
    wait_until(lambda: fds.exists() and fds.read_text(), 15, what="the first job")
    before = wakeups(watchdog)
    p3s.wait_jobs(p3s.submit([{"name": "short", "payload": "/bin/true"}] * 300))
    assert wakeups(watchdog) - before < 100
    assert "0 -> /dev/null" in fds.read_text() and "memfd" not in fds.read_text()


def test_a_killed_watchdog_is_replaced_and_still_takes_the_payload_along(p3s):
    """kill -9 of the watchdog, then of the pilot: the pilot started a new watchdog at once,
    which maps the same table of payload groups and kills the payload. It blocks no signal
    the first did not (the thread that starts it blocks SIGCHLD while it waits)."""
    uuid, pilot, payload_pid = sleeping_job_on_a_pilot(p3s, "", "-b", "0.5")
    [first] = wait_until(lambda: watchdogs_of(pilot.pid), 5, what="the watchdog")
    first_blocks = blocked_signals(first)
    os.kill(first, signal.SIGKILL)
    [second] = wait_until(lambda: [w for w in watchdogs_of(pilot.pid) if w != first], 5, what="a new watchdog")
    assert blocked_signals(second) == first_blocks
    time.sleep(0.5)         # it maps the table as it starts (a pilot killed within those
    pilot.send_signal(signal.SIGKILL)       # milliseconds is the test's race)
    wait_until(lambda: not alive(payload_pid), 3, what="the payload to die with its pilot")


# Python run before a real pilot.py, on a node at its process limit while the file named FULL
# exists: its fork of a new watchdog, or the thread that watches it, fails as at ulimit -u.
AT_THE_PROCESS_LIMIT = {
    "fork": (failing_call("subprocess.Popen", "OSError(errno.EAGAIN, 'Resource temporarily unavailable')",
                          "os.path.exists(FULL)"),
             "[Errno 11] Resource temporarily unavailable"),
    "thread": (failing_threads("self.name == 'watchdog' and os.path.exists(FULL)"), NO_THREAD),
}


@pytest.mark.parametrize("failing", sorted(AT_THE_PROCESS_LIMIT))
def test_a_watchdog_that_cannot_be_restarted_stops_the_pilot_taking_jobs_until_one_is(p3s, failing):
    """The watchdog killed on a node at its process limit (ulimit -u: fork, or a new thread,
    says EAGAIN): the restart failed in a thread, with a traceback, and the pilot went on taking
    jobs that nothing would kill with it. Now it takes none, and says why on its page, until a
    retry starts one (and a watchdog without its watching thread is not left running)."""
    full = p3s.dir / "node-at-its-process-limit"
    patch, error = AT_THE_PROCESS_LIMIT[failing]
    stderr = p3s.dir / "pilot.err"
    with open(stderr, "w") as err:
        pilot = subprocess.Popen(real_pilot_where(f"FULL = {str(full)!r}\n{patch}", "-p", "0.2", "-b", "1",
                                                  "-L", str(p3s.logs)), env=p3s.env, stderr=err)
    try:
        [first] = wait_until(lambda: watchdogs_of(pilot.pid), 10, what="the watchdog")
        wait_until(lambda: p3s.api.list_pilots(), 10, what="the pilot to register")
        full.touch()
        os.kill(first, signal.SIGKILL)
        note = wait_until(lambda: p3s.api.list_pilots()[0]["note"], 10, what="the pilot's note")
        assert note == f"taking no jobs: its watchdog exited (code -9) and cannot be restarted: {error}", note
        [uuid] = p3s.submit([shell_job("true")])
        time.sleep(3)                       # 15 of its polls, 3 heartbeats
        assert p3s.job(uuid)["state"] == "defined", "a job was taken with no watchdog to kill it"
        assert not watchdogs_of(pilot.pid)
        full.unlink()
        wait_until(lambda: p3s.job(uuid)["state"] == "finished", 15, what="the job, once a watchdog is back")
        assert len(watchdogs_of(pilot.pid)) == 1
        wait_until(lambda: p3s.api.list_pilots()[0]["note"] == "", 10, what="the note cleared")
        pilot.terminate()
        assert pilot.wait(15) == 0
    finally:
        if pilot.poll() is None:
            pilot.kill()
            pilot.wait(10)
    said = stderr.read_text()
    assert "Traceback" not in said and said.count("WARNING: watchdog exited") == 1, said   # not at the end


def test_a_payload_at_its_time_limit_dies_where_no_thread_can_wait_out_its_grace(p3s):
    """On a node at its process limit (a payload's fork bomb reaches ulimit -u) the thread that
    gives a stopped payload its grace cannot start: that raised in the supervisor, which died,
    and with it every time limit of the pilot's life. Now the payload is killed at once, and
    the pilot goes on to its next job (its cleaner of old job files, which has no thread
    either, is tried again later: it crashed the pilot)."""
    no_thread = failing_threads("self.name == 'cleaner' or getattr(self, '_target', None) is not None "
                                "and self._target.__name__ == 'stop_group'")
    slow, quick = p3s.submit([shell_job("exec sleep 60", timeout=1), shell_job("true")])
    started = time.monotonic()
    done = run_real_pilot_where(no_thread, p3s, "-c", "2", "-p", "0.2", "--kill-grace", "30",
                                "-L", str(p3s.logs), timeout=40)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert time.monotonic() - started < 20, "the payload had its 30 s of grace, or more"
    ended = p3s.job(slow)
    assert (ended["state"], ended["errmsg"]) == ("timeout", "killed at its time limit of 1 s"), ended
    assert p3s.job(quick)["state"] == "finished"


def test_a_pilot_with_no_thread_for_its_supervisor_leaves_deregistered_in_one_line(p3s):
    """A crowd of pilots at the node's ulimit -u: one that registered, then could not start its
    supervisor thread, ended in a traceback and was left for the server to find lost (an alarm
    for a pilot that never ran). Now it says why in one line, deregisters, exits 1."""
    [uuid] = p3s.submit([shell_job("true")])
    done = run_real_pilot_where(failing_threads("self.name == 'supervisor'"), p3s, "-p", "1", "-L", str(p3s.logs))
    assert done.returncode == 1
    said = [line for line in done.stderr.splitlines() if "ERROR" in line or "Traceback" in line]
    assert len(said) == 1 and said[0].endswith("ERROR: cannot start the pilot's supervisor thread: "
                                               "can't start new thread"), done.stderr
    [pilot] = p3s.api.list_pilots()
    assert pilot["state"] == "stopped" and p3s.job(uuid)["state"] == "defined"


def test_an_input_with_no_thread_to_read_it_is_said_skipped_and_the_job_runs(p3s):
    """At the node's ulimit -u the thread that reads a job's input for its checksum cannot
    start: that raised as the payload started, and the pilot crashed. Now the job runs and its
    provenance says why the checksum is missing."""
    data = p3s.dir / "np04_raw_run005010_0001.root"
    data.write_bytes(b"raw")
    [uuid] = p3s.submit([shell_job("cat $P3S_INPUT_FILE", infile=str(data))])
    done = run_real_pilot_where(failing_threads("self.name == 'input-sum'"), p3s, "-c", "1", "-p", "1",
                                "-L", str(p3s.logs))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    job = p3s.job(uuid)
    assert job["state"] == "finished" and job["stdout_tail"] == "raw"
    assert job["provenance"]["input"] == {"path": str(data), "adler32": None,
                                          "skipped": "no thread to read it: can't start new thread"}


# A call each of the pilot's own threads makes while a job runs, where a defect is met.
DEFECT_IN = {
    "supervisor": "os.listdir",         # its look at the payload's processes, once a second
    "heartbeat": "shutil.disk_usage",   # the free space each heartbeat tells
    "reporter": "json.dumps",           # the running report's body
}


@pytest.mark.parametrize("thread", sorted(DEFECT_IN))
def test_a_defect_in_a_pilot_thread_is_the_pilots_crash_and_its_job_runs_again(p3s, thread):
    """A defect met in one of the pilot's own threads killed that thread alone, with a
    traceback: without its supervisor the pilot ran on with no time limit, without its
    heartbeat it was found lost while it ran, without its reporter it waited for ever on the
    next long job. Now it is the pilot's crash: said once, the payload stopped and reported,
    the pilot deregistered as crashed, exit 1; the job runs again on the next pilot."""
    flag = p3s.dir / "ran-once"
    [uuid] = p3s.submit([shell_job(f"if [ -e {flag} ]; then printf again; else touch {flag}; exec sleep 60; fi",
                                   max_attempts=2)])
    defect = failing_call(DEFECT_IN[thread], "RuntimeError('a defect')",
                          f"threading.current_thread().name == {thread!r}")
    started = time.monotonic()
    done = run_real_pilot_where(defect, p3s, "-p", "0.2", "-b", "0.5", "--kill-grace", "1", "-L", str(p3s.logs))
    assert done.returncode == 1 and time.monotonic() - started < 30, done.stderr
    assert done.stderr.count("Traceback") == 1 and f"the {thread} thread crashed" in done.stderr, done.stderr
    crash = f"crashed: the {thread} thread: RuntimeError: a defect"
    [pilot] = p3s.api.list_pilots()
    assert pilot["state"] == "stopped" and pilot["note"] == crash, pilot
    job = p3s.job(uuid)
    assert (job["state"], job["attempt"]) == ("defined", 2), job
    p3s.pilot("-c", "1", "-p", "0.2")
    p3s.wait_jobs([uuid])
    job = p3s.job(uuid)
    assert (job["state"], job["stdout_tail"]) == ("finished", "again"), job


def test_a_pilot_that_crashed_while_it_waited_for_work_gives_back_the_job_it_is_then_handed(p3s):
    """The heartbeat thread meets a defect while the pilot waits in its long poll, and a job
    arrives before the poll ends: the pilot, crashed, must not start it (it would be stopped at
    once, an attempt lost): it is given back, unstarted, as the pilot leaves."""
    flag, ran = p3s.dir / "defect-now", p3s.dir / "ran"
    defect = failing_call("shutil.disk_usage", "RuntimeError('a defect')",
                          f"threading.current_thread().name == 'heartbeat' and os.path.exists({str(flag)!r})")
    stderr = p3s.dir / "pilot.err"
    with open(stderr, "w") as err:
        pilot = subprocess.Popen(real_pilot_where(defect, "-p", "30", "-b", "0.5", "-L", str(p3s.logs)),
                                 env=p3s.env, stderr=err)
    try:
        wait_until(lambda: p3s.waiting_requests() == 1, 15, what="the pilot in its long poll")
        flag.touch()
        wait_until(lambda: "the heartbeat thread crashed" in stderr.read_text(), 5, what="the crash")
        [uuid] = p3s.submit([shell_job(f"touch {ran}")])
        assert pilot.wait(timeout=20) == 1, stderr.read_text()
    finally:
        pilot.kill()
    job = p3s.job(uuid)
    assert (job["state"], job["attempt"]) == ("defined", 1) and not ran.exists(), job
    [gone] = p3s.api.list_pilots()
    assert gone["note"] == "crashed: the heartbeat thread: RuntimeError: a defect", gone


def test_a_report_queued_for_a_crashed_reporter_never_holds_the_pilot(p3s):
    """The reporter thread fails on one job's running report; before its crash is handled (a
    slow log, here), the pilot starts the next job, which ignores SIGTERM and so outlives the
    stop long enough to be queued as running too, for a reporter that is gone. The pilot waited
    for that report for ever; now it goes on once the thread has ended."""
    slow_crash = ("import logging, threading, time\n"
                  "real_exception = logging.Logger.exception\n"
                  "def slowly(self, *args, **kwargs):\n"
                  "    if threading.current_thread().name == 'reporter':\n"
                  "        time.sleep(1.5)\n"
                  "    return real_exception(self, *args, **kwargs)\n"
                  "logging.Logger.exception = slowly\n")
    defect = failing_call("json.dumps", "RuntimeError('a defect')", "threading.current_thread().name == 'reporter'")
    first, stubborn = p3s.submit([shell_job("sleep 0.5", priority=2), shell_job("trap '' TERM; sleep 60", priority=1)])
    done = run_real_pilot_where(slow_crash + defect, p3s, "-p", "0.2", "-b", "0.5", "--kill-grace", "2",
                                "-L", str(p3s.logs), timeout=30)
    assert done.returncode == 1 and "the reporter thread crashed" in done.stderr, done.stderr
    assert p3s.job(first)["state"] == "finished"
    ended = p3s.job(stubborn)
    assert (ended["state"], ended["errmsg"]) == ("pilotTO", "pilot stopping: crashed: the reporter thread: "
                                                 "RuntimeError: a defect"), ended


def test_a_heartbeat_heard_before_a_pilot_stopped_never_overwrites_why_it_stopped(p3s):
    """Housekeeping writes the heartbeats heard in memory: one heard just before a pilot
    deregistered as crashed wrote its note ('') over the crash, and the pilot's line said
    nothing of why it stopped (met by the test above, one run in three)."""
    pilot = p3s.api.register_pilot(heartbeat=60)["uuid"]
    p3s.api.heartbeat(pilot, note="taking no jobs: the probe failed", free_mb=10.0)
    p3s.api.deregister_pilot(pilot, "crashed: the heartbeat thread: RuntimeError: a defect")
    time.sleep(1.0)         # three passes of housekeeping (every 0.3 s in tests)
    [stopped] = p3s.api.list_pilots()
    assert (stopped["state"], stopped["note"]) == ("stopped", "crashed: the heartbeat thread: RuntimeError: a defect")


def test_a_payload_child_that_left_its_session_dies_with_the_pilot(p3s):
    """setsid takes a process out of the payload's group and session: it is still the job's,
    and dies with its pilot's kill -9."""
    escaped = p3s.dir / "escaped.pid"
    uuid, pilot, payload_pid = sleeping_job_on_a_pilot(
        p3s, f"setsid sh -c 'echo $$ > {escaped}; exec sleep 60' & true", "-b", "0.5")
    stray = int(wait_until(lambda: escaped.exists() and escaped.read_text().strip(), 5, what="the escape"))
    assert os.getpgid(stray) != os.getpgid(payload_pid), "the test's child did not leave the group"
    pilot.send_signal(signal.SIGKILL)
    wait_until(lambda: not alive(payload_pid) and not alive(stray), 3, what="the payload and its escape to die")
