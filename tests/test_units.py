"""The pure functions of server.py, in-process and from tables: validation, GraphML, DAG checks,
file naming, migrations, start-up checks and the HTML renderers fed hostile values. The
end-to-end tests elsewhere show the same rules hold through the real tools."""
import uuid as uuidlib
import json
import re
import sqlite3
import threading
import time
import os
import subprocess
import sys

import pytest

from conftest import COMPAT, ROOT, graphml
import server
from server import ApiError

BAD_JOBS = [
    ("wrong type", {"payload": "true", "priority": "high"}, "priority: must be an integer"),
    ("negative timeout", {"payload": "true", "timeout": "-5"}, "timeout: must be >= 0"),
    ("non-numeric timeout", {"payload": "true", "timeout": "soon"}, "timeout: must be an integer"),
    ("float timeout", {"payload": "true", "timeout": 1.5}, "timeout: must be an integer"),
    ("bool priority", {"payload": "true", "priority": True}, "priority: must be an integer"),
    ("missing payload", {"name": "x"}, "payload: missing"),
    ("empty payload", {"payload": "  "}, "payload: must not be empty"),
    ("unknown keys", {"payload": "true", "prio": 1, "colour": "red"}, "unknown key(s) colour, prio"),
    ("env not a map", {"payload": "true", "env": ["A"]}, "env: must be an object"),
    ("bad env name", {"payload": "true", "env": {"A-B": "1"}}, "not a valid environment variable"),
    ("env value a list", {"payload": "true", "env": {"A": [1]}}, "env.A: must be a string"),
    ("bad state", {"payload": "true", "state": "running"}, "state: unknown value 'running'"),
    ("both limits", {"payload": "true", "timeout": 1, "timelimit": 2}, "either timeout or timelimit"),
    ("bad uuid", {"payload": "true", "uuid": "x"}, "uuid: not a UUID"),
    ("zero attempts", {"payload": "true", "max_attempts": 0}, "max_attempts: must be >= 1"),
]


@pytest.mark.parametrize("case,job,message", BAD_JOBS, ids=[c[0] for c in BAD_JOBS])
def test_validate_job_refuses_naming_the_field(case, job, message):
    with pytest.raises(ApiError) as err:
        server.validate_job(job, "jobs[0]")
    assert err.value.status == 400 and message in err.value.message
    assert err.value.message.startswith("jobs[0]")


def test_validate_job_accepts_the_original_files_and_fills_defaults():
    for name in ("simplejob1.json", "job_template1.json", "threeSimpleJobs.json"):
        jobs = json.load(open(os.path.join(COMPAT, name)))
        for i, job in enumerate(jobs if isinstance(jobs, list) else [jobs]):
            row = server.validate_job(job, f"{name}[{i}]")
            assert row["state"] in ("defined", "template") and row["timelimit"] >= 0
    row = server.validate_job({"payload": "/bin/true", "timeout": "100", "env": {"N": 3}}, "job")
    assert row["timelimit"] == 100 and json.loads(row["env"]) == {"N": "3"} and row["jobtype"] == "default"


def test_a_submission_with_a_repeated_uuid_or_no_jobs_is_refused():
    uuid = "0b7e3c1e-98f4-4a8e-9d2b-6d7b3f1a2c3d"
    for body, message in (({"jobs": []}, "non-empty list"), ({"jobs": "x"}, "non-empty list"),
                          ({"jobs": [{"payload": "a", "uuid": uuid}] * 2}, "same uuid appears twice")):
        with pytest.raises(ApiError, match=message):
            server.validate_submission(body)


BAD_GRAPHS = [
    ("entity", '<!DOCTYPE x [<!ENTITY a "b">]><graphml/>', "DOCTYPE and ENTITY"),
    ("not xml", "<graphml><graph>", "malformed XML"),
    ("no graph", '<graphml xmlns="http://graphml.graphdrawing.org/xmlns"/>', "no <graph>"),
    ("cycle", graphml([("a", "x", "true"), ("b", "x", "true")],
                      [("a", "b", "f", "F"), ("b", "a", "g", "G")]), "cycle through a, b"),
    ("dangling", graphml([("a", "x", "true")], [("a", "zz", "f", "F")]), "'zz' is not a node"),
    ("twice", graphml([("a", "x", "true"), ("b", "x", "true")],
                      [("a", "b", "f", "F"), ("a", "b", "g", "G")]), "appears twice"),
    ("duplicate node", graphml([("a", "x", "true"), ("a", "x", "true")], []), "duplicate node id(s) a"),
    ("no payload", graphml([("a", "x", "")], []), "payload: missing"),
    ("bad datatag", graphml([("a", "x", "true"), ("b", "x", "true")], [("a", "b", "f", "1X")]),
     "datatag '1X'"),
]


@pytest.mark.parametrize("case,text,message", BAD_GRAPHS, ids=[c[0] for c in BAD_GRAPHS])
def test_parse_graphml_refuses_with_a_reason(case, text, message):
    with pytest.raises(ApiError) as err:
        server.parse_graphml(text)
    assert err.value.status == 400 and message in err.value.message, err.value.message


@pytest.mark.parametrize("name", ["1filter", "3filters", "twostep"])
def test_original_graphml_parses_and_round_trips(name):
    vertices, edges = server.parse_graphml(open(os.path.join(COMPAT, f"{name}.graphml")).read())
    assert vertices and server.parse_graphml(server.to_graphml(vertices, edges)) == (vertices, edges)


def test_topological_order_puts_parents_first_and_finds_the_cycle():
    edges = [{"source": "a", "target": "b"}, {"source": "b", "target": "c"}, {"source": "a", "target": "c"}]
    assert server.topological_order(["c", "b", "a"], edges) == (["a", "b", "c"], [])
    assert server.topological_order(["a", "b"], [{"source": "a", "target": "b"},
                                                 {"source": "b", "target": "a"}])[1] == ["a", "b"]


def test_name_files_under_each_policy():
    edges = [{"source": "in", "target": "f", "name": "x", "dirpath": "/d", "datatype": "ROOT",
              "datatag": "RAW", "comment": ""},
             {"source": "f", "target": "out", "name": "y", "dirpath": "/d", "datatype": "TXT",
              "datatag": "HIST", "comment": ""}]
    ext = {"ROOT": ".root", "TXT": ".txt"}
    generated = server.name_files(edges, None, ext, {"in"})
    assert generated[0]["name"].endswith(".root") and len(generated[0]["name"]) == 36 + 5
    assert [f["name"] for f in server.name_files(edges, "sticky", ext, {"in"})] == ["x", "y"]
    inherited = server.name_files(edges, "inherit:/data/run7.root", ext, {"in"})
    assert (inherited[0]["dirpath"], inherited[0]["name"]) == ("/data", "run7.root")
    assert inherited[1]["name"] == "run7_HIST.txt"
    mapped = server.name_files(edges, {"f:out": {"name": "z.txt"}}, ext, {"in"})
    assert mapped[1]["name"] == "z.txt" and mapped[0]["name"] != "x"
    with pytest.raises(ApiError, match="'a:b' is not an edge"):
        server.validate_fileinfo({"a:b": {}}, edges)


