"""Named users, and the pages as the shift's console: a request acts as its token's user within
that user's role; a signed-in page acts through plain forms (POST, then a redirect); a forged,
cross-site or cross-role request is refused and changes nothing."""
import http.client
import json
import re
from urllib.parse import urlencode

import pytest

from conftest import shell_job


@pytest.fixture
def served(start_server):
    return start_server()


def request(served, method, path, fields=None, cookie="", origin="same", headers=None):
    """One request as a browser sends it (no redirect followed): (status, headers, body text)."""
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=20)
    sent = dict(headers or {})
    if cookie:
        sent["Cookie"] = f"p3s_session={cookie}"
    if fields is not None:
        sent["Content-Type"] = "application/x-www-form-urlencoded"
        if origin:
            sent["Origin"] = served.url if origin == "same" else origin
    conn.request(method, path, body=urlencode(fields) if fields is not None else None, headers=sent)
    answer = conn.getresponse()
    result = answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read().decode()
    conn.close()
    return result


def sign_in(served, env, next_page="/"):
    token = open(env["P3S_TOKEN_FILE"]).read().strip()
    status, headers, _ = request(served, "POST", "/signin", {"token": token, "next": next_page})
    assert status == 303 and headers["location"] == next_page
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=43200" in cookie
    return re.match(r"p3s_session=([^;]+)", cookie).group(1)


def csrf_of(served, cookie, path):
    status, _, text = request(served, "GET", path, cookie=cookie)
    assert status == 200
    return re.search(r'name="csrf" value="([^"]+)"', text).group(1)


def test_the_server_records_the_tokens_user_never_the_one_a_client_claims(served, tmp_path):
    listed = served.run("server.py", "--db", served.db, "--list-users")
    assert listed.returncode == 0 and listed.stdout.startswith("no named users yet"), listed.stdout
    bob = served.add_user("bob", "expert")
    listed = served.run("server.py", "--db", served.db, "--list-users").stdout.split()
    assert listed[:2] == ["bob", "expert"]
    jobs = tmp_path / "claims.json"
    jobs.write_text(json.dumps([{"payload": "true", "jobtype": "reco", "user": "mallory"}]))
    done = served.run("job.py", "-j", jobs, "--json", env=bob)
    assert done.returncode == 0, done.stderr
    [uuid] = json.loads(done.stdout)["uuids"]
    job = served.job(uuid)
    assert job["user"] == "bob" and job["events"][0]["who"] == "bob"
    [shared] = served.submit([{"payload": "true", "user": "mallory"}])
    assert served.job(shared)["user"] == "shared", "the shared write token is the user 'shared'"
    assert served.run("job.py", "--note", "run:5003", "-m", "HV trip", env=bob).returncode == 0
    [note] = served.api.call("GET", "/api/notes")["notes"]
    assert note["who"] == "bob"
    assert served.api.call("POST", "/api/auth", {}) == {"ok": True, "user": "shared"}


def test_a_request_beyond_its_role_is_a_403_naming_the_role_and_a_removed_user_is_out(served, tmp_path):
    alice = served.add_user("alice", "shifter")
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"payload": "true", "jobtype": "reco"}]))
    refused = served.run("job.py", "-j", jobs, env=alice)
    assert refused.returncode == 2 and "alice is a shifter; this needs the expert role" in refused.stderr
    assert served.api.list_jobs() == []
    [uuid] = served.submit([{"payload": "true", "jobtype": "reco", "state": "template"}])
    refused = served.run("job.py", "-d", "-u", uuid, env=alice)
    assert refused.returncode == 2 and "needs the admin role" in refused.stderr
    paused = served.run("job.py", "--pause", "reco", "-m", "noisy APA 3", env=alice)
    assert paused.returncode == 0 and "paused by alice" in paused.stdout
    cookie = sign_in(served, alice)
    assert served.run("server.py", "--db", served.db, "--remove-user", "alice").returncode == 0
    gone = served.run("job.py", "--resume", "reco", "-m", "fixed", env=alice)
    assert gone.returncode == 2 and "wrong token" in gone.stderr
    assert "alice (shifter)" not in request(served, "GET", "/", cookie=cookie)[2], "a removed user's session lives"
    assert served.api.list_jobtypes("reco")[0]["paused"].startswith("paused by alice")


