#!/usr/bin/env python3
"""p3s job tool: submit jobs from a JSON file, list, show, adjust and delete them.

    python job.py -j myjob.json              # submit; prints one uuid per line
    python job.py -j myjob.json --wait       # ... and wait until they end
    python job.py --list --state failed
    python job.py --show UUID
    python job.py -a -u UUID -s cancelled    # or -P 10 to change the priority
    python job.py -d -u UUID
    python job.py --resume purity -m "release v10_02 fixed the crash"   # paused by the breaker
    python job.py --note run:5012 -m "HV trip at 14:02, ignore" --hide

Exit codes: 0 success, 2 bad input (including a request the server refused), 1 server or
network failure, and with --wait 3 when a job did not finish with exit code 0.
"""
import argparse
import hashlib
import json
import os
import sys
import time
import uuid as uuidlib
from urllib.parse import quote

from serverAPI import ArgumentParser, add_verbosity, Client, InputError, P3SError, format_table, run_cli

# the original's options p3s does not keep, each with the p3s way
UNSUPPORTED = {
    "-i": "jobs have no numeric ids; use -u UUID (job.py --list shows them)",
    "-U": "the usage notes are in --help and the README's walk-through",
}
END_STATES = ("finished", "failed", "timeout", "pilotTO", "cancelled")
WAIT_FAILED = 3     # --wait's exit status when a job did not finish with exit code 0
LIST_COLUMNS = ("uuid", "state", "jobtype", "priority", "exit_code", "name", "input", "reason")


