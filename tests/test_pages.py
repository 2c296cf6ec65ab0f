"""Status pages against a real server with real jobs: content, escaping, files, filters, paging."""
import json
import re
import urllib.error
import urllib.request

import pytest

from conftest import P3S, shell_job, wait_until


def get(p3s, path, status=200):
    return p3s.page(path, status)


def get_json(p3s, path, status=200):
    sep = "&" if "?" in path else "?"
    return json.loads(get(p3s, path + sep + "format=json", status))


@pytest.fixture
def served(tmp_path):
    """A server whose files root is tmp/root; pilots write their job logs under it."""
    root = tmp_path / "root"
    (root / "logs").mkdir(parents=True)
    server = P3S(tmp_path, ["--files-root", str(root)]).start()
    server.root = root
    server.logs = root / "logs"
    yield server
    server.stop()


def run_jobs(p3s, jobs, *pilot_args):
    uuids = p3s.submit(jobs)
    p3s.run("pilot.py", "-c", len(jobs), "-p", "1", "-L", p3s.logs, *pilot_args)
    return uuids


def test_the_summarys_jobs_ended_open_what_they_count(p3s):
    """Jobs ended in a window: each count links to a list of as many rows. A job that failed
    twice (retried once) is two failed attempts, listed on /failures; a finished job is listed
    on /jobs with ended= the window."""
    p3s.submit([shell_job("true"), shell_job("exit 4", max_attempts=2)])
    p3s.run("pilot.py", "-c", 3, "-p", "0", "-L", p3s.logs)
    ended = get_json(p3s, "/")["ended"]["1h"]
    assert (ended["finished"], ended["failed"]) == (1, 2)
    page = get(p3s, "/")
    assert '<a href="/failures?state=failed&amp;since=1h">2</a>' in page
    assert '<a href="/jobs?state=finished&amp;ended=1h">1</a>' in page
    assert get_json(p3s, "/failures?state=failed&since=1h")["total"] == 2
    assert len(get_json(p3s, "/jobs?state=finished&ended=1h")["jobs"]) == 1
    assert get_json(p3s, "/failures?state=timeout&since=1m")["total"] == 0
    assert "state: " in get(p3s, "/failures?state=finished", status=400), "a finished attempt never failed"


def test_summary_shows_counts_failures_latency_and_alarms(served):
    ok1, ok2, bad = run_jobs(served, [shell_job("true"), shell_job("true", jobtype="dqm"),
                                      shell_job("echo broken >&2; exit 3", name="broken")])
    data = get_json(served, "/")
    assert data["jobs_by_state"] == {"finished": 2, "failed": 1}
    assert data["jobs_by_jobtype"]["dqm"] == {"finished": 1}
    assert data["ended"]["1m"]["finished"] == 2 and data["ended"]["24h"]["failed"] == 1
    assert data["recent_failures"][0]["uuid"] == bad and data["recent_failures"][0]["exit_code"] == 3
    assert data["latency"]["samples"] == 3 and data["latency"]["median_s"] >= 0
    assert data["pilots_by_state"] == {"stopped": 1}
    assert any("no pilot is alive" in a["message"] for a in data["alarms"])
    page = get(served, "/")
    assert "no pilot is alive" in page and f"/job/{bad}" in page and "broken" in page
    assert "<meta http-equiv" not in page
    assert '<meta http-equiv="refresh" content="15">' in get(served, "/?refresh=15")


def test_lost_pilot_raises_an_alarm(served):
    pilot = served.pilot("-p", "1", "-b", "0.3")
    wait_until(lambda: get_json(served, "/")["pilots_by_state"].get("no jobs"), 10, what="idle pilot")
    assert get_json(served, "/")["alarms"] == []
    pilot.kill()
    wait_until(lambda: any("lost" in a["message"] for a in get_json(served, "/")["alarms"]), 10, what="lost alarm")


def test_every_value_is_escaped(served):
    evil = "<script>alert('x')</script>"
    [uuid] = run_jobs(served, [shell_job("echo '<img src=x onerror=alert(1)>' | tee /dev/stderr; exit 1", name=evil,
                                         jobtype="<b>t</b>", env={"P3S_EXECMODE": "SHELL", "NOTE": "<i>n</i>"})])
    for path, status in (("/", 200), ("/jobs", 200), (f"/job/{uuid}", 200), ("/pilots", 200),
                         ("/jobs?state=<x>", 400), ("/jobs?jobtype=<x>", 400), ("/errors", 200),
                         ("/failures", 200), ("/failures?host=<x>", 200), ("/runs", 200)):
        page = get(served, path, status)
        assert "<script>alert" not in page and "<img src=x" not in page and "<b>t</b>" not in page
        assert "<i>n</i>" not in page and "<x>" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in get(served, "/failures"), "the hostile reason is listed"
    job_page = get(served, f"/job/{uuid}")
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in job_page
    assert "&lt;img src=x onerror=alert(1)&gt;" in job_page


