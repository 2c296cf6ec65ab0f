"""What each job cost, measured by its pilot with real payloads, and limits that stop a runaway
with a reason a person understands."""
import json
import os
import re
import signal
import sys
import time

from conftest import shell_job, wait_until

PY = sys.executable


def run_jobs(p3s, jobs, *pilot_args):
    uuids = p3s.submit(jobs)
    p3s.run("pilot.py", "-c", str(len(jobs)), "-p", "1", "-L", p3s.logs, *pilot_args)
    return [p3s.job(u) for u in uuids]


def test_cpu_bound_and_sleeping_payloads_and_their_figures_everywhere(p3s):
    busy = f"{PY} -c \"import time; t = time.time()\nwhile time.time() - t < 1.5: pass\""
    writer = "head -c 3000000 /dev/zero > $P3S_JOB_DIR/out.dat; sleep 1.2"
    spin, sleeper, wrote = run_jobs(p3s, [shell_job(busy, jobtype="reco"), shell_job("sleep 1.5", jobtype="reco"),
                                          shell_job(writer, jobtype="reco")])
    wall = spin["ts_sto"] - spin["ts_sta"]
    assert (spin["cpu_user"] + spin["cpu_sys"]) / wall > 0.8, spin
    assert sleeper["cpu_user"] + sleeper["cpu_sys"] < 0.1 and sleeper["max_rss_mb"] > 0
    assert spin["max_rss_mb"] > 5, "a Python interpreter's resident memory was not seen"
    assert wrote["output_bytes"] == 3000000
    shown = json.loads(p3s.run("job.py", "--show", spin["uuid"], "--json").stdout)
    assert shown["cpu_user"] == spin["cpu_user"] and shown["max_rss_mb"] == spin["max_rss_mb"]
    page = p3s.page(f"/job/{spin['uuid']}")
    assert re.search(r"CPU (9\d|1\d\d) %", page) and "peak memory (MB)" in page
    assert re.search(r"<td>(9\d|1\d\d) %</td>", p3s.page("/jobs")), "the CPU efficiency column"
    metrics = p3s.page("/metrics")
    assert 'p3s_job_duration_seconds_count{jobtype="reco"} 3' in metrics
    assert 'p3s_job_peak_memory_megabytes_bucket{jobtype="reco",le="+Inf"} 3' in metrics
    cpu = float(re.search(r'p3s_job_cpu_seconds_total\{jobtype="reco"\} ([\d.]+)', metrics).group(1))
    assert 1.2 < cpu < 3.0
    profile = p3s.api.call("GET", "/jobtype/reco", query={"format": "json"})["profiles"]
    assert profile["memory"]["last_24h"]["n"] == 3 and profile["memory"]["last_24h"]["median"] > 0
    assert profile["cpu_eff"]["last_24h"]["n"] == 3


def test_a_short_job_reports_no_memory_it_did_not_use_and_no_cpu_share_it_cannot_measure(p3s):
    """/bin/true reported 24.4 MB, the pilot's own size (the kernel's peak of a child spawned from
    the pilot starts at the pilot's), and a CPU % of noise. Now no peak memory is claimed for it,
    and no CPU %, while a job that holds 60 MB for a second still reports them."""
    hold = f"{PY} -c \"import time; x = bytes(range(256)) * (60 * 4096); time.sleep(1.5)\""
    short, held = run_jobs(p3s, [shell_job("true", jobtype="tiny"), shell_job(hold, jobtype="tiny")])
    assert short["state"] == "finished" and short["max_rss_mb"] is None, short["max_rss_mb"]
    page = p3s.page(f"/job/{short['uuid']}")
    assert "peak memory" not in page and not re.search(r"CPU \d+ %", page), "a CPU share of noise"
    assert held["max_rss_mb"] > 55, held["max_rss_mb"]


def test_a_runaway_past_its_memory_limit_is_killed_with_its_children_and_a_reason(p3s):
    grow = f"{PY} -c \"import time; x = bytearray(300 * 2 ** 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(30)\""
    wrapper = f"echo wrapper; {grow}; echo never"              # the child allocates, under a shell
    alone, wrapped = run_jobs(p3s, [shell_job(grow, memory=200), shell_job(wrapper, memory=200, timeout=60)])
    for job in (alone, wrapped):
        assert job["state"] == "failed" and job["memory"] == 200
        assert re.fullmatch(r"used [\d,]+ MB, over its memory limit of 200 MB", job["reason"]), job["reason"]
        assert job["ts_sto"] - job["ts_sta"] < 10, "not killed promptly"
    assert "never" not in wrapped["stdout_tail"]
    refused = p3s.run("job.py", "-j", json.dumps(shell_job("true", memory="lots")))
    assert refused.returncode == 2 and "memory" in refused.stderr


def test_a_site_gives_its_jobs_a_default_memory_limit(p3s):
    p3s.api.define_site("np04", memory=150)
    grow = f"{PY} -c \"import time; x = bytearray(250 * 2 ** 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(30)\""
    [job] = p3s.submit([shell_job(grow, site="np04")])
    p3s.run("pilot.py", "-s", "np04", "-c", "1", "-p", "1", "-L", p3s.logs)
    assert p3s.job(job)["reason"].endswith("over its memory limit of 150 MB")


def test_a_sigkill_p3s_did_not_send_is_named_as_such(p3s):
    [uuid] = p3s.submit([shell_job("echo $$ > pid; exec sleep 30")])
    p3s.pilot("-p", "1")
    wait_until(lambda: p3s.job(uuid)["state"] == "running", 15, what="the job to run")
    pid = wait_until(lambda: p3s.job(uuid)["pid"], 5, what="its pid")
    time.sleep(1.3)                                          # one sample of its memory first
    os.kill(pid, signal.SIGKILL)
    job = p3s.wait_jobs([uuid])[uuid]
    reason = p3s.job(uuid)["reason"]
    assert job["state"] == "failed" and reason.startswith("killed by SIGKILL, not by p3s: out of memory?"), reason
    assert "last seen using" in reason
