"""Is the data good? A payload's verdict.json and metrics.json, carried by its pilot, judged by
the server (dqmtools' OK, WARNING, INVALID, BAD), shown on the job, the run grid and the good-run
list; hostile files refused with a reason, never a crash, nothing stored half."""
import csv
import io
import json

from conftest import shell_job, tiny_png, wait_until


def quality_job(infile, checks=None, metrics=None, then="true", **fields):
    """A DQM-like payload that writes its verdict and metrics, then runs `then`."""
    lines = []
    for name, value in (("verdict.json", checks), ("metrics.json", metrics)):
        if value is not None:
            lines.append(f"cat > $P3S_JOB_DIR/{name} <<'EOF'\n{json.dumps(value)}\nEOF")
    return shell_job("\n".join(lines + [then]), jobtype="purity", infile=infile, **fields)


def test_a_verdict_and_metrics_show_on_the_job_the_run_grid_and_the_good_run_list(p3s):
    ok = [{"check": "femb_crc", "result": "OK", "message": "all 40 FEMBs"}]
    bad = [{"check": "femb_crc", "result": "OK", "message": ""},
           {"check": "dead_channels", "result": "BAD", "message": "312 dead channels on APA 3"},
           {"check": "noise", "result": "warning", "message": "high"}]
    uuids = p3s.submit([
        quality_job("/data/np04_raw_run005010_0001.root", ok, {"noise_rms_apa1": 3.2, "dead_channels": 4}),
        quality_job("/data/np04_raw_run005011_0001.root", bad, {"dead_channels": 312}),
        quality_job("/data/np04_raw_run005012_0001.root", ok, then="exit 3")])      # ran, failed: no verdict
    p3s.pilot("-p", "1")
    p3s.wait_jobs(uuids, timeout=30)
    good, poor, failed = (p3s.job(u) for u in uuids)
    assert (good["state"], good["verdict"], good["metrics"]) == ("finished", "OK",
                                                                  {"dead_channels": 4.0, "noise_rms_apa1": 3.2})
    assert (poor["state"], poor["verdict"], poor["verdict_check"]) == ("finished", "BAD", "dead_channels")
    assert [c["result"] for c in poor["checks"]] == ["BAD", "OK", "WARNING"]       # by name
    assert failed["state"] == "failed" and failed["verdict"] is None and failed["checks"] == []
    page = p3s.page(f"/job/{poor['uuid']}")
    assert "Data quality" in page and "312 dead channels on APA 3" in page and 'class="v v-BAD"' in page
    assert "no verdict: the job did not finish" in p3s.page(f"/job/{failed['uuid']}")
    grid = p3s.page("/runs")
    assert "1 bad</span>" in grid and "purity: dead_channels" in grid
    only_bad = p3s.api.call("GET", "/runs", query={"verdict": "BAD", "format": "json"})["rows"]
    assert [r["run"] for r in only_bad] == [5011]
    good_runs = p3s.api.call("GET", "/api/runs", query={"verdict": "OK"})["rows"]
    assert [(r["run"], r["verdict"]) for r in good_runs] == [(5010, "OK")]
    listing = list(csv.DictReader(io.StringIO(p3s.page("/runs?format=csv"))))
    by_run = {row["run"]: row for row in listing}
    assert by_run["5011"]["verdict"] == "BAD" and by_run["5011"]["not_ok"] == \
        "purity:dead_channels=BAD purity:noise=WARNING"
    assert by_run["5012"]["verdict"] == "" and by_run["5010"]["verdict"] == "OK"
    assert by_run["5011"]["run_verdict"] == "BAD" and by_run["5011"]["run_verdict_by"].endswith("purity: dead_channels")
    assert 'Data of the last hour: <a href="/runs?verdict=BAD&amp;age=1h">1 BAD</a>' in p3s.page("/")
    plots = p3s.api.call("GET", "/", query={"format": "json"})["latency"]["plots"]
    assert plots["files"] == 3 and 0 < plots["median_s"] < 30, plots     # the original's "a few minutes"
    assert "File to plots" in p3s.page("/") and "(3 files)" in p3s.page("/jobtype/purity")