def parse_args(argv):
    p = ArgumentParser(description="Submit and manage p3s jobs.",
                       env=[("P3S_INPUT_FILE", "the input file of jobs submitted without -f")],
                       exits=[("3", "with --wait: a job did not finish with exit code 0 (its reason is printed)")])
    p.add_argument("-j", "--job-file", dest="jobfile", metavar="FILE",
                   help="submit the jobs in FILE (a JSON list of job objects, or one object), or given "
                   "inline as a JSON string")
    p.add_argument("-f", "--file", dest="infile", metavar="NAME[,NAME...]",
                   help="input file(s): one job per file for each job in -j, with infile and "
                   "P3S_INPUT_FILE set (default $P3S_INPUT_FILE)")
    p.add_argument("-D", "--delay", type=int, default=0, metavar="MS",
                   help="with -j: milliseconds between submissions, sending jobs one at a time "
                   "(default 0: all at once)")
    p.add_argument("--new-type", action="store_true",
                   help="with -j or -L: a job type a letter or two from a known one is meant (not a typo)")
    p.add_argument("--again", action="store_true",
                   help="with -j: submit even if the same jobs were submitted in the last hour (a rerun is "
                        "otherwise refused, naming the submission that stored them)")
    p.add_argument("-t", "--test", action="store_true",
                   help="with -j: check the jobs and print them as they would be sent; send nothing")
    p.add_argument("-N", "--replicas", type=int, default=1, metavar="N",
                   help="submit N copies of each job (default 1)")
    p.add_argument("-a", "--adjust", action="store_true", help="change the state and/or priority of job -u")
    p.add_argument("-d", "--delete", action="store_true", help="delete job -u (not while it runs)")
    p.add_argument("-u", "--uuid", help="the job(s) to adjust or delete: UUID or UUID1,UUID2,...")
    p.add_argument("-s", "--state", help="with -a: new state (defined, template, cancelled); "
                   "with --list: only jobs in this state")
    p.add_argument("-P", "-p", "--priority", help="with -a: new priority (higher runs first; -p as the original)")
    p.add_argument("-V", "--version", dest="dunetpcver", metavar="VERSION",
                   help="with -j: set DUNETPCVER=VERSION in each job's env (the original's -V)")
    for flag, instead in UNSUPPORTED.items():
        p.add_argument(flag, nargs="?", const="", dest="unsupported_" + flag.strip("-"), help=argparse.SUPPRESS)
    p.add_argument("--list", action="store_true", help="list jobs, newest first")
    p.add_argument("-l", "--jobtypes", action="store_true",
                   help="list job types: cap, defined, running, finished, failed (-T: one type)")
    p.add_argument("-T", "--type", dest="jobtype_name", metavar="TYPE", help="with -l: this job type")
    p.add_argument("-L", "--cap", type=int, metavar="N",
                   help="with -l: at most N jobs of the type (-T), or of each known type, dispatched or "
                   "running at once (0 suspends, -1 removes the cap); enforced when pilots claim, never at "
                   "submission")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="with -l -T TYPE: a file's TYPE job must end within SECONDS of the file's arrival, "
                        "else the late_run alarm (0 lifts it)")
    p.add_argument("--no-cap", action="store_true", help="with -l: remove the cap of -T TYPE, or of every type")
    p.add_argument("--pause", metavar="TYPE", help="pause job type TYPE: its queued jobs stay queued, no pilot "
                                                    "takes one (-m WHY)")
    p.add_argument("--resume", metavar="TYPE", help="resume job type TYPE, paused by a person or the circuit "
                                                     "breaker (-m WHY)")
    p.add_argument("--note", metavar="KIND:TARGET",
                   help="leave a note (-m TEXT) on run:NUMBER, file:PATH or job:UUID, shown on the run grid, "
                        "the job page and the summary")
    p.add_argument("--reference", metavar="TYPE:RUN",
                   help="mark RUN the reference of job type TYPE (-m WHY): its plots and metrics are shown "
                        "beside every job of the type")
    p.add_argument("--bands", metavar="TYPE:FILE",
                   help="set job type TYPE's bands from FILE, {\"metric\": {\"warn\": [low, high], "
                        "\"error\": [low, high]}}: they judge its jobs' metrics when a payload gives no verdict")
    p.add_argument("--hide", action="store_true", help="with --note on a run or file: the run grid may hide it")
    p.add_argument("-m", "--why", help="with --pause and --resume: why (kept in the job type's history); "
                                       "with --note: its text")
    p.add_argument("--jobtype", help="with --list or --reprocess: only jobs of this type")
    p.add_argument("--reprocess", action="store_true",
                   help="new jobs, tagged (--tag), for the files of --runs, made from the prompt jobs that ran them")
    p.add_argument("--runs", metavar="RANGE", help="with --reprocess: a run or a range such as 5000-5010")
    p.add_argument("--tag", help="with --reprocess: the campaign's tag (its jobs' type is TYPE@TAG)")
    p.add_argument("--set-env", action="append", default=[], metavar="NAME=VALUE",
                   help="with --reprocess: a variable of the new jobs' env, e.g. DUNETPCVER=v10_02 (repeatable)")
    p.add_argument("--only", choices=("failed", "missing", "all"), default="all",
                   help="with --reprocess: the pairs whose prompt job failed, those never submitted, or all "
                   "(default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="with --reprocess: list what it would create, change nothing")
    p.add_argument("--limit", type=int, default=100, help="with --list: at most this many (default 100)")
    p.add_argument("--show", metavar="UUID", help="show one job with its history and log tails")
    p.add_argument("--provenance", metavar="UUID", help="what the job's pilot recorded of what ran, as JSON: the "
                   "payload's sha256 and git describe, the input's size and adler32, versions, environment")
    p.add_argument("--summary", action="store_true",
                   help="jobs and pilots by state, jobs ended in the last hour, and the alarms, as "
                   "key=value lines for scripts (the original's summary.py)")
    p.add_argument("--submission", metavar="ID",
                   help="was the submission with this id stored? (the id a failed -j prints)")
    p.add_argument("--wait", action="store_true",
                   help="after submitting, wait until the jobs end; exit 0 only if all finished with code 0, "
                   "else 3 with the reason of each that did not")
    p.add_argument("--wait-timeout", type=float, default=0, metavar="SECONDS",
                   help="with --wait: give up after this long (default 0 = no limit)")
    p.add_argument("--wait-notes", type=float, default=30, metavar="SECONDS",
                   help="with --wait: how often to say on stderr why jobs wait when no live pilot takes them "
                   "(default 30)")
    p.add_argument("--json", dest="json_out", action="store_true",
                   help="print results as JSON")
    p.add_argument("-S", "--server", help="server URL (default $P3S_SERVER or http://127.0.0.1:8000)")
    add_verbosity(p, "say more")
    args = p.parse_args(argv)
    for flag, instead in UNSUPPORTED.items():
        if getattr(args, "unsupported_" + flag.strip("-")) is not None:
            p.error(f"{flag}: not in p3s; {instead}")
    actions = [bool(args.jobfile), args.adjust, args.delete, args.list, bool(args.show), bool(args.provenance), args.jobtypes,
               bool(args.submission), args.summary, bool(args.pause or args.resume), bool(args.note),
               bool(args.reference), bool(args.bands), args.reprocess]
    if sum(actions) != 1 or (args.pause and args.resume):
        p.error("give exactly one of -j FILE, -a, -d, --list, --show UUID, --provenance UUID, -l, --submission ID, --summary, "
                "--pause TYPE, --resume TYPE, --note KIND:TARGET, --reference TYPE:RUN, --bands TYPE:FILE, --reprocess")
    if args.reprocess and not (args.runs and (args.tag or args.only == "missing")):
        p.error("--reprocess needs --runs RANGE and --tag TAG (no tag: only with --only missing, which "
                "submits the prompt jobs never submitted)")
    if not args.reprocess and (args.runs or args.tag or args.set_env or args.dry_run):
        p.error("--runs, --tag, --set-env and --dry-run go with --reprocess")
    bad_env = [x for x in args.set_env if "=" not in x or not x.split("=", 1)[0]]
    if bad_env:
        p.error(f"--set-env {bad_env[0]!r}: give NAME=VALUE")
    if (args.pause or args.resume or args.note or args.reference) and not args.why:
        p.error("--pause, --resume, --note and --reference need -m TEXT")
    for flag, value in (("--reference", args.reference), ("--bands", args.bands)):
        if value is not None and not all(value.partition(":")[::2]):
            p.error(f"{flag} {value}: give TYPE:{'RUN' if flag == '--reference' else 'FILE'}")
    if args.note and args.note.split(":", 1)[0] not in ("run", "file", "job"):
        p.error(f"--note {args.note}: give run:NUMBER, file:PATH or job:UUID")
    if args.hide and not args.note:
        p.error("--hide goes with --note")
    if (args.cap is not None or args.no_cap) and not args.jobtypes:
        p.error("-L and --no-cap go with -l [-T TYPE]")
    if args.deadline is not None and not (args.jobtypes and args.jobtype_name) or (args.deadline or 0) < 0:
        p.error("--deadline SECONDS (0 lifts it) goes with -l -T TYPE")
    if args.dunetpcver is not None and not args.jobfile:
        p.error("-V goes with -j FILE")
    if args.cap is not None and args.cap < -1:
        p.error(f"-L {args.cap}: a cap is 0 or more (-1 removes it)")
    if args.delete and (args.priority is not None or args.state is not None):
        p.error("-d takes -u UUID[,UUID...] only: p3s does not delete by state or priority; "
                "server.py --retention-days N purges ended jobs")
    if (args.adjust or args.delete) and not args.uuid:
        p.error("-a and -d need -u UUID")
    if args.adjust and args.state is None and args.priority is None:
        p.error("-a needs -s STATE and/or -P PRIORITY")
    if args.replicas < 1:
        p.error("-N must be at least 1")
    if args.wait and not args.jobfile:
        p.error("--wait goes with -j FILE")
    if args.wait_notes <= 0:
        p.error(f"--wait-notes {args.wait_notes:g}: must be more than 0 seconds")
    if args.delay < 0:
        p.error(f"-D {args.delay}: must not be negative")
    if (args.test or args.delay or args.again) and not args.jobfile:
        p.error("-t, -D and --again go with -j FILE")
    if args.infile is None:
        args.infile = os.environ.get("P3S_INPUT_FILE") or None
    return args


def read_json_file(path, flag="-j"):
    """The JSON in a file, or a JSON string given instead of a file name (as the original p3s took)."""
    if path.lstrip().startswith(("{", "[")):
        text, where = path, flag
    else:
        try:
            with open(path) as f:
                text, where = f.read(), path
        except OSError as e:
            raise InputError(f"{path}: {e.strerror}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise InputError(f"{where}: malformed JSON: {e}") from None


def read_job_file(path):
    """The job objects in a JSON file or string, holding one object or a list of them."""
    data = read_json_file(path)
    where = "-j" if path.lstrip().startswith(("{", "[")) else path
    jobs = data if isinstance(data, list) else [data]
    if not jobs or not all(isinstance(j, dict) for j in jobs):
        raise InputError(f"{where}: expected a job object or a non-empty list of job objects")
    return jobs


def load_jobs(path, infiles, replicas, dunetpcver=None):
    """Read the jobs; one job per input file (-f a,b: the original's meaning) and replica, each
    with its own uuid so a retried submission cannot store a job twice."""
    files = infiles.split(",") if infiles else [None]
    out = []
    for job in read_job_file(path):
        if dunetpcver is not None and isinstance(job.get("env", {}), dict):
            job = {**job, "env": {**job.get("env", {}), "DUNETPCVER": dunetpcver}}
        for infile in files:
            for _ in range(replicas):
                out.append(dict(bind_input(job, infile), uuid=str(uuidlib.uuid4())))
    return out


def bind_input(job, infile):
    """The job with its input file: `infile` if given, else its env's P3S_INPUT_FILE, so the
    lists show the input file either way."""
    env = job.get("env", {})
    if not isinstance(env, dict):
        return job                  # the server names the field and the problem
    infile = infile or env.get("P3S_INPUT_FILE")
    if not infile:
        return job
    return {**job, "infile": infile, "env": {**env, "P3S_INPUT_FILE": infile}}


def wait_for(client, jobs, timeout, verbose, note_every):
    """Poll until every job has ended; return {uuid: {state, exit_code}}. Every `note_every`
    seconds, say on stderr why jobs still wait, if no live pilot takes them."""
    uuids = [j["uuid"] for j in jobs]
    deadline = time.monotonic() + timeout if timeout else None
    next_note = time.monotonic()    # the first note at once: a job no pilot may take never starts
    delay = 0.2
    while True:
        states = client.job_states(uuids)
        pending = [u for u in uuids if states.get(u, {}).get("state") not in END_STATES]
        if not pending:
            return states
        if deadline and time.monotonic() > deadline:
            raise P3SError(f"--wait-timeout: {len(pending)} job(s) still not ended after {timeout:g} s")
        if verbose:
            print(f"waiting for {len(pending)} job(s)", file=sys.stderr)
        if time.monotonic() >= next_note:
            next_note = time.monotonic() + note_every
            for note in stuck_notes(client, [j for j in jobs if states[j["uuid"]]["state"] == "defined"]):
                print(f"waiting: {note}", file=sys.stderr, flush=True)
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


def stuck_notes(client, waiting):
    """Why the waiting jobs wait, one job of each (jobtype, site) asked, when the reason is
    that no live pilot may take them (not merely a queue ahead of them)."""
    firsts = {}
    for job in waiting:
        firsts.setdefault((job.get("jobtype", "default"), job.get("site", "")), job["uuid"])
    notes = []
    for uuid in firsts.values():
        notes += [r for r in client.why_waiting(uuid) if "come first" not in r]
    return list(dict.fromkeys(notes))


def submit(client, args):
    jobs = load_jobs(args.jobfile, args.infile, args.replicas, args.dunetpcver)
    if args.test:
        print(json.dumps(jobs, indent=2))
        return 0
    digest = rerun_checked_digest(client, args, jobs)
    submission = str(uuidlib.uuid4())
    client.on_retry = lambda line: print(f"job.py: {line}", file=sys.stderr, flush=True)
    try:
        uuids = send(client, jobs, args.delay, submission, digest, args.new_type)
    except P3SError as e:
        if not e.bad_input and not client.reached:      # no request left this machine
            raise P3SError(f"{e}; nothing was stored", e.status) from None
        if not e.bad_input and not args.delay:  # the answer may be lost while the jobs were stored
            raise P3SError(f"{e}; submission {submission} is stored whole or not at all: "
                           f"`job.py --submission {submission}` tells which", e.status) from None
        if not e.bad_input:     # -D: one submission per job; say which jobs there were
            print("\n".join(j["uuid"] for j in jobs))
            raise P3SError(f"{e}; the jobs may or may not be stored: their uuids are on stdout "
                           "(job.py --show UUID tells)", e.status) from None
        raise
    if not args.wait:
        emit(args, {"uuids": uuids}, lambda: "\n".join(uuids))
        return 0
    if not args.json_out:
        print("\n".join(uuids), flush=True)
    states = wait_for(client, jobs, args.wait_timeout, args.verbose, args.wait_notes)
    ok = all(states[u]["state"] == "finished" and states[u]["exit_code"] == 0 for u in uuids)
    emit(args, {"jobs": states}, lambda: "\n".join(ended_line(u, states[u]) for u in uuids))
    return 0 if ok else WAIT_FAILED


def ended_line(uuid, state):
    """`uuid state exit_code`, and the reason of a job that did not finish well."""
    line = f"{uuid} {state['state']} {state['exit_code']}"
    return f"{line} {state['reason']}" if state.get("reason") else line


def jobs_digest(jobs):
    """What identifies a submission's content: the jobs as read (input files, replicas, -V
    applied), without the uuids made for them."""
    content = [{k: v for k, v in job.items() if k != "uuid"} for job in jobs]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def rerun_checked_digest(client, args, jobs):
    """The jobs' digest, sent with them so that a rerun can be caught, once this is not one: a
    blind rerun after a lost answer would store every job twice, so the same jobs submitted in
    the last hour are named and refused, unless --again. None for a server that keeps no digest
    (an older one) or cannot answer now (one try: the submission then says why)."""
    digest = jobs_digest(jobs)
    try:
        found = client.find_submissions(digest, retry_for=0)
    except P3SError:
        return None
    if found and not args.again:
        last = found[0]
        when = time.strftime("%H:%M", time.localtime(last["ts"]))
        raise InputError(f"{args.jobfile}: these jobs were submitted at {when} as submission {last['id']} "
                         f"({last['jobs']} job(s)); `job.py --submission {last['id']}` tells more, "
                         "--again submits them anew")
    return digest


def send(client, jobs, delay_ms, submission, digest=None, new_jobtypes=False):
    """All jobs at once, as one submission stored whole or not at all, or one at a time with
    delay_ms between them (the original's -D)."""
    if not delay_ms:
        return client.submit_jobs(jobs, submission, digest, new_jobtypes)
    uuids = []
    for i, job in enumerate(jobs):
        if i:
            time.sleep(delay_ms / 1000)
        uuids += client.submit_jobs([job], new_jobtypes=new_jobtypes)
    return uuids


def show_submission(client, args):
    found = client.get_submission(args.submission)
    said = {"committed": f"stored: {found['jobs']} job(s)",
            "staged": f"not stored: {found.get('staged_parts')} part(s) staged but never committed (they expire); "
                      "submit again",
            "none": "not stored: nothing under this id; submit again"}
    emit(args, found, lambda: f"submission {args.submission}: {said[found['state']]}")
    return 0


def list_jobs(client, args):
    jobs = client.list_jobs(state=args.state, jobtype=args.jobtype, limit=args.limit)
    rows = [dict(j, input=os.path.basename(j.get("infile") or "")) for j in jobs]
    chosen = ", ".join(f"{k} {v}" for k, v in (("state", args.state), ("jobtype", args.jobtype)) if v)
    emit(args, {"jobs": [utc_times(j) for j in jobs]},
         lambda: format_table(rows, LIST_COLUMNS) if rows else f"no jobs{f' ({chosen})' if chosen else ''}")
    return 0


def show_job(client, args):
    job = client.get_job(args.show)
    emit(args, utc_times(dict(job, events=[utc_times(e) for e in job["events"]])), lambda: format_job(job))
    return 0


def is_time(key):
    return key == "ts" or key.startswith("ts_")


def local_time(ts):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def utc_times(record):
    """The record with its epoch times as ISO 8601 UTC (for --json: scripts read them anywhere)."""
    return {k: (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v)) if v else None) if is_time(k) else v
            for k, v in record.items()}