def test_statements_keep_trigger_bodies_and_strings_whole():
    script = ("CREATE TABLE t(a); CREATE TRIGGER x AFTER INSERT ON t BEGIN UPDATE t SET a = ';'; "
              "DELETE FROM t WHERE a = 'b;c'; END; INSERT INTO t VALUES('1;2');")
    found = [s.strip() for s in server.statements(script)]
    assert len(found) == 3 and found[1].startswith("CREATE TRIGGER") and found[1].endswith("END;")


def test_every_migration_runs_on_an_empty_database(tmp_path):
    store = server.Store(str(tmp_path / "x.db"))
    assert store.schema_version == len(server.MIGRATIONS)
    assert store.read_one("PRAGMA journal_mode")[0] == "wal"
    store.close()


def test_an_end_report_that_claims_the_next_job_leaves_the_pilot_in_the_right_state(tmp_path):
    """The end report leaves the pilot's state to the claim in the same transaction: it holds
    its next job (dispatched), or none (no jobs), or, told to drain, none (active); its jobs are
    counted and the pilots' counts table agrees with the pilots."""
    store = server.Store(str(tmp_path / "p.db"))
    service = server.Service(store)
    p = service.register({"secret": "s" * 20, "heartbeat": 30})
    service.submit({"jobs": [{"payload": "x"} for _ in range(2)]}, "t")
    job = service.broker.request_job(p["uuid"], {}, p["secret"])["job"]

    def end(job):
        return service.report(job["uuid"], {"pilot": p["uuid"], "attempt": 1, "state": "finished", "exit_code": 0,
                                            "runtime": 0.01, "next": True}, p["secret"])["next"]

    def pilot():
        row = store.read_one("SELECT state, job, jobs_done FROM pilots WHERE uuid=?", (p["uuid"],))
        counts = dict(store.read("SELECT state, n FROM pilot_counts WHERE n > 0"))
        assert counts == {row["state"]: 1}, counts
        return tuple(row)
    following = end(job)["job"]
    assert pilot() == ("dispatched", following["uuid"], 1)
    service.mark_pilots({"directive": "drain", "uuid": p["uuid"]}, "ann")
    assert end(following) == {"job": None, "directive": "drain"}
    assert pilot() == ("active", None, 2)
    store.close()


def test_a_job_in_reserve_waits_behind_the_one_held_and_goes_back_as_it_was(tmp_path):
    """An end report with `ahead` claims the next job and one in reserve; later ones, holding the
    reserve, claim one more, unless a request waits for work. A pilot whose lease runs out gives
    its reserve back as it was (no attempt used); the job it ran ends pilotTO. A reserve given
    back by its pilot goes back once."""
    store = server.Store(str(tmp_path / "p.db"))
    service = server.Service(store)
    p, q = (service.register({"secret": c * 20, "heartbeat": 30}) for c in "pq")
    uuids = service.submit({"jobs": [{"payload": "x"} for _ in range(7)]}, "t")["uuids"]
    first = service.broker.request_job(p["uuid"], {}, p["secret"])["job"]["uuid"]

    def end(pilot, uuid, **more):
        return service.report(uuid, {"pilot": pilot["uuid"], "attempt": 1, "state": "finished", "exit_code": 0,
                                     "runtime": 0.01, "next": True, **more}, pilot["secret"])["next"]

    def row():
        return tuple(store.read_one("SELECT state, job, reserve FROM pilots WHERE uuid=?", (p["uuid"],)))

    def job(uuid):
        return tuple(store.read_one("SELECT state, pilot, attempt FROM jobs WHERE uuid=?", (uuid,)))
    claimed = end(p, first, ahead=True)
    assert [claimed["job"]["uuid"], claimed["reserve"]["uuid"]] == uuids[1:3]
    assert row() == ("dispatched", uuids[1], uuids[2])
    claimed = end(p, uuids[1], ahead=True, holding=uuids[2])
    assert claimed["job"]["uuid"] == uuids[3] and claimed["reserve"] is None
    assert row() == ("dispatched", uuids[2], uuids[3])
    service.broker.waiting = 1      # a pilot waits for work: it takes the next job, not a reserve
    assert end(p, uuids[2], ahead=True, holding=uuids[3])["job"] is None
    service.broker.waiting = 0
    assert row() == ("dispatched", uuids[3], None) and job(uuids[4])[0] == "defined"
    for bad_report in ({"holding": uuids[4]}, {"ahead": "yes"}, {"ahead": True, "next": False}):
        with pytest.raises(ApiError, match="holding|ahead"):
            end(p, uuids[3], **bad_report)
    claimed = end(p, uuids[3], ahead=True)          # holding none: the next job, and one in reserve
    held, reserve = claimed["job"]["uuid"], claimed["reserve"]["uuid"]
    service.housekeep()                     # the beats heard in memory are written; then p falls silent
    with store.transaction() as conn:
        conn.execute("UPDATE pilots SET ts_beat = 0 WHERE uuid=?", (p["uuid"],))
    service.resumed = 0
    service.housekeep()
    assert job(held) == ("pilotTO", p["uuid"], 1) and job(reserve) == ("defined", None, 1)
    service.submit({"jobs": [{"payload": "x"} for _ in range(2)]}, "t")
    claimed = end(q, service.broker.request_job(q["uuid"], {}, q["secret"])["job"]["uuid"], ahead=True)
    for given_back in (True, False):        # a repeat changes nothing
        assert service.release_reserve(q["uuid"], {"job": claimed["reserve"]["uuid"]}, q["secret"]) == \
            {"released": given_back}
    assert job(claimed["reserve"]["uuid"]) == ("defined", None, 1) and job(claimed["job"]["uuid"])[1] == q["uuid"]
    store.close()


def database_at(path, version):
    """An open connection to a new database at schema `version`, as an older server left it."""
    conn = server.connect(path)
    for step in server.MIGRATIONS[:version]:
        for statement in server.statements(step):
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version={version}")
    return conn


