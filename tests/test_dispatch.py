"""Dispatch at scale, as the pilot and server do it: one request per short job (its end report
claims the next), both transitions recorded for a job that ended before its running report."""
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from conftest import blocked_signals, shell_job, tiny_png, wait_until


def counter(p3s, name):
    return p3s.api.call("GET", "/metrics", query={"format": "json"})["counters"][name]


def test_a_busy_pilot_needs_one_request_per_short_job(p3s):
    """Register, one claim, 30 end reports (each claims the next job), stop. A job still running
    at RUNNING_REPORT_DELAY on a loaded machine is not short: its running report, and the reserve
    it gives back, are its own two requests more. The server counts the reports it took, so the
    running ones are known exactly (a guess from the jobs' durations missed one that ended just
    before the pilot, descheduled, reaped it)."""
    uuids = p3s.submit([shell_job("true") for _ in range(30)])
    before = {name: counter(p3s, name) for name in ("http_requests", "reports")}
    assert p3s.run("pilot.py", "-c", "30", "-p", "0", "-b", "30", "-L", p3s.logs).returncode == 0
    served = counter(p3s, "http_requests") - before["http_requests"] - 2    # less our own /metrics reads
    reported_running = counter(p3s, "reports") - before["reports"] - 30
    jobs = [p3s.job(u) for u in uuids]
    unfinished = [(j["state"], j["errmsg"], j["events"]) for j in jobs if j["state"] != "finished"]
    assert not unfinished, unfinished
    assert reported_running <= 10, f"{reported_running} of 30 `true` jobs reported running: not a test of short jobs"
    assert served <= 30 + 3 + 2 * reported_running, \
        f"{served} requests for 30 jobs, {reported_running} reported running (register, 1 claim, 30 end reports, stop)"


def test_a_job_ended_before_its_running_report_still_records_its_start(p3s):
    [short, long_] = p3s.submit([shell_job("echo quick"), shell_job("sleep 1")])
    pilot = p3s.pilot("-c", "2", "-p", "0")
    wait_until(lambda: p3s.job(long_)["state"] == "running", 10, what="the long job reported running")
    pilot.wait(30)
    for uuid in (short, long_):
        job = p3s.job(uuid)
        moves = [(e["old"], e["new"]) for e in job["events"]]
        assert moves == [(None, "defined"), ("defined", "dispatched"), ("dispatched", "running"),
                         ("running", "finished")], moves
        assert job["pid"] and job["stdout_path"].endswith(".out")
        assert job["ts_dis"] <= job["ts_sta"] <= job["ts_sto"]
    long_job = p3s.job(long_)
    assert long_job["ts_sto"] - long_job["ts_sta"] >= 0.9


def test_a_long_job_after_a_run_of_short_ones_is_reported_running_in_time(p3s):
    """Among short jobs in a row the supervisor is not woken for each; a long one that follows
    is still reported running about RUNNING_REPORT_DELAY (0.2 s) after its start."""
    *_, long_ = p3s.submit([shell_job("true") for _ in range(20)] + [shell_job("sleep 3")])
    p3s.pilot("-p", "0")
    wait_until(lambda: p3s.job(long_)["state"] == "running", 20, interval=0.02, what="the long job reported running")
    seen = time.time()
    assert seen - p3s.job(long_)["ts_sta"] < 0.7, "its running report came late"


def test_a_pilots_sleeping_threads_leave_sigchld_to_its_main_thread(p3s):
    """glibc's posix_spawn blocks every signal in the main thread until the payload has run
    exec: a short payload that ends before the main thread runs again (a busy node) had its
    SIGCHLD delivered to another thread, woken for it nearly every job. The watchdog's,
    heartbeat's, supervisor's and reporter's threads block it; the main thread takes it."""
    pilot = p3s.pilot("-p", "0")
    wait_until(lambda: len(p3s.api.list_pilots()) == 1, 15, what="the pilot registered")

    def helpers_blocking():
        tids = [int(t) for t in os.listdir(f"/proc/{pilot.pid}/task") if int(t) != pilot.pid]
        return len(tids) >= 4 and all(signal.SIGCHLD in blocked_signals(pilot.pid, t) for t in tids)
    wait_until(helpers_blocking, 10, what="the pilot's four other threads to block SIGCHLD")
    assert signal.SIGCHLD not in blocked_signals(pilot.pid), "the main thread must take SIGCHLD"


