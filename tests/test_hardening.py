"""Leases instead of hopes: a stopped or cut-off pilot never runs a job twice at once, and the
fleet outlives a paused server. Each test failed on the code before the lease and watchdog."""
import contextlib
import os
import select
import signal
import subprocess
import time

import pytest

from conftest import P3S, alive, shell_job, wait_until


def overlap_checking_job(tmp, **fields):
    """A job whose every attempt records its pid, and says OVERLAP if an earlier attempt's
    payload still runs when it starts (a zombie, dead but not yet reaped, does not count)."""
    pids, ledger = tmp / "pids", tmp / "ledger"
    payload = (f"for p in $(cat {pids} 2>/dev/null); do s=$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null); "
               f"[ -n \"$s\" ] && [ \"$s\" != Z ] && echo OVERLAP >> {ledger}; done; "
               f"echo $$ >> {pids}; echo start $P3S_JOB_UUID >> {ledger}; sleep 30 & wait")
    return shell_job(payload, **fields), pids, ledger


def test_a_stopped_pilot_loses_its_job_only_after_the_watchdog_killed_it(tmp_path, start_server):
    server = start_server(["--lease-beats", "6"])    # lease: 6 x 0.5 s
    job, pids, ledger = overlap_checking_job(tmp_path, max_attempts=2, timeout=8)
    [uuid] = server.submit([job])
    first = server.pilot("-p", "1", "-b", "0.5", "--kill-grace", "1")
    wait_until(lambda: pids.exists(), 15, what="the first attempt to start")
    first_payload = int(pids.read_text())
    first.send_signal(signal.SIGSTOP)           # a pilot that cannot speak, or be spoken to
    stopped = time.monotonic()
    wait_until(lambda: not alive(first_payload), 10, what="the watchdog to kill the payload")
    assert server.job(uuid)["attempt"] == 1, "the job was given away before its payload died"
    server.pilot("-p", "1", "-b", "0.5")
    wait_until(lambda: server.job(uuid)["attempt"] == 2 and len(pids.read_text().split()) == 2, 20,
               what="the retry to start on another pilot")
    assert time.monotonic() - stopped >= 6 * 0.5 - 0.5
    first.send_signal(signal.SIGCONT)
    time.sleep(1)                               # two heartbeats of the pilot woken
    assert "OVERLAP" not in ledger.read_text()
    assert first.poll() is None, "the pilot exited after its pause"
    record = next(p for p in server.api.list_pilots() if p["pid"] == first.pid)
    assert record["state"] in ("active", "no jobs", "dispatched", "running"), record["state"]


def test_a_pilot_stopped_twice_loses_its_payload_both_times(tmp_path, start_server):
    """The watchdog's kill at the end of the lease window is not spent by the first silence:
    the pilot stopped, continued (it is heard from again) and stopped with another payload,
    the watchdog kills that one too, within the window, with no line written for it."""
    server = start_server(["--lease-beats", "6"])    # lease: 6 x 0.5 s; the watchdog's window 2.5 s
    pilot = server.pilot("-p", "1", "-b", "0.5", "--kill-grace", "1")
    for attempt in (1, 2):
        pidfile = tmp_path / f"payload-{attempt}.pid"
        server.submit([shell_job(f"echo $$ > {pidfile}; exec sleep 60")])
        payload = int(wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 20,
                                 what=f"payload {attempt} to start"))
        pilot.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        wait_until(lambda: not alive(payload), 10, what=f"the watchdog to kill payload {attempt}")
        assert time.monotonic() - stopped < 6 * 0.5 + 1.5
        pilot.send_signal(signal.SIGCONT)
    assert pilot.poll() is None, "the pilot exited after its pauses"


def test_a_paused_server_kills_nothing_and_every_pilot_carries_on(tmp_path, start_server):
    """SIGSTOP the server longer than PAUSE_GAP (and 12 heartbeats): housekeeping sees its own
    gap and blames nobody; running jobs finish once; every pilot is still there."""
    server = start_server()
    ledger = tmp_path / "ledger"
    uuids = server.submit([shell_job(f'echo "$P3S_JOB_UUID" >> {ledger}; sleep 7')] * 3)
    pilots = [server.pilot("-p", "1", "-b", "0.5") for _ in range(3)]
    wait_until(lambda: all(server.job(u)["state"] == "running" for u in uuids), 20, what="jobs running")
    server.proc.send_signal(signal.SIGSTOP)
    time.sleep(6)
    server.proc.send_signal(signal.SIGCONT)
    states = server.wait_jobs(uuids, timeout=30)
    assert {s["state"] for s in states.values()} == {"finished"}
    assert sorted(ledger.read_text().split()) == sorted(uuids), "a job ran twice"
    assert all(p.poll() is None for p in pilots), "a pilot exited after the server's pause"
    assert all(p["state"] != "lost" for p in server.api.list_pilots()), "pilots blamed for the pause"
    assert all(server.job(u)["attempt"] == 1 for u in uuids)


