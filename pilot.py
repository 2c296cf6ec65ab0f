#!/usr/bin/env python3
"""p3s pilot: registers with the server, asks for a job, runs it, reports, asks again.

    python pilot.py                         # run jobs of any type until stopped
    python pilot.py -s mysite --jobtype dqm -c 10 -b 5
    python pilot.py --define-site -s mysite -p 20 -b 5 --site-env DATA=/eos/x   # site defaults

The payload runs in its own process group (a watchdog process kills the group if the pilot
dies, even by kill -9) with the job's env plus P3S_JOB_UUID, P3S_PILOT_UUID, P3S_INPUT_FILE and
P3S_JOB_DIR (<joblogdir>/<YYYYMMDD-HH>/<uuid>/, also P3S_OUTPUT_DIR unless the site or job sets that: the images
the job leaves in its own directories, PNG, JPEG, GIF or SVG, are sent to the server for the job's
page; see payload_env and own_directories); its stdout/stderr go beside it, <uuid>.out|.err. At the time limit the
group gets SIGTERM, then SIGKILL after a grace period. SIGTERM to the pilot stops the payload the
same way, reports it (pilotTO: the server retries it if attempts remain) and deregisters;
SIGUSR1 drains: the current job finishes, then the pilot exits.
"""
import collections
import contextlib
import ctypes
import errno
import functools
import glob
import hashlib
import itertools
import json
import logging
import math
import mmap
import os
import queue
import random
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid as uuidlib
import zlib

from serverAPI import (VERSION, ArgumentParser, add_verbosity, Client, InputError, P3SError, format_table, run_bounded,
                       run_cli)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULTS = {"period": 10.0, "cycles": 0, "heartbeat": 10.0}
TAIL_BYTES = 64 * 1024
LIVE_STATES = ("active", "no jobs", "dispatched", "running")
REGISTER_RETRY = 120        # seconds a starting pilot waits for an unreachable server
CONTACT_EVERY = 0.25        # seconds: the watchdog hears of contact with the server at most this often
RESTART_EVERY = 1.0         # seconds between tries to restart a watchdog the node had no process or thread for
SAMPLE_PERIOD = 1.0         # seconds between samples of a running payload's memory, CPU and I/O
CHECK_RETRY = 5             # seconds pilot.py --check (pgen.sh) waits for it: the pilots wait longer
RUNNING_REPORT_RETRY = 10   # seconds the running report is retried; the end report, until delivered
                            # (by a pilot told to stop: STOPPING_REPORT_GRACE)
RUNNING_REPORT_DELAY = 0.2  # seconds a payload runs before it is reported running: a shorter job
                            # is reported once, at its end (with its runtime; the server records both)
OUTAGE_PAUSE = 2.0          # seconds between job requests while the server is unreachable
CLAIM_KEYS = ("next", "ahead", "holding")  # an end report's fields that claim work: never in one left behind
LATE_REPORT = 1.0           # seconds after its job's end: a report this late says when the job ended
STOPPING_REPORT_GRACE = 4   # a pilot told to stop (SIGTERM) keeps an undelivered end report this
                            # many kill graces (20 s by default), then leaves: a batch system's
                            # SIGKILL follows, and a server that is gone for good must not hold it
QUALITY_FILES = {"verdict.json": "checks", "metrics.json": "metrics"}   # a payload's word on its data
MAX_QUALITY_BYTES = 512 * 1024  # bytes of one of them read at most (200 checks of 1 KiB and more)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".gif", ".svg")     # what a job publishes for its page
IMAGE_LIMITS = {"max_bytes": 2 * 1024 * 1024, "max_count": 20}
MAX_LOOKED_AT = 10000       # files of an output directory looked at for images to publish
TREE_ENTRIES = 100000       # entries one walk of a job's directory (measure, publish, delete)
TREE_SECONDS = 5.0          # ... and seconds: a tree of millions is left, said, never fatal
KEEP_JOB_FILES = 20.0       # hours a worker keeps job logs and directories (the original's DQM_DATA_LIFE)
CLEAN_EVERY = 300           # seconds between two clean-ups of the job log directory
TALLY_EVERY = 600           # seconds between two log lines counting the jobs that finished
MIN_FREE_MB = 500           # below this much free space in the job log directory, take no jobs
FREE_SPACE_EVERY = 1.0      # seconds: that space is looked at this often at most
PR_SET_CHILD_SUBREAPER = 36    # prctl(2): orphans of a payload become the pilot's children
CRASHED = "crashed"         # how a deregistration begins when the pilot died of a defect
UNDELIVERED = "undelivered"     # <joblogdir>/undelivered/<job uuid>.json: end reports pilots left behind
HOUR_DIR = re.compile(r"\d{8}-\d{2}")       # <joblogdir>/<YYYYMMDD-HH>/: an hour of job files
JOB_FILE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}(\.out|\.err|\.dirs)?")
log = logging.getLogger("p3s.pilot")


class Interrupted(Exception):
    """Raised by the signal handlers to leave an idle long poll at once."""


class NoThread(Exception):
    """The node gives the pilot no thread it needs (ulimit -u reached): it leaves."""


def parse_args(argv):
    p = ArgumentParser(description="Run p3s jobs on this node.", env=[
        ("P3S_SITE", "the default of -s"), ("P3S_NODE", "the host name the pilot registers (default hostname -s)"),
        ("P3S_PILOTLOG", "the default of -l"), ("P3S_JOBLOG", "the default of -L"),
        ("P3S_REQUEST", "the default of --request")],
        exits=[("3", "with --try: a job did not exit with code 0")])
    p.add_argument("-S", "--server", help="server URL (default $P3S_SERVER or http://127.0.0.1:8000)")
    p.add_argument("-s", "--site", default=os.environ.get("P3S_SITE", ""),
                   help="site name; its defaults on the server apply (default $P3S_SITE)")
    p.add_argument("-c", "--cycles", type=int, help="job requests before exiting (0 = until stopped; default 0)")
    p.add_argument("-p", "--period", type=float,
                   help="seconds one job request waits on the server for work (default 10)")
    p.add_argument("-b", "--heartbeat", type=float, help="seconds between heartbeats (default 10)")
    p.add_argument("-l", "--logdir", default=os.environ.get("P3S_PILOTLOG"),
                   help="write the pilot's own log to LOGDIR/<pilot uuid>.log (default $P3S_PILOTLOG, "
                   "else stderr)")
    p.add_argument("-L", "--joblogdir", default=os.environ.get("P3S_JOBLOG") or os.path.join(HERE, "logs", "jobs"),
                   help="directory for job stdout/stderr (default $P3S_JOBLOG, else logs/jobs beside pilot.py)")
    p.add_argument("-e", "--extra", default="", help="free text shown with the pilot, e.g. a batch job id")
    p.add_argument("--request", default=os.environ.get("P3S_REQUEST") or None, metavar="ID",
                   help="the pilot factory's request that started this pilot (default $P3S_REQUEST)")
    p.add_argument("--keep-job-files", type=float, metavar="HOURS",
                   help="delete job logs and directories older than this, the wrappers' "
                   f"$P3S_OUTPUT_DIR/$P3S_JOB_UUID too (default: the site's keep_hours, else {KEEP_JOB_FILES:g})")
    p.add_argument("--min-free-mb", type=float, default=MIN_FREE_MB, metavar="MB",
                   help="take no job while the job log directory has less free space (default %(default)s)")
    p.add_argument("--jobtype", action="append", default=[], help="accept only this job type (repeatable)")
    p.add_argument("--max-idle", type=float, default=0, metavar="SECONDS",
                   help="exit after this long without a job (default 0 = never)")
    p.add_argument("--probe", metavar="COMMAND",
                   help="a shell command that must succeed for the pilot to take jobs, run once a heartbeat "
                   "(e.g. 'test -r /eos/np04/inbox'; default: the site's probe, else none; '' for none)")
    p.add_argument("--lifetime", type=float, metavar="SECONDS",
                   help="take no job after this long (a random 85-100 %% of it, so pilots started together do not "
                   "end together), finish the running one and exit (default: the site's pilotlife, else none)")
    p.add_argument("--kill-grace", type=float, default=5.0, metavar="SECONDS",
                   help="seconds between SIGTERM and SIGKILL when a payload is stopped (default 5)")
    p.add_argument("--define-site", action="store_true",
                   help="store -p/-c/-b/--site-env as the defaults of site -s on the server, and exit")
    p.add_argument("--site-env", action="append", default=[], metavar="NAME=VALUE",
                   help="with --define-site: environment given to every job at the site (repeatable)")
    p.add_argument("--pilots", type=int, metavar="N",
                   help="with --define-site: the site's nominal number of pilots (an alarm below it)")
    p.add_argument("--pilot-life", type=float, metavar="SECONDS",
                   help="with --define-site: the nominal lifetime of the site's pilots")
    p.add_argument("-j", "--site-file", metavar="FILE",
                   help="with --define-site: the site's JSON (the original p3s's site files as they are)")
    p.add_argument("--sites", action="store_true", help="list the sites defined on the server, and exit")
    p.add_argument("--delete-site", action="store_true", help="delete site -s on the server, and exit")
    p.add_argument("-k", "--kill", action="store_true",
                   help="mark pilots chosen by -u, -s, -H and/or -A to stop (kill the job, report, exit) "
                   "at their next heartbeat, and exit")
    p.add_argument("--drain", action="store_true", help="with -k: finish the current job, then exit")
    p.add_argument("-u", "--uuid", help="with -k: this pilot")
    p.add_argument("-H", "--host", help="with -k: pilots on this host")
    p.add_argument("-A", "--pilot-state", metavar="STATE", help="with -k: pilots in this state (e.g. 'no jobs')")
    p.add_argument("--try", dest="try_file", metavar="FILE",
                   help="run the jobs of FILE here and now, with the env a pilot would give them (site env from "
                   "-j SITE.json or -s SITE, input file -f), output on this terminal; nothing is stored")
    p.add_argument("-f", "--input-file", metavar="PATH", help="with --try: the job's input file (P3S_INPUT_FILE)")
    p.add_argument("-x", "--shell", action="store_true",
                   help="run every payload through the shell, as P3S_EXECMODE does (the original's -x)")
    p.add_argument("-U", "--usage", action="store_true",
                   help="print the job states and exit codes p3s uses, and exit")
    p.add_argument("--check", action="store_true",
                   help="check these options and that the site is defined on the server, and exit "
                   "(pgen.sh runs it before starting pilots)")
    p.add_argument("--fleet-check", metavar="FILE",
                   help="compare the server's live pilots with preport.sh -v output in FILE ('-' = stdin); "
                   "exit 1 if they differ")
    add_verbosity(p, "log every step")
    args = p.parse_args(argv)
    for name in ("cycles", "period", "heartbeat"):
        value = getattr(args, name)
        if value is not None and value < (0 if name != "heartbeat" else 0.1):
            p.error(f"--{name}: must not be negative" if name != "heartbeat" else "--heartbeat: at least 0.1")
    if args.define_site and not (args.site or args.site_file):
        p.error("--define-site needs -s SITE or -j FILE")
    if args.delete_site and not args.site:
        p.error("--delete-site needs -s SITE")
    if (args.pilots is not None or args.pilot_life is not None) and not args.define_site:
        p.error("--pilots and --pilot-life go with --define-site")
    if args.site_file and not (args.define_site or args.try_file):
        p.error("-j goes with --define-site or --try")
    if args.input_file and not args.try_file:
        p.error("-f goes with --try FILE")
    if args.kill and not (args.uuid or args.site or args.host or args.pilot_state):
        p.error("-k needs -u UUID, -s SITE, -H HOST and/or -A STATE")
    if args.drain and not args.kill:
        p.error("--drain goes with -k")
    for item in args.site_env:
        if "=" not in item:
            p.error(f"--site-env {item!r}: expected NAME=VALUE")
    if args.keep_job_files is not None and args.keep_job_files <= 0:
        p.error(f"--keep-job-files {args.keep_job_files:g}: must be more than 0 hours")
    if not (args.define_site or args.sites or args.delete_site or args.kill or args.fleet_check or args.usage
            or args.try_file):
        try:
            os.makedirs(args.joblogdir, exist_ok=True)
        except OSError as e:
            p.error(f"-L {args.joblogdir}: {e.strerror}")
        if not os.access(args.joblogdir, os.W_OK | os.X_OK):
            p.error(f"-L {args.joblogdir}: not writable; job logs go there")
        args.joblogdir = os.path.abspath(args.joblogdir)    # payloads are told their paths whole
    return args


