#!/usr/bin/env python3
"""p3s injector: start work automatically when new data files land in a directory.

    python injector.py -d /data/np04 -g 'run*.root' --dag dqm-chain      # one workflow per file
    python injector.py -d /data/np04 -g '*.txt' -j check.json -c 0       # one job per file
    python injector.py --from-command 'xrdfs eospublic ls -l /eos/np04' -j check.json   # a listing

A file counts as new once its size and modification time have not changed for --settle seconds
(so half-written files are left alone). The server registers each file once, by directory and
name, in the same transaction that creates its work: restarting the injector, or running two on
the same directory, never starts a file's work twice.

With --dag the file is bound to the root vertices' input edges (file policy inherit:PATH) and
the workflow starts at once. With -j every job in the file is submitted with infile and
P3S_INPUT_FILE set to the file's path. With --from-command the files are the lines a command
prints (a catalogue query, `xrdfs ls`: closed files, taken at once), run every period. A DAQ or
transfer script may also post a file as it closes (no polling): POST /api/inject with its name,
dirpath and an injector's template (see docs/api.md).
"""
import fnmatch
import logging
import os
import socket
import sys
import time
import uuid as uuidlib

from job import read_job_file
from workflow import structured
from serverAPI import (ArgumentParser, add_verbosity, Client, InputError, P3SError, retire, run_bounded, run_cli,
                       stop_on_sigterm)

log = logging.getLogger("p3s.injector")


def parse_args(argv):
    p = ArgumentParser(description="Start p3s work for new files in a directory.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-d", "--dir", help="directory to watch")
    source.add_argument("--from-command", metavar="COMMAND",
                        help="the files are the absolute paths this shell command prints, one a line, run every "
                        "period (a catalogue query, `xrdfs ls`); a file listed is taken at once")
    p.add_argument("-g", "--glob", default="*", help="file name pattern (default *)")
    work = p.add_mutually_exclusive_group(required=True)
    work.add_argument("-w", "--dag", help="create one workflow of this DAG per new file")
    work.add_argument("-j", "--jobs", metavar="FILE", help="submit the jobs in FILE (JSON) per new file")
    p.add_argument("-p", "--period", type=float, default=10, help="seconds between scans (default 10)")
    p.add_argument("-c", "--cycles", type=int, default=0, help="scans before exiting (0 = forever; default 0)")
    p.add_argument("--settle", type=float, default=5, metavar="SECONDS",
                   help="a file is new once its size and mtime are unchanged this long (default 5)")
    p.add_argument("--min-size", type=int, default=0, metavar="BYTES", help="ignore smaller files")
    p.add_argument("--prefix", default="", help="only names starting with this")
    p.add_argument("--min-age", type=float, default=0, metavar="SECONDS",
                   help="ignore files modified less than this long ago (default 0)")
    p.add_argument("--max-age", type=float, default=0, metavar="SECONDS",
                   help="ignore files modified longer ago than this (0 = no limit)")
    p.add_argument("--datatype", default="", help="datatype recorded with each file (e.g. ROOT)")
    p.add_argument("--outdir", metavar="DIR",
                   help="with --dag: the workflow's output files go to DIR instead of the GraphML's dirpaths")
    p.add_argument("-f", "--fileinfo",
                   help="with --dag: file names as for workflow.py -a -f (default inherit:<the new file>)")
    p.add_argument("--bare-name", nargs="?", const="data", choices=("data", "dir"), metavar="SHAPE",
                   help="with -j: export P3S_INPUT_FILE as the bare file name and P3S_INPUT_DIR for the "
                   "original's wrappers: 'data' (the default) for $P3S_DATA/$P3S_INPUT_DIR/$P3S_INPUT_FILE, "
                   "P3S_INPUT_DIR relative to the P3S_DATA the job will have (its env, else its site's; "
                   "for a job naming neither, the pilot's site's, made relative when it runs); "
                   "'dir' for $P3S_INPUT_DIR/$P3S_INPUT_FILE, P3S_INPUT_DIR absolute")
    p.add_argument("-S", "--server", help="server URL (default $P3S_SERVER or http://127.0.0.1:8000)")
    add_verbosity(p, "log every scan")
    args = p.parse_args(argv)
    if min(args.period, args.cycles, args.settle, args.min_age, args.max_age, args.min_size) < 0:
        p.error("--period, --cycles, --settle, --min-age, --max-age and --min-size must not be negative")
    if args.dir and not os.path.isdir(args.dir):
        p.error(f"-d {args.dir}: not a directory")
    if args.from_command and args.bare_name:
        p.error("--bare-name goes with -d (the directory its jobs read from)")
    if (args.outdir or args.fileinfo) and not args.dag:
        p.error("--outdir and -f go with --dag")
    if args.bare_name and not args.jobs:
        p.error("--bare-name goes with -j FILE")
    return args