def test_priority_orders_the_claim_across_site_bound_and_free_jobs(p3s):
    """A job tied to the pilot's site and one for any site compete by priority, then age."""
    p3s.api.define_site("np04")
    low, mid = p3s.submit([shell_job("true", name="low", site="np04", priority=1),
                           shell_job("true", name="mid", site="np04", priority=5)])
    [high] = p3s.submit([shell_job("true", name="high", priority=9)])     # younger, but first
    p3s.run("pilot.py", "-s", "np04", "-c", "3", "-p", "1", "-L", p3s.logs)
    order = sorted((p3s.job(u)["ts_dis"], p3s.job(u)["name"]) for u in (low, high, mid))
    assert [name for _, name in order] == ["high", "mid", "low"]


# -- a job in reserve: the next payload starts the moment one ends, while its report travels -------
def runs_logged(path):
    """The jobs that ran, one line each time one ran (a payload appends its own uuid)."""
    return path.read_text().split() if path.exists() else []


def test_a_busy_pilot_starts_its_reserve_as_a_job_ends_and_runs_each_job_once(p3s):
    ran = p3s.dir / "ran.txt"
    uuids = p3s.submit([shell_job(f'echo "$P3S_JOB_UUID" >> {ran}') for _ in range(60)])
    p3s.pilot("-p", "0")
    p3s.wait_jobs(uuids)
    assert sorted(runs_logged(ran)) == sorted(uuids), "each job ran once"
    jobs = sorted((p3s.job(u) for u in uuids), key=lambda j: j["ts_sta"])
    ahead = sum(later["ts_dis"] < earlier["ts_sto"] for earlier, later in zip(jobs, jobs[1:]))
    assert ahead >= 40, f"only {ahead} of 59 jobs were claimed before the one before them ended"
    assert all(j["state"] == "finished" and j["attempt"] == 1 for j in jobs)


def test_a_reserve_never_waits_behind_a_long_job(p3s):
    """The job claimed behind a long one is given back once that one runs past 0.2 s, and
    another pilot runs it while the long one still runs."""
    first, long_, behind = p3s.submit([shell_job("true", priority=3), shell_job("sleep 6", priority=2),
                                       shell_job("true", priority=1)])
    p3s.pilot("-p", "0")
    wait_until(lambda: p3s.job(long_)["state"] == "running", 10, what="the long job running")
    wait_until(lambda: p3s.job(behind)["state"] == "defined", 5, what="the reserve given back")
    given_back = p3s.job(behind)["events"][-1]
    assert (given_back["old"], given_back["new"]) == ("dispatched", "defined") and "reserve" in given_back["info"]
    p3s.pilot("-p", "0")
    p3s.wait_jobs([behind], timeout=5)
    assert p3s.job(long_)["state"] == "running", "the job behind it waited for the long one"
    assert p3s.job(behind)["attempt"] == 1 and p3s.job(first)["state"] == "finished"


def test_a_pilot_killed_as_its_reserve_starts_has_told_the_server_so_the_reserve_runs_once(start_server):
    """The reserve starts only once the end report of the job before it has gone out (its
    images first): a pilot killed the moment the reserve starts (here by the reserve itself) has
    told the server it holds it, so its lease ends it pilotTO and it never runs again. (It
    started while the images went out, and was given back as never started: it ran twice.)"""
    p3s = start_server(["--lease-beats", "4"])
    ran, png = p3s.dir / "ran.txt", p3s.dir / "plot.png"
    tiny_png(png)
    log = f'echo "$P3S_JOB_UUID" >> {ran}'
    first, plots, killer = p3s.submit([
        shell_job(f"{log}; sleep 0.2", priority=3),
        shell_job(f'{log}; for i in $(seq 12); do cp {png} "$P3S_JOB_DIR/plot$i.png"; done; sleep 0.05', priority=2),
        shell_job(f'{log}; [ -e {ran}.once ] || {{ touch {ran}.once; kill -9 $PPID; }}', priority=1)])
    pilot = p3s.pilot("-p", "0")
    pilot.wait(20)
    wait_until(lambda: p3s.job(killer)["state"] not in ("dispatched", "running"), 15,
               what="the killed pilot's lease to end its jobs")
    p3s.pilot("-p", "0", "-c", "1", "--max-idle", "2").wait(20)
    states = {u: p3s.job(u)["state"] for u in (first, plots, killer)}
    assert runs_logged(ran).count(killer) == 1, ("the reserve ran twice", states)
    assert states == {first: "finished", plots: "finished", killer: "pilotTO"}
    assert len(p3s.api.call("GET", f"/job/{plots}", query={"format": "json"})["images"]) == 12