# ------------------------------------------------------------------------------------------------
# Running one payload
# ------------------------------------------------------------------------------------------------
def payload_command(job, force_shell=False):
    """(argv or shell line, shell?) for the two payload forms of the original p3s: any non-empty
    P3S_EXECMODE (the original's test), or pilot.py -x, runs the payload through the shell."""
    if force_shell or job["env"].get("P3S_EXECMODE", "").strip():
        return " ".join(x for x in (job["payload"], job["params"]) if x), True
    return list(split_payload(job["payload"], job["params"])), False


@functools.lru_cache(maxsize=64)
def split_payload(payload, params):
    """A payload and its parameters as argv: a pilot runs the same few commands again and
    again, so each is split once."""
    return tuple(shlex.split(payload) + shlex.split(params))


def spawn(command, shell, env, out_path=None, err_path=None):
    """Start a payload in a session of its own (its process group is the job's), stdin from
    /dev/null, stdout and stderr to its log files (else the pilot's own); its pid. posix_spawn
    costs the pilot a sixth of the CPU of subprocess.Popen, which runs Python between fork and
    exec; the signals Python ignores (SIGPIPE, SIGXFSZ) are the payload's defaults again, as
    with subprocess. A payload that cannot be started raises OSError."""
    argv = ["/bin/sh", "-c", command] if shell else command
    if not argv:
        raise ValueError("the payload is empty")
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
    for fd, path in ((1, out_path), (2, err_path)):
        if path:
            actions.append((os.POSIX_SPAWN_OPEN, fd, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
    return os.posix_spawnp(argv[0], argv, env, file_actions=actions, setsid=True,
                           setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))


# The watchdog: one small process per pilot (not per job), in its own session, started with
# `python -c` so that no command line naming pilot.py matches it (pkill -f pilot.py spares it).
# The payload groups the pilot runs are in a table both map (a memfd of GROUP_SLOTS native ints,
# 0 for a free slot): a payload's start or end costs the pilot one store and the watchdog nothing
# (a line a job woke it at every job). The pilot writes lines for the rest: "=S" the lease
# window, "@UUID" the pilot's uuid, "." when it hears from the server (at most every
# CONTACT_EVERY). It SIGKILLs the groups in the table when the pipe closes, however the pilot
# died (kill -9 included), and when no "." came for S seconds (the pilot is stopped, hung or cut
# off from the server for its whole lease; it looks at the table again every RECHECK seconds of
# the silence); and with them every process whose environment names the pilot's uuid: a payload
# child that left the group (setsid, a double fork) is still the job's. So a payload, and all it
# spawned, dies with its pilot and never outlives the lease, before the server can give the job
# to another pilot; a spawn costs a plain spawn, and /proc is read only when killing.
GROUP_SLOTS = 64    # a pilot runs one payload at a time (two for a moment, as one ends and the next starts)
WATCHDOG = """
import mmap, os, select, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
RECHECK = 1.0
table = memoryview(mmap.mmap(int(sys.argv[1]), 0)).cast("i")
marks, killed, window, last, pending = set(), set(), None, time.monotonic(), b""

def escaped():
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open("/proc/" + name + "/environ", "rb") as f:
                    env = b"\\0" + f.read()
            except OSError:
                continue
            if any(mark in env for mark in marks):
                yield int(name)

def kill(groups, everything=False):
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    for pid in (escaped() if groups or everything else ()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

while True:
    wait = None if window is None else last + window - time.monotonic()
    if wait is not None and wait <= 0:
        fresh = {g for g in table if g} - killed
        kill(fresh)
        killed |= fresh
        wait = RECHECK
    if not select.select([0], [], [], wait)[0]:
        continue
    data = os.read(0, 4096)
    if not data:
        break
    *lines, pending = (pending + data).split(b"\\n")
    for line in lines:
        if line[:1] == b"=":
            window = float(line[1:])
        elif line[:1] == b"@":
            marks.add(b"\\0P3S_PILOT_UUID=" + line[1:] + b"\\0")
        elif line[:1] == b".":
            last = time.monotonic()
            killed.clear()
kill({g for g in table if g}, everything=True)
"""


class Watchdog:
    """Kills the payloads of a pilot that died, stopped or lost the server for its lease. It is
    watched in turn: if it dies, a new one starts at once, told all the first one was told, and
    maps the same table of groups. Where the node cannot give it a process or the thread that
    watches it (ulimit -u reached), `problem` says so until a try, every RESTART_EVERY seconds,
    starts one: the pilot takes no job meanwhile (Pilot.unfit), and the payload running goes on,
    watched by the pilot itself.

    Methods for the caller: watch(pgid) when a payload starts, release(pgid) once its group is
    gone, lease(seconds) and pilot(uuid) after registering, contact() whenever the server
    answered, close() when the pilot ends."""

    def __init__(self):
        self.lock = threading.Lock()    # one writer at a time; a restart replays under it
        self.table_fd = os.memfd_create("p3s-watchdog-groups")     # close-on-exec: never a payload's
        os.ftruncate(self.table_fd, GROUP_SLOTS * 4)
        self.table = memoryview(mmap.mmap(self.table_fd, GROUP_SLOTS * 4)).cast("i")
        self.slots, self.free = {}, list(range(GROUP_SLOTS))   # pgid -> its slot; the free slots
        self.setup = {}
        self.closing = False
        self.problem = None
        self.told_contact = float("-inf")     # when "." was last written
        with self.lock:                 # its keep_alive reads self.proc under the lock
            self.start()

    def start(self):
        """A watchdog process and the thread that notices its death; OSError if the node has no
        room for either (a watchdog whose death nobody would notice is killed at once)."""
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", WATCHDOG, str(self.table_fd)],
                                stdin=subprocess.PIPE, start_new_session=True, pass_fds=(self.table_fd,))
        try:
            threading.Thread(target=self.keep_alive, args=(proc,), name="watchdog", daemon=True).start()
        except RuntimeError as e:       # "can't start new thread": ulimit -u
            proc.kill()                 # SIGKILL: it goes without killing the groups in the table
            proc.wait()
            raise OSError(errno.EAGAIN, f"no thread to watch it: {e}") from None
        self.proc = proc

    def pids(self):
        """The watchdog's own process: a child of the pilot, never one of a job's."""
        return {self.proc.pid}

    def keep_alive(self, proc):
        """Notice the watchdog's death at once; start another, told all the first one was (with
        SIGCHLD unblocked again: a process inherits the mask of the thread that starts it)."""
        with sigchld_left_to_the_main_thread():
            code = proc.wait()
        with self.lock:
            if self.closing or proc is not self.proc:
                return
            log.warning("watchdog exited (code %s): starting another, watching %d payload group(s)",
                        code, len(self.slots))
        while not self.restarted(proc, code):
            time.sleep(RESTART_EVERY)

    def restarted(self, dead, code):
        """True once a watchdog replaces `dead` (or none is wanted: the pilot is closing)."""
        with self.lock:
            if self.closing or dead is not self.proc:
                return True
            try:
                self.start()
            except OSError as e:
                self.problem = f"taking no jobs: its watchdog exited (code {code}) and cannot be restarted: {e}"
                return False
            self.problem = None
            for line in [*self.setup.values(), "."]:
                self._write(line)
            return True

    def tell(self, line):
        with self.lock:
            if line[0] in "=@":
                self.setup[line[0]] = line
            self._write(line)

    def _write(self, line):
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass        # it died: keep_alive starts another and tells it everything

    def watch(self, pgid):
        with self.lock:
            slot = self.slots[pgid] = self.free.pop()
            self.table[slot] = pgid

    def release(self, pgid):
        with self.lock:
            slot = self.slots.pop(pgid, None)
            if slot is not None:
                self.table[slot] = 0
                self.free.append(slot)

    def lease(self, seconds):
        self.tell(f"={seconds}")

    def pilot(self, uuid):
        self.tell(f"@{uuid}")

    def contact(self):
        """Said at most every CONTACT_EVERY seconds: a pilot of short jobs hears from the server
        hundreds of times a second, and the watchdog's window is seconds long."""
        t = time.monotonic()
        if t - self.told_contact >= CONTACT_EVERY:
            self.told_contact = t
            self.tell(".")

    def close(self):
        with self.lock:
            self.closing = True
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()


def start_watchdog():
    """The pilot's Watchdog; a node that cannot give it a process or a descriptor (ulimit -u or
    -n reached by a crowd of pilots, a sandbox without memfd) stops the pilot with one line and
    exit code 1 before it takes any job: no payload runs unwatched."""
    try:
        return Watchdog()
    except OSError as e:
        raise P3SError(f"cannot start the pilot's watchdog, without which no payload may run: {e}") from None


def make_job_dir(job_dir, empty=None):
    """The job's directory, in its hour directory, made as well the first time (or again, once
    the clean-up removed it empty). `empty`: the last job's directory, which it left empty,
    renamed to this one's where both are in the same hour (one rename a job, where an rmdir
    and a mkdir cost the pilot twice its CPU), else removed. A retried job may find its own."""
    if empty and os.path.dirname(empty) == os.path.dirname(job_dir):
        with contextlib.suppress(OSError):
            os.rename(empty, job_dir)           # fails where a retried job's own holds files
            return os.utime(job_dir)            # dated now: the clean-up goes by its age
    if empty:
        with contextlib.suppress(OSError):
            os.rmdir(empty)
    try:
        os.mkdir(job_dir)
    except OSError:
        os.makedirs(job_dir, exist_ok=True)     # its hour directory first, or a retried job's own


def is_empty_dir(path):
    """Whether `path` is a directory with nothing in it (one look, however much it holds)."""
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def copy_payload(command, scratch):
    """P3S_MODE=COPY (the original's): run a copy of the payload from the job's own scratch
    directory, so the job cannot be hurt by the payload changing under it, and two jobs never
    share the copy."""
    os.makedirs(scratch, exist_ok=True)
    copy = os.path.join(scratch, os.path.basename(command[0]))
    shutil.copy2(shutil.which(command[0]) or command[0], copy)
    return [copy] + command[1:]


def payload_env(inherited, site_env, job, pilot_uuid, job_dir):
    """The payload's environment, lowest precedence first: the pilot's own (less its tokens);
    P3S_OUTPUT_DIR, which defaults to the job's directory; the site's env; the job's env; the
    job's input file as P3S_INPUT_FILE unless the job's env names one; last, p3s's per-job
    values, which neither a site nor a job can override (a site's P3S_JOB_UUID would make every
    job write over the others)."""
    env = {**inherited, "P3S_OUTPUT_DIR": job_dir, **site_env, **job["env"]}
    if job.get("infile") and "P3S_INPUT_FILE" not in job["env"]:
        env["P3S_INPUT_FILE"] = job["infile"]
    if env.pop("P3S_INPUT_DIR_BASE", "") == "P3S_DATA" and env.get("P3S_DATA") and \
            os.path.isabs(env.get("P3S_INPUT_DIR", "")):
        # injector.py --bare-name data for a job naming no site: its input directory, absolute,
        # as the wrappers' $P3S_DATA/$P3S_INPUT_DIR reads it with the P3S_DATA it runs with
        env["P3S_INPUT_DIR"] = os.path.relpath(env["P3S_INPUT_DIR"], env["P3S_DATA"])
    env.update(P3S_JOB_UUID=job["uuid"], P3S_PILOT_UUID=pilot_uuid, P3S_JOB_DIR=job_dir)
    return env


def own_directories(env):
    """The directories that belong to this job alone, whose images are published: p3s's own
    ($P3S_JOB_DIR); $P3S_OUTPUT_DIR if it names the job's uuid, else the original wrappers'
    `$P3S_OUTPUT_DIR/$P3S_JOB_UUID` (a site's P3S_OUTPUT_DIR is a base shared between jobs,
    as lxvm.json's /tmp); the later wrappers' `$P3S_DATA/$P3S_MONITOR_DIR/$P3S_JOB_UUID` (and
    P3S_EVDISP_DIR). Never a directory shared between jobs."""
    uuid = env["P3S_JOB_UUID"]
    output = env.get("P3S_OUTPUT_DIR", "")
    dirs = [env["P3S_JOB_DIR"], output if uuid in output else output and os.path.join(output, uuid)]
    dirs += [os.path.join(env.get("P3S_DATA", ""), env[name], uuid)
             for name in ("P3S_MONITOR_DIR", "P3S_EVDISP_DIR") if env.get(name)]
    return list(dict.fromkeys(os.path.abspath(d) for d in dirs if d))