def test_job_page_links_logs_and_output_files_under_the_roots(served):
    out = served.root / "out" / "result.txt"
    outside = served.dir / "elsewhere.txt"
    job = shell_job(f"mkdir -p {out.parent}; echo 42 > {out}; echo done; echo warn >&2",
                    env={"P3S_EXECMODE": "SHELL", "P3S_OUTPUT_FILE": str(out), "OTHER": str(outside)})
    [uuid] = run_jobs(served, [job])
    data = get_json(served, f"/job/{uuid}")
    logs = {f["label"]: f for f in data["logs"]}
    assert get(served, logs["stdout"]["url"]) == "done\n"
    assert get(served, logs["stderr"]["url"]) == "warn\n"
    files = {f["label"]: f for f in data["files"]}
    assert get(served, files["P3S_OUTPUT_FILE"]["url"]) == "42\n"
    assert files["OTHER"]["url"] is None, "a file outside the roots got a link"
    page = get(served, f"/job/{uuid}")
    assert logs["stdout"]["url"].replace("&", "&amp;") in page and "not readable by the server" in page
    listing = get_json(served, "/file?path=" + str(out.parent))
    assert [e["name"] for e in listing["entries"]] == ["result.txt"]


def test_paths_outside_the_roots_are_refused(served):
    secret = served.dir / "secret.txt"
    secret.write_text("TOP SECRET")
    (served.root / "escape").symlink_to(served.dir)
    (served.root / "link.txt").symlink_to(secret)
    attempts = [str(served.root / ".." / "secret.txt"), str(secret), "/etc/passwd",
                str(served.root / "escape" / "secret.txt"), str(served.root / "link.txt"),
                str(served.root / "logs" / ".." / ".." / "secret.txt")]
    for path in attempts:
        body = get(served, "/file?" + urllib.parse.urlencode({"path": path}), 403)
        assert "TOP SECRET" not in body and "outside the files roots" in body
    assert "absolute path" in get(served, "/file?path=secret.txt", 400)
    assert "absolute path" in get(served, "/file?path=../secret.txt", 400)
    get(served, "/file?" + urllib.parse.urlencode({"path": str(served.root / "nope")}), 404)


def test_jobs_filters_sorting_and_paging(served):
    for user, jobs in (("ann", [shell_job("true", jobtype="reco", priority=i % 5, site="cern") for i in range(40)]),
                       ("bob", [shell_job("true", jobtype="dqm", priority=9) for _ in range(20)])):
        jobs_file = served.dir / f"{user}.json"
        jobs_file.write_text(json.dumps(jobs))
        assert served.run("job.py", "-j", jobs_file, env=served.add_user(user, "expert")).returncode == 0
    first = get_json(served, "/jobs")
    assert len(first["jobs"]) == 25 and first["more"] and first["total"] == 60
    third = get_json(served, "/jobs?page=3")
    assert len(third["jobs"]) == 10 and not third["more"]
    seen = {j["uuid"] for p in (1, 2, 3) for j in get_json(served, f"/jobs?page={p}")["jobs"]}
    assert len(seen) == 60
    assert get_json(served, "/jobs?jobtype=dqm&limit=400")["total"] == 20
    by_user = get_json(served, "/jobs?user=ann&site=cern&limit=100")
    assert len(by_user["jobs"]) == 40 and by_user["total"] is None
    ordered = [j["priority"] for j in get_json(served, "/jobs?sort=priority&order=asc&limit=100")["jobs"]]
    assert ordered == sorted(ordered) and ordered[-1] == 9
    assert len(get_json(served, "/jobs?age=1h&limit=100")["jobs"]) == 60
    assert get_json(served, "/jobs?state=finished")["jobs"] == []
    assert "limit: must be between 25 and 400" in get_json(served, "/jobs?limit=10", 400)["error"]
    assert "sort: unknown value" in get_json(served, "/jobs?sort=payload", 400)["error"]
    assert "age: expected" in get_json(served, "/jobs?age=yesterday", 400)["error"]
    page = get(served, "/jobs?sort=priority&order=desc")
    assert "next page" in page and "sort=priority&amp;order=asc" in page