def test_an_outside_writer_holding_the_lock_past_the_lease_kills_nothing(tmp_path, start_server):
    """A sqlite3 shell holds BEGIN IMMEDIATE for twice the lease, and a job ends meanwhile:
    heartbeats are answered from memory, and the report that waits for the database waits in a
    thread, never in the connection loop that answers them (it did, and pilots fenced). So no
    pilot fences, nothing is given away, and every job runs once to its end."""
    import sqlite3
    server = start_server(["--lease-beats", "5"])    # lease: 5 x 0.5 s
    ledger, go = tmp_path / "ledger", tmp_path / "go"
    record = f'echo "$P3S_JOB_UUID" >> {ledger}'
    uuids = server.submit([shell_job(f"{record}; sleep 6.5", max_attempts=2)] * 2
                          + [shell_job(f"{record}; until [ -e {go} ]; do sleep 0.05; done", max_attempts=2)])
    for _ in uuids:
        server.pilot("-p", "1", "-b", "0.5", "--kill-grace", "1")
    wait_until(lambda: all(server.job(u)["state"] == "running" for u in uuids), 20, what="jobs running")
    shell = sqlite3.connect(server.db, timeout=30, isolation_level=None)
    shell.execute("BEGIN IMMEDIATE")
    go.touch()                                       # the third job ends: its report must wait
    time.sleep(5)                                    # twice the lease
    shell.execute("ROLLBACK")
    shell.close()
    states = server.wait_jobs(uuids, timeout=30)
    assert {s["state"] for s in states.values()} == {"finished"}, states
    assert sorted(ledger.read_text().split()) == sorted(uuids), "a job ran twice"
    assert all(server.job(u)["attempt"] == 1 for u in uuids)


def test_a_server_stopped_for_less_than_the_lease_less_the_margin_kills_nothing(tmp_path, start_server):
    """README: a pilot kills its payload after lease - 2 heartbeats - kill grace without an answer;
    a server SIGSTOPped for a second less than that kills nothing."""
    beats, beat, grace = 12, 0.5, 1.0
    lease = beats * beat
    margin = 2 * beat + grace
    server = start_server(["--lease-beats", str(beats)])
    ledger = tmp_path / "ledger"
    [uuid] = server.submit([shell_job(f'echo "$P3S_JOB_UUID" >> {ledger}; sleep 5')])           # outlasts the 3 s stop
    server.pilot("-p", "1", "-b", str(beat), "--kill-grace", str(grace))
    wait_until(lambda: server.job(uuid)["state"] == "running", 20, what="the job running")
    server.proc.send_signal(signal.SIGSTOP)
    time.sleep(lease - margin - 1)
    server.proc.send_signal(signal.SIGCONT)
    assert server.wait_jobs([uuid], timeout=30)[uuid]["state"] == "finished"
    assert ledger.read_text().split() == [uuid]


def test_a_silent_server_past_the_fence_gets_the_payload_sigterm_and_a_reason_before_the_lease(
        tmp_path, start_server):
    """The pilot's own fence: the server SIGSTOPped past lease - 2 beats - grace but short of
    the lease. The payload gets SIGTERM (its grace to save its work) while the server is still
    silent, not the watchdog's SIGKILL at lease - 1 beat, and the job's reason names the fence.
    (With the fence switched off the payload runs on and ends finished: this test fails.)"""
    beats, beat, grace = 20, 0.5, 3.0          # lease 10 s; fence at 6 s of silence; watchdog 9.5 s
    server = start_server(["--lease-beats", str(beats)])
    termed = tmp_path / "termed"
    payload = f"trap 'date +%s.%N > {termed}; exit 3' TERM; sleep 20 & wait"
    [uuid] = server.submit([shell_job(payload)])
    server.pilot("-p", "1", "-b", str(beat), "--kill-grace", str(grace))
    wait_until(lambda: server.job(uuid)["state"] == "running", 20, what="the job running")
    server.proc.send_signal(signal.SIGSTOP)
    time.sleep(8.5)                             # past the fence, short of the watchdog and the lease
    resumed = time.time()
    server.proc.send_signal(signal.SIGCONT)
    server.wait_jobs([uuid], timeout=30)
    job = server.job(uuid)
    assert termed.exists(), "the payload never got SIGTERM: the fence did not stop it"
    assert float(termed.read_text()) < resumed, "SIGTERM came after the server answered again"
    assert job["state"] == "pilotTO" and job["attempt"] == 1, job
    assert "no answer from the server" in job["errmsg"] and "lease" in job["errmsg"], job["errmsg"]