def test_v16_keeps_each_jobs_provenance_now_kept_by_its_id(tmp_path):
    """A v15 database's provenance (by uuid) is moved to its job's id, still found by the job's
    uuid, and goes with its job."""
    path = str(tmp_path / "old.db")
    conn = database_at(path, 15)
    for i, uuid in enumerate(("u-a", "u-b")):
        conn.execute("INSERT INTO jobs(uuid, payload, state, ts_def) VALUES(?, 'x', 'finished', 1)", (uuid,))
        conn.execute("INSERT INTO provenance(uuid, data) VALUES(?, ?)", (uuid, f'{{"host": "n{i}"}}'))
    conn.close()
    store = server.Store(path)
    assert store.schema_version == len(server.MIGRATIONS)
    assert [store.read_one(server.PROVENANCE_OF, (u,))[0] for u in ("u-a", "u-b")] == ['{"host": "n0"}', '{"host": "n1"}']
    with store.transaction() as conn:
        conn.execute("DELETE FROM jobs WHERE uuid='u-a'")
    assert store.read_one("SELECT COUNT(*) FROM provenance")[0] == 1
    assert store.read_one(server.PROVENANCE_OF, ("u-b",))[0] == '{"host": "n1"}'
    store.close()


def test_v20_finds_a_jobs_history_by_its_id_and_the_rest_by_uuid(tmp_path):
    """A v19 database's history: a job's rows get its job's id (its page shows them), those of
    a job gone and of a pilot stay found by uuid."""
    path = str(tmp_path / "old.db")
    conn = database_at(path, 19)
    conn.execute("INSERT INTO jobs(uuid, payload, state, ts_def) VALUES('j-1', 'x', 'finished', 1)")
    conn.executemany("INSERT INTO events(ts, kind, uuid, old, new, who) VALUES(?, ?, ?, ?, ?, 'w')",
                     [(1, "job", "j-1", None, "defined"), (2, "job", "j-gone", None, "defined"),
                      (3, "pilot", "p-1", None, "active"), (4, "job", "j-1", "defined", "finished")])
    conn.close()
    store = server.Store(path)
    service = server.Service(store)
    assert [e["new"] for e in service.get_job("j-1")["events"]] == ["defined", "finished"]
    by_uuid = store.read("SELECT uuid FROM events INDEXED BY events_uuid WHERE job IS NULL ORDER BY id")
    store.close()
    assert [r[0] for r in by_uuid] == ["j-gone", "p-1"]


