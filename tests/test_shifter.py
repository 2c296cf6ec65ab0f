"""What a shifter reads at 3 a.m.: failure reasons, the error summary, job filters, the plots jobs
publish, activity over time, the header; and job.py saying why jobs wait."""
import json
import os
import urllib.error
import urllib.request

import pytest

from conftest import shell_job, tiny_png, wait_until

DECODER = "ERROR: RawDecoder: APA{} FEMB {} returned no frames"


def run(p3s, jobs, pilots_args=("-p", "0")):
    """Submit jobs and run them with one pilot until they are done; their uuids."""
    uuids = p3s.submit(jobs)
    assert p3s.run("pilot.py", "-c", str(len(jobs)), *pilots_args, "-L", p3s.logs).returncode == 0
    p3s.wait_jobs(uuids)
    return uuids


def fetch(url, data=None, method="GET", headers=None):
    """(status, headers, body) of any answer, errors included."""
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_a_failures_reason_is_its_message_else_its_stderrs_last_line_else_its_exit_code(p3s):
    decoder = DECODER.format(3, 12)
    uuids = run(p3s, [shell_job(f"echo starting; echo '{decoder}' >&2; echo >&2; exit 3", name="purity",
                                infile="/eos/np04/run_012345_0007.root"),
                      shell_job("exit 4"), shell_job("sleep 5", timelimit=1), shell_job("true")])
    reasons = [p3s.job(u)["reason"] for u in uuids]
    assert reasons == [decoder, "exit code 4", "killed at its time limit of 1 s", ""]
    summary = p3s.api.call("GET", "/", query={"format": "json"})
    assert decoder in [f["reason"] for f in summary["recent_failures"]]
    assert decoder in p3s.page("/") and "run_012345_0007.root" in p3s.page("/")
    listing = p3s.run("job.py", "--list", "--state", "problems")
    assert listing.returncode == 0 and decoder in listing.stdout and "run_012345_0007.root" in listing.stdout
    assert len(listing.stdout.splitlines()) == 1 + 3
    shown = p3s.run("job.py", "--show", uuids[0]).stdout
    assert f"reason       {decoder}" in shown and "None" not in shown
    assert any(line.startswith("ts_sto") and line.split()[1].count("-") == 2 for line in shown.splitlines())
    as_json = json.loads(p3s.run("job.py", "--show", uuids[0], "--json").stdout)
    assert as_json["ts_sto"].endswith("Z") and as_json["events"][0]["ts"].endswith("Z")


def test_the_error_summary_groups_failures_by_reason_and_links_to_them(p3s):
    failing = [shell_job(f"echo '{DECODER.format(apa, femb)}' >&2; exit 3", jobtype="purity")
               for apa, femb in ((3, 12), (3, 7), (3, 140))]
    uuids = run(p3s, failing + [shell_job("echo 'disk quota exceeded' >&2; exit 1", jobtype="purity"),
                                shell_job(f"echo '{DECODER.format(2, 2)}' >&2; exit 3", jobtype="evdisp"),
                                shell_job("true", jobtype="purity")])
    errors = p3s.api.call("GET", "/errors", query={"format": "json"})["errors"]
    assert [(e["jobtype"], e["reason"], e["last_1h"], e["last_24h"]) for e in errors] == [
        ("purity", DECODER.format(3, "#"), 3, 3),             # identifiers stay: APA3, not APA#
        ("evdisp", DECODER.format(2, "#"), 1, 1), ("purity", "disk quota exceeded", 1, 1)]
    assert [e["shown"] for e in errors[:2]] == [DECODER.format(3, "#"), DECODER.format(2, 2)]
    matching = p3s.api.call("GET", "/jobs", query={"format": "json", "state": "problems", "jobtype": "purity",
                                                    "reason": errors[0]["reason"]})
    assert sorted(j["uuid"] for j in matching["jobs"]) == sorted(uuids[:3])
    page = p3s.page("/")
    assert "APA3 FEMB # returned no frames" in page and 'href="/errors"' in page


