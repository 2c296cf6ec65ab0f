"""Exactly once, at the edges: a submission of any size is stored whole or not at all, its id
answers "was it stored?", and a replayed end report never hands a pilot a second job."""
import json
import sqlite3

import pytest

from conftest import shell_job, wait_until
from serverAPI import P3SError


def jobs(n, tag="x"):
    return [dict(shell_job("true", name=f"{tag}{i}"), uuid=__import__("uuid").uuid4().hex) for i in range(n)]


def test_a_submission_in_parts_is_stored_whole_or_not_at_all(tmp_path, start_server):
    """Parts staged, then the server killed -9 before the commit: nothing is stored, the
    submission says so, the commit is refused naming the missing part; the rerun stores it once."""
    server = start_server()
    api, sid = server.api, "6f1b2c3d-0000-4000-8000-000000000001"
    batch = jobs(3000)
    for part in range(2):       # 2 of 3 parts, then the server dies
        api.call("PUT", f"/api/submissions/{sid}/part", {"part": part, "jobs": batch[part * 1000:(part + 1) * 1000]})
    assert api.list_jobs() == [], "a staged part is visible before the commit"
    server.kill9()
    server.start()
    result = server.run("job.py", "--submission", sid)
    assert result.returncode == 0 and "not stored: 2 part(s) staged" in result.stdout, result.stdout
    with pytest.raises(P3SError, match="part.s. 2 of 3 not staged"):
        server.api.call("POST", f"/api/submissions/{sid}/commit", {"parts": 3}, retry_for=0)
    assert server.api.list_jobs() == []
    path = tmp_path / "big.json"
    path.write_text(json.dumps([shell_job("true", name=f"y{i}") for i in range(2500)]))
    ran = server.run("job.py", "-j", path)
    assert ran.returncode == 0 and len(ran.stdout.split()) == 2500, ran.stderr
    assert len(server.api.list_jobs(limit=10000)) == 2500, "stored once, whole"


def test_job_py_stores_a_big_file_whole_or_not_at_all_when_a_later_part_is_refused(p3s, tmp_path):
    """From the client's side: job.py sends 2,500 jobs as three parts, and the server refuses
    the third (a priority past its bounds, which only the server checks). job.py exits 2 naming
    the field, and not one job is stored: the first two parts were staged, never committed."""
    batch = [shell_job("true", name=f"z{i}") for i in range(2500)]
    batch[2200]["priority"] = 10 ** 30
    path = tmp_path / "big.json"
    path.write_text(json.dumps(batch))
    result = p3s.run("job.py", "-j", path)
    assert result.returncode == 2 and "priority" in result.stderr, (result.returncode, result.stderr)
    assert p3s.api.list_jobs(limit=10000) == [], "part of the file was stored"


def test_a_blind_rerun_of_a_submitted_file_is_refused_naming_its_submission(p3s, tmp_path):
    """Its answer lost, a user runs job.py -j again: every job would be stored twice. job.py says
    when the file was submitted and as which submission, stores nothing, and submits anew only
    with --again; other input files make other jobs, which go at once."""
    path = tmp_path / "dqm.json"
    path.write_text(json.dumps([shell_job("true", name="a"), shell_job("true", name="b")]))
    first = p3s.run("job.py", "-j", path, "-f", "run5010.root")
    assert first.returncode == 0 and len(first.stdout.split()) == 2, first.stderr
    again = p3s.run("job.py", "-j", path, "-f", "run5010.root")
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert "were submitted at" in again.stderr and "(2 job(s))" in again.stderr and "--again" in again.stderr
    assert len(p3s.api.list_jobs()) == 2, "the rerun stored something"
    assert p3s.run("job.py", "-j", path, "-f", "run5011.root").returncode == 0, "another file is new work"
    assert p3s.run("job.py", "-j", path, "-f", "run5010.root", "--again").returncode == 0
    assert len(p3s.api.list_jobs()) == 6