class Watcher:
    """Tracks candidate files between scans and says which have settled."""

    def __init__(self, args):
        self.args = args
        self.seen = {}          # name -> (size, mtime, monotonic time that signature was first seen)
        self.done = set()       # paths the server has answered for (registered now or before)

    def ready(self):
        """(path, size) of the files to start now: settled ones of the directory, or those the
        command lists."""
        if self.args.from_command:
            return [(path, 0) for path in listed(self.args.from_command, self.args.period)
                    if path not in self.done and fnmatch.fnmatch(os.path.basename(path), self.args.glob)
                    and os.path.basename(path).startswith(self.args.prefix)]
        top = os.path.abspath(self.args.dir)
        return [(os.path.join(top, name), size) for name, size in self.settled()]

    def candidates(self):
        a = self.args
        wall = time.time()
        for entry in os.scandir(a.dir):
            if not entry.is_file() or os.path.join(os.path.abspath(a.dir), entry.name) in self.done:
                continue
            if not fnmatch.fnmatch(entry.name, a.glob) or not entry.name.startswith(a.prefix):
                continue
            st = entry.stat()
            age = wall - st.st_mtime
            if st.st_size < a.min_size or age < a.min_age or (a.max_age and age > a.max_age):
                continue
            yield entry.name, st

    def settled(self):
        """Names whose size and mtime have held still for --settle seconds."""
        t = time.monotonic()
        ready, current = [], {}
        for name, st in self.candidates():
            signature = (st.st_size, st.st_mtime_ns)
            first = self.seen.get(name)
            since = first[2] if first and first[:2] == signature else t
            current[name] = (*signature, since)
            if t - since >= self.args.settle:
                ready.append((name, st.st_size))
        self.seen = current
        return sorted(ready)


def listed(command, period):
    """The absolute paths a command prints, one a line (others are ignored); a failing or hung
    command (killed with its children) is an error the scan reports (P3SError: the injector goes on)."""
    timeout = max(10.0, period)
    try:
        ran = run_bounded(["/bin/sh", "-c", command], timeout)
    except OSError as e:
        raise P3SError(f"--from-command: {e}") from None
    if ran.code is None:
        raise P3SError(f"--from-command: still running after {timeout:g} s: killed with its children")
    if ran.code != 0:
        raise P3SError(f"--from-command: exit code {ran.code}: {ran.said[:200]}")
    return [line.split()[-1] for line in ran.output.splitlines() if line.split() and line.split()[-1].startswith("/")]


def input_dirs(client, args, jobs):
    """For --bare-name: each job's P3S_INPUT_DIR. 'dir': the watched directory. 'data': the
    watched directory relative to the P3S_DATA the job will run with (its own env's, else its
    site's), which the directory must lie under; said at start, in one line, if it does not."""
    inbox = os.path.abspath(args.dir)
    if args.bare_name == "dir":
        return [inbox] * len(jobs)
    site_data = {}
    dirs = []
    for job in jobs:
        env = job.get("env") if isinstance(job.get("env"), dict) else {}
        site = job.get("site") or ""
        if "P3S_DATA" not in env and site and site not in site_data:
            site_data[site] = client.get_site(site).get("env", {}).get("P3S_DATA", "")
        data = env.get("P3S_DATA", site_data.get(site, ""))
        if not data:
            dirs.append(inbox)        # made relative to its P3S_DATA by the pilot that runs it
            continue
        relative = os.path.relpath(inbox, os.path.abspath(data))
        if relative == ".." or relative.startswith("../"):
            raise InputError(f"--bare-name data: -d {inbox} is not under P3S_DATA={data} (of "
                             f"{'the job' if 'P3S_DATA' in env else 'site ' + repr(site)}), so "
                             "$P3S_DATA/$P3S_INPUT_DIR cannot name it; watch a directory under it, or use "
                             "--bare-name dir for wrappers that read $P3S_INPUT_DIR/$P3S_INPUT_FILE")
        dirs.append("" if relative == "." else relative)
    return dirs