def test_a_verdict_left_where_the_original_wrappers_write_is_read_though_the_job_directory_is_empty(p3s, tmp_path):
    """The original's wrappers write under $P3S_OUTPUT_DIR/$P3S_JOB_UUID and leave $P3S_JOB_DIR
    empty: the pilot, which looks in a job directory seen empty no more, still finds the
    verdict, the metrics and the plot there."""
    verdict = [{"check": "femb_crc", "result": "BAD", "message": "FEMB 7 silent"}]
    script = (f"d=$P3S_OUTPUT_DIR/$P3S_JOB_UUID; mkdir -p $d; cp {tmp_path / 'plot.png'} $d/\n"
              f"echo '{json.dumps(verdict)}' > $d/verdict.json; echo '{{\"noise_rms\": 3.5}}' > $d/metrics.json")
    tiny_png(tmp_path / "plot.png")
    [uuid] = p3s.submit([shell_job(script, jobtype="purity", infile="/data/np04_raw_run005020_0001.root",
                                   env={"P3S_EXECMODE": "SHELL", "P3S_OUTPUT_DIR": str(tmp_path / "out")})])
    p3s.pilot("-p", "1")
    p3s.wait_jobs([uuid], timeout=30)
    job = p3s.job(uuid)
    assert (job["state"], job["verdict"], job["verdict_check"], job["metrics"]) == \
        ("finished", "BAD", "femb_crc", {"noise_rms": 3.5}), job
    assert "plot.png" in p3s.page(f"/job/{uuid}")


def test_hostile_verdict_and_metrics_files_are_refused_with_a_reason_and_never_crash(p3s):
    """10 MB, a directory, a named pipe, NaN, 1e309, nesting deeper than any parser, a wrong
    result, a check named with HTML: each job still finishes, with no verdict (or metrics) and
    a note saying why; the HTML is shown as text; the pilot runs every one of them."""
    d = "$P3S_JOB_DIR"
    hostile = {
        "huge": f"head -c 10000000 /dev/zero | tr '\\\\0' ' ' > {d}/verdict.json",
        "directory": f"mkdir {d}/verdict.json",
        "pipe": f"mkfifo {d}/verdict.json",
        "nan": f"echo '{{\"noise\": NaN}}' > {d}/metrics.json",
        "overflow": f"echo '{{\"noise\": 1e309}}' > {d}/metrics.json",
        "deep": f"python3 -c 'print(\"[\" * 100000 + \"]\" * 100000)' > {d}/verdict.json",
        "result": f"echo '[{{\"check\": \"a\", \"result\": \"FINE\"}}]' > {d}/verdict.json",
        "link": f"ln -s /etc/passwd {d}/verdict.json",
    }
    jobs = [shell_job(line, name=name, jobtype="purity") for name, line in hostile.items()]
    html_check = [{"check": "<script>alert(1)</script>", "result": "BAD", "message": "<b>x</b>"}]
    jobs.append(quality_job("", html_check))
    uuids = p3s.submit(jobs)
    pilot = p3s.pilot("-p", "1")
    p3s.wait_jobs(uuids, timeout=60)
    notes = {}
    for uuid in uuids[:-1]:
        job = p3s.job(uuid)
        assert job["state"] == "finished" and job["verdict"] is None and job["metrics"] == {}, job
        notes[job["name"]] = job["verdict_note"]
    assert "more than the 524,288 a job may write" in notes["huge"]
    assert "is not a regular file" in notes["directory"] and "is not a regular file" in notes["pipe"]
    assert "NaN is not a finite number" in notes["nan"] and "1e309 is not a finite number" in notes["overflow"]
    assert "not JSON" in notes["deep"] and "'FINE' is not one of OK" in notes["result"]
    assert "cannot be opened" in notes["link"]
    scripted = p3s.job(uuids[-1])
    assert scripted["verdict"] == "BAD" and scripted["verdict_check"] == "<script>alert(1)</script>"
    page = p3s.page(f"/job/{uuids[-1]}")
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert pilot.poll() is None


def test_a_hostile_pilot_cannot_store_a_bad_verdict_and_its_report_still_ends_the_job(p3s):
    """The server checks what the pilot carries, as it checks everything: checks that are not
    a list are a note, not a verdict, and the end report is taken whole."""
    [uuid] = p3s.api.submit_jobs([{"payload": "true"}])
    pilot = p3s.api.register_pilot(heartbeat=60)["uuid"]
    assert "quality" in p3s.api.call("POST", "/api/pilots", {"secret": "s" * 24})["features"]
    job = p3s.api.request_job(pilot, 0)["job"]
    p3s.api.report(uuid, {"pilot": pilot, "attempt": job["attempt"], "state": "finished", "exit_code": 0,
                          "checks": {"not": "a list"}, "metrics": {"x": "3"}})
    job = p3s.job(uuid)
    assert job["state"] == "finished" and job["verdict"] is None and job["metrics"] == {}
    assert "verdict.json refused" in job["verdict_note"] and "metrics.json refused" in job["verdict_note"]