@pytest.mark.parametrize("python,sqlite,problem", [
    ((3, 9, 18), (3, 34, 1), None),
    ((3, 9, 0), (3, 26, 0), None),
    ((3, 8, 10), (3, 40, 0), "Python 3.8.10 is older than 3.9"),
    ((3, 11, 7), (3, 22, 0), "sqlite 3.22.0 is older than 3.26.0"),
])
def test_the_version_floor_says_what_was_found_and_what_is_needed(python, sqlite, problem):
    found = server.floor_problem(python, sqlite)
    assert found == problem if problem is None else problem in found


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /afs rw,relatime shared:20 - afs AFS rw
41 22 0:36 / /eos/user rw,nosuid shared:21 - fuse.eos eosxd rw,user_id=0
42 22 0:37 / /mnt/nfs\\040share rw - nfs4 srv:/export rw,vers=4.2
43 22 0:38 / /var/tmp rw - tmpfs tmpfs rw
44 22 0:39 / /media/usb rw - fuseblk /dev/sdb1 rw
"""


@pytest.mark.parametrize("path,fstype,network", [
    ("/afs/cern.ch/user/s/shifter/p3s", "afs", True),
    ("/eos/user/s/shifter/data", "fuse.eos", True),
    ("/mnt/nfs share/p3s", "nfs4", True),
    ("/var/tmp/shifter", "tmpfs", False),
    ("/var/tmpfoo", "ext4", False),
    ("/media/usb/x", "fuseblk", False),
])
def test_the_filesystem_of_a_path_comes_from_its_longest_mount_point(tmp_path, path, fstype, network):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    found = server.filesystem_type(path, str(info))
    assert found == fstype and server.is_network_fs(found) == network


def test_a_database_on_a_network_filesystem_is_refused_unless_allowed(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    on_afs = "/afs/cern.ch/user/s/shifter/p3s/p3s.db"
    with pytest.raises(server.StartupError, match=r"on afs, a network filesystem.*--db /var/tmp/"):
        server.check_db_filesystem(on_afs, False, str(info))
    server.check_db_filesystem(on_afs, True, str(info))
    server.check_db_filesystem("/var/tmp/shifter/p3s.db", False, str(info))


HOSTILE = '<script>alert(1)</script>"\'&'


def hostile_job():
    return {"uuid": "0b7e3c1e-98f4-4a8e-9d2b-6d7b3f1a2c3d", "name": HOSTILE, "user": HOSTILE,
            "jobtype": HOSTILE, "payload": HOSTILE, "params": HOSTILE, "env": {"X": HOSTILE},
            "priority": 0, "timelimit": 5, "site": HOSTILE, "state": "failed", "attempt": 1,
            "max_attempts": 1, "pilot": None, "wfuuid": None, "vertex": None, "infile": HOSTILE,
            "exit_code": 3, "errmsg": HOSTILE, "stdout_tail": HOSTILE, "stderr_tail": HOSTILE,
            "stdout_path": "", "stderr_path": "", "host": HOSTILE, "pid": 1, "ts_def": 1.0,
            "ts_dis": 2.0, "ts_sta": 3.0, "ts_sto": 4.0, "reason": HOSTILE, "ran_site": HOSTILE,
            "events": [{"ts": 1.0, "old": None, "new": "failed", "who": HOSTILE, "attempt": 1,
                        "info": HOSTILE}],
            "why_waiting": [HOSTILE], "logs": [], "files": [{"label": HOSTILE, "path": HOSTILE, "url": None}],
            "images": [{"name": HOSTILE, "type": "image/png", "size": 1}]}


def rendered_pages(query):
    note = {"kind": "run", "target": HOSTILE, "text": HOSTILE, "who": HOSTILE, "hide": 1, "ts": 1.0}
    job = dict(hostile_job(), verdict="BAD", verdict_check=HOSTILE, verdict_note=HOSTILE, notes=[note],
               checks=[{"name": HOSTILE, "result": "BAD", "message": HOSTILE}], metrics={HOSTILE: 1.5})
    place = {"site": HOSTILE, "host": HOSTILE, "jobtype": HOSTILE, "reason": HOSTILE, "last_1h": 1, "last_24h": 2}
    errors = [{"jobtype": HOSTILE, "reason": HOSTILE, "shown": HOSTILE, "last_1h": 1, "last_24h": 2, "first": 1.0,
               "last": 2.0, "hosts": [place]}]
    t = 86400.0 * 365
    activity = {"range": "24h", "span": 86400, "bucket": 600,
                "bins": [{"start": t - 600, "started": 1, "finished": 1, "failed": 1}],
                "samples": [{"ts": t - 60, "pilots": 2, "running": 1, "queued": 3}]}
    ack = {"kind": "silence", "who": HOSTILE, "why": HOSTILE, "until": t + 60}
    alarms = [{"name": "no_pilots", "key": HOSTILE, "message": HOSTILE, "link": "/", "severity": "critical",
               "since": t - 60, "ack": None},
              {"name": "starving", "key": HOSTILE, "message": HOSTILE, "link": "/", "severity": "warning",
               "since": t - 60, "ack": ack, "explained_by": HOSTILE}]
    summary = {"time": t, "jobs_by_state": {"failed": 1}, "jobs_by_jobtype": {HOSTILE: {"failed": 1}},
               "pilots_by_state": {HOSTILE: 1}, "ended": {"1h": {"failed": 1}},
               "recent_failures": [job], "latency": {"median_s": None}, "errors": errors, "activity": activity,
               "server": {"host": HOSTILE, "load": [0.5, 0.4, 0.3], "links": [{"name": HOSTILE, "url": HOSTILE}]},
               "alarms": alarms, "caps": {HOSTILE: 3}, "notes": [note], "bad_data": {"BAD": 2}}
    choices = {"state": [HOSTILE], "jobtype": [HOSTILE], "site": [HOSTILE]}
    listing = {"jobs": [job], "page": 1, "limit": 25, "more": False, "total": 1, "sort": "submitted",
               "order": "desc", "choices": choices}
    plots = {"groups": [{"jobtype": HOSTILE, "images": [{"job": job["uuid"], "name": HOSTILE, "size": 1,
                                                         "infile": HOSTILE, "ts": 1.0, "job_name": HOSTILE,
                                                         "state": "finished"}]}], "choices": choices}
    pilot = {"uuid": job["uuid"], "state": HOSTILE, "host": HOSTILE, "pid": 1, "site": HOSTILE,
             "jobtypes": [HOSTILE], "beat_age": 1.0, "life": 5.0, "jobs_done": 0, "job": job["uuid"],
             "current": {"uuid": job["uuid"], "name": HOSTILE, "infile": HOSTILE}, "extra": HOSTILE,
             "ts_reg": 1.0, "heartbeat": 10, "recent_jobs": [job], "events": job["events"],
             "logs": [{"label": HOSTILE, "path": HOSTILE, "url": None}]}
    workflow = {"uuid": job["uuid"], "name": HOSTILE, "state": "running", "dag": HOSTILE,
                "description": HOSTILE, "jobs": [dict(job, vertex=HOSTILE)],
                "datasets": []}
    site = {"name": HOSTILE, "pilots": 3, "tolerance": None, "live": 1, "running": 0, "idle": 1, "lost_1h": 0,
            "finished_1h": 2, "failed_attempts_1h": 1, "ended_1h": 0, "mean_life_1h": None, "pilotlife": None,
            "server": HOSTILE, "period": 1, "cycles": 0, "heartbeat": 1, "env": {"X": HOSTILE},
            "pilots_list": [pilot], "page": 1, "more": False, "limit": 25, "pending": 0, "missing": 2, "factory": HOSTILE,
            "factory_period": 60, "keep_hours": None,
            "requests": [{"ts": 1.0, "count": 2, "registered": 1, "pending": 1, "died_young": 0, "state": HOSTILE}]}
    service = {"name": HOSTILE, "host": HOSTILE, "period": 0, "retired": None, "silent": False, "age": 1.0,
               "result": HOSTILE, "lines": [{"ts": 1.0, "result": HOSTILE}]}
    pilot = dict(pilot, free_mb=12.0, note=HOSTILE)
    return [server.render_sites({"sites": [site]}, query), server.render_site(site, query),
            server.render_services({"services": [service]}, query), server.render_service(service, query),
            server.render_alarms({"alarms": alarms, "events": [{"ts": t, "kind": HOSTILE, "key": HOSTILE,
                                                                 "severity": HOSTILE, "message": HOSTILE,
                                                                 "who": HOSTILE, "why": HOSTILE}]}, query),
            server.render_summary(summary, query), server.render_jobs(listing, query),
            server.render_job(job, query), server.render_pilot(pilot, query),
            server.render_pilots({"pilots": [pilot], "page": 1, "more": False, "limit": 25, "choices": choices}, query),
            server.render_workflow(workflow, query), server.render_errors({"errors": errors, "by_site": [place], "by_host": [place]}, query),
            server.render_plots(plots, query), server.render_plots(plots, {"group": "run"}),
            server.render_trend({"jobtype": HOSTILE, "metric": HOSTILE, "filters": {}, "reference":
                                 {"run": HOSTILE, "value": 2.0}, "band": {"warn": [1.0, 3.0], "error": [None, 5.0]},
                                 "points": [{"job": HOSTILE, "run": 5010, "subrun": 1, "value": 2.5},
                                            {"job": HOSTILE, "run": 5011, "subrun": None, "value": 1e300}]}, query),
            server.render_job(dict(job, reference={"run": HOSTILE, "job": HOSTILE, "who": HOSTILE, "why": HOSTILE,
                                                   "images": [HOSTILE], "metrics": {HOSTILE: 0.0}},
                                   images=[{"name": HOSTILE, "type": "image/png", "size": 1}]), query),
            server.render_runs({"rows": [{"infile": HOSTILE, "ts": 1.0, "run": None, "subrun": None,
                                          "jobs": {HOSTILE: dict(job, images=[HOSTILE])}, "verdict": "BAD",
                                          "verdict_by": HOSTILE, "notes": [note]}], "types": [HOSTILE], "bad_cells": {HOSTILE: 1},
                                "page": 1, "limit": 25, "more": False, "filters": {"types": HOSTILE, "runs": "5003"},
                                "stream": HOSTILE, "streams": [{"stream": HOSTILE, "files": 2}, {"stream": "/x", "files": 1}],
                                "saved_order": HOSTILE, "time": 1.0, "choices": choices}, query),
            server.render_workflows({"workflows": [dict(workflow, user=HOSTILE, done=1, vertices=2, ts_def=1.0,
                                                        ts_sto=None, failure=dict(job, vertex=HOSTILE))],
                                     "page": 1, "limit": 25, "more": False, "choices": choices}, query),
            server.render_dag({"name": HOSTILE, "description": HOSTILE, "workflows": [],
                               "vertices": [{"name": HOSTILE, "jobtype": HOSTILE, "payload": HOSTILE,
                                             "timelimit": 1, "priority": 0}],
                               "edges": [{"source": HOSTILE, "target": HOSTILE, "dirpath": HOSTILE, "name": HOSTILE,
                                          "datatype": HOSTILE, "datatag": HOSTILE, "comment": HOSTILE}]}, query),
            server.render_datatypes({"datatypes": [{"name": HOSTILE, "ext": HOSTILE, "comment": HOSTILE}]}, query),
            server.render_datasets({"datasets": [{"dirpath": HOSTILE, "name": HOSTILE, "datatype": HOSTILE,
                                                  "datatag": HOSTILE, "state": HOSTILE, "origin": "injected",
                                                  "wfuuid": None, "producer": job["uuid"], "consumer": None,
                                                  "producer_name": HOSTILE, "ts": 1.0}],
                                    "page": 1, "limit": 25, "more": False}, query)]


def test_renderers_escape_every_hostile_value():
    signed_in = server.PageQuery(state=HOSTILE)
    signed_in.viewer = server.Viewer(server.Caller(HOSTILE, "shifter"), HOSTILE)
    signed_in.target = HOSTILE
    for query in ({"state": HOSTILE}, signed_in):
        for html in rendered_pages(query):
            assert "<script>" not in html and "&lt;script&gt;" in html
    assert any('action="/act"' in html for html in rendered_pages(signed_in)), "no action form was rendered"


def test_every_route_names_an_operation_that_exists(tmp_path):
    store = server.Store(str(tmp_path / "x.db"))
    service = server.Service(store)
    for method, path, name, parts, write in server.API:
        assert callable(server.operation(service, name)), f"{method} {path}: {name}"
        assert server.path_regex(path).match(path.replace("<uuid>", "u").replace("<dag>", "d")
                                             .replace("<name>", "n"))
    for action, (name, _) in server.PAGE_ACTIONS.items():
        assert name in server.WRITES, f"page action {action}: {name} is no route a role guards"
    views = server.Views(service, [str(tmp_path)])
    for regex, name, render in server.PAGES:
        assert callable(getattr(views, name)) and callable(render)
    store.close()


def test_server_py_imports_nothing_of_ours():
    """server.py runs alone: copied anywhere by itself, `python server.py` works."""
    import ast
    tree = ast.parse(open(os.path.join(ROOT, "server.py")).read())
    ours = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")} - {"server"}
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & ours


def test_a_claim_does_not_grow_with_the_backlog_even_after_analyze(tmp_path):
    """20,000 jobs wait for a site no pilot serves. A claim for another site costs a few indexed
    probes (counted in sqlite VM steps, not seconds), with the plans fixed under ANALYZE."""
    store = server.Store(str(tmp_path / "x.db"))
    rows = [server.validate_job({"payload": "x", "site": "elsewhere", "priority": i % 7}, "j") for i in range(20000)]
    rows += [server.validate_job({"payload": "x", "site": "here", "jobtype": "dqm", "priority": 1}, "j"),
             server.validate_job({"payload": "x", "jobtype": "reco", "priority": 3}, "j"),
             server.validate_job({"payload": "x", "site": "here", "jobtype": "reco", "priority": 3}, "j")]
    store.write(server.insert_jobs, rows, "tester")
    store.read("ANALYZE")
    with store.reading() as conn:
        for sql, args in ((server.CLAIM_ANY, ("here",)), (server.CLAIM_TYPE, ("here", "dqm")),
                          (server.AHEAD, ("elsewhere", "default", 3, "elsewhere", "default", 3, 0.0))):
            plan = " ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args))
            assert "USING INDEX jobs_claim" in plan and "TEMP B-TREE" not in plan, plan
        assert conn.execute(server.AHEAD, ("elsewhere", "default", 5, "elsewhere", "default", 5,
                                           0.0)).fetchone()[0] == 20000 // 7, "jobs ahead: those of priority 6"
        steps = []
        conn.set_progress_handler(lambda: steps.append(1), 100)
        assert server.best_claimable(conn, "nowhere", ["dqm"]) is None
        assert server.best_claimable(conn, "nowhere", [])["uuid"] == rows[-2]["uuid"]
        best = server.best_claimable(conn, "here", ["dqm", "reco"])
        conn.set_progress_handler(None, 0)
        assert best["uuid"] == rows[-2]["uuid"], "priority, then age, across site '' and the pilot's"
        assert len(steps) < 50, f"{len(steps) * 100} VM steps: the claims walked the backlog"
    store.close()


BIG_TABLES = ("jobs", "pilots", "events", "workflows", "datasets", "images", "attempt_failures")


def hostile_store(path, queued=3000, stopped=1000):
    """A database whose statistics were gathered on a table of only queued jobs (every `pilot`
    NULL, every state `defined`) beside a crowd of stopped pilots: the statistics then say the
    indexes on pilot and state are useless, and an unpinned plan scans."""
    store = server.Store(path)
    store.write(server.insert_jobs, [server.validate_job({"payload": "x", "site": "elsewhere"}, "j")
                                     for _ in range(queued)], "tester")
    with store.transaction() as conn:
        conn.executemany("INSERT INTO pilots(uuid, state, heartbeat, ts_reg, ts_beat, ts_stop) "
                         "VALUES(?, 'stopped', 1, 0, 0, 0)", [(f"p{i}",) for i in range(stopped)])
    store.read("ANALYZE")
    store.close()


def traced_store(path, monkeypatch):
    """A Store whose every connection records the statements it runs."""
    seen = []
    connect = server.connect

    def traced(p):
        conn = connect(p)
        conn.set_trace_callback(seen.append)
        return conn
    monkeypatch.setattr(server, "connect", traced)
    return server.Store(path), seen


def drive_hot_paths(service):
    """Claims (empty and not), running and end reports (with the next claim), heartbeats, a
    deregistration, and housekeeping that finds a lost pilot, an expired lease, an overdue job
    and ended objects to purge."""
    store, broker = service.store, service.broker
    pilots = [service.register({"secret": "s" * 16 + str(i), "heartbeat": 1}) for i in range(3)]
    assert broker.request_job(pilots[0]["uuid"], {}, pilots[0]["secret"])["job"] is None
    uuids = service.submit({"jobs": [{"payload": "x", "timelimit": 1} for _ in range(4)]}, "t")["uuids"]
    held = []
    for p in pilots:
        held.append(broker.request_job(p["uuid"], {}, p["secret"])["job"]["uuid"])
        service.report(held[-1], {"pilot": p["uuid"], "attempt": 1, "state": "running", "pid": 5},
                       p["secret"])
        service.heartbeat(p["uuid"], {"job": held[-1]}, p["secret"])
    answer = service.report(held[0], {"pilot": pilots[0]["uuid"], "attempt": 1, "state": "finished",
                                    "exit_code": 0, "next": True}, pilots[0]["secret"])
    assert answer["next"]["job"]["uuid"] == uuids[3]
    service.submit({"jobs": [{"payload": "x"} for _ in range(2)]}, "t")     # claimed ahead, one in reserve
    answer = service.report(uuids[3], {"pilot": pilots[0]["uuid"], "attempt": 1, "state": "finished",
                                       "exit_code": 0, "next": True, "ahead": True}, pilots[0]["secret"])
    following, reserve = answer["next"]["job"]["uuid"], answer["next"]["reserve"]["uuid"]
    answer = service.report(following, {"pilot": pilots[0]["uuid"], "attempt": 1, "state": "finished", "exit_code": 0,
                                        "next": True, "ahead": True, "holding": reserve}, pilots[0]["secret"])
    assert service.release_reserve(pilots[0]["uuid"], {"job": reserve}, pilots[0]["secret"])["released"]
    service.deregister(pilots[0]["uuid"], {"reason": "done"}, pilots[0]["secret"])
    service.housekeep()                     # the beats heard in memory are written
    with store.transaction() as conn:      # pilot 1 falls silent; pilot 2's job overruns its limit
        conn.execute("UPDATE pilots SET ts_beat = 0 WHERE uuid=?", (pilots[1]["uuid"],))
        conn.execute("UPDATE jobs SET ts_sta = 0 WHERE uuid=?", (held[2],))
        conn.execute("UPDATE jobs SET ts_sto = 0 WHERE uuid=?", (held[0],))
    service.resumed = 0
    service.housekeep()
    service.heartbeat(pilots[1]["uuid"], {}, pilots[1]["secret"])     # lost, and back
    service.retention_days = 1
    service.last_tidy = 0                   # and the trims of the counts and attempts kept 7 days
    service.housekeep()
    service.define_site("np04", {"pilots": 3, "pilotlife": 60, "canary": "true", "floor": 1})
    service.housekeep()                     # its canary sent
    service.alarms.record(server.now())     # every housekeeping pass evaluates the alarms
    service.users.add("ann", "shifter", "t" * 40)       # a named user's request, and a page's session
    session, _ = service.users.sign_in(service.users.by_token("t" * 40))
    assert service.users.session(session)[0] == ("ann", "shifter")
    service.retry_failed({"runs": "5000-5010", "dry_run": True}, "ann")
    states = {r["state"] for r in store.read("SELECT state FROM jobs WHERE uuid IN (?,?,?,?)", uuids)}
    assert {"pilotTO", "timeout"} <= states, states


def test_start_and_end_counts_are_tallied_in_their_transaction_and_written_by_housekeeping(tmp_path):
    """The counts of starts and ends by time bucket are tallied in the writer's memory, inside
    the job's transaction: a block rolled back takes its counts with it, the job's commit writes
    no page of theirs, and a housekeeping pass or a clean shutdown writes them where the
    charts, the summary and the alarms read them."""
    path = str(tmp_path / "t.db")
    store = server.Store(path)
    service = server.Service(store)
    pilot = service.register({"secret": "s" * 16, "heartbeat": 1})
    uuids = service.submit({"jobs": [{"payload": "x"} for _ in range(3)]}, "t")["uuids"]
    job = service.broker.request_job(pilot["uuid"], {}, pilot["secret"])["job"]
    service.report(job["uuid"], {"pilot": pilot["uuid"], "attempt": 1, "state": "failed", "exit_code": 3},
                   pilot["secret"])
    with pytest.raises(RuntimeError), store.transaction(shared=True) as conn:     # a block rolled back
        assert server.move_job(conn, uuids[1], "defined", "cancelled", "t")
        raise RuntimeError

    def counts():
        return {table: store.read_one(f"SELECT COALESCE(SUM(n), 0) FROM {table}")[0] for table in server.TALLIED}
    assert counts() == {"job_starts": 0, "job_ends": 0, "ends": 0}
    service.housekeep()
    assert counts() == {"job_starts": 1, "job_ends": 1, "ends": 1}
    assert [tuple(r) for r in store.read("SELECT jobtype, site, state, n FROM ends")] == [("default", "", "failed", 1)]
    store.write(server.move_job, uuids[2], "defined", "cancelled", "t")
    store.close()
    store = server.Store(path)
    assert counts() == {"job_starts": 1, "job_ends": 2, "ends": 2}
    store.close()
    killed = subprocess.run([sys.executable, "-c", "import os, server; store = server.Store(os.environ['DB']); "
                             "store.write(server.move_job, os.environ['JOB'], 'defined', 'cancelled', 't'); os._exit(9)"],
                            env=dict(os.environ, DB=path, JOB=uuids[1], PYTHONPATH=str(ROOT)))
    assert killed.returncode == 9
    store = server.Store(path)      # a server killed before its tallies were written: recounted
    assert counts() == {"job_starts": 1, "job_ends": 3, "ends": 3}
    store.close()
    store = server.Store(path)      # and only once
    assert counts() == {"job_starts": 1, "job_ends": 3, "ends": 3}
    store.close()


def test_a_deleted_job_takes_its_history_so_a_job_given_its_id_shows_only_its_own(tmp_path):
    """The history is found by job id (v20); sqlite gives the next job the id of the newest
    one deleted, so the deleted job's rows go with it, and the job after it shows its own."""
    store = server.Store(str(tmp_path / "t.db"))
    service = server.Service(store)
    first = service.submit({"jobs": [{"payload": "x"}]}, "t")["uuids"][0]
    service.delete_job(first, "t")
    second = service.submit({"jobs": [{"payload": "y"}]}, "u")["uuids"][0]
    ids = [store.read_one("SELECT id FROM jobs WHERE uuid=?", (second,))[0]]
    history = service.get_job(second)["events"]
    store.close()
    assert ids == [1] and [(e["new"], e["who"]) for e in history] == [("defined", "u")]