def work_for(args, jobs, path, dirs=None):
    """The inject request body's work part, with the template it is registered under (a file
    is started once per template, so injectors with different templates share a directory)."""
    if args.dag:
        work = {"dag": args.dag, "template": f"dag:{args.dag}", "outdir": args.outdir}
        if args.fileinfo:
            work["fileinfo"] = structured(args.fileinfo, "-f")
        return {k: v for k, v in work.items() if v is not None}
    bound = []
    for job, input_dir in zip(jobs, dirs or [None] * len(jobs)):
        env = job.get("env", {})
        inputs = ({"P3S_INPUT_FILE": os.path.basename(path), "P3S_INPUT_DIR": input_dir}
                  if args.bare_name else {"P3S_INPUT_FILE": path})
        if args.bare_name == "data" and os.path.isabs(input_dir):
            inputs["P3S_INPUT_DIR_BASE"] = "P3S_DATA"     # the pilot knows the P3S_DATA it runs with
        bound.append({**job, "uuid": str(uuidlib.uuid4()), "infile": path,
                      "env": {**env, **inputs} if isinstance(env, dict) else env})
    return {"jobs": bound, "template": "jobs:" + os.path.abspath(args.jobs)}


def scan(client, watcher, args, jobs, dirs):
    """Start the work of every settled file; one summary line when anything was seen."""
    started = skipped = 0
    for path, size in watcher.ready():
        answer = client.inject(name=os.path.basename(path), dirpath=os.path.dirname(path), size=size,
                               datatype=args.datatype, **work_for(args, jobs, path, dirs))
        watcher.done.add(path)
        if answer["registered"]:
            started += 1
            print(f"{path} {answer.get('workflow') or ' '.join(answer['jobs'])}", flush=True)
        else:
            skipped += 1
            log.info("%s: registered before for this template, skipped", path)
    if started or skipped:
        print(f"injector: scan of {args.dir or args.from_command}: {started} file(s) started, {skipped} skipped "
              "(started before with this template)", file=sys.stderr, flush=True)
    return f"{started} started, {skipped} skipped"


def service_name(args):
    """How this injector appears on /services: what it watches, for which work."""
    work = f"dag {args.dag}" if args.dag else f"jobs {os.path.basename(args.jobs)}"
    return f"injector {os.path.abspath(args.dir) if args.dir else args.from_command[:80]} ({work})"


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s injector %(levelname)s: %(message)s")
    stop_on_sigterm()
    return run_cli("injector.py", lambda: watch(args))


def watch(args):
    """Scan every --period seconds, --cycles times (0 = until interrupted)."""
    jobs = read_job_file(args.jobs) if args.jobs else None
    client = Client(args.server)
    watcher = Watcher(args)
    dirs = input_dirs(client, args, jobs) if args.bare_name else None
    cycle = 0
    try:
        while True:
            cycle += 1
            try:
                result = scan(client, watcher, args, jobs, dirs)
                client.service_beat(service_name(args), args.period, result, socket.gethostname())
            except P3SError as e:
                if e.bad_input:
                    raise
                log.warning("scan %d: %s; will retry", cycle, e)
            if args.cycles and cycle >= args.cycles:
                break
            time.sleep(args.period)
    except KeyboardInterrupt:
        pass
    retire(client, service_name(args))
    return 0



if __name__ == "__main__":
    sys.exit(main())