def test_bad_runs_of_one_check_are_one_alarm_with_the_newest_message(p3s):
    bad = lambda why: [{"check": "dead_channels", "result": "BAD", "message": why}]   # noqa: E731
    first = p3s.submit([quality_job("/data/np04_raw_run005020_0001.root", bad("APA 3: 312 dead"))])
    p3s.pilot("-p", "1")
    p3s.wait_jobs(first, timeout=30)
    second = p3s.submit([quality_job("/data/np04_raw_run005021_0001.root", bad("APA 3: 318 dead"))])
    p3s.wait_jobs(second, timeout=30)
    found = [a for a in p3s.api.call("GET", "/api/alarms")["alarms"] if a["name"] == "bad_data"]
    assert len(found) == 1, found
    assert found[0]["key"] == "bad_data:purity:dead_channels" and found[0]["severity"] == "warning"
    assert "2 file(s) judged BAD by dead_channels" in found[0]["message"]
    assert "np04_raw_run005021_0001.root: APA 3: 318 dead" in found[0]["message"]
    assert found[0]["link"] == "/runs?verdict=BAD&jobtype=purity"


def test_the_example_dqm_payload_judges_its_file(p3s, tmp_path):
    """examples/dqm_check.py, the payload docs/jobs.md gives to copy, run by a real pilot."""
    from conftest import ROOT
    raw = tmp_path / "np04_raw_run005030_0001.root"
    raw.write_bytes(bytes(range(256)) * 64)
    job = json.loads(open(f"{ROOT}/examples/dqm_check.json").read())
    job["payload"] = f"{ROOT}/{job['payload']}"
    [uuid] = p3s.submit([job], "-f", raw)
    p3s.pilot("-p", "1")
    p3s.wait_jobs([uuid], timeout=30)
    done = p3s.job(uuid)
    assert done["state"] == "finished" and done["verdict"] == "OK", done
    assert {c["name"] for c in done["checks"]} == {"readable", "byte_spread"}
    assert done["metrics"]["bytes_read"] == 256 * 64


def test_a_note_on_a_run_shows_on_the_grid_the_job_and_the_summary_and_can_hide_the_run(p3s):
    """Shift hand-over: "HV trip at 14:02, ignore run 5012", with who and when, where a shifter
    looks: the run's row, its jobs' pages, the summary's last 12 hours; hidden on request."""
    uuids = p3s.submit([quality_job(f"/data/np04_raw_run00{run}_0001.root", [], then="true")
                        for run in (5011, 5012)])
    p3s.pilot("-p", "1")
    p3s.wait_jobs(uuids, timeout=30)
    env = p3s.add_user("ana", "shifter")
    noted = p3s.run("job.py", "--note", "run:5012", "-m", "HV trip at 14:02, <ignore>", "--hide", env=env)
    assert noted.returncode == 0 and "noted on run 5012 by ana" in noted.stdout, noted.stderr
    grid = p3s.page("/runs")
    assert "HV trip at 14:02, &lt;ignore&gt;" in grid and "<ignore>" not in grid
    assert "HV trip" in p3s.page(f"/job/{uuids[1]}") and "HV trip" not in p3s.page(f"/job/{uuids[0]}")
    assert "Notes of the last 12 hours" in p3s.page("/") and "on run 5012" in p3s.page("/")
    rows = p3s.api.call("GET", "/runs", query={"hide_noted": "yes", "format": "json"})["rows"]
    assert [r["run"] for r in rows] == [5011]
    bad = p3s.run("job.py", "--note", "run:five", "-m", "x")
    assert bad.returncode == 2 and "target" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_bands_judge_bare_metrics_and_a_reference_run_is_shown_beside_every_job_and_its_trend(p3s, tmp_path):
    """A team starts with numbers and no code: bands on a metric judge it; a reference run,
    marked with who and why, stands beside each job (its plots by name, its metrics and the
    difference); the metric's trend over runs draws the bands, the reference and each job."""
    from conftest import tiny_png
    png = tmp_path / "adc.png"
    tiny_png(png)
    band_file = tmp_path / "bands.json"
    band_file.write_text(json.dumps({"noise_rms": {"warn": [None, 4], "error": [None, 6]}}))
    assert p3s.run("job.py", "--bands", f"purity:{band_file}").returncode == 0
    jobs = [quality_job(f"/data/np04_raw_run00{run}_0001.root", None, {"noise_rms": noise},
                        then=f"cp {png} $P3S_JOB_DIR/adc.png") for run, noise in ((5040, 3.0), (5041, 4.5), (5042, 7.0))]
    uuids = p3s.submit(jobs)
    p3s.pilot("-p", "1")
    p3s.wait_jobs(uuids, timeout=30)
    assert [p3s.job(u)["verdict"] for u in uuids] == ["OK", "WARNING", "BAD"]
    assert p3s.job(uuids[2])["checks"] == [{"name": "noise_rms", "result": "BAD", "message": "7 above 6 (bad band)"}]
    marked = p3s.run("job.py", "--reference", "purity:5040", "-m", "quiet run, all APAs on",
                     env=p3s.add_user("ana", "shifter"))
    assert marked.returncode == 0 and f"job {uuids[0]}" in marked.stdout, marked.stderr
    page = p3s.page(f"/job/{uuids[2]}")
    assert "Beside the reference run 5040" in page and f"/image/{uuids[0]}/adc.png" in page
    assert "reference (run 5040)" in page and "+4 (+133 %)" in page and "quiet run, all APAs on" in page
    trend = p3s.page("/trend/purity/noise_rms")
    assert trend.count("<circle") == 3 and "reference, run 5040" in trend and 'fill="#fde0e0"' in trend
    assert p3s.run("job.py", "--reference", "purity:9999", "-m", "x").returncode == 2