def images_to_publish(env, dirs, max_bytes):
    """(name, path) of the images to offer the server: those in the job's own directories `dirs`
    (see own_directories) and below, then those the $P3S_PUBLISH globs name (space-separated;
    relative to $P3S_JOB_DIR; $NAMEs from the job's environment expanded)."""
    found = []
    for top in dirs:
        walked = (entry.path for entry in walk_files(top, Budget()))
        found += [(top, f) for f in sorted(itertools.islice(walked, MAX_LOOKED_AT))]  # 1M files: bounded
    for pattern in env.get("P3S_PUBLISH", "").split():
        pattern = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), pattern)
        found += [(None, f) for f in sorted(glob.glob(os.path.join(env["P3S_JOB_DIR"],
                                                                   os.path.expanduser(pattern))))]
    chosen, too_big = {}, []
    for top, path in found:
        rel = os.path.relpath(path, top) if top else os.path.basename(path)
        name = re.sub(r"[^A-Za-z0-9._-]", "_", rel.replace(os.sep, "_"))[-64:].lstrip("._-")
        if (os.path.splitext(name)[1].lower() not in IMAGE_EXTS or os.path.islink(path)
                or not os.path.isfile(path) or name in chosen or path in chosen.values()):
            continue
        if os.path.getsize(path) > max_bytes:
            too_big.append(path)
        else:
            chosen[name] = path
    if too_big:
        log.warning("%d image(s) not published, over %d bytes: %s", len(too_big), max_bytes, " ".join(too_big[:3]))
    return list(chosen.items())


def read_small_json(path, limit):
    """The JSON in the regular file `path` of at most `limit` bytes, numbers finite; None when
    there is no such file; ValueError saying why not otherwise. A payload may leave anything
    there: a directory, a named pipe (never opened for reading: O_NONBLOCK), a symlink (not
    followed), 10 MB, NaN, nesting deeper than any parser."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"cannot be opened ({e.strerror})") from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise ValueError("is not a regular file")
        if status.st_size > limit:
            raise ValueError(f"has {status.st_size:,} bytes, more than the {limit:,} a job may write")
        data = os.pread(fd, limit + 1, 0)
    finally:
        os.close(fd)
    try:
        return json.loads(data, parse_constant=not_finite, parse_float=finite)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"is not JSON of finite numbers ({str(e)[:120] or 'nested too deeply'})") from None


def finite(text):
    value = float(text)
    return value if math.isfinite(value) else not_finite(text)


def not_finite(text):
    raise ValueError(f"{text[:20]} is not a finite number")


def read_quality(dirs):
    """What a finished payload said of its data, for the end report: verdict.json's checks and
    metrics.json's metrics, each the first found in the job's own directories; a file that
    cannot be read says why in quality_error (the job page shows it), never fatal."""
    found, errors = {}, []
    for filename, key in QUALITY_FILES.items():
        for directory in dirs:
            try:
                value = read_small_json(os.path.join(directory, filename), MAX_QUALITY_BYTES)
            except ValueError as e:
                errors.append(f"{filename} {e}")
                break
            if value is not None:
                found[key] = value
                break
    if errors:
        found["quality_error"] = "; ".join(errors)
    return found


def free_mb(directory):
    try:
        return shutil.disk_usage(directory).free / 2 ** 20
    except OSError:
        return None


def wrapper_directories(env):
    """The original wrappers' `$P3S_OUTPUT_DIR/$P3S_JOB_UUID` (a site's P3S_OUTPUT_DIR is a base
    shared between jobs, as lxvm.json's /tmp), if the job made it: p3s did not name it, but it
    is the job's alone, and goes with the job's files (see clean_job_files)."""
    output, uuid = env.get("P3S_OUTPUT_DIR", ""), env["P3S_JOB_UUID"]
    made = os.path.join(output, uuid)
    return [made] if output and uuid not in output and os.path.isdir(made) and not os.path.islink(made) else []


def note_wrapper_directories(out_path, env):
    """Leave `<uuid>.dirs` beside the job's log: the directories its wrapper made, for whichever
    pilot of this job log directory cleans them."""
    dirs = wrapper_directories(env)
    if dirs:
        with contextlib.suppress(OSError), open(out_path[:-len(".out")] + ".dirs", "w") as f:
            f.write("".join(d + "\n" for d in dirs))


def remove_noted_directories(path):
    """The directories a `<uuid>.dirs` file names: only one named by that uuid, never a link."""
    uuid = os.path.basename(path)[:36]
    with open(path) as f:
        for line in f.read(65536).splitlines():
            if os.path.basename(line) == uuid and os.path.isabs(line) and not os.path.islink(line):
                remove_tree(line, Budget())


def clean_job_files(joblogdir, max_age):
    """Delete what pilots wrote to the job log directory longer than max_age seconds ago: in the
    hour directories (<YYYYMMDD-HH>/) and at the top (the older flat layout), a job's
    <uuid>.out, <uuid>.err and <uuid>/, once all three are older (a running job writes to them),
    and the directories its <uuid>.dirs names (its wrapper's), then hour directories left empty.
    Nothing else is touched. Returns how many entries went."""
    cutoff, removed = time.time() - max_age, 0
    hours = [os.path.join(joblogdir, d) for d in listdir(joblogdir) if HOUR_DIR.fullmatch(d)]
    for top in [joblogdir, *hours]:
        by_job = {}
        for name in filter(JOB_FILE.fullmatch, listdir(top)):
            by_job.setdefault(name[:36], []).append(os.path.join(top, name))
        for paths in by_job.values():
            try:
                if max(os.lstat(p).st_mtime for p in paths) >= cutoff:
                    continue
                for path in paths:
                    if path.endswith(".dirs"):
                        remove_noted_directories(path)
                    if os.path.isdir(path) and not os.path.islink(path):
                        if not remove_tree(path, Budget()):
                            break
                    else:
                        os.unlink(path)
                    removed += 1
            except OSError:
                continue
        if top != joblogdir:
            with contextlib.suppress(OSError):
                os.rmdir(top)       # an hour directory left empty
    return removed


def leave_report(joblogdir, job_uuid, pilot_uuid, secret, report, ended_at):
    """Leave an end report the server could not take for the next pilot of this job log
    directory to deliver, in the leaving pilot's name (its secret too: the file is its user's
    alone), with the wall-clock time its job ended. Written whole, then renamed, so a reader
    never sees half of one. Returns its path."""
    spool = os.path.join(joblogdir, UNDELIVERED)
    os.makedirs(spool, mode=0o700, exist_ok=True)
    fd, part = tempfile.mkstemp(dir=spool, suffix=".part")         # mode 0600
    path = os.path.join(spool, job_uuid + ".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"job": job_uuid, "pilot": pilot_uuid, "secret": secret, "report": report,
                       "ended_at": ended_at}, f)
        os.replace(part, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(part)         # a full disk: no half file left behind
        raise
    return path


def read_left_report(path):
    """(job uuid, pilot uuid, secret, report, the wall-clock time its job ended or None) from a
    file leave_report wrote; ValueError if it is not one."""
    with open(path) as f:
        left = json.load(f)
    try:
        job, pilot, secret, report = (left[k] for k in ("job", "pilot", "secret", "report"))
        job, pilot = str(uuidlib.UUID(job)), str(uuidlib.UUID(pilot))
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"no {e}" if isinstance(e, KeyError) else str(e)) from None
    if not isinstance(report, dict) or not isinstance(secret, str):
        raise ValueError("its report or secret is of the wrong type")
    ended_at = left.get("ended_at")
    if not isinstance(ended_at, (int, float)) or isinstance(ended_at, bool):
        ended_at = None                     # a file from before it was kept
    return job, pilot, secret, dict(report, pilot=pilot), ended_at


def listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def kill_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(execution, grace):
    """SIGTERM to the payload's process group, SIGKILL after `grace` seconds unless it ended
    (only the main thread reaps the payload: it needs its resource usage)."""
    kill_group(execution.pid, signal.SIGTERM)
    execution.exited.wait(grace)
    kill_group(execution.pid, signal.SIGKILL)


PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2 ** 20
TICKS = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def sigchld_left_to_the_main_thread():
    """SIGCHLD blocked in the calling thread, one of the pilot's that sleep. glibc's posix_spawn
    blocks every signal in the main thread until its child has run exec; on a busy node a short
    payload may end before the main thread runs again, and the kernel then wakes another thread
    that takes signals to deliver its SIGCHLD, only to drop it: a wake-up of a sleeping thread
    nearly every job (measured at eight pilots on two cores). Blocked in them, it waits for the
    main thread, which drops it as it unblocks, with no wake-up."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


def become_subreaper():
    """Make this pilot the reaper of its orphans (Linux's PR_SET_CHILD_SUBREAPER): a payload's
    child that leaves its process group (setsid, a double fork) and outlives its parent becomes
    the pilot's child, not init's, so the pilot still sees, accounts and kills it. Harmless
    where prctl does not exist."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def escaped_children(spared):
    """This pilot's children now, but the spared ones (the watchdog): after a payload has been
    reaped, any child left is one of its descendants that escaped its group. The main thread
    starts every payload, and the kernel gives a subreaper's orphans to its first live thread,
    the main one: a small file of /proc (read to its end), so every job can afford the look."""
    with contextlib.suppress(OSError, ValueError):
        fd = os.open(f"/proc/self/task/{os.getpid()}/children", os.O_RDONLY)
        try:
            chunks = [os.read(fd, 65536)]
            while chunks[-1]:               # a read of /proc gives a page at most: on to the end
                chunks.append(os.read(fd, 65536))
            return set(map(int, b"".join(chunks).split())) - set(spared)
        finally:
            os.close(fd)
    return set()


def job_processes(pgid, spared=()):
    """{pid: (resident MB, CPU seconds, bytes read, bytes written)} of the live processes of a
    job: its payload's process group and every other descendant of this pilot (its subreaper),
    the spared ones (the watchdog) and their trees apart. From /proc (I/O only where readable;
    a process gone meanwhile is skipped)."""
    stats, children = {}, collections.defaultdict(list)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            stats[int(name)] = fields
            children[int(fields[1])].append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    mine, stack = set(), [os.getpid()]
    while stack:
        for child in children[stack.pop()]:
            if child not in spared:
                mine.add(child)
                stack.append(child)
    mine.update(pid for pid, fields in stats.items() if fields[2] == str(pgid).encode())
    found = {}
    for pid in mine:
        fields = stats[pid]
        if fields[0] == b"Z":
            continue
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                rss = int(f.read().split()[1]) * PAGE_MB
        except (OSError, IndexError, ValueError):
            continue
        read = written = 0
        with contextlib.suppress(OSError, ValueError, KeyError):
            with open(f"/proc/{pid}/io", "rb") as f:
                io = dict(line.split(b":") for line in f.read().splitlines())
            read, written = int(io[b"read_bytes"]), int(io[b"write_bytes"])
        found[pid] = (rss, (int(fields[11]) + int(fields[12])) / TICKS, read, written)
    return found


def left_behind(escaped):
    """What a finished job's page says of processes that escaped its group and outlived it."""
    return (f"{len(escaped)} process(es) that left the payload's process group outlived it and were "
            "killed (pid " + ", ".join(map(str, sorted(escaped)[:5])) + ")") if escaped else ""


def kill_escaped(pids):
    """SIGKILL processes that outlived their job, and reap those that were (or became, their
    parent killed too) this pilot's children, so no zombie is left."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        left = [pid for pid in pids if alive_child(pid)]
        if not left:
            return
        time.sleep(0.01)


def alive_child(pid):
    """False once pid is reaped (or is not our child); reaps it if it has died."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == 0
    except ChildProcessError:
        return False


class Budget:
    """How much of a tree one walk may look at: TREE_ENTRIES entries and TREE_SECONDS. A payload
    controls its job's tree (a million files, a chain deeper than any recursion): every walk of
    it stops when its budget is spent, and says so, instead of stalling or killing the pilot."""

    def __init__(self, entries=TREE_ENTRIES, seconds=TREE_SECONDS):
        self.left, self.deadline = entries, time.monotonic() + seconds
        self.spent = False

    def take(self):
        self.left -= 1
        self.spent = self.spent or self.left < 0 or time.monotonic() > self.deadline
        return not self.spent


def walk_files(top, budget):
    """The regular files under top (DirEntry objects), depth first without recursion, never
    following a symlink nor opening anything but directories; what cannot be read is skipped."""
    stack = [top]
    while stack and not budget.spent:
        with contextlib.suppress(OSError):
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if not budget.take():
                        return
                    with contextlib.suppress(OSError):
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            yield entry


def tree_size(path):
    """Bytes of the regular files under path (symlinks not followed), as far as one Budget goes."""
    return sum(entry.stat(follow_symlinks=False).st_size for entry in walk_files(path, Budget()))


def remove_tree(top, budget):
    """Delete top and everything under it without recursion and without following a symlink
    (a link is removed, never what it points at). True once it is gone; False, leaving the
    rest, when the budget is spent or something refuses to go (the caller says so)."""
    stack = [top]
    try:
        while stack:
            subdirs = []
            with os.scandir(stack[-1]) as entries:
                for entry in entries:
                    if not budget.take():
                        return False
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.path)
                    else:
                        os.unlink(entry.path)
            if subdirs:
                stack += subdirs        # emptied first; this directory is looked at again after
            else:
                os.rmdir(stack.pop())
    except OSError as e:
        log.warning("%s: not removed whole (%s); left for a person", top, e)
        return False
    return True