def adjust(client, args):
    for uuid in args.uuid.split(","):
        job = client.adjust_job(uuid, state=args.state, priority=args.priority)
        emit(args, job, lambda: f"{job['uuid']} {job['state']} priority {job['priority']}")
    return 0


def delete(client, args):
    for uuid in args.uuid.split(","):
        emit(args, client.delete_job(uuid), lambda: f"deleted {uuid}")
    return 0


JOBTYPE_COLUMNS = ("name", "cap", "defined", "running", "finished", "failed")


def jobtypes(client, args):
    """List job types (the original's -l), or set one's cap (-L N, -L -1 or --no-cap removes)."""
    if args.cap is not None or args.no_cap:
        cap = None if args.no_cap or args.cap == -1 else args.cap
        names = [args.jobtype_name] if args.jobtype_name else [t["name"] for t in client.list_jobtypes()]
        for name in names:
            client.set_cap(name, cap, args.new_type)
    if args.deadline is not None:
        client.call("PUT", f"/api/jobtypes/{quote(args.jobtype_name, safe='')}/deadline",
                    {"seconds": args.deadline or None})
    types = client.list_jobtypes(args.jobtype_name)
    if args.jobtype_name and not types:
        types = [{"name": args.jobtype_name, "cap": None, "defined": 0, "running": 0, "finished": 0, "failed": 0}]
    emit(args, {"jobtypes": types}, lambda: format_table(types, JOBTYPE_COLUMNS))
    return 0


