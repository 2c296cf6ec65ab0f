"""Dispatch at scale, as the pilot and server do it: one request per short job (its end report
claims the next), both transitions recorded for a job that ended before its running report."""
import time

from conftest import shell_job, wait_until


def counter(p3s, name):
    return p3s.api.call("GET", "/metrics", query={"format": "json"})["counters"][name]


def test_a_busy_pilot_needs_one_request_per_short_job(p3s):
    uuids = p3s.submit([shell_job("true") for _ in range(30)])
    before = counter(p3s, "http_requests")
    assert p3s.run("pilot.py", "-c", "30", "-p", "0", "-b", "30", "-L", p3s.logs).returncode == 0
    served = counter(p3s, "http_requests") - before - 1         # less our own /metrics read
    assert served <= 30 + 3, f"{served} requests for 30 jobs (register, 1 claim, 30 end reports, stop)"
    assert all(s["state"] == "finished" for s in p3s.api.job_states(uuids).values())


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


def test_priority_orders_the_claim_across_site_bound_and_free_jobs(p3s):
    """A job tied to the pilot's site and one for any site compete by priority, then age."""
    p3s.api.define_site("np04")
    low, mid = p3s.submit([shell_job("true", name="low", site="np04", priority=1),
                           shell_job("true", name="mid", site="np04", priority=5)])
    [high] = p3s.submit([shell_job("true", name="high", priority=9)])     # younger, but first
    p3s.run("pilot.py", "-s", "np04", "-c", "3", "-p", "1", "-L", p3s.logs)
    order = sorted((p3s.job(u)["ts_dis"], p3s.job(u)["name"]) for u in (low, high, mid))
    assert [name for _, name in order] == ["high", "mid", "low"]