def test_a_reserve_that_ends_before_the_answer_to_the_report_before_it_is_read_at_once(start_server):
    """A reserve that ends while the answer to the end report before it is held up (here by an
    outside writer holding the database's lock as that report arrives) is reaped and its end
    read at once, not after the answer: its report leaves the moment the answer is in, saying
    how long ago it ended, so its end is dated when it happened, not when the server could
    listen. (Reaped after the answer, it was dated then: 2 s late here.)"""
    p3s = start_server([])
    fifo, locked = p3s.dir / "ending", p3s.dir / "locked"
    os.mkfifo(fifo)
    released = []

    def hold_the_lock():        # the moment the first job is about to end
        with open(fifo, "rb") as said:
            said.read()
        shell = sqlite3.connect(p3s.db, timeout=30, isolation_level=None)
        shell.execute("BEGIN IMMEDIATE")
        locked.touch()
        time.sleep(2)
        released.append(time.time())
        shell.execute("ROLLBACK")
        shell.close()

    holder = threading.Thread(target=hold_the_lock, daemon=True)
    holder.start()
    _, first, reserve = p3s.submit([      # the end report of the first claims the next and a reserve
        shell_job("true", priority=3),
        shell_job(f"echo > {fifo}; until [ -e {locked} ]; do sleep 0.005; done", priority=2),
        shell_job("true", priority=1)])
    p3s.pilot("-p", "0")
    holder.join(20)
    p3s.wait_jobs([first, reserve], timeout=20)
    job = p3s.job(reserve)
    assert job["state"] == "finished" and job["ts_dis"] < released[0] - 1.5, "claimed as a reserve"
    assert job["ts_sto"] < released[0] - 1.5, ("dated when the server heard", job["ts_sto"] - released[0])


def test_a_pilot_without_pidfds_reaps_its_reserve_once_the_answer_is_in(p3s):
    """RHEL 8's kernel (4.18) has no pidfd: the pilot then reaps a reserve after the answer to
    the report before it, as a longer one is, and a run of short jobs goes as it does elsewhere:
    each once, one request a job."""
    ran = p3s.dir / "ran.txt"
    uuids = p3s.submit([shell_job(f'echo "$P3S_JOB_UUID" >> {ran}') for _ in range(30)])
    before = counter(p3s, "http_requests")
    without_pidfds = "import os, runpy; del os.pidfd_open; runpy.run_module('pilot', run_name='__main__', alter_sys=True)"
    pilot = subprocess.run([sys.executable, "-S", "-c", without_pidfds, "-c", "30", "-p", "0", "-b", "30", "-L", p3s.logs],
                           env=p3s.env, cwd=p3s.dir, capture_output=True, text=True, timeout=60)
    assert pilot.returncode == 0, pilot.stderr[-2000:]
    assert counter(p3s, "http_requests") - before - 1 <= 30 + 3
    assert {s["state"] for s in p3s.api.job_states(uuids).values()} == {"finished"}
    assert sorted(runs_logged(ran)) == sorted(uuids)


@pytest.mark.parametrize("told", ["drain", "SIGUSR1"])
def test_a_pilot_told_to_finish_among_short_jobs_leaves_no_job_held_and_none_runs_twice(p3s, told):
    """Told to finish (the server's drain, or SIGUSR1) while it runs short jobs with one in
    reserve, a pilot ends the one it runs and gives its reserve back as it was (no attempt used):
    another pilot runs every other job, each once."""
    ran = p3s.dir / "ran.txt"
    uuids = p3s.submit([shell_job(f'echo "$P3S_JOB_UUID" >> {ran}; sleep 0.02') for _ in range(80)])
    pilot = p3s.pilot("-p", "0")
    wait_until(lambda: len(runs_logged(ran)) >= 20, 20, what="20 jobs run")
    if told == "drain":
        p3s.api.mark_pilots("drain", uuid=p3s.api.list_pilots()[0]["uuid"])
    else:
        pilot.send_signal(signal.SIGUSR1)
    assert pilot.wait(30) == 0
    states = p3s.api.job_states(uuids)
    assert not [u for u, s in states.items() if s["state"] in ("dispatched", "running")], "a job left held"
    given_back = [u for u in uuids if any("reserve" in e["info"] for e in p3s.job(u)["events"])]
    assert len(given_back) <= 1 and all(p3s.job(u)["attempt"] == 1 for u in given_back)
    p3s.pilot("-p", "0")
    p3s.wait_jobs(uuids)
    missing = set(uuids) - set(runs_logged(ran))
    assert sorted(runs_logged(ran)) == sorted(uuids), [p3s.job(u) for u in missing]
    unfinished = [p3s.job(u) for u, s in p3s.api.job_states(uuids).items() if s["state"] != "finished"]
    assert not unfinished, [(j["state"], j["errmsg"], j["events"]) for j in unfinished]


