"""The shifter's view, second pass: where jobs ran, the run grid, charts with a range, the job
type pages, lists that fit, and the expert pages, against a real server with real pilots."""
import html
import os
import re
from urllib.parse import urlencode

from conftest import COMPAT, Client, shell_job, tiny_png


def jobs_json(p3s, **query):
    return p3s.api.call("GET", "/jobs", query=dict(query, format="json"))["jobs"]


def test_jobs_tell_the_site_asked_for_from_where_they_ran_and_sites_link_to_them(p3s):
    for name in ("np04", "cern"):
        p3s.api.define_site(name)
    anywhere, at_cern = p3s.submit([shell_job("true", name="anywhere"), shell_job("exit 2", name="at-cern", site="cern")])
    p3s.run("pilot.py", "-s", "np04", "-c", "1", "-p", "1", "-L", p3s.logs)
    p3s.run("pilot.py", "-s", "cern", "-c", "1", "-p", "1", "-L", p3s.logs)
    assert [j["uuid"] for j in jobs_json(p3s, site="np04")] == [], "site= is the site asked for"
    [ran] = jobs_json(p3s, ran_site="np04")
    assert ran["uuid"] == anywhere and ran["site"] == "" and ran["host"]
    assert [j["uuid"] for j in jobs_json(p3s, ran_site="cern", state="problems", ended="1h")] == [at_cern]
    sites = p3s.page("/sites")
    assert 'href="/jobs?ran_site=np04&amp;state=finished&amp;ended=1h">1</a>' in sites
    assert 'href="/failures?site=cern&amp;since=1h">1</a>' in sites    # its one failed attempt
    assert "ended: expected a number of seconds" in p3s.page("/jobs?ended=soon", status=400)
    listing = p3s.page("/jobs")
    assert "ran at" in listing and "asked for" in listing and 'href="/jobs?ran_site=np04">np04</a>' in listing
    assert "per page:" in listing and 'href="?limit=400">400</a>' in listing
    assert re.search(r"<td>\d\d:\d\d:\d\d</td>", listing), "today's times are shown without the date"


def test_the_job_page_leads_with_the_input_file_and_shows_no_empty_labels(p3s):
    p3s.api.add_dag("d1", open(os.path.join(COMPAT, "1filter.graphml")).read())
    wf = p3s.api.create_workflow("d1", state="template")
    waiting_wf_job = wf["jobs"][0]["uuid"]
    failed, waiting = p3s.submit([
        shell_job("echo 'ERROR: RawDecoder: no frames' >&2; exit 3", name="Monitor:Main", infile="/eos/np04/np04_raw_run005010_0007.root"),
        shell_job("true", jobtype="nobody-takes-it")])
    p3s.run("pilot.py", "--jobtype", "default", "-c", "1", "-p", "1", "-L", p3s.logs)
    page = p3s.page(f"/job/{failed}")
    assert "<title>p3s: Job np04_raw_run005010_0007.root · Monitor:Main</title>" in page
    headline = page.split("<p style='font-size:120%'>")[1].split("</p>")[0]
    assert "ERROR: RawDecoder: no frames" in headline and "exit code <b>3</b>" in headline and "ran at" in headline
    assert "attempt" not in headline, "a job allowed one attempt says nothing about attempts"
    assert "pilot&#x27;s message" not in page and "errmsg" not in page and "<td>input file</td>" in page
    fields = page.split("<h2>Environment</h2>")[0]
    assert "<td>None</td>" not in fields and "<td></td>" not in fields
    waiting_page = p3s.page(f"/job/{waiting}")
    assert "waiting since" in waiting_page and "exit code" not in waiting_page.split("<h2>")[0]
    assert f"workflow.py -m -u {wf['uuid']} -s defined" in p3s.page(f"/job/{waiting_wf_job}")


def test_pilots_list_has_drop_downs_a_life_and_the_current_jobs_input_file(p3s):
    p3s.api.define_site("np04")
    [uuid] = p3s.submit([shell_job("sleep 30", infile="/eos/np04/np04_raw_run005010_0003.root")])
    p3s.pilot("-s", "np04", "-p", "1")
    from conftest import wait_until
    wait_until(lambda: p3s.job(uuid)["state"] == "running", 15, what="the job to run")
    page = p3s.page("/pilots")
    assert '<select name="state">' in page and '<option value="np04">np04</option>' in page
    assert "<th>life</th>" in page
    assert f'<a href="/job/{uuid}">np04_raw_run005010_0003.root</a>' in page
    assert p3s.page("/pilots?state=lost").count("<tr>") == 0


