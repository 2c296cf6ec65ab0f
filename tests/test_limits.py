"""Bounded by design: a full disk answers 503 and stores nothing, every number a pilot sends is
checked at the door, and no stored value can make a page answer 500. Each test failed on the
code before it."""
import json
import time

import pytest

from conftest import fill, shell_job


def test_a_full_disk_answers_503_stores_nothing_and_recovers(tmp_path, small_fs, start_server):
    server = start_server(db=small_fs / "p3s.db")
    assert server.submit([shell_job("true")])       # the database works, then the disk fills
    filler = fill(small_fs)
    jobs = tmp_path / "many.json"
    jobs.write_text(json.dumps([shell_job("echo " + "x" * 2000, name=f"j{i}") for i in range(500)]))
    env = dict(server.env, P3S_RETRY_FOR="0")
    for _ in range(3):
        result = server.run("job.py", "-j", jobs, env=env)
        assert result.returncode == 1 and "disk full" in result.stderr, (result.returncode, result.stderr)
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "cannot rollback" not in log, log[-2000:]
    filler.unlink()
    assert len(server.submit([shell_job("true")])) == 1, "the server did not recover once space was freed"
    assert len(server.api.list_jobs()) == 2, "a refused submission left jobs behind"


def test_a_pilots_numbers_are_bounded_at_the_door(p3s):
    """A heartbeat of 1e300 is a lease that never ends; a runtime of 1e300 a start date no page
    can print. Each is a 400 naming the field, and nothing changes."""
    api = p3s.api
    for field, value in (("heartbeat", 1e300), ("heartbeat", 1e6), ("pid", 2 ** 40)):
        with pytest.raises(Exception, match=field):
            api.register_pilot(**{field: value})
    pilot = api.register_pilot(heartbeat=1)
    [uuid] = p3s.submit([shell_job("true")])
    job = api.request_job(pilot["uuid"], 0)["job"]
    assert job["uuid"] == uuid
    for report in ({"runtime": 1e300}, {"runtime": -1}, {"pid": 2 ** 40}, {"exit_code": 2 ** 40}):
        with pytest.raises(Exception, match=next(iter(report))):
            api.report(uuid, dict(report, state="finished", pilot=pilot["uuid"], attempt=1), retry_for=0)
    assert api.get_job(uuid)["state"] == "dispatched", "a refused report changed the job"
    with pytest.raises(Exception, match="period"):
        api.call("POST", "/api/services/x/beat", {"period": 1e300})


def test_no_stored_value_makes_a_page_answer_500(p3s):
    """Rows written by an older server or by hand (an outside sqlite3 shell) with absurd
    numbers: every page still renders."""
    import sqlite3
    pilot = p3s.api.register_pilot(heartbeat=1)
    uuids = p3s.submit([shell_job("true", infile="/data/run_1.root"), shell_job("true")])
    p3s.api.request_job(pilot["uuid"], 0)
    conn = sqlite3.connect(p3s.db, timeout=30)
    with conn:
        conn.execute("UPDATE jobs SET ts_sta=1e300, ts_sto=-1e300, ts_dis=1e308, exit_code=9223372036854775807, "
                     "state='failed', reason='x' WHERE uuid=?", (uuids[0],))
        conn.execute("UPDATE jobs SET ts_def=-1e300, priority=-9223372036854775808, timelimit=9223372036854775807 "
                     "WHERE uuid=?", (uuids[1],))
        conn.execute("UPDATE pilots SET heartbeat=1e300, ts_beat=-1e300, ts_reg=1e300, pid=-5")
    conn.close()
    pages = ["/", "/jobs", "/jobs?state=problems", f"/job/{uuids[0]}", f"/job/{uuids[1]}", "/pilots",
             f"/pilot/{pilot['uuid']}", "/errors", "/sites", "/plots", "/metrics", "/api/jobs", "/api/pilots"]
    for path in pages:
        p3s.page(path)
        if not path.startswith(("/api", "/metrics")):
            p3s.page(path + ("&" if "?" in path else "?") + "format=json")


# -- strict HTTP on kept-alive connections (RFC 9112) -------------------------------------------------
def exchange(port, data, wait=1.5):
    """Send raw bytes on one connection; (the responses' status lines, whether the server closed)."""
    import socket
    import time
    sock = socket.create_connection(("127.0.0.1", port), timeout=wait)
    sock.sendall(data)
    got, closed, deadline = b"", False, time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            closed = True
            break
        got += chunk
    sock.close()
    return [line for line in got.split(b"\r\n") if line.startswith(b"HTTP/1.")], closed


def request(head, body=b""):
    return head.replace(b"\n", b"\r\n") + b"\r\n" + body