def test_the_error_summary_keeps_the_numbers_a_groups_failures_share(p3s):
    """The memory limit, the time limit, an exit code: the number that matters is the one every
    failure of the group has; only those that differ are folded to #."""
    memory = "used {:,} MB, over its memory limit of 2,000 MB"
    run(p3s, [shell_job(f"echo '{memory.format(mb)}' >&2; exit 1", jobtype="reco") for mb in (2100, 2450)]
        + [shell_job("sleep 5", jobtype="reco", timelimit=1) for _ in range(2)]
        + [shell_job("exit 65", jobtype="dqm") for _ in range(2)] + [shell_job("exit 3", jobtype="calib"),
                                                                     shell_job("exit 4", jobtype="calib")])
    shown = {(e["jobtype"], e["shown"]) for e in p3s.api.call("GET", "/errors", query={"format": "json"})["errors"]}
    assert shown == {("reco", "used # MB, over its memory limit of 2,000 MB"), ("reco", "killed at its time limit of 1 s"),
                     ("dqm", "exit code 65"), ("calib", "exit code #")}
    assert "over its memory limit of 2,000 MB" in p3s.page("/errors")
    assert "killed at its time limit of 1 s" in p3s.page("/jobtype/reco")


def test_job_filters_take_lists_groups_and_error_and_refuse_unknown_names(p3s):
    run(p3s, [shell_job("true", infile="/eos/np04/run_000777_0001.root"), shell_job("exit 3")])
    [held] = p3s.submit([shell_job("true", state="template")])
    assert p3s.run("job.py", "-a", "-u", held, "-s", "cancelled").returncode == 0

    def states(value):
        return sorted(j["state"] for j in p3s.api.call("GET", "/jobs", query={"format": "json", "state": value})["jobs"])
    assert states("failed,finished") == ["failed", "finished"]
    assert states("problems") == ["failed"] and states("error") == ["failed"]
    assert states("problems,cancelled") == ["cancelled", "failed"]
    assert [j["state"] for j in p3s.api.list_jobs(state="problems")] == ["failed"]
    for query, field in (("state=bogus", "state"), ("jobtype=nosuch", "jobtype")):
        with pytest.raises(Exception) as err:
            p3s.api.call("GET", "/jobs", query=dict([query.split("=")], format="json"))
        assert err.value.status == 400 and str(err.value).startswith(field + ":")
        page = p3s.page("/jobs?" + query, 400)
        assert f"{field}: " in page and query.split("=")[1] in page
    page = p3s.page("/jobs")
    assert '<span class="cut" title="/eos/np04/run_000777_0001.root">run 777 · 1</span>' in page, "the subrun cut off"
    assert '<select name="state">' in page and '<option value="problems">' in page
    assert '<option value="default">' in page


