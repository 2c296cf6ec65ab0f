"""The one HTTP client of p3s: every tool talks to the server through this module.

Configuration, in order of precedence: explicit arguments, then the environment:
  P3S_SERVER      base URL (default http://127.0.0.1:8000)
  P3S_TOKEN       the write token, or
  P3S_TOKEN_FILE  a file holding it (default: p3s.token beside this file, if it exists,
                  which is where `python server.py` puts the token it generates)
  P3S_RETRY_FOR   seconds to keep retrying an unreachable server (default 30)

Connection errors and 5xx answers are retried with capped exponential backoff for `retry_for`
seconds; everything else fails at once. Every failure raises P3SError with a readable message.

It also holds the conventions every tool shares: ArgumentParser (one-line usage errors),
add_verbosity (-v N, $P3S_VERBOSITY), format_table (text tables) and run_cli (exit 0 success, 2 bad input, 1 server or
network failure).
"""
import argparse
import collections
import contextlib
import json
import os
import re
import secrets
import select
import signal
import uuid as uuidlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import quote, urlencode, urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SERVER = "http://127.0.0.1:8000"
VERSION = "1.0"         # p3s's, as the tools record it (server.py, which imports nothing of ours, has its own)
DEFAULT_TOKEN_FILE = os.path.join(HERE, "p3s.token")
BACKOFF_FIRST = 0.1     # seconds before the first retry of a failed call; doubles each time
BACKOFF_CAP = 5.0       # seconds, the longest pause between retries
KEEP_CONNECTIONS = 4    # idle connections a client keeps open (a pilot uses up to three at once)
SUBMIT_BYTES = 1024 * 1024  # a submission goes in requests of about this size (the server takes 4 MiB)


CLIENT_ENV = (
    ("P3S_SERVER", f"the server's URL (default {DEFAULT_SERVER})"),
    ("P3S_TOKEN", "the write token, or"),
    ("P3S_TOKEN_FILE", "a file holding it (default p3s.token beside the scripts)"),
    ("P3S_RETRY_FOR", "seconds to keep retrying an unreachable server (default 30)"),
    ("P3S_VERBOSITY", "the default of -v (0-4)"),
)
CLIENT_EXITS = (
    ("0", "success"),
    ("1", "server or network failure"),
    ("2", "bad input, or a request the server refused (one line on stderr says why)"),
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the tools' convention for bad options: one line on stderr, exit 2; its
    --help ends with the environment the tool reads and its exit codes."""

    def __init__(self, *args, env=(), exits=(), **kwargs):
        lines = ["environment:"] + [f"  {name:<16}{meaning}" for name, meaning in CLIENT_ENV + tuple(env)]
        lines += ["", "exit codes:"] + [f"  {code:<4}{meaning}" for code, meaning in CLIENT_EXITS + tuple(exits)]
        super().__init__(*args, epilog="\n".join(lines), formatter_class=argparse.RawDescriptionHelpFormatter,
                         **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def verbosity(value):
    """-v N: 0 (quiet) to 4 (everything), as in the original p3s."""
    if not (value.isascii() and value.isdigit()) or int(value) > 4:
        raise argparse.ArgumentTypeError(f"verbosity (-v or $P3S_VERBOSITY) must be 0 to 4, got {value!r}")
    return int(value)


def add_verbosity(parser, what="say more"):
    """-v [N] for every tool: a bare -v is 1; $P3S_VERBOSITY sets the default."""
    parser.add_argument("-v", "--verbose", type=verbosity, nargs="?", const=1, metavar="N",
                        default=os.environ.get("P3S_VERBOSITY", "0"),
                        help=f"{what}: verbosity 0-4 (a bare -v is 1; default $P3S_VERBOSITY or 0)")


def stop_on_sigterm():
    """SIGTERM ends a long-running tool (injector, factory) as Ctrl-C does: a clean exit, which
    retires its service (a kill -9 does not, and so alarms)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


def retire(client, name):
    """A long-running tool's clean exit: its service is retired, so a stopped injector or
    factory never alarms."""
    try:
        client.retire_service(name, retry_for=10)
    except P3SError as e:
        print(f"could not retire the service {name!r}: {e}", file=sys.stderr)


class InputError(Exception):
    """Bad input a tool found before sending anything: exit 2."""


def run_cli(tool, action):
    """Run a tool's action with the exit-code convention of every p3s client: 0 success,
    2 bad input or a request the server refused, 1 server or network failure; one line on
    stderr says what went wrong. A reader that stops reading (`| head`) ends it quietly."""
    try:
        status = action()
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())    # no second error at exit
        return 0
    except InputError as e:
        print(f"{tool}: {e}", file=sys.stderr)
        return 2
    except P3SError as e:
        print(f"{tool}: {e}", file=sys.stderr)
        return e.exit_code


