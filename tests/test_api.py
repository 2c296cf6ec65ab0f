"""Every route in server.py's routes table answers bad input with a 4xx and {"error": str}, and
docs/ documents every route and every option of every tool (so the docs cannot drift)."""
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from conftest import P3S, ROOT, TOOLS
import server

def doc(name):
    with open(os.path.join(ROOT, "docs", name), encoding="utf-8") as f:
        return f.read()


def section(text, title, level="##"):
    """The text from the heading `title` to the next heading of the same or a higher level."""
    start = text.index(f"\n{level} {title}\n")
    end = re.compile(rf"\n#{{1,{len(level)}}} ").search(text, start + 1)
    return text[start:end.start() if end else None]


@pytest.fixture(scope="module")
def one_server(tmp_path_factory):
    server_ = P3S(tmp_path_factory.mktemp("api")).start()
    yield server_
    server_.stop()


def bad_request(method, path, parts):
    """A request to this route that must be refused: a malformed uuid, an unknown name, a body
    that is not an object, a bad query value; a route that takes nothing gets a wrong method."""
    if "<uuid>" in path:
        return method, path.replace("<uuid>", "not-a-uuid").replace("<name>", "plot.png"), b"{}", 400
    if "<service>" in path and "body" not in parts:
        return method, path.replace("<service>", "no-such-service"), None, 404
    if "<dag>" in path or "<name>" in path and "body" not in parts:
        return method, path.replace("<dag>", "no-such-dag").replace("<name>", "no-such-site"), b"{}", 404
    if "body" in parts:
        return method, path.replace("<name>", "x"), b"[1, 2]", 400
    if "query" in parts:
        return method, path + "?limit=many", None, 400
    return "DELETE", path, None, 405


def ask(base, token, method, path, body):
    request = urllib.request.Request(base + path, data=body, method=method,
                                     headers={"Authorization": "Bearer " + token})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.parametrize("method,path,name,parts,auth", server.API, ids=[f"{r[0]} {r[1]}" for r in server.API])
def test_every_route_refuses_bad_input_with_a_json_error(one_server, method, path, name, parts, auth):
    method, url, body, expected = bad_request(method, path, parts)
    status, raw = ask(one_server.url, one_server.token_file.read_text().strip(), method, url, body)
    answer = json.loads(raw)
    assert status == expected, (status, answer)
    assert set(answer) == {"error"} and isinstance(answer["error"], str) and answer["error"]
    assert "\n" not in answer["error"]


WRITES = [r for r in server.API if r[4] in server.ROLES + (server.REGISTER,)]


@pytest.mark.parametrize("method,path,name,parts,auth", WRITES, ids=[f"{r[0]} {r[1]}" for r in WRITES])
def test_every_write_route_needs_the_token(one_server, method, path, name, parts, auth):
    url = path.replace("<uuid>", "0b7e3c1e-98f4-4a8e-9d2b-6d7b3f1a2c3d").replace("<dag>", "d").replace("<name>", "n")
    status, raw = ask(one_server.url, "wrong", method, url, b"{}")
    assert status == 403 and "wrong token" in json.loads(raw)["error"]


PILOT_ROUTES = [r for r in server.API if r[4] == "pilot"]


@pytest.mark.parametrize("method,path,name,parts,auth", PILOT_ROUTES, ids=[f"{r[0]} {r[1]}" for r in PILOT_ROUTES])
def test_a_pilot_route_needs_that_pilots_own_secret_not_the_token(one_server, method, path, name, parts, auth):
    """Any token holder could act as any pilot; only the pilot's own secret can."""
    victim = one_server.api.register_pilot(heartbeat=60)["uuid"]
    other = one_server.api.register_pilot(heartbeat=60)["uuid"]
    [job] = one_server.api.submit_jobs([{"payload": "true", "jobtype": f"only-{victim}"}])
    url = path.replace("<uuid>", job if "/jobs/" in path else victim).replace("<name>", "plot.png")
    body = json.dumps({"pilot": victim, "attempt": 1, "state": "finished"} if "report" in path else
                      {"job": job} if path.endswith("/release") else {}).encode()
    token = one_server.token_file.read_text().strip()
    for secret in ("", one_server.api.pilot_secrets[other]):
        request = urllib.request.Request(one_server.url + url, data=body, method=method,
                                         headers={"Authorization": "Bearer " + token, "X-P3S-Pilot-Secret": secret})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=10)
        assert err.value.code == 403 and "secret" in json.loads(err.value.read())["error"]
    assert one_server.api.get_job(job)["state"] == "defined"
    assert next(p for p in one_server.api.list_pilots() if p["uuid"] == victim)["state"] == "active"


def test_the_pilot_token_registers_pilots_and_nothing_else(tmp_path, start_server):
    pilot_token = tmp_path / "pilot-token"
    pilot_token.write_text("pilots-only-" + os.urandom(8).hex())
    served = start_server(["--pilot-token-file", str(pilot_token)])
    env = dict(served.env, P3S_TOKEN_FILE=str(pilot_token))
    [uuid] = served.submit([{"payload": "true"}])
    assert served.run("pilot.py", "-c", "1", "-p", "1", "-L", served.logs, env=env).returncode == 0
    assert served.job(uuid)["state"] == "finished", "a pilot with the pilot token could not work"
    jobs = [f for f in os.listdir(served.dir) if f.startswith("jobs-")]
    refused = served.run("job.py", "-j", served.dir / jobs[0], "--again", env=env)
    assert refused.returncode == 2 and "pilot token may only register" in refused.stderr
    assert len(served.api.list_jobs()) == 1


def test_every_route_is_in_docs_api():
    documented = doc("api.md")
    missing = [f"{m} {p}" for m, p, *_ in server.API if f"`{m} {p}`" not in documented]
    assert not missing, f"routes missing from docs/api.md: {missing}"
    listed = re.findall(r"^\| `(GET|POST|PUT|DELETE) (/api/\S*)`", documented, re.M)
    served = [(m, p) for m, p, *_ in server.API] + [("GET", p) for p in server.PAGE_APIS]
    assert sorted(listed) == sorted(served), "docs/api.md lists a route that is not served"
    roles = dict(re.findall(r"^\| `((?:GET|POST|PUT|DELETE) /api/\S*)` \| (shifter|expert|admin) \|", documented, re.M))
    assert roles == {f"{m} {p}": a for m, p, _, _, a in server.API if a in server.ROLES}, \
        "docs/api.md gives a route another role than the server asks"




def options_of(tool):
    """Each option of the tool's parser, as the tuple of its spellings, from its --help."""
    text = subprocess.run([sys.executable, os.path.join(ROOT, tool), "--help"], capture_output=True,
                          text=True, timeout=30, env=dict(os.environ, COLUMNS="200")).stdout
    found = []
    for line in text.splitlines():
        match = re.match(r"^  (-[^ ].*?)(?:  |$)", line)
        if match:
            spellings = tuple(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", match.group(1)))
            if spellings and "--help" not in spellings:
                found.append(spellings)
    return found


@pytest.mark.parametrize("tool", TOOLS)
def test_every_option_is_in_docs_tools(tool):
    documented = section(doc("tools.md"), tool)
    options = options_of(tool)
    assert options, f"{tool} --help listed no options"
    missing = [s for s in options
               if not any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", documented) for o in s)]
    assert not missing, f"{tool}: options missing from docs/tools.md: {missing}"
