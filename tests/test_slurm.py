"""Pilots launched by a real Slurm (three fake nodes on this machine) as a job array drain a queue."""
import os
import subprocess
from collections import Counter

import pytest

from conftest import ROOT, SLURM, shell_job, wait_until  # noqa: F401  (the fixture)

pytestmark = pytest.mark.skipif(not SLURM or os.geteuid() != 0,
                                reason="needs root and slurmctld, slurmd, slurm-client and munge "
                                       "(.ci/run installs them)")


def test_slurm_array_of_pilots_drains_the_queue(p3s, slurm, tmp_path):
    ledger = tmp_path / "ledger"
    uuids = p3s.submit([shell_job(f'echo "$P3S_JOB_UUID" >> {ledger}; sleep 0.2')] * 40)
    env = dict(slurm, **{k: v for k, v in p3s.env.items() if k.startswith("P3S_")},
               P3S_HOME=ROOT, P3S_MAX_IDLE="2", P3S_PILOT_ARGS=f"-p 1 -b 1 -L {p3s.logs}",
               P3S_RUNDIR=str(tmp_path / "run"))
    submitted = subprocess.run(["sbatch", "--parsable", "--array=1-4", os.path.join(ROOT, "deploy", "slurm-pilots.sh")],
                               capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    array = submitted.stdout.strip().split(";")[0]
    states = p3s.wait_jobs(uuids, timeout=180)
    assert Counter(s["state"] for s in states.values()) == {"finished": 40}
    runs = Counter(ledger.read_text().split())
    assert set(runs) == set(uuids) and max(runs.values()) == 1
    pilots = p3s.api.list_pilots()
    assert sorted(p["extra"] for p in pilots) == [f"slurm:{array}_{i}" for i in range(1, 5)]
    assert sum(p["jobs_done"] for p in pilots) == 40
    hosts = {p["host"] for p in pilots}
    assert len(hosts) >= 2 and hosts <= {"node1", "node2", "node3"}, hosts   # 4 tasks need 2+ nodes
    wait_until(lambda: not subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True,
                                          env=env).stdout.strip(), 60, 0.5, "the array to leave the queue")
    assert {p["state"] for p in p3s.api.list_pilots()} == {"stopped"}, "pilots did not end cleanly"
    logs = sorted(os.listdir(tmp_path / "run"))
    assert logs == [f"pilot-slurm-{array}_{i}.log" for i in range(1, 5)], logs
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".out")], "a Slurm output file outside the run directory"
