#!/usr/bin/env python3
"""p3s pilot factory: keep a site at its nominal number of pilots, unattended.

    python factory.py -s np04                                    # the site's own command and period
    python factory.py -s np04 --command './pgen.sh {n} -s {site}'
    python factory.py -s np04 --command 'sbatch --array=1-{n} deploy/slurm-pilots.sh'
    python factory.py -s np04 --command 'condor_submit deploy/htcondor-pilots.sub pilots={n} \
        p3s_site={site} p3s_request={request}'

Each round (--period, default 60 s) it asks the server for the site's live and pending pilots
and starts missing = nominal - live - pending of them (at most --max-per-round) through the
command. Before it runs the command it records a request on the server; the command's pilots
get its id (P3S_REQUEST in their environment, or {request} in the command) and each one that
registers uses a slot of it. Pilots a batch queue still holds are therefore counted as pending,
whatever the batch system, and never submitted twice; a request whose pilots never came stops
counting after --pending-timeout. This is how glideinWMS, PanDA Harvester and DIRAC's
SiteDirector avoid flooding a queue.

Safety: a command that fails (non-zero exit) cancels its request and backs off (the period
doubles, up to 10 periods), its stderr's last line shown on the factory's service entry; a round
whose pilots all ended within a minute of registering (a bad node, a broken environment), or
none of which registered at all within --pending-timeout (batch jobs that die before pilot.py
starts), backs off the same way, saying where to look. A command is done when it exits (a child
it left in the background does not hold the round); one still running at its timeout is killed
with every process it started. Pilots above what the site wants (nominal, or its floor while no job
waits; less those retiring) for OVERSHOOT_ROUNDS rounds are brought back down: with --status and
--remove the newest batch jobs still queued are removed first, then the newest idle live ones are
told to drain (they take no more jobs and exit); a busy pilot is never stopped. With --status
and --remove, held batch jobs and those queued past --pending-timeout are removed and replaced.
Each round is reported as the service "factory <site>" (/services); a clean exit (cycles done,
SIGTERM, SIGINT) retires it, a kill -9 does not, and so alarms.

Placeholders in the command: {n} {site} {request} {server} {home} (this clone). The command runs
without a shell (split like a shell would), from this clone's directory, with P3S_REQUEST,
P3S_SITE, P3S_SERVER and P3S_HOME (unless set) in its environment and P3S_TOKEN removed (pilots
read P3S_TOKEN_FILE, never the token).

Environment: P3S_SERVER, P3S_TOKEN / P3S_TOKEN_FILE, P3S_RETRY_FOR (see README).
Exit codes: 0 after --cycles rounds or a signal, 2 bad input (an unknown site, a bad template),
1 the server unreachable at start.
"""
import collections
import logging
import os
import shlex
import socket
import sys
import time

from serverAPI import (ArgumentParser, add_verbosity, Client, InputError, P3SError, retire, run_bounded, run_cli,
                       stop_on_sigterm)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_COMMAND = "./pgen.sh {n} -s {site}"
MAX_BACKOFF = 10            # periods a failing factory waits at most between tries
COMMAND_TIMEOUT = 300       # seconds a submit command may take
OVERSHOOT_ROUNDS = 2        # rounds live pilots stay above what the site wants before idle ones drain
log = logging.getLogger("p3s.factory")


def parse_args(argv):
    p = ArgumentParser(description="Keep a p3s site at its nominal number of pilots.")
    p.add_argument("-s", "--site", required=True, help="the site (its nominal `pilots` is the target)")
    p.add_argument("--command", metavar="TEMPLATE",
                   help=f"how to start {{n}} pilots (default: the site's factory command, else '{DEFAULT_COMMAND}')")
    p.add_argument("-p", "--period", type=float,
                   help="seconds between rounds (default: the site's factory_period, else 60)")
    p.add_argument("--max-per-round", type=int, default=50, metavar="N",
                   help="pilots started in one round at most (default %(default)s)")
    p.add_argument("--pending-timeout", type=float, default=900, metavar="SECONDS",
                   help="a request's pilots that have not registered by then are no longer pending; with --status "
                   "and --remove, batch jobs still queued by then are removed and replaced (default %(default)s)")
    p.add_argument("--status", metavar="COMMAND",
                   help="ask the batch system: a command printing one line per pilot batch job, 'ID STATE "
                   "[REASON]' (default: the site's factory_status, else none: pending is inferred from the "
                   "server); see docs/operations.md for Slurm's and HTCondor's")
    p.add_argument("--remove", metavar="COMMAND",
                   help="with --status: remove held batch jobs, those queued past --pending-timeout or beyond what "
                   "the site wants, {ids} standing for their ids (e.g. 'scancel {ids}', 'condor_rm {ids}'; "
                   "default: the site's factory_remove)")
    p.add_argument("-c", "--cycles", type=int, default=0, help="rounds before exiting (0 = forever; default 0)")
    p.add_argument("-S", "--server", help="server URL (default $P3S_SERVER or http://127.0.0.1:8000)")
    add_verbosity(p, "log every round")
    args = p.parse_args(argv)
    if args.period is not None and args.period < 1:
        p.error(f"--period {args.period:g}: at least 1 second")
    if args.max_per_round < 1:
        p.error(f"--max-per-round {args.max_per_round}: at least 1")
    if args.pending_timeout < 1:
        p.error(f"--pending-timeout {args.pending_timeout:g}: at least 1 second")
    return args