def test_an_idle_pilot_reads_idle_on_the_pages_and_no_jobs_in_the_api(p3s):
    p3s.pilot("-p", "1")
    from conftest import wait_until
    wait_until(lambda: [p for p in p3s.api.list_pilots() if p["state"] == "no jobs"], 15, what="an idle pilot")
    page = p3s.page("/pilots")
    assert '<span class="s-nojobs">idle</span>' in page and ">no jobs<" not in page


def test_errors_split_by_site_and_host_so_a_bad_node_stands_out(p3s):
    p3s.api.define_site("np04")
    bad = [shell_job("echo 'ProductNotFound: dunetpc v08' >&2; exit 65", jobtype="reco")] * 3
    p3s.submit(bad)
    p3s.run("pilot.py", "-s", "np04", "-c", "3", "-p", "1", "-L", p3s.logs, env=dict(p3s.env, P3S_NODE="node7"))
    p3s.submit([shell_job("echo 'ProductNotFound: dunetpc v08' >&2; exit 65", jobtype="reco"), shell_job("true")])
    p3s.run("pilot.py", "-s", "np04", "-c", "2", "-p", "1", "-L", p3s.logs, env=dict(p3s.env, P3S_NODE="node2"))
    data = p3s.api.call("GET", "/errors", query={"format": "json"})
    [error] = data["errors"]
    assert [(h["host"], h["last_24h"]) for h in error["hosts"]] == [("node7", 3), ("node2", 1)]
    assert [(h["host"], h["last_1h"]) for h in data["by_host"]] == [("node7", 3), ("node2", 1)]
    assert [(s["site"], s["last_24h"]) for s in data["by_site"]] == [("np04", 4)]
    page = p3s.page("/errors")
    assert "By host" in page and 'site=np04&amp;host=node7">np04 · node7</a> (3)' in page
    assert len(jobs_json(p3s, state="problems", ran_site="np04", host="node7", ended="1h")) == 3
    at_node7 = p3s.api.call("GET", "/failures", query={"format": "json", "site": "np04", "host": "node7"})
    assert at_node7["total"] == 3 and {f["host"] for f in at_node7["failures"]} == {"node7"}


def test_every_failed_attempt_the_summary_counts_is_listed_with_what_became_of_its_job(p3s, tmp_path):
    """The error summary counts attempts, a retried job's too; its counts link to those attempts,
    one a row, each with where it ran and its job's state now: the numbers and the list agree."""
    marker = tmp_path / "tried"
    flaky = (f"if [ -e {marker} ]; then exit 0; fi; touch {marker}; "
             "echo 'ERROR: RawDecoder: APA3 FEMB 12 returned no frames' >&2; exit 3")
    broken = "echo 'ERROR: RawDecoder: APA3 FEMB 7 returned no frames' >&2; exit 3"
    recovered, failed = p3s.submit([shell_job(flaky, jobtype="purity", max_attempts=2),
                                    shell_job(broken, jobtype="purity", max_attempts=2)])
    p3s.run("pilot.py", "-c", "4", "-p", "1", "-L", p3s.logs, env=dict(p3s.env, P3S_NODE="node7"))
    assert p3s.wait_jobs([recovered, failed], timeout=20) and p3s.job(failed)["state"] == "failed"
    [error] = p3s.api.call("GET", "/errors", query={"format": "json"})["errors"]
    assert (error["last_1h"], error["last_24h"]) == (3, 3)
    listed = p3s.api.call("GET", "/failures", query={"format": "json", "jobtype": "purity",
                                                      "reason": error["reason"], "since": "1h"})
    assert listed["total"] == 3 and not listed["more"]
    rows = sorted((f["uuid"], f["attempt"], f["now_state"], f["state"], f["exit_code"], f["host"])
                  for f in listed["failures"])
    assert rows == sorted([(recovered, 1, "finished", "failed", 3, "node7"), (failed, 1, "failed", "failed", 3, "node7"),
                           (failed, 2, "failed", "failed", 3, "node7")])
    assert {f["line"] for f in listed["failures"]} == {"ERROR: RawDecoder: APA3 FEMB 12 returned no frames",
                                                       "ERROR: RawDecoder: APA3 FEMB 7 returned no frames"}
    summary = p3s.page("/errors")
    count_link = html.escape(f"/failures?{urlencode({'jobtype': 'purity', 'reason': error['reason'], 'since': '1h'})}")
    assert f'href="{count_link}">3</a>' in summary
    page = p3s.page("/failures?jobtype=purity&since=24h")
    assert page.count("<tr>") == 1 + 3 and "1 of 2" in page and "2 of 2" in page and "(attempt 2)" in page
    assert "APA3 FEMB 12 returned no frames" in page and 'class="s-finished"' in page
    assert p3s.api.call("GET", "/failures", query={"format": "json", "host": "node2"})["total"] == 0
    p3s.page("/failures?since=forever", status=400)


