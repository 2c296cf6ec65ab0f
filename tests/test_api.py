"""Every route in server.py's routes table answers bad input with a 4xx and {"error": str}, and
the README documents every route and every option of every tool (so the docs cannot drift)."""
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from conftest import P3S, ROOT
import server

README = open(os.path.join(ROOT, "README.md")).read()


def section(title, level="##"):
    """The README text from the heading `title` to the next heading of the same or a higher level."""
    start = README.index(f"\n{level} {title}\n")
    end = re.compile(rf"\n#{{1,{len(level)}}} ").search(README, start + 1)
    return README[start:end.start() if end else None]


@pytest.fixture(scope="module")
def one_server(tmp_path_factory):
    server_ = P3S(tmp_path_factory.mktemp("api")).start()
    yield server_
    server_.stop()


def bad_request(method, path, parts):
    """A request to this route that must be refused: a malformed uuid, an unknown name, a body
    that is not an object, a bad query value; a route that takes nothing gets a wrong method."""
    if "<uuid>" in path:
        return method, path.replace("<uuid>", "not-a-uuid"), b"{}", 400
    if "<dag>" in path:
        return method, path.replace("<dag>", "no-such-dag"), b"{}", 404
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


@pytest.mark.parametrize("method,path,name,parts,write", server.API,
                         ids=[f"{r[0]} {r[1]}" for r in server.API])
def test_every_route_refuses_bad_input_with_a_json_error(one_server, method, path, name, parts, write):
    method, url, body, expected = bad_request(method, path, parts)
    status, raw = ask(one_server.url, one_server.token_file.read_text().strip(), method, url, body)
    answer = json.loads(raw)
    assert status == expected, (status, answer)
    assert set(answer) == {"error"} and isinstance(answer["error"], str) and answer["error"]
    assert "\n" not in answer["error"]


@pytest.mark.parametrize("method,path,name,parts,write", [r for r in server.API if r[4]],
                         ids=[f"{r[0]} {r[1]}" for r in server.API if r[4]])
def test_every_write_route_needs_the_token(one_server, method, path, name, parts, write):
    url = path.replace("<uuid>", "0b7e3c1e-98f4-4a8e-9d2b-6d7b3f1a2c3d").replace("<dag>", "d").replace("<name>", "n")
    status, raw = ask(one_server.url, "wrong", method, url, b"{}")
    assert status == 403 and "wrong token" in json.loads(raw)["error"]


def test_every_route_is_in_the_readme_http_api_section():
    documented = section("HTTP API")
    missing = [f"{m} {p}" for m, p, *_ in server.API if f"`{m} {p}`" not in documented]
    assert not missing, f"routes missing from README's HTTP API section: {missing}"
    listed = re.findall(r"^\| `(GET|POST|PUT|DELETE) (/api/\S*)`", documented, re.M)
    assert sorted(listed) == sorted((m, p) for m, p, *_ in server.API), "README lists a route that is not served"


TOOLS = ["server.py", "job.py", "pilot.py", "workflow.py", "injector.py", "verifyImport.py"]


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
def test_every_option_is_in_the_readme_tools_section(tool):
    documented = section(tool, "###")
    assert documented in section("Tools and options")
    options = options_of(tool)
    assert options, f"{tool} --help listed no options"
    missing = [s for s in options
               if not any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", documented) for o in s)]
    assert not missing, f"{tool}: options missing from README's Tools and options: {missing}"
