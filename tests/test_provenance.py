"""Which code made this plot? Every job's pilot records the sha256 (and `git describe`) of what
it ran, its input's size and adler32, its software versions and environment digest; the job
page, job.py --show and job.py --provenance say it."""
import hashlib
import json
import os
import shutil
import subprocess

import pytest

from conftest import shell_job, tiny_png

GIT = shutil.which("git")


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env=dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="t",
                            GIT_COMMITTER_EMAIL="t@x"))


def sparse_2gb(path):
    """A 2 GB input file, sparse: read at memory speed."""
    with open(path, "wb") as f:
        f.truncate(2 ** 31)
    return path


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_a_native_and_a_wrapper_payload_in_a_git_work_tree_and_a_2_gb_input(p3s, tmp_path):
    repo = tmp_path / "dqm"
    repo.mkdir()
    native, wrapper = repo / "purity.sh", repo / "wrapper.sh"
    png = tmp_path / "adc.png"
    tiny_png(png)
    native.write_text(f"#!/bin/sh\necho purity of $P3S_INPUT_FILE; cp {png} $P3S_JOB_DIR/adc.png; sleep 3\n")
    wrapper.write_text("echo wrapped\n")
    native.chmod(0o755)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "v1")
    big = sparse_2gb(tmp_path / "np04_raw_run005010_0001.root")
    env = {"DUNETPCVER": "v10_01_00", "P3S_VERSION_VARS": "CALIB_TAG", "CALIB_TAG": "c7", "API_TOKEN": "s3cret"}
    uuids = p3s.submit([{"payload": str(native), "jobtype": "purity", "infile": str(big), "env": env},
                        shell_job(f"sh {wrapper}", jobtype="evdisp", infile=str(tmp_path / "missing.root")),
                        {"payload": str(native), "jobtype": "purity", "infile": str(tmp_path / "small.root"), "env": env},
                        shell_job("true", jobtype="noinput")])
    wrapper.write_text("echo wrapped, edited\n")         # the work tree is dirty when the wrapper runs
    assert p3s.run("pilot.py", "-c", "4", "-p", "1", "-L", p3s.logs).returncode == 0
    first, shell, again, no_input = (p3s.job(u)["provenance"] for u in uuids)
    assert no_input["input"] is None and no_input["payload"], "a job without input has no input's identity"
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    assert first["payload"] == [{"path": str(native), "sha256": sha256(native), "git": commit + "-dirty"}]
    assert first["input"] == {"path": str(big), "size": 2 ** 31, "mtime": os.stat(big).st_mtime,
                              "adler32": f"{((2 ** 31 % 65521) << 16) | 1:08x}"}    # of zeros: b = n mod 65521
    assert first["versions"] == {"DUNETPCVER": "v10_01_00", "CALIB_TAG": "c7"}
    assert (first["site"], first["p3s"]) == ("", "1.0") and first["host"] and first["pilot"]
    assert again["env_sha256"] == first["env_sha256"] != shell["env_sha256"], "alike jobs, alike digests"
    assert [f["path"] for f in shell["payload"]] == [os.path.abspath(shutil.which("sh")), str(wrapper)]
    assert shell["payload"][1] == {"path": str(wrapper), "sha256": sha256(wrapper), "git": commit + "-dirty"}
    assert shell["input"] == {"path": str(tmp_path / "missing.root"), "error": "No such file or directory"}
    page = p3s.page(f"/job/{uuids[0]}")
    assert "<h2>Provenance</h2>" in page and sha256(native) in page and "v10_01_00" in page and "s3cret" not in page
    shown = p3s.run("job.py", "--provenance", uuids[0])
    assert shown.returncode == 0 and json.loads(shown.stdout) == first
    beside = os.path.join(p3s.job(uuids[0])["stdout_path"][:-len(".out")], "provenance.json")
    assert json.load(open(beside)) == first, "no provenance.json beside the job's plots"
    assert '"adler32": "' in p3s.run("job.py", "--show", uuids[0]).stdout


def test_an_input_too_big_to_read_in_time_is_said_skipped_and_the_job_is_not_held(p3s, tmp_path, monkeypatch):
    """The checksum is bounded in time: past the bound the job's report goes without it, saying so."""
    import pilot
    slow = sparse_2gb(tmp_path / "huge.root")
    monkeypatch.setattr(pilot, "INPUT_SUM_SECONDS", 0.0)
    reader = pilot.InputSum(str(slow))
    reader.start()
    reader.join(10)                            # it gives up at its deadline, whatever the file
    found = reader.identity()
    assert found["adler32"] is None and found["skipped"] == "2.0 GB not read within 0 s of the start"
    assert found["size"] == 2 ** 31


def test_a_runs_view_lists_its_versions_and_says_when_two_jobs_differ(p3s):
    data = "/data/np04_raw_run005020_{:04d}.root"
    uuids = p3s.submit([{"payload": "true", "jobtype": t, "infile": data.format(sub), "env": {"DUNETPCVER": v}}
                        for t, sub, v in (("purity", 1, "v10_01_00"), ("purity", 2, "v10_01_00"),
                                          ("monitor", 1, "v10_02_00"))])
    assert p3s.run("pilot.py", "-c", "3", "-p", "1", "-L", p3s.logs).returncode == 0
    p3s.wait_jobs(uuids)
    grid = p3s.api.call("GET", "/runs", query={"runs": "5020", "format": "json"})
    assert grid["versions"] == {"DUNETPCVER": {"v10_01_00": 2, "v10_02_00": 1}}
    assert "DUNETPCVER differs: v10_01_00 (2 jobs), v10_02_00 (1 job)" in p3s.page("/runs?runs=5020")


def test_a_short_jobs_report_is_not_held_for_a_huge_input(monkeypatch, tmp_path):
    import pilot
    huge = sparse_2gb(tmp_path / "huge.root")
    monkeypatch.setattr(pilot, "INPUT_SUM_AFTER", 0.0)
    reader = pilot.InputSum(str(huge))
    reader.start()
    found = reader.identity()                  # the job ended at once: no waiting for the reading
    assert found == {"path": str(huge), "adler32": None, "skipped": "not read whole 0 s after the job ended"}
    reader.join()


def test_a_stream_whose_payload_changes_between_its_jobs_records_each_version_it_ran(p3s, tmp_path):
    """A pilot makes a stream's record once (same command, same env) and keeps it while the
    payload's files stay as they were: a payload edited between two jobs is hashed anew, and
    a job with an env of its own gets its own record."""
    script = tmp_path / "dqm.sh"
    base = '#!/bin/sh\nsleep 1\necho "# ran" >> "$0"\n'   # each run edits itself, a second after its record
                                                            # was made (on a busy machine too): the next job
                                                            # runs a new version
    script.write_text(base)
    script.chmod(0o755)
    uuids = p3s.submit([{"payload": str(script), "jobtype": "dqm"} for _ in range(3)]
                       + [{"payload": str(script), "jobtype": "dqm", "env": {"DUNETPCVER": "v10_02_00"}}])
    assert p3s.run("pilot.py", "-c", "4", "-p", "1", "-L", p3s.logs).returncode == 0
    records = [p3s.job(u)["provenance"] for u in uuids]
    ran = [hashlib.sha256((base + "# ran\n" * k).encode()).hexdigest() for k in range(4)]
    assert [r["payload"][0]["sha256"] for r in records] == ran, "a job recorded a version it did not run"
    assert [r["versions"] for r in records] == [{}, {}, {}, {"DUNETPCVER": "v10_02_00"}]
    assert records[3]["env_sha256"] != records[0]["env_sha256"] == records[2]["env_sha256"]