def test_a_pilot_killed_among_short_jobs_loses_only_the_job_it_ran(start_server):
    """kill -9 of a pilot with a job in reserve: when its lease runs out, the job it ran ends
    pilotTO and its reserve goes back as it was (attempt 1); a second pilot runs the rest once."""
    p3s = start_server(["--lease-beats", "6"])      # lease: 6 x 0.5 s
    ran = p3s.dir / "ran.txt"
    uuids = p3s.submit([shell_job(f'echo "$P3S_JOB_UUID" >> {ran}; sleep 0.02') for _ in range(60)])
    pilot = p3s.pilot("-p", "0")
    wait_until(lambda: len(runs_logged(ran)) >= 20, 20, what="20 jobs run")
    pilot.send_signal(signal.SIGKILL)
    pilot.wait(10)
    wait_until(lambda: not [s for s in p3s.api.job_states(uuids).values() if s["state"] in ("dispatched", "running")],
               15, what="the lease to free the dead pilot's jobs")
    lost = [u for u, s in p3s.api.job_states(uuids).items() if s["state"] == "pilotTO"]
    assert len(lost) <= 1, f"{len(lost)} jobs ended pilotTO: a reserve never started was taken as run"
    p3s.pilot("-p", "0")
    p3s.wait_jobs(uuids)
    logged = runs_logged(ran)
    assert len(logged) == len(set(logged)), "a job ran twice"
    assert {u for u, s in p3s.api.job_states(uuids).items() if s["state"] == "finished"} == set(uuids) - set(lost)


def stopped(pid):
    """Whether a process is stopped (SIGSTOP): the state letter in /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_pilot_paused_past_its_lease_never_starts_the_reserve_given_away(start_server):
    """A pilot paused (SIGSTOP, as its own payload does here) right after it claimed a job in
    reserve, past its lease: the server gives the reserve back and a second pilot runs it.
    Resumed, the first pilot must not start it from memory, whichever answer ends its silence
    first (its heartbeat's, or its own report's): the reserve runs once."""
    p3s = start_server(["--lease-beats", "4"])      # lease: 4 x 0.5 s
    ran = p3s.dir / "ran.txt"
    log_run = f'echo "$P3S_JOB_UUID" >> {ran}'
    first, pauser, reserve = p3s.submit([shell_job(log_run, priority=3),
                                         shell_job(f"{log_run}; kill -STOP $PPID", priority=2),
                                         shell_job(log_run, priority=1)])
    paused = p3s.pilot("-p", "0")
    wait_until(lambda: stopped(paused.pid), 20, what="the pilot paused by its payload")
    assert p3s.job(reserve)["state"] == "dispatched", "the pausing job's claim kept one in reserve"
    wait_until(lambda: p3s.job(reserve)["state"] == "defined", 20, what="the lease to give the reserve back")
    second = p3s.pilot("-p", "0")
    wait_until(lambda: p3s.job(reserve)["state"] == "finished", 20, what="the second pilot to run the reserve")
    second.send_signal(signal.SIGTERM)
    second.wait(20)
    paused.send_signal(signal.SIGCONT)
    time.sleep(3)       # resumed: its heartbeat and its pausing job's end report go out now
    paused.send_signal(signal.SIGTERM)
    paused.wait(20)
    assert sorted(runs_logged(ran)) == sorted([first, pauser, reserve]), "a job ran twice, or not at all"
    assert p3s.job(pauser)["state"] == "pilotTO"