def test_jobs_sorted_by_end_are_the_jobs_that_ended_newest_first(served):
    """Sorted by `ended`, the list is read from the index of ended jobs alone: those waiting
    have no end time and are not in it, in either order."""
    ran = run_jobs(served, [shell_job(f"sleep 0.{i}") for i in range(1, 4)])
    waiting = served.submit([shell_job("true", site="nowhere") for _ in range(2)])
    newest = [j["uuid"] for j in get_json(served, "/jobs?sort=ended")["jobs"]]
    assert sorted(newest) == sorted(ran) and not set(newest) & set(waiting)
    ends = {j["uuid"]: j["ts_sto"] for j in get_json(served, "/jobs?sort=ended")["jobs"]}
    assert [ends[u] for u in newest] == sorted(ends.values(), reverse=True)
    oldest = [j["uuid"] for j in get_json(served, "/jobs?sort=ended&order=asc")["jobs"]]
    assert oldest == newest[::-1]
    assert len(get_json(served, "/jobs")["jobs"]) == 5


def test_why_is_this_job_not_running(served):
    rare, low = served.submit([shell_job("true", jobtype="rare"), shell_job("true", priority=-1)])
    held = served.submit([shell_job("true", state="template")])[0]
    served.submit([shell_job("true", priority=5), shell_job("true", priority=5)])
    assert any("no live pilot takes jobtype 'rare'" in r for r in get_json(served, f"/job/{rare}")["why_waiting"])
    assert any("2 waiting job(s)" in r for r in get_json(served, f"/job/{low}")["why_waiting"])
    assert "held in state template" in get_json(served, f"/job/{held}")["why_waiting"][0]
    assert "Why is this job not running?" in get(served, f"/job/{rare}")


def test_pilot_pages_show_the_current_job(served):
    [uuid] = served.submit([shell_job("sleep 30", name="long one")])
    served.pilot("-p", "1", "-e", "slurm-77")
    wait_until(lambda: served.job(uuid)["state"] == "running", 10, what="running")
    [pilot] = get_json(served, "/pilots")["pilots"]
    assert pilot["job"] == uuid and pilot["state"] == "running" and pilot["extra"] == "slurm-77"
    assert f"/job/{uuid}" in get(served, "/pilots")
    detail = get_json(served, f"/pilot/{pilot['uuid']}")
    assert detail["recent_jobs"][0]["uuid"] == uuid
    assert "long one" in get(served, f"/pilot/{pilot['uuid']}")
    assert get_json(served, "/pilots?state=lost")["pilots"] == []
    get(served, "/pilot/00000000-0000-0000-0000-000000000000", 404)


def test_metrics_in_prometheus_format(served):
    run_jobs(served, [shell_job("true"), shell_job("true"), shell_job("exit 1")])
    text = get(served, "/metrics")
    assert 'p3s_jobs{state="finished",jobtype="default"} 2' in text
    assert 'p3s_jobs{state="failed",jobtype="default"} 1' in text
    assert "p3s_claims_total 3" in text and 'p3s_pilots{state="stopped"} 1' in text
    assert re.search(r'p3s_claim_latency_seconds_bucket\{le="\+Inf"\} 3', text)
    assert "p3s_claim_latency_seconds_count 3" in text
    for line in text.splitlines():
        assert line.startswith("#") or re.fullmatch(r'[a-z_][a-z0-9_]*(\{[^}]*\})? [0-9.e+-]+', line), line
    assert get_json(served, "/metrics")["counters"]["claims"] == 3


def test_the_servers_token_and_database_are_never_served(tmp_path, start_server):
    server = start_server(["--files-root", str(tmp_path)])    # a careless root: all of it
    for name in ("token", "p3s.db", "p3s.db-wal"):
        body = get(server, "/file?" + urllib.parse.urlencode({"path": str(tmp_path / name)}), 403)
        assert "own token or database" in body and server.token_file.read_text().strip() not in body
    listing = [e["name"] for e in get_json(server, "/file?" + urllib.parse.urlencode({"path": str(tmp_path)}))["entries"]]
    assert "server.log" in listing and "token" not in listing and "p3s.db" not in listing
