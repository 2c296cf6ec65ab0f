"""Workflows with a real server and real pilots: order, parallelism, failure, noop, policies."""
import json
import os
import re

import pytest

from conftest import COMPAT, SHELL, graphml, register, wait_until

def start(p3s, dag, *args):
    result = p3s.run("workflow.py", "-a", dag, "-s", "defined", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def workflow_done(p3s, wfuuid, timeout=60):
    return wait_until(lambda: (lambda w: w if w["state"] in ("finished", "failed", "cancelled") else None)(
        p3s.api.get_workflow(wfuuid)), timeout, 0.1, "the workflow to end")


def jobs_by_vertex(p3s, wf):
    return {j["vertex"]: p3s.job(j["uuid"]) for j in wf["jobs"]}


def test_compat_graphml_files_load_and_round_trip(p3s):
    for name in ("1filter", "3filters", "twostep"):
        result = p3s.run("workflow.py", "-g", os.path.join(COMPAT, f"{name}.graphml"))
        assert result.returncode == 0, result.stderr
    dags = {d["name"]: d for d in p3s.api.list_dags()}
    assert {n: d["vertices"] for n, d in dags.items()} == {"1filter": 3, "3filters": 5, "twostep": 4}
    exported = p3s.run("workflow.py", "-G", "3filters")
    register(p3s, "copy", exported.stdout)
    original, copy = p3s.api.get_dag("3filters"), p3s.api.get_dag("copy")
    assert original["vertices"] == copy["vertices"] and original["edges"] == copy["edges"]
    assert p3s.run("workflow.py", "-g", os.path.join(COMPAT, "twostep.graphml")).returncode == 2, "name reused"


def test_3filters_runs_in_topological_order_with_datatags(p3s):
    data = p3s.dir / "data"
    data.mkdir()
    (data / "input.txt").write_text("TEST1\nTEST2\nTEST1\nTEST3\nTEST1\n")
    fileinfo = open(os.path.join(COMPAT, "fileinfo_3filters.json")).read().replace("/home/maxim/p3sdata/", f"{data}/")
    (p3s.dir / "fileinfo.json").write_text(fileinfo)
    p3s.run("workflow.py", "-g", os.path.join(COMPAT, "3filters.graphml"))
    wfuuid = start(p3s, "3filters", "-f", p3s.dir / "fileinfo.json")
    for _ in range(3):
        p3s.pilot("-p", "1", "--max-idle", "30")
    wf = workflow_done(p3s, wfuuid)
    assert wf["state"] == "finished"
    jobs = jobs_by_vertex(p3s, wf)
    assert all(j["state"] == "finished" for j in jobs.values())
    filters = [jobs[f"filter{i}"] for i in (1, 2, 3)]
    assert all(f["ts_sta"] >= jobs["NOOP1"]["ts_sto"] for f in filters)
    assert jobs["NOOP2"]["ts_sto"] >= max(f["ts_sto"] for f in filters)
    assert [(data / f"output{i}.txt").read_text().strip() for i in (1, 2, 3)] == ["3", "1", "1"]
    assert jobs["filter2"]["env"]["INPTXT"] == f"{data}/input.txt"
    assert jobs["filter2"]["env"]["OUTTXT2"] == f"{data}/output2.txt"
    assert {k for k in jobs["NOOP2"]["env"] if k.startswith("OUT")} == {"OUTTXT1", "OUTTXT2", "OUTTXT3"}
    noop_events = [e["new"] for e in jobs["NOOP1"]["events"]]
    assert "dispatched" not in noop_events, "a noop went to a pilot"
    assert all(d["state"] == "ready" for d in wf["datasets"])


def test_parallel_branches_run_in_parallel(p3s):
    register(p3s, "fan", graphml(
        [("root", "noop", ""), ("a", "work", "sleep 1.5", SHELL), ("b", "work", "sleep 1.5", SHELL),
         ("c", "work", "sleep 1.5", SHELL), ("sink", "noop", "")],
        [("root", x, "in", "") for x in "abc"] + [(x, "sink", "out", "") for x in "abc"]))
    wfuuid = start(p3s, "fan")
    for _ in range(3):
        p3s.pilot("-p", "1", "--max-idle", "30")
    jobs = jobs_by_vertex(p3s, workflow_done(p3s, wfuuid))
    branches = [jobs[x] for x in "abc"]
    assert max(j["ts_sta"] for j in branches) < min(j["ts_sto"] for j in branches), "branches ran one by one"
    assert len({j["pilot"] for j in branches}) == 3


def test_failing_middle_job_cancels_descendants_and_fails_the_workflow(p3s):
    p3s.run("workflow.py", "-g", os.path.join(COMPAT, "twostep.graphml"))
    jobinfo = json.dumps({"reduction": {"payload": "echo broken >&2; exit 4"}})
    wfuuid = start(p3s, "twostep", "-j", jobinfo, "-f", "sticky")
    p3s.pilot("-p", "1", "--max-idle", "30")
    wf = workflow_done(p3s, wfuuid)
    jobs = jobs_by_vertex(p3s, wf)
    assert wf["state"] == "failed"
    assert jobs["reduction"]["state"] == "failed" and jobs["reduction"]["exit_code"] == 4
    assert jobs["reco"]["state"] == "cancelled" and jobs["NOOP2"]["state"] == "cancelled"
    assert "parent reduction failed" in [e["info"] for e in jobs["reco"]["events"]][-1]
    assert "dispatched" not in [e["new"] for e in jobs["reco"]["events"]]
    page = p3s.page(f"/workflow/{wfuuid}")
    assert re.search(r'vertex <b>reduction</b> <span class="s-failed">failed</span>: broken', page), \
        "the workflow page does not name its failed vertex and why"


def test_retried_parent_does_not_cancel_children(p3s):
    marker = p3s.dir / "tried"
    register(p3s, "flaky", graphml(
        [("first", "work", f"if [ -e {marker} ]; then exit 0; fi; touch {marker}; exit 1", SHELL),
         ("second", "work", "true", SHELL)], [("first", "second", "f", "")]))
    wfuuid = start(p3s, "flaky", "-j", json.dumps({"first": {"max_attempts": 2}}))
    p3s.pilot("-p", "1", "--max-idle", "30")
    wf = workflow_done(p3s, wfuuid)
    jobs = jobs_by_vertex(p3s, wf)
    assert wf["state"] == "finished" and jobs["first"]["attempt"] == 2 and jobs["second"]["state"] == "finished"


def test_noop_in_the_middle_releases_children_and_several_roots_start(p3s):
    register(p3s, "mid", graphml(
        [("r1", "work", "true", SHELL), ("r2", "work", "true", SHELL), ("gate", "noop", ""),
         ("after", "work", "true", SHELL), ("end", "noop", "")],
        [("r1", "gate", "x", ""), ("r2", "gate", "y", ""), ("gate", "after", "z", ""), ("after", "end", "w", "")]))
    wfuuid = p3s.run("workflow.py", "-a", "mid").stdout.strip()
    wf = p3s.api.get_workflow(wfuuid)
    assert wf["state"] == "template" and {j["state"] for j in wf["jobs"]} == {"template"}
    assert p3s.run("workflow.py", "-m", "-u", wfuuid, "-s", "defined").returncode == 0
    states = {j["vertex"]: j["state"] for j in p3s.api.get_workflow(wfuuid)["jobs"]}
    assert states == {"r1": "defined", "r2": "defined", "gate": "template", "after": "template", "end": "template"}
    p3s.pilot("-p", "1", "--max-idle", "30")
    jobs = jobs_by_vertex(p3s, workflow_done(p3s, wfuuid))
    assert jobs["gate"]["state"] == "finished" and jobs["gate"]["pilot"] is None
    assert jobs["after"]["ts_sta"] >= max(jobs["r1"]["ts_sto"], jobs["r2"]["ts_sto"])
    assert jobs["end"]["state"] == "finished"


BAD_GRAPHS = [
    ("cycle", graphml([("a", "w", "true"), ("b", "w", "true")], [("a", "b", "f", ""), ("b", "a", "g", "")]),
     "cycle through a, b"),
    ("self loop", graphml([("a", "w", "true")], [("a", "a", "f", "")]), "cycle through a"),
    ("dangling", graphml([("a", "w", "true")], [("a", "ghost", "f", "")]), "'ghost' is not a node (dangling edge)"),
    ("unknown key", graphml([("a", "w", "true")], []).replace('attr.name="priority"', 'attr.name="colour"'),
     "unknown key 'colour'"),
    ("malformed", "<graphml><graph><node id='a'></graph>", "malformed XML"),
    ("entity", '<?xml version="1.0"?><!DOCTYPE g [<!ENTITY x "y">]><graphml/>', "DOCTYPE and ENTITY"),
    ("no payload", graphml([("a", "work", "")], []), "node a: payload: missing"),
    ("bad env", graphml([("a", "w", "true", "{not json")], []), "node a: env: not a JSON object"),
    ("bad datatag", graphml([("a", "w", "true"), ("b", "w", "true")], [("a", "b", "f", "BAD-TAG")]),
     "datatag 'BAD-TAG'"),
    ("empty", graphml([], []), "no nodes"),
]


@pytest.mark.parametrize("case,text,message", BAD_GRAPHS, ids=[c[0] for c in BAD_GRAPHS])
def test_bad_graphml_is_refused_and_nothing_stored(p3s, case, text, message):
    path = p3s.dir / "bad.graphml"
    path.write_text(text)
    result = p3s.run("workflow.py", "-g", path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert p3s.api.list_dags() == []


def test_file_name_policies(p3s):
    register(p3s, "chain", graphml([("src", "noop", ""), ("a", "w", "cat $IN > $OUT", SHELL), ("snk", "noop", "")],
                                   [("src", "a", "in.txt", "IN"), ("a", "snk", "out.txt", "OUT")]))

    def files(*args):
        wf = p3s.api.get_workflow(p3s.run("workflow.py", "-a", "chain", *args).stdout.strip())
        return [os.path.join(d["dirpath"], d["name"]) for d in wf["datasets"]]

    assert files("-f", "sticky") == ["/tmp/in.txt", "/tmp/out.txt"]
    assert p3s.run("workflow.py", "--datatype", "TXT:.text").returncode == 0
    assert "TXT  .text" in p3s.run("workflow.py", "--datatypes").stdout
    assert files()[0].endswith(".text"), "the datatype's extension was not used"
    assert p3s.run("workflow.py", "--datatype", "TXT:.txt").returncode == 0
    assert p3s.run("workflow.py", "--datatype", "TXT").returncode == 2
    generated = files()
    assert all(re.fullmatch(r"/tmp/[0-9a-f-]{36}\.txt", f) for f in generated) and generated[0] != generated[1]
    assert files("-f", "inherit:/data/run7.txt") == ["/data/run7.txt", "/tmp/run7_OUT.txt"]
    assert files("-f", '{"a:snk": {"name": "final.dat", "dirpath": "/out"}}')[1] == "/out/final.dat"
    bad = p3s.run("workflow.py", "-a", "chain", "-f", '{"a:b": {"name": "x"}}')
    assert bad.returncode == 2 and "'a:b' is not an edge of this DAG" in bad.stderr
    bad = p3s.run("workflow.py", "-a", "chain", "-j", '{"nope": {"priority": 1}}')
    assert bad.returncode == 2 and "'nope' is not a vertex" in bad.stderr
    bad = p3s.run("workflow.py", "-a", "chain", "-j", '{"a": {"priority": "high"}}')
    assert bad.returncode == 2 and "jobinfo.a.priority: must be an integer" in bad.stderr
    assert len(p3s.api.list_workflows()) == 5, "a refused workflow was stored"


def test_cancel_delete_and_workflow_page(p3s):
    register(p3s, "pair", graphml([("a", "w", "sleep 30", SHELL), ("b", "w", "true", SHELL)], [("a", "b", "f", "F")]))
    wfuuid = start(p3s, "pair")
    p3s.pilot("-p", "1")
    wait_until(lambda: p3s.api.get_workflow(wfuuid)["state"] == "running", 10, what="running workflow")
    page = p3s.run("workflow.py", "--show", wfuuid).stdout
    assert "a            running" in page
    from test_pages import get, get_json
    html = get(p3s, f"/workflow/{wfuuid}")
    assert html.count("<rect") == 2 and 'fill="#8bf"' in html and "<svg" in html
    assert get_json(p3s, f"/workflow/{wfuuid}")["state"] == "running"
    assert "pair" in get(p3s, "/dags") and wfuuid in get(p3s, "/workflows")
    b = next(j for j in p3s.api.get_workflow(wfuuid)["jobs"] if j["vertex"] == "b")
    assert "parents not finished: a (running)" in get_json(p3s, f"/job/{b['uuid']}")["why_waiting"][0]
    assert p3s.run("workflow.py", "-d", "-w", "workflow", "-u", wfuuid).returncode == 2, "deleted while running"
    assert p3s.run("workflow.py", "-m", "-u", wfuuid, "-s", "cancelled").returncode == 0
    wf = p3s.api.get_workflow(wfuuid)
    assert wf["state"] == "cancelled" and {j["state"] for j in wf["jobs"]} == {"cancelled"}
    wait_until(lambda: p3s.api.list_pilots()[0]["job"] is None, 10, what="the pilot to drop the cancelled job")
    assert p3s.run("workflow.py", "-d", "-w", "workflow", "-u", wfuuid).returncode == 0
    assert p3s.api.list_jobs() == [] and p3s.api.list_datasets() == []
    assert p3s.run("workflow.py", "-d", "-w", "dag", "-n", "pair").returncode == 0
    assert p3s.api.list_dags() == []


def test_cancelling_a_workflow_job_cancels_its_descendants_and_the_workflow(p3s):
    register(p3s, "line", graphml([("a", "w", "true", SHELL), ("b", "w", "true", SHELL), ("c", "w", "true", SHELL)],
                                  [("a", "b", "f", ""), ("b", "c", "g", "")]))
    wfuuid = start(p3s, "line")
    a = next(j for j in p3s.api.get_workflow(wfuuid)["jobs"] if j["vertex"] == "a")
    assert p3s.run("job.py", "-a", "-u", a["uuid"], "-s", "cancelled").returncode == 0
    wf = p3s.api.get_workflow(wfuuid)
    assert {j["vertex"]: j["state"] for j in wf["jobs"]} == {"a": "cancelled", "b": "cancelled", "c": "cancelled"}
    assert wf["state"] == "cancelled" and wf["ts_sto"] is not None


def test_workflow_jobs_are_released_by_their_parents_not_by_hand(p3s):
    register(p3s, "two", graphml([("a", "w", "true", SHELL), ("b", "w", "true", SHELL)], [("a", "b", "f", "")]))
    wfuuid = p3s.run("workflow.py", "-a", "two").stdout.strip()          # a template: not started
    jobs = {j["vertex"]: j["uuid"] for j in p3s.api.get_workflow(wfuuid)["jobs"]}
    refused = p3s.run("job.py", "-a", "-u", jobs["b"], "-s", "defined")
    assert refused.returncode == 2 and "releases it when its parents finish" in refused.stderr
    assert p3s.run("job.py", "-a", "-u", jobs["b"], "-P", "5").returncode == 0
    assert p3s.run("job.py", "-a", "-u", jobs["b"], "-s", "cancelled").returncode == 0
    states = {j["vertex"]: j["state"] for j in p3s.api.get_workflow(wfuuid)["jobs"]}
    assert states == {"a": "template", "b": "cancelled"}, "touching a job started the template workflow"


def test_an_empty_timelimit_in_graphml_means_the_default(p3s):
    text = graphml([("a", "w", "true")], []).replace('<data key="d104">60</data>', '<data key="d104"></data>')
    register(p3s, "empty", text)
    assert p3s.api.get_dag("empty")["vertices"][0]["timelimit"] == 3600


def test_workflow_list_shows_the_dags_and_workflows(p3s):
    from conftest import COMPAT
    assert p3s.run("workflow.py", "-g", os.path.join(COMPAT, "3filters.graphml")).returncode == 0
    uuid = p3s.run("workflow.py", "-a", "3filters", "-n", "nightly").stdout.strip()
    listing = p3s.run("workflow.py", "--list")
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    assert lines[0] == "DAGs:" and any(line.split()[0] == "3filters" for line in lines[1:])
    assert any(uuid in line and "nightly" in line for line in lines), listing.stdout


def test_a_file_read_by_three_vertices_is_one_row_of_its_workflow_page(p3s, tmp_path):
    """3filters.graphml: one input read by three filters was listed three times."""
    p3s.run("workflow.py", "-g", os.path.join(COMPAT, "3filters.graphml"))
    fileinfo = tmp_path / "fileinfo.json"
    fileinfo.write_text(open(os.path.join(COMPAT, "fileinfo_3filters.json")).read())
    wfuuid = start(p3s, "3filters", "-f", str(fileinfo))
    page = p3s.page(f"/workflow/{wfuuid}")
    files = page.split("<h2>Files</h2>")[1]
    assert files.count("/home/maxim/p3sdata/input.txt<") == 1
    assert files.count("<tr>") == 1 + 4, "one row per file: the input and three outputs"