def test_hot_path_plans_hold_under_hostile_statistics(tmp_path, monkeypatch):
    """Every statement the claim, report, heartbeat and housekeeping paths run is recorded and
    its plan read: none scans a big table, whatever ANALYZE said (the held-job query once scanned
    every row, because `pilot` is NULL in all of them)."""
    db = str(tmp_path / "x.db")
    hostile_store(db)
    store, seen = traced_store(db, monkeypatch)
    drive_hot_paths(server.Service(store))
    scans = {}
    with store.reading() as conn:
        conn.set_trace_callback(None)
        for statement in server.statements(server.TALLIES):     # the writer's own, in memory
            conn.execute(statement)
        for sql in set(seen):
            if not sql.lstrip().upper().startswith(("SELECT", "UPDATE", "DELETE", "INSERT")):
                continue
            for row in conn.execute("EXPLAIN QUERY PLAN " + sql):
                if re.match(r"SCAN (%s)\b" % "|".join(BIG_TABLES), row[3]):
                    scans[" ".join(sql.split())[:160]] = row[3]
    store.close()
    assert len(seen) > 50 and not scans, "\n".join(f"{plan}: {sql}" for sql, plan in scans.items())


def test_the_lists_by_end_time_read_an_index_under_hostile_statistics(tmp_path, monkeypatch):
    """The summary's recent failures and /jobs sorted by end read the index of jobs that ended
    (v18: ended jobs only), whatever ANALYZE said: neither walks every job."""
    db = str(tmp_path / "x.db")
    hostile_store(db)
    store, seen = traced_store(db, monkeypatch)
    views = server.Views(server.Service(store), [str(tmp_path)])
    views.recent_failures(10)
    for order in ("desc", "asc"):
        views.jobs({"sort": "ended", "order": order})
    plans = {}
    with store.reading() as conn:
        conn.set_trace_callback(None)
        for sql in {s for s in seen if "ORDER BY ts_sto" in s}:
            plans[sql] = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
    store.close()
    assert len(plans) >= 3, plans
    for sql, plan in plans.items():
        assert not any(re.match(r"SCAN jobs\b", step) for step in plan), (sql, plan)