def command_line(template, **values):
    """The command as argv: split like a shell would, then each word filled in (so a value can
    never become a second word or a shell construct); an unknown placeholder is bad input."""
    try:
        return [word.format(**values) for word in shlex.split(template)]
    except (KeyError, IndexError, ValueError) as e:
        raise InputError(f"--command {template!r}: {e!r}; placeholders are {{n}} {{site}} {{request}} "
                         "{server} {home}") from None


HELD_STATES = ("HELD", "H", "5")                # Slurm's reason says held; HTCondor's JobStatus 5
PENDING_STATES = ("PENDING", "PD", "IDLE", "I", "1", "CONFIGURING", "CF")


def batch_state(state, reason):
    """'pending', 'held' or 'running' for a batch job's state and reason (Slurm: PENDING with
    a Job*Held* reason is held; HTCondor: JobStatus 1 idle, 2 running, 5 held)."""
    state = state.upper()
    if state in HELD_STATES or "held" in reason.lower() and state in PENDING_STATES:
        return "held"
    return "pending" if state in PENDING_STATES else "running"


def batch_words(batch):
    """' (held 1; the batch system says: Resources x2)': what the queue holds, and why."""
    reasons = collections.Counter(r for _, r in batch["pending"] + batch["held"] if r and r != "None")
    said = ", ".join(f"{r}" + (f" x{n}" if n > 1 else "") for r, n in reasons.most_common(3))
    held = f"held {len(batch['held'])}" if batch["held"] else ""
    parts = [p for p in (held, f"the batch system says: {said}" if said else "") if p]
    return f" ({'; '.join(parts)})" if parts else ""


def run_command(argv, env, keep_output=False):
    """Run a batch command (serverAPI.run_bounded, COMMAND_TIMEOUT); what went wrong, or None
    (with keep_output: (that, its output))."""
    try:
        ran = run_bounded(argv, COMMAND_TIMEOUT, env, HERE)
    except OSError as e:
        failed, output = str(e), ""
    else:
        failed = (f"still running after {COMMAND_TIMEOUT} s: killed with its children" if ran.code is None
                  else ran.code != 0 and (ran.said or f"exit code {ran.code}")) or None
        output = ran.output
    return (failed, output) if keep_output else failed


