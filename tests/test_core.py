"""The core path: submit with job.py, run with pilot.py, exactly once, in the right order."""
import json
import os
from collections import Counter

from conftest import ROOT, alive, fresh_copy, readme_block, run_readme, shell_job, wait_until


def test_readme_example_runs_once_and_finishes(p3s):
    submitted = p3s.run("job.py", "-j", os.path.join(ROOT, "examples", "myjob.json"))
    assert submitted.returncode == 0, submitted.stderr
    [uuid] = submitted.stdout.split()
    pilot = p3s.run("pilot.py", "-c", "1", "-p", "5", "-b", "1", "-L", p3s.logs)
    assert pilot.returncode == 0, pilot.stderr
    job = p3s.job(uuid)
    assert job["state"] == "finished" and job["exit_code"] == 0
    assert f"hello from job {uuid}" in job["stdout_tail"]
    assert job["stdout_path"].startswith(str(p3s.logs) + "/")
    assert open(job["stdout_path"]).read().startswith(f"hello from job {uuid}")
    assert [e["new"] for e in job["events"]] == ["defined", "dispatched", "running", "finished"]
    stamps = [e["ts"] for e in job["events"]]
    assert stamps == sorted(stamps) and abs(job["ts_sta"] - stamps[2]) < 1, "each transition at its own time"
    listing = p3s.run("job.py", "--list")
    assert uuid in listing.stdout and "finished" in listing.stdout


def test_compat_job_files_submit_unchanged(p3s):
    for name in ("job_template1.json", "simplejob1.json", "threeSimpleJobs.json"):
        path = os.path.join(ROOT, "tests", "compat", name)
        result = p3s.run("job.py", "-j", path)
        assert result.returncode == 0, f"{name}: {result.stderr}"
        expected = len(json.load(open(path)))
        uuids = result.stdout.split()
        assert len(uuids) == expected
        job = p3s.job(uuids[0])
        assert job["timelimit"] == 100 and job["priority"] == 1 and job["jobtype"] == "type1"


def test_twenty_pilots_run_five_hundred_jobs_exactly_once(p3s):
    ledger = p3s.dir / "ledger"
    uuids = p3s.submit([shell_job(f'echo "$P3S_JOB_UUID" >> {ledger}')] * 500)
    assert len(set(uuids)) == 500
    for _ in range(20):
        p3s.pilot("-p", "2", "--max-idle", "60")
    states = p3s.wait_jobs(uuids, timeout=300)
    assert Counter(s["state"] for s in states.values()) == {"finished": 500}
    runs = Counter(ledger.read_text().split())
    assert set(runs) == set(uuids), "a payload never ran"
    assert max(runs.values()) == 1, "a payload ran twice"
    pilots = p3s.api.list_pilots()
    assert sum(p["jobs_done"] for p in pilots) == 500


def test_priority_then_age_order(p3s):
    ledger = p3s.dir / "order"
    jobs = [shell_job(f"echo {name} >> {ledger}", name=name, priority=prio)
            for name, prio in (("low1", 1), ("high", 9), ("low2", 1), ("mid", 5))]
    uuids = p3s.submit(jobs)
    p3s.run("pilot.py", "-c", "4", "-p", "1", "-L", p3s.logs)
    p3s.wait_jobs(uuids)
    assert ledger.read_text().split() == ["high", "mid", "low1", "low2"]


def test_jobtype_and_site_matching(p3s):
    a, b, s = p3s.submit([shell_job("true", jobtype="reco"), shell_job("true", jobtype="dqm"),
                          shell_job("true", jobtype="reco", site="cern")])
    p3s.run("pilot.py", "--jobtype", "reco", "-c", "3", "-p", "0.5", "-L", p3s.logs)
    assert p3s.job(a)["state"] == "finished"
    assert p3s.job(b)["state"] == "defined", "a reco pilot took a dqm job"
    assert p3s.job(s)["state"] == "defined", "a pilot without a site took a site-bound job"
    p3s.api.define_site("cern")
    p3s.run("pilot.py", "-s", "cern", "--jobtype", "reco", "-c", "1", "-p", "0.5", "-L", p3s.logs)
    assert p3s.job(s)["state"] == "finished"


