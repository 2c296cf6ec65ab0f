"""A fleet of pilots over pdsh (-R exec: 3 fake hosts on this machine): pgen, preport, pkill,
server-side stop/drain and the fleet check."""
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter

import pytest

from conftest import ROOT, alive, shell_job, wait_until

PDSH = shutil.which("pdsh")
pytestmark = pytest.mark.skipif(PDSH is None, reason="pdsh is not installed (.ci/run installs it)")
NODES = "node[1-3]"


def pdsh(p3s, script, hosts=NODES, env=None):
    """Run a bash line on each fake host; %h is the host. Returns {host: output}."""
    result = subprocess.run([PDSH, "-R", "exec", "-w", hosts, "bash", "-c",
                             f"export P3S_NODE=%h P3S_RUNDIR={p3s.dir}/run/%h; {script}"],
                            capture_output=True, text=True, timeout=120, env=env or p3s.env)
    out = {}
    for line in result.stdout.splitlines():
        host, _, rest = line.partition(": ")
        out.setdefault(host, []).append(rest)
    return out


@pytest.fixture(autouse=True)
def stop_the_fleet(p3s):
    """pgen.sh's pilots are detached from the test: stop any still running, even after a failure."""
    yield
    pdsh(p3s, f"{ROOT}/pkill.sh -t 3")


def pgen(p3s, n, *pilot_args, hosts=NODES, env=None):
    args = " ".join(map(str, pilot_args))
    return pdsh(p3s, f"{ROOT}/pgen.sh {n} -L {p3s.logs} --kill-grace 1 {args}", hosts, env)


def live_counts(p3s, hosts=NODES):
    report = pdsh(p3s, f"{ROOT}/preport.sh", hosts)
    return {h: int(re.search(r"live=(\d+)", lines[0]).group(1)) for h, lines in report.items()}


def pilot_pids(p3s, host):
    return [int(f.read_text().split()[0]) for f in (p3s.dir / "run" / host).glob("pilot-*.pid")]


def server_pilots(p3s, state_in=("active", "no jobs", "dispatched", "running")):
    return [p for p in p3s.api.list_pilots() if p["state"] in state_in]


def fleet_check(p3s):
    report = subprocess.run([PDSH, "-R", "exec", "-w", NODES, "bash", "-c",
                             f"P3S_NODE=%h P3S_RUNDIR={p3s.dir}/run/%h {ROOT}/preport.sh -v"],
                            capture_output=True, text=True, timeout=60, env=p3s.env).stdout
    return p3s.run("pilot.py", "--fleet-check", "-", input=report)


def test_pdsh_fleet_runs_jobs_once_and_pkill_leaves_nothing(p3s):
    started = pgen(p3s, 2, "-p", 1, "-b", 0.5)
    assert sorted(started) == ["node1", "node2", "node3"]
    assert all("started 2 pilot(s)" in lines[0] for lines in started.values())
    wait_until(lambda: len(server_pilots(p3s)) == 6, 20, what="6 registered pilots")
    assert Counter(p["host"] for p in server_pilots(p3s)) == {"node1": 2, "node2": 2, "node3": 2}
    assert live_counts(p3s) == {"node1": 2, "node2": 2, "node3": 2}
    check = fleet_check(p3s)
    assert check.returncode == 0 and "OK: the server and the nodes agree" in check.stdout

    ledger = p3s.dir / "ledger"
    uuids = p3s.submit([shell_job(f'echo "$P3S_JOB_UUID" >> {ledger}; sleep 0.05')] * 60)
    p3s.wait_jobs(uuids, timeout=120)
    runs = Counter(ledger.read_text().split())
    assert set(runs) == set(uuids) and max(runs.values()) == 1
    assert all(s["state"] == "finished" for s in p3s.api.job_states(uuids).values())

    long_jobs = p3s.submit([shell_job("sleep 120")] * 4)
    wait_until(lambda: all(s["state"] == "running" for s in p3s.api.job_states(long_jobs).values()), 20,
               what="4 running jobs")
    pids = [pid for host in ("node1", "node2", "node3") for pid in pilot_pids(p3s, host)]
    stopped = pdsh(p3s, f"{ROOT}/pkill.sh -t 15")
    assert all("stopped 2 pilot(s)" in lines[0] for lines in stopped.values()), stopped
    assert not any(alive(pid) for pid in pids)
    assert live_counts(p3s) == {"node1": 0, "node2": 0, "node3": 0}
    assert not list((p3s.dir / "run").glob("*/pilot-*.pid")), "pid files left behind"
    states = p3s.api.job_states(long_jobs)
    assert {s["state"] for s in states.values()} == {"pilotTO"}, "an interrupted job was left hanging"
    assert {p["state"] for p in p3s.api.list_pilots()} == {"stopped"}