def test_a_heartbeat_is_heard_before_its_lease_is_judged_or_answered_kill():
    leases = server.Leases()
    assert leases.beat("a", 100.0)
    assert leases.judge([("a", 1.0), ("b", 1.0)], lambda beat: 100.0 - 10 * beat) == ["b"], \
        "a beat heard in memory renews the lease"
    assert not leases.beat("b", 101.0), "the job of b is being given away: its beat must get kill"
    leases.released(["b"])
    assert leases.beat("b", 102.0)
    leases.written({"a": (100.0, None), "b": (101.0, None)})
    assert leases.unwritten() == {"b": (102.0, None)}, "a newer beat than the one written stays"


@pytest.mark.parametrize("reason,folded", [
    ("ERROR: RawDecoder: APA3 FEMB 12 returned no frames", "ERROR: RawDecoder: APA3 FEMB # returned no frames"),
    ("cannot open np04_raw_run005017_0001.root", "cannot open np04_raw_run005017_0001.root"),
    ("exit code 137 after 3.5 s", "exit code # after # s"),
    ("job 0b7e3c1e-98f4-4a8e-9d2b-6d7b3f1a2c3d at 0x7ffe12", "job <uuid> at <hex>"),
])
def test_numbers_fold_but_identifiers_stay(reason, folded):
    assert server.normalise_reason(reason) == folded