def emit(args, obj, text):
    print(json.dumps(obj, indent=2) if args.json_out else text())


def format_job(job):
    """A job for a person: local times, empty fields blank (never None), history, log tails."""
    fields = [f"{k:12} {local_time(job[k]) if is_time(k) else '' if job[k] is None else job[k]}".rstrip()
              for k in job if k not in ("events", "env", "stdout_tail", "stderr_tail", "provenance")]
    fields.append(f"{'env':12} {json.dumps(job['env'])}")
    if job.get("provenance"):
        fields.append(f"{'provenance':12} {json.dumps(job['provenance'], sort_keys=True)}")
    history = [f"  {local_time(e['ts'])} {e['old'] or '-'} -> {e['new']} by {e['who']}"
               f" (attempt {e['attempt']}) {e['info']}".rstrip() for e in job["events"]]
    parts = fields + ["history:"] + history
    for stream in ("stdout", "stderr"):
        if job[stream + "_tail"]:
            parts += [f"--- {stream} (tail) ---", job[stream + "_tail"].rstrip("\n")]
    return "\n".join(parts)


def summary(client, args):
    """The status page's figures as `key=value` lines: easy to grep, awk or diff."""
    page = client.call("GET", "/", query={"format": "json"})
    last_hour = page["ended"].get("1h", {})
    alarms = page["alarms"]
    emit(args, {k: page[k] for k in ("jobs_by_state", "pilots_by_state", "ended", "alarms")}, lambda: "\n".join([
        "jobs " + " ".join(f"{s}={n}" for s, n in page["jobs_by_state"].items()),
        "pilots " + " ".join(f"{s}={n}" for s, n in page["pilots_by_state"].items()),
        "ended_1h " + " ".join(f"{s}={n}" for s, n in last_hour.items()),
        f"alarms {len(alarms)}"] + [f"alarm {a['name']} severity={a['severity']} {a['message']}" for a in alarms]))
    return 0