def test_a_job_publishes_its_images_within_the_servers_limits(tmp_path, start_server):
    server = start_server(["--max-image-bytes", "20000", "--max-images", "5"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name, rgb in (("adc_mean_apa1.png", (200, 0, 0)), ("adc_mean_apa2.png", (0, 0, 200))):
        tiny_png(tmp_path / name, rgb)
    tiny_png(elsewhere / "summary.png", (0, 150, 0))
    tiny_png(elsewhere / "zzz.png", (0, 150, 0))
    huge = tiny_png(tmp_path / "huge.png")
    huge.write_bytes(huge.read_bytes() + os.urandom(30000))        # a PNG over --max-image-bytes
    (tmp_path / "fake.png").write_text("not a png at all")
    (tmp_path / "evil.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    script = (f"cp {tmp_path}/adc_mean_apa1.png {tmp_path}/adc_mean_apa2.png {tmp_path}/evil.svg "
              f"{tmp_path}/fake.png {tmp_path}/huge.png $P3S_OUTPUT_DIR/; mkdir $P3S_OUTPUT_DIR/sub; "
              f"cp {tmp_path}/adc_mean_apa1.png $P3S_OUTPUT_DIR/sub/; echo notes > $P3S_OUTPUT_DIR/notes.txt")
    job = shell_job(script, jobtype="monitor", infile="/eos/run_000123_0001.root")
    job["env"].update(P3S_PUBLISH="$WHERE/*.png", WHERE=str(elsewhere))
    [uuid] = run(server, [job])
    assert server.job(uuid)["state"] == "finished", "a refused image must not fail the job"
    page = server.api.call("GET", f"/job/{uuid}", query={"format": "json"})
    names = [i["name"] for i in page["images"]]
    assert names == ["adc_mean_apa1.png", "adc_mean_apa2.png", "evil.svg", "sub_adc_mean_apa1.png",
                     "summary.png"], "5 of the 6 valid ones (--max-images 5), never fake.png or huge.png"
    kept = tmp_path / "p3s.db.files" / uuid
    assert sorted(os.listdir(kept)) == names
    status, headers, body = fetch(f"{server.url}/image/{uuid}/adc_mean_apa1.png")
    assert (status, headers["Content-Type"], headers["X-Content-Type-Options"]) == (200, "image/png", "nosniff")
    assert body == (tmp_path / "adc_mean_apa1.png").read_bytes()
    status, headers, _ = fetch(f"{server.url}/image/{uuid}/evil.svg")
    assert headers["Content-Type"] == "image/svg+xml" and "default-src 'none'" in headers["Content-Security-Policy"]
    assert fetch(f"{server.url}/image/{uuid}/nosuch.png")[0] == 404
    (kept / "adc_mean_apa2.png").unlink()               # removed behind the server's back
    status, _, body = fetch(f"{server.url}/image/{uuid}/adc_mean_apa2.png")
    assert status == 404 and b"no such image" in body
    plots = server.api.call("GET", "/plots", query={"format": "json", "infile": "run_000123"})
    assert [g["jobtype"] for g in plots["groups"]] == ["monitor"] and len(plots["groups"][0]["images"]) == 5
    assert server.api.call("GET", "/plots", query={"format": "json", "infile": "run_999"})["groups"] == []

    token = server.token_file.read_text().strip()
    status, _, body = fetch(f"{server.url}/api/jobs/{uuid}/images/late.png",
                            tiny_png(tmp_path / "late.png").read_bytes(), "PUT",
                            {"Authorization": "Bearer " + token})
    assert status == 403, "only the secret of the pilot that ran the job publishes"


def test_the_image_route_refuses_what_is_not_an_image_and_what_is_over_the_limits(tmp_path, start_server):
    server = start_server(["--max-image-bytes", "3000", "--max-images", "2"])
    pilot = server.api.register_pilot(heartbeat=60)["uuid"]
    [uuid] = server.api.submit_jobs([{"payload": "true"}])
    assert server.api.request_job(pilot, 0)["job"]["uuid"] == uuid
    png = tiny_png(tmp_path / "p.png").read_bytes()

    def put(name, data):
        try:
            return 200, server.api.publish_image(uuid, name, data, pilot)
        except Exception as e:
            return e.status, str(e)
    assert put("a.png", png)[0] == 200 and put("a.png", png)[0] == 200, "a repeat replaces"
    assert put("b.png", png)[0] == 200
    status, message = put("c.png", png)
    assert status == 400 and "already published 2 images" in message
    assert put("../../etc/x.png", png)[0] == 404, "not a name the route takes"
    assert put("page.html", b"<html>")[0] == 400
    assert put("a.gif", png) == (400, "a.gif: the content is not a GIF image")
    status, message = put("big.png", png + b"\0" * 4000)
    assert status == 413 and "over the image limit of 3000" in message
    server.api.report(uuid, {"pilot": pilot, "attempt": 1, "state": "finished", "exit_code": 0})
    assert put("a.png", png)[0] == 409, "a job that ended publishes nothing more"
    assert sorted(os.listdir(tmp_path / "p3s.db.files" / uuid)) == ["a.png", "b.png"]


def test_files_are_served_with_types_that_cannot_script_the_pages(tmp_path, start_server):
    root = tmp_path / "root"
    root.mkdir()
    tiny_png(root / "plot.png")
    (root / "fake.png").write_text("<script>alert(1)</script>")
    (root / "report.html").write_text("<html><script>alert(1)</script></html>")
    (root / "plot.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    server = start_server(["--files-root", str(root)])
    def served(name):
        status, headers, _ = fetch(f"{server.url}/file?path={root / name}")
        return status, headers["Content-Type"], headers.get("Content-Security-Policy", "")
    assert served("plot.png") == (200, "image/png", "")
    assert served("fake.png")[1] == "text/plain; charset=utf-8"
    assert served("report.html")[1] == "text/plain; charset=utf-8"
    status, ctype, policy = served("plot.svg")
    assert ctype == "image/svg+xml" and "default-src 'none'" in policy and "sandbox" in policy
    for path in ("/", "/jobs?format=json", "/api/health", "/nosuch", "/metrics", f"/file?path={root}"):
        assert fetch(server.url + path)[1]["X-Content-Type-Options"] == "nosniff", path


def test_retention_purges_published_images_with_their_job(tmp_path, start_server):
    server = start_server(["--retention-days", "0.00003", "--housekeeping", "0.2"])
    job = shell_job(f"cp {tiny_png(tmp_path / 'a.png')} $P3S_OUTPUT_DIR/")
    [uuid] = run(server, [job])
    kept = tmp_path / "p3s.db.files" / uuid
    assert (kept / "a.png").exists() or not server.api.list_jobs(), "published, unless already purged"
    wait_until(lambda: not kept.exists() and not server.api.list_jobs(), 20,
               what="the job and its image folder purged")


def test_activity_charts_count_claims_ends_and_samples(p3s):
    run(p3s, [shell_job("true"), shell_job("true"), shell_job("exit 2")])
    activity = p3s.api.call("GET", "/", query={"format": "json"})["activity"]
    assert activity["range"] == "15m" and len(activity["bins"]) == 15, "a young server's charts: 15 minutes"
    totals = [sum(b[k] for b in activity["bins"]) for k in ("started", "finished", "failed")]
    assert totals == [3, 2, 1]
    hour = p3s.api.call("GET", "/", query={"format": "json", "range": "1h"})["activity"]
    assert len(hour["bins"]) == 60 and sum(b["finished"] for b in hour["bins"]) == 2
    day = p3s.api.call("GET", "/", query={"format": "json", "range": "24h"})["activity"]
    assert len(day["bins"]) == 144 and sum(b["started"] for b in day["bins"]) == 3
    week = p3s.api.call("GET", "/", query={"format": "json", "range": "7d"})["activity"]
    assert len(week["bins"]) == 168 and sum(b["failed"] for b in week["bins"]) == 1
    p3s.page("/?range=2w", status=400)
    wait_until(lambda: p3s.api.call("GET", "/", query={"format": "json"})["activity"]["samples"], 10,
               what="the first per-minute sample")
    page = p3s.page("/?range=24h")
    assert page.count('<rect class="finished"') == 1 and page.count('<rect class="failed"') == 1
    assert "<script" not in page and "3 started, 2 finished, 1 failed" in page
    assert "range: " in page and '<a href="?range=7d">7d</a>' in page and "<b>24h</b>" in page


def test_the_summary_header_has_the_host_the_crews_links_and_a_refresh_choice(start_server):
    server = start_server(["--link", "Shifter manual=https://example.org/manual?a=1&b=2", "--link", "Elog=/elog"])
    page = server.page("/?refresh=30")
    assert '<a href="https://example.org/manual?a=1&amp;b=2">Shifter manual</a>' in page
    assert '<a href="/elog">Elog</a>' in page and os.uname().nodename in page and "load" in page
    assert '<meta http-equiv="refresh" content="30">' in page and "<b>30 s</b>" in page
    assert '<a href="?refresh=60">1 min</a>' in page
    bad = server.run("server.py", "--link", "no url here", "--port", "0")
    assert bad.returncode == 2 and "--link" in bad.stderr


def test_job_py_wait_says_why_no_live_pilot_takes_the_jobs(p3s):
    p3s.api.define_site("neutdqm")
    job = json.dumps([{"payload": "true", "jobtype": "purity", "site": "neutdqm"}])
    result = p3s.run("job.py", "-j", job, "--wait", "--wait-timeout", "2.5")     # notes every 30 s ...
    assert result.returncode == 1
    notes = [line for line in result.stderr.splitlines() if line.startswith("waiting: ")]
    assert notes and notes[0] == ("waiting: no live pilot takes jobtype 'purity' at site 'neutdqm' "
                                  "(0 pilot(s) alive)"), "... and the first at once"


def test_a_server_away_when_a_job_ends_costs_one_image_try_not_one_per_image(tmp_path, start_server):
    """The end report matters more than the plots: the pilot stops publishing at the first image
    the server cannot take for being away, and delivers the report once it is back."""
    server = start_server()
    for k in range(4):
        tiny_png(tmp_path / f"plot{k}.png")
    [uuid] = server.submit([shell_job(f"sleep 1; cp {tmp_path}/plot*.png $P3S_OUTPUT_DIR/")])
    server.pilot("-c", "1", "-p", "0")
    wait_until(lambda: server.job(uuid)["state"] == "running", 10, what="the job running")
    server.kill9()
    log = tmp_path / "pilots.log"
    wait_until(lambda: "not published" in log.read_text(), 20, what="the pilot giving up on the images")
    server.start()                  # back at once: a pilot going on to the next image would now publish it
    assert server.wait_jobs([uuid], timeout=30)[uuid]["state"] == "finished"
    assert log.read_text().count("not published") == 1
    assert server.api.call("GET", f"/job/{uuid}", query={"format": "json"})["images"] == [], \
        "the pilot went on publishing after the server was found away"