def test_idle_pilot_gets_new_job_without_waiting_a_period(p3s):
    p3s.pilot("-p", "25")
    wait_until(lambda: p3s.waiting_requests() == 1, 10, what="the pilot's long poll")
    [uuid] = p3s.submit([shell_job("true")])
    p3s.wait_jobs([uuid], timeout=20)
    job = p3s.job(uuid)
    assert job["state"] == "finished"
    assert job["ts_dis"] - job["ts_def"] < 5.0, "the job waited for a 25 s poll"


def test_job_env_and_input_file_reach_the_payload(p3s):
    out = p3s.dir / "env.txt"
    job = shell_job(f'echo "$P3S_JOB_UUID $P3S_PILOT_UUID $P3S_INPUT_FILE $MYVAR" > {out}',
                    env={"P3S_EXECMODE": "SHELL", "MYVAR": "42"})
    path = p3s.dir / "j.json"
    path.write_text(json.dumps(job))
    [uuid] = p3s.run("job.py", "-j", path, "-f", "/data/run1.root").stdout.split()
    p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs)
    job_uuid, pilot_uuid, infile, myvar = out.read_text().split()
    assert job_uuid == uuid and infile == "/data/run1.root" and myvar == "42"
    assert pilot_uuid == p3s.job(uuid)["pilot"]


def test_path_payload_with_params(p3s):
    script = p3s.dir / "payload.sh"
    script.write_text('#!/bin/sh\necho "args: $1 $2"\n')
    script.chmod(0o755)
    [uuid] = p3s.submit([{"payload": str(script), "params": "alpha 'beta gamma'"}])
    p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs)
    assert p3s.job(uuid)["stdout_tail"] == "args: alpha beta gamma\n"


def test_replicas_wait_and_exit_codes(p3s):
    ok = p3s.dir / "ok.json"
    ok.write_text(json.dumps(shell_job("true")))
    p3s.pilot("-p", "1", "--max-idle", "30")
    result = p3s.run("job.py", "-j", ok, "-N", "3", "--wait")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6 and all(line.endswith("finished 0") for line in lines[3:])
    bad = p3s.dir / "bad.json"
    bad.write_text(json.dumps(shell_job("echo 'ERROR: RawDecoder: no frames' >&2; exit 3")))
    result = p3s.run("job.py", "-j", bad, "--wait")
    assert result.returncode == 3, "a failed job must be told apart from a network failure (1)"
    assert result.stdout.strip().splitlines()[-1].endswith("failed 3 ERROR: RawDecoder: no frames")


def test_adjust_priority_cancel_and_delete(p3s):
    held, other = p3s.submit([shell_job("true", state="template"), shell_job("true")])
    result = p3s.run("job.py", "-a", "-u", other, "-P", "7")
    assert result.returncode == 0 and p3s.job(other)["priority"] == 7
    assert p3s.run("job.py", "-a", "-u", other, "-s", "cancelled").returncode == 0
    assert p3s.job(other)["state"] == "cancelled"
    p3s.run("pilot.py", "-c", "1", "-p", "0.5", "-L", p3s.logs)
    assert p3s.job(held)["state"] == "template", "a held job ran"
    assert p3s.run("job.py", "-a", "-u", held, "-s", "defined").returncode == 0
    p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs)
    assert p3s.job(held)["state"] == "finished"
    assert p3s.run("job.py", "-d", "-u", other).returncode == 0
    shown = p3s.run("job.py", "--show", other)
    assert shown.returncode == 2 and "no such job" in shown.stderr