class P3SError(Exception):
    """A failed call. `status` is the HTTP status, or None when the server could not be reached.

    `bad_input` tells the tools which exit code to use: 2 for a request the server refused
    (4xx), 1 for a server or network failure."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status

    @property
    def bad_input(self):
        return self.status is not None and 400 <= self.status < 500

    @property
    def exit_code(self):
        return 2 if self.bad_input else 1


def read_token(token=None, token_file=None):
    """The token from the argument, $P3S_TOKEN, $P3S_TOKEN_FILE or the default file, or ''."""
    if token:
        return token
    if os.environ.get("P3S_TOKEN"):
        return os.environ["P3S_TOKEN"].strip()
    path = token_file or os.environ.get("P3S_TOKEN_FILE")
    if path is None and os.path.exists(DEFAULT_TOKEN_FILE):
        path = DEFAULT_TOKEN_FILE
    if not path:
        return ""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise InputError(f"token file {path} (P3S_TOKEN_FILE): {e.strerror}; make one with "
                         "`python server.py --new-token FILE`, or set P3S_TOKEN") from None


class BadAnswer(Exception):
    """What came back is not an HTTP answer this client reads."""


class Answer:
    """The server's answer to one request: status, reason, headers (lower-case names), body."""
    __slots__ = ("status", "reason", "headers", "body", "will_close")

    def __init__(self, status, reason, headers, body, will_close):
        self.status, self.reason, self.headers, self.body, self.will_close = status, reason, headers, body, will_close


STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: ([^\r\n]*))?\r?\n")
MAX_LINE = 65536        # bytes of one status or header line
MAX_HEADERS = 100       # header lines of one answer
MAX_INTERIM = 10        # interim (1xx) answers before the real one