def test_plots_show_the_newest_jobs_first_and_each_jobs_images_in_name_order():
    rows = [{"job": "b", "name": "apa3.png"}, {"job": "b", "name": "apa1.png"}, {"job": "a", "name": "apa2.png"},
            {"job": "b", "name": "apa2.png"}, {"job": "a", "name": "apa1.png"}]
    ordered = server.newest_jobs_first_names_in_order(rows)
    assert [(r["job"], r["name"]) for r in ordered] == [("b", "apa1.png"), ("b", "apa2.png"), ("b", "apa3.png"),
                                                        ("a", "apa1.png"), ("a", "apa2.png")]


def test_a_failed_jobs_plots_carry_its_state_and_reason():
    images = [{"job": "j1", "name": "apa1.png", "infile": "/eos/run_1.root", "ts": 1.0, "job_name": "Monitor",
               "state": "failed", "reason": "ERROR: RawDecoder: APA3 FEMB 12 returned no frames"},
              {"job": "j2", "name": "apa1.png", "infile": "/eos/run_2.root", "ts": 1.0, "job_name": "Monitor",
               "state": "finished", "reason": ""}]
    for query in ({}, {"group": "run"}):
        html = server.render_plots({"groups": [{"jobtype": "monitor", "images": images}], "choices": {}}, query)
        cards = re.split(r'<div class="card(?: bad-card)?">', html)[1:]
        bad, good = (cards if "run_1" in cards[0] else cards[::-1])
        assert 'class="thumbs bad-job" title="ERROR: RawDecoder: APA3 FEMB 12 returned no frames"' in bad
        assert 's-failed' in bad and "bad-job" not in good and "s-finished" not in good
        assert html.count('<div class="card bad-card">') == 1
    assert "<h2>run 2</h2>" in html and "<h2>run 1</h2>" in html


def test_a_job_types_profile_says_when_its_median_duration_doubled(tmp_path):
    """The profile histogram gives medians within a bin (12 %) and the drift of the last 24 h
    against the week before, from counts only."""
    store = server.Store(str(tmp_path / "p.db"))
    t = server.now()
    def ended(seconds, when, n):
        store.write(server.write_profiles, {server.profile_key("reco", "duration", seconds, when): n})
    ended(10.0, t - 3 * 86400, 50)
    ended(25.0, t - 3600, 20)
    views = server.Views(server.Service(store), [str(tmp_path)])
    profile = views.profile("reco", "duration", t, views.activity(t, {"range": "24h"}))
    assert 8.8 < profile["previous_7d"]["median"] < 11.3 and profile["previous_7d"]["n"] == 50
    assert 22 < profile["last_24h"]["median"] < 28.2 and profile["last_24h"]["n"] == 20
    assert len(profile["points"]) == 1
    html = server.render_jobtype({"name": "reco", "counts": {}, "cap": None, "time": t, "errors": [], "profiles": {m: views.profile("reco", m, t, views.activity(t, {"range": "24h"})) for m in ("memory", "cpu_eff")},
                                  "activity": views.activity(t, {"range": "24h"}), "profile": profile}, {})
    store.close()
    assert "at least twice" in html