def test_a_file_not_done_by_its_types_deadline_raises_late_run_naming_it(p3s):
    assert p3s.run("job.py", "-l", "-T", "purity", "--deadline", "2").returncode == 0
    done, waiting = p3s.submit([shell_job("true", jobtype="purity", infile="/data/np04_raw_run005050_0001.root"),
                                shell_job("true", jobtype="purity", infile="/data/np04_raw_run005051_0001.root")])
    p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs)       # one job only: the other waits
    [late] = wait_until(lambda: p3s.alarms("late_run"), 10, what="the late_run alarm")
    assert late["message"].startswith("purity: 1 file(s) of the last hour not done within 2 s of arriving"), late
    assert "np04_raw_run005051_0001.root" in late["message"] and p3s.job(done)["state"] == "finished"


def test_a_run_grid_cell_is_the_newest_job_of_its_type_on_its_file(p3s):
    """Two jobs of one type on one file (a rerun after a failure): the cell shows the newest,
    finished, not the oldest, failed (a break showing the oldest passed the suite)."""
    infile = "/data/np04_raw_run005060_0001.root"
    [old] = p3s.submit([shell_job("exit 2", jobtype="purity", infile=infile)])
    p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs)
    [new] = p3s.submit([shell_job("true", jobtype="purity", infile=infile)])
    p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs)
    [row] = p3s.api.call("GET", "/runs", query={"format": "json"})["rows"]
    assert row["jobs"]["purity"]["uuid"] == new and row["jobs"]["purity"]["state"] == "finished"
    assert p3s.job(old)["state"] == "failed" and f'href="/job/{new}"' in p3s.page("/runs")


def test_a_runs_verdict_is_its_worst_files_and_says_which_made_it_so(p3s):
    ok = [{"check": "crc", "result": "OK", "message": ""}]
    bad = [{"check": "crc", "result": "BAD", "message": "FEMB 12"}]
    uuids = p3s.submit([quality_job("/data/np04_raw_run005070_0001.root", ok),
                        quality_job("/data/np04_raw_run005070_0002.root", bad)])
    p3s.pilot("-p", "1")
    p3s.wait_jobs(uuids, timeout=30)
    rows = {r["subrun"]: r for r in p3s.api.call("GET", "/api/runs")["rows"]}
    assert rows[1]["verdict"] == "OK" and rows[1]["run_verdict"] == "BAD"
    assert rows[1]["run_verdict_by"] == "np04_raw_run005070_0002.root: purity: crc"
    assert "run: <span class=\"v v-BAD\"" in p3s.page("/runs")


def test_a_band_that_needs_enough_entries_judges_nothing_below_them(p3s, tmp_path):
    """A histogram of 12 entries says nothing of the noise: the band's check is INVALID, with why."""
    band_file = tmp_path / "bands.json"
    band_file.write_text(json.dumps({"noise_rms": {"warn": [None, 4], "needs": {"entries": 100}}}))
    assert p3s.run("job.py", "--bands", f"purity:{band_file}").returncode == 0
    uuids = p3s.submit([quality_job(f"/data/np04_raw_run00{run}_0001.root", None, {"noise_rms": 5.0, "entries": n})
                        for run, n in ((5080, 12), (5081, 500))])
    p3s.pilot("-p", "1")
    p3s.wait_jobs(uuids, timeout=30)
    few, enough = (p3s.job(u) for u in uuids)
    assert few["verdict"] == "INVALID" and "entries 12.0 is under the 100 it needs" in few["checks"][0]["message"]
    assert enough["verdict"] == "WARNING"
    band_file.write_text(json.dumps({"noise_rms": {"warn": [None, 4], "needs": {"entries": "many"}}}))
    refused = p3s.run("job.py", "--bands", f"purity:{band_file}")
    assert refused.returncode == 2 and "noise_rms.needs" in refused.stderr
