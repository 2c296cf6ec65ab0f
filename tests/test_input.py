"""Bad input: one clear line naming the field, exit 2, and nothing stored. Writes need the token."""
import json
import urllib.error
import urllib.request

import pytest

from conftest import P3S, shell_job

BAD_JOBS = [
    ("not json", "{payload: oops", "malformed JSON"),
    ("wrong type", json.dumps({"payload": "true", "priority": "high"}), "priority: must be an integer"),
    ("negative timeout", json.dumps({"payload": "true", "timeout": "-5"}), "timeout: must be >= 0"),
    ("non-numeric timeout", json.dumps({"payload": "true", "timeout": "soon"}), "timeout: must be an integer"),
    ("float timeout", json.dumps({"payload": "true", "timeout": 1.5}), "timeout: must be an integer"),
    ("missing payload", json.dumps({"name": "x"}), "payload: missing"),
    ("empty payload", json.dumps({"payload": "  "}), "payload: must not be empty"),
    ("unknown keys", json.dumps({"payload": "true", "prio": 1, "colour": "red"}), "unknown key(s) colour, prio"),
    ("env not a map", json.dumps({"payload": "true", "env": ["A"]}), "env: must be an object"),
    ("bad env name", json.dumps({"payload": "true", "env": {"A-B": "1"}}), "not a valid environment variable"),
    ("bad state", json.dumps({"payload": "true", "state": "running"}), "state: unknown value 'running'"),
    ("second job bad", json.dumps([{"payload": "true"}, {"payload": 5}]), "jobs[1].payload: must be a string"),
    ("empty list", "[]", "non-empty list"),
]


def assert_refused(result, text):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {result.stderr}"
    assert text in lines[0], lines[0]


@pytest.fixture(scope="module")
def one_server(tmp_path_factory):
    """One server for the whole table: each case changes nothing, which is what it checks."""
    server = P3S(tmp_path_factory.mktemp("bad-jobs")).start()
    yield server
    server.stop()


@pytest.mark.parametrize("case,content,message", BAD_JOBS, ids=[c[0] for c in BAD_JOBS])
def test_bad_job_file_is_refused_and_nothing_stored(one_server, case, content, message):
    path = one_server.dir / "bad.json"
    path.write_text(content)
    assert_refused(one_server.run("job.py", "-j", path), message)
    assert one_server.api.list_jobs() == []


def test_missing_job_file(p3s):
    assert_refused(p3s.run("job.py", "-j", p3s.dir / "nope.json"), "No such file")


def test_adjust_to_unknown_state_or_bad_priority_changes_nothing(p3s):
    [uuid] = p3s.submit([shell_job("true", priority=3)])
    assert_refused(p3s.run("job.py", "-a", "-u", uuid, "-s", "sleeping"), "state: unknown value 'sleeping'")
    assert_refused(p3s.run("job.py", "-a", "-u", uuid, "-s", "cancelled", "-P", "x"), "priority: must be an integer")
    job = p3s.job(uuid)
    assert job["state"] == "defined" and job["priority"] == 3
    assert_refused(p3s.run("job.py", "-a", "-u", uuid, "-s", "finished"), "state: unknown value")
    assert_refused(p3s.run("job.py", "--show", "not-a-uuid"), "uuid: not a UUID")


def test_body_over_the_limit_is_refused(tmp_path, start_server):
    server = start_server(["--max-body", "2000"])
    path = tmp_path / "big.json"
    path.write_text(json.dumps([shell_job("echo " + "x" * 3000)]))
    assert_refused(server.run("job.py", "-j", path), "over the limit of 2000")
    assert server.api.list_jobs() == []