def test_the_server_times_out_a_job_its_stopped_pilot_no_longer_reports(tmp_path, start_server):
    """The server's own clock: a pilot SIGSTOPped while its job runs says nothing, and its lease is
    long; the server ends the job `timeout` once it is --timelimit-grace past its time limit,
    long before the lease would give it away."""
    server = start_server(["--lease-beats", "100", "--timelimit-grace", "1"])     # lease: 50 s
    [uuid] = server.submit([shell_job("sleep 30", timeout=2)])
    pilot = server.pilot("-p", "1")
    wait_until(lambda: server.job(uuid)["state"] == "running", 20, what="the job running")
    pilot.send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        job = server.wait_jobs([uuid], timeout=15)[uuid]
        assert job["state"] == "timeout", job
        assert time.monotonic() - stopped < 10, "timed out by the lease, not the time limit"
        assert "no report after the time limit" in server.job(uuid)["reason"]
    finally:
        pilot.send_signal(signal.SIGCONT)


def test_a_running_pilot_is_never_shown_lost_while_its_heartbeats_renew_its_lease(start_server):
    """A job many heartbeats long: every sample of its pilot on the server, taken while it runs,
    says it is alive (heartbeats that stopped renewing the lease showed it lost after 2.5 s,
    though the job still ended finished)."""
    server = start_server()
    [uuid] = server.submit([shell_job("sleep 5")])
    server.pilot("-p", "1", "-b", "0.5")
    wait_until(lambda: server.job(uuid)["state"] == "running", 20, what="the job running")
    seen = []
    while server.job(uuid)["state"] == "running":
        seen += [p["state"] for p in server.api.list_pilots()]
        time.sleep(0.1)
    assert len(seen) > 20 and "lost" not in seen, seen
    assert server.job(uuid)["state"] == "finished"


# -- a server its own clients cannot take down ------------------------------------------------------
def raw_request(port, data, timeout=5):
    """Send raw bytes to the server; the status line and body it answers."""
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        answer = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return answer.decode(errors="replace")
            answer += chunk


def connect_from(port, source="127.0.0.1"):
    import socket
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def test_at_the_cap_a_new_request_displaces_an_idle_anonymous_connection(start_server, closing):
    server = start_server(["--max-connections", "20"])
    idle = [closing(connect_from(server.port)) for _ in range(20)]
    time.sleep(0.3)
    started = time.monotonic()
    answer = raw_request(server.port, b"GET /api/health HTTP/1.0\r\n\r\n")
    assert answer.startswith("HTTP/1.1 200") and time.monotonic() - started < 2, answer[:200]
    idle[0].settimeout(2)
    assert idle[0].recv(100) == b"", "the oldest idle connection was not the one displaced"


def test_clients_trickling_their_bodies_hold_no_slot_and_are_cut_off_by_the_request_deadline(start_server,
                                                                                             closing):
    """Full headers, then a body byte every few seconds, from 10 addresses, filling every slot:
    their connections were never displaceable and had no deadline once in their body, so every
    probe got 503 for as long as they trickled. Now the request's deadline covers its body (at
    a minimum rate), a connection in its body is displaced like one in its headers, and a
    trickler is cut off at its deadline."""
    server = start_server(["--max-connections", "30", "--header-timeout", "3"])
    head = (b"POST /api/pilots/0b7e3c1e-98f4-4a8e-9d2b-6d7b3f1a2c3d/request HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")     # a pilot's route: its
    # secret is checked once the body is read
    tricklers = []
    for i in range(30):
        sock = closing(connect_from(server.port, f"127.0.0.{2 + i % 10}"))
        sock.sendall(head)
        tricklers.append(sock)
    time.sleep(0.5)
    for sock in tricklers[:5]:
        with contextlib.suppress(OSError):
            sock.sendall(b" ")
    probes = [raw_request(server.port, b"GET /api/health HTTP/1.0\r\n\r\n") for _ in range(5)]
    assert all(p.startswith("HTTP/1.1 200") for p in probes), [p[:60] for p in probes]
    last, started = tricklers[-1], time.monotonic()
    while time.monotonic() - started < 10:          # a byte a second: far under any minimum rate
        try:
            last.sendall(b" ")
            if select.select([last], [], [], 1)[0] and not last.recv(100):
                break                               # closed by the server
        except OSError:
            break
    assert time.monotonic() - started < 6, "a trickling body was not cut off by the request's deadline"


def test_when_every_slot_is_busy_a_quick_503(tmp_path, start_server):
    """Long polls of registered pilots are neither idle nor anonymous: nothing to displace."""
    import contextlib
    import threading
    from serverAPI import Client, P3SError
    server = start_server(["--max-connections", "6"])
    pilots = [server.api.register_pilot(heartbeat=30)["uuid"] for _ in range(6)]
    server.api.close()

    def poll(pilot):
        client = Client(server.url, token_file=str(server.token_file), retry_for=10)   # a 503 while
        client.pilot_secrets = server.api.pilot_secrets                                # we probe: retry
        with contextlib.suppress(P3SError):        # the server may stop first
            client.request_job(pilot, 20)
    for pilot in pilots:
        threading.Thread(target=poll, args=(pilot,), daemon=True).start()
    probe = b"GET /api/health HTTP/1.0\r\n\r\n"
    wait_until(lambda: raw_request(server.port, probe).startswith("HTTP/1.0 503"), 10,
               what="every slot held by a long poll")
    started = time.monotonic()
    answer = raw_request(server.port, probe)
    assert answer.startswith("HTTP/1.0 503") and "too many connections" in answer, answer[:200]
    assert time.monotonic() - started < 2