def pause(client, args):
    """Pause or resume a job type; who (the token's user) and why go to its history."""
    done = client.pause_jobtype(args.pause or args.resume, bool(args.pause), args.why)
    emit(args, done, lambda: f"{done['jobtype']}: {'paused' if done['paused'] else 'resumed'} by {done['who']}")
    return 0


def reference(client, args):
    """Mark a run the reference of a job type."""
    jobtype, _, run = args.reference.partition(":")
    done = client.call("PUT", f"/api/references/{quote(jobtype, safe='')}",
                       {"run": run, "why": args.why})
    emit(args, done, lambda: f"{jobtype}: run {done['run']} is the reference (job {done['job']})")
    return 0


def bands(client, args):
    """Set a job type's bands from a JSON file."""
    jobtype, _, path = args.bands.partition(":")
    done = client.call("PUT", f"/api/bands/{quote(jobtype, safe='')}", {"bands": read_json_file(path, "--bands")})
    emit(args, done, lambda: f"{jobtype}: bands on {', '.join(done['bands']) or 'no metric'}")
    return 0


def note(client, args):
    """A note on a run, a file or a job, in the name of the token's user."""
    kind, _, target = args.note.partition(":")
    done = client.call("POST", "/api/notes", {"kind": kind, "target": target, "text": args.why, "hide": args.hide})
    emit(args, done, lambda: f"noted on {done['kind']} {done['target']} by {done['who']}")
    return 0