class Connection:
    """One kept-alive HTTP/1.1 connection, small and strict: a request goes out in one write;
    the answer's status line and headers are read within bounds, its body by Content-Length
    (chunked, as a proxy may send it, or up to the close). http.client parses headers through
    the email package, which was about 40 % of a pilot's request time."""

    def __init__(self, scheme, host, port, timeout):
        port = port or (443 if scheme == "https" else 80)
        sock = socket.create_connection((host, port), timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a small request is not held back
            if scheme == "https":
                import ssl      # only here: a Python built without ssl still speaks http
                try:
                    sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
                except ssl.SSLCertVerificationError as e:     # retrying cannot help: said at once
                    raise InputError(f"https://{host}:{port}: its certificate is not trusted ({e.verify_message}); "
                                     "point SSL_CERT_FILE at the CA that signed it") from None
        except (OSError, ValueError, InputError):
            sock.close()
            raise
        self.sock, self.rfile, self.tls = sock, sock.makefile("rb"), scheme == "https"
        self.host = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def exchange(self, method, target, headers, body=None, sent=None):
        """Send one request and read its whole answer; `sent(sock)`, if given, is called in
        between, once the whole request is with the kernel (it reaches the server even if we die
        now), with the socket the answer comes on (to wait for it beside something else)."""
        head = [f"{method} {target} HTTP/1.1", f"Host: {self.host}", *(f"{k}: {v}" for k, v in headers.items())]
        if body is not None or method in ("POST", "PUT"):
            head.append(f"Content-Length: {len(body or b'')}")
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b""))
        if sent is not None:
            sent(self.sock)
        for _ in range(MAX_INTERIM + 1):
            version, status, reason = self.status_line()
            headers = self.header_lines()
            if status >= 200:
                break               # an interim 1xx answer is followed by the real one
        else:
            raise BadAnswer(f"more than {MAX_INTERIM} interim (1xx) answers")
        will_close = version == b"0" or "close" in headers.get("connection", "").lower()
        if method == "HEAD" or status in (204, 304):
            return Answer(status, reason, headers, b"", will_close)
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return Answer(status, reason, headers, self.chunks(), will_close)
        if "content-length" in headers:
            length = headers["content-length"]
            if not (length.isascii() and length.isdigit()):
                raise BadAnswer(f"Content-Length {length[:20]!r}")
            return Answer(status, reason, headers, self.exactly(int(length)), will_close)
        return Answer(status, reason, headers, self.rfile.read(), True)     # up to the close

    def line(self):
        line = self.rfile.readline(MAX_LINE + 1)
        if not line:
            raise ConnectionAbortedError("the server closed the connection")
        if len(line) > MAX_LINE:
            raise BadAnswer("an answer line over 64 KiB")
        return line

    def status_line(self):
        match = STATUS_LINE.fullmatch(self.line())
        if not match:
            raise BadAnswer("not an HTTP/1.x answer")
        return match[1], int(match[2]), (match[3] or b"").decode("latin-1")

    def header_lines(self):
        headers = {}
        for _ in range(MAX_HEADERS):
            line = self.line()
            if line in (b"\r\n", b"\n"):
                return headers
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise BadAnswer(f"header line {line[:40]!r}")
            headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
        raise BadAnswer(f"more than {MAX_HEADERS} header lines")

    def exactly(self, length):
        data = self.rfile.read(length)
        if len(data) != length:
            raise ConnectionAbortedError(f"the answer ended after {len(data)} of {length} bytes")
        return data

    def chunks(self):
        parts = []
        while True:
            size = self.line().split(b";")[0].strip()
            if not size or len(size) > 15 or not all(c in b"0123456789abcdefABCDEF" for c in size):
                raise BadAnswer(f"chunk size {size[:20]!r}")
            if int(size, 16) == 0:
                while self.line() not in (b"\r\n", b"\n"):
                    pass            # trailers
                return b"".join(parts)
            parts.append(self.exactly(int(size, 16)))
            self.line()             # the chunk's CRLF

    def dropped(self):
        """Whether the server closed this idle connection (or sent what nobody asked for): a
        request sent on it would be lost, after its sender was told it went out. One poll (not
        select: a busy process's descriptor may be past 1023): an idle connection has nothing to
        read. Never said of TLS, where a server may send session tickets unasked: its retry
        covers it."""
        if self.tls:
            return False
        try:
            poll = select.poll()
            poll.register(self.sock, select.POLLIN)
            return bool(poll.poll(0))
        except (OSError, ValueError):
            return True

    def close(self):
        with contextlib.suppress(OSError):
            self.rfile.close()
            self.sock.close()


def encoded(body):
    """(the bytes a call sends, or None; whether they are raw): bytes as they are, else JSON."""
    if isinstance(body, bytes):
        return body, True
    return (json.dumps(body).encode() if body is not None else None), False