def test_server_answers_json_error_naming_the_field(p3s):
    request = urllib.request.Request(p3s.url + "/api/jobs", data=b'{"jobs": [{"payload": "true", "timeout": -1}]}',
                                     headers={"Authorization": "Bearer " + p3s.token_file.read_text().strip()},
                                     method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 400
    assert json.loads(err.value.read()) == {"error": "jobs[0].timeout: must be >= 0, got -1"}


def test_writes_without_or_with_a_wrong_token_are_refused(p3s):
    path = p3s.dir / "ok.json"
    path.write_text(json.dumps(shell_job("true")))
    no_token = {k: v for k, v in p3s.env.items() if k != "P3S_TOKEN_FILE"}
    no_token["P3S_TOKEN_FILE"] = str(p3s.dir / "absent-is-empty")
    (p3s.dir / "absent-is-empty").write_text("")
    assert_refused(p3s.run("job.py", "-j", path, env=no_token), "missing token")
    assert_refused(p3s.run("job.py", "-j", path, env=dict(p3s.env, P3S_TOKEN="guess")), "wrong token")
    pilot = p3s.run("pilot.py", "-c", "1", env=dict(p3s.env, P3S_TOKEN="guess"))
    assert pilot.returncode == 2 and "wrong token" in pilot.stderr
    assert p3s.api.list_jobs() == [] and p3s.api.list_pilots() == []
    assert p3s.run("job.py", "--list", env=no_token).returncode == 0, "reads need no token"


def test_non_loopback_bind_without_token_is_refused(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    env = {k: v for k, v in __import__("os").environ.items() if k != "P3S_TOKEN"}
    result = subprocess.run([sys.executable, f"{ROOT}/server.py", "--host", "0.0.0.0", "--port", "0",
                             "--db", str(tmp_path / "x.db")], capture_output=True, text=True, timeout=20,
                            env=env)
    assert result.returncode == 2
    assert "needs a token" in result.stderr
    assert not (tmp_path / "x.db").exists()


def test_usage_errors_are_one_line_and_exit_2(p3s):
    for tool, args, text in (("job.py", [], "give exactly one of"), ("job.py", ["-a", "-u", "x"], "-a needs"),
                             ("pilot.py", ["-c", "-1"], "--cycles: must not be negative"),
                             ("pilot.py", ["-c", "many"], "invalid int value"),
                             ("workflow.py", ["-m"], "-m needs"), ("injector.py", ["-d", "/"], "required")):
        assert_refused(p3s.run(tool, *args), text)


def test_unreachable_server_exits_1(p3s):
    env = dict(p3s.env, P3S_SERVER="http://127.0.0.1:9", P3S_RETRY_FOR="1")
    result = p3s.run("job.py", "--list", env=env)
    assert result.returncode == 1 and "cannot reach the p3s server" in result.stderr


def test_server_and_client_configuration_errors_are_one_line(p3s, tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    for args, text in ((["--db", "/nonexistent/dir/p3s.db"], "directory /nonexistent/dir does not exist"),
                       (["--port", "99999"], "--port 99999: must be between 0 and 65535"),
                       (["--token-file", str(tmp_path / "nope")], "No such file or directory")):
        result = subprocess.run([sys.executable, f"{ROOT}/server.py", "--port", "0", *args],
                                capture_output=True, text=True, timeout=20)
        assert_refused(result, text)
    for url in ("nonsense:x", "ftp://host", "http://:8000"):
        assert_refused(p3s.run("job.py", "--list", env=dict(p3s.env, P3S_SERVER=url)), "expected http://host:port")


def test_a_job_type_typo_is_caught_and_a_new_type_stays_possible(p3s, tmp_path):
    """"monitr" was stored, capped and listed (empty, exit 0) without a word on a real shift."""
    p3s.submit([shell_job("true", jobtype="monitor"), shell_job("true", jobtype="purity"),
                shell_job("true", jobtype="type1")])
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps([{"payload": "true", "jobtype": "monitr"}]))
    refused = p3s.run("job.py", "-j", typo)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "job.py: jobtype: unknown job type 'monitr'; did you mean 'monitor'? (a new type on purpose: job.py "
        "--new-type, or \"new_jobtypes\": true)"], refused.stderr
    assert len(p3s.api.list_jobs()) == 3, "a refused typo stored a job"
    capped = p3s.run("job.py", "-l", "-T", "purty", "-L", "2")
    assert capped.returncode == 2 and "did you mean 'purity'?" in capped.stderr
    assert [t["name"] for t in p3s.api.list_jobtypes()] == ["monitor", "purity", "type1"], "a typo got a cap"
    listed = p3s.run("job.py", "--list", "--jobtype", "purty")
    assert listed.returncode == 2 and "no job of type 'purty'; did you mean 'purity'?" in listed.stderr
    assert p3s.run("job.py", "-j", typo, "--new-type").returncode == 0
    numbered = tmp_path / "numbered.json"
    numbered.write_text(json.dumps([{"payload": "true", "jobtype": "type2"}]))
    assert p3s.run("job.py", "-j", numbered).returncode == 0, "type2 beside type1 taken for a typo"