def test_the_run_grid_shows_each_file_by_job_type_with_states_and_plots(p3s, tmp_path):
    png = tmp_path / "adc.png"
    tiny_png(png)
    runs = [f"/eos/np04/np04_raw_run00{run}_000{sub}.root" for run, sub in ((5009, 1), (5010, 1), (5010, 2))]
    for infile in runs:
        p3s.submit([shell_job(f"cp {png} $P3S_JOB_DIR/apa1.png", jobtype="monitor", infile=infile),
                    shell_job("echo 'ERROR: no frames' >&2; exit 3" if infile.endswith("5010_0002.root") else "true",
                              jobtype="purity", infile=infile),
                    shell_job("true", jobtype="evdisp", infile=infile)])
    p3s.run("pilot.py", "-c", "9", "-p", "1", "-L", p3s.logs)
    grid = p3s.api.call("GET", "/runs", query={"format": "json"})
    assert [(r["run"], r["subrun"]) for r in grid["rows"]] == [(5010, 2), (5010, 1), (5009, 1)]
    assert grid["types"] == ["evdisp", "monitor", "purity"], "columns by name, whatever the submission order"
    newest = grid["rows"][0]["jobs"]
    assert newest["purity"]["state"] == "failed" and newest["monitor"]["images"] == ["apa1.png"]
    chosen = p3s.api.call("GET", "/runs", query={"format": "json", "types": "evdisp,purity"})
    assert chosen["types"] == ["evdisp", "purity", "monitor"]
    only = p3s.api.call("GET", "/runs", query={"format": "json", "runs": "5009-5009"})
    assert [r["run"] for r in only["rows"]] == [5009]
    p3s.page("/runs?runs=five", status=400)
    page = p3s.page("/runs")
    assert 'class="cell g-failed"' in page and 'title="failed: ERROR: no frames"' in page
    assert 'failed<small class="why-cell">ERROR: no frames</small>' in page, "a wall screen cannot hover"
    assert page.count('<div class="strip"><img') == 3 and "run 5010 · 2" in page
    files = jobs_json(p3s, infile=runs[2])
    assert sorted(j["jobtype"] for j in files) == ["evdisp", "monitor", "purity"]
    p3s.submit([shell_job("true", jobtype="monitor", infile="/eos/np04/np04_raw_run005011_0001.root")])
    p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs)
    newest = p3s.page("/runs").split("run 5011 · 1")[1].split("</tr>")[0]
    assert newest.count('class="cell g-none" title="no purity job for this file">no job<') == 1
    assert 'title="no evdisp job for this file">no job<' in newest and "g-finished" in newest


def test_the_run_grid_keeps_a_saved_column_order_one_row_per_file_and_its_main_stream(p3s):
    """Found on a shift: columns that moved between refreshes, one file on two rows (named by
    path and by bare name), a DAG's text files interleaved with the raw files."""
    raw = "/eos/np04/np04_raw_run00{}_0001.root"
    p3s.submit([shell_job("true", jobtype=t, infile=raw.format(run)) for run in (5020, 5021) for t in ("purity", "monitor")]
               + [shell_job("true", jobtype="reco", env={"P3S_INPUT_DIR": "/eos/np04",
                                                         "P3S_INPUT_FILE": "np04_raw_run005021_0001.root"},
                            infile="np04_raw_run005021_0001.root"),
                  shell_job("true", jobtype="filter", infile="/scratch/wf/np04_raw_run005021_0001.txt")])
    grid = p3s.api.call("GET", "/runs", query={"format": "json"})
    assert [r["infile"] for r in grid["rows"]] == [raw.format(5021), raw.format(5020)], "one file, one row"
    assert set(grid["rows"][0]["jobs"]) == {"purity", "monitor", "reco"} and grid["stream"] == "/eos/np04"
    assert grid["types"] == ["monitor", "purity", "reco"]
    shifter = p3s.add_user("ann", "shifter")
    Client(p3s.url, token_file=shifter["P3S_TOKEN_FILE"]).call("PUT", "/api/runs/order", {"stream": "/eos/np04", "types": ["reco", "purity"]})
    for _ in range(2):
        assert p3s.api.call("GET", "/runs", query={"format": "json"})["types"] == ["reco", "purity", "monitor"]
    every = p3s.api.call("GET", "/runs", query={"format": "json", "stream": "all"})
    assert len(every["rows"]) == 3 and "filter" in every["types"]
    page = p3s.page("/runs")
    assert "/eos/np04 (2)</b>" in page and "/scratch/wf (1)" in page and "(saved: reco,purity)" in page