class Client:
    """The p3s API for a tool: one method per call, JSON in and out.

    Methods for the caller: call(method, path, body, query) for any route, and one named
    method per route (submit_jobs, request_job, report, add_dag, ...). Each returns the decoded
    answer or raises P3SError; connection errors and 5xx are retried for `retry_for` seconds.
    """

    def __init__(self, server=None, token=None, token_file=None, timeout=10.0, retry_for=None):
        self.server = (server or os.environ.get("P3S_SERVER") or DEFAULT_SERVER).rstrip("/")
        if "://" not in self.server:
            self.server = "http://" + self.server
        check_url(self.server)
        parts = urlsplit(self.server)
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.base_path = parts.path.rstrip("/")
        self.pool, self.pool_lock = [], threading.Lock()     # idle kept-alive connections
        self.token, self.token_file = token, token_file
        self.token_problem = None   # why the token could not be read, said if the server needs it
        self.timeout = timeout
        self.retry_for = retry_for if retry_for is not None else _retry_from_env()
        self.pilot_secrets = {}     # pilot uuid -> the secret it registered with
        self.reached = False        # True once a request may have reached the server
        self.on_retry = None        # said once when the server cannot be reached and we retry

    # -- transport ------------------------------------------------------------------------------
    def call(self, method, path, body=None, query=None, timeout=None, retry_for=None, pilot=None, sent=None):
        """One API call; returns the decoded JSON answer or raises P3SError. `body` is sent as
        JSON, or as is if bytes; a function gives it anew at each attempt. `pilot`: the pilot
        uuid whose secret the call carries (job requests, heartbeats, reports, stop, images).
        `sent(sock)`: called each time the request has gone out, before its answer is read
        (see exchange)."""
        target = self.base_path + path + ("?" + urlencode(query) if query else "")
        retrying = self.retry_for if retry_for is None else retry_for
        deadline = time.monotonic() + retrying
        delay = BACKOFF_FIRST
        data, raw = (None, False) if callable(body) else encoded(body)     # a big submission: once
        while True:
            if callable(body):
                data, raw = encoded(body())
            try:
                return self._once(method, target, data, self._headers(pilot, raw), timeout or self.timeout, sent)
            except P3SError as e:
                if e.bad_input or time.monotonic() + delay > deadline:
                    raise
                if self.on_retry and e.status is None:
                    until = time.strftime("%H:%M:%S", time.localtime(time.time() + retrying))
                    source = " (P3S_RETRY_FOR)" if retry_for is None else ""
                    self.on_retry(f"server not reachable at {self.server} ({e}); retrying for {retrying:g} s"
                                  f"{source}, until {until}")
                    self.on_retry = None        # said once
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_CAP)

    def _headers(self, pilot=None, raw=False):
        """Read the token at each attempt until found: a server starting alongside the
        client may write its token file only after the client started. A token file that is
        missing is said (exit 2) only once the server answers that it needs the token."""
        if not self.token:
            try:
                self.token, self.token_problem = read_token(None, self.token_file), None
            except InputError as e:
                self.token_problem = e
        headers = {"Content-Type": "application/octet-stream" if raw else "application/json"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        if pilot in self.pilot_secrets:
            headers["X-P3S-Pilot-Secret"] = self.pilot_secrets[pilot]
        return headers

    def _once(self, method, target, data, headers, timeout, sent=None):
        """One request on a kept-alive connection. A kept connection the server has closed
        meanwhile (its idle timeout) fails before any answer: then once more, on a new one."""
        for reuse in (True, False):
            conn = None
            try:
                conn, reused = self._connection(timeout, reuse)
                self.reached = True     # from here the request may reach the server
                answer = conn.exchange(method, target, headers, data, sent)
            except ConnectionError as e:
                if conn is not None:
                    conn.close()
                if conn is not None and reused:
                    continue
                raise P3SError(f"cannot reach the p3s server at {self.server}: {e}") from None
            except (OSError, BadAnswer) as e:
                if conn is not None:
                    conn.close()
                raise P3SError(f"cannot reach the p3s server at {self.server}: {e}") from None
            self._release(conn, answer.will_close)
            break
        payload = answer.body
        if answer.status == 401 and self.token_problem:
            raise self.token_problem
        if answer.status == 404:        # name what was asked: a wrong P3S_SERVER shows at once
            raise P3SError(f"{method} {self.server}{target[len(self.base_path):]}: {_error_text(payload, answer)}", 404)
        if answer.status >= 400:
            raise P3SError(_error_text(payload, answer), answer.status)
        try:
            return json.loads(payload or b"{}")
        except ValueError:
            raise P3SError(f"{self.server}{target}: the answer is not JSON") from None

    def _connection(self, timeout, reuse=True):
        """(a connection, whether it served a request before): an idle kept one, else a new
        one. Any thread may take one (a pilot's main loop, heartbeats, reports); one request at
        a time on each. TCP_NODELAY: a small request is not held back for an earlier ACK."""
        with self.pool_lock:
            kept = self.pool.pop() if reuse and self.pool else None
        if kept is not None and kept.dropped():
            kept.close()
            kept = None
        if kept is not None:
            if kept.sock.gettimeout() != timeout:
                kept.sock.settimeout(timeout)
            return kept, True
        return Connection(self.scheme, self.host, self.port, timeout), False

    def _release(self, conn, closing):
        """Keep a connection for the next request, unless the server closes it or enough are kept."""
        with self.pool_lock:
            if not closing and len(self.pool) < KEEP_CONNECTIONS:
                self.pool.append(conn)
                return
        conn.close()

    def close(self):
        """Close the kept connections (the server also drops them after 10 s idle)."""
        with self.pool_lock:
            kept, self.pool = self.pool, []
        for conn in kept:
            conn.close()

    # -- jobs -----------------------------------------------------------------------------------
    def submit_jobs(self, jobs, submission=None, digest=None, new_jobtypes=False):
        """Submit jobs all-or-nothing under the id `submission` (made here if not given; the
        server remembers it, so `get_submission` tells whether a submission whose answer was lost
        was stored). What fits one request (SUBMIT_BYTES, 1000 jobs) goes in one; more goes as
        parts the server stages, then one commit stores them all in one transaction. Each job
        carries its own uuid and each part its number, so a retried request stores nothing twice.
        `new_jobtypes`: a job type close to a known one is meant, not a typo."""
        submission = submission or str(uuidlib.uuid4())
        jobs = [job if "uuid" in job else dict(job, uuid=str(uuidlib.uuid4())) for job in jobs]
        parts = list(batches(jobs, SUBMIT_BYTES, 1000))
        named = {"digest": digest} if digest else {}
        new = {"new_jobtypes": True} if new_jobtypes else {}
        if len(parts) == 1:
            return self.call("POST", "/api/jobs", {"jobs": parts[0], "submission": submission, **named, **new})["uuids"]
        for number, part in enumerate(parts):
            self.call("PUT", f"/api/submissions/{submission}/part", {"part": number, "jobs": part, **new})
        self.call("POST", f"/api/submissions/{submission}/commit", {"parts": len(parts), **named})
        return [job["uuid"] for job in jobs]

    def find_submissions(self, digest, age="1h", retry_for=None):
        """The submissions of the last `age` with this digest, newest first."""
        return self.call("GET", "/api/submissions", query={"digest": digest, "age": age},
                         retry_for=retry_for)["submissions"]

    def get_submission(self, submission):
        """{"state": "committed" (with "jobs"), "staged" (parts not committed, which expire) or "none"}."""
        return self.call("GET", f"/api/submissions/{submission}")

    def list_jobs(self, **filters):
        return self.call("GET", "/api/jobs", query={k: v for k, v in filters.items() if v is not None})["jobs"]

    def get_job(self, uuid):
        return self.call("GET", f"/api/jobs/{uuid}")

    def job_states(self, uuids):
        return self.call("POST", "/api/jobs/states", {"uuids": list(uuids)})["jobs"]

    def why_waiting(self, uuid):
        """The plain reasons a job is not running yet (the job page's), empty once it started."""
        return self.call("GET", f"/job/{uuid}", query={"format": "json"})["why_waiting"]

    def adjust_job(self, uuid, state=None, priority=None):
        body = {k: v for k, v in (("state", state), ("priority", priority)) if v is not None}
        return self.call("POST", f"/api/jobs/{uuid}/adjust", body)

    def delete_job(self, uuid):
        return self.call("DELETE", f"/api/jobs/{uuid}")

    def report(self, uuid, report, retry_for=None, before_each=None, sent=None):
        """A pilot's report on its job; `before_each(report)`, if given, returns it brought up to
        date for each attempt (how late it comes); `sent(sock)`: see call."""
        body = report if before_each is None else lambda: before_each(report)
        return self.call("POST", f"/api/jobs/{uuid}/report", body, retry_for=retry_for,
                         pilot=report.get("pilot"), sent=sent)

    def publish_image(self, uuid, name, data, pilot):
        """Send one image a job made (bytes) to the server, by the pilot running the job."""
        return self.call("PUT", f"/api/jobs/{uuid}/images/{quote(name, safe='')}", data, pilot=pilot,
                         retry_for=5)

    # -- pilots and sites -----------------------------------------------------------------------
    def register_pilot(self, retry_for=None, **info):
        """Register a pilot with a secret chosen here, so a retried registration is the same
        pilot; later calls for it carry the secret. Returns the server's answer."""
        info.setdefault("secret", secrets.token_urlsafe(24))
        answer = self.call("POST", "/api/pilots", info, retry_for=retry_for)
        self.pilot_secrets[answer["uuid"]] = info["secret"]
        return answer

    def request_job(self, pilot, wait):
        """{"job": a job or None, "directive": None, "stop" or "drain"}."""
        return self.call("POST", f"/api/pilots/{pilot}/request", {"wait": wait}, timeout=wait + self.timeout,
                         pilot=pilot)

    def mark_pilots(self, directive, **selectors):
        return self.call("POST", "/api/pilots/directive", {"directive": directive, **selectors})["marked"]

    def heartbeat(self, pilot, job=None, retry_for=None, timeout=None, **status):
        """status: what the pilot says of itself (free_mb, note); None values are left out."""
        body = {"job": job, **{k: v for k, v in status.items() if v is not None}}
        return self.call("POST", f"/api/pilots/{pilot}/heartbeat", body, retry_for=retry_for,
                         timeout=timeout, pilot=pilot)

    def release_job(self, pilot, job, retry_for=None):
        """Give back a job claimed ahead and not started; {"released": whether it was still ours}."""
        return self.call("POST", f"/api/pilots/{pilot}/release", {"job": job}, retry_for=retry_for, pilot=pilot)

    def deregister_pilot(self, pilot, reason="", retry_for=None):
        return self.call("POST", f"/api/pilots/{pilot}/stop", {"reason": reason}, retry_for=retry_for,
                         pilot=pilot)

    def list_pilots(self, **filters):
        return self.call("GET", "/api/pilots", query={k: v for k, v in filters.items() if v is not None})["pilots"]

    def define_site(self, site, **fields):
        return self.call("PUT", f"/api/sites/{quote(site, safe='')}", fields)

    def list_sites(self):
        return self.call("GET", "/api/sites")["sites"]

    def delete_site(self, name):
        return self.call("DELETE", f"/api/sites/{quote(name, safe='')}")

    def service_beat(self, name, period, result, host="", retry_for=0):
        return self.call("POST", f"/api/services/{quote(name, safe='')}/beat",
                         {"host": host, "period": period, "result": result}, retry_for=retry_for)

    def get_service(self, name):
        return self.call("GET", f"/api/services/{quote(name, safe='')}")

    def retire_service(self, name, retry_for=None):
        return self.call("DELETE", f"/api/services/{quote(name, safe='')}", retry_for=retry_for)

    def get_site(self, name, retry_for=None):
        """The site with live, pending and missing pilots and its recent factory requests."""
        return self.call("GET", f"/api/sites/{quote(name, safe='')}", retry_for=retry_for)

    def request_pilots(self, site, count, expires):
        return self.call("POST", f"/api/sites/{quote(site, safe='')}/requests", {"count": count, "expires": expires})

    def cancel_request(self, request):
        return self.call("POST", f"/api/requests/{request}/cancel")

    def list_jobtypes(self, jobtype=None):
        return self.call("GET", "/api/jobtypes", query={"jobtype": jobtype} if jobtype else None)["jobtypes"]

    def set_cap(self, jobtype, cap, new_jobtypes=False):
        return self.call("PUT", f"/api/jobtypes/{quote(jobtype, safe='')}",
                         {"cap": cap, **({"new_jobtypes": True} if new_jobtypes else {})})

    def pause_jobtype(self, jobtype, paused, why):
        return self.call("POST", f"/api/jobtypes/{quote(jobtype, safe='')}/pause", {"paused": paused, "why": why})

    # -- workflows and data ---------------------------------------------------------------------
    def add_dag(self, name, graphml, description="", replace=False):
        return self.call("POST", "/api/dags", {"name": name, "graphml": graphml, "description": description,
                                               "replace": replace})

    def list_dags(self):
        return self.call("GET", "/api/dags")["dags"]

    def get_dag(self, name):
        return self.call("GET", f"/api/dags/{quote(name, safe='')}")

    def dag_graphml(self, name):
        return self.call("GET", f"/api/dags/{quote(name, safe='')}/graphml")["graphml"]

    def delete_dag(self, name):
        return self.call("DELETE", f"/api/dags/{quote(name, safe='')}")

    def create_workflow(self, dag, **options):
        return self.call("POST", "/api/workflows", {"dag": dag, **options})

    def list_workflows(self, **filters):
        return self.call("GET", "/api/workflows",
                         query={k: v for k, v in filters.items() if v is not None})["workflows"]

    def get_workflow(self, uuid):
        return self.call("GET", f"/api/workflows/{uuid}")

    def set_workflow_state(self, uuid, state):
        return self.call("POST", f"/api/workflows/{uuid}/state", {"state": state})

    def delete_workflow(self, uuid):
        return self.call("DELETE", f"/api/workflows/{uuid}")

    def inject(self, **file_and_work):
        return self.call("POST", "/api/inject", file_and_work)

    def list_datasets(self, **filters):
        return self.call("GET", "/api/datasets",
                         query={k: v for k, v in filters.items() if v is not None})["datasets"]

    def define_datatype(self, name, ext, comment=""):
        return self.call("PUT", f"/api/datatypes/{quote(name, safe='')}", {"ext": ext, "comment": comment})

    def delete_datatype(self, name):
        return self.call("DELETE", f"/api/datatypes/{quote(name, safe='')}")

    def register_dataset(self, **fields):
        return self.call("POST", "/api/datasets", fields)

    def adjust_dataset(self, uuid, **changes):
        return self.call("POST", f"/api/datasets/{uuid}/adjust", changes)

    def delete_dataset(self, uuid):
        return self.call("DELETE", f"/api/datasets/{uuid}")

    def list_datatypes(self):
        return self.call("GET", "/api/datatypes")["datatypes"]

    def health(self):
        return self.call("GET", "/api/health")

    def check_token(self):
        return self.call("POST", "/api/auth", {})


Ran = collections.namedtuple("Ran", "code output said")     # code None: killed at its timeout


def run_bounded(argv, timeout, env=None, cwd=None):
    """Run an outside command (a batch submit, a catalogue listing, a site's probe) so that it
    cannot hold the tool: in a session of its own, killed with every process it started at
    `timeout`; its output in files, not pipes, so it is done when it exits even if a child it
    left in the background still holds them. Ran(exit code or None, stdout, the last line it
    said on stderr, else stdout); OSError if it cannot start."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                text=True, start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        out.seek(0)
        err.seek(0)
        output = out.read(1 << 20)
        return Ran(code, output, last_line(err.read()[-65536:]) or last_line(output[-65536:]))


def last_line(text):
    return next((x.strip() for x in reversed(text.splitlines()) if x.strip()), "")


def format_table(rows, columns):
    """Rows (dicts) as aligned text columns under a header line; None shows as an empty cell."""
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def batches(items, max_bytes, max_items):
    """Consecutive lists of items whose JSON stays under max_bytes (one item may exceed it)."""
    batch, size = [], 0
    for item in items:
        item_size = len(json.dumps(item)) + 2
        if batch and (size + item_size > max_bytes or len(batch) >= max_items):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item_size
    if batch:
        yield batch


def check_url(url):
    """A server URL must be http(s)://host[:port]; anything else is bad input, said at once."""
    parts = urlsplit(url)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise InputError(f"server URL {url!r}: expected http://host:port (from -S or P3S_SERVER)")


def _retry_from_env():
    value = os.environ.get("P3S_RETRY_FOR", "30")
    try:
        return max(0.0, float(value))
    except ValueError:
        raise P3SError(f"P3S_RETRY_FOR={value!r}: not a number of seconds") from None


def _error_text(payload, answer):
    """The server's {"error": ...} message, or the HTTP reason when there is none."""
    try:
        return json.loads(payload)["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {answer.status} {answer.reason}"