def test_a_page_form_needs_its_session_its_csrf_and_this_servers_origin(served):
    alice = served.add_user("alice", "shifter")
    [uuid] = served.submit([{"payload": "true", "jobtype": "reco"}])
    cookie = sign_in(served, alice, f"/job/{uuid}")
    other = sign_in(served, alice)
    csrf = csrf_of(served, cookie, f"/job/{uuid}")
    cancel = {"action": "cancel", "uuid": uuid, "csrf": csrf, "back": f"/job/{uuid}"}
    forged = [(dict(cancel), "", "same", 401, "sign in first"),                             # no session
              (dict(cancel), cookie, "http://evil.example", 403, "Origin"),                 # another site
              (dict(cancel), cookie, None, 403, "Origin"),                                  # no Origin at all
              ({**cancel, "csrf": ""}, cookie, "same", 403, "csrf"),                        # no CSRF token
              ({**cancel, "csrf": csrf_of(served, other, "/")}, cookie, "same", 403, "csrf")]   # another session's
    for fields, session, origin, status, said in forged:
        got, headers, text = request(served, "POST", "/act", fields, session, origin)
        assert got == status and said in text, (origin, got, text[:300])
        assert "set-cookie" not in headers
    assert served.job(uuid)["state"] == "defined", "a forged form changed the job"
    got, headers, _ = request(served, "POST", "/act", {**cancel, "back": "//evil.example/x", "why": "wrong calib"}, cookie)
    assert got == 303 and headers["location"] == "/", "a form sent the browser to another site"
    job = served.job(uuid)
    assert job["state"] == "cancelled" and job["events"][-1]["who"] == "alice"
    assert job["events"][-1]["info"] == "cancelled by user: wrong calib", "the action's why is not in the history"
    assert request(served, "POST", "/signout", {"csrf": csrf}, cookie)[0] == 303
    got, _, text = request(served, "POST", "/act", {**cancel, "action": "retry"}, cookie)
    assert got == 401 and served.job(uuid)["state"] == "cancelled", "a signed-out session still acts"


def test_a_wrong_token_signs_nobody_in_and_the_pilot_token_is_no_user(tmp_path, start_server):
    pilot_token = tmp_path / "pilot-token"
    pilot_token.write_text("pilots-only-" + "x" * 20)
    served = start_server(["--pilot-token-file", str(pilot_token)])
    for token in ("wrong", pilot_token.read_text()):
        status, headers, text = request(served, "POST", "/signin", {"token": token, "next": "/"})
        assert status == 403 and "wrong token" in text and "set-cookie" not in headers


def failing_runs(served):
    """Jobs on runs 5003 and 5004 as a shift has them: two types failed on 5003, one finished,
    one failed on 5004."""
    data = "/data/np04_raw_run{:06d}_{:04d}_dl1.root"
    jobs = [shell_job("exit 3", jobtype="purity", infile=data.format(5003, 1)),
            shell_job("exit 4", jobtype="monitor", infile=data.format(5003, 1)),
            shell_job("true", jobtype="purity", infile=data.format(5003, 2)),
            shell_job("exit 5", jobtype="purity", infile=data.format(5004, 1))]
    uuids = served.submit(jobs)
    assert served.run("pilot.py", "-c", "4", "-p", "1", "-L", served.logs).returncode == 0
    return uuids


