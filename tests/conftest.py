"""Test harness: a real server.py on a free loopback port with a temporary database, and helpers
that run the real tools (job.py, pilot.py, ...) as processes against it. No mocks."""
import base64
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from html import escape

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from serverAPI import Client  # noqa: E402

COMPAT = os.path.join(ROOT, "tests", "compat")   # the original p3s files, unchanged
# The tools run as processes: `python -S -m server`, the same code as `python server.py` (its
# `__main__`), so that Python may keep its compiled form in a cache for the session (server.py
# takes 80 ms to compile, thousands of times a run, where bytecode is not written by default),
# and without site-packages (they need none: the standard library only, which verifyImport.py
# checks; a site's .pth hooks cost tens of ms a process). The README's own commands run as written.
PYCACHE = tempfile.mkdtemp(prefix="p3s-tests-pycache-")


def tool_command(tool):
    return [sys.executable, "-S", "-m", tool[:-len(".py")]]


def tool_env(base, **more):
    """`base` with what tool_command needs: the clone on the path, a bytecode cache to write."""
    env = dict(base, PYTHONPATH=ROOT, PYTHONPYCACHEPREFIX=PYCACHE, **more)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env
END_STATES = ("finished", "failed", "timeout", "pilotTO", "cancelled")


def wait_until(predicate, timeout, interval=0.05, what="condition"):
    """Poll predicate() until it returns something truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def alive(pid):
    """True if pid runs and is not a zombie (there is no init here to reap promptly)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def blocked_signals(pid, tid=None):
    """The signals thread `tid` (the main one if None) of process `pid` blocks (SigBlk in /proc)."""
    with open(f"/proc/{pid}/task/{tid or pid}/status") as f:
        mask = int(next(line.split()[1] for line in f if line.startswith("SigBlk:")), 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def processes_of(url):
    """Pids of live processes whose environment points them at the server `url`."""
    if not url:
        return []
    mark = f"\0P3S_SERVER={url}\0".encode()
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = b"\0" + f.read()
        except OSError:
            continue
        if mark in env and int(name) != os.getpid() and alive(int(name)):
            found.append(int(name))
    return found


class P3S:
    """One server under test plus the environment its clients need."""

    def __init__(self, tmp_path, extra_args=()):
        self.dir = tmp_path
        self.db = str(tmp_path / "p3s.db")
        self.token_file = tmp_path / "token"
        self.token_file.write_text("test-token-" + os.urandom(8).hex() + "\n")
        self.extra_args = list(extra_args)
        self.port = 0
        self.proc = None
        self.pilots = []
        self.env = tool_env(os.environ, P3S_TOKEN_FILE=str(self.token_file), PYTHONUNBUFFERED="1")
        self.env.pop("P3S_TOKEN", None)
        self.logs = tmp_path / "logs"

    # -- server ---------------------------------------------------------------------------------
    def start(self):
        log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [*tool_command("server.py"), "--port", str(self.port), "--db", self.db,
             "--token-file", str(self.token_file), "--housekeeping", "0.3", *self.lease_args(),
             *self.alarm_args(), *self.extra_args],
            stdout=log, stderr=log, cwd=self.dir, env=tool_env(os.environ))
        found = wait_until(self._announced_port, 15, interval=0.01, what="server start")
        self.port = found
        self.url = f"http://127.0.0.1:{self.port}"
        self.env["P3S_SERVER"] = self.url
        self.api = Client(self.url, token_file=str(self.token_file), retry_for=10)
        return self

    def alarm_args(self):
        """Alarms are raised and cleared at once in tests, unless a test about holds sets them."""
        return [] if "--alarm-hold" in self.extra_args else ["--alarm-hold", "0", "--alarm-clear-hold", "0"]

    def lease_args(self):
        """Pilots beat every 0.5 s in tests: 30 beats (15 s) ride out a server restart, unless
        a test sets its own lease."""
        return [] if "--lease-beats" in self.extra_args else ["--lease-beats", "30"]

    def _announced_port(self):
        if self.proc.poll() is not None:
            raise AssertionError("server exited: " + (self.dir / "server.log").read_text())
        text = (self.dir / "server.log").read_text(errors="replace")
        ports = re.findall(r"serving on http://127\.0\.0\.1:(\d+)", text)
        return int(ports[-1]) if len(ports) > self.starts_seen else None

    @property
    def starts_seen(self):
        return getattr(self, "_starts", 0)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._starts = self.starts_seen + 1

    def stop(self):
        """Stop the server and every process started against it: the pilots and tools the test
        started, and those started through pgen.sh or a factory (found by P3S_SERVER)."""
        for p in self.pilots:
            if p.poll() is None:
                p.kill()
                p.wait()
        for pid in processes_of(getattr(self, "url", None)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)       # a test may have left it stopped
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def add_user(self, name, role):
        """A named user of this server's database (server.py --add-user, as an admin does it):
        returns the environment its tools run with, its token in P3S_TOKEN_FILE."""
        token_file = self.dir / "users" / f"{name}.token"
        done = self.run("server.py", "--db", self.db, "--add-user", name, "--role", role,
                        "--user-token-file", token_file)
        assert done.returncode == 0, done.stderr
        return dict(self.env, P3S_TOKEN_FILE=str(token_file))

    # -- clients --------------------------------------------------------------------------------
    def run(self, tool, *args, env=None, timeout=120, input=None):
        """Run a tool to completion; returns CompletedProcess with text stdout/stderr."""
        return subprocess.run([*tool_command(tool), *map(str, args)],
                              capture_output=True, text=True, timeout=timeout, input=input,
                              env=env or self.env, cwd=self.dir)

    def pilot(self, *args, env=None):
        """Start a pilot process (heartbeat 0.5 s unless given); it is killed at teardown."""
        args = list(map(str, args))
        if "-b" not in args:
            args += ["-b", "0.5"]
        if "-L" not in args:
            args += ["-L", str(self.logs)]
        proc = subprocess.Popen([*tool_command("pilot.py"), *args],
                                stdout=subprocess.DEVNULL, stderr=open(self.dir / "pilots.log", "ab"),
                                env=env or self.env, cwd=self.dir)
        self.pilots.append(proc)
        return proc

    def submit(self, jobs, *args):
        """Write jobs to a file and submit them with job.py; returns the uuids printed. Tests
        submit the same jobs as often as they like (--again: the rerun guard has tests of its own)."""
        path = self.dir / f"jobs-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(jobs))
        result = self.run("job.py", "-j", path, "--again", *args)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    def job(self, uuid):
        return self.api.get_job(uuid)

    def alarms(self, name=None):
        """The alarms raised now (GET /api/alarms), only those of `name` if given."""
        return [a for a in self.api.call("GET", "/api/alarms")["alarms"] if name is None or a["name"] == name]

    def page(self, path, status=200):
        """The text of a page (or any answer) as a browser gets it, checking its status."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as answer:
                assert answer.status == status
                return answer.read().decode()
        except urllib.error.HTTPError as e:
            assert e.code == status, (path, e.code, e.read())
            return e.read().decode()

    def waiting_requests(self):
        """Job requests (pilots' long polls) waiting on the server now, from /metrics."""
        return self.api.call("GET", "/metrics", query={"format": "json"})["waiting_requests"]

    def wait_jobs(self, uuids, timeout=60, states=END_STATES):
        def done():
            found = self.api.job_states(uuids)
            return found if all(found[u]["state"] in states for u in uuids) else None
        return wait_until(done, timeout, 0.1, f"{len(uuids)} jobs to reach {states}")


@pytest.fixture
def start_server(tmp_path):
    """start_server(args, db=None): a real server (and the pilots it starts) in tmp_path, stopped
    by the fixture at teardown whatever the test did: the one way tests start a server."""
    started = []

    def start(args=(), db=None):
        server = P3S(tmp_path, list(args))
        if db:
            server.db = str(db)
        started.append(server)
        return server.start()
    yield start
    for server in started:
        server.stop()


@pytest.fixture
def p3s(start_server):
    return start_server()


def shell_job(command, **fields):
    """A job whose payload is a shell line (P3S_EXECMODE=SHELL)."""
    job = {"payload": command, "env": {"P3S_EXECMODE": "SHELL"}}
    job.update(fields)
    return job


def tiny_png(path, rgb=(200, 30, 30), size=(64, 40)):
    """Write a real PNG (one colour) to path, as a DQM payload writes its plots."""
    import struct
    import zlib
    width, height = size
    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def graphml(vertices, edges):
    """A GraphML DAG in the original p3s dialect. vertices: (id, jobtype, payload[, env]);
    edges: (source, target, name, datatag)."""
    keys = "".join(f'<key attr.name="{k}" for="node" id="d{101 + i}"/>' for i, k in
                   enumerate(("payload", "env", "jobtype", "timelimit", "priority")))
    keys += "".join(f'<key attr.name="{k}" for="edge" id="d{1 + i}"/>' for i, k in
                    enumerate(("name", "dirpath", "datatype", "datatag", "comment")))
    nodes = "".join(
        f'<node id="{v[0]}"><data key="d101">{escape(v[2])}</data>'
        f'<data key="d102">{escape(v[3]) if len(v) > 3 else "{}"}</data>'
        f'<data key="d103">{v[1]}</data><data key="d104">60</data><data key="d105">0</data></node>' for v in vertices)
    links = "".join(f'<edge source="{s}" target="{t}"><data key="d1">{n}</data><data key="d2">/tmp/</data>'
                    f'<data key="d3">TXT</data><data key="d4">{tag}</data></edge>' for s, t, n, tag in edges)
    return (f'<?xml version="1.0"?><graphml xmlns="http://graphml.graphdrawing.org/xmlns">{keys}'
            f'<graph edgedefault="directed">{nodes}{links}</graph></graphml>')


SHELL = '{"P3S_EXECMODE":"SHELL"}'


def register(p3s, name, text):
    path = p3s.dir / f"{name}.graphml"
    path.write_text(text)
    result = p3s.run("workflow.py", "-g", path, "-n", name)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def small_fs(tmp_path):
    """A real 4 MiB filesystem (tmpfs) that a test can fill; skipped where mounting is not allowed."""
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(directory):
    """Write until the filesystem says ENOSPC; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:      # unbuffered: nothing left to fail at its close
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


@pytest.fixture
def closing():
    """closing(thing) -> thing, closed at teardown: the sockets a test holds open."""
    held = []

    def hold(thing):
        held.append(thing)
        return thing
    yield hold
    for thing in held:
        with contextlib.suppress(OSError):
            thing.close()


# -- the session's own checks --------------------------------------------------------------------
# The skips CI accepts: what the CI machine itself may not give, however .ci/run sets it up.
CI_MAY_SKIP = ("port 8000 is in use",)     # the README's commands need that port, and it is shared


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (CI=true) every skip fails, but those CI_MAY_SKIP names: .ci/run installs every
    tool a test checks p3s against and runs as root (tmpfs mounts), so a skip there means a real
    part went untested. Locally, skips stay."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and os.environ.get("CI") == "true" and call.when in ("setup", "call")
            and not any(reason in str(report.longrepr) for reason in CI_MAY_SKIP)):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where every real part must run: {report.longrepr}"


def leftovers(marker):
    """Live processes (not this one) whose command line or environment names `marker`."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        if int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if (marker in cmdline or marker in env) and alive(int(name)):
            found.append((int(name), cmdline.replace(b"\0", b" ").decode(errors="replace")[:160]))
    return found


def pytest_sessionfinish(session, exitstatus):
    """No test leaves a process behind (a server, a pilot, a payload, a watchdog): any still
    alive that names this session's temporary directory fails the run, and is killed."""
    shutil.rmtree(PYCACHE, ignore_errors=True)
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    marker = str(factory.getbasetemp()).encode()
    deadline = time.monotonic() + 5           # a watchdog or a pilot may be exiting right now
    while leftovers(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = leftovers(marker)
    for pid, _ in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if left:
        print("\nprocesses left behind by the tests (now killed):\n" +
              "\n".join(f"  {pid} {cmd}" for pid, cmd in left), file=sys.stderr)
        session.exitstatus = 1


def readme_block(heading):
    """The first ```bash block after `heading` in README.md or docs/, exactly as a user would copy it."""
    import glob
    import re
    for path in [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        found = re.search(re.escape(heading) + r".*?```bash\n(.*?)\n```", open(path).read(), re.S)
        if found:
            return found.group(1).strip()
    raise AssertionError(f"no bash block after {heading!r} in README.md or docs/")


def fresh_copy(tmp_path):
    """The tools, examples and compat files in a new directory, as in a fresh clone; port 8000 free."""
    import shutil
    import socket
    import pytest
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("port 8000 is in use on this machine; the README commands need it")
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name == "examples":
            (shutil.copytree if name == "examples" else shutil.copy)(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "tests", "compat"), tmp_path / "tests" / "compat")
    return {k: v for k, v in os.environ.items() if not k.startswith("P3S_")}


def run_readme(tmp_path, env, command):
    import subprocess
    return subprocess.run(["bash", "-c", command + "\nstatus=$?; kill %1; wait; exit $status"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)


SLURM = all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "squeue", "munged"))
SLURM_SCRIPTS = os.path.join(ROOT, "tests", "slurm")


@pytest.fixture
def slurm():
    # munged wants o+x on every directory above its socket; pytest's tmp_path is 0700
    base = tempfile.mkdtemp(prefix="p3s-slurm-")
    os.chmod(base, 0o755)
    env = dict(os.environ, BASE=base, NODES="3", NCPU="2")     # fake nodes node1..node3, 2 CPUs each
    up = subprocess.run([os.path.join(SLURM_SCRIPTS, "slurm-up.sh")], capture_output=True, text=True, env=env, timeout=60)
    if up.returncode != 0:
        subprocess.run([os.path.join(SLURM_SCRIPTS, "slurm-down.sh")], env=env, timeout=60)
        pytest.fail(f"slurm did not start: {up.stderr}")
    env["SLURM_CONF"] = os.path.join(base, "slurm.conf")
    yield env
    subprocess.run(["scancel", "-u", "root"], env=env, timeout=30)
    subprocess.run([os.path.join(SLURM_SCRIPTS, "slurm-down.sh")], env=env, timeout=60)
    shutil.rmtree(base, ignore_errors=True)

# Every tool a user runs: each has --help, its options in docs/tools.md
TOOLS = ["server.py", "job.py", "pilot.py", "workflow.py", "injector.py", "verifyImport.py", "factory.py", "service.py", "alarm.py", "dataset.py"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


class Browser:
    """Real headless Chromium driven as a person would, through its DevTools protocol over a
    pipe (--remote-debugging-pipe: JSON messages ending in NUL on fds 3 and 4, no websocket):
    open a page, fill a form's field, press a button, read what it shows. One profile: its
    cookies live between pages, as a shifter's browser keeps a sign-in."""

    def __init__(self, tmp_path):
        to_chromium, self.commands = os.pipe()
        self.events, from_chromium = os.pipe()
        profile = tmp_path / f"chromium-{len(list(tmp_path.glob('chromium-*')))}"
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_chromium} 4>&{from_chromium}', "chromium", CHROMIUM, *CHROMIUM_FLAGS,
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "--window-size=1400,1000", "about:blank"],
            pass_fds=(to_chromium, from_chromium), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chromium)
        os.close(from_chromium)
        self.buffer, self.seen, self.next_id = b"", [], 0
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable", session=True)

    def send(self, method, session=False, **params):
        """A command and its answer; the events that arrive meanwhile are kept in `seen`."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            answer = self.receive()
            if answer.get("id") == self.next_id:
                assert "error" not in answer, (method, answer["error"])
                return answer["result"]
            self.seen.append(answer)

    def receive(self, timeout=60):
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.events], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "Chromium said nothing for a minute"
            chunk = os.read(self.events, 1 << 20)
            assert chunk, "Chromium closed its pipe"
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def loaded(self):
        """Wait for the page's load event (after a navigation, or a form's POST and redirect)."""
        while True:
            event = self.seen.pop(0) if self.seen else self.receive()
            if event.get("method") == "Page.loadEventFired":
                return

    def open(self, url):
        self.seen.clear()
        self.send("Page.navigate", session=True, url=url)
        self.loaded()
        return self.text()

    def evaluate(self, expression):
        return self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True)["result"].get("value")

    def text(self):
        return self.evaluate("document.body.innerText")

    def press(self, button, fill=None, within="document"):
        """Fill the inputs of the form whose button says `button` ({name: value}) and press it."""
        self.seen.clear()
        found = self.evaluate(f"""(() => {{
            const b = [...{within}.querySelectorAll('button')].find(b => b.textContent.startsWith({json.dumps(button)}));
            if (!b) return false;
            for (const [k, v] of Object.entries({json.dumps(fill or {})})) b.form.elements[k].value = v;
            b.click(); return true; }})()""")
        assert found, f"no button {button!r} on the page: {self.text()[:2000]}"
        self.loaded()
        return self.text()

    def screenshot(self, path):
        """A full-page PNG, its lazy images loaded first (a screenshot does not scroll to them)."""
        self.evaluate("document.querySelectorAll('img[loading=lazy]').forEach(i => i.loading = 'eager')")
        deadline = time.monotonic() + 5
        while not self.evaluate("[...document.images].every(i => i.complete)") and time.monotonic() < deadline:
            time.sleep(0.1)
        data = self.send("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True)["data"]
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        print(f"screenshot: {path}")

    def close(self):
        self.proc.kill()
        self.proc.wait()
        os.close(self.commands)
        os.close(self.events)