def test_a_lost_commit_answer_can_be_asked_about_and_a_repeated_commit_stores_nothing_twice(p3s):
    api, sid = p3s.api, "6f1b2c3d-0000-4000-8000-000000000002"
    batch = jobs(1500)
    for part in range(2):
        api.call("PUT", f"/api/submissions/{sid}/part", {"part": part, "jobs": batch[part * 1000:(part + 1) * 1000]})
    first = api.call("POST", f"/api/submissions/{sid}/commit", {"parts": 2})
    again = api.call("POST", f"/api/submissions/{sid}/commit", {"parts": 2})      # the answer was lost
    assert first == again == {"submission": sid, "state": "committed", "jobs": 1500}
    assert len(api.list_jobs(limit=10000)) == 1500
    result = p3s.run("job.py", "--submission", sid)
    assert result.stdout.strip() == f"submission {sid}: stored: 1500 job(s)"
    with pytest.raises(P3SError, match="3 parts are staged for submission .*, not 2"):
        extra = "6f1b2c3d-0000-4000-8000-000000000004"
        for part in range(3):
            api.call("PUT", f"/api/submissions/{extra}/part", {"part": part, "jobs": jobs(1, f"e{part}")})
        api.call("POST", f"/api/submissions/{extra}/commit", {"parts": 2})
    with pytest.raises(P3SError, match="already committed"):
        api.call("PUT", f"/api/submissions/{sid}/part", {"part": 0, "jobs": jobs(1)})
    nothing = p3s.run("job.py", "--submission", "6f1b2c3d-0000-4000-8000-00000000dead")
    assert "not stored: nothing under this id" in nothing.stdout


def test_staged_parts_never_committed_expire(p3s):
    sid = "6f1b2c3d-0000-4000-8000-000000000003"
    p3s.api.call("PUT", f"/api/submissions/{sid}/part", {"part": 0, "jobs": jobs(5)})
    conn = sqlite3.connect(p3s.db, timeout=30)
    with conn:
        conn.execute("UPDATE staged SET ts = ts - 7200")
    conn.close()
    wait_until(lambda: p3s.api.get_submission(sid)["state"] == "none", 10, what="the staged part to expire")


def test_job_py_says_nothing_was_stored_when_no_request_reached_the_server(p3s):
    path = p3s.dir / "one.json"
    path.write_text(json.dumps(shell_job("true")))
    p3s.stop()
    result = p3s.run("job.py", "-j", path, env=dict(p3s.env, P3S_RETRY_FOR="1"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 2, result.stderr
    assert lines[0].startswith(f"job.py: server not reachable at {p3s.url}") and "retrying for 1 s" in lines[0]
    assert lines[1].endswith("nothing was stored") and result.stdout == ""


def test_job_py_names_the_submission_when_its_answer_is_lost(p3s):
    """A server that takes the request and hangs up: the jobs may be stored, and the submission
    id lets the user ask, instead of guessing."""
    import contextlib
    import socket
    import threading
    path = p3s.dir / "one.json"
    path.write_text(json.dumps(shell_job("true")))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def hang_up():
        with contextlib.suppress(OSError):      # until the test closes the listener
            for _ in range(5):
                conn, _ = listener.accept()
                conn.recv(65536)
                conn.close()
    threading.Thread(target=hang_up, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    result = p3s.run("job.py", "-j", path, env=dict(p3s.env, P3S_SERVER=url, P3S_RETRY_FOR="0"))
    listener.close()
    assert result.returncode == 1 and "is stored whole or not at all: `job.py --submission" in result.stderr


def test_a_replayed_end_report_never_gives_a_running_pilot_a_second_job(p3s):
    api = p3s.api
    pilot = api.register_pilot(heartbeat=1)["uuid"]
    first, second, third = p3s.submit([shell_job("true", name=n) for n in ("a", "b", "c")])
    assert api.request_job(pilot, 0)["job"]["uuid"] == first
    end = {"pilot": pilot, "attempt": 1, "state": "finished", "exit_code": 0, "runtime": 0.1, "next": True}
    assert api.report(first, end)["next"]["job"]["uuid"] == second
    api.report(second, {"pilot": pilot, "attempt": 1, "state": "running", "pid": 7, "runtime": 0.1})
    replay = api.report(first, end)                     # the first answer was lost
    assert replay["next"]["job"] is None
    assert api.get_job(third)["state"] == "defined", "the pilot was handed a second job while it runs one"


def test_a_library_caller_submits_in_parts_without_giving_uuids(p3s):
    """bench/ and scripts call Client.submit_jobs with plain job objects: parts need uuids (a
    retried part must not store a job twice), so the client gives each one."""
    uuids = p3s.api.submit_jobs([shell_job("true")] * 1500)
    assert len(set(uuids)) == 1500 and len(p3s.api.list_jobs(limit=10000)) == 1500


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