def test_fleet_check_finds_vanished_and_unknown_pilots(p3s):
    pgen(p3s, 1, "-p", 1, "-b", 5, "-l", p3s.dir / "pilot-logs", hosts="node[1-2]")   # logs by uuid
    unreachable = dict(p3s.env, P3S_SERVER="http://127.0.0.1:9")
    pgen(p3s, 1, hosts="node3", env=unreachable)          # runs, but never reaches the server
    wait_until(lambda: len(server_pilots(p3s)) == 2, 20, what="2 registered pilots")
    [victim] = pilot_pids(p3s, "node1")
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not alive(victim), 5, what="the killed pilot")
    check = fleet_check(p3s)
    assert check.returncode == 1
    node1 = next(p for p in server_pilots(p3s) if p["host"] == "node1")
    assert re.search(rf"GONE +node1 {node1['uuid']} pid {victim}", check.stdout), check.stdout
    assert re.search(r"UNKNOWN +node3 - pid \d+", check.stdout), check.stdout
    assert "node2" not in check.stdout


def test_server_side_stop_and_drain(p3s):
    p3s.api.define_site("cern")
    pgen(p3s, 1, "-p", 20, "-b", 0.5, "-s", "cern", hosts="node1")
    pgen(p3s, 1, "-p", 20, "-b", 0.5, hosts="node2")
    wait_until(lambda: len(server_pilots(p3s, ("no jobs",))) == 2, 20, what="2 idle pilots")
    result = p3s.run("pilot.py", "-k", "-H", "node2")
    assert result.returncode == 0 and "1 pilot(s) marked" in result.stdout
    wait_until(lambda: live_counts(p3s, "node2") == {"node2": 0}, 10, what="node2's pilot to exit")
    [uuid] = p3s.submit([shell_job("sleep 2; echo done")])
    wait_until(lambda: p3s.job(uuid)["state"] == "running", 10, what="the job to run on node1")
    assert p3s.run("pilot.py", "-k", "--drain", "-s", "cern").returncode == 0
    p3s.submit([shell_job("true")])                        # must not go to the draining pilot
    wait_until(lambda: live_counts(p3s, "node1") == {"node1": 0}, 15, what="node1's pilot to drain")
    job = p3s.job(uuid)
    assert job["state"] == "finished" and job["stdout_tail"] == "done\n", "drain killed the running job"
    assert [j["state"] for j in p3s.api.list_jobs() if j["uuid"] != uuid] == ["defined"]
    assert {p["state"] for p in p3s.api.list_pilots()} == {"stopped"}
    bad = p3s.run("pilot.py", "-k")
    assert bad.returncode == 2 and "-k needs" in bad.stderr


def test_pkill_drain_lets_the_current_job_finish(p3s):
    pgen(p3s, 1, "-p", 1, "-b", 0.5, hosts="node1")
    [uuid] = p3s.submit([shell_job("sleep 1.5; echo drained")])
    wait_until(lambda: p3s.job(uuid)["state"] == "running", 10, what="running")
    drained = pdsh(p3s, f"{ROOT}/pkill.sh -g", hosts="node1")
    assert "asked 1 pilot(s) to drain" in drained["node1"][0]
    wait_until(lambda: live_counts(p3s, "node1") == {"node1": 0}, 15, what="the pilot to exit")
    assert p3s.job(uuid)["state"] == "finished" and p3s.job(uuid)["stdout_tail"] == "drained\n"


def test_scripts_refuse_bad_arguments(p3s):
    for script, args in (("pgen.sh", []), ("pgen.sh", ["two"]), ("preport.sh", ["-x"]), ("pkill.sh", ["-t", "x"])):
        result = subprocess.run([os.path.join(ROOT, script), *args], capture_output=True, text=True, timeout=10)
        assert result.returncode == 2 and result.stderr.strip(), (script, args)


def test_pkill_spares_what_a_stale_pid_file_now_names(p3s, tmp_path):
    """A pid file whose pid now belongs to something else that mentions pilot.py (copilot.py,
    another clone's pilot) must not get it killed."""
    other_clone = tmp_path / "other-clone"
    other_clone.mkdir()
    (other_clone / "pilot.py").write_text("import time\ntime.sleep(60)\n")
    (tmp_path / "copilot.py").write_text("import time\ntime.sleep(60)\n")
    rundir = p3s.dir / "run" / "node1"
    rundir.mkdir(parents=True)
    bystanders = [subprocess.Popen(["python3", str(other_clone / "pilot.py")]),
                  subprocess.Popen(["python3", str(tmp_path / "copilot.py")])]
    try:
        time.sleep(0.3)
        for i, proc in enumerate(bystanders):
            stat = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
            # the first: right start time, but another clone; the second: a wrong start time
            start = stat[19] if i == 0 else str(int(stat[19]) - 1)
            (rundir / f"pilot-old-{i}.pid").write_text(f"{proc.pid} {start} {ROOT}\n")
        report = pdsh(p3s, f"{ROOT}/preport.sh", "node1")["node1"]
        assert "live=0" in report[0], report
        pdsh(p3s, f"{ROOT}/pkill.sh -t 1", "node1")
        assert all(proc.poll() is None for proc in bystanders), "pkill.sh killed a process that is no pilot of ours"
        assert list(rundir.glob("*.pid")) == [], "stale pid files were kept"
    finally:
        for proc in bystanders:
            proc.kill()
            proc.wait()