def test_one_address_cannot_take_every_slot_and_a_trickle_is_cut_off(start_server, closing):
    """A crowd from one address gets 503 past --max-per-client while loopback pilots are served;
    a client that sends its headers a byte at a time is cut off at the header deadline."""
    server = start_server(["--max-per-client", "5", "--header-timeout", "2"])
    crowd = [closing(connect_from(server.port, "127.0.0.2")) for _ in range(5)]
    extra = closing(connect_from(server.port, "127.0.0.2"))
    extra.settimeout(3)
    assert b"from one address" in extra.recv(1000)
    assert raw_request(server.port, b"GET /api/health HTTP/1.0\r\n\r\n").startswith("HTTP/1.1 200")
    trickle = crowd[0]
    started = time.monotonic()
    closed = False
    for byte in b"GET /api/health HTTP/1.1\r\nHost: x\r\n":
        try:
            trickle.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.5)
    assert closed or time.monotonic() - started > 2
    trickle.settimeout(3)
    try:
        closed = closed or trickle.recv(100) == b""
    except OSError:
        closed = True
    assert closed and time.monotonic() - started < 2 + 3, "the trickle held its slot past the deadline"


@pytest.fixture
def descriptors():
    """(soft, hard) descriptor limits of this process, restored after the test changed them."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield soft, hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_under_a_descriptor_limit_of_1024_page_views_wait_never_fail(tmp_path, start_server, descriptors, monkeypatch):
    import resource
    import subprocess
    import threading
    import urllib.request
    real_popen = subprocess.Popen
    limited = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))   # noqa: E731
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: real_popen(*a, preexec_fn=limited, **k))
    server = start_server()                     # its soft and hard limits: 1024
    monkeypatch.undo()
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(descriptors[1], 8192), descriptors[1]))
    statuses = []
    server.submit([shell_job("true")] * 5)

    def view():
        try:
            with urllib.request.urlopen(server.url + "/jobs", timeout=60) as answer:
                statuses.append(answer.status)
        except Exception as e:         # a 5xx or a refused connection: what must not happen
            statuses.append(getattr(e, "code", repr(e)))
    threads = [threading.Thread(target=view) for _ in range(600)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert statuses.count(200) == 600, sorted(set(map(str, statuses)))
    assert "lowered to" in (tmp_path / "server.log").read_text()


def test_pilots_keep_working_through_2000_idle_connections(start_server, descriptors, closing):
    import resource
    import socket
    soft, hard = descriptors
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
    server = start_server()                 # with the usual soft limit of 1024 descriptors
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))     # for our 2000 sockets
    server.pilot("-p", "1")
    for _ in range(2000):
        closing(socket.create_connection(("127.0.0.1", server.port)))
    started = time.monotonic()
    uuids = server.submit([shell_job("true")] * 20)
    states = server.wait_jobs(uuids, timeout=30)
    assert time.monotonic() - started < 8, "served only once the idle clients timed out (10 s)"
    assert {s["state"] for s in states.values()} == {"finished"}
    assert all(p["state"] != "lost" for p in server.api.list_pilots())


def test_an_oversized_body_gets_a_413_the_client_reads(p3s):
    import json
    import urllib.error
    import urllib.request
    body = json.dumps({"jobs": [{"payload": "x" * 1000}] * 8000}).encode()      # 8 MB
    request = urllib.request.Request(p3s.url + "/api/jobs", data=body, method="POST",
                                     headers={"Authorization": "Bearer " + p3s.token_file.read_text().strip()})
    started = time.monotonic()
    try:
        urllib.request.urlopen(request, timeout=20)
        raise AssertionError("an 8 MB body was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 413 and "over the limit" in json.loads(e.read())["error"]
    assert time.monotonic() - started < 10


def test_job_py_splits_a_big_submission(p3s):
    jobs = [{"payload": "true " + "n" * 300, "state": "template"}] * 15000      # about 6 MB
    uuids = p3s.submit(jobs)
    assert len(uuids) == 15000 and len(set(uuids)) == 15000
    assert p3s.api.call("GET", "/?format=json")["jobs_by_state"] == {"template": 15000}


BAD_BODIES = [
    ("nested 100k", b'{"jobs": ' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
    ("priority 2**64", b'{"jobs": [{"payload": "x", "priority": 18446744073709551616}]}', "out of range"),
    ("lone surrogate", b'{"jobs": [{"payload": "\\ud800"}]}', "not valid Unicode"),
    ("surrogate as UTF-8 bytes", b'{"jobs": [{"payload": "\xed\xa0\x80"}]}', "not UTF-8 (byte 23)"),
    ("UTF-16", '{"jobs": [{"payload": "x"}]}'.encode("utf-16"), "not UTF-8 (byte 0)"),
    ("Latin-1", '{"jobs": [{"payload": "\u00e9"}]}'.encode("latin-1"), "not UTF-8"),
    ("Infinity", b'{"jobs": [{"payload": "x", "priority": Infinity}]}', "Infinity is not a JSON number"),
    ("NaN", b'{"jobs": [{"payload": "x", "timeout": NaN}]}', "NaN is not a JSON number"),
]


def test_hostile_input_gets_a_400_never_a_traceback(p3s):
    import json
    token = p3s.token_file.read_text().strip()
    for case, body, message in BAD_BODIES:
        answer = raw_request(p3s.port, b"POST /api/jobs HTTP/1.0\r\nAuthorization: Bearer " + token.encode() +
                             b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        status, _, payload = answer.partition("\r\n\r\n")
        assert status.startswith("HTTP/1.1 400"), (case, status)
        assert message in json.loads(payload)["error"], (case, payload)
    for path, status in (("/jobs?page=100000000000000000000", "400"), ("/?refresh=%C2%B2", "200"),
                         ("/file?path=/" + "x" * 4097, "400"), ("/api/jobs?offset=1e20", "400")):
        answer = raw_request(p3s.port, f"GET {path} HTTP/1.0\r\n\r\n".encode())
        assert answer.split()[1] == status, (path, answer[:200])
    register = {"heartbeat": float("inf")}
    for call in (lambda: p3s.api.register_pilot(**register), lambda: p3s.api.define_site("s", period=1e999)):
        with pytest.raises(Exception) as refused:
            call()
        assert getattr(refused.value, "status", None) == 400, refused.value
    assert "Traceback" not in (p3s.dir / "server.log").read_text()
    assert p3s.api.list_jobs() == [] and p3s.api.list_pilots() == []


def test_a_damaged_database_is_refused_at_start(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    server = P3S(tmp_path).start()
    server.submit([shell_job("true")] * 2000)
    server.stop()
    with open(server.db, "r+b") as f:            # scribble over a page in the middle
        f.seek(4096 * 20)
        f.write(b"\xff" * 4096)
    result = subprocess.run([sys.executable, f"{ROOT}/server.py", "--port", "0", "--db", server.db,
                             "--token-file", str(server.token_file)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "damaged" in result.stderr or "malformed" in result.stderr


# -- least privilege ---------------------------------------------------------------------------------
def test_file_serves_only_what_it_opened_under_a_root(tmp_path, start_server):
    import os
    import threading
    import urllib.error
    import urllib.request
    root = tmp_path / "root"
    root.mkdir()
    server = start_server(["--files-root", str(root)])
    token = server.token_file.read_text().strip()
    (root / "good.txt").write_text("good")
    os.link(server.token_file, root / "hardlink")
    os.mkfifo(root / "fifo")
    swap, stop = root / "swap", threading.Event()

    def swapper():
        while not stop.is_set():
            for target in (root / "good.txt", server.token_file):
                tmp = root / "swap.tmp"
                if tmp.is_symlink():
                    tmp.unlink()
                tmp.symlink_to(target)
                os.replace(tmp, swap)

    thread = threading.Thread(target=swapper)
    thread.start()
    leaked = 0
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"{server.url}/file?path={swap}", timeout=5) as answer:
                    leaked += token in answer.read().decode()
            except urllib.error.HTTPError as e:
                assert e.code in (403, 404)
    finally:
        stop.set()
        thread.join()
    assert leaked == 0, f"the token was served {leaked} times"
    for path, code in ((root / "hardlink", 403), (root / "fifo", 403)):
        started = time.monotonic()
        try:
            urllib.request.urlopen(f"{server.url}/file?path={path}", timeout=5)
            raise AssertionError(f"{path} was served")
        except urllib.error.HTTPError as e:
            assert e.code == code
        assert time.monotonic() - started < 2
    listing = urllib.request.urlopen(f"{server.url}/file?path={root}&format=json", timeout=5).read().decode()
    assert "hardlink" not in listing and "good.txt" in listing


def test_an_unknown_host_name_gets_421_and_secret_env_is_masked(tmp_path, start_server):
    import json
    server = start_server(["--allow-host", "p3s.example.org"])
    secrets = {"EOS_TOKEN": "s3cr3t", "DB_PASSWORD": "hunter2", "GRID_SECRET": "grid-x1", "AWS_ACCESS_KEY": "akia-x2",
               "VOMS_CREDENTIAL": "voms-x3", "api_key": "lower-x4"}
    [uuid] = server.submit([shell_job("true", env={"P3S_EXECMODE": "SHELL", "RUN": "7", **secrets})])
    for host, status in (("evil.example", "421"), ("localhost", "200"), ("p3s.example.org", "200"),
                         ("127.0.0.1", "200"), ("[::1]", "200")):
        answer = raw_request(server.port, f"GET /job/{uuid} HTTP/1.0\r\nHost: {host}:{server.port}\r\n\r\n"
                             .encode())
        assert answer.split()[1] == status, (host, answer[:200])
        assert not any(value in answer for value in secrets.values())
    env = json.loads(raw_request(server.port, f"GET /api/jobs/{uuid} HTTP/1.0\r\n\r\n".encode())
                     .partition("\r\n\r\n")[2])["env"]
    assert {k: env[k] for k in secrets} == dict.fromkeys(secrets, "(hidden)") and env["RUN"] == "7"


def test_payloads_never_see_the_token_and_execmode_is_any_case(p3s):
    out = p3s.dir / "env.txt"
    [uuid] = p3s.submit([{"payload": f"env > {out}", "env": {"P3S_EXECMODE": "shell"}}])
    p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs,
            env=dict(p3s.env, P3S_TOKEN=p3s.token_file.read_text().strip()))
    assert p3s.job(uuid)["state"] == "finished"
    seen = out.read_text()
    assert "P3S_JOB_UUID" in seen and "P3S_TOKEN" not in seen
    assert p3s.token_file.read_text().strip() not in seen


def test_links_carry_url_encoded_names(p3s):
    p3s.submit([{"payload": "true", "jobtype": "a&b#c d", "state": "template"}])
    page = raw_request(p3s.port, b"GET / HTTP/1.0\r\n\r\n")
    assert "/jobs?jobtype=a%26b%23c+d" in page


def test_a_4000_vertex_noop_chain_starts_without_stalling_the_pilots(p3s):
    """Releasing a chain of noops was quadratic inside the write lock (46 s for 4,000)."""
    import threading
    from conftest import graphml
    n = 4000
    p3s.api.add_dag("chain", graphml([(f"v{i}", "noop", "") for i in range(n)],
                                     [(f"v{i}", f"v{i + 1}", f"f{i}", "") for i in range(n - 1)]))
    pilot = p3s.api.register_pilot(heartbeat=60)["uuid"]
    latencies, done = [], threading.Event()

    def beat():
        while not done.is_set():
            started = time.monotonic()
            p3s.api.heartbeat(pilot)
            latencies.append(time.monotonic() - started)
            time.sleep(0.01)

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        workflow = p3s.api.create_workflow("chain", state="defined")
    finally:
        done.set()
        thread.join()
    assert workflow["state"] == "finished" and len(workflow["jobs"]) == n
    assert max(latencies) < 2.0, f"a heartbeat waited {max(latencies):.1f} s behind the workflow's start"


def test_an_outside_reader_cannot_grow_the_wal_for_good(tmp_path, start_server):
    import os
    import sqlite3
    server = start_server(["--wal-limit", "300000"])
    reader = sqlite3.connect(server.db)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM jobs").fetchone()        # holds its snapshot
    server.submit([shell_job("true", state="template")] * 3000)
    wal = lambda: os.path.getsize(server.db + "-wal")               # noqa: E731
    assert wal() > 300000
    wait_until(lambda: server.api.health()["wal_large"], 10, what="health to say the WAL is large")
    reader.rollback()
    reader.close()
    wait_until(lambda: wal() < 300000, 10, what="the WAL to be truncated once the reader left")
    assert server.api.health()["wal_large"] is False     # (a write since may have begun it anew)


def test_kept_alive_connections_carry_many_requests_and_a_refused_body_closes_its_connection(tmp_path, start_server):
    from serverAPI import Client
    server = start_server()
    client = Client(server.url, token_file=str(server.token_file), retry_for=5)
    client.call("GET", "/api/health")
    [kept] = client.pool
    local_port = kept.sock.getsockname()[1]
    for _ in range(20):
        client.call("POST", "/api/auth")
    assert client.pool == [kept] and kept.sock.getsockname()[1] == local_port, "one TCP connection"
    both = raw_request(server.port, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                                    b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert both.count("HTTP/1.1 200") == 2, "two requests answered on one connection"
    smuggled = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    refused = raw_request(server.port, b"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer "
                                       b"wrong\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
    assert refused.count("HTTP/1.1") == 1 and refused.startswith("HTTP/1.1 403"), \
        "a body left unread must not be taken for the next request"
    heads = raw_request(server.port, b"HEAD /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                                     b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert heads.count("HTTP/1.1 200") == 2 and '"ok"' not in heads and "<html" not in heads, \
        "HEAD: status and headers, no body (a body would be read as the next answer)"
    server.kill9()
    server.start()                      # the same port: the kept connection is dead now
    started = time.monotonic()
    assert client.call("GET", "/api/health")["ok"]
    assert client.pool != [kept] and time.monotonic() - started < 1, "a new connection, at once"


# -- no payload takes a pilot out -------------------------------------------------------------------
DEEP = 1100     # nested directories: deeper than Python's recursion limit


def deep_tree_command(top):
    """Shell lines that leave, under `top`, DEEP nested directories, a named pipe and a
    symlink to / (a walk that follows it, or opens the pipe, never ends)."""
    return (f'd="{top}"; for i in $(seq {DEEP}); do d="$d/a"; done; mkdir -p "$d"; '
            f'mkfifo "{top}/fifo"; ln -s / "{top}/root"')


def test_a_payload_that_leaves_a_tree_too_deep_to_recurse_takes_no_pilot_out(p3s):
    """The pilot measured the job's output recursively: RecursionError, the pilot died, and the
    job went back to the queue to kill the next pilot. Now the job ends finished, its output
    measured as far as it could be, and the same pilot runs the next job."""
    hostile = shell_job(deep_tree_command("$P3S_JOB_DIR"))
    uuids = p3s.submit([hostile, shell_job("true")])
    pilot = p3s.pilot("-p", "1")
    try:
        states = p3s.wait_jobs(uuids, timeout=60)
        assert [states[u]["state"] for u in uuids] == ["finished", "finished"], states
        assert pilot.poll() is None, "the pilot died"
        assert {p3s.job(u)["pilot"] for u in uuids} == {p3s.api.list_pilots()[0]["uuid"]}
    finally:
        subprocess.run(["rm", "-rf", str(p3s.logs)])    # pytest's own clean-up recurses


def test_an_old_tree_too_deep_to_recurse_neither_stops_nor_fools_the_clean_up(p3s, tmp_path):
    """An old job directory with a tree too deep for recursion, a named pipe and a symlink out:
    the clean-up (at every pilot's start) removes what it can without following the link, and
    the pilot starts and runs its job (every pilot died at start on such a tree)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("not p3s's")
    job_dir = p3s.logs / "20260101-03" / "0b7e3c1e-98f4-4a8e-9d2b-6d7b3f1a2c3d"
    job_dir.mkdir(parents=True)
    subprocess.run(["sh", "-c", deep_tree_command(job_dir) + f'; ln -s "{outside}" "{job_dir}/out"'], check=True)
    old = time.time() - 30 * 3600
    os.utime(job_dir, (old, old))
    [uuid] = p3s.submit([shell_job("true")])
    pilot = p3s.pilot("-p", "1", "--keep-job-files", "20")
    assert p3s.wait_jobs([uuid], timeout=30)[uuid]["state"] == "finished"
    assert pilot.poll() is None, "the pilot died"
    wait_until(lambda: not job_dir.exists(), 10, what="the old tree to go")
    assert (outside / "keep").read_text() == "not p3s's", "the clean-up followed a symlink"


def test_a_pilot_that_says_it_crashed_uses_its_jobs_attempt_and_one_that_stopped_does_not(p3s):
    """A job still dispatched to a pilot that deregisters goes back as never started, unless the
    pilot says it crashed (pilot.py does, on any defect): then the job may be what killed it, so
    it uses an attempt and ends pilotTO with the crash as its reason, not handed out for ever."""
    [calm, fatal] = p3s.api.submit_jobs([{"payload": "true", "jobtype": "calm"},
                                         {"payload": "true", "jobtype": "fatal"}])
    for uuid, reason in ((calm, "done"), (fatal, "crashed: RecursionError: maximum recursion depth")):
        pilot = p3s.api.register_pilot(heartbeat=60, jobtypes=[p3s.job(uuid)["jobtype"]])["uuid"]
        assert p3s.api.request_job(pilot, 0)["job"]["uuid"] == uuid
        p3s.api.deregister_pilot(pilot, reason)
    assert (p3s.job(calm)["state"], p3s.job(calm)["attempt"]) == ("defined", 1)
    job = p3s.job(fatal)
    assert job["state"] == "pilotTO" and "crashed: RecursionError" in job["reason"], job


def test_a_job_that_took_out_two_pilots_is_failed_not_handed_out_again(p3s):
    """Attempts to spare do not matter: the second pilot a job crashes ends it, with a reason."""
    [uuid] = p3s.api.submit_jobs([{"payload": "true", "max_attempts": 5}])
    for crash in range(2):
        pilot = p3s.api.register_pilot(heartbeat=60)["uuid"]
        assert p3s.api.request_job(pilot, 0)["job"]["uuid"] == uuid
        p3s.api.deregister_pilot(pilot, "crashed: RecursionError: maximum recursion depth exceeded")
    job = p3s.job(uuid)
    assert (job["state"], job["attempt"]) == ("failed", 2), job
    assert "the second pilot to crash on this job" in job["reason"], job["reason"]
    assert p3s.api.request_job(p3s.api.register_pilot(heartbeat=60)["uuid"], 0)["job"] is None


# -- escaped children are the pilot's children ----------------------------------------------------
HOG = "import time; x = bytes(range(256)) * (300 * 4096); time.sleep(60)"    # 300 MB, touched


def test_a_child_that_left_the_group_counts_against_the_memory_limit_and_dies_with_the_job(p3s, tmp_path):
    """A payload's child that calls setsid and holds 300 MB under a 100 MB limit: it counted for
    nothing (the job ended finished, 24.8 MB peak) and lived on. Now it is the job's: the job
    fails over its memory limit, and the child is dead when the job has ended."""
    pidfile = tmp_path / "hog.pid"
    payload = (f'setsid sh -c \'echo $$ > {pidfile}; exec python3 -c "{HOG}"\' & sleep 30')
    [uuid] = p3s.submit([shell_job(payload, memory=100)])
    p3s.pilot("-p", "1")
    job = p3s.wait_jobs([uuid], timeout=40)[uuid]
    job = p3s.job(uuid)
    assert job["state"] == "failed" and "over its memory limit of 100 MB" in job["reason"], job
    wait_until(lambda: not alive(int(pidfile.read_text())), 5, what="the escaped child to die")


def test_a_child_that_left_the_group_and_outlived_a_short_job_is_killed_and_named(p3s, tmp_path):
    """A short job (no sample taken) leaves a setsid child behind: the pilot, its subreaper,
    finds it, kills it and says so on the finished job; the next job runs as usual."""
    pidfile = tmp_path / "left.pid"
    uuids = p3s.submit([shell_job(f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 60' & sleep 0.05"),
                        shell_job("true")])
    pilot = p3s.pilot("-p", "1")
    states = p3s.wait_jobs(uuids, timeout=30)
    assert [states[u]["state"] for u in uuids] == ["finished", "finished"]
    assert not alive(int(pidfile.read_text())), "the escaped child lives on"
    assert "outlived it and were killed" in p3s.job(uuids[0])["errmsg"]
    assert pilot.poll() is None


def test_a_payloads_background_child_dies_when_the_payload_exits(p3s):
    """The pilot kills what is left of the payload's process group once the payload exits."""
    child = p3s.dir / "child.pid"
    [uuid] = p3s.submit([shell_job(f"sleep 60 & echo $! > {child}; exit 0")])
    pilot = p3s.pilot("-p", "1")                 # it lives on: its exit would kill the child too
    p3s.wait_jobs([uuid], timeout=20)
    assert p3s.job(uuid)["state"] == "finished"
    pid = int(child.read_text())
    wait_until(lambda: not alive(pid), 3, what="the payload's background child to be killed")
    assert pilot.poll() is None


def test_pilots_at_work_outlast_a_crowd_of_hostile_connections_that_fills_every_slot(tmp_path, start_server,
                                                                                      closing):
    """With few slots (--max-connections 60), 150 hostile connections from 15 addresses, in every
    phase: half-sent headers, bodies trickled a byte at a time, pipelined requests never read,
    idle sockets. Four pilots at work beat every 0.5 s on their kept connections, and report
    and claim through new ones. None is shown lost, none fences, every job runs once to its end."""
    server = start_server(["--max-connections", "60", "--header-timeout", "3", "--lease-beats", "8"])
    ledger = tmp_path / "ledger"
    uuids = server.submit([shell_job(f'echo "$P3S_JOB_UUID" >> {ledger}; sleep 1')] * 24)
    for _ in range(4):
        server.pilot("-p", "1", "--kill-grace", "1")
    wait_until(lambda: len(server.api.list_pilots()) == 4, 15, what="4 pilots")
    body_head = (b"POST /api/pilots/0b7e3c1e-98f4-4a8e-9d2b-6d7b3f1a2c3d/heartbeat HTTP/1.1\r\n"
                 b"Host: 127.0.0.1\r\nContent-Length: 200\r\n\r\n{")
    kinds = (b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ",    # headers never ended
             body_head,                                                      # a body trickled
             b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 2000,  # answers never read
             b"")                                                            # nothing at all
    crowd, seen = [], []
    end = time.monotonic() + 12
    while time.monotonic() < end:
        while len(crowd) < 150:
            try:
                sock = closing(connect_from(server.port, f"127.0.0.{2 + len(crowd) % 15}"))
                sock.setblocking(False)
                with contextlib.suppress(OSError):
                    sock.send(kinds[len(crowd) % 4])
                crowd.append(sock)
            except OSError:
                break
        for sock in crowd[1::4]:
            with contextlib.suppress(OSError):
                sock.send(b" ")                     # the tricklers go on
        crowd = [s for s in crowd if not closed(s)]
        seen += [p["state"] for p in server.api.list_pilots()]
        time.sleep(0.5)
    states = server.wait_jobs(uuids, timeout=60)
    assert "lost" not in seen, "a pilot at work was shown lost while the crowd held the slots"
    assert {s["state"] for s in states.values()} == {"finished"}, states
    assert sorted(ledger.read_text().split()) == sorted(uuids), "a job ran twice or not at all"


def closed(sock):
    """True once the server closed or reset this connection (what it sent is drained)."""
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True