# -- group commit: writers queued at once share one transaction, each durable before it returns --
def queue_writers(store, blocks):
    """Run `blocks` (each fn(conn)) in threads that queue behind a first writer held inside its
    block, so that they all join one batch; returns {index: the exception it raised, or None}."""
    inside, release, outcome = threading.Event(), threading.Event(), {}

    def first(conn):
        conn.execute("INSERT INTO datatypes(name) VALUES('first')")
        inside.set()
        release.wait(10)

    def run(i, fn):
        try:
            with store.transaction(shared=True) as conn:
                fn(conn)
            outcome[i] = None
            seen = sqlite3.connect(store.path).execute("SELECT COUNT(*) FROM datatypes WHERE name=?", (f"w{i}",))
            outcome[i, "durable"] = seen.fetchone()[0] == 1     # committed before it returned
        except Exception as e:
            outcome[i] = e
    threads = [threading.Thread(target=run, args=("first", first))]
    threads[0].start()
    assert inside.wait(10)
    threads += [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(blocks)]
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 10
    while store.queued < len(blocks) and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(10)
    return outcome


def insert_datatype(i):
    return lambda conn: conn.execute("INSERT INTO datatypes(name) VALUES(?)", (f"w{i}",))


def test_writers_queued_at_once_share_one_commit_and_each_is_durable_when_it_returns(tmp_path):
    store = server.Store(str(tmp_path / "g.db"))
    commits = store.commits
    outcome = queue_writers(store, [insert_datatype(i) for i in range(5)])
    assert all(outcome[i] is None and outcome[i, "durable"] for i in range(5)), outcome
    assert store.commits - commits <= 2, "five queued writers did not share a commit"
    store.close()


def test_a_block_that_raises_is_rolled_back_alone(tmp_path):
    store = server.Store(str(tmp_path / "g.db"))

    def refused(conn):
        insert_datatype(1)(conn)
        raise server.ApiError(409, "stale")
    outcome = queue_writers(store, [insert_datatype(0), refused, insert_datatype(2)])
    assert isinstance(outcome[1], server.ApiError)
    assert outcome[0] is None and outcome[2] is None and outcome[0, "durable"] and outcome[2, "durable"]
    names = {r[0] for r in store.read("SELECT name FROM datatypes")}
    assert {"first", "w0", "w2"} <= names and "w1" not in names
    store.close()


def test_a_commit_that_fails_fails_every_block_of_its_batch(tmp_path):
    """No writer is told "stored" for a batch that did not commit (here a deferred foreign key
    fails at COMMIT; on a real server, a full disk or an I/O error)."""
    store = server.Store(str(tmp_path / "g.db"))

    def breaks_the_commit(conn):
        conn.execute("PRAGMA defer_foreign_keys=ON")
        conn.execute("INSERT INTO dag_vertices VALUES('no-such-dag', 'v', 'x', '{}', 'default', 1, 0)")
    outcome = queue_writers(store, [insert_datatype(0), breaks_the_commit, insert_datatype(2)])
    assert all(isinstance(outcome[i], sqlite3.Error) for i in ("first", 0, 1, 2)), outcome
    assert not {"first", "w0", "w2"} & {r[0] for r in store.read("SELECT name FROM datatypes")}
    with store.transaction() as conn:       # and the store writes again
        insert_datatype(9)(conn)
    assert store.read_one("SELECT name FROM datatypes WHERE name='w9'")
    store.close()


def test_chart_ticks_leave_room_above_the_highest_value():
    """A line at its maximum (4 pilots of 4) must not lie on the chart's top edge."""
    for ymax in (0, 1, 4, 7, 60, 999, 12345):
        ticks, top = server.nice_ticks(ymax)
        assert top >= ymax * 1.1 and top > ymax and ticks[0] == 0 and ticks[-1] == top and len(ticks) <= 8, (ymax, ticks)


def test_an_accelerated_fortnight_leaves_the_per_time_tables_no_bigger_than_their_keep(tmp_path, monkeypatch):
    """A soak saw the per-time tables (ends, errors and where, failed attempts, profiles,
    submissions) grow linearly: 14 days of an hourly stream of jobs, a third of them failing,
    through the real operations on a clock moved an hour at a time; from day 8 on, nothing older
    than its keep is left, and each table's size levels off."""
    clock = [1.8e9]
    monkeypatch.setattr(server, "now", lambda: clock[0])
    store = server.Store(str(tmp_path / "x.db"))
    service = server.Service(store, retention_days=3)
    pilot = service.register({"secret": "s" * 16, "heartbeat": 3600})
    tables = ("ends", "errors", "error_places", "error_hosts", "attempt_failures", "profiles", "submissions")
    sizes = []
    for hour in range(14 * 24):
        clock[0] += 3600
        jobs = [{"payload": "x", "jobtype": "reco"} for _ in range(6)]
        service.submit({"jobs": jobs, "submission": str(uuidlib.uuid4())}, "t")
        for i in range(6):
            job = service.broker.request_job(pilot["uuid"], {}, pilot["secret"])["job"]
            service.report(job["uuid"], {"pilot": pilot["uuid"], "attempt": 1, "state": "failed" if i % 3 == 0
                                         else "finished", "exit_code": 3 if i % 3 == 0 else 0, "runtime": 60,
                                         "errmsg": f"node {hour % 5} failed" if i % 3 == 0 else ""},
                           pilot["secret"])
        service.heartbeat(pilot["uuid"], {}, pilot["secret"])
        service.last_tidy = 0                    # the daily tidy, every simulated hour
        service.housekeep()
        if hour % 24 == 23:
            sizes.append({t: store.read_one(f"SELECT COUNT(*) FROM {t}")[0] for t in tables})
    store.close()
    for table in tables:
        week2 = [day[table] for day in sizes[8:]]
        assert max(week2) <= min(week2) * 1.2 + 5, f"{table} still grows in the second week: {week2}"


def test_a_pilots_look_for_escaped_children_sees_them_all_past_a_page_of_proc():
    """/proc answers a read with a page at most: the look reads on to the end, so a payload that
    left a thousand children behind has them all killed, not the first seven hundred."""
    import pilot
    children = [subprocess.Popen(["sleep", "30"]) for _ in range(1000)]
    try:
        assert pilot.escaped_children(()) >= {c.pid for c in children}
        assert not pilot.escaped_children({c.pid for c in children}) & {c.pid for c in children}
    finally:
        for c in children:
            c.kill()
            c.wait()
