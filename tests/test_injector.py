"""injector.py: settled files only, exactly one workflow (or job set) per file, whatever runs twice."""
import json
import os
import subprocess
import sys
import time
from collections import Counter

from conftest import ROOT, SHELL, graphml, register, shell_job, wait_until


def injector(p3s, *args, wait=True):
    command = [sys.executable, os.path.join(ROOT, "injector.py"), *map(str, args)]
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=120, env=p3s.env, cwd=p3s.dir)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=p3s.env,
                            cwd=p3s.dir)


def setup_dag(p3s):
    register(p3s, "dqm", graphml([("src", "noop", ""), ("check", "dqm", "wc -l < $RAW > $REPORT", SHELL),
                                  ("snk", "noop", "")],
                                 [("src", "check", "raw.txt", "RAW"), ("check", "snk", "report.txt", "REPORT")]))


def test_one_workflow_per_file_across_restarts(p3s):
    setup_dag(p3s)
    incoming = p3s.dir / "incoming"
    incoming.mkdir()
    for i in range(3):
        (incoming / f"run{i}.txt").write_text("a\nb\n" * (i + 1))
    (incoming / "notes.log").write_text("ignored")
    args = ("-d", incoming, "-g", "run*.txt", "--dag", "dqm", "--settle", "0.2", "-p", "0.3", "-c", "3")
    first = injector(p3s, *args)
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.splitlines()) == 3
    (incoming / "run3.txt").write_text("x\n")
    second = injector(p3s, *args)                      # a restart: only the new file is started
    assert [line.split()[0] for line in second.stdout.splitlines()] == [str(incoming / "run3.txt")]
    workflows = p3s.api.list_workflows()
    assert len(workflows) == 4 and all(w["state"] in ("defined", "running") for w in workflows)
    p3s.pilot("-p", "1", "--max-idle", "30")
    wait_until(lambda: all(w["state"] == "finished" for w in p3s.api.list_workflows()), 60, what="workflows")
    report = next(d for d in p3s.api.get_workflow(workflows[-1]["uuid"])["datasets"] if d["datatag"] == "REPORT")
    assert report["name"] == "run0_REPORT.txt"
    assert open(os.path.join(report["dirpath"], report["name"])).read().strip() == "2"
    from test_pages import get
    assert get(p3s, f"/workflow/{workflows[-1]['uuid']}").count("<rect") == 3
    injected = p3s.api.list_datasets(origin="injected")
    assert sorted(d["name"] for d in injected) == ["run0.txt", "run1.txt", "run2.txt", "run3.txt"]


def test_two_injectors_on_one_directory_start_each_file_once(p3s):
    setup_dag(p3s)
    incoming = p3s.dir / "incoming"
    incoming.mkdir()
    args = ("-d", incoming, "--dag", "dqm", "--settle", "0.3", "-p", "0.1", "-c", "30")
    running = [injector(p3s, *args, wait=False) for _ in range(2)]
    for i in range(20):
        (incoming / f"f{i:02}.txt").write_text(f"{i}\n")
        time.sleep(0.02)
    outputs = [p.communicate(timeout=60) for p in running]
    assert all(p.returncode == 0 for p in running), [o[1] for o in outputs]
    started = Counter(line.split()[0] for out, _ in outputs for line in out.splitlines())
    assert len(started) == 20 and set(started.values()) == {1}
    assert len(p3s.api.list_workflows(limit=100)) == 20


def test_half_written_file_waits_until_it_settles(p3s):
    incoming = p3s.dir / "incoming"
    incoming.mkdir()
    job_file = p3s.dir / "job.json"
    job_file.write_text(json.dumps(shell_job('wc -c < "$P3S_INPUT_FILE"')))
    proc = injector(p3s, "-d", incoming, "-j", job_file, "--settle", "2.0", "-p", "0.2", "-c", "20", wait=False)
    growing = incoming / "big.dat"
    with open(growing, "w") as f:
        for _ in range(6):                              # keeps changing for ~1.2 s, never still for 2 s
            f.write("x" * 1000)
            f.flush()
            time.sleep(0.2)
            assert p3s.api.list_jobs() == [], "a file still being written was injected"
    wait_until(lambda: p3s.api.list_jobs(), 10, what="the settled file injected")
    proc.terminate()                            # a clean stop, as SIGTERM is
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    [job] = p3s.api.list_jobs()
    p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs)
    detail = p3s.job(job["uuid"])
    assert detail["infile"] == str(growing) and detail["env"]["P3S_INPUT_FILE"] == str(growing)
    assert detail["stdout_tail"].strip() == "6000"