def test_cancelling_a_running_job_kills_its_payload(p3s):
    pidfile = p3s.dir / "pid"
    [uuid] = p3s.submit([shell_job(f"echo $$ > {pidfile}; exec sleep 60")])
    p3s.pilot("-p", "1")
    wait_until(lambda: p3s.job(uuid)["state"] == "running" and pidfile.exists() and pidfile.read_text().strip(),
               10, what="running")
    assert p3s.run("job.py", "-a", "-u", uuid, "-s", "cancelled").returncode == 0
    pid = int(pidfile.read_text())
    wait_until(lambda: not alive(pid), 10, what="the cancelled payload to die")
    assert p3s.job(uuid)["state"] == "cancelled"


def test_site_defaults_apply_unless_overridden(p3s):
    defined = p3s.run("pilot.py", "--define-site", "-s", "np04", "-c", "1", "-p", "1", "-b", "0.5",
                      "--site-env", "DETECTOR=np04")
    assert defined.returncode == 0, defined.stderr
    out = p3s.dir / "site.txt"
    [uuid] = p3s.submit([shell_job(f"echo $DETECTOR > {out}")])
    result = p3s.run("pilot.py", "-s", "np04", "-L", p3s.logs, timeout=30)   # cycles 1 from the site
    assert result.returncode == 0
    assert out.read_text().strip() == "np04"
    [pilot] = p3s.api.list_pilots()
    assert pilot["heartbeat"] == 0.5 and pilot["state"] == "stopped"
    assert "np04" in p3s.run("pilot.py", "--sites").stdout


def test_verify_import_checks_server_and_token(p3s):
    result = p3s.run("verifyImport.py")
    assert result.returncode == 0, result.stderr
    assert "OK sqlite" in result.stdout and "OK token accepted" in result.stdout
    assert result.stdout.strip().endswith("Success")
    wrong = dict(p3s.env, P3S_TOKEN="wrong")
    result = p3s.run("verifyImport.py", env=wrong)
    assert result.returncode == 1 and "wrong token" in result.stderr
    missing = dict(p3s.env, P3S_TOKEN_FILE=str(p3s.dir / "no-such-token"))
    result = p3s.run("verifyImport.py", env=missing)
    assert result.returncode == 1 and "FAILED token file" in result.stderr and "Traceback" not in result.stderr


def test_readme_setup_command_verbatim_in_a_fresh_copy(tmp_path):
    """The first command a new user runs, exactly as the README gives it."""
    import re
    env = fresh_copy(tmp_path)
    result = run_readme(tmp_path, env, readme_block("## Set up"))
    assert result.returncode == 0, result.stderr
    assert re.search(r"finished\s+default\s+1\s+0\s+hello p3s", result.stdout), result.stdout
    assert (tmp_path / "p3s.db").exists() and (tmp_path / "p3s.token").exists()


def test_readme_lxplus_setup_verbatim_puts_the_database_on_local_disk(tmp_path):
    """The AFS-clone variant of the set-up line: database and token under /var/tmp/$USER."""
    import re
    import shutil
    env = fresh_copy(tmp_path)
    env["USER"] = f"p3s-test-{os.getpid()}"
    local = os.path.join("/var/tmp", env["USER"])
    try:
        block = readme_block("the same line becomes:")
        result = run_readme(tmp_path, env, block)
        assert result.returncode == 0, result.stderr
        assert re.search(r"finished\s+default\s+1\s+0\s+hello p3s", result.stdout), result.stdout
        assert os.path.exists(os.path.join(local, "p3s.db")) and not (tmp_path / "p3s.db").exists()
    finally:
        shutil.rmtree(local, ignore_errors=True)


def test_readme_workflow_example_verbatim(tmp_path):
    env = fresh_copy(tmp_path)
    result = run_readme(tmp_path, env, "python server.py 2>/dev/null &\n" + readme_block("Try it (with the server running)"))
    assert result.returncode == 0, result.stderr
    assert "3filters (dag 3filters): finished" in result.stdout
    assert result.stdout.split()[-3:] == ["2", "1", "1"]


def test_a_noop_job_finishes_without_a_pilot(p3s):
    [uuid] = p3s.submit([{"payload": "noop", "jobtype": "noop"}])
    job = p3s.job(uuid)
    assert job["state"] == "finished" and job["exit_code"] == 0 and job["pilot"] is None


