"""The connection loop: one thread holds every connection between requests and serves the
pilots' reports and heartbeats itself, a turn's writes in one commit; every other request, and
anything not plainly framed, goes to a worker thread. Raw sockets, a real server."""
import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid as uuidlib

from conftest import fill, shell_job
from serverAPI import Client, P3SError


def heartbeat_request(pilot, secret, close=False):
    body = b"{}"
    return (f"POST /api/pilots/{pilot}/heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"X-P3S-Pilot-Secret: {secret}\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def read_answers(sock, count, timeout=10):
    """`count` answers read off one connection, in order: (status line, JSON body)."""
    sock.settimeout(timeout)
    data, answers = b"", []
    while len(answers) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            head = data[:head_end].decode()
            length = int(next(v for k, v in (line.split(": ", 1) for line in head.split("\r\n")[1:])
                              if k.lower() == "content-length"))
            if len(data) >= head_end + 4 + length:
                answers.append((head.split("\r\n")[0], json.loads(data[head_end + 4:head_end + 4 + length])))
                data = data[head_end + 4 + length:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed after {len(answers)} answers"
        data += chunk
    return answers


def pilot_of(p3s):
    pilot = p3s.api.register_pilot(heartbeat=1)
    return pilot["uuid"], p3s.api.pilot_secrets[pilot["uuid"]]


def server_threads(p3s):
    status = open(f"/proc/{p3s.proc.pid}/status").read()
    return int(status.split("Threads:")[1].split()[0])


def test_pipelined_requests_are_answered_in_order_across_the_loop_and_a_thread(p3s, closing):
    """Heartbeat (the loop's), health (a thread's, which reads the next request into its buffer
    and must give it back), heartbeat again, in one write: three answers, in that order."""
    pilot, secret = pilot_of(p3s)
    sock = closing(socket.create_connection(("127.0.0.1", p3s.port)))
    sock.sendall(heartbeat_request(pilot, secret) + b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                 + heartbeat_request(pilot, "wrong-secret", close=True))
    beat, health, refused = read_answers(sock, 3)
    assert beat == ("HTTP/1.1 200 OK", {"directive": None})
    assert health[0] == "HTTP/1.1 200 OK" and "version" in health[1], health
    assert refused[0].startswith("HTTP/1.1 403") and "secret" in refused[1]["error"], refused
    assert sock.recv(100) == b"", "Connection: close was not honoured"


def tcp_connection(local_port, remote_port):
    """(state, bytes unsent, bytes unread) of one loopback TCP socket, from /proc/net/tcp
    (state 01 is ESTABLISHED); None once the kernel no longer has it."""
    with open("/proc/net/tcp") as f:
        for line in f.read().splitlines()[1:]:
            fields = line.split()
            ports = [int(address.split(":")[1], 16) for address in fields[1:3]]
            if ports == [local_port, remote_port]:
                unsent, unread = (int(n, 16) for n in fields[4].split(":"))
                return fields[3], unsent, unread
    return None


def raw_answer(sock):
    """The bytes of one answer, read whole (its head and its Content-Length of body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head)[1])
    while len(body) < length:
        body += sock.recv(4096)
    assert len(body) == length, "more than one answer"
    return data[:len(head) + 4] + body


def send_until_stalled(sock, data, stall=0.3, limit=10):
    """Bytes of `data` sent on a non-blocking socket before nothing more went for `stall` s."""
    sent, stalled_since, deadline = 0, None, time.monotonic() + limit
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent:sent + 65536])
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > stall:
                break
            time.sleep(0.01)
    return sent


def test_requests_sent_before_the_client_shuts_its_side_are_all_answered(p3s, closing):
    """Pipelined requests, then the client's end of the stream (shutdown SHUT_WR, as `nc -N`
    does): every request it sent is answered, the loop's and a thread's, then the server closes."""
    pilot, secret = pilot_of(p3s)
    sock = closing(socket.create_connection(("127.0.0.1", p3s.port)))
    sock.sendall(heartbeat_request(pilot, secret) * 2 + b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                 + heartbeat_request(pilot, secret))
    sock.shutdown(socket.SHUT_WR)
    answers = read_answers(sock, 4)
    assert [status for status, _ in answers] == ["HTTP/1.1 200 OK"] * 4, answers
    assert sock.recv(100) == b"", "the server kept a connection whose client had ended"


def test_a_client_that_reads_no_answers_holds_up_no_one_and_is_cut_off(start_server, closing):
    """60,000 heartbeats sent on a connection that never reads its answers. The server reads
    only LOOP_INBOX ahead of what it has answered, so the rest waits in kernel buffers, not in
    the server's memory (it read all 10 MB before). Other pilots are served meanwhile, and past
    the header deadline the connection is cut off. Seen from the server's side, in the kernel's
    table: a client that reads nothing may never see the server's reset."""
    from server import LOOP_INBOX
    server = start_server(["--header-timeout", "3"])
    pilot, secret = pilot_of(server)
    hostile = socket.socket()
    closing(hostile)
    hostile.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hostile.connect(("127.0.0.1", server.port))
    request = heartbeat_request(pilot, secret)
    hostile.sendall(request)
    answer = raw_answer(hostile)
    hostile.setblocking(False)
    sent = send_until_stalled(hostile, request * 60000)       # 10 MB
    ports = (server.port, hostile.getsockname()[1])
    _, unsent_by_server, unread_by_server = tcp_connection(*ports)
    _, unsent_by_client, unread_by_client = tcp_connection(*reversed(ports))
    answered = (unsent_by_server + unread_by_client) // len(answer)
    held = sent - unread_by_server - unsent_by_client - answered * len(request)
    assert held <= LOOP_INBOX + 2 * 65536, f"the server holds {held} bytes of this client's requests"
    for _ in range(5):
        started = time.monotonic()
        other = socket.create_connection(("127.0.0.1", server.port))
        other.sendall(heartbeat_request(pilot, secret, close=True))
        [(status, _)] = read_answers(other, 1)
        other.close()
        assert status == "HTTP/1.1 200 OK" and time.monotonic() - started < 1.5
    deadline = time.monotonic() + 10
    while (tcp_connection(*ports) or ["closed"])[0] == "01" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (tcp_connection(*ports) or ["closed"])[0] != "01", "the stuck connection was not cut off"


def test_a_report_whose_commit_fails_answers_503_and_changes_nothing(tmp_path, small_fs, start_server):
    """A full disk at the commit of a turn: every answer of that turn says so (a 503 that the
    pilot retries), none says the report was stored, and once space is freed it is."""
    server = start_server(db=small_fs / "p3s.db")
    pilot, _ = pilot_of(server)
    [uuid] = server.submit([shell_job("true")])
    assert server.api.request_job(pilot, 0)["job"]["uuid"] == uuid
    filler = fill(small_fs)
    report = {"state": "finished", "pilot": pilot, "attempt": 1, "exit_code": 0,
              "stdout": os.urandom(48 * 1024).hex()[:64 * 1024], "stderr": os.urandom(48 * 1024).hex()[:64 * 1024]}
    try:
        for _ in range(3):
            try:
                server.api.report(uuid, report, retry_for=0)
                raise AssertionError("a report was stored on a full disk")
            except Exception as e:      # serverAPI's error: the server's own words
                assert "disk full" in str(e), e
        assert server.api.get_job(uuid)["state"] == "dispatched", "a refused report changed the job"
    finally:
        filler.unlink()
    server.api.report(uuid, report, retry_for=5)
    assert server.api.get_job(uuid)["state"] == "finished"
    log = (tmp_path / "server.log").read_text()
    assert "connection loop's turn failed" not in log, log[-2000:]


def test_a_hot_request_trickled_past_its_deadline_is_cut_off(start_server, closing):
    server = start_server(["--header-timeout", "1"])
    pilot, secret = pilot_of(server)
    request = heartbeat_request(pilot, secret)
    slow = closing(socket.create_connection(("127.0.0.1", server.port)))
    slow.sendall(request[:-1])      # all but the body's last byte
    slow.settimeout(4)
    started = time.monotonic()
    assert slow.recv(100) == b"", "the unfinished request got an answer"
    assert time.monotonic() - started < 3, "the unfinished request held its slot past its deadline"


def test_kept_alive_pilot_connections_hold_no_thread(p3s, closing):
    """Two hundred pilots' connections, each kept alive after a heartbeat: the server holds them
    all in its loop, not in a thread each (a thread per connection cost as much CPU as the
    requests, and memory per idle pilot)."""
    pilot, secret = pilot_of(p3s)
    before = server_threads(p3s)
    held = []
    for _ in range(200):
        sock = closing(socket.create_connection(("127.0.0.1", p3s.port)))
        sock.sendall(heartbeat_request(pilot, secret))
        held.append(sock)
    for sock in held:
        [(status, _)] = read_answers(sock, 1)
        assert status == "HTTP/1.1 200 OK"
    assert server_threads(p3s) <= before + 2, (before, server_threads(p3s))



def test_heartbeats_do_not_wait_behind_a_long_write(p3s):
    """A 60,000-job submission commits in one transaction of seconds. Reports sent meanwhile wait
    for it (in threads), and the pilots' heartbeats, served by the loop, do not (before, the
    first report blocked the loop: 4.1 s without an answer to any heartbeat at 100,000 jobs)."""
    pilot, _ = pilot_of(p3s)
    jobs = p3s.dir / "big.json"
    jobs.write_text(json.dumps([shell_job("true", site="nowhere")] * 60000))
    reporter = Client(p3s.url, token_file=str(p3s.token_file), retry_for=0)
    reporter.pilot_secrets = p3s.api.pilot_secrets
    done, slowest = threading.Event(), [0.0]

    def report_all_along():
        while not done.is_set():
            with contextlib.suppress(P3SError):     # no such job: a 404, from inside a transaction
                reporter.report(str(uuidlib.uuid4()), {"state": "finished", "pilot": pilot, "attempt": 1})
            time.sleep(0.02)

    def beat_all_along():
        while not done.is_set():
            started = time.monotonic()
            p3s.api.heartbeat(pilot)
            slowest[0] = max(slowest[0], time.monotonic() - started)
            time.sleep(0.02)
    threads = [threading.Thread(target=f) for f in (report_all_along, beat_all_along)]
    for thread in threads:
        thread.start()
    try:
        result = p3s.run("job.py", "-j", jobs, timeout=300)
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert result.returncode == 0, result.stderr
    assert slowest[0] < 1.0, f"a heartbeat waited {slowest[0]:.1f} s behind the submission"


def test_a_report_sent_with_expect_100_continue_is_answered_and_the_connection_comes_back(p3s, closing):
    """`Expect: 100-continue` is a thread's to answer (the interim answer, then the body); the
    same connection then carries a heartbeat the loop serves."""
    pilot, secret = pilot_of(p3s)
    [uuid] = p3s.submit([shell_job("true")])
    assert p3s.api.request_job(pilot, 0)["job"]["uuid"] == uuid
    body = json.dumps({"state": "finished", "pilot": pilot, "attempt": 1, "exit_code": 0}).encode()
    sock = closing(socket.create_connection(("127.0.0.1", p3s.port)))
    sock.settimeout(10)
    sock.sendall((f"POST /api/jobs/{uuid}/report HTTP/1.1\r\nHost: 127.0.0.1\r\nX-P3S-Pilot-Secret: {secret}\r\n"
                  f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n").encode())
    interim = b""
    while not interim.endswith(b"\r\n\r\n"):
        interim += sock.recv(1)
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
    sock.sendall(body + heartbeat_request(pilot, secret))
    (status, answer), (beat, _) = read_answers(sock, 2)
    assert status == "HTTP/1.1 200 OK" and answer["state"] == "finished", (status, answer)
    assert beat == "HTTP/1.1 200 OK"
    assert p3s.api.get_job(uuid)["state"] == "finished"


def test_clients_that_leave_mid_request_free_their_slots(start_server, closing):
    """Half a report, then the client is gone (killed, its node rebooted): at --max-per-client 3,
    from one address, three such clients in a row leave room for three more, every time."""
    server = start_server(["--max-per-client", "3"])
    pilot, secret = pilot_of(server)
    half = heartbeat_request(pilot, secret)[:-1]
    for _ in range(3):
        crowd = [closing(socket.socket()) for _ in range(3)]
        for sock in crowd:
            sock.bind(("127.0.0.2", 0))
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(half)
        for sock in crowd:
            sock.close()
        time.sleep(0.3)
    sock = closing(socket.socket())
    sock.bind(("127.0.0.2", 0))
    sock.connect(("127.0.0.1", server.port))
    sock.sendall(heartbeat_request(pilot, secret))
    sock.settimeout(10)
    status = sock.recv(100).split(b"\r\n")[0]
    assert status == b"HTTP/1.1 200 OK", f"a slot of a client gone mid-request was never freed: {status}"


def test_requests_split_anywhere_are_answered_in_order(p3s, closing):
    """The loop's framing against the Handler's, byte by byte: a mix of the loop's requests
    (good and refused, a body with bare LFs), a thread's (a page, the API) and back, cut at
    random places and sent piece by piece, gets every answer, in order, on one connection."""
    import random
    pilot, secret = pilot_of(p3s)
    pretty = json.dumps({"note": "x"}, indent=2).encode()     # LFs inside a body are the body's
    beat_pretty = (f"POST /api/pilots/{pilot}/heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"X-P3S-Pilot-Secret: {secret}\r\nContent-Length: {len(pretty)}\r\n\r\n").encode() + pretty
    bad_json = (f"POST /api/pilots/{pilot}/heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"X-P3S-Pilot-Secret: {secret}\r\nContent-Length: 5\r\n\r\n{{x:1}}").encode()
    mix = [(heartbeat_request(pilot, secret), "200"), (b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "200"),
           (heartbeat_request(pilot, "wrong"), "403"), (beat_pretty, "200"), (bad_json, "400"),
           (b"GET /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", "200"), (heartbeat_request(pilot, secret), "200")]
    for seed in range(6):
        rng = random.Random(seed)
        requests = [rng.choice(mix) for _ in range(12)]
        stream = b"".join(r for r, _ in requests)
        cuts = sorted(rng.sample(range(1, len(stream)), 15))
        sock = closing(socket.create_connection(("127.0.0.1", p3s.port)))
        for start, end in zip([0] + cuts, cuts + [len(stream)]):
            sock.sendall(stream[start:end])
            time.sleep(rng.choice((0, 0, 0.01)))
        statuses = [status.split()[1] for status, _ in read_answers(sock, len(requests))]
        assert statuses == [expected for _, expected in requests], (seed, statuses)


def test_threads_for_long_polls_end_once_the_crowd_is_gone(p3s):
    """Forty idle pilots long-poll at once: each gets a thread of its own (none waits behind
    another's poll), and once they have their answers, at most IDLE_WORKERS threads stay."""
    from server import IDLE_WORKERS
    pilots = [pilot_of(p3s)[0] for _ in range(40)]
    before = server_threads(p3s)
    answered = []

    def poll(pilot):
        client = Client(p3s.url, token_file=str(p3s.token_file), retry_for=5)
        client.pilot_secrets = p3s.api.pilot_secrets
        started = time.monotonic()
        answer = client.request_job(pilot, 2)
        answered.append((answer["job"], time.monotonic() - started))
    threads = [threading.Thread(target=poll, args=(p,)) for p in pilots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answered) == 40 and all(job is None and 1.5 < waited < 5 for job, waited in answered), answered
    time.sleep(0.5)
    assert server_threads(p3s) <= before + IDLE_WORKERS, (before, server_threads(p3s))