def test_filters_and_bad_input(p3s):
    incoming = p3s.dir / "incoming"
    incoming.mkdir()
    (incoming / "small.txt").write_text("x")
    (incoming / "other_big.txt").write_text("x" * 100)
    (incoming / "raw_big.txt").write_text("x" * 100)
    old = incoming / "raw_old.txt"
    old.write_text("x" * 100)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(incoming / "raw_big.txt", (time.time() - 60, time.time() - 60))
    job_file = p3s.dir / "job.json"
    job_file.write_text(json.dumps(shell_job("true")))
    fresh = incoming / "raw_fresh.txt"
    fresh.write_text("x" * 100)
    os.utime(fresh, (time.time() + 600, time.time() + 600))     # "modified" in the future: too young
    result = injector(p3s, "-d", incoming, "-j", job_file, "--settle", "0", "-c", "1", "--min-size", "10",
                      "--prefix", "raw", "--max-age", "3600", "--min-age", "1")
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == [str(incoming / "raw_big.txt")]
    bad = injector(p3s, "-d", p3s.dir / "nowhere", "-j", job_file)
    assert bad.returncode == 2 and "not a directory" in bad.stderr
    (p3s.dir / "bad.json").write_text("{")
    bad = injector(p3s, "-d", incoming, "-j", p3s.dir / "bad.json", "-c", "1")
    assert bad.returncode == 2 and "malformed JSON" in bad.stderr
    bad = injector(p3s, "-d", incoming, "--dag", "nosuch", "-c", "1", "--settle", "0", "--min-size", "10")
    assert bad.returncode == 2 and "no such DAG" in bad.stderr


def test_files_from_a_commands_listing_and_from_a_daq_post_start_once_each(p3s, tmp_path):
    """A catalogue query's output, polled; a DAQ's POST when a file closes, with only the
    template (the work of the template's newest file, made anew); each file once per template."""
    jobs = tmp_path / "dqm.json"
    jobs.write_text(json.dumps([shell_job("true", jobtype="monitor"), shell_job("true", jobtype="purity")]))
    listing = tmp_path / "catalogue.txt"
    files = [f"/eos/np04/raw/np04_raw_run005060_000{i}.root" for i in (1, 2)]
    listing.write_text("total 2\n" + "".join(f"-rw-r--r-- 1 np04 2048 {f}\n" for f in files))
    args = ("--from-command", f"cat {listing}", "-j", jobs, "-p", "0.2", "-c", "2")
    assert injector(p3s, *args).returncode == 0
    assert injector(p3s, *args).returncode == 0                                     # a restart adds nothing
    listed = sorted((j["infile"], j["jobtype"]) for j in p3s.api.list_jobs(limit=100))
    assert listed == sorted((f, t) for f in files for t in ("monitor", "purity"))
    failing = injector(p3s, "--from-command", "echo catalogue down >&2; exit 3", "-j", jobs, "-p", "0.2", "-c", "2")
    assert failing.returncode == 0 and "exit code 3: catalogue down" in failing.stderr, "a failing listing stopped it"

    closed = {"name": "np04_raw_run005061_0001.root", "dirpath": "/eos/np04/raw", "template": f"jobs:{jobs}"}
    daq = p3s.add_user("daq", "expert")
    from conftest import Client
    client = Client(p3s.url, token_file=daq["P3S_TOKEN_FILE"])
    answer = client.call("POST", "/api/inject", closed)
    assert answer["registered"] and len(answer["jobs"]) == 2
    made = [p3s.job(u) for u in answer["jobs"]]
    assert sorted(j["jobtype"] for j in made) == ["monitor", "purity"]
    assert all(j["infile"] == "/eos/np04/raw/np04_raw_run005061_0001.root" and j["user"] == "daq" for j in made)
    assert client.call("POST", "/api/inject", closed)["registered"] is False, "a file posted twice started twice"
    try:
        client.call("POST", "/api/inject", dict(closed, template="jobs:/nowhere.json"))
        raise AssertionError("a template no file has was taken")
    except Exception as e:
        assert getattr(e, "status", None) == 400 and "no file has template" in str(e)