SMUGGLED = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def test_a_body_on_a_get_is_never_read_as_the_next_request(tmp_path, start_server):
    root = tmp_path / "root"
    root.mkdir()
    (root / "x.txt").write_text("hello\n")
    server = start_server(["--files-root", str(root)])
    for method in (b"GET", b"HEAD"):
        head = (method + b" /file?path=" + str(root / "x.txt").encode() + b" HTTP/1.1\nHost: 127.0.0.1\n"
                b"Content-Length: " + str(len(SMUGGLED)).encode() + b"\n")
        statuses, _ = exchange(server.port, request(head, SMUGGLED))
        assert statuses == [b"HTTP/1.1 200 OK"], f"{method}: the body was answered as a request: {statuses}"


@pytest.mark.parametrize("header,status", [
    (b"Content-Length: 2\nContent-Length: 51", b"400"),
    (b"Content-Length: +2", b"400"),
    (b"Content-Length: 0_2", b"400"),
    (b"Content-Length: 0x02", b"400"),
    (b"Transfer-Encoding: chunked", b"501"),
    (b"Content-Length: 2\nX-Note: a\n Transfer-Encoding: chunked", b"400"),
])
def test_ambiguous_framing_is_refused_and_the_connection_closed(p3s, header, status):
    """Each framing a proxy could read differently: one answer, then the close (a lenient parser
    answers the smuggled request too)."""
    head = b"POST /api/jobs/states HTTP/1.1\nHost: 127.0.0.1\n" + header + b"\n"
    statuses, closed = exchange(p3s.port, request(head, b"{}" + SMUGGLED))
    assert len(statuses) == 1 and statuses[0].split()[1] == status and closed, (statuses, closed)


def test_no_anonymous_request_gets_a_500(p3s):
    huge = "9" * 5000
    for path in (f"/plots?limit={huge}", f"/plots?age={huge}", f"/?refresh={huge}", f"/jobs?page={huge}",
                 f"/api/jobs?limit={huge}"):
        statuses, _ = exchange(p3s.port, request(b"GET " + path.encode() + b" HTTP/1.1\nHost: 127.0.0.1\n"
                                                 b"Connection: close\n"))
        assert statuses and not statuses[0].split()[1].startswith(b"5"), (path, statuses)
    # a body over --max-body whose client stops sending: a clean close, never a 500
    head = b"POST /api/jobs HTTP/1.1\nHost: 127.0.0.1\nContent-Length: 99999999\n"
    statuses, _ = exchange(p3s.port, request(head, b"x" * 1000), wait=3)
    assert all(not s.split()[1].startswith(b"5") for s in statuses), statuses
    assert "Traceback" not in (p3s.dir / "server.log").read_text()