class Usage:
    """What a payload's process group consumed: sampled while it runs (the group's resident
    memory, and each process's CPU and I/O, for those the payload never waits for), and the
    kernel's account of the payload and the children it waited for, at its end."""

    def __init__(self):
        self.peak_mb = 0.0          # the group's largest sampled resident memory
        self.last_mb = 0.0          # the group's resident memory at the last sample
        self.seen = {}              # pid -> its last (rss, cpu, read, written)
        self.sampled = False

    def sample(self, pgid, spared=()):
        group = job_processes(pgid, spared)
        self.sampled = True
        self.last_mb = sum(p[0] for p in group.values())
        self.peak_mb = max(self.peak_mb, self.last_mb)
        self.seen.update(group)
        return self.last_mb

    def survivors(self, pgid, spared=()):
        """The job's processes still alive once the payload has exited, after a last look."""
        group = job_processes(pgid, spared)
        self.seen.update(group)
        return list(group)

    def figures(self, rusage, stragglers, output_bytes):
        """The end report's figures: the kernel's for the payload and what it waited for, plus
        the last sample of each process still alive at its end (they are killed with the group).
        The kernel's peak memory of a child spawned from the pilot starts at the pilot's own
        (its memory is the child's until exec): at or below it, it says nothing of the job, so
        the samples' peak stands, or none (/bin/true read 24 MB, the pilot's size)."""
        extra = [self.seen[pid] for pid in stragglers if pid in self.seen]
        figures = {"cpu_user": round(rusage.ru_utime + sum(p[1] for p in extra), 3),
                   "cpu_sys": round(rusage.ru_stime, 3),
                   "read_bytes": rusage.ru_inblock * 512 + sum(p[2] for p in extra),
                   "write_bytes": rusage.ru_oublock * 512 + sum(p[3] for p in extra),
                   "output_bytes": output_bytes}
        pilots = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kernels = rusage.ru_maxrss / 1024 if rusage.ru_maxrss > pilots else 0.0
        if max(kernels, self.peak_mb):
            figures["max_rss_mb"] = round(max(kernels, self.peak_mb), 1)
        return figures


def tail(path, size=TAIL_BYTES):
    """The last `size` bytes of a log, as text (four system calls, no file object: twice a job).
    Only a regular file is read: the payload may have put a named pipe in its place, whose
    open would wait for a writer for good (hence O_NONBLOCK, which a regular file ignores)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            return ""
        end = status.st_size
        return os.pread(fd, min(end, size), max(0, end - size)).decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


# -- provenance: which code ran on which input, in which environment ------------------------------
HASH_MAX_BYTES = 256 * 2 ** 20      # a payload file bigger than this is named, not hashed
INPUT_SUM_SECONDS = 30.0            # the input's adler32 is read within this of the job's start...
INPUT_SUM_AFTER = 5.0               # ...and waited for at most this long once the job has ended
GIT_SECONDS = 2.0                   # `git describe` of a payload's directory, at most
GIT_KEEP = 60.0                     # ... asked again after this (a work tree may change)
VERSION_VARS = ("DUNETPCVER",)      # software versions recorded; a site or job adds P3S_VERSION_VARS
SECRET_NAME = re.compile(r"TOKEN|PASSW|SECRET|KEY|CREDENTIAL", re.I)   # masked in the environment's digest
LIFE_STAGGER = 0.85                 # a pilot with a lifetime ends between this share of it and all of it
PROBE_SECONDS = 10.0                # a site's probe that has not answered by then has failed


class Provenance:
    """What a pilot records of each job: the sha256 (and `git describe`) of the files its payload
    runs, the input file's size, modification time and adler32 (read once, in the background,
    within INPUT_SUM_SECONDS: said when skipped), the software versions and a digest of the
    environment (secrets masked), and where it ran. Hashes are kept by file identity and git's
    answer for GIT_KEEP, so a pilot running the same payload again pays a stat."""

    def __init__(self, site, host, pilot):
        self.where = {"site": site, "host": host, "pilot": pilot, "p3s": VERSION}
        self.hashes, self.described, self.records = {}, {}, {}

    def start(self, command, shell, env, job_env):
        """Called as the payload starts: its files now, the input's checksum from now on.
        `job_env`: the job's own env, which with the pilot's and its site's made `env`."""
        input_file = input_path(env)
        reader = InputSum(input_file) if input_file else None     # a job without input makes no thread
        if reader:
            reader.start_or_skip()
        return self.record(command, shell, env, job_env), reader

    def record(self, command, shell, env, job_env):
        """What ran, but the input. The jobs of a stream run the same command in the same
        environment (the pilot's and its site's, which do not change, and the job's own but for
        p3s's per-job values, which no record holds): their record is made once, and kept for
        GIT_KEEP while every payload file has the identity (stat) it had; one changed since is
        hashed anew. Making it cost a tenth of a short job's pilot CPU."""
        key = (shell, command if shell else tuple(command),
               frozenset(item for item in job_env.items() if item[0] not in PER_JOB_VARS))
        kept = self.records.get(key)
        if kept and time.monotonic() - kept[0] < GIT_KEEP and [file_stamp(p) for p in kept[1]] == kept[2]:
            return kept[3]
        files = payload_files(command, shell)
        stamps = [file_stamp(p) for p in files]         # before the hashing: a change meanwhile is seen next time
        record = {"payload": [self.identity(path) for path in files], "versions": versions(env),
                  "env_sha256": env_digest(env), **self.where}
        if len(self.records) >= 64:
            self.records.clear()
        self.records[key] = (time.monotonic(), files, stamps, record)
        return record

    def identity(self, path):
        found = {"path": path}
        try:
            st = os.stat(path)
            key = (path, *stamp_of(st))
            if key not in self.hashes:
                self.hashes = {k: v for k, v in self.hashes.items() if k[0] != path}    # one per path
                self.hashes[key] = sha256_of(path) if st.st_size <= HASH_MAX_BYTES else None
            found["sha256"] = self.hashes[key] or f"not hashed: over {HASH_MAX_BYTES >> 20} MB"
        except OSError as e:
            found["error"] = e.strerror or str(e)
        described = self.git_describe(os.path.dirname(path))
        if described:
            found["git"] = described
        return found

    def git_describe(self, directory):
        kept = self.described.get(directory)
        if kept is None or time.monotonic() - kept[0] > GIT_KEEP:
            kept = self.described[directory] = (time.monotonic(), git_describe(directory))
        return kept[1]


def stamp_of(st):
    """What tells that a file changed, from its stat: (device, inode, size, mtime)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def file_stamp(path):
    """stamp_of the file at `path`; None if it is gone."""
    try:
        return stamp_of(os.stat(path))
    except OSError:
        return None


def write_json(path, obj):
    """Best effort: a file the job's directory may refuse (full, read-only) is said, not fatal."""
    try:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    except OSError as e:
        log.warning("%s not written: %s", path, e.strerror or e)


def payload_files(command, shell, most=4):
    """The files a payload runs: its program (found on PATH) and every other word that names an
    existing file (a script given to an interpreter, the scripts a shell line names)."""
    try:
        words = shlex.split(command) if shell else list(command)
    except ValueError:
        return []
    found = [shutil.which(words[0]) or words[0]] if words else []
    found += [w for w in words[1:] if "/" in w and os.path.isfile(w)]
    return [os.path.abspath(p) for p in dict.fromkeys(found) if os.path.isfile(p)][:most]


@functools.lru_cache(maxsize=None)
def git_available():
    return shutil.which("git") is not None