def test_an_injected_workflows_jobs_are_the_row_of_their_file(p3s, tmp_path):
    p3s.api.add_dag("filters", open(os.path.join(COMPAT, "3filters.graphml")).read())
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    out.mkdir()
    (inbox / "np04_raw_run005011_0001.txt").write_text("TEST1\n")
    assert p3s.run("injector.py", "-d", inbox, "--dag", "filters", "--outdir", out, "--settle", "0",
                   "-p", "0.2", "-c", "2").returncode == 0
    [row] = p3s.api.call("GET", "/runs", query={"format": "json"})["rows"]
    assert row["run"] == 5011 and set(row["jobs"]) >= {"filter"}


def test_a_job_type_page_shows_its_ends_durations_errors_and_cap(p3s):
    p3s.submit([shell_job("sleep 0.5", jobtype="reco")] * 3 + [shell_job("echo 'ERROR: bad APA3' >&2; exit 1",
                                                                        jobtype="reco"), shell_job("true")])
    p3s.run("pilot.py", "-c", "5", "-p", "1", "-L", p3s.logs)
    p3s.run("job.py", "-l", "-T", "reco", "-L", "4")
    data = p3s.api.call("GET", "/jobtype/reco", query={"format": "json"})
    assert data["counts"] == {"finished": 3, "failed": 1} and data["cap"] == 4
    assert data["profile"]["last_24h"]["n"] == 4 and 0.4 < data["profile"]["last_24h"]["median"] < 0.75
    assert [e["reason"] for e in data["errors"]] == ["ERROR: bad APA3"]
    assert sum(b["finished"] for b in data["activity"]["bins"]) == 3
    [point] = data["profile"]["points"]
    assert point["to"] - point["from"] == 600 and point["from"] <= point["ts"] <= point["to"]
    page = p3s.page("/jobtype/reco")
    assert "Duration (s)" in page and "ERROR: bad APA3" in page and "at most 4" in page
    medians = re.findall(r'<line x1="([\d.]+)" x2="([\d.]+)" y1="[\d.]+" y2="[\d.]+" stroke="#26c"', page)
    assert medians and all(float(x2) > float(x1) for x1, x2 in medians), "a bucket's median is a step, not a dot"
    assert 'href="/jobtype/reco">reco</a>' in p3s.page("/")
    p3s.page("/jobtype/nosuchtype", status=404)


def test_expert_pages_dag_workflow_progress_datasets_and_datatypes(p3s, tmp_path):
    p3s.api.add_dag("3filters", open(os.path.join(COMPAT, "3filters.graphml")).read(), description="three filters")
    data = tmp_path / "data"
    data.mkdir()
    (data / "input.txt").write_text("TEST1\nTEST2\n")                 # no TEST3: filter3's grep -c fails
    info = {f"{s}:{t}": {"dirpath": str(data) + "/"} for s, t in (("NOOP1", "filter1"), ("NOOP1", "filter2"),
                                                                  ("NOOP1", "filter3"), ("filter1", "NOOP2"),
                                                                  ("filter2", "NOOP2"), ("filter3", "NOOP2"))}
    info["NOOP1:filter1"]["name"] = info["NOOP1:filter2"]["name"] = info["NOOP1:filter3"]["name"] = "input.txt"
    wf = p3s.api.create_workflow("3filters", state="defined", fileinfo=info)
    assert p3s.api.get_workflow(wf["uuid"])["state"] == "defined", "no job started: the workflow is defined"
    p3s.run("pilot.py", "-c", "3", "-p", "1", "-L", p3s.logs)
    [row] = p3s.api.call("GET", "/workflows", query={"format": "json"})["workflows"]
    assert row["state"] == "failed" and (row["done"], row["vertices"]) == (3, 5)
    assert row["failure"]["vertex"] == "filter3" and row["failure"]["reason"] == "exit code 1"
    listing = p3s.page("/workflows")
    assert "3 / 5" in listing and ">filter3</a> failed" in listing and 'href="/dag/3filters"' in listing
    assert '<select name="user">' in listing
    dag = p3s.page("/dag/3filters")
    assert "<svg" in dag and "three filters" in dag and "<td>TXT</td>" in dag and wf["uuid"] in dag
    assert 'href="/dag/3filters"' in p3s.page("/dags")
    p3s.page("/dag/nosuchdag", status=404)
    files = p3s.page("/datasets")
    assert "from <a href=\"/job/" in files and ">filter1</a>" in files
    types = p3s.page("/datatypes")
    assert "<td>TXT</td><td>.txt</td>" in types