class Factory:
    """One site's factory: round() once per period until stopped.

    Methods for the caller: round() returns the status line it reported; run() loops."""

    def __init__(self, args, client):
        self.args, self.client = args, client
        self.failures = 0           # rounds in a row that failed: the back-off grows with them
        self.resume_at = 0.0        # monotonic time before which no pilot is started
        self.last_error = ""
        self.awaited = set()        # ids of this factory's requests whose outcome is not known yet
        self.over = 0               # rounds in a row with more pilots (live and pending) than the site wants
        self.pending_since = {}     # batch id -> when the status command first listed it pending
        site = client.get_site(args.site)       # an unknown site is bad input, said at once
        if not site.get("pilots"):
            raise InputError(f"site {args.site!r} has no nominal number of pilots to keep; give it one with "
                             f"pilot.py --define-site -s {args.site} --pilots N")
        self.command = args.command or site.get("factory") or DEFAULT_COMMAND
        self.period = args.period or site.get("factory_period") or 60.0
        self.status_command = args.status or site.get("factory_status") or ""
        self.remove_command = args.remove or site.get("factory_remove") or ""
        command_line(self.command, n=1, site=args.site, request="r", server="s", home=HERE)
        if "{n}" not in self.command:
            log.warning("the command %r has no {n}: it starts as many pilots as it does whatever is missing "
                        "(an overshoot is drained)", self.command)

    @property
    def service(self):
        return f"factory {self.args.site}"

    def round(self):
        site = self.client.get_site(self.args.site)
        nominal, live, pending = site["pilots"] or 0, site["live"], site["pending"]
        self.notice_outcome(site["requests"])
        missing, asked, queued = site["missing"], "", []
        if self.status_command:
            batch = self.ask_batch_system()
            stale = self.stale(batch["pending"])
            removed_stale, said_stale = self.remove("stale", stale)
            queued = [job for job in batch["pending"] if not (removed_stale and job in stale)]
            removed_held, said_held = self.remove("held", batch["held"])
            asked = batch_words(batch) + said_held + said_stale
            if removed_held:
                self.forget_requests(site["requests"])
                pending = 0                         # by the server: those requests are cancelled
            pending = max(len(queued), pending)     # more if a request's batch jobs died unregistered
            missing = max(0, site["wanted"] - (live - site["retiring"]) - pending)
        submitted = 0
        if time.monotonic() < self.resume_at:
            state = f"backing off for {self.resume_at - time.monotonic():.0f} s"
        else:
            submitted = min(missing, self.args.max_per_round)
            state = self.start_pilots(submitted) if submitted else self.trim(site, queued)
        status = f"nominal {nominal}, live {live}, pending {pending}{asked}, submitted {submitted}: {state}"
        if "{n}" not in self.command:
            status += "; the command has no {n}: it starts as many pilots as it does whatever is missing"
        if self.last_error:
            status += f"; last error: {self.last_error}"
        log.info("%s", status)
        self.client.service_beat(self.service, self.period, status[:1024], socket.gethostname())
        return status

    def start_pilots(self, n):
        request = self.client.request_pilots(self.args.site, n, self.args.pending_timeout)["id"]
        argv = command_line(self.command, n=n, site=self.args.site, request=request,
                            server=self.client.server, home=HERE)
        env = {k: v for k, v in os.environ.items() if k != "P3S_TOKEN"}
        env.update(P3S_REQUEST=request, P3S_SITE=self.args.site, P3S_SERVER=self.client.server)
        env.setdefault("P3S_HOME", HERE)        # deploy/slurm-pilots.sh finds the clone by it
        # a beat whose period covers the command: a slow batch system is not a silent factory
        self.client.service_beat(self.service, self.period + COMMAND_TIMEOUT, f"submitting {n} through {argv[0]}",
                                 socket.gethostname())
        failed = run_command(argv, env)
        if failed:
            self.client.cancel_request(request)
            self.back_off(f"{argv[0]}: {failed}")
            return "the command failed"
        self.awaited.add(request)
        return f"started {n} through {argv[0]}"

    def ask_batch_system(self):
        """The pilots' batch jobs by what the batch system says of them: {"pending": [(id,
        reason)], "held": [...], "running": [...]}; a failing status command is an error the round
        says, and counts nothing."""
        found = {"pending": [], "held": [], "running": []}
        argv = command_line(self.status_command, n=0, site=self.args.site, request="", server=self.client.server,
                            home=HERE)
        failed, output = run_command(argv, dict(os.environ), keep_output=True)
        if failed:
            self.last_error = f"{argv[0]}: {failed}"[:300]
            return found
        for line in output.splitlines():
            words = line.split(None, 2)
            if len(words) >= 2:
                found[batch_state(words[1], words[2] if len(words) > 2 else "")].append(
                    (words[0], words[2] if len(words) > 2 else ""))
        return found

    def forget_requests(self, requests):
        """Batch jobs were removed: the open requests they may belong to no longer count as
        pending (the batch system's listing counts what is still queued)."""
        for r in requests:
            if r["pending"]:
                self.client.cancel_request(r["id"])
        self.awaited.clear()

    def stale(self, pending):
        """The batch jobs pending longer than --pending-timeout (and since when each one is, for
        trim): their request has expired on the server, so they are removed and replaced, never
        left to start late. One that cannot be removed still counts as pending."""
        t = time.monotonic()
        self.pending_since = {i: self.pending_since.get(i, t) for i, _ in pending}
        return [(i, r) for i, r in pending if t - self.pending_since[i] >= self.args.pending_timeout]

    def remove(self, what, jobs):
        """Remove batch jobs (held: they would never start; stale; no longer wanted) with the
        remove command: (how many went, ' · removed the N held' or '')."""
        if not jobs or not self.remove_command:
            return 0, ""
        ids = [i for i, _ in jobs]
        argv = [w for word in shlex.split(self.remove_command) for w in (ids if word == "{ids}" else [word])]
        failed = run_command(argv, dict(os.environ))
        if failed:
            self.last_error = f"{argv[0]}: {failed}"[:300]
            return 0, f" · could not remove the {len(jobs)} {what}"
        return len(jobs), f" · removed the {len(jobs)} {what}"

    def trim(self, site, queued):
        """Bring an overshoot back down: after OVERSHOOT_ROUNDS rounds with more pilots than the
        site wants (live and, from the batch system, queued), the newest queued batch jobs are
        removed (work has gone: glideinWMS's excess idle glideins), then the newest idle pilots
        drain (a template that starts a pilot per node whatever {n} is, pilots started by hand)."""
        excess = site["live"] - site["retiring"] + len(queued) - site["wanted"]
        self.over = self.over + 1 if excess > 0 else 0
        if self.over < OVERSHOOT_ROUNDS:
            return "at nominal" if excess <= 0 else f"{excess} above what the site wants"
        self.over = 0
        newest_queued = sorted(queued, key=lambda job: self.pending_since[job[0]], reverse=True)
        removed, said = self.remove("queued no longer wanted", newest_queued[:excess])
        if removed:
            self.forget_requests(site["requests"])
        excess = min(excess - removed, site["live"] - site["retiring"] - site["wanted"])  # a live pilot
        if excess <= 0:                                         # never drains for one still queued
            return f"above what the site wants{said}"
        idle = [p for p in self.client.list_pilots(site=self.args.site) if p["state"] in ("active", "no jobs")]
        newest = sorted(idle, key=lambda p: p["ts_reg"], reverse=True)[:excess]
        for p in newest:
            self.client.mark_pilots("drain", uuid=p["uuid"])
        return f"{excess} above what the site wants{said}: drained {len(newest)} idle pilot(s)"

    def notice_outcome(self, requests):
        """What became of this factory's requests (every one, not only the last: a round may
        replace pilots while an earlier request is still out): all its pilots ended within a
        minute, or none registered within --pending-timeout: back off, once a round; some
        registered and lived: healed (the back-off and the last error end)."""
        failed, lived = [], False
        for r in requests:
            if r["id"] not in self.awaited:
                continue
            if r["registered"] and r["registered"] == r["count"] == r["died_young"]:
                failed.append(f"all {r['count']} pilot(s) of a round ended within a minute (a bad node or a "
                              "broken environment?)")
            elif r["state"] == "open" and not r["pending"] and not r["registered"]:
                failed.append(f"none of the {r['count']} pilot(s) of a round registered within --pending-timeout: "
                              "do the batch jobs start pilot.py? look at their output (P3S_RUNDIR, "
                              "pilot-slurm-*.log, the batch system's own)")
            elif r["registered"] > r["died_young"]:
                lived = True
            elif r["state"] == "open" and r["pending"]:
                continue                            # still out: judged later
            self.awaited.discard(r["id"])
        self.awaited &= {r["id"] for r in requests}
        if failed:
            self.back_off(failed[-1] + (f" ({len(failed)} requests)" if len(failed) > 1 else ""))
        elif lived:
            self.failures, self.last_error = 0, ""

    def back_off(self, error):
        self.failures += 1
        self.last_error = error[:300]
        wait = self.period * min(2 ** self.failures, MAX_BACKOFF)
        self.resume_at = time.monotonic() + wait
        log.warning("%s; next try in %.0f s", error, wait)

    def run(self):
        """Rounds until --cycles or a signal; a clean exit retires the service."""
        cycle = 0
        try:
            while True:
                cycle += 1
                try:
                    self.round()
                except P3SError as e:
                    if e.bad_input:
                        raise
                    log.warning("round %d: %s; will retry", cycle, e)
                if self.args.cycles and cycle >= self.args.cycles:
                    break
                time.sleep(self.period)
        except KeyboardInterrupt:
            pass
        retire(self.client, self.service)
        return 0


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s factory %(levelname)s: %(message)s")
    stop_on_sigterm()
    return run_cli("factory.py", lambda: Factory(args, Client(args.server)).run())


if __name__ == "__main__":
    sys.exit(main())