def git_describe(directory):
    """`git describe --always --dirty` of a directory in a git work tree; None otherwise, or if
    git is missing, slow or fails (never fatal)."""
    if not git_available():
        return None
    try:
        done = subprocess.run(["git", "-C", directory, "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=GIT_SECONDS, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip()[:100] or None


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def versions(env):
    names = VERSION_VARS + tuple(env.get("P3S_VERSION_VARS", "").split())
    return {name: env[name] for name in names if name in env}


PER_JOB_VARS = ("P3S_JOB_UUID", "P3S_JOB_DIR", "P3S_PILOT_UUID", "P3S_INPUT_FILE", "P3S_OUTPUT_DIR")


def env_digest(env):
    """The environment's sha256 (p3s's per-job values left out: every job has its own), the
    values of secret-looking names masked, so two jobs that ran alike have the same digest."""
    lines = "".join(f"{k}={'(hidden)' if SECRET_NAME.search(k) else v}\n"
                    for k, v in sorted(env.items()) if k not in PER_JOB_VARS)
    return hashlib.sha256(lines.encode("utf-8", "surrogateescape")).hexdigest()


def input_path(env):
    """The job's input file as its payload finds it ($P3S_INPUT_FILE, under $P3S_DATA/
    $P3S_INPUT_DIR unless absolute), or '' for a job without one."""
    name = env.get("P3S_INPUT_FILE", "")
    if os.path.isabs(name) or not name:
        return name
    return os.path.join(env.get("P3S_DATA", ""), env.get("P3S_INPUT_DIR", ""), name)


class InputSum(threading.Thread):
    """The input file's identity: its size and modification time, and its adler32 (the checksum
    DUNE's data management keeps) read once while the payload runs, given up at the deadline."""

    def __init__(self, path):
        super().__init__(name="input-sum", daemon=True)
        self.path, self.result = path, None
        self.deadline = time.monotonic() + INPUT_SUM_SECONDS

    def start_or_skip(self):
        """Read in a thread of its own; where the node has none to give (ulimit -u), the job
        runs all the same and its record says the checksum was skipped, and why."""
        try:
            self.start()
        except RuntimeError as e:
            self.result = {"path": self.path, "adler32": None, "skipped": f"no thread to read it: {e}"}

    def run(self):
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                found = {"path": self.path, "size": st.st_size, "mtime": st.st_mtime}
                found.update(self.adler32(f, st.st_size))
        except OSError as e:
            found = {"path": self.path, "error": e.strerror or str(e)}
        self.result = found

    def adler32(self, f, size):
        value = 1
        for chunk in iter(lambda: f.read(1 << 20), b""):
            value = zlib.adler32(chunk, value)
            if time.monotonic() > self.deadline:
                return {"adler32": None, "skipped": f"{size / 2 ** 30:.1f} GB not read within "
                                                    f"{INPUT_SUM_SECONDS:g} s of the start"}
        return {"adler32": f"{value:08x}"}

    def identity(self):
        """What was found, waiting INPUT_SUM_AFTER at most for the reading to end (a short job's
        report is not held for a huge file)."""
        if self.ident is not None:      # started
            self.join(min(INPUT_SUM_AFTER, max(0.0, self.deadline - time.monotonic())))
        return self.result or {"path": self.path, "adler32": None,
                               "skipped": f"not read whole {INPUT_SUM_AFTER:g} s after the job ended"}


class Once:
    """A call made at most once: the first time it is called; each call returns its result."""

    def __init__(self, fn):
        self.fn, self.called, self.result = fn, False, None

    def __call__(self):
        if not self.called:
            self.called, self.result = True, self.fn()
        return self.result


class Execution:
    """A running payload and why it may have to stop early (set from other threads)."""

    def __init__(self, job, pid, out_path, err_path, env):
        self.job, self.pid, self.env = job, pid, env
        self.out_path, self.err_path = out_path, err_path
        self.stop_reason = None     # (state, errmsg) once someone decided to end it
        self.started = time.monotonic()     # the time limit counts from here
        self.exited = threading.Event()     # set when the payload has been reaped
        self.usage = Usage()
        self.limits = {}                    # "memory", "disk": MB, where the job or site sets one
        self.shell = False                  # run through the shell (its exit 137 is a child's SIGKILL)
        self.report_queued = False          # handed to the reporter thread as running
        self.running_sent = None            # with report_queued: an Event set once that report was sent or given up
        self.next_sample = self.started + SAMPLE_PERIOD
        self.figures = {}                   # what it consumed, for the end report
        self.job_dir_empty = False          # P3S_JOB_DIR was empty once the payload ended (see Pilot.wait)
        self.provenance = None              # (what ran, the input's InputSum), where the server takes it
        self.reaped = None                  # (its end report, when it ended) once reaped: see Pilot.reap

    @functools.cached_property
    def dirs_to_look_in(self):
        """The job's own directories (own_directories), where its quality files and images are,
        once the payload was reaped: $P3S_JOB_DIR is left out if it was seen empty then (most
        short jobs'), and not looked in again."""
        skipped = os.path.abspath(self.env["P3S_JOB_DIR"]) if self.job_dir_empty else None
        return [d for d in own_directories(self.env) if d != skipped]

    def runtime(self):
        """Seconds since the payload started (the server dates the start from it: no clock skew)."""
        return round(time.monotonic() - self.started, 6)

    def stop(self, state, errmsg, grace):
        """SIGTERM, then SIGKILL after `grace`, in a thread; at once where the node has no thread
        to give (ulimit -u reached, by the payload's own fork bomb maybe): it still ends."""
        if self.stop_reason is None:
            self.stop_reason = (state, errmsg)
            try:
                threading.Thread(target=stop_group, args=(self, grace), daemon=True).start()
            except RuntimeError:
                kill_group(self.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------
# The pilot
# ------------------------------------------------------------------------------------------------
class Pilot:
    """One pilot: registers, asks for jobs, runs each payload, reports, and heartbeats meanwhile.

    Methods for the caller (main): run() until done, drained, stopped or out of cycles, then
    deregister; it returns the exit code. on_signal is the handler for SIGTERM, SIGINT and
    SIGUSR1. Threads: the main thread runs the work loop and the payload; the heartbeat thread
    only reads `current` and calls Execution.stop, which is safe from any thread (and from a
    signal handler: nothing here takes a lock a handler could wait for). The supervisor and
    reporter threads watch the payload and report it running. The jobs claimed and not started
    (`claimed`) are taken under claim_lock by whichever thread starts or gives them back, so a
    job is either started or given back, never both.
    """

    def __init__(self, args, client):
        self.args, self.client = args, client
        self.uuid = None
        self.settings = dict(DEFAULTS)
        self.site_env = {}
        self.site_limits = {}           # the site's default limits for its jobs (MB)
        self.current = None             # the Execution in progress, if any (set by the main thread)
        self.last_started = float("-inf")   # monotonic time the latest payload started
        become_subreaper()
        self.watchdog = start_watchdog()
        self.lease = None               # seconds the server keeps our job while we are silent
        self.last_contact = time.monotonic()    # the last answer from the server
        self.dropped = None             # why the server no longer knows us: register again
        self.exit_reason = None         # set when the pilot should stop asking for work
        self.stopped_at = None          # monotonic time of the SIGTERM or SIGINT that stops it
        self.halt = None                # why the pilot kills what it runs (SIGTERM, SIGINT, stop), if it must
        self.idle = False               # True only while blocked in a job request
        self.beats = threading.Event()  # set to stop the heartbeat and supervisor threads
        self.wake = threading.Event()   # set when a payload starts: the supervisor looks at it
        self.next_look = 0.0            # monotonic time the supervisor looks next, unless woken
        self.running_reports = queue.Queue()    # executions to report running, for the reporter
        self.threads = {}               # the heartbeat, supervisor and reporter threads, by name
        self.image_limits = IMAGE_LIMITS    # what the server takes; it says so at registration
        self.features = frozenset()     # report fields the server takes beyond the first protocol (idem)
        self.provenance = None          # a Provenance, where the server takes it
        self.life = self.life_end = None    # with a lifetime: no job is taken after life_end (monotonic)
        self.claimed = collections.deque()  # jobs claimed by end reports and not started yet, in order
        self.unreleased = []            # jobs claimed ahead that could not be given back yet
        self.claim_lock = threading.Lock()  # for both: the main and reporter threads take from them
        self.empty_dir = None           # the last job's directory, left empty: the next one's (make_job_dir)
        self.keep_hours = KEEP_JOB_FILES    # job files older than this are deleted (site or option)
        self.cleaned = 0.0              # monotonic time of the last clean-up of the job log directory
        self.cleaner = None             # the thread of the clean-up under way, if any
        self.note = ""                  # why the pilot takes no job now (its page shows it)
        self.free_seen = (-math.inf, None)  # when the job log directory's free MB were looked at, and those
        self.probe = ""                 # the site's probe command (or --probe)
        self.probed = (-math.inf, "")   # when it last ran, and why it failed ('' if it did not)
        self.tally = collections.Counter()  # jobs ended by state, since `tallied` (log_end)
        self.left_reports = []          # paths of the end reports this pilot left behind (leave)
        self.tallied = time.monotonic()
        # what payloads inherit from the pilot's environment: never the server's tokens
        self.inherited_env = {k: v for k, v in os.environ.items() if not k.startswith("P3S_TOKEN")}

    # -- lifecycle ------------------------------------------------------------------------------
    def register(self, uuid=None):
        # our own uuid: a registration retried after a lost answer registers this pilot once
        info = {"uuid": uuid or str(uuidlib.uuid4()), "host": node_name(), "pid": os.getpid(),
                "site": self.args.site, "jobtypes": self.args.jobtype, "extra": self.args.extra,
                "log": self.args.logfile or ""}
        if self.args.request:
            info["request"] = self.args.request
        if self.args.heartbeat is not None:
            info["heartbeat"] = self.args.heartbeat
        self.client.on_retry = log.warning     # said at once, whatever the verbosity
        answer = self.client.register_pilot(retry_for=REGISTER_RETRY, **info)
        self.heard_from_server()
        self.uuid, self.lease, self.dropped = answer["uuid"], answer["lease"], None
        self.image_limits = answer.get("images", IMAGE_LIMITS)
        self.features = frozenset(answer.get("features", ()))
        site = answer.get("site") or {}
        for key in DEFAULTS:       # explicit options win over site defaults, which win over ours
            chosen = getattr(self.args, key)
            self.settings[key] = chosen if chosen is not None else (
                site[key] if site.get(key) is not None else DEFAULTS[key])
        self.site_env = site.get("env", {})
        self.site_limits = {"memory": site.get("memory"), "disk": site.get("disk")}
        self.probe = self.args.probe if self.args.probe is not None else site.get("probe") or ""
        self.keep_hours = self.args.keep_job_files or site.get("keep_hours") or KEEP_JOB_FILES
        life = self.args.lifetime if self.args.lifetime is not None else site.get("pilotlife")
        if life and self.life_end is None:     # a pilot registered again keeps the end it drew
            self.life = life
            self.life_end = time.monotonic() + life * random.uniform(LIFE_STAGGER, 1.0)
        self.provenance = Provenance(self.args.site, info["host"], self.uuid) if "provenance" in self.features else None
        # The watchdog's last word: SIGKILL one heartbeat before the server gives the job away.
        self.watchdog.lease(max(self.lease - self.settings["heartbeat"], self.fence_after()))
        self.watchdog.pilot(self.uuid)
        log.info("registered as %s (site %r, %s)", self.uuid, self.args.site,
                 ", ".join(f"{k} {v:g}" for k, v in self.settings.items()))

    def run(self):
        self.idle = True            # a signal may end the (possibly long) wait for the server
        try:
            self.register(self.args.pilot_uuid)
        except Interrupted:
            log.info("stopped before the server answered: %s", self.exit_reason)
            return 0
        finally:
            self.idle = False
        code = 0
        try:
            self.start_threads()
            self.work_loop()
            code = int(self.exit_reason.startswith(CRASHED))    # one of its threads (see guarded)
        except Interrupted:         # a signal landed just outside the long poll
            pass
        except NoThread as e:
            log.error("%s", e)
            self.exit_reason, code = str(e), 1
        except Exception as e:      # a defect met on the way: said, and the job held is not
            log.exception("crashed")    # taken as never started (it would kill the next pilot)
            self.exit_reason, code = f"{CRASHED}: {type(e).__name__}: {e}"[:200], 1
        finally:
            self.beats.set()
            self.deregister()
            self.watchdog.close()
            if self.empty_dir:
                with contextlib.suppress(OSError):
                    os.rmdir(self.empty_dir)
        return code

    def start_threads(self):
        """The heartbeat, supervisor and reporter threads, for the pilot's life. A node with no
        thread to give (ulimit -u reached by a crowd of pilots) makes the pilot leave,
        deregistered and saying why in one line, rather than be found lost."""
        for loop, name in ((self.heartbeat_loop, "heartbeat"), (self.supervise_loop, "supervisor"),
                           (self.report_loop, "reporter")):
            try:
                self.threads[name] = threading.Thread(target=self.guarded, args=(loop, name), name=name, daemon=True)
                self.threads[name].start()
            except RuntimeError as e:
                raise NoThread(f"cannot start the pilot's {name} thread: {e}") from None

    def guarded(self, loop, name):
        """Run one of the pilot's threads. A defect met there is the pilot's crash, as one met in
        its main thread is: a thread that died alone would leave the pilot taking jobs with no
        time limit (the supervisor), no heartbeat, or waiting for ever on a running report (the
        reporter). Said once with its traceback; the payload running is stopped, reported and
        run again elsewhere; the pilot deregisters as crashed and exits 1."""
        try:
            with sigchld_left_to_the_main_thread():
                loop()
        except Exception as e:
            log.exception("the %s thread crashed; the pilot stops", name)
            self.exit_reason = f"{CRASHED}: the {name} thread: {type(e).__name__}: {e}"[:200]
            self.halt = self.halt or self.exit_reason
            execution = self.current
            if execution:
                execution.stop("pilotTO", f"pilot stopping: {self.exit_reason}", self.args.kill_grace)

    def deregister(self):
        """Say goodbye, unless an end report of ours is still left behind: deregistering would
        give its job away (a short job would even be taken as never started and run again), so
        the pilot that delivers the report deregisters this one after it."""
        self.release_claimed("the pilot leaves")
        self.deliver_left_reports()         # the server may be back: our own first
        if any(os.path.exists(path) for path in self.left_reports):
            log.warning("not deregistering: the next pilot of %s delivers our end report, then deregisters us",
                        self.args.joblogdir)
        else:
            try:
                self.client.deregister_pilot(self.uuid, self.exit_reason or "done", retry_for=10)
            except P3SError as e:
                log.warning("could not deregister: %s", e)
        self.log_tally()
        log.info("exiting: %s", self.exit_reason or "done")

    def work_loop(self):
        """Ask for a job, run it, report it, until told to go; a job claimed to run next starts
        the moment the one before it ends (run_job), the checks below come before each request."""
        cycles, period = int(self.settings["cycles"]), self.settings["period"]
        last_work = time.monotonic()
        done = 0
        execution = None
        while execution is not None or self.exit_reason is None:
            if execution is not None:
                execution = self.run_job(execution, room=cycles - done if cycles else math.inf)
                done += execution is not None
                last_work = time.monotonic()
                continue
            if cycles and done >= cycles:
                self.exit_reason = f"{cycles} cycles done"
                break
            if self.args.max_idle and time.monotonic() - last_work >= self.args.max_idle:
                self.exit_reason = f"idle for {self.args.max_idle:g} s"
                break
            if self.life_end is not None and time.monotonic() >= self.life_end:
                self.exit_reason = f"end of its life ({self.life:g} s)"
                break
            wait = period if not self.args.max_idle else min(
                period, max(0.0, self.args.max_idle - (time.monotonic() - last_work)))
            if self.life_end is not None:
                wait = min(wait, max(0.0, self.life_end - time.monotonic()))
            if self.dropped:
                self.register_again()
            self.keep_disk_clean()
            if self.unfit():
                self.release_claimed("the pilot takes no job now")
                self.pause(period)
                continue
            if self.unreleased:
                self.release_claimed("retried")
            job = self.request(wait)
            if job is not None and self.exit_reason is not None:
                self.keep_unstarted(job)        # told to go while it waited (a crash, a signal)
                continue
            done += 1
            execution = self.start_job(job) if job is not None else None

    def near_end_of_life(self):
        """Whether the pilot's life ends before a job now taken could well end: it then asks for no
        next job with its end report (one claimed now would wait for the next pilot)."""
        return self.life_end is not None and time.monotonic() >= self.life_end - self.settings["period"]

    def request(self, wait):
        """The job an end report claimed, else one long poll for a job; None if there was none
        or the server is unreachable."""
        self.idle = True
        try:
            if self.exit_reason is not None:
                return None
            job = self.take_claimed()
            if job is not None:
                return job
            log.debug("asking for a job (waiting up to %g s)", wait)
            answer = self.client.request_job(self.uuid, wait)
            self.heard_from_server()
            log.debug("answer: job %s, directive %s", answer["job"] and answer["job"]["uuid"], answer["directive"])
            if answer["directive"]:
                self.obey(answer["directive"], f"{answer['directive']} requested by the server", None)
            return answer["job"]
        except Interrupted:
            return None
        except P3SError as e:
            if e.status in (404, 409):
                self.dropped = str(e)
                return None
            log.warning("job request failed, will retry: %s", e)
            self.pause(OUTAGE_PAUSE)
            return None
        finally:
            self.idle = False

    def keep_disk_clean(self):
        """At start and every CLEAN_EVERY seconds (or half the keep time, if shorter): job files
        older than keep_hours go, in a thread of their own, so that a tree a payload left (huge,
        deep, unreadable) never delays the pilot's work."""
        if self.cleaned and time.monotonic() - self.cleaned < min(CLEAN_EVERY, self.keep_hours * 3600 / 2):
            return
        self.cleaned = time.monotonic()
        if not (self.cleaner and self.cleaner.is_alive()):
            self.cleaner = threading.Thread(target=self.clean_job_files, name="cleaner", daemon=True)
            with contextlib.suppress(RuntimeError):     # no thread now (ulimit -u): next time
                self.cleaner.start()
        self.deliver_left_reports()

    def clean_job_files(self):
        removed = clean_job_files(self.args.joblogdir, self.keep_hours * 3600)
        if removed:
            log.info("removed %d job file(s) and directories older than %g h", removed, self.keep_hours)

    def deliver_left_reports(self):
        """Deliver the end reports that pilots of this job log directory left behind (told to stop
        while the server was away), each in its pilot's name: the job ends as it did, once, not at
        its lease as pilotTO nor run again. A report the server no longer takes (the job moved
        on) is dropped with a warning; while the server is away, they wait for the next look."""
        spool = os.path.join(self.args.joblogdir, UNDELIVERED)
        for name in sorted(n for n in listdir(spool) if n.endswith(".json")):
            path = os.path.join(spool, name)
            try:
                job, pilot, secret, report, ended_at = read_left_report(path)
            except (OSError, ValueError) as e:
                log.warning("%s: not an end report a pilot left (%s): removed", path, e)
            else:
                self.client.pilot_secrets[pilot] = secret
                if ended_at is not None:    # the wall clock's age of its end, on the monotonic clock
                    self.date_if_late(report, time.monotonic() - max(0.0, time.time() - ended_at))
                try:
                    self.client.report(job, report, retry_for=0)
                    log.info("job %s: delivered the end report pilot %s left behind", job, pilot)
                    if pilot != self.uuid:
                        with contextlib.suppress(P3SError):
                            self.client.deregister_pilot(pilot, "left while the server was unreachable",
                                                         retry_for=0)
                except P3SError as e:
                    if not e.bad_input:
                        return
                    log.warning("job %s: the end report pilot %s left is no longer taken: %s", job, pilot, e)
            with contextlib.suppress(OSError):
                os.unlink(path)

    def unfit(self):
        """True (and a note for the pilot's page) while the pilot would fail any job it took, or
        run it unwatched: its watchdog gone and not restartable, its job log directory short of
        space, or its site's probe failing (EOS unreachable, say); it takes jobs again once the
        cause is gone. The free space is looked at once a second at most: a pilot of short jobs
        asks hundreds of times a second."""
        t = time.monotonic()
        if t - self.free_seen[0] >= FREE_SPACE_EVERY:
            self.free_seen = (t, free_mb(self.args.joblogdir))
        free = self.free_seen[1]
        low = free is not None and free < self.args.min_free_mb
        if self.watchdog.problem:
            note = self.watchdog.problem
        elif low:
            note = f"taking no jobs: {free:.0f} MB free in {self.args.joblogdir}, below {self.args.min_free_mb:g}"
        else:
            note = self.probe_failure()
        if note != self.note:
            (log.warning if note else log.info)("%s", note or "taking jobs again")
            self.cleaned = 0.0 if low else self.cleaned     # clean again at once
        self.note = note
        return bool(note)

    def probe_failure(self):
        """The site's probe (a command, `test -r /eos/np04/inbox`), run at most once a heartbeat
        and for at most PROBE_SECONDS: why it failed, or ''."""
        if not self.probe or time.monotonic() < self.probed[0] + self.settings["heartbeat"]:
            return self.probed[1]
        try:
            ran = run_bounded(["/bin/sh", "-c", self.probe], PROBE_SECONDS)
            failed = (f"no answer within {PROBE_SECONDS:g} s: killed with its children" if ran.code is None else
                      ran.code != 0 and f"exit code {ran.code}" + (f": {ran.said[:200]}" if ran.said else ""))
        except OSError as e:
            failed = str(e)
        self.probed = (time.monotonic(), f"taking no jobs: the site's probe `{self.probe}` failed ({failed})"
                       if failed else "")
        return self.probed[1]

    def heard_from_server(self):
        with self.claim_lock:
            now = time.monotonic()
            self.forget_claims_if_silent(now)
            self.last_contact = now
        self.watchdog.contact()

    def forget_claims_if_silent(self, now):
        """After a silence of half the fence (a pause, a partition), the jobs claimed ahead and not
        started are forgotten, never started: the server may have given them away. Those it still
        has as this pilot's, it hands back to the next claim (Broker.pick). Checked at the first
        answer after the silence too: a heartbeat that ends it must not make them look fresh."""
        if self.claimed and self.too_silent(now):
            log.warning("no answer from the server for %.0f s: the %d job(s) claimed ahead are left to "
                        "the server", now - self.last_contact, len(self.claimed))
            self.claimed.clear()

    def too_silent(self, now=None):
        """Whether the server has been silent so long (half the fence) that it may have given
        away the jobs claimed ahead: they must not start."""
        return (time.monotonic() if now is None else now) - self.last_contact > self.fence_after() / 2

    def register_again(self):
        """The server dropped this pilot (it deregistered it, or forgot it): any job it still ran
        is no longer its own (stopped already by the heartbeat), so it registers anew."""
        log.warning("the server dropped this pilot (%s): registering again", self.dropped)
        with self.claim_lock:      # the jobs it had claimed were freed with it
            self.claimed.clear()
            self.unreleased = []
        self.idle = True            # a signal may end the wait for the server
        try:
            self.register()
        finally:
            self.idle = False

    def fence_after(self):
        """Seconds without an answer after which the pilot kills its payload itself: before the
        server's lease runs out, with room for a heartbeat and the kill grace."""
        beat = self.settings["heartbeat"]
        return max(self.lease - 2 * beat - self.args.kill_grace, self.lease / 2)

    def pause(self, seconds):
        try:
            time.sleep(seconds)
        except Interrupted:
            pass

    # -- one job --------------------------------------------------------------------------------
    def start_job(self, job):
        """Start a job's payload; its Execution, or None if it could not start (reported failed)."""
        return self.reported_if_failed(job, self.launch(job))

    def reported_if_failed(self, job, started):
        """`started` (what launch returned), or None once the error that kept it from starting
        is reported as the job's end."""
        if not isinstance(started, Exception):
            return started
        self.send_report(job, {"state": "failed", "exit_code": 127,
                               "errmsg": f"cannot start payload: {started}", "stderr": str(started)})
        return None

    def launch(self, job):
        """Start a job's payload: its Execution, or the error that kept it from starting."""
        hour = os.path.join(self.args.joblogdir, time.strftime("%Y%m%d-%H"))
        out_path, err_path = (os.path.join(hour, job["uuid"] + ext) for ext in (".out", ".err"))
        log.debug("job %s (%s): starting attempt %d", job["uuid"], job["name"], job["attempt"])
        try:
            execution = self.start(job, out_path, err_path)
        except (OSError, ValueError) as e:
            return e
        self.last_started = execution.started
        self.current = execution
        if self.halt is not None:       # a stop arrived while the job was being started (to finish, it runs)
            execution.stop("pilotTO", f"pilot stopping: {self.halt}", self.args.kill_grace)
        if self.next_look > execution.started + RUNNING_REPORT_DELAY:
            self.wake.set()     # the supervisor would look too late; else busy, it looks in time
        return execution

    def run_job(self, execution, room=0):
        """Wait for the payload's end and report it; the report claims the next job while the
        pilot may take `room` more, which the next request() takes without a round trip. The job
        claimed to run next (see follower) starts the moment the report has gone out, before its
        answer: its round trip runs beside the payload, and a pilot killed after the start has
        told the server that it holds that job (one killed before has not started it).
        Returns the job started, or None."""
        job = execution.job
        if execution.reaped is None:
            self.reap(execution)
        report, ended = execution.reaped
        state, exit_code, errmsg = report["state"], report["exit_code"], report["errmsg"]
        if execution.report_queued:         # the end report goes after the running report
            self.wait_for_running_report(execution)
        self.current = None
        self.log_end(job, state, exit_code, errmsg)
        following = self.follower(room)
        if following is None:
            start = None
        else:
            start = Once(lambda: None if self.too_silent() else self.launch(following))
        if state != "cancelled":    # the server already ended a cancelled one; there is nothing to report
            self.report_end(execution, report, ended, room - (following is not None),
                            following, start and (lambda answer_socket: self.reap_if_first(start(), answer_socket)))
        return self.reported_if_failed(following, start()) if start else None

    def wait_for_running_report(self, execution):
        """Until the payload's running report is sent or given up, or the reporter thread is
        gone (it crashed, see guarded, with the report still queued: looked at every second)."""
        reporter = self.threads["reporter"]
        while reporter.is_alive() and not execution.running_sent.wait(1.0):
            continue

    def reap_if_first(self, started, answer_socket):
        """While the answer to an end report travels, the payload started as it went out may
        end first (a job of a millisecond): wait for whichever comes first, and reap a payload
        that ended now, its end report read, so that report leaves the moment the answer is in.
        Without pidfds (Linux before 5.3) it is reaped after the answer, as a longer one is.
        Called again (the report sent anew on another connection), a payload reaped is left be:
        its pid may be another process's by now."""
        if not isinstance(started, Execution) or started.exited.is_set():
            return
        try:
            pidfd = os.pidfd_open(started.pid)
        except (AttributeError, OSError):
            return
        try:
            ready = select.select([answer_socket, pidfd], [], [], answer_socket.gettimeout())[0]
        finally:
            os.close(pidfd)
        if pidfd in ready:
            self.reap(started)

    def reap(self, execution):
        """Wait for the payload's end, then read what it left: execution.reaped is its end
        report (see end_report) and the monotonic time it ended."""
        outcome = self.wait(execution)
        ended = time.monotonic()
        execution.reaped = (self.end_report(execution, outcome), ended)

    def end_report(self, execution, outcome):
        """What the end report of a reaped payload says but its images, which go with the
        report: how it ended and how long it ran (from which the server dates its start, as
        the report says when it ended if it comes late), its log tails, usage, verdict and
        provenance."""
        out_path, err_path = execution.out_path, execution.err_path
        state, exit_code, errmsg = outcome
        note_wrapper_directories(out_path, execution.env)
        report = {"state": state, "exit_code": exit_code, "errmsg": errmsg,
                  "stdout": tail(out_path), "stderr": tail(err_path), "pid": execution.pid,
                  "stdout_path": out_path, "stderr_path": err_path,
                  "runtime": execution.runtime(), "usage": execution.figures}
        if state == "finished" and "quality" in self.features:     # a failed job has no verdict
            report.update(read_quality(execution.dirs_to_look_in))
        if execution.provenance:
            ran, input_sum = execution.provenance
            report["provenance"] = {**ran, "input": input_sum and input_sum.identity()}
        return report

    def report_end(self, execution, report, ended, room, following, sent=None):
        """Send the end report (see end_report), with the images the job made; it claims the
        next job while the pilot may take `room` more (see keep_claimed for `ahead`), and names
        the job `following` this one, if any. `sent(sock)`: see send_report."""
        job = execution.job
        plots = self.publish_images(job, execution)
        if plots and "provenance" in report:    # beside the plots, for whoever reads them where they lie (EOS)
            write_json(os.path.join(plots, "provenance.json"), report["provenance"])
        if execution.job_dir_empty:         # it goes, or becomes the next job's (it held no plots)
            self.empty_dir = execution.env["P3S_JOB_DIR"]
        holding = following["uuid"] if following is not None else None
        ask = room > 0 and not self.near_end_of_life() and not self.note
        ahead = ask and "ahead" in self.features and (holding is not None or room > 1)
        # never a plain claim while a job runs unreported: the server would hand that one back
        self.send_report(job, report, ask and (ahead or holding is None), ended, (ahead, holding if ahead else None),
                         sent)

    def log_end(self, job, state, exit_code, errmsg):
        """A job that did not finish is said at once; finished ones are counted, in a line every
        TALLY_EVERY seconds (a line a job was a tenth of a busy pilot's CPU)."""
        if state == "finished":
            log.debug("job %s: finished", job["uuid"])
        else:
            log.info("job %s: %s (exit code %s) %s", job["uuid"], state, exit_code, errmsg)
        self.tally[state] += 1
        if time.monotonic() - self.tallied >= TALLY_EVERY:
            self.log_tally()

    def log_tally(self):
        if self.tally:
            seconds = time.monotonic() - self.tallied
            window = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{max(1, round(seconds))} s"
            log.info("jobs ended in the last %s: %s", window,
                     ", ".join(f"{n} {state}" for state, n in sorted(self.tally.items())))
        self.tally.clear()
        self.tallied = time.monotonic()

    def report_running(self, execution):
        """Best effort, in the reporter thread: the payload is supervised whether or not this
        arrives (the server takes an end report for a job it still has as dispatched). A refusal
        means the job was cancelled or given away meanwhile: stop the payload, if it still runs. A
        payload that ends within RUNNING_REPORT_DELAY is not reported running: its end report says
        it all."""
        report = {"state": "running", "pid": execution.pid, "pilot": self.uuid,
                  "attempt": execution.job["attempt"], "stdout_path": execution.out_path,
                  "stderr_path": execution.err_path, "runtime": execution.runtime()}
        try:
            self.client.report(execution.job["uuid"], report, retry_for=RUNNING_REPORT_RETRY)
        except P3SError as e:
            if e.bad_input and not execution.exited.is_set():
                execution.stop("cancelled", str(e), self.args.kill_grace)
            else:
                log.warning("job %s: running report not delivered: %s", execution.job["uuid"], e)

    def start(self, job, out_path, err_path):
        command, shell = payload_command(job, self.args.shell)
        job_dir = os.path.join(os.path.dirname(out_path), job["uuid"])
        env = payload_env(self.inherited_env, self.site_env, job, self.uuid, job_dir)
        make_job_dir(job_dir, self.empty_dir)
        self.empty_dir = None
        if job["env"].get("P3S_MODE", "").upper() == "COPY" and not shell:
            command = copy_payload(command, job_dir)
        pid = spawn(command, shell, env, out_path, err_path)
        self.watchdog.watch(pid)
        execution = Execution(job, pid, out_path, err_path, env)
        if self.provenance:     # once it runs: its start waits for no hashing
            execution.provenance = self.provenance.start(command, shell, env, job["env"])
        execution.shell = shell
        execution.limits = {k: job.get(k) or self.site_limits.get(k) for k in ("memory", "disk")}
        return execution

    def publish_images(self, job, execution):
        """Send the server the images the job made, so its page shows them even where the
        server cannot read the worker's disk. Best effort: a refusal never fails the job.
        Returns the directory of the first one published (None if none was)."""
        images = images_to_publish(execution.env, execution.dirs_to_look_in, self.image_limits["max_bytes"])
        published = []
        for name, path in images:
            if len(published) == self.image_limits["max_count"]:
                log.warning("job %s: %d more image(s) not published: a job publishes at most %d", job["uuid"],
                            len(images) - images.index((name, path)), len(published))
                break
            try:
                with open(path, "rb") as f:
                    self.client.publish_image(job["uuid"], name, f.read(), self.uuid)
                published.append(path)
            except (OSError, P3SError) as e:
                log.warning("job %s: image %s not published: %s", job["uuid"], path, e)
                if isinstance(e, P3SError) and not e.bad_input:
                    break       # the server is away: the end report matters more than the images
        return os.path.dirname(published[0]) if published else None

    def wait(self, execution):
        """Wait for the payload (the supervisor enforces its time limit meanwhile); (state, exit
        code, message). The wait blocks in waitpid and returns the moment the payload exits."""
        _, status, rusage = os.wait4(execution.pid, 0)      # the kernel's account comes with it
        code = os.waitstatus_to_exitcode(status)
        execution.exited.set()
        usage = execution.usage
        # processes the payload left behind: accounted from a last look (only for a job the
        # sampler saw; a short job costs no /proc scan), then killed with the group
        spared = self.watchdog.pids()
        escaped = escaped_children(spared)
        stragglers = usage.survivors(execution.pid, spared) if usage.sampled or escaped else []
        kill_group(execution.pid, signal.SIGKILL)     # leave no stray children behind
        kill_escaped(set(stragglers) | escaped)
        self.watchdog.release(execution.pid)
        job_dir = execution.env["P3S_JOB_DIR"]
        execution.job_dir_empty = is_empty_dir(job_dir)     # one look: most short jobs leave nothing
        execution.figures = usage.figures(rusage, stragglers, 0 if execution.job_dir_empty else tree_size(job_dir))
        if execution.stop_reason:
            state, errmsg = execution.stop_reason
            return state, code, errmsg
        if code == -signal.SIGKILL and time.monotonic() - self.last_contact > self.fence_after():
            return "pilotTO", code, "killed by the watchdog: no answer from the server for the job's lease"
        if code == 0:
            return "finished", 0, left_behind(escaped)
        if code == -signal.SIGKILL or (code == 128 + signal.SIGKILL and execution.shell):
            seen = f"last seen using {usage.last_mb:,.0f} MB" if usage.sampled else "ended before any sample"
            return "failed", code, f"killed by SIGKILL, not by p3s: out of memory? ({seen})"
        return "failed", code, (f"killed by signal {-code}" if code < 0 else f"exit code {code}")

    def supervise_loop(self):
        """One thread for the pilot's life watches the running payload: its running report once
        it outlasts RUNNING_REPORT_DELAY (handed to the reporter thread, so a server away never
        delays the rest), its time limit, and once a second its process group's memory, CPU and
        I/O against its limits. A short job costs no thread and no /proc scan, and, among short
        jobs in a row, no wake-up either: the supervisor is woken for a payload only if it would
        otherwise look later than the payload's running report is due."""
        while not self.beats.is_set():
            self.wake.clear()                   # before reading `current`: no wake-up is lost
            execution = self.current
            idle = execution is None or execution.exited.is_set()
            self.next_look = self.idle_look() if idle else self.supervise(execution)
            if self.current is execution:       # else a payload started meanwhile: look at it now
                self.wake.wait(max(0.0, self.next_look - time.monotonic()))

    def idle_look(self):
        """When a supervisor with no payload to watch looks next: when the running report of the
        payload started last would be due, while that is to come, else in SAMPLE_PERIOD. Every
        payload started since is due later, so none of a stream of short jobs wakes it (see
        launch): it looks every RUNNING_REPORT_DELAY, where it was woken by nearly every job
        of a busy node, whose payload had ended before the supervisor ran."""
        t = time.monotonic()
        due = self.last_started + RUNNING_REPORT_DELAY
        return due if due > t else t + SAMPLE_PERIOD

    def supervise(self, execution):
        """Do what is due for the running payload; the monotonic time of the next thing due."""
        t = time.monotonic()
        age, limit = t - execution.started, execution.job["timelimit"]
        if not execution.report_queued and age >= RUNNING_REPORT_DELAY:
            execution.running_sent = threading.Event()      # before report_queued: the main thread waits on it
            execution.report_queued = True
            self.running_reports.put(execution)
        if limit and age >= limit:
            execution.stop("timeout", f"killed at its time limit of {limit} s", self.args.kill_grace)
        if t >= execution.next_sample:
            execution.next_sample = t + SAMPLE_PERIOD
            with contextlib.suppress(OSError):
                self.check_limits(execution, execution.usage.sample(execution.pid, self.watchdog.pids()))
        due = [execution.next_sample] + ([execution.started + limit] if limit and age < limit else [])
        if not execution.report_queued:
            due.append(execution.started + RUNNING_REPORT_DELAY)
        return min(due)

    def report_loop(self):
        """The running reports, one at a time, for the pilot's life (see report_running). A job
        that runs this long gives back the job claimed to run after it: that one must not wait."""
        while True:
            execution = self.running_reports.get()
            try:
                if not execution.exited.is_set():
                    self.release_claimed(f"job {execution.job['uuid']} runs long")
                    self.report_running(execution)
            finally:
                execution.running_sent.set()

    def check_limits(self, execution, memory_mb):
        """Stop a payload past its memory or disk limit, with a reason a person understands."""
        memory, disk = execution.limits.get("memory"), execution.limits.get("disk")
        if memory and memory_mb > memory:
            execution.stop("failed", f"used {memory_mb:,.0f} MB, over its memory limit of {memory:,} MB",
                           self.args.kill_grace)
        if disk:
            written = tree_size(execution.env["P3S_JOB_DIR"]) / 2 ** 20
            if written > disk:
                execution.stop("failed", f"wrote {written:,.0f} MB to its directory, over its disk limit of "
                                         f"{disk:,} MB", self.args.kill_grace)

    # -- claimed ahead: the next job starts as soon as the report of the one before is sent ----
    def follower(self, room):
        """The job claimed to run next (a reserve: see keep_claimed), to start as the pilot goes
        on and may take `room` more, and is fit for it (the checks of the work loop's turn,
        which a run of jobs in reserve does not take); None otherwise (what it holds is given
        back when it leaves or stops taking jobs)."""
        if room < 1 or self.exit_reason is not None or self.dropped or \
                (self.life_end is not None and time.monotonic() >= self.life_end):
            return None
        self.keep_disk_clean()
        if self.unfit():
            return None
        return self.take_claimed()

    def keep_claimed(self, answer):
        """The jobs an end report claimed, in order, and the directive that came with it. With
        `ahead`, a busy pilot keeps one job in reserve: the moment a payload ends, it reports it,
        holding the reserve, which starts once the report has gone out (run_job), and the report
        claims the next reserve (where the server grants one: Broker.claim). A reserve is given back
        at once if the job running now already runs long (see report_loop)."""
        if not answer:
            return
        if answer.get("directive"):
            self.obey(answer["directive"], f"{answer['directive']} requested by the server", self.current)
        jobs = [job for job in (answer.get("job"), answer.get("reserve")) if job]
        if jobs:
            with self.claim_lock:
                self.claimed.extend(jobs)
            execution = self.current
            if execution is not None and execution.report_queued:
                self.release_claimed(f"job {execution.job['uuid']} runs long")

    def take_claimed(self):
        """The next job claimed for this pilot, to start now; None if there is none, or if the
        server has been silent so long that it may have given it away (forget_claims_if_silent)."""
        with self.claim_lock:
            self.forget_claims_if_silent(time.monotonic())
            return self.claimed.popleft() if self.claimed else None

    def keep_unstarted(self, job):
        """A job this pilot will not start, given back with those claimed ahead (release_claimed)."""
        with self.claim_lock:
            self.claimed.appendleft(job)

    def release_claimed(self, why):
        """Give back the jobs claimed and not started (and those a failed attempt kept), so that
        another pilot takes them now; those the server cannot be told of are kept for later."""
        with self.claim_lock:
            jobs = self.unreleased + list(self.claimed)
            self.claimed.clear()
            self.unreleased = []
        for job in jobs:
            try:
                self.client.release_job(self.uuid, job["uuid"], retry_for=RUNNING_REPORT_RETRY)
                log.debug("job %s: given back unstarted (%s)", job["uuid"], why)
            except P3SError as e:
                if e.bad_input:
                    continue    # not ours any more
                log.warning("job %s: claimed ahead, not started, not given back yet: %s", job["uuid"], e)
                with self.claim_lock:
                    self.unreleased.append(job)

    def send_report(self, job, report, ask_next=False, ended=None, ahead=(False, None), sent=None):
        """Deliver an end report, retried until the server accepts or refuses it. With
        `ask_next` (and no reason to stop), it also claims the pilot's next job; `ahead`
        (whether to keep one in reserve, the job held): see report_end. `ended`: the monotonic
        time the job ended (now if not given). `sent(sock)`: called once the report has gone out,
        before its answer (at each attempt: see run_job)."""
        report.update(pilot=self.uuid, attempt=job["attempt"])
        ended = time.monotonic() if ended is None else ended
        keep, holding = ahead
        while True:
            for key in CLAIM_KEYS:
                report.pop(key, None)
            if ask_next and self.exit_reason is None and not self.dropped:
                report.update(next=True, **({"ahead": True} if keep else {}), **({"holding": holding} if holding else {}))
            try:    # retried for 10 s, then the loop below
                answer = self.client.report(job["uuid"], report, retry_for=10,
                                            before_each=lambda r: self.date_if_late(r, ended), sent=sent)
                self.heard_from_server()
                self.keep_claimed(answer.get("next"))
                return answer
            except P3SError as e:
                if e.bad_input:
                    log.warning("job %s: report refused: %s", job["uuid"], e)
                    return None
                stopping_for = time.monotonic() - (self.stopped_at or float("inf"))
                if stopping_for > STOPPING_REPORT_GRACE * self.args.kill_grace:
                    self.leave(job, report, ended)
                    return None
                log.warning("job %s: server unreachable, keeping the report: %s", job["uuid"], e)
                time.sleep(OUTAGE_PAUSE)

    def date_if_late(self, report, ended):
        """A report that comes LATE_REPORT or more after its job ended (the server was away) says
        how long ago, so the server dates the job's end, and a short job's start, by when it
        happened rather than by when it heard."""
        late = time.monotonic() - ended
        if late >= LATE_REPORT and "ended_ago" in self.features:
            report["ended_ago"] = round(late, 3)
        return report

    def leave(self, job, report, ended):
        """Told to stop, with an end report the server cannot take: left in the job log directory
        for the next pilot there (see deliver_left_reports), else the job ends at its lease."""
        for key in CLAIM_KEYS + ("ended_ago",):     # the file has the wall-clock time instead
            report.pop(key, None)
        ended_at = time.time() - (time.monotonic() - ended)
        try:
            path = leave_report(self.args.joblogdir, job["uuid"], self.uuid, self.client.pilot_secrets[self.uuid],
                                report, ended_at)
        except OSError as e:
            log.warning("job %s: end report not delivered (server unreachable) nor kept (%s); leaving: the "
                        "server ends the job when its lease runs out", job["uuid"], e)
            return
        self.left_reports.append(path)
        log.warning("job %s: end report not delivered (server unreachable) and this pilot was told to stop: "
                    "leaving it in %s for the next pilot of this job log directory", job["uuid"], path)

    # -- heartbeats, signals --------------------------------------------------------------------
    def heartbeat_loop(self):
        beat = self.settings["heartbeat"]
        while not self.beats.wait(beat):
            execution = self.current
            job = execution.job["uuid"] if execution else None
            try:
                directive = self.client.heartbeat(self.uuid, job, retry_for=0, timeout=max(1.0, beat),
                                                  free_mb=free_mb(self.args.joblogdir), note=self.note)["directive"]
                self.heard_from_server()
                log.debug("heartbeat (job %s): directive %s", job, directive)
            except P3SError as e:
                if e.status in (404, 409):
                    self.dropped = str(e)
                    self.obey("kill", f"server dropped this pilot: {e}", execution)
                else:
                    self.fence(execution)
                    log.warning("heartbeat failed: %s", e)
                continue
            if directive:
                self.obey(directive, f"{directive} requested by the server", execution)

    def fence(self, execution):
        """Kill the payload when the server has been silent so long that it may give the job to
        another pilot: a partition must never run a job twice at once."""
        silent = time.monotonic() - self.last_contact
        if execution and silent > self.fence_after():
            execution.stop("pilotTO", f"no answer from the server for {silent:.0f} s: the job's lease of "
                                      f"{self.lease:g} s runs out, so it may run elsewhere", self.args.kill_grace)

    def obey(self, directive, why, execution):
        """Act on a server directive: kill the job, drain, or stop the pilot."""
        log.info("%s", why)
        if directive in ("stop", "drain"):
            self.exit_reason = self.exit_reason or why
        if directive == "stop":
            self.halt = self.halt or why
        if execution and directive in ("kill", "stop"):
            state = "pilotTO" if directive == "stop" else "cancelled"
            execution.stop(state, why, self.args.kill_grace)

    def on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        self.exit_reason = self.exit_reason or f"{name} received"
        if signum != signal.SIGUSR1:
            self.stopped_at = self.stopped_at or time.monotonic()
            self.halt = self.halt or f"{name} received"
            execution = self.current
            if execution:
                execution.stop("pilotTO", f"pilot stopped by {name}", self.args.kill_grace)
        if self.idle:
            raise Interrupted()


def node_name():
    """This node's name as pgen.sh/preport.sh see it: $P3S_NODE, else the host name."""
    return os.environ.get("P3S_NODE") or socket.gethostname().split(".")[0]


def mark_pilots(client, args):
    selectors = {"uuid": args.uuid, "site": args.site or None, "host": args.host, "state": args.pilot_state}
    marked = client.mark_pilots("drain" if args.drain else "stop",
                                **{k: v for k, v in selectors.items() if v is not None})
    print(f"{'drain' if args.drain else 'stop'}: {len(marked)} pilot(s) marked")
    for uuid in marked:
        print(uuid)
    return 0


def read_preport(lines):
    """preport.sh -v output (pdsh prefixes allowed) -> (hosts checked, [(host, pid, uuid)])."""
    hosts, pilots = set(), []
    for line in lines:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "host" not in fields:
            continue
        hosts.add(fields["host"])
        if "pid" in fields:
            pilots.append((fields["host"], fields["pid"], fields.get("uuid", "-")))
    return hosts, pilots


def fleet_check(client, args):
    """Compare the server's live pilots with what preport.sh -v found on the nodes."""
    source = sys.stdin if args.fleet_check == "-" else open(args.fleet_check)
    with source:
        hosts, found = read_preport(source)
    live = [p for p in client.list_pilots(limit=10000) if p["state"] in LIVE_STATES and p["host"] in hosts]
    # a process is a pilot by its uuid (from its pgen.sh log) or, when it logs elsewhere (-l DIR,
    # P3S_PILOTLOG), by its node and pid, which it registered with
    on_nodes = {uuid for _, _, uuid in found} | {(host, pid) for host, pid, _ in found}
    gone = [p for p in live if p["uuid"] not in on_nodes and (p["host"], str(p["pid"])) not in on_nodes]
    known = {p["uuid"] for p in live} | {(p["host"], str(p["pid"])) for p in live}
    strangers = [f for f in found if f[2] not in known and (f[0], f[1]) not in known]
    print(f"checked {len(hosts)} node(s): {len(found)} pilot process(es), {len(live)} live on the server")
    for p in gone:
        print(f"GONE     {p['host']} {p['uuid']} pid {p['pid']}: the server thinks it is {p['state']}, "
              "no such process on its node")
    for host, pid, uuid in strangers:
        print(f"UNKNOWN  {host} {uuid} pid {pid}: running, but not a live pilot on the server")
    if not gone and not strangers:
        print("OK: the server and the nodes agree")
    return 1 if gone or strangers else 0


def read_json(path, option):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise InputError(f"{option} {path}: {e.strerror}") from None
    except ValueError as e:
        raise InputError(f"{option} {path}: malformed JSON: {e}") from None


def try_jobs(client, args):
    """pilot.py --try FILE: run each job of FILE here, now, with the environment a pilot would
    give it (the site's env from -j SITE.json or the server's site -s, the P3S_* values, the
    input file -f), its output on this terminal: how a payload author tests a wrapper before
    submitting it (the original's testwrapper.py). No job is stored, no pilot registers."""
    jobs = read_json(args.try_file, "--try")
    jobs = jobs if isinstance(jobs, list) else [jobs]
    site_env = {}
    if args.site_file:
        site = read_json(args.site_file, "-j")
        if not isinstance(site, dict) or not isinstance(site.get("env", {}), dict):
            raise InputError(f"-j {args.site_file}: expected a site object, with env an object")
        site_env = site.get("env", {})
    elif args.site:
        site_env = client.get_site(args.site, retry_for=CHECK_RETRY).get("env", {})
    worst = 0
    for number, fields in enumerate(jobs):
        if not isinstance(fields, dict) or not isinstance(fields.get("payload"), str):
            raise InputError(f"--try {args.try_file}: job {number} has no payload")
        if not isinstance(fields.get("env") or {}, dict):
            raise InputError(f"--try {args.try_file}: job {number}: env must be an object of NAME: value")
        job = {"uuid": str(uuidlib.uuid4()), "payload": fields["payload"], "params": str(fields.get("params", "")),
               "env": {k: str(v) for k, v in (fields.get("env") or {}).items()},
               "infile": args.input_file or str(fields.get("infile", ""))}
        job_dir = tempfile.mkdtemp(prefix=f"p3s-try-{job['uuid'][:8]}-")
        env = payload_env(os.environ, site_env, job, "local-try", job_dir)
        env = {k: v for k, v in env.items() if not k.startswith("P3S_TOKEN")}
        command, shell = payload_command(job, args.shell)
        print(f"--- {fields.get('name') or 'job'} {number}: {command}  (P3S_JOB_DIR={job_dir})", flush=True)
        code = try_one(command, shell, env)
        images = [path for _, path in images_to_publish(env, own_directories(env), IMAGE_LIMITS["max_bytes"])]
        if code is not None:
            print(f"--- exit code {code}; a pilot would publish {len(images)} image(s)"
                  + "".join(f"\n    {p}" for p in images), flush=True)
        with contextlib.suppress(OSError):      # as a pilot does: the job's directory goes if empty
            os.rmdir(job_dir)
        worst = worst or (3 if code != 0 else 0)
    return worst


def try_one(command, shell, env):
    """Run one payload here and wait for it: its exit code, or None (said on stderr) when it
    cannot even start, which is what --try is for: a payload path that is wrong on this node."""
    try:
        pid = spawn(command, shell, env)
    except OSError as e:
        print(f"--- cannot start the payload: {e.strerror}: {e.filename or command}; a pilot would "
              "report it failed (exit code 127)", file=sys.stderr, flush=True)
        return None
    try:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    finally:
        kill_group(pid, signal.SIGKILL)       # as a pilot does: no stray child outlives it


def define_site(client, args):
    """Store a site: from -j FILE (the original's site JSON, unchanged), else from the flags."""
    if args.site_file:
        fields = read_json(args.site_file, "-j")
        if not isinstance(fields, dict) or not isinstance(fields.get("name", args.site), str):
            raise InputError(f"-j {args.site_file}: expected a site object with a name")
        name = args.site or fields.get("name", "")
        if not name:
            raise InputError(f"-j {args.site_file}: the site has no name; give one with -s NAME")
    else:
        name = args.site
        fields = {"period": args.period, "cycles": args.cycles, "heartbeat": args.heartbeat,
                  "pilots": args.pilots, "pilotlife": args.pilot_life,
                  "env": dict(item.split("=", 1) for item in args.site_env)}
    print(format_sites([client.define_site(name, **fields)]))
    return 0


SITE_COLUMNS = ("name", "pilots", "pilotlife", "period", "cycles", "heartbeat", "server", "env")


def format_sites(sites):
    """Sites as a table: env as JSON, unset fields as empty cells."""
    shown = [{c: json.dumps(s[c]) if c == "env" and s[c] else None if c == "env" else
              f"{s[c]:g}" if isinstance(s[c], float) else s[c] for c in SITE_COLUMNS} for s in sites]
    return format_table(shown, SITE_COLUMNS)


USAGE_TEXT = """job states:
  template    held until adjusted to defined
  defined     waiting for a pilot
  dispatched  claimed by a pilot, not started yet
  running     its payload runs
  finished    the payload exited with code 0
  failed      the payload exited with a non-zero code (its reason: the last stderr line)
  timeout     killed at its time limit
  pilotTO     its pilot died, was stopped, or lost the server for its whole lease
  cancelled   cancelled by a user, or with its workflow
exit codes of a payload: as the payload gave them; -N when killed by signal N (-9 SIGKILL, -15 SIGTERM)
exit codes of pilot.py: 0 done or stopped, 2 bad options or an undefined site, 1 the server unreachable"""


def check_site(client, site):
    """pilot.py --check: refuse at once what every pilot started with these options would
    refuse later, alone in its log (pgen.sh runs it before starting N pilots)."""
    if site:
        try:
            client.get_site(site, retry_for=CHECK_RETRY)
        except P3SError as e:
            if e.status == 404:
                raise InputError(f"site {site!r} is not defined on {client.server} "
                                 "(define it first: pilot.py --define-site -s SITE ...)") from None
            print(f"pilot.py: {e}; the site is not checked, the pilots will retry", file=sys.stderr)
    print(f"ok: pilot options checked{f', site {site!r} defined' if site else ''}")
    return 0


def list_sites(client):
    sites = client.list_sites()
    print(format_sites(sites) if sites else "no sites defined (pilot.py --define-site -s NAME ...)")
    return 0


def delete_site(client, args):
    client.delete_site(args.site)
    print(f"deleted site {args.site}")
    return 0


def setup_logging(args):
    """The pilot's log: stderr, or with -l DIR the file DIR/<pilot uuid>.log (as the original)."""
    args.pilot_uuid, args.logfile = str(uuidlib.uuid4()), None
    handler = logging.StreamHandler(sys.stderr)
    if args.logdir:
        os.makedirs(args.logdir, exist_ok=True)
        args.logfile = os.path.abspath(os.path.join(args.logdir, f"{args.pilot_uuid}.log"))
        handler = logging.FileHandler(args.logfile)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler],
                        format="%(asctime)s pilot[%(process)d] %(levelname)s: %(message)s")


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args)
    return run_cli("pilot.py", lambda: act(args, Client(args.server)))


def act(args, client):
    if args.usage:
        print(USAGE_TEXT)
        return 0
    if args.check:
        return check_site(client, args.site)
    if args.try_file:
        return try_jobs(client, args)
    if args.kill:
        return mark_pilots(client, args)
    if args.fleet_check:
        return fleet_check(client, args)
    if args.define_site:
        return define_site(client, args)
    if args.sites:
        return list_sites(client)
    if args.delete_site:
        return delete_site(client, args)
    pilot = Pilot(args, client)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, pilot.on_signal)
    return pilot.run()


if __name__ == "__main__":
    sys.exit(main())