def test_clients_that_hang_up_before_their_answer_leave_no_trace(p3s):
    """A browser closing a tab, a curl interrupted: the answer (buffered, sent in one piece)
    goes nowhere, and the log stays clean."""
    import socket
    import struct
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", p3s.port))
        sock.sendall(b"GET /manual HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))    # a reset
        sock.close()
    assert p3s.page("/manual")
    time.sleep(0.5)
    assert "Traceback" not in (p3s.dir / "server.log").read_text()


def test_a_shutdown_with_long_polls_in_flight_is_clean(tmp_path, start_server):
    server = start_server()
    for _ in range(8):
        server.pilot("-p", "20")
    from conftest import wait_until
    wait_until(lambda: server.waiting_requests() == 8, 20, what="8 long polls")
    server.proc.terminate()
    server.proc.wait(15)
    log = (tmp_path / "server.log").read_text()
    assert "closed database" not in log and "Traceback" not in log, log[-3000:]


# -- the published images: bounded in all, and never at the database's expense ------------------------
def publish(api, pilot, name, size):
    """Claim the next job with `pilot` and publish one PNG of about `size` bytes for it."""
    from conftest import tiny_png
    import tempfile
    job = api.request_job(pilot, 0)["job"]
    with tempfile.TemporaryDirectory() as d:
        import pathlib
        data = tiny_png(pathlib.Path(d) / "p.png").read_bytes()
    api.publish_image(job["uuid"], name, data + b"\0" * (size - len(data)), pilot)
    api.report(job["uuid"], {"pilot": pilot, "attempt": 1, "state": "finished", "exit_code": 0, "runtime": 0.1})
    return job["uuid"]


def status(url):
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_image_store_keeps_its_cap_oldest_first(tmp_path, start_server):
    server = start_server(["--max-image-store", "1", "--max-image-bytes", "400000"])
    server.submit([shell_job("true") for _ in range(5)])
    pilot = server.api.register_pilot(heartbeat=1)["uuid"]
    uuids = [publish(server.api, pilot, "plot.png", 300000) for _ in range(5)]
    store = server.api.health()["images"]
    assert store["bytes"] <= 2 ** 20 and store["count"] == 3, store
    assert [status(f"{server.url}/image/{u}/plot.png") for u in uuids] == [404, 404, 200, 200, 200]
    assert not (tmp_path / "p3s.db.files" / uuids[0] / "plot.png").exists(), "an evicted file stayed"


def test_one_job_type_flooding_the_image_store_pushes_out_its_own_plots_not_the_others(start_server):
    """Past the store's cap the oldest images went, whoever wrote them: one pilot-token holder
    publishing many images pushed every real plot out. Now a job type holding more than an
    even share loses its own oldest first."""
    server = start_server(["--max-image-store", "1", "--max-image-bytes", "200000"])
    server.submit([shell_job("true", jobtype="monitor") for _ in range(2)]
                  + [shell_job("true", jobtype="flood") for _ in range(10)])
    pilot = server.api.register_pilot(heartbeat=1)["uuid"]
    real = [publish(server.api, pilot, "adc.png", 150000) for _ in range(2)]
    flood = [publish(server.api, pilot, "junk.png", 150000) for _ in range(10)]
    assert [status(f"{server.url}/image/{u}/adc.png") for u in real] == [200, 200], "the real plots were evicted"
    kept = [status(f"{server.url}/image/{u}/junk.png") for u in flood]
    assert kept[-3:] == [200] * 3 and kept[0] == 404, kept
    assert server.api.health()["images"]["bytes"] <= 2 ** 20


def test_images_are_refused_above_the_free_space_floor_and_an_alarm_warns(tmp_path, small_fs, start_server):
    server = start_server(["--min-free-mb", "3"], db=small_fs / "p3s.db")
    server.submit([shell_job("true")])
    pilot = server.api.register_pilot(heartbeat=1)["uuid"]
    with pytest.raises(Exception, match="507|below the floor"):
        publish(server.api, pilot, "plot.png", 2 * 2 ** 20)
    assert server.api.health()["images"]["min_free_bytes"] == 3 * 2 ** 20
    assert "disk_low" in [a["name"] for a in server.api.call("GET", "/api/alarms")["alarms"]]

@pytest.mark.parametrize("raw,status", [
    (b"GET /api/health HTTP/1.1\nHost: 127.0.0.1\nX-Note : a\n", b"400"),      # space before the colon
    (b"GET /api/health HTTP/1.1\nHost: 127.0.0.1\nno colon here\n", b"400"),
    (b"GET /api/health HTTP/1.1\n X-Note: folded first\n", b"400"),
    (b"GET /api/health\n", b"400"),                                             # HTTP/0.9
    (b"GET /api/health HTTP/2.0\n", b"400"),
    (b"GET  /api/health HTTP/1.1\nHost: 127.0.0.1\n", b"400"),
    (b"GET /api/health HTTP/1.1\n" + b"X-Many: 1\n" * 101, b"431"),
    (b"GET /api/health HTTP/1.1\nHost: 127.0.0.1\n\r\r", b"400"),                # a bare CR line
])
def test_a_malformed_request_head_gets_one_error_and_the_close(p3s, raw, status):
    """The server reads a request's line and fields itself, strictly: what a proxy might read
    differently is refused, never guessed at."""
    statuses, closed = exchange(p3s.port, request(raw, SMUGGLED))
    assert len(statuses) == 1 and statuses[0].split()[1] == status and closed, (statuses, closed)


def test_a_client_that_asks_to_continue_and_an_http10_client_are_served(p3s):
    body = json.dumps({"uuids": []}).encode()
    head = (b"POST /api/jobs/states HTTP/1.1\nHost: 127.0.0.1\nExpect: 100-continue\nContent-Type: application/json\n"
            b"Content-Length: " + str(len(body)).encode() + b"\n")
    statuses, _ = exchange(p3s.port, request(head, body), wait=1)
    assert statuses[:2] == [b"HTTP/1.1 100 Continue", b"HTTP/1.1 200 OK"], statuses
    statuses, closed = exchange(p3s.port, request(b"GET /api/health HTTP/1.0\n"), wait=5)
    assert statuses == [b"HTTP/1.1 200 OK"] and closed, "an HTTP/1.0 request is answered, then the close"


def test_once_space_is_freed_the_next_write_is_stored_at_once(tmp_path, small_fs, start_server):
    """Writes failing on a full disk leave sqlite's write-ahead log grown; with no checkpoint it
    took the freed space back and writes kept failing for 45-50 s. The log is checkpointed and
    truncated when a write fails for space and again at each pass until one succeeds: a person
    frees room, and the very next writes are stored."""
    server = start_server(db=small_fs / "p3s.db")
    assert server.submit([shell_job("true")])
    filler = fill(small_fs)
    big = tmp_path / "big.json"
    big.write_text(json.dumps([shell_job("echo " + "x" * 1000, name=f"j{i}") for i in range(50)]))
    env = dict(server.env, P3S_RETRY_FOR="0")
    for _ in range(5):
        assert server.run("job.py", "-j", big, env=env).returncode == 1
    filler.unlink()
    time.sleep(1)                                   # a housekeeping pass or three (0.3 s)
    stored = [server.run("job.py", "-j", big, "--again", env=env).returncode for _ in range(5)]
    assert stored == [0] * 5, stored