def test_retention_purges_what_ended_long_ago(tmp_path, start_server):
    import sqlite3
    server = start_server(["--retention-days", "7"])
    old, recent, waiting = server.submit([shell_job("true"), shell_job("true"), shell_job("true", jobtype="x")])
    server.run("pilot.py", "-c", "2", "-p", "1", "--jobtype", "default", "-L", server.logs)
    db = sqlite3.connect(server.db)
    with db:
        db.execute("UPDATE jobs SET ts_sto = ts_sto - 8 * 86400 WHERE uuid=?", (old,))
        db.execute("UPDATE pilots SET ts_beat = ts_beat - 8 * 86400")
    db.close()
    wait_until(lambda: [j["uuid"] for j in server.api.list_jobs()] == [waiting, recent], 10,
               what="the old job to be purged")
    assert server.api.list_pilots() == []
    summary = server.api.call("GET", "/?format=json")
    assert summary["jobs_by_state"] == {"finished": 1, "defined": 1}, "counts not kept with the purge"
    assert server.run("job.py", "--show", old).returncode == 2


def test_a_job_only_the_last_waiting_pilot_may_take_still_starts_at_once(p3s):
    """Submissions wake one waiting pilot per job; a pilot woken for a job it may not take passes
    the wake-up on, so the one pilot that may take it gets it now, not after its poll period."""
    for _ in range(5):
        p3s.pilot("-p", "25", "--jobtype", "reco")
    wait_until(lambda: sum(p["state"] == "no jobs" for p in p3s.api.list_pilots()) == 5, 20, what="5 idle")
    p3s.pilot("-p", "25", "--jobtype", "calib")
    wait_until(lambda: p3s.waiting_requests() == 6, 20, what="6 long polls waiting")
    calib, reco = p3s.submit([shell_job("true", jobtype="calib"), shell_job("true", jobtype="reco")])
    p3s.wait_jobs([calib, reco], timeout=20)
    for uuid in (calib, reco):      # a wake-up lost, the calib job would wait out a 25 s poll
        job = p3s.job(uuid)
        assert job["state"] == "finished" and job["ts_dis"] - job["ts_def"] < 5.0, "a job waited for a poll"


def test_a_wake_up_meant_for_a_pilot_that_left_goes_to_a_live_one(p3s):
    """A stopped pilot's long poll still waits on the server (nobody told it the socket
    closed); woken for a new job, it finds its pilot gone and must pass the wake-up on, or the
    job waits a whole poll period for the live pilot."""
    gone = p3s.pilot("-p", "25")
    wait_until(lambda: p3s.waiting_requests() == 1, 10, what="the first pilot's long poll")
    gone.terminate()
    gone.wait(10)
    p3s.pilot("-p", "25")
    wait_until(lambda: p3s.waiting_requests() == 2, 10, what="the live pilot's long poll beside the stale one")
    [uuid] = p3s.submit([shell_job("true")])
    p3s.wait_jobs([uuid], timeout=20)
    job = p3s.job(uuid)
    assert job["state"] == "finished" and job["ts_dis"] - job["ts_def"] < 5.0, "the job waited for a 25 s poll"


def test_server_py_runs_alone_copied_anywhere(tmp_path):
    """server.py needs none of the other files: copied by itself, it starts and answers."""
    import shutil
    import subprocess
    import sys
    import urllib.request
    shutil.copy(os.path.join(ROOT, "server.py"), tmp_path / "server.py")
    proc = subprocess.Popen([sys.executable, "server.py", "--port", "0"], cwd=tmp_path,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = next((line for line in proc.stderr if "serving on" in line), "")
        assert line, f"server.py alone did not start (exit {proc.wait()})"
        url = line.split("serving on ")[1].split()[0]
        with urllib.request.urlopen(url + "/api/health", timeout=5) as answer:
            assert json.load(answer)["ok"] is True
        assert (tmp_path / "p3s.db").exists() and (tmp_path / "p3s.token").exists()
    finally:
        proc.terminate()
        proc.wait(10)