def test_retry_failed_shows_what_it_will_do_first_then_does_exactly_that(served):
    alice = served.add_user("alice", "shifter")
    purity, monitor, good, other_run = failing_runs(served)
    cookie = sign_in(served, alice)
    csrf = csrf_of(served, cookie, "/runs?runs=5003")
    fields = {"action": "retry_failed", "runs": "5003", "jobtype": "", "csrf": csrf, "back": "/runs?runs=5003",
              "why": "calibration DB back"}
    status, _, confirm = request(served, "POST", "/act", fields, cookie)
    assert status == 200 and "retry 2 failed job(s) of every job type in runs 5003" in confirm
    listed = set(re.findall(r'href="/job/([0-9a-f-]{36})"', confirm))
    assert listed == {purity, monitor}
    assert {served.job(u)["state"] for u in (purity, monitor)} == {"failed"}, "the dry run changed something"
    assert 'name="confirm" value="1"' in confirm
    on_jobs = request(served, "GET", "/jobs?jobtype=purity", cookie=cookie)[2]
    assert "Retry the failed purity of these runs" in on_jobs, "/jobs offers no retry of a selection"
    status, headers, _ = request(served, "POST", "/act", {**fields, "confirm": "1"}, cookie)
    assert status == 303 and headers["location"] == "/runs?runs=5003"
    for uuid in (purity, monitor):
        job = served.job(uuid)
        assert (job["state"], job["attempt"], job["events"][-1]["who"]) == ("defined", 2, "alice")
        assert job["events"][-1]["info"] == "retried: calibration DB back"
    assert served.job(other_run)["state"] == "failed" and served.job(good)["state"] == "finished"


def test_private_pages_ask_for_a_sign_in_to_read(start_server):
    served = start_server(["--private-pages"])
    alice = served.add_user("alice", "shifter")
    status, headers, _ = request(served, "GET", "/runs?age=1h")
    assert status == 303 and headers["location"] == "/signin?next=%2Fruns%3Fage%3D1h"
    assert request(served, "GET", "/runs?format=json")[0] == 401
    assert request(served, "GET", "/api/jobs")[0] == 401
    assert request(served, "GET", "/api/health")[0] == 200
    assert request(served, "GET", "/signin")[0] == 200
    token = open(alice["P3S_TOKEN_FILE"]).read().strip()
    assert request(served, "GET", "/api/jobs", headers={"Authorization": f"Bearer {token}"})[0] == 200
    cookie = sign_in(served, alice, "/runs?age=1h")
    status, _, text = request(served, "GET", "/runs?age=1h", cookie=cookie)
    assert status == 200 and "alice (shifter)" in text
    assert served.run("job.py", "--list").returncode == 0, "the tools (shared token) no longer read"


def test_a_signed_out_page_offers_sign_in_and_a_signed_in_one_the_actions_of_its_role(served):
    alice = served.add_user("alice", "shifter")
    [uuid] = served.submit([{"payload": "true", "jobtype": "reco", "state": "template"}])
    _, _, text = request(served, "GET", f"/job/{uuid}")
    assert 'action="/act"' not in text and f'href="/signin?next=%2Fjob%2F{uuid}"' in text
    cookie = sign_in(served, alice)
    _, _, text = request(served, "GET", f"/job/{uuid}", cookie=cookie)
    buttons = re.findall(r'<button type="submit">([^<]+)</button>', text)
    assert buttons == ["sign out", "Cancel", "Set priority", "Add note"], buttons


def test_a_page_offers_an_expert_what_a_shifter_is_refused(served):
    """Set cap is an expert's: a shifter's page does not offer it, and a shifter's forged form
    for it is a 403 naming the role; the expert's caps the type, in the expert's name."""
    alice, bob = served.add_user("alice", "shifter"), served.add_user("bob", "expert")
    served.submit([{"payload": "true", "jobtype": "purity", "state": "template"}])
    shifter, expert = sign_in(served, alice), sign_in(served, bob)
    assert "Set cap" not in request(served, "GET", "/jobtype/purity", cookie=shifter)[2]
    assert "Set cap" in request(served, "GET", "/jobtype/purity", cookie=expert)[2]
    cap = {"action": "cap", "jobtype": "purity", "cap": "2", "back": "/jobtype/purity"}
    status, _, text = request(served, "POST", "/act", {**cap, "csrf": csrf_of(served, shifter, "/")}, shifter)
    assert status == 403 and "alice is a shifter; this needs the expert role" in text
    assert served.api.list_jobtypes("purity")[0]["cap"] is None
    status, headers, _ = request(served, "POST", "/act", {**cap, "csrf": csrf_of(served, expert, "/")}, expert)
    assert status == 303 and served.api.list_jobtypes("purity")[0]["cap"] == 2