def reprocess(client, args):
    """A reprocessing campaign: tagged jobs for a run range, all-or-nothing; --dry-run lists them."""
    done = client.call("POST", "/api/reprocess", {
        "runs": args.runs, "tag": args.tag or "", "jobtype": args.jobtype or "", "only": args.only,
        "set_env": dict(x.split("=", 1) for x in args.set_env), "dry_run": args.dry_run})
    rows = [dict(j, input=os.path.basename(j["infile"])) for j in done["jobs"]]
    verb = "would create" if done["dry_run"] else "created"
    emit(args, done, lambda: "\n".join(([format_table(rows, ("input", "jobtype", "from", "uuid"))] if rows else [])
                                       + [f"{verb} {len(rows)} job(s)" + (f" tagged {done['tag']}" if done["tag"] else "")
                                          + f" for runs {done['runs']}"]))
    return 0


def provenance(client, args):
    """What the job's pilot recorded of what ran (JSON; null for a job that has not ended)."""
    print(json.dumps(client.get_job(args.provenance).get("provenance"), indent=2))
    return 0


ACTIONS = ((lambda a: a.reference, reference), (lambda a: a.bands, bands), (lambda a: a.note, note),
           (lambda a: a.pause or a.resume, pause), (lambda a: a.jobfile, submit), (lambda a: a.list, list_jobs),
           (lambda a: a.show, show_job), (lambda a: a.provenance, provenance), (lambda a: a.reprocess, reprocess),
           (lambda a: a.adjust, adjust), (lambda a: a.delete, delete), (lambda a: a.jobtypes, jobtypes),
           (lambda a: a.submission, show_submission), (lambda a: a.summary, summary))


def main(argv=None):
    args = parse_args(argv)
    action = next(fn for chosen, fn in ACTIONS if chosen(args))
    return run_cli("job.py", lambda: action(Client(args.server), args))


if __name__ == "__main__":
    sys.exit(main())
