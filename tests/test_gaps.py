"""Tests for breaks that once went unnoticed (found by mutation testing): each fails when the
behaviour it names is broken, through the real tools."""
import os

import pytest

from conftest import alive, shell_job, wait_until
from serverAPI import P3SError


def test_a_payloads_background_child_dies_when_the_payload_exits(p3s):
    """The pilot kills what is left of the payload's process group once the payload exits."""
    child = p3s.dir / "child.pid"
    [uuid] = p3s.submit([shell_job(f"sleep 60 & echo $! > {child}; exit 0")])
    pilot = p3s.pilot("-p", "1")                 # it lives on: its exit would kill the child too
    p3s.wait_jobs([uuid], timeout=20)
    assert p3s.job(uuid)["state"] == "finished"
    pid = int(child.read_text())
    wait_until(lambda: not alive(pid), 3, what="the payload's background child to be killed")
    assert pilot.poll() is None


def test_a_report_for_another_attempt_is_refused_while_the_job_runs(p3s):
    """The state alone cannot refuse it (the job is running): the attempt number must."""
    api = p3s.api
    [uuid] = p3s.submit([shell_job("true", max_attempts=3)])
    pilot = api.register_pilot(heartbeat=1)["uuid"]
    assert api.request_job(pilot, 0)["job"]["uuid"] == uuid
    api.report(uuid, {"pilot": pilot, "attempt": 1, "state": "running", "pid": 7, "runtime": 0.1})
    for attempt in (2, 3):
        with pytest.raises(P3SError) as refused:
            api.report(uuid, {"pilot": pilot, "attempt": attempt, "state": "failed", "exit_code": 1,
                              "runtime": 0.2}, retry_for=0)
        assert refused.value.status == 409 and "stale" in str(refused.value)
    job = api.get_job(uuid)
    assert (job["state"], job["attempt"]) == ("running", 1), "a report for another attempt changed the job"


def test_priority_orders_the_claim_across_site_bound_and_free_jobs(p3s):
    """A job tied to the pilot's site and one for any site compete by priority, then age."""
    p3s.api.define_site("np04")
    low, mid = p3s.submit([shell_job("true", name="low", site="np04", priority=1),
                           shell_job("true", name="mid", site="np04", priority=5)])
    [high] = p3s.submit([shell_job("true", name="high", priority=9)])     # younger, but first
    p3s.run("pilot.py", "-s", "np04", "-c", "3", "-p", "1", "-L", p3s.logs)
    order = sorted((p3s.job(u)["ts_dis"], p3s.job(u)["name"]) for u in (low, high, mid))
    assert [name for _, name in order] == ["high", "mid", "low"]


def test_workflow_list_shows_the_dags_and_workflows(p3s):
    from conftest import COMPAT
    assert p3s.run("workflow.py", "-g", os.path.join(COMPAT, "3filters.graphml")).returncode == 0
    uuid = p3s.run("workflow.py", "-a", "3filters", "-n", "nightly").stdout.strip()
    listing = p3s.run("workflow.py", "--list")
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert lines[0] == "DAGs:" and any(line.split()[0] == "3filters" for line in lines[1:])
    assert any(uuid in line and "nightly" in line for line in lines), listing.stdout
