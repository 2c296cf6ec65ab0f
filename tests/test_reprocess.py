"""Reprocessing a run range with a new version, side by side with prompt processing: a dry run
that lists exactly what the real one creates, tagged jobs as columns of their own (TYPE@TAG),
the rows where the two differ, and a prompt stream whose figures a campaign leaves alone."""
import json

from conftest import shell_job

RAW = "/data/np04_raw_run00{}_{:04d}.root"
# purity fails on subrun 2 unless it runs with v10_02 (the fix the campaign brings)
PURITY = 'case "$P3S_INPUT_FILE" in *_0002.root) test "$DUNETPCVER" = v10_02 || exit 3;; esac; echo ok'


def prompt_jobs(p3s):
    jobs = [shell_job(PURITY, jobtype="purity", infile=RAW.format(5030, 1)),
            shell_job("exit 4", jobtype="monitor", infile=RAW.format(5030, 1)),
            shell_job(PURITY, jobtype="purity", infile=RAW.format(5030, 2)),      # no monitor job on it
            shell_job(PURITY, jobtype="purity", infile=RAW.format(5031, 1))]
    for job in jobs:
        job["env"]["P3S_INPUT_FILE"] = job["infile"]
    uuids = p3s.submit(jobs)
    assert p3s.run("pilot.py", "-c", "4", "-p", "1", "-L", p3s.logs).returncode == 0
    return uuids


def reprocess(p3s, *args):
    done = p3s.run("job.py", "--reprocess", "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_dry_run_lists_exactly_what_the_campaign_creates_and_a_repeat_adds_nothing(p3s):
    prompt_jobs(p3s)
    before = len(p3s.api.list_jobs(limit=1000))
    args = ("--runs", "5030", "--jobtype", "purity", "--tag", "v10", "--set-env", "DUNETPCVER=v10_02")
    planned = reprocess(p3s, *args, "--dry-run")
    assert len(p3s.api.list_jobs(limit=1000)) == before, "the dry run stored something"
    made = reprocess(p3s, *args)
    pairs = [(j["infile"], j["jobtype"], j["from"]) for j in made["jobs"]]
    assert pairs == [(j["infile"], j["jobtype"], j["from"]) for j in planned["jobs"]]
    assert sorted(p[0] for p in pairs) == [RAW.format(5030, 1), RAW.format(5030, 2)]
    job = p3s.job(made["jobs"][0]["uuid"])
    assert job["jobtype"] == "purity@v10" and job["env"]["DUNETPCVER"] == "v10_02" and job["payload"] == PURITY
    assert job["env"]["P3S_INPUT_FILE"] == job["infile"]
    assert reprocess(p3s, *args)["jobs"] == [], "a repeated campaign made its jobs again"
    text = p3s.run("job.py", "--reprocess", *args, "--dry-run").stdout
    assert text.strip().endswith("would create 0 job(s) tagged v10 for runs 5030-5030")
    [tagged] = p3s.submit([{"payload": "true", "jobtype": "purity", "tag": "v10", "infile": RAW.format(5032, 1)}])
    assert p3s.job(tagged)["jobtype"] == "purity@v10", "a job's own tag"


def test_only_failed_and_only_missing_and_the_columns_side_by_side(p3s):
    prompt_jobs(p3s)
    failed = reprocess(p3s, "--runs", "5030-5031", "--tag", "fix1", "--only", "failed")
    assert sorted((j["jobtype"], j["infile"]) for j in failed["jobs"]) == [
        ("monitor@fix1", RAW.format(5030, 1)), ("purity@fix1", RAW.format(5030, 2))]
    missing = reprocess(p3s, "--runs", "5030", "--jobtype", "monitor", "--tag", "fill", "--only", "missing")
    [made] = missing["jobs"]
    assert (made["jobtype"], made["infile"]) == ("monitor@fill", RAW.format(5030, 2))
    assert p3s.job(made["uuid"])["env"]["P3S_INPUT_FILE"] == RAW.format(5030, 2), "the copy reads its own file"


def test_a_campaign_beside_prompt_processing_shows_where_they_differ_and_keeps_the_prompt_figures(p3s):
    prompt_jobs(p3s)
    prompt_errors = p3s.api.call("GET", "/errors", query={"format": "json"})["errors"]
    made = reprocess(p3s, "--runs", "5030", "--jobtype", "purity", "--tag", "v10", "--set-env", "DUNETPCVER=v10_02")
    broken = reprocess(p3s, "--runs", "5031", "--jobtype", "monitor", "--tag", "bad", "--only", "missing")
    assert p3s.run("pilot.py", "-c", "3", "-p", "1", "-L", p3s.logs).returncode == 0
    p3s.wait_jobs([j["uuid"] for j in made["jobs"] + broken["jobs"]])
    grid = p3s.api.call("GET", "/runs", query={"runs": "5030", "format": "json"})
    assert grid["types"] == ["monitor", "purity", "purity@v10"], "the campaign's column is not beside the prompt one"
    differ = p3s.api.call("GET", "/runs", query={"runs": "5030", "differ": "yes", "format": "json"})
    assert [r["infile"] for r in differ["rows"]] == [RAW.format(5030, 2)]
    row = differ["rows"][0]["jobs"]
    assert (row["purity"]["state"], row["purity@v10"]["state"]) == ("failed", "finished")
    errors = p3s.api.call("GET", "/errors", query={"format": "json"})["errors"]
    assert [e for e in errors if "@" not in e["jobtype"]] == prompt_errors, "the campaign changed the prompt errors"
    assert [e["jobtype"] for e in errors if "@" in e["jobtype"]] == ["monitor@bad"], "a tagged failure names its tag"


def test_the_files_a_type_never_ran_on_are_listed_and_submitted_as_prompt_jobs(p3s):
    """A file lands, one of its three job types is never submitted (an injector template changed,
    a submission lost): /files names it, and --reprocess --only missing (no tag) fills the gap."""
    first, second = RAW.format(5040, 1), RAW.format(5040, 2)
    p3s.submit([shell_job("true", jobtype=t, infile=first) for t in ("evdisp", "monitor", "purity")]
               + [shell_job("true", jobtype="monitor", infile=second)])
    assert p3s.run("pilot.py", "-c", "4", "-p", "1", "-L", p3s.logs).returncode == 0
    p3s.submit([shell_job("sleep 5", jobtype="purity", infile=second, timelimit=1)])
    assert p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs).returncode == 0
    listed = p3s.api.call("GET", "/files", query={"missing": "yes", "format": "json"})
    assert [(f["infile"], f["missing"], f["status"]) for f in listed["files"]] == [
        (second, ["evdisp", "purity"], {"evdisp": "never submitted", "monitor": "finished", "purity": "timeout"})]
    assert (listed["missing_runs"], listed["failed_runs"]) == ("5040-5040", "5040-5040")
    page = p3s.page("/files?missing=yes")
    assert "never submitted" in page and "--reprocess --runs 5040-5040 --only missing" in page
    made = reprocess(p3s, "--runs", "5040-5040", "--only", "missing")
    [job] = made["jobs"]
    assert (job["jobtype"], job["infile"]) == ("evdisp", second)
    assert p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs).returncode == 0
    [left] = p3s.api.call("GET", "/files", query={"missing": "yes", "format": "json"})["files"]
    assert left["missing"] == ["purity"], "the never-submitted type is still missing"
