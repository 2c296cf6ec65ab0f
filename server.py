#!/usr/bin/env python3
"""p3s server: the job, pilot and workflow database behind a small JSON API and HTML pages.

Standard library only (http.server + sqlite3), one file that runs alone: copy it anywhere and
`python server.py` works. It reads top-down, and nothing calls forward; its banners, in order:

    Settings                  constants with their unit and reason; the state names
    Errors and small helpers  ApiError and bad(), StartupError, now(), esc(), figure(), approx(), median()
    Schema                    the migrations (PRAGMA user_version), connect(), migrate()
    Validation                every request field is checked here, before any transaction
    Store                     connections, the write transaction, guarded transitions,
                              row lookups and the query helpers of the lists
    Workflow engine           GraphML, DAG checks, file names, instantiating and advancing DAGs
    Lifecycle rules           how jobs enter, retry, end, are cancelled or freed from a pilot
    Service                   the operations behind the API, in sub-banners: brokerage,
                              workflows, published images, alarms (Notifier, Alarms), then
                              the lease clock (Leases, in memory) and Service itself: jobs,
                              pilot protocol, sites, factories, services, housekeeping
    Views                     the data behind every page (also the pages' JSON twins)
    HTML pages                pure renderers: a dict in, an HTML string out
    HTTP                      the routes and pages tables, Handler, P3SServer
    CLI                       start-up checks (version floor, network filesystems), the
                              token, the options, main()

    python server.py                      # 127.0.0.1:8000, ./p3s.db beside this file
    python server.py --port 0 --db /tmp/x.db --token-file /tmp/x.token
"""
import argparse
import bisect
import collections
import contextlib
import csv
import difflib
import hashlib
import hmac
import html
import io
import ipaddress
import json
import logging
import math
import os
import queue
import re
import secrets
import selectors
import shlex
import shutil
import signal
import socket
import sqlite3
import stat
import sys
import threading
import time
import subprocess
import urllib.error
import urllib.request
import uuid as uuidlib
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit
from xml.etree import ElementTree

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "1.0"
log = logging.getLogger("p3s.server")

################################################################################################
# Settings
################################################################################################
DEFAULT_DB = os.path.join(HERE, "p3s.db")
MIN_PYTHON = (3, 9)                 # lxplus9 / RHEL 9's system Python
MIN_SQLITE = (3, 26, 0)             # RHEL 8's sqlite; lxplus9 has 3.34.1. No SQL newer than this.
# Filesystems whose locking sqlite cannot trust (AFS has no byte-range locks; WAL needs memory
# shared on one host): the database never lives on them. fuse.* covers EOS (fuse.eos), sshfs, ...
NETWORK_FS = ("afs", "openafs", "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "lustre", "gpfs",
              "glusterfs", "9p", "fuse")
DEFAULT_FILES_ROOT = os.path.join(HERE, "logs")
MAX_BODY = 4 * 1024 * 1024          # bytes; a report carries two 64 KiB tails, a submission many jobs
HEADER_TIMEOUT = 10                 # seconds a request's line and headers may take in all, and a kept
                                    # connection may idle (a trickle is cut off, not held forever;
                                    # long polls wait server-side, not on the socket): --header-timeout
MAX_CONNECTIONS = 4000              # connections served at once; beyond, a quick 503 and close (the
                                    # cap is lowered to what the descriptor limit allows)
MIN_BODY_RATE = 32 * 1024           # bytes a second a request's body arrives at least: its deadline
                                    # is --header-timeout plus its length at this rate
MAX_PER_CLIENT = 128                # connections from one address (not loopback, not --pilot-net)
MAX_READERS = 64                    # sqlite reader connections open at once; more requests wait
WAL_LIMIT = 64 * 1024 * 1024        # bytes of write-ahead log before housekeeping truncates it
POOL_KEEP = 32                      # idle sqlite connections kept for reuse; the rest are closed
READER_WAIT = 30                    # seconds a request waits for a reader connection, then 503
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SECRET_NAME = re.compile(r"TOKEN|PASSW|SECRET|KEY|CREDENTIAL", re.I)   # env names masked on reads
MAX_WAIT = 30.0                     # cap on a pilot's long poll, seconds
TAIL_BYTES = 64 * 1024              # stdout/stderr tails kept per job
DEFAULT_HEARTBEAT = 10.0           # seconds, when neither the pilot nor its site says
LOST_AFTER_BEATS = 3                # a pilot silent for this many heartbeat periods is lost (alarm)
LEASE_BEATS = 10                    # ... and its job is given away after this many (the job lease)
PAUSE_GAP = 5.0                     # seconds a housekeeping pass may be late (or the clock jump)
                                    # before the gap counts as a server pause: silence restarts
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 3600)   # claim latency histogram, s
PURGE_BATCH = 1000                  # rows of each kind one retention pass may delete
TIDY_PERIOD = 600                   # seconds between trims of the end buckets and PRAGMA optimize
TIMELIMIT_GRACE = 60                # housekeeping times out a silent running job this late
SITE_TOLERANCE = 0.2                # a site's alarm: live pilots below nominal by more than this
UNSTARTED_REQUESTS = 3              # a site's factory requests of a day with no pilot at all: an alarm
CANARY = "canary"                   # the job type of the sites' canaries (never an error, a grid row or a DQM figure)
LIFE_STAGGER = 0.85                 # pilots end between this share of their site's pilotlife and all of it;
                                    # past it they count as retiring, and the factory replaces them early
STARVING_MINUTES = 10               # alarm: defined jobs no live pilot may take for this long
STARVING_ESCALATE = 3               # ... and critical once they waited this many times as long
# Alarms: their tunables (the rules they feed are stated once, in the Alarms class).
ALARM_DELAY = 15 * 60               # seconds a warning lasts before it is sent to a person
ALARM_HOLD = 60                     # seconds a condition holds before it is raised (a blip is not)
DRIFT_WINDOW = 3600                 # seconds: drift compares the last window of a type's jobs
ALARM_REPEAT = 4 * 3600             # seconds: an alarm told and still raised, nobody on it, is told again
ALARM_CLEAR_HOLD = 120              # seconds it stays gone before its alarm clears (no flapping)
LOST_SHARE, LOST_COUNT = 0.2, 5
LIFETIME_MIN_ENDED = 5              # pilot_lifetime: pilots lost in the hour before it may be raised
DELIVERY_TIMEOUT = 10               # seconds a webhook or command may take per try
DELIVERY_BACKOFF = (1, 2, 5, 15, 60, 300)   # seconds between tries of a failed delivery
SILENT_PERIODS = 3                  # alarm: a service (an injector) silent for this many of its periods
SERVICE_LINES = 100                 # a service's history: its last lines kept
YOUNG_DEATH = 60                    # seconds: a factory's round whose pilots all ended this young failed
FAILURE_RATE = 0.5                  # alarm: more than this share of a type's jobs ended badly in the
FAILURE_MIN_ENDED = 5               # last hour, once at least this many ended
BREAKER_MIN_FAILED = 10             # a job type is paused (the circuit breaker, after DUNE's justIN)
                                    # when more attempts than this failed or timed out in the last
                                    # hour (since it was last resumed) and they outnumber those that
                                    # finished BREAKER_ODDS to one; 0: never
BREAKER_ODDS = 2                    # justIN's "outnumber" is 1: a type failing 30 % of its tries
                                    # tripped it on an unlucky start of a shift (11 failed, 10 finished)
MAX_JOBS_PER_SUBMISSION = 10000     # jobs in one POST /api/jobs (one transaction), or in one part
MAX_PARTS = 100                     # parts of one staged submission (a million jobs at most)
STAGED_TTL = 3600                   # seconds staged parts wait for their commit before they expire
SUBMISSIONS_KEPT = 7 * 86400        # seconds a committed submission's id still answers "stored"
DISCARD_LIMIT = 64 * 1024 * 1024    # bytes of an oversized body read and dropped, so that the
                                    # client, still sending, gets to read our 413
ERROR_BUCKET = 600                  # seconds: the error summary counts failures in buckets this long
MAX_IMAGE_BYTES = 2 * 1024 * 1024   # a published image (a job's plot), at most
MAX_IMAGES = 20                     # images one job may publish
MAX_IMAGE_STORE = 1024 ** 3         # bytes of published images kept in all; the oldest go first
MIN_FREE = 200 * 1024 ** 2          # bytes the database's filesystem keeps free: images are refused
                                    # (507) below it, and an alarm warns at twice this
INT64 = 2 ** 63                     # sqlite's integers are 64-bit: anything outside is a 400
# Every number a pilot or client sends is bounded at the door: a heartbeat of 1e300 would be a
# lease that never ends, a runtime of 1e300 a start date no page can print.
MAX_HEARTBEAT = 3600.0              # seconds between a pilot's heartbeats (and a site's period)
MAX_SECONDS = 366 * 86400           # a runtime, a pilot's life, a service's period: a year at most
MAX_PID = 2 ** 22                   # Linux's pid_max ceiling
EXIT_CODES = 2 ** 31                # an exit code (or -signal) fits in 32 bits
FEATURES = ("ended_ago", "quality", "provenance", "ahead")   # report fields newer than the first protocol: a pilot sends
                                    # one only to a server whose registration answer lists it
# Verdicts, after DUNE-DAQ's dqmtools: each check of a job says one of these, worst last; a job's
# verdict is the worst of its checks, a run's the worst of its jobs'. A failed job has none.
VERDICTS = ("OK", "WARNING", "INVALID", "BAD")
BAD_VERDICTS = ("INVALID", "BAD")
MAX_CHECKS = 200                    # checks one job may report (verdict.json)
MAX_METRICS = 200                   # metrics one job may report (metrics.json)
MAX_CHECK_MESSAGE = 1024            # characters of a check's message kept
MAX_QUALITY_NAME = 128              # characters of a check's or metric's name
CRASH_INFO = "pilot stopped: crashed"     # how a crashed pilot's release reads in a job's history
PER_JOB_ENV = ("P3S_JOB_UUID", "P3S_PILOT_UUID", "P3S_JOB_DIR")    # the pilot's, for each job

JOB_STATES = ("template", "defined", "dispatched", "running",
              "finished", "failed", "timeout", "pilotTO", "cancelled")
ACTIVE_JOB_STATES = ("dispatched", "running")
END_JOB_STATES = ("finished", "failed", "timeout", "pilotTO", "cancelled")
RETRYABLE_STATES = FAILED_STATES = ("failed", "timeout", "pilotTO")
LIVE_PILOT_STATES = ("active", "no jobs", "dispatched", "running")


################################################################################################
# Errors and small helpers
################################################################################################
class ApiError(Exception):
    """An error answered to the client as {"error": message} with an HTTP status."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def bad(message):
    """The common error: a 400 naming the field and the problem."""
    return ApiError(400, message)


class WriterBusy(Exception):
    """The connection loop's write found the write lock or the database taken (a big
    submission, an outside sqlite3 shell): its request is handed to a thread, which waits."""


class StartupError(Exception):
    """The server cannot start as configured (token, schema, ...): main() prints it, exits 2."""


def now():
    return time.time()


def is_disk_full(error):
    return isinstance(error, sqlite3.OperationalError) and "full" in str(error)


def esc(value):
    """Every value shown on a page or written into GraphML goes through here."""
    return html.escape("" if value is None else str(value), quote=True)


def figure(value, unit="s"):
    return "" if value is None else f"{value:.3g} {unit}"


def approx(value, unit="s"):
    """A figure read from a histogram (its bins are 25 % wide): no more digits than it is worth,
    marked as such (a true 3.89 s reads ~4 s, not 4.26 s)."""
    return "" if value is None else f"~{float(f'{value:.{1 if value < 10 else 2}g}'):g} {unit}"


RUN_NUMBER = re.compile(r"run_?0*(\d+)(?:_0*(\d+))?", re.I)    # np04_raw_run005010_0007 -> 5010, 7
RUN_SCAN = 20000        # input files a run-range filter examines at most (newest first)
STREAM_SCAN = 2000      # input files whose directories name the streams the run grid offers
VERSIONS_READ = 2000    # jobs whose versions the run grid reads for the runs chosen, at most
FILES_SCAN = 1000       # input files /files examines at most (newest first)


def run_of(infile):
    """(run, subrun) named in a file name (subrun may be None), else (None, None)."""
    match = RUN_NUMBER.search(os.path.basename(infile))
    return (int(match.group(1)), match.group(2) and int(match.group(2))) if match else (None, None)


def median(values):
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


################################################################################################
# Schema: PRAGMA user_version counts the migrations applied; each entry moves one version up.
################################################################################################
MIGRATIONS = [
    """
    CREATE TABLE jobs(
        id INTEGER PRIMARY KEY,
        uuid TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL DEFAULT '',
        user TEXT NOT NULL DEFAULT '',
        jobtype TEXT NOT NULL DEFAULT 'default',
        payload TEXT NOT NULL,
        params TEXT NOT NULL DEFAULT '',
        env TEXT NOT NULL DEFAULT '{}',
        priority INTEGER NOT NULL DEFAULT 0,
        timelimit INTEGER NOT NULL DEFAULT 3600,
        site TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL,
        attempt INTEGER NOT NULL DEFAULT 1,
        max_attempts INTEGER NOT NULL DEFAULT 1,
        pilot TEXT,
        wfuuid TEXT,
        vertex TEXT,
        infile TEXT NOT NULL DEFAULT '',
        exit_code INTEGER,
        errmsg TEXT NOT NULL DEFAULT '',
        stdout_tail TEXT NOT NULL DEFAULT '',
        stderr_tail TEXT NOT NULL DEFAULT '',
        stdout_path TEXT NOT NULL DEFAULT '',
        stderr_path TEXT NOT NULL DEFAULT '',
        host TEXT NOT NULL DEFAULT '',
        pid INTEGER,
        ts_def REAL NOT NULL,
        ts_dis REAL,
        ts_sta REAL,
        ts_sto REAL
    );
    CREATE INDEX jobs_broker ON jobs(state, jobtype, priority DESC, ts_def);
    CREATE INDEX jobs_broker_any ON jobs(state, priority DESC, ts_def);
    CREATE INDEX jobs_pilot ON jobs(pilot, id);
    CREATE INDEX jobs_wf ON jobs(wfuuid);
    CREATE TABLE pilots(
        id INTEGER PRIMARY KEY,
        uuid TEXT NOT NULL UNIQUE,
        host TEXT NOT NULL DEFAULT '',
        pid INTEGER,
        site TEXT NOT NULL DEFAULT '',
        jobtypes TEXT NOT NULL DEFAULT '[]',
        extra TEXT NOT NULL DEFAULT '',
        state TEXT NOT NULL,
        job TEXT,
        heartbeat REAL NOT NULL,
        directive TEXT,
        jobs_done INTEGER NOT NULL DEFAULT 0,
        ts_reg REAL NOT NULL,
        ts_beat REAL NOT NULL,
        ts_stop REAL
    );
    CREATE INDEX pilots_state ON pilots(state, ts_beat);
    CREATE TABLE sites(
        name TEXT PRIMARY KEY,
        period REAL,
        cycles INTEGER,
        heartbeat REAL,
        env TEXT NOT NULL DEFAULT '{}',
        ts REAL NOT NULL
    );
    CREATE TABLE events(
        id INTEGER PRIMARY KEY,
        ts REAL NOT NULL,
        kind TEXT NOT NULL,
        uuid TEXT NOT NULL,
        attempt INTEGER,
        old TEXT,
        new TEXT NOT NULL,
        who TEXT NOT NULL DEFAULT '',
        info TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX events_uuid ON events(uuid, id);
    CREATE INDEX events_ts ON events(ts);
    """,
    # v2: what the pages read, kept cheap at a million jobs: per-column indexes for filters and
    # sorts; job counts by state and jobtype, pilot counts by state and 10-second end buckets,
    # all maintained by triggers.
    """
    CREATE INDEX jobs_state_id ON jobs(state, id);
    CREATE INDEX jobs_jobtype_id ON jobs(jobtype, id);
    CREATE INDEX jobs_site_id ON jobs(site, id);
    CREATE INDEX jobs_user_id ON jobs(user, id);
    CREATE INDEX jobs_priority_id ON jobs(priority, id);
    CREATE INDEX jobs_ended ON jobs(state, ts_sto);
    CREATE INDEX jobs_ts_sto ON jobs(ts_sto, id);
    CREATE INDEX jobs_started ON jobs(ts_sta);
    CREATE INDEX jobs_def ON jobs(ts_def);
    CREATE INDEX pilots_host ON pilots(host);
    CREATE TABLE job_counts(state TEXT NOT NULL, jobtype TEXT NOT NULL, n INTEGER NOT NULL,
                            PRIMARY KEY(state, jobtype)) WITHOUT ROWID;
    INSERT INTO job_counts SELECT state, jobtype, COUNT(*) FROM jobs GROUP BY state, jobtype;
    CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs BEGIN
        INSERT INTO job_counts VALUES(new.state, new.jobtype, 1)
            ON CONFLICT(state, jobtype) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs BEGIN
        UPDATE job_counts SET n = n - 1 WHERE state = old.state AND jobtype = old.jobtype;
    END;
    CREATE TRIGGER jobs_count_update AFTER UPDATE OF state, jobtype ON jobs
    WHEN old.state IS NOT new.state OR old.jobtype IS NOT new.jobtype BEGIN
        UPDATE job_counts SET n = n - 1 WHERE state = old.state AND jobtype = old.jobtype;
        INSERT INTO job_counts VALUES(new.state, new.jobtype, 1)
            ON CONFLICT(state, jobtype) DO UPDATE SET n = n + 1;
    END;
    CREATE TABLE pilot_counts(state TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO pilot_counts SELECT state, COUNT(*) FROM pilots GROUP BY state;
    CREATE TRIGGER pilots_count_insert AFTER INSERT ON pilots BEGIN
        INSERT INTO pilot_counts VALUES(new.state, 1) ON CONFLICT(state) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER pilots_count_delete AFTER DELETE ON pilots BEGIN
        UPDATE pilot_counts SET n = n - 1 WHERE state = old.state;
    END;
    CREATE TRIGGER pilots_count_update AFTER UPDATE OF state ON pilots WHEN old.state IS NOT new.state BEGIN
        UPDATE pilot_counts SET n = n - 1 WHERE state = old.state;
        INSERT INTO pilot_counts VALUES(new.state, 1) ON CONFLICT(state) DO UPDATE SET n = n + 1;
    END;
    CREATE TABLE job_ends(bucket INTEGER NOT NULL, state TEXT NOT NULL, n INTEGER NOT NULL,
                          PRIMARY KEY(bucket, state)) WITHOUT ROWID;
    CREATE TRIGGER jobs_end AFTER UPDATE OF state ON jobs
    WHEN old.state IS NOT new.state
         AND new.state IN ('finished', 'failed', 'timeout', 'pilotTO', 'cancelled') BEGIN
        INSERT INTO job_ends VALUES(CAST(strftime('%s', 'now') AS INTEGER) / 10, new.state, 1)
            ON CONFLICT(bucket, state) DO UPDATE SET n = n + 1;
    END;
    """,
    # v3: workflows and data. A DAG template is vertices (jobs) and edges (files); a workflow is
    # a copy of it as jobs (wfuuid, vertex) and datasets (producer -> consumer job).
    """
    CREATE TABLE datatypes(name TEXT PRIMARY KEY, ext TEXT NOT NULL DEFAULT '');
    INSERT INTO datatypes VALUES('TXT', '.txt'), ('ROOT', '.root'), ('HDF5', '.h5'), ('JSON', '.json'),
                                ('CSV', '.csv'), ('PNG', '.png'), ('DATA', '.dat');
    CREATE TABLE dags(name TEXT PRIMARY KEY, description TEXT NOT NULL DEFAULT '', ts REAL NOT NULL);
    CREATE TABLE dag_vertices(dag TEXT NOT NULL REFERENCES dags(name) ON DELETE CASCADE, name TEXT NOT NULL,
                              payload TEXT NOT NULL, env TEXT NOT NULL, jobtype TEXT NOT NULL,
                              timelimit INTEGER NOT NULL, priority INTEGER NOT NULL, PRIMARY KEY(dag, name));
    CREATE TABLE dag_edges(dag TEXT NOT NULL REFERENCES dags(name) ON DELETE CASCADE, source TEXT NOT NULL,
                           target TEXT NOT NULL, name TEXT NOT NULL, dirpath TEXT NOT NULL,
                           datatype TEXT NOT NULL, datatag TEXT NOT NULL, comment TEXT NOT NULL,
                           PRIMARY KEY(dag, source, target));
    CREATE TABLE workflows(id INTEGER PRIMARY KEY, uuid TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
                           dag TEXT NOT NULL, description TEXT NOT NULL DEFAULT '', user TEXT NOT NULL DEFAULT '',
                           state TEXT NOT NULL, ts_def REAL NOT NULL, ts_sta REAL, ts_sto REAL);
    CREATE INDEX workflows_state ON workflows(state, id);
    CREATE INDEX workflows_dag ON workflows(dag, state);
    CREATE TABLE datasets(id INTEGER PRIMARY KEY, uuid TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
                          dirpath TEXT NOT NULL, datatype TEXT NOT NULL DEFAULT '', datatag TEXT NOT NULL DEFAULT '',
                          comment TEXT NOT NULL DEFAULT '', state TEXT NOT NULL, origin TEXT NOT NULL,
                          wfuuid TEXT, producer TEXT, consumer TEXT, size INTEGER, ts REAL NOT NULL);
    CREATE INDEX datasets_wf ON datasets(wfuuid);
    CREATE INDEX datasets_consumer ON datasets(consumer);
    CREATE INDEX datasets_producer ON datasets(producer);
    CREATE UNIQUE INDEX datasets_injected ON datasets(dirpath, name) WHERE origin = 'injected';
    """,
    # v4: each pilot's own secret (its SHA-256; the pilot chose it at registration), required
    # for its job requests, heartbeats, reports and stop; the pilot's log file. An injected file
    # is registered once per template (a DAG, or a jobs file), so two injectors with different
    # templates on one directory each start their work. Workflows are found by name.
    """
    ALTER TABLE pilots ADD COLUMN secret TEXT NOT NULL DEFAULT '';
    ALTER TABLE pilots ADD COLUMN log TEXT NOT NULL DEFAULT '';
    ALTER TABLE datasets ADD COLUMN template TEXT NOT NULL DEFAULT '';
    DROP INDEX datasets_injected;
    CREATE UNIQUE INDEX datasets_injected ON datasets(dirpath, name, template) WHERE origin = 'injected';
    CREATE INDEX workflows_name ON workflows(name, id);
    """,
    # v5: claims that do not grow with the backlog. The broker probes, per site ('' and the
    # pilot's) and per jobtype it takes, the first defined job in priority order of a partial
    # index holding only defined jobs; the job a pilot holds is found by (pilot, state). (The
    # old claim's index, jobs_broker_any, stays until v16.)
    """
    CREATE INDEX jobs_claim ON jobs(site, priority DESC, ts_def, id) WHERE state = 'defined';
    CREATE INDEX jobs_claim_type ON jobs(site, jobtype, priority DESC, ts_def, id) WHERE state = 'defined';
    CREATE INDEX jobs_pilot_state ON jobs(pilot, state);
    """,
    # v6: a site keeps the original's fields: the server its pilots use, the nominal number of
    # pilots and their nominal lifetime (seconds); the alarm's tolerance below nominal. A job
    # type may have a cap: the most of its jobs dispatched or running at once (0 suspends it).
    """
    ALTER TABLE sites ADD COLUMN server TEXT NOT NULL DEFAULT '';
    ALTER TABLE sites ADD COLUMN pilots INTEGER;
    ALTER TABLE sites ADD COLUMN pilotlife REAL;
    ALTER TABLE sites ADD COLUMN tolerance REAL;
    CREATE TABLE jobtypes(name TEXT PRIMARY KEY, cap INTEGER NOT NULL) WITHOUT ROWID;
    CREATE INDEX pilots_site ON pilots(site, state, ts_stop);
    CREATE TABLE waiting(site TEXT NOT NULL, jobtype TEXT NOT NULL, n INTEGER NOT NULL,
                         PRIMARY KEY(site, jobtype)) WITHOUT ROWID;
    INSERT INTO waiting SELECT site, jobtype, COUNT(*) FROM jobs WHERE state = 'defined' GROUP BY site, jobtype;
    CREATE TRIGGER jobs_waiting_insert AFTER INSERT ON jobs WHEN new.state = 'defined' BEGIN
        INSERT INTO waiting VALUES(new.site, new.jobtype, 1) ON CONFLICT(site, jobtype) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER jobs_waiting_delete AFTER DELETE ON jobs WHEN old.state = 'defined' BEGIN
        UPDATE waiting SET n = n - 1 WHERE site = old.site AND jobtype = old.jobtype;
    END;
    CREATE TRIGGER jobs_waiting_update AFTER UPDATE OF state, site, jobtype ON jobs
    WHEN old.state = 'defined' OR new.state = 'defined' BEGIN
        UPDATE waiting SET n = n - 1 WHERE old.state = 'defined' AND site = old.site AND jobtype = old.jobtype;
        INSERT INTO waiting SELECT new.site, new.jobtype, 1 WHERE new.state = 'defined'
            ON CONFLICT(site, jobtype) DO UPDATE SET n = n + 1;
    END;
    CREATE TABLE services(name TEXT PRIMARY KEY, host TEXT NOT NULL, period REAL NOT NULL,
                          result TEXT NOT NULL, ts REAL NOT NULL) WITHOUT ROWID;
    CREATE TABLE type_ends(bucket INTEGER NOT NULL, jobtype TEXT NOT NULL, state TEXT NOT NULL,
                           n INTEGER NOT NULL, PRIMARY KEY(bucket, jobtype, state)) WITHOUT ROWID;
    CREATE TRIGGER jobs_type_end AFTER UPDATE OF state ON jobs
    WHEN old.state IS NOT new.state
         AND new.state IN ('finished', 'failed', 'timeout', 'pilotTO', 'cancelled') BEGIN
        INSERT INTO type_ends VALUES(CAST(strftime('%s', 'now') AS INTEGER) / 60, new.jobtype, new.state, 1)
            ON CONFLICT(bucket, jobtype, state) DO UPDATE SET n = n + 1;
    END;
    """,
    # v7: end counts per minute also by the site of the pilot that ran the job (the sites page
    # shows each site's finished and failed jobs of the last hour); they replace type_ends.
    """
    CREATE TABLE ends(bucket INTEGER NOT NULL, jobtype TEXT NOT NULL, site TEXT NOT NULL, state TEXT NOT NULL,
                      n INTEGER NOT NULL, PRIMARY KEY(bucket, jobtype, site, state)) WITHOUT ROWID;
    INSERT INTO ends SELECT bucket, jobtype, '', state, n FROM type_ends;
    DROP TRIGGER jobs_type_end;
    DROP TABLE type_ends;
    CREATE TRIGGER jobs_ends AFTER UPDATE OF state ON jobs
    WHEN old.state IS NOT new.state
         AND new.state IN ('finished', 'failed', 'timeout', 'pilotTO', 'cancelled') BEGIN
        INSERT INTO ends VALUES(CAST(strftime('%s', 'now') AS INTEGER) / 60, new.jobtype,
                                COALESCE((SELECT site FROM pilots WHERE uuid = new.pilot), ''), new.state, 1)
            ON CONFLICT(bucket, jobtype, site, state) DO UPDATE SET n = n + 1;
    END;
    """,
    # v8: what a shifter reads. Each ended job's one-line reason (set when it ends; jobs ended
    # before keep their error message or exit code); failures counted per 10 minutes, jobtype and
    # normalised reason (the error summary); claims per minute and a per-minute sample of pilots
    # and queue (the activity charts); the images jobs published (their files beside the db).
    # The first claim index (state, jobtype, ...) goes: every state change paid for it, and the
    # claim indexes of v5 answer its last reader (why a job waits) as well.
    """
    ALTER TABLE jobs ADD COLUMN reason TEXT NOT NULL DEFAULT '';
    UPDATE jobs SET reason = CASE WHEN errmsg != '' THEN substr(errmsg, 1, 300)
                                  ELSE 'exit code ' || exit_code END
    WHERE state IN ('failed', 'timeout', 'pilotTO') AND (errmsg != '' OR exit_code IS NOT NULL);
    DROP INDEX jobs_broker;
    CREATE TABLE errors(bucket INTEGER NOT NULL, jobtype TEXT NOT NULL, reason TEXT NOT NULL, n INTEGER NOT NULL,
                        first REAL NOT NULL, last REAL NOT NULL, PRIMARY KEY(bucket, jobtype, reason)) WITHOUT ROWID;
    CREATE TABLE job_starts(bucket INTEGER PRIMARY KEY, n INTEGER NOT NULL);
    CREATE TRIGGER jobs_start AFTER UPDATE OF state ON jobs WHEN new.state = 'dispatched' BEGIN
        INSERT INTO job_starts VALUES(CAST(strftime('%s', 'now') AS INTEGER) / 60, 1)
            ON CONFLICT(bucket) DO UPDATE SET n = n + 1;
    END;
    CREATE TABLE samples(minute INTEGER PRIMARY KEY, pilots INTEGER NOT NULL, running INTEGER NOT NULL,
                         queued INTEGER NOT NULL);
    CREATE TABLE images(id INTEGER PRIMARY KEY, job TEXT NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL,
                        size INTEGER NOT NULL, jobtype TEXT NOT NULL, infile TEXT NOT NULL, ts REAL NOT NULL,
                        UNIQUE(job, name));
    CREATE INDEX images_jobtype ON images(jobtype, id);
    CREATE TRIGGER jobs_images_delete AFTER DELETE ON jobs BEGIN
        DELETE FROM images WHERE job = old.uuid;
    END;
    """,
    # v9: submissions all-or-nothing at any size. A submission too big for one request is sent as
    # parts, staged under its id (never claimable), and committed in one transaction; its id
    # answers "was it stored?" when the answer to the commit was lost. Staged parts that are
    # never committed expire. The published images' total size, kept by triggers (the store's cap).
    """
    CREATE TABLE submissions(id TEXT PRIMARY KEY, jobs INTEGER NOT NULL, ts REAL NOT NULL) WITHOUT ROWID;
    CREATE INDEX submissions_ts ON submissions(ts);
    CREATE TABLE staged(submission TEXT NOT NULL, part INTEGER NOT NULL, jobs TEXT NOT NULL, n INTEGER NOT NULL,
                        ts REAL NOT NULL, PRIMARY KEY(submission, part)) WITHOUT ROWID;
    CREATE INDEX staged_ts ON staged(ts);
    CREATE TABLE image_store(id INTEGER PRIMARY KEY CHECK (id = 1), bytes INTEGER NOT NULL, n INTEGER NOT NULL);
    INSERT INTO image_store SELECT 1, COALESCE(SUM(size), 0), COUNT(*) FROM images;
    CREATE TRIGGER images_store_insert AFTER INSERT ON images BEGIN
        UPDATE image_store SET bytes = bytes + new.size, n = n + 1;
    END;
    CREATE TRIGGER images_store_delete AFTER DELETE ON images BEGIN
        UPDATE image_store SET bytes = bytes - old.size, n = n - 1;
    END;
    """,
    # v10: unattended production. A pilot factory's requests (a site, how many pilots it started
    # and how many of them registered: the pending pilots a batch queue still holds); the
    # request, free disk and note of each pilot; a site's factory command and period and how long
    # its workers keep job files; services with an optional period, a retirement and a history.
    """
    ALTER TABLE sites ADD COLUMN factory TEXT NOT NULL DEFAULT '';
    ALTER TABLE sites ADD COLUMN factory_period REAL;
    ALTER TABLE sites ADD COLUMN keep_hours REAL;
    ALTER TABLE pilots ADD COLUMN request TEXT;
    ALTER TABLE pilots ADD COLUMN free_mb REAL;
    ALTER TABLE pilots ADD COLUMN note TEXT NOT NULL DEFAULT '';
    CREATE INDEX pilots_request ON pilots(request) WHERE request IS NOT NULL;
    CREATE TABLE requests(id TEXT PRIMARY KEY, site TEXT NOT NULL, count INTEGER NOT NULL,
                          registered INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, ts REAL NOT NULL,
                          expires REAL NOT NULL) WITHOUT ROWID;
    CREATE INDEX requests_site ON requests(site, ts);
    ALTER TABLE services ADD COLUMN retired REAL;
    CREATE TABLE service_lines(id INTEGER PRIMARY KEY, name TEXT NOT NULL, result TEXT NOT NULL, ts REAL NOT NULL);
    CREATE INDEX service_lines_name ON service_lines(name, id);
    CREATE INDEX datasets_loose ON datasets(ts) WHERE wfuuid IS NULL;
    """,
    # v11: alarms with a memory. The alarms raised now (since when, whether a person was told),
    # their history (raised, changed, acknowledged, silenced, cleared), and the acknowledgements
    # and silences people gave, by alarm name and optionally site or job type.
    """
    CREATE TABLE alarm_state(key TEXT PRIMARY KEY, name TEXT NOT NULL, severity TEXT NOT NULL,
                             message TEXT NOT NULL, link TEXT NOT NULL, since REAL NOT NULL,
                             sent INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
    CREATE TABLE alarm_events(id INTEGER PRIMARY KEY, ts REAL NOT NULL, key TEXT NOT NULL, name TEXT NOT NULL,
                              kind TEXT NOT NULL, severity TEXT NOT NULL DEFAULT '', message TEXT NOT NULL DEFAULT '',
                              who TEXT NOT NULL DEFAULT '', why TEXT NOT NULL DEFAULT '', until REAL);
    CREATE INDEX alarm_events_ts ON alarm_events(ts);
    CREATE TABLE alarm_acks(id INTEGER PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL,
                            site TEXT NOT NULL DEFAULT '', jobtype TEXT NOT NULL DEFAULT '', who TEXT NOT NULL,
                            why TEXT NOT NULL, until REAL, ts REAL NOT NULL);
    """,
    # v12: what each job consumed (CPU, peak memory, I/O, output size, as its pilot measured)
    # and the limits it ran under (memory, disk; a site's default); a histogram per job type and
    # 10 minutes of what its jobs took (duration, memory, CPU efficiency; the job type's page
    # reads medians and p95 from it, never the jobs); where each job ran (its
    # pilot's site, beside the site it asked for), and failures
    # counted by the site and host they happened at (a bad node stands out); the input files
    # in the order they arrived, for the run grid (rows are files; a bounded read, never a scan
    # of jobs); a datatype's comment (the original's Data Types page).
    """
    ALTER TABLE jobs ADD COLUMN ran_site TEXT;
    ALTER TABLE jobs ADD COLUMN memory INTEGER;
    ALTER TABLE jobs ADD COLUMN disk INTEGER;
    ALTER TABLE jobs ADD COLUMN cpu_user REAL;
    ALTER TABLE jobs ADD COLUMN cpu_sys REAL;
    ALTER TABLE jobs ADD COLUMN max_rss_mb REAL;
    ALTER TABLE jobs ADD COLUMN read_bytes INTEGER;
    ALTER TABLE jobs ADD COLUMN write_bytes INTEGER;
    ALTER TABLE jobs ADD COLUMN output_bytes INTEGER;
    ALTER TABLE sites ADD COLUMN memory INTEGER;
    ALTER TABLE sites ADD COLUMN disk INTEGER;
    CREATE INDEX jobs_ran_site ON jobs(ran_site, id) WHERE ran_site IS NOT NULL;
    CREATE INDEX jobs_infile ON jobs(infile, jobtype) WHERE infile != '';
    CREATE TABLE inputs(infile TEXT PRIMARY KEY, ts REAL NOT NULL) WITHOUT ROWID;
    CREATE INDEX inputs_ts ON inputs(ts);
    INSERT OR IGNORE INTO inputs SELECT infile, MIN(ts_def) FROM jobs WHERE infile != '' GROUP BY infile;
    CREATE TRIGGER jobs_inputs AFTER INSERT ON jobs WHEN new.infile != '' BEGIN
        INSERT OR IGNORE INTO inputs VALUES(new.infile, new.ts_def);
    END;
    ALTER TABLE datatypes ADD COLUMN comment TEXT NOT NULL DEFAULT '';
    CREATE TABLE profiles(bucket INTEGER NOT NULL, jobtype TEXT NOT NULL, metric TEXT NOT NULL, bin INTEGER NOT NULL,
                          n INTEGER NOT NULL, PRIMARY KEY(bucket, jobtype, metric, bin)) WITHOUT ROWID;
    CREATE TABLE error_places(bucket INTEGER NOT NULL, site TEXT NOT NULL, host TEXT NOT NULL, jobtype TEXT NOT NULL,
                              reason TEXT NOT NULL, n INTEGER NOT NULL,
                              PRIMARY KEY(bucket, site, host, jobtype, reason)) WITHOUT ROWID;
    CREATE INDEX error_places_error ON error_places(jobtype, reason, bucket);
    CREATE TABLE error_hosts(bucket INTEGER NOT NULL, site TEXT NOT NULL, host TEXT NOT NULL, n INTEGER NOT NULL,
                             PRIMARY KEY(bucket, site, host)) WITHOUT ROWID;
    """,
    # v13: each failed attempt, a retried job's too, so the error summary's counts can be listed
    """
    CREATE TABLE attempt_failures(id INTEGER PRIMARY KEY, ts REAL NOT NULL, uuid TEXT NOT NULL,
                                  attempt INTEGER NOT NULL, jobtype TEXT NOT NULL, state TEXT NOT NULL,
                                  exit_code INTEGER, site TEXT NOT NULL, host TEXT NOT NULL,
                                  reason TEXT NOT NULL, line TEXT NOT NULL);
    CREATE INDEX attempt_failures_ts ON attempt_failures(ts);
    CREATE INDEX attempt_failures_error ON attempt_failures(jobtype, reason, ts);
    """,
    # v14: is the data good? A finished job's verdict (the worst of the checks its payload wrote
    # to verdict.json: OK, WARNING, INVALID, BAD), the check that made it so, and a note (a file
    # refused, and why); the checks and metrics themselves, gone with their job. The partial
    # index holds only bad verdicts: the bad_data alarm reads it, nothing else pays for it.
    # Job types paused (by the circuit breaker or a person; `paused` NULL: running again, since
    # `resumed`), whose queued jobs stay queued and are handed to no pilot. Per job type, bands
    # (warn and error ranges) that judge a metric when the payload gave no verdict, and a
    # reference run (and its job) whose plots and metrics each job is shown beside, and a deadline
    # from a file's arrival to the end of its job of the type (late_run). A submission's digest
    # (what job.py read, before uuids), so a blind rerun of a file is caught. The data streams:
    # by directory, when a file last arrived (injected or registered), for no_new_work. When a
    # site first had its nominal pilots live (NULL: never since it was defined). Notes a person
    # leaves on a run, a file or a job ("HV trip at 14:02, ignore run 5012"), who and when.
    """
    ALTER TABLE jobs ADD COLUMN verdict TEXT;
    ALTER TABLE jobs ADD COLUMN verdict_check TEXT;
    ALTER TABLE jobs ADD COLUMN verdict_note TEXT NOT NULL DEFAULT '';
    CREATE INDEX jobs_bad ON jobs(ts_sto) WHERE verdict IN ('BAD', 'INVALID');
    CREATE TABLE checks(uuid TEXT NOT NULL, name TEXT NOT NULL, result TEXT NOT NULL, message TEXT NOT NULL,
                        PRIMARY KEY(uuid, name)) WITHOUT ROWID;
    CREATE TABLE metrics(uuid TEXT NOT NULL, name TEXT NOT NULL, value REAL NOT NULL, jobtype TEXT NOT NULL,
                         infile TEXT NOT NULL, ts REAL NOT NULL, PRIMARY KEY(uuid, name)) WITHOUT ROWID;
    CREATE INDEX metrics_trend ON metrics(jobtype, name, ts);
    CREATE TABLE bands(jobtype TEXT NOT NULL, metric TEXT NOT NULL, warn_low REAL, warn_high REAL,
                       error_low REAL, error_high REAL, needs TEXT, needs_min REAL,
                       PRIMARY KEY(jobtype, metric)) WITHOUT ROWID;
    CREATE TABLE deadlines(jobtype TEXT PRIMARY KEY, seconds REAL NOT NULL) WITHOUT ROWID;
    CREATE TABLE refs(jobtype TEXT PRIMARY KEY, run INTEGER NOT NULL, job TEXT NOT NULL, who TEXT NOT NULL,
                      why TEXT NOT NULL, ts REAL NOT NULL) WITHOUT ROWID;
    ALTER TABLE sites ADD COLUMN met REAL;
    CREATE TABLE notes(id INTEGER PRIMARY KEY, kind TEXT NOT NULL, target TEXT NOT NULL, text TEXT NOT NULL,
                       who TEXT NOT NULL, hide INTEGER NOT NULL DEFAULT 0, ts REAL NOT NULL);
    CREATE INDEX notes_target ON notes(kind, target);
    CREATE INDEX notes_ts ON notes(ts);
    CREATE TABLE arrivals(dirpath TEXT PRIMARY KEY, ts REAL NOT NULL, n INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO arrivals SELECT dirpath, MAX(ts), COUNT(*) FROM datasets WHERE origin != 'edge' GROUP BY dirpath;
    ALTER TABLE submissions ADD COLUMN digest TEXT;
    CREATE INDEX submissions_digest ON submissions(digest, ts) WHERE digest IS NOT NULL;
    CREATE TABLE pauses(jobtype TEXT PRIMARY KEY, paused REAL, who TEXT NOT NULL, why TEXT NOT NULL,
                        resumed REAL) WITHOUT ROWID;
    CREATE TRIGGER jobs_quality_delete AFTER DELETE ON jobs BEGIN
        DELETE FROM checks WHERE uuid = old.uuid;
        DELETE FROM metrics WHERE uuid = old.uuid;
    END;
    """,
    # v15: named users. Each has a role and a token, kept only as its sha256 (a stolen database
    # holds no usable token); the pages' sessions, each a sha256 too, with the CSRF token its
    # forms carry and when it expires. The run grid's column order saved for a stream (the
    # directory of its input files), so it no longer moves between refreshes. Each job's
    # provenance, as its pilot recorded it (JSON: payload files' sha256 and git describe, the
    # input's size, mtime and adler32, versions, environment digest, where), gone with the job.
    # A site's floor: the warm pilots it keeps while no work waits (nominal while some does);
    # its probe, a command its pilots run once a heartbeat and take no job while it fails; its
    # canary, a small job the server submits to it every canary_period (jobtype CANARY); the
    # commands its factory asks the batch system with, and removes held batch jobs with.
    """
    CREATE TABLE users(name TEXT PRIMARY KEY, role TEXT NOT NULL, token_sha256 TEXT NOT NULL UNIQUE,
                       created REAL NOT NULL) WITHOUT ROWID;
    CREATE TABLE sessions(id_sha256 TEXT PRIMARY KEY, user TEXT NOT NULL, csrf TEXT NOT NULL,
                          expires REAL NOT NULL) WITHOUT ROWID;
    CREATE TABLE grid_orders(stream TEXT PRIMARY KEY, types TEXT NOT NULL, who TEXT NOT NULL,
                             ts REAL NOT NULL) WITHOUT ROWID;
    CREATE TABLE provenance(uuid TEXT PRIMARY KEY, data TEXT NOT NULL) WITHOUT ROWID;
    CREATE INDEX datasets_template ON datasets(template, ts) WHERE origin = 'injected';
    ALTER TABLE sites ADD COLUMN floor INTEGER;
    ALTER TABLE sites ADD COLUMN probe TEXT NOT NULL DEFAULT '';
    ALTER TABLE sites ADD COLUMN canary TEXT NOT NULL DEFAULT '';
    ALTER TABLE sites ADD COLUMN canary_period REAL;
    ALTER TABLE sites ADD COLUMN factory_status TEXT NOT NULL DEFAULT '';
    ALTER TABLE sites ADD COLUMN factory_remove TEXT NOT NULL DEFAULT '';
    CREATE TRIGGER jobs_provenance_delete AFTER DELETE ON jobs BEGIN
        DELETE FROM provenance WHERE uuid = old.uuid;
    END;
    """,
    # v16: fewer pages a job's commit writes (34 at one pilot: each one a WAL frame). A job's
    # provenance is kept by its job's id, not its uuid: consecutive jobs append to one page,
    # where random uuids wrote a random page and split it every few jobs. Ended jobs alone are in
    # jobs_ended (purges read it by end time): a claim no longer moves an entry in it. The
    # priority index of all states goes: nothing reads it since v5's claim indexes.
    """
    CREATE TABLE provenance_by_job(job INTEGER PRIMARY KEY, data TEXT NOT NULL);
    INSERT INTO provenance_by_job SELECT j.id, p.data FROM provenance p JOIN jobs j ON j.uuid = p.uuid;
    DROP TRIGGER jobs_provenance_delete;
    DROP TABLE provenance;
    ALTER TABLE provenance_by_job RENAME TO provenance;
    CREATE TRIGGER jobs_provenance_delete AFTER DELETE ON jobs BEGIN
        DELETE FROM provenance WHERE job = old.id;
    END;
    DROP INDEX jobs_ended;
    CREATE INDEX jobs_ended ON jobs(state, ts_sto) WHERE ts_sto IS NOT NULL;
    DROP INDEX jobs_broker_any;
    """,
    # v17: the job a pilot keeps in reserve (claimed ahead of its need, not started yet): a
    # pilot that dies holding one gives it back as it was, no attempt used.
    """
    ALTER TABLE pilots ADD COLUMN reserve TEXT;
    """,
    # v18: fewer index entries a job moves (a page each in its commit). The jobs a pilot holds
    # are found in an index of held jobs alone (tiny: a claim adds one entry, an end removes it),
    # not one of every job by pilot and state, where each change moved an entry between states.
    # The jobs by pilot, by start and by end hold only jobs that have one: a claim, a start or an
    # end no longer removes an entry from the section of those that have none. The history's
    # time index goes: nothing reads it.
    """
    DROP INDEX jobs_pilot_state;
    CREATE INDEX jobs_held ON jobs(pilot) WHERE state IN ('dispatched', 'running');
    DROP INDEX jobs_pilot;
    CREATE INDEX jobs_pilot ON jobs(pilot, id) WHERE pilot IS NOT NULL;
    DROP INDEX jobs_started;
    CREATE INDEX jobs_started ON jobs(ts_sta) WHERE ts_sta IS NOT NULL;
    DROP INDEX jobs_ts_sto;
    CREATE INDEX jobs_ts_sto ON jobs(ts_sto, id) WHERE ts_sto IS NOT NULL;
    DROP INDEX events_ts;
    """,
    # v19: the time-bucketed counts of starts and ends are tallied in memory (TALLIES) and
    # written by housekeeping: a job's commit no longer writes a page of each of three tables.
    """
    DROP TRIGGER jobs_start;
    DROP TRIGGER jobs_end;
    DROP TRIGGER jobs_ends;
    """,
    # v20: a job's history is found by its job's id, not its uuid: the history rows of
    # consecutive jobs share an index page, where each random uuid wrote a page of its own (four
    # a commit). The uuid index keeps the rest (pilots, workflows, pauses, a deleted job's last
    # row); a job's rows go with it, so that a reused id never shows another job's history.
    """
    ALTER TABLE events ADD COLUMN job INTEGER;
    UPDATE events SET job = (SELECT id FROM jobs WHERE jobs.uuid = events.uuid) WHERE kind = 'job';
    DROP INDEX events_uuid;
    CREATE INDEX events_job ON events(job, id) WHERE job IS NOT NULL;
    CREATE INDEX events_uuid ON events(uuid, id) WHERE job IS NULL;
    CREATE TRIGGER jobs_events_delete AFTER DELETE ON jobs BEGIN
        DELETE FROM events WHERE job = old.id;
    END;
    """,
    # v21: the history's last row whose counts were written (move_tallies): a server killed
    # before its tallies were written recounts them from the history after it (recount_tallies).
    """
    CREATE TABLE tallied(id INTEGER PRIMARY KEY CHECK (id = 0), event INTEGER NOT NULL);
    INSERT INTO tallied VALUES(0, (SELECT COALESCE(MAX(id), 0) FROM events));
    """,
]

# The starts and ends of jobs, counted per time bucket for the charts, the summary, the sites
# page and the failure alarms, as the triggers of v2, v7 and v8 counted them, but in the writer's
# own in-memory (TEMP) tables: they are part of each transaction (a block rolled back takes its
# counts with it), cost no WAL page and no fsync, and housekeeping moves them into the tables
# the readers read (move_tallies) at every pass and at shutdown. So the readers see them at most
# a pass late. Each move records the history's last row (v21): a server killed before a move
# recounts the ends and starts after it from the history when it starts again (recount_tallies).
TALLIED = {"job_starts": "bucket", "job_ends": "bucket, state", "ends": "bucket, jobtype, site, state"}
ENDED = "(" + ", ".join(f"'{state}'" for state in END_JOB_STATES) + ")"    # as SQL: for the trigger and the recount
MARK_TALLIED = "UPDATE tallied SET event = (SELECT COALESCE(MAX(id), 0) FROM events)"
TALLIES = f"""
CREATE TEMP TABLE tally_job_starts(bucket INTEGER PRIMARY KEY, n INTEGER NOT NULL);
CREATE TEMP TABLE tally_job_ends(bucket INTEGER NOT NULL, state TEXT NOT NULL, n INTEGER NOT NULL,
                                 PRIMARY KEY(bucket, state)) WITHOUT ROWID;
CREATE TEMP TABLE tally_ends(bucket INTEGER NOT NULL, jobtype TEXT NOT NULL, site TEXT NOT NULL, state TEXT NOT NULL,
                             n INTEGER NOT NULL, PRIMARY KEY(bucket, jobtype, site, state)) WITHOUT ROWID;
CREATE TEMP TRIGGER tally_start AFTER UPDATE OF state ON main.jobs WHEN new.state = 'dispatched' BEGIN
    INSERT INTO tally_job_starts VALUES(CAST(strftime('%s', 'now') AS INTEGER) / 60, 1)
        ON CONFLICT(bucket) DO UPDATE SET n = n + 1;
END;
CREATE TEMP TRIGGER tally_end AFTER UPDATE OF state ON main.jobs
WHEN old.state IS NOT new.state AND new.state IN {ENDED} BEGIN
    INSERT INTO tally_job_ends VALUES(CAST(strftime('%s', 'now') AS INTEGER) / 10, new.state, 1)
        ON CONFLICT(bucket, state) DO UPDATE SET n = n + 1;
    INSERT INTO tally_ends VALUES(CAST(strftime('%s', 'now') AS INTEGER) / 60, new.jobtype,
                                  COALESCE(new.ran_site, ''), new.state, 1)
        ON CONFLICT(bucket, jobtype, site, state) DO UPDATE SET n = n + 1;
END;
"""


def move_tallies(conn):
    """Add the counts tallied since the last move to the tables the readers read (TALLIES), and
    mark the history's last row as counted: the write lock is held, so every committed change
    before it is in the tallies, and none after it."""
    for table, key in TALLIED.items():
        add_counts(conn, table, key, f"SELECT * FROM temp.tally_{table} WHERE 1")
        conn.execute(f"DELETE FROM temp.tally_{table}")
    conn.execute(MARK_TALLIED)


def add_counts(conn, table, key, select, args=()):
    """Add the counts `select` finds to `table` (its WHERE clause avoids a parsing ambiguity)."""
    conn.execute(f"INSERT INTO main.{table} {select} ON CONFLICT({key}) DO UPDATE SET n = n + excluded.n", args)


RECOUNTS = {    # the counts of the job changes after a history row, as the TEMP triggers count them
    "job_starts": "SELECT CAST(e.ts AS INTEGER) / 60, COUNT(*) FROM events e WHERE e.id > ? AND e.kind = 'job' "
                  "AND e.new = 'dispatched' GROUP BY 1",
    "job_ends": f"SELECT CAST(e.ts AS INTEGER) / 10, e.new, COUNT(*) FROM events e WHERE e.id > ? AND e.kind = 'job' "
                f"AND e.new IN {ENDED} AND e.old IS NOT e.new GROUP BY 1, 2",
    "ends": f"SELECT CAST(e.ts AS INTEGER) / 60, j.jobtype, COALESCE(j.ran_site, ''), e.new, COUNT(*) FROM events e "
            f"JOIN jobs j ON j.id = e.job WHERE e.id > ? AND e.kind = 'job' AND e.new IN {ENDED} "
            f"AND e.old IS NOT e.new GROUP BY 1, 2, 3, 4",
}


def recount_tallies(conn):
    """At start: the counts a server killed before its last move lost, from the history after
    the last row counted (dated as the history dates them). A clean stop leaves none."""
    mark = conn.execute("SELECT event FROM tallied").fetchone()[0]
    for table, key in TALLIED.items():
        add_counts(conn, table, key, RECOUNTS[table], (mark,))
    conn.execute(MARK_TALLIED)


def statements(script):
    """Split a migration into whole statements (a trigger body holds several ';')."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""


BUSY_MS = 30000         # how long a connection waits for a lock another one holds (an outside shell)


@contextlib.contextmanager
def busy_timeout(conn, ms):
    """Within the block, `conn` waits at most `ms` for a lock another connection holds."""
    conn.execute(f"PRAGMA busy_timeout={int(ms)}")
    try:
        yield conn
    finally:
        conn.execute(f"PRAGMA busy_timeout={BUSY_MS}")


def connect(path):
    """Open a connection tuned for many short transactions from many threads."""
    conn = sqlite3.connect(path, timeout=BUSY_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={BUSY_MS}")
    conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
    # a statement journal (an UPDATE with triggers has one) stays in memory: otherwise a
    # temporary file is created and deleted in every transaction that writes a job
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


def rollback(conn):
    """ROLLBACK if a transaction is still open: sqlite ends it by itself on some errors (a full
    disk), and a ROLLBACK then would raise and mask the error that matters."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def migrate(conn):
    """Bring the schema forward from PRAGMA user_version; each step in its own transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise StartupError(f"database schema v{version} is newer than this server (v{len(MIGRATIONS)})")
    for step in range(version, len(MIGRATIONS)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements(MIGRATIONS[step]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={step + 1}")
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
    return len(MIGRATIONS)


################################################################################################
# Validation: every request field is checked here, so the store only ever sees clean values.
################################################################################################
def as_int(value, field, minimum=None, maximum=None):
    """Accept ints and the original p3s's numeric strings ("100"); refuse floats, bools, junk,
    and anything outside [minimum, maximum] (a 64-bit integer at most)."""
    if isinstance(value, bool):
        raise bad(f"{field}: must be an integer, got {json.dumps(value)}")
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,30}\s*", value):
        value = int(value)
    if not isinstance(value, int):
        raise bad(f"{field}: must be an integer, got {json.dumps(value)[:40]}")
    if not -INT64 <= value < INT64:
        raise bad(f"{field}: out of range (a 64-bit integer)")
    return in_range(value, field, minimum, maximum)


def in_range(value, field, minimum, maximum):
    if minimum is not None and value < minimum:
        raise bad(f"{field}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise bad(f"{field}: must be <= {maximum}, got {value:.6g}")
    return value


def as_number(value, field, minimum=None, maximum=None):
    """A finite number (or a numeric string) within [minimum, maximum]."""
    if isinstance(value, bool):
        raise bad(f"{field}: must be a number, got {json.dumps(value)}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise bad(f"{field}: must be a number, got {json.dumps(value)}") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{field}: must be a finite number, got {str(value)[:40]}")
    return in_range(value, field, minimum, maximum)


def as_str(value, field, allow_empty=True, max_len=65536):
    if not isinstance(value, str):
        raise bad(f"{field}: must be a string, got {json.dumps(value)}")
    if not allow_empty and not value.strip():
        raise bad(f"{field}: must not be empty")
    if len(value) > max_len:
        raise bad(f"{field}: longer than {max_len} characters")
    return value


def as_env(value, field):
    """A payload's environment map (a job's, a DAG vertex's, a site's): string keys to string
    values (numbers are turned into strings). The names the pilot sets for each job are refused:
    a site or job that set them would make jobs write over each other."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise bad(f"{field}: not a JSON object") from None
    if not isinstance(value, dict):
        raise bad(f"{field}: must be an object of NAME: value, got {json.dumps(value)}")
    env = {}
    for key, val in value.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise bad(f"{field}: {key!r} is not a valid environment variable name")
        if key in PER_JOB_ENV:
            raise bad(f"{field}: {key} is set by the pilot for each job; a job or site cannot set it")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)):
            raise bad(f"{field}.{key}: must be a string, got {json.dumps(val)}")
        env[key] = str(val)
    return env


CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def as_uuid(value, field):
    """The canonical form of a UUID given in any form uuid.UUID reads (most come canonical
    already: a pilot's three a report, matched without building a UUID)."""
    if isinstance(value, str) and CANONICAL_UUID.fullmatch(value):
        return value
    try:
        return str(uuidlib.UUID(as_str(value, field)))
    except ValueError:
        raise bad(f"{field}: not a UUID: {value!r}") from None


def as_choice(value, field, choices):
    if value not in choices:
        raise bad(f"{field}: unknown value {value!r}; expected one of {', '.join(choices)}")
    return value


def check_keys(obj, field, allowed):
    if not isinstance(obj, dict):
        raise bad(f"{field}: must be a JSON object")
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise bad(f"{field}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def parse_json_body(raw):
    """A request body: a JSON object of finite numbers and valid Unicode, or a 400 saying why.
    UTF-8 only (RFC 8259), decoded strictly, so a lone surrogate can only come from a \\u escape:
    only a body with one is encoded again to find it."""
    def no_constant(name):
        raise ValueError(f"{name} is not a JSON number")
    try:
        text = raw.decode("utf-8-sig")
        body = json.loads(text, parse_constant=no_constant)
        if "\\u" in text:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise bad("body: nested too deeply") from None
    except UnicodeDecodeError as e:
        raise bad(f"body: not UTF-8 (byte {e.start}); JSON is sent as UTF-8") from None
    except UnicodeError:
        raise bad("body: not valid Unicode (a lone surrogate?)") from None
    except ValueError as e:
        raise bad(f"body: malformed JSON ({e})") from None
    if not isinstance(body, dict):
        raise bad("body: must be a JSON object")
    return body


JOB_KEYS = ("uuid", "name", "user", "jobtype", "payload", "params", "env", "priority",
            "timeout", "timelimit", "state", "site", "max_attempts", "infile", "memory", "disk", "tag")
MAX_LIMIT_MB = 2 ** 30              # a memory or disk limit, in MB: a petabyte at most


def validate_job(obj, field):
    """Check one submitted job description and return the row to insert."""
    check_keys(obj, field, JOB_KEYS)
    if "timeout" in obj and "timelimit" in obj:
        raise bad(f"{field}: give either timeout or timelimit, not both")
    if "payload" not in obj:
        raise bad(f"{field}.payload: missing (the command or executable the job runs)")
    job = {
        "uuid": as_uuid(obj["uuid"], f"{field}.uuid") if "uuid" in obj else str(uuidlib.uuid4()),
        "name": as_str(obj.get("name", ""), f"{field}.name", max_len=256),
        "user": as_str(obj.get("user", ""), f"{field}.user", max_len=64),
        "jobtype": as_str(obj.get("jobtype", "default"), f"{field}.jobtype", False, 64),
        "payload": as_str(obj["payload"], f"{field}.payload", allow_empty=False),
        "params": as_str(obj.get("params", ""), f"{field}.params"),
        "env": json.dumps(as_env(obj.get("env", {}), f"{field}.env"), sort_keys=True),
        "priority": as_int(obj.get("priority", 0), f"{field}.priority"),
        "site": as_str(obj.get("site", ""), f"{field}.site", max_len=64),
        "state": as_choice(obj.get("state", "defined"), f"{field}.state", ("defined", "template")),
        "max_attempts": as_int(obj.get("max_attempts", 1), f"{field}.max_attempts", 1),
        "infile": as_str(obj.get("infile", ""), f"{field}.infile", max_len=4096),
    }
    job["infile"] = whole_path(job["infile"], json.loads(job["env"]))
    if obj.get("tag"):              # a reprocessing campaign's job: a type of its own, TYPE@TAG
        job["jobtype"] = as_str(f"{job['jobtype']}@{obj['tag']}", f"{field}.tag", max_len=64 + 33)
    limit_key = "timelimit" if "timelimit" in obj else "timeout"
    job["timelimit"] = as_int(obj.get(limit_key, 3600), f"{field}.{limit_key}", 0)
    for key in ("memory", "disk"):          # MB; none: no limit (or the site's)
        job[key] = None if obj.get(key) is None else as_int(obj[key], f"{field}.{key}", 1, MAX_LIMIT_MB)
    return job


def whole_path(infile, env):
    """A job's input file as one path however the job names it: a bare name (the original's
    P3S_INPUT_FILE) joined to an absolute P3S_INPUT_DIR, so that a job naming the file by path and
    one naming it by bare name are one row of the run grid. (A relative P3S_INPUT_DIR is the
    site's to resolve, on the pilot.)"""
    directory = env.get("P3S_INPUT_DIR", "")
    if infile and "/" not in infile and os.path.isabs(directory):
        return os.path.join(directory, infile)
    return infile


def closest_jobtype(name, known):
    """The known job type `name` is most likely a typo of, or None."""
    def digitless(x):
        return re.sub(r"\d+", "", x)
    near = difflib.get_close_matches(name, [k for k in known if digitless(k) != digitless(name)], 1, 0.85)
    return near[0] if near else None


MAX_PROVENANCE = 16384      # bytes of a job's provenance JSON kept


PROVENANCE_OF = "SELECT data FROM provenance WHERE job = (SELECT id FROM jobs WHERE uuid=?)"


def provenance_json(value):
    """A pilot's record of what ran, as stored: a JSON object of at most MAX_PROVENANCE bytes
    (a bigger or malformed one is replaced by a note saying so: the report still counts)."""
    if value is None:
        return None
    text = json.dumps(value, sort_keys=True)
    if not isinstance(value, dict):
        return json.dumps({"error": "the pilot's provenance was not an object"})
    if len(text) > MAX_PROVENANCE:
        return json.dumps({"error": f"the pilot's provenance was {len(text)} bytes, over {MAX_PROVENANCE}"})
    return text


def copied_job(template, infile, tag="", set_env=None):
    """A new job for `infile` made from another job's row (its payload, env, limits): a
    reprocessing campaign's (tagged: TYPE@TAG), or a file's that a DAQ posts by template."""
    env = json.loads(template["env"])
    given = env.get("P3S_INPUT_FILE")
    if given and given == template["infile"]:
        env["P3S_INPUT_FILE"] = infile
    elif given and given == os.path.basename(template["infile"]):     # a bare name (P3S_INPUT_DIR)
        env["P3S_INPUT_FILE"] = os.path.basename(infile)
    env.update(set_env or {})
    job = {k: template[k] for k in ("name", "payload", "params", "priority", "timelimit", "site", "max_attempts",
                                    "memory", "disk")}
    return {**job, "uuid": str(uuidlib.uuid4()), "jobtype": f"{template['jobtype']}@{tag}" if tag else
            template["jobtype"], "env": env, "infile": infile, "from": template["uuid"]}


def validate_submission(body):
    jobs = body.get("jobs") if isinstance(body, dict) else None
    if not isinstance(jobs, list) or not jobs:
        raise bad("jobs: must be a non-empty list of job objects")
    if len(jobs) > MAX_JOBS_PER_SUBMISSION:
        raise bad(f"jobs: at most {MAX_JOBS_PER_SUBMISSION} jobs per request; send more as parts "
                  "of one submission (job.py does)")
    rows = [validate_job(obj, f"jobs[{i}]") for i, obj in enumerate(jobs)]
    if len({r["uuid"] for r in rows}) != len(rows):
        raise bad("jobs: the same uuid appears twice in one submission")
    return rows


def valid_checks(value):
    """verdict.json's checks, [{"check", "result", "message"}], as (name, RESULT, message) rows;
    ValueError saying what is wrong. A message past MAX_CHECK_MESSAGE is cut, not refused."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_CHECKS:
        raise ValueError(f"a list of at most {MAX_CHECKS} checks is expected")
    rows, names = [], set()
    for i, check in enumerate(value, 1):
        if not isinstance(check, dict) or not set(check) <= {"check", "result", "message"}:
            raise ValueError(f"check {i}: an object with check, result and message is expected")
        name, result = check.get("check"), check.get("result")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_QUALITY_NAME or name in names:
            raise ValueError(f"check {i}: a unique name of 1 to {MAX_QUALITY_NAME} characters is expected")
        if not isinstance(result, str) or result.upper() not in VERDICTS:
            raise ValueError(f"check {name[:40]!r}: result {str(result)[:20]!r} is not one of {', '.join(VERDICTS)}")
        message = check.get("message", "")
        if not isinstance(message, str):
            raise ValueError(f"check {name[:40]!r}: message must be text")
        names.add(name)
        rows.append((name, result.upper(), message[:MAX_CHECK_MESSAGE]))
    return rows


def valid_metrics(value):
    """metrics.json, {"name": number}, as (name, value) rows; ValueError saying what is wrong."""
    if value is None:
        return []
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise ValueError(f"an object of at most {MAX_METRICS} metrics by name is expected")
    for name, number in value.items():
        if not 0 < len(name) <= MAX_QUALITY_NAME:
            raise ValueError(f"a metric's name has 1 to {MAX_QUALITY_NAME} characters")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number) \
                or abs(number) >= 2 ** 63:
            raise ValueError(f"metric {name[:40]!r}: {str(number)[:20]} is not a finite number")
    return [(name, float(number)) for name, number in value.items()]


def judge_quality(body):
    """A finished job's verdict from its end report: (job columns, check rows, metric rows).
    What a payload wrote is checked here; a file that fails the checks gives no verdict (or no
    metrics) and a note that says why, which the job page shows: never a refused end report."""
    notes = [as_str(body.get("quality_error", ""), "quality_error", max_len=1024)]
    checks, metrics = [], []
    try:
        checks = valid_checks(body.get("checks"))
    except ValueError as e:
        notes.append(f"verdict.json refused: {e}")
    try:
        metrics = valid_metrics(body.get("metrics"))
    except ValueError as e:
        notes.append(f"metrics.json refused: {e}")
    worst = max(checks, key=lambda c: VERDICTS.index(c[1]), default=None)
    columns = {"verdict": worst and worst[1], "verdict_check": worst and worst[0],
               "verdict_note": "; ".join(filter(None, notes))}
    return columns, checks, metrics


def parse_age(value, field="age"):
    """'90', '10m', '1h', '2d' -> seconds."""
    match = re.fullmatch(r"(\d{1,9})([smhd]?)", value.strip())
    if not match:
        raise bad(f"{field}: expected a number of seconds or e.g. 10m, 1h, 2d; got {value!r}")
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


################################################################################################
# Store: connections and the one write transaction. Every write runs in Store.transaction()
# (one lock, one BEGIN IMMEDIATE), every job state change goes through move_job (a guarded
# UPDATE plus its events row), and the SQL of an operation sits in the operation that owns its
# transaction. Below the class: the transitions, row lookups and the lists' query helpers.
################################################################################################
MAX_BATCH = 16          # blocks one group commit carries at most: a crowd of writers never waits long


class Batch:
    """One transaction shared by the writers queued at the same moment (group commit)."""

    def __init__(self):
        self.blocks = 0
        self.done = threading.Event()       # set once it committed, or failed
        self.error = None                   # why it failed: each of its blocks fails with it


def raised_again(error):
    """A new exception like `error`, for another thread to raise (one exception object must not
    be raised by several threads at once: its traceback is shared)."""
    try:
        return type(error)(*error.args)
    except Exception:
        return sqlite3.OperationalError(str(error))


class Store:
    """The database: one writer connection behind one write lock, and a pool of readers.

    Methods for the caller:
    - transaction(): `with store.transaction() as conn:` is the one way to write.
    - write(fn, *args): fn(conn, *args) inside one transaction.
    - read(sql, args), read_one(sql, args), reading(): reads outside any transaction.
    - close(): close the connections.
    Safe to use as a library (bench/pages.py does): errors are exceptions, never exits.
    """

    def __init__(self, path, max_readers=MAX_READERS):
        self.path = path
        self.write_lock = threading.Lock()
        self.queue_lock = threading.Lock()
        self.queued = 0                 # writers waiting for the write lock
        self.batch = None               # the transaction the queued writers share, until committed
        self.commits = self.blocks = 0  # commits, and the blocks they carried (/metrics)
        self.pool = queue.LifoQueue()
        self.readers = threading.BoundedSemaphore(max_readers)  # each holds ~3 descriptors
        self.held = threading.local()   # a thread reading inside a read reuses its connection
        first = connect(path)
        self.schema_version = migrate(first)
        self.pool.put(first)
        self.writer = connect(path)     # transactions only, under the write lock: its statement
                                        # cache stays warm (measured: 1.35 against 1.65 ms CPU a job)
        for statement in statements(TALLIES):
            self.writer.execute(statement)
        self.writer_wait = BUSY_MS      # the writer's busy timeout now, ms (see _begin)
        self.closed = False             # requests still in flight at shutdown get a 503
        self.deferred = threading.local()   # .joined: the batches a block deferring its commit joined
        self.tallies_moved = -1         # self.commits when the tallies were last moved (move_tallies)
        self.write(recount_tallies)     # what a server killed had not moved yet

    def _conn(self):
        if self.closed:
            raise ApiError(503, "the server is shutting down; retry")
        try:
            return self.pool.get_nowait()
        except queue.Empty:
            return connect(self.path)

    @contextlib.contextmanager
    def reading(self):
        """A pooled connection for several reads; outside a transaction each read sees the
        latest commit. At most max_readers are open at once: a crowd of page views waits for one
        (a 503 after READER_WAIT) instead of running out of file descriptors."""
        held = getattr(self.held, "conn", None)
        if held is not None:
            yield held
            return
        if not self.readers.acquire(timeout=READER_WAIT):
            raise ApiError(503, "server busy: every database reader is in use; retry")
        try:
            conn = self.held.conn = self._conn()
            try:
                yield conn
            finally:
                self.held.conn = None
                self.give_back(conn)
        finally:
            self.readers.release()

    @contextlib.contextmanager
    def snapshot(self):
        """Reads that must agree with each other, in one read transaction: a commit between
        them is seen by all of them or by none (a pilot that registers is counted live or
        pending, never neither). Inside a transaction of this thread's own, that one."""
        with self.reading() as conn:
            if conn.in_transaction:
                yield conn
                return
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")      # read only: nothing to write, the snapshot ends

    def keep_reader(self):
        """A reader connection of this thread's own, for its life: the connection loop must
        never wait for a pooled one behind a crowd of page views."""
        self.held.conn = connect(self.path)

    def give_back(self, conn):
        """Keep at most POOL_KEEP idle connections: a burst of readers does not leave a
        connection (and its page cache) per thread behind."""
        if self.pool.qsize() < POOL_KEEP and not self.closed:
            self.pool.put(conn)
        else:
            conn.close()

    def read(self, sql, args=()):
        with self.reading() as conn:
            return conn.execute(sql, args).fetchall()

    def read_one(self, sql, args=()):
        rows = self.read(sql, args)
        return rows[0] if rows else None

    @contextlib.contextmanager
    def transaction(self, shared=False):
        """The one way to write: `with store.transaction() as conn:`, a transaction of its own
        (BEGIN IMMEDIATE, the block, COMMIT, or ROLLBACK if it raises). With `shared`, for the
        pilots' small and frequent writes (claims, reports), the writers queued at the same
        moment share one transaction (group commit): each block runs in a savepoint of it, and
        the last writer queued (or the MAX_BATCH-th) commits for all. No block returns before
        its commit: what it answers is durable, as with a commit of its own, and one write of
        the shared pages and one fsync serve several jobs. A shared block that raises is rolled
        back alone; a commit that fails fails every block of its batch. (A big block, such as a
        submission, never shares: in a savepoint, sqlite's in-memory journal makes its time
        grow with the square of its size.) Validate before entering: the lock serialises writers."""
        if self._deferring():       # the connection loop never waits (see WriterBusy)
            if not self.write_lock.acquire(blocking=False):
                raise WriterBusy
        else:
            with self.queue_lock:
                self.queued += 1
            self.write_lock.acquire()
            with self.queue_lock:
                self.queued -= 1
        yield from (self._shared() if shared else self._alone())

    def _deferring(self):
        """Whether this thread's writes commit later: the connection loop's (commit_later)."""
        return getattr(self.deferred, "joined", None) is not None

    def _alone(self):
        """A transaction of its own, the write lock held; an open batch commits first."""
        try:
            if self.closed:
                raise ApiError(503, "the server is shutting down; retry")
            self._commit_open_batch()
            conn = self.writer
            self._begin()
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                rollback(conn)
                raise
            self.commits += 1
            self.blocks += 1
        finally:
            self.write_lock.release()

    def _shared(self):
        """A savepoint in the batch of the writers queued now (see transaction)."""
        try:
            batch = self._join()
        except BaseException:
            self._end_turn(self.batch)
            raise
        try:
            yield self.writer
            self.writer.execute("RELEASE block")
        except BaseException as e:
            self._undo_block(batch, e)
            self._end_turn(batch)
            raise
        deferring = self._deferring()
        self._end_turn(batch, deferred=deferring)
        if deferring:
            self.deferred.joined.append(batch)
            return
        batch.done.wait()
        if batch.error is not None:
            raise raised_again(batch.error)

    @contextlib.contextmanager
    def commit_later(self):
        """For the connection loop, which answers a whole turn of requests after one commit: a
        shared block written inside returns before its batch commits, and the batches joined are
        listed in what this yields (commit_joined commits them). A block reads and writes as it
        would otherwise; only its caller must not answer before commit_joined."""
        self.deferred.joined = joined = []
        try:
            yield joined
        finally:
            self.deferred.joined = None

    def commit_joined(self, batches):
        """Wait until every batch in `batches` has ended, committing the open one when the write
        lock is free: {batch: the error it failed with} for those that failed. A long writer of
        its own (a big submission) is not waited for: it commits the open batch before it starts."""
        for batch in batches:
            while not batch.done.is_set():
                if self.write_lock.acquire(timeout=0.01):
                    try:
                        self._commit_open_batch()
                    finally:
                        self.write_lock.release()
        return {b: b.error for b in batches if b.error is not None}

    def _join(self):
        """A savepoint for the next block, in the open batch or a new one (BEGIN IMMEDIATE)."""
        if self.closed:
            raise ApiError(503, "the server is shutting down; retry")
        if self.batch is not None and not self.writer.in_transaction:   # sqlite ended it (a full disk)
            self._settle(self.batch, sqlite3.OperationalError("the transaction was rolled back"))
        if self.batch is None:
            self._begin()
            self.batch = Batch()
        self.batch.blocks += 1
        self.writer.execute("SAVEPOINT block")
        return self.batch

    def _begin(self):
        """BEGIN IMMEDIATE on the writer; in the connection loop without waiting, so that a
        database another process holds (a sqlite3 shell left in BEGIN) stalls no heartbeat.
        Only BEGIN can wait for a lock (the writer holds it until COMMIT), so the writer's
        busy timeout is set only when it must change (a PRAGMA costs as much as a statement)."""
        wait = 0 if self._deferring() else BUSY_MS
        if wait != self.writer_wait:
            self.writer.execute(f"PRAGMA busy_timeout={wait}")
            self.writer_wait = wait
        try:
            self.writer.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if not wait and "locked" in str(e):
                raise WriterBusy from None
            raise

    def _undo_block(self, batch, error):
        """Roll back the block that raised, and only it; if sqlite ended the whole transaction
        itself (some errors do, a full disk), the batch fails with that error."""
        with contextlib.suppress(sqlite3.Error):
            if self.writer.in_transaction:
                self.writer.execute("ROLLBACK TO block")
                self.writer.execute("RELEASE block")
        if self.batch is batch and not self.writer.in_transaction:
            self._settle(batch, error)

    def _end_turn(self, batch, deferred=False):
        """After a block: commit its batch unless a writer queued behind it may join, or its
        commit is deferred (and the batch is not full), then let the next writer in."""
        try:
            if batch is not None and self.batch is batch:
                with self.queue_lock:
                    last = self.queued == 0 and not deferred
                if last or batch.blocks >= MAX_BATCH:
                    self._commit(batch)
        finally:
            self.write_lock.release()

    def _commit(self, batch):
        try:
            self.writer.execute("COMMIT")
        except BaseException as e:
            rollback(self.writer)
            self._settle(batch, e)
            return
        self.commits += 1
        self.blocks += batch.blocks
        self._settle(batch, None)

    def _settle(self, batch, error):
        self.batch = None
        batch.error = error
        batch.done.set()

    def _commit_open_batch(self):
        """For the holders of the write lock that are not writers (a checkpoint, the close)."""
        if self.batch is not None:
            self._commit(self.batch)

    def write(self, fn, *args, shared=False):
        """fn(conn, *args) in one transaction, for operations that are a named function."""
        with self.transaction(shared) as conn:
            return fn(conn, *args)

    def check_integrity(self):
        """PRAGMA quick_check: a damaged database must not start and report healthy."""
        problems = [" ".join(r[0].split()) for r in self.read("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise StartupError(f"--db {self.path}: the database is damaged ({'; '.join(problems)[:300]}); "
                               f"restore a backup or try `sqlite3 {self.path} .recover`, or start with --skip-check")

    def wal_bytes(self):
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:
            return 0

    def truncate_wal(self):
        """Checkpoint and truncate the write-ahead log, unless a reader still needs it (a long
        page view, or an outside sqlite3 shell left in BEGIN): then try again at the next pass.
        Our own writers wait meanwhile (the write lock), so only a reader can keep it; a short
        busy timeout, so housekeeping never waits long on that reader."""
        with self.write_lock, self.reading() as conn:
            self._commit_open_batch()
            with busy_timeout(conn, 100):
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        return not busy

    def move_tallies(self, reading=False):
        """Write the counts tallied in memory to their tables (see TALLIES): at every housekeeping
        pass, and before a page or an alarm reads them (`reading`): then only if something
        committed since the last move, and a move that fails (a full disk) leaves the counts
        read at most a pass late. Never inside a transaction of this thread's own."""
        if reading:
            if self.commits != self.tallies_moved:
                with contextlib.suppress(sqlite3.Error, ApiError):
                    self.move_tallies()
            return
        with self.transaction() as conn:
            move_tallies(conn)
            moved = self.commits + 1    # this transaction's own commit too
        self.tallies_moved = moved

    def close(self):
        with contextlib.suppress(sqlite3.Error, ApiError):     # a full disk loses a pass of counts
            self.move_tallies()
        with self.write_lock:
            self._commit_open_batch()
            self.closed = True
            self.writer.close()
        while True:
            try:
                self.pool.get_nowait().close()
            except queue.Empty:
                return


# A row of the history; a job's carries its job's id (see v20), found by uuid as it is written.
JOB_ID = "(SELECT id FROM jobs WHERE uuid=?)"
JOB_EVENT = f"(?, 'job', ?, {JOB_ID}, ?, ?, ?, ?, ?)"
INSERT_EVENTS = "INSERT INTO events(ts, kind, uuid, job, attempt, old, new, who, info) VALUES"


def event(conn, kind, uuid, old, new, who="", attempt=None, info="", at=None):
    if kind == "job":
        conn.execute(INSERT_EVENTS + JOB_EVENT, (at or now(), uuid, uuid, attempt, old, new, who, info))
    else:
        conn.execute(INSERT_EVENTS + "(?,?,?,NULL,?,?,?,?,?)", (at or now(), kind, uuid, attempt, old, new, who, info))


def move_job(conn, uuid, old, new, who, *, attempt=None, pilot=None, info="", changes=None, passed=None, at=None):
    """The one guarded job transition: UPDATE ... WHERE state=old [AND pilot AND attempt].

    `changes` are the other columns to set; `passed`, (state, time), a state the job went
    through on the way, whose transition is recorded too (a short job's `running`, reported
    with its end: one row update, the whole history); `at`, when it happened, if not now (a
    late end report). Returns True if the row moved (and its events were written), False if
    it no longer matched: somebody else moved it first."""
    changes = changes or {}
    sets = ["state=?"] + [f"{k}=?" for k in changes]
    sql = f"UPDATE jobs SET {', '.join(sets)} WHERE uuid=? AND state=?"
    args = [new, *changes.values(), uuid, old]
    if pilot is not None:
        sql += " AND pilot=?"
        args.append(pilot)
    if attempt is not None:
        sql += " AND attempt=?"
        args.append(attempt)
    if conn.execute(sql, args).rowcount != 1:
        return False
    if passed:
        state, t = passed
        conn.execute(INSERT_EVENTS + JOB_EVENT + "," + JOB_EVENT,
                     (t, uuid, uuid, attempt, old, state, who, "", at or now(), uuid, uuid, attempt, state, new, who, info))
        return True
    event(conn, "job", uuid, old, new, who, attempt, info, at)
    return True


def move_pilot(conn, uuid, old_states, new, info="", **fields):
    sets = ["state=?"] + [f"{k}=?" for k in fields]
    marks = ",".join("?" * len(old_states))
    moved = conn.execute(f"UPDATE pilots SET {', '.join(sets)} WHERE uuid=? AND state IN ({marks})",
                         [new, *fields.values(), uuid, *old_states]).rowcount == 1
    if moved and new not in old_states:
        event(conn, "pilot", uuid, None, new, uuid, info=info)
    return moved


def lookup(conn, table, uuid):
    """The row of `table` (jobs, pilots, workflows) with this uuid, or a 404 naming it."""
    row = conn.execute(f"SELECT * FROM {table} WHERE uuid=?", (uuid,)).fetchone()
    if row is None:
        kind = table[:-1]
        raise ApiError(404, f"{kind} {uuid}: no such {kind}")
    return row


def chunks(items, size=500):
    """Slices of `items` small enough for one IN (...) list (sqlite caps bound parameters)."""
    return [items[start:start + size] for start in range(0, len(items), size)]


def delete_rows(conn, source, where, args):
    """DELETE the rows matching `where` (which may end in LIMIT) of `source` (a table, maybe
    with its INDEXED BY); returns their uuids. Select-then-delete inside the caller's
    transaction (a returning clause needs sqlite 3.35), one rowid lookup a row: a long IN list
    may be planned as a scan."""
    rows = conn.execute(f"SELECT id, uuid FROM {source} WHERE {where}", args).fetchall()
    conn.executemany(f"DELETE FROM {source.split()[0]} WHERE id=?", [(r["id"],) for r in rows])
    return [r["uuid"] for r in rows]


def secret_hash(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


LEAVING = ("stop", "drain")     # the directives that tell a pilot to go: it claims no more work


def check_pilot_secret(conn, pilot_uuid, secret):
    """The pilot's row, or a 403 unless `secret` is this pilot's own: a token holder cannot act
    as another pilot."""
    row = lookup(conn, "pilots", pilot_uuid)
    if not secret or not hmac.compare_digest(secret_hash(secret), row["secret"]):
        raise ApiError(403, f"X-P3S-Pilot-Secret: missing or wrong secret for pilot {pilot_uuid}")
    return row


# The jobs a pilot holds, in the partial index of held jobs: a query names its condition word for
# word (HELD), or sqlite cannot use it. INDEXED BY: statistics gathered on a table of queued jobs
# (pilot NULL in every row) would make sqlite scan every job on every claim.
HELD = "state IN ('dispatched', 'running')"
HELD_JOBS = f"SELECT {{columns}} FROM jobs INDEXED BY jobs_held WHERE pilot=? AND {HELD}"


def bring_back(conn, uuid, t):
    """A lost pilot spoke again: it was only silent (a partition, a pause), and is back in the
    state of the job it still holds."""
    held = conn.execute(HELD_JOBS.format(columns="state"), (uuid,)).fetchone()
    move_pilot(conn, uuid, ("lost",), held["state"] if held else "active", info="back after silence",
               ts_stop=None, ts_beat=t)


RUNNING_JOB = HELD_JOBS.format(columns="uuid") + " AND state='running'"


def own_pilot(conn, uuid, secret):
    """The pilot's row, once its secret is checked, if it is live (see live_pilot)."""
    return live_pilot(conn, check_pilot_secret(conn, uuid, secret))


def live_pilot(conn, row):
    """The pilot's row `row` (read earlier in this write transaction), if it is live: 409 if it
    stopped. A lost pilot that speaks again was only silent (a partition, a pause): it is back,
    with whatever job it still holds."""
    if row["state"] == "lost":
        bring_back(conn, row["uuid"], now())
        row = lookup(conn, "pilots", row["uuid"])
    if row["state"] not in LIVE_PILOT_STATES:
        raise ApiError(409, f"pilot {row['uuid']}: is {row['state']}; register again")
    return row


def jobtype_counts(by_state):
    """A job type's figures as job.py -l shows them, from its counts by state."""
    return {"defined": by_state.get("defined", 0),
            "running": by_state.get("dispatched", 0) + by_state.get("running", 0),
            "finished": by_state.get("finished", 0),
            "failed": sum(by_state.get(s, 0) for s in FAILED_STATES)}


def pilot_view(row, t):
    """A pilot as the pages show it: with the seconds since its last heartbeat, and its life."""
    return dict(pilot_to_dict(row), beat_age=t - row["ts_beat"], life=(row["ts_stop"] or t) - row["ts_reg"])


def service_view(row, t):
    """A service as pages and the API show it: silent only if it promised a period and broke it."""
    silent = bool(row["period"]) and not row["retired"] and t - row["ts"] > SILENT_PERIODS * row["period"]
    return dict(row, silent=silent, age=t - row["ts"])


def job_to_dict(row, full=True):
    job = dict(row)
    job.pop("id", None)
    job["env"] = json.loads(job["env"])
    if not full:
        for key in ("stdout_tail", "stderr_tail", "env", "params"):
            job.pop(key, None)
    return job


def pilot_to_dict(row):
    pilot = dict(row)
    pilot.pop("id", None)
    pilot.pop("secret", None)
    pilot["jobtypes"] = json.loads(pilot["jobtypes"])
    return pilot


PAGE_SIZES = (25, 400)


def where_equal(query, filters, extra=()):
    """(" WHERE a=? AND ...", args) for the query parameters in `filters` that are set; a filter
    is a column name or a (parameter, column) pair. `extra` adds (condition, arg) pairs."""
    conds, args = [], []
    for f in filters:
        param, column = f if isinstance(f, tuple) else (f, f)
        if query.get(param):
            conds.append(f"{column}=?")
            args.append(query[param])
    for cond, arg in extra:
        conds.append(cond)
        args.append(arg)
    return (" WHERE " + " AND ".join(conds) if conds else ""), args


JOB_FILTERS = ("state", "jobtype", "site", "ran_site", "host", "infile", "user", "workflow", "age", "ended", "reason")
PER_PAGE = (25, 50, 100, 200, 400)     # the original's choices
STATE_GROUPS = {"problems": FAILED_STATES}


def parse_states(value):
    """?state=a,b,problems,error: (the states, whether only jobs with a non-zero exit code);
    a 400 naming the choices for anything else."""
    states, errors_only = [], False
    for name in filter(None, (v.strip() for v in value.split(","))):
        if name == "error":
            errors_only = True
        elif name in STATE_GROUPS:
            states += STATE_GROUPS[name]
        elif name in JOB_STATES:
            states.append(name)
        else:
            raise bad(f"state: unknown state {name!r}; choose from {', '.join(JOB_STATES)}, "
                      f"{', '.join(STATE_GROUPS)}, error (non-zero exit code), or a comma list")
    return list(dict.fromkeys(states)), errors_only


def like_escape(text):
    """`text` for a LIKE pattern with ESCAPE '\\': its own % and _ match only themselves."""
    return re.sub(r"([\\%_])", r"\\\1", text)


def reason_pattern(normalised):
    """A LIKE pattern matching the raw reasons a normalised one stands for."""
    return re.sub(r"#|<uuid>|<hex>", "%", like_escape(normalised))


def job_conditions(query, states, errors_only):
    """The WHERE clause of a job list: equality filters, the states, the age and the
    (normalised) reason of the error summary's links."""
    conds = [("ts_def >= ?", now() - parse_age(query["age"]))] if query.get("age") else []
    if query.get("ended"):
        conds.append(("ts_sto >= ?", now() - parse_age(query["ended"], "ended")))
    if query.get("reason"):
        conds.append(("reason LIKE ? ESCAPE '\\'", reason_pattern(query["reason"])))
    if errors_only:
        conds.append(("exit_code != ?", 0))
    if query.get("infile"):        # the literal term lets the planner use the partial index
        conds.append(("infile = ? AND infile != ''", query["infile"]))
    where, args = where_equal(query, ("jobtype", "site", "ran_site", "host", "user", ("workflow", "wfuuid"), "wfuuid"),
                              conds)
    return with_states(where, args, states)


def with_states(where, args, states):
    """`where` (maybe empty) narrowed to jobs in `states`, if any are given."""
    if not states:
        return where, args
    return where + (" AND " if where else " WHERE ") + f"state IN ({','.join('?' * len(states))})", args + states


def page_window(query):
    """(limit, offset, page) from ?limit=25..400&page=N."""
    limit = as_int(query.get("limit", PAGE_SIZES[0]), "limit")
    if not PAGE_SIZES[0] <= limit <= PAGE_SIZES[1]:
        raise bad(f"limit: must be between {PAGE_SIZES[0]} and {PAGE_SIZES[1]}, got {limit}")
    page = as_int(query.get("page", 1), "page", 1)
    return limit, (page - 1) * limit, page


def page_of(store, table, query, filters, columns="*", since=None):
    """One page of `table`, newest first, filtered by equality on the query's `filters` keys;
    `since` = (parameter, column): also only rows whose column is within that age (ended=1h)."""
    param, column = since or (None, None)
    aged = [(f"{column} >= ?", now() - parse_age(query[param], param))] if param and query.get(param) else []
    where, args = where_equal(query, filters, aged)
    limit, offset, page = page_window(query)
    rows = store.read(f"SELECT {columns} FROM {table}{where} ORDER BY id DESC LIMIT ? OFFSET ?",
                      args + [limit + 1, offset])
    shown = (*filters, param) if param else filters
    return [dict(r) for r in rows[:limit]], {"page": page, "limit": limit, "more": len(rows) > limit,
                                             "filters": {k: query[k] for k in shown if query.get(k)}}


################################################################################################
# Workflow engine: GraphML DAG templates, file-name policies, and the functions that copy a
# DAG into jobs and release them as their parents end. All run inside a caller's transaction.
################################################################################################
VERTEX_KEYS = {"payload": "", "env": "{}", "jobtype": "default", "timelimit": "3600", "priority": "0"}
EDGE_KEYS = {"name": "", "dirpath": "", "datatype": "", "datatag": "", "comment": ""}
GRAPHML_IDS = {**{k: f"d{101 + i}" for i, k in enumerate(VERTEX_KEYS)},
               **{k: f"d{1 + i}" for i, k in enumerate(EDGE_KEYS)}}
JOBINFO_KEYS = ("payload", "params", "env", "jobtype", "priority", "timeout", "timelimit", "site",
                "max_attempts", "name", "memory", "disk")
EDGE_OVERRIDES = ("name", "dirpath", "datatype", "datatag", "comment")


def local_name(tag):
    return tag.rsplit("}", 1)[-1]


def parse_graphml(text):
    """GraphML (the original p3s dialect) -> (vertices, edges), fully validated, or a 400."""
    if re.search(r"<!\s*(DOCTYPE|ENTITY)", text):
        raise bad("graphml: DOCTYPE and ENTITY declarations are not allowed")
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as e:
        raise bad(f"graphml: malformed XML: {e}") from None
    keys = {}
    for key in (el for el in root.iter() if local_name(el.tag) == "key"):
        domain, name = key.get("for"), key.get("attr.name")
        allowed = VERTEX_KEYS if domain == "node" else EDGE_KEYS if domain == "edge" else None
        if allowed is None or name not in allowed:
            raise bad(f"graphml: unknown key {name!r} for {domain!r}; node keys: {', '.join(VERTEX_KEYS)}; "
                      f"edge keys: {', '.join(EDGE_KEYS)}")
        keys[key.get("id")] = (domain, name)
    graph = next((el for el in root.iter() if local_name(el.tag) == "graph"), None)
    if graph is None:
        raise bad("graphml: no <graph> element")
    vertices = [graph_item(el, "node", keys, VERTEX_KEYS) for el in graph if local_name(el.tag) == "node"]
    edges = [graph_item(el, "edge", keys, EDGE_KEYS) for el in graph if local_name(el.tag) == "edge"]
    return check_dag([clean_vertex(v) for v in vertices], [clean_edge(e) for e in edges])


def graph_item(el, domain, keys, defaults):
    item = dict(defaults)
    ident = ("id",) if domain == "node" else ("source", "target")
    for attr in ident:
        if not el.get(attr):
            raise bad(f"graphml: a <{domain}> has no {attr}")
        item[attr] = el.get(attr)
    where = item.get("id") or f"{item.get('source')}->{item.get('target')}"
    for data in (d for d in el if local_name(d.tag) == "data"):
        if keys.get(data.get("key"), (None,))[0] != domain:
            raise bad(f"graphml: {domain} {where}: data key {data.get('key')!r} is not declared for {domain}s")
        item[keys[data.get("key")][1]] = (data.text or "").strip()
    return item


def clean_vertex(v):
    where = f"graphml: node {v['id']}"
    vertex = {"name": v["id"], "jobtype": as_str(v["jobtype"] or "default", f"{where}: jobtype", max_len=64),
              "payload": as_str(v["payload"], f"{where}: payload"),
              "env": json.dumps(as_env(v["env"] or "{}", f"{where}: env"), sort_keys=True),
              "timelimit": as_int(v["timelimit"] or VERTEX_KEYS["timelimit"], f"{where}: timelimit", 0),
              "priority": as_int(v["priority"] or VERTEX_KEYS["priority"], f"{where}: priority")}
    if vertex["jobtype"] != "noop" and not vertex["payload"].strip():
        raise bad(f"{where}: payload: missing (only noop vertices may have none)")
    return vertex


def clean_edge(e):
    edge = {k: e[k] for k in ("source", "target", *EDGE_KEYS)}
    if edge["datatag"] and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", edge["datatag"]):
        raise bad(f"graphml: edge {e['source']}->{e['target']}: datatag {edge['datatag']!r} "
                  "is not a valid environment variable name")
    return edge


def check_dag(vertices, edges):
    """Refuse duplicate nodes or edges, dangling edges and cycles; return (vertices, edges)."""
    names = [v["name"] for v in vertices]
    if not names:
        raise bad("graphml: the graph has no nodes")
    dup = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if dup:
        raise bad(f"graphml: duplicate node id(s) {', '.join(dup)}")
    known, seen = set(names), set()
    for e in edges:
        pair = (e["source"], e["target"])
        for end in pair:
            if end not in known:
                raise bad(f"graphml: edge {pair[0]}->{pair[1]}: {end!r} is not a node (dangling edge)")
        if pair in seen:
            raise bad(f"graphml: edge {pair[0]}->{pair[1]} appears twice")
        seen.add(pair)
    remaining = topological_order(names, edges)[1]
    if remaining:
        raise bad(f"graphml: the graph has a cycle through {', '.join(sorted(remaining))}")
    return vertices, edges


def topological_order(names, edges):
    """Kahn's algorithm: (ordered names, names left over because they sit on a cycle)."""
    indegree = {n: 0 for n in names}
    children = {n: [] for n in names}
    for e in edges:
        indegree[e["target"]] += 1
        children[e["source"]].append(e["target"])
    ready = collections.deque(n for n in names if indegree[n] == 0)
    order = []
    while ready:
        n = ready.popleft()
        order.append(n)
        for c in children[n]:
            indegree[c] -= 1
            if indegree[c] == 0:
                ready.append(c)
    placed = set(order)
    return order, [n for n in names if n not in placed]


def to_graphml(vertices, edges):
    """The DAG back in the dialect it came in (keys d101.. for nodes, d1.. for edges)."""
    out = ["<?xml version='1.0' encoding='utf-8'?>",
           '<graphml xmlns="http://graphml.graphdrawing.org/xmlns">']
    out += [f'  <key attr.name="{k}" attr.type="{"int" if k in ("timelimit", "priority") else "string"}" '
            f'for="{"node" if k in VERTEX_KEYS else "edge"}" id="{i}" />' for k, i in GRAPHML_IDS.items()]
    out.append('  <graph edgedefault="directed">')
    for v in vertices:
        out.append(f'    <node id="{esc(v["name"])}">')
        out += [f'      <data key="{GRAPHML_IDS[k]}">{esc(v[k])}</data>' for k in VERTEX_KEYS]
        out.append("    </node>")
    for e in edges:
        out.append(f'    <edge source="{esc(e["source"])}" target="{esc(e["target"])}">')
        out += [f'      <data key="{GRAPHML_IDS[k]}">{esc(e[k])}</data>' for k in EDGE_KEYS]
        out.append("    </edge>")
    return "\n".join(out + ["  </graph>", "</graphml>", ""])


def validate_fileinfo(info, edges):
    """The file-name policy: None (generated uuid + extension), 'sticky', 'inherit:PATH', or a
    map {"source:target": {name, dirpath, datatype, datatag, comment}}."""
    if info is None or info == "sticky":
        return info
    if isinstance(info, str) and info.startswith("inherit:") and len(info) > 8:
        return info
    if not isinstance(info, dict):
        raise bad("fileinfo: expected sticky, inherit:NAME or an object keyed \"source:target\"")
    keys = {f"{e['source']}:{e['target']}" for e in edges}
    for key, override in info.items():
        if key not in keys:
            raise bad(f"fileinfo: {key!r} is not an edge of this DAG; edges: {', '.join(sorted(keys))}")
        check_keys(override, f"fileinfo.{key}", EDGE_OVERRIDES)
        for k, v in override.items():
            as_str(v, f"fileinfo.{key}.{k}", max_len=4096)
    return info


def name_files(edges, policy, extensions, roots, outdir=None):
    """Each edge's final name and dirpath under the policy. `roots` are the DAG's source
    vertices: with inherit:PATH their outgoing edges are PATH itself, the others derive from it.
    `outdir`, if given, is the directory of every file not read from a root (the outputs)."""
    files = []
    for e in edges:
        f = dict(e)
        if policy is None:
            f["name"] = str(uuidlib.uuid4()) + extensions.get(e["datatype"], "")
        elif isinstance(policy, dict):
            override = policy.get(f"{e['source']}:{e['target']}")
            if override is None:
                f["name"] = str(uuidlib.uuid4()) + extensions.get(e["datatype"], "")
            else:
                f.update(override)
        elif policy.startswith("inherit:"):
            path = policy[len("inherit:"):]
            stem = os.path.splitext(os.path.basename(path))[0]
            if e["source"] in roots:
                f["dirpath"], f["name"] = os.path.dirname(path) or e["dirpath"], os.path.basename(path)
            else:
                f["name"] = f"{stem}_{e['datatag'] or e['source'] + '-' + e['target']}" + \
                    extensions.get(e["datatype"], "")
        if outdir and e["source"] not in roots:
            f["dirpath"] = outdir
        files.append(f)
    return files


def validate_jobinfo(info, vertex_names):
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise bad("jobinfo: expected an object keyed by vertex name")
    for vertex, attrs in info.items():
        if vertex not in vertex_names:
            raise bad(f"jobinfo: {vertex!r} is not a vertex of this DAG; vertices: {', '.join(vertex_names)}")
        check_keys(attrs, f"jobinfo.{vertex}", JOBINFO_KEYS)
        validate_job({"payload": "x", **attrs}, f"jobinfo.{vertex}")
    return info


def dag_parts(read, name):
    """(dag row, vertices, edges) through `read(sql, args)`: a transaction's conn.execute,
    or the store's read outside one."""
    dag = list(read("SELECT * FROM dags WHERE name=?", (name,)))
    if not dag:
        raise ApiError(404, f"dag {name!r}: no such DAG")
    vertices = [dict(r) for r in read("SELECT name, payload, env, jobtype, timelimit, priority "
                                      "FROM dag_vertices WHERE dag=? ORDER BY rowid", (name,))]
    edges = [dict(r) for r in read("SELECT source, target, name, dirpath, datatype, datatag, comment "
                                   "FROM dag_edges WHERE dag=? ORDER BY rowid", (name,))]
    return dict(dag[0]), vertices, edges


def plan_workflow(wf, vertices, edges, fileinfo, jobinfo, extensions, outdir=None):
    """The rows of a new workflow, validated: (jobs, datasets). Pure, so it runs before the
    write transaction: a 10,000-vertex DAG costs the lock only its inserts."""
    t = now()
    sources = {v["name"] for v in vertices} - {e["target"] for e in edges}
    files = name_files(edges, fileinfo, extensions, sources, outdir)
    tags = {}                                   # vertex -> {DATATAG: path} of its files
    for f in files:
        if f["datatag"]:
            for end in (f["source"], f["target"]):
                tags.setdefault(end, {})[f["datatag"]] = os.path.join(f["dirpath"], f["name"])
    jobs = []
    for v in vertices:
        job = validate_job(vertex_job(v, jobinfo.get(v["name"], {}), tags.get(v["name"], {}), wf["user"]),
                           f"vertex {v['name']}")
        job.update(name=job["name"] or f"{wf['name']}:{v['name']}", wfuuid=wf["uuid"], vertex=v["name"], ts=t,
                   infile=job["infile"] or wf.get("infile", ""))     # an injected file's run grid row
        jobs.append(job)
    job_uuids = {j["vertex"]: j["uuid"] for j in jobs}
    datasets = [{**f, "uuid": str(uuidlib.uuid4()), "wfuuid": wf["uuid"], "ts": t,
                 "producer": job_uuids[f["source"]], "consumer": job_uuids[f["target"]]} for f in files]
    return jobs, datasets


def instantiate(conn, wf, jobs, datasets):
    """Store a planned workflow as template jobs and pending datasets; start it if wf["state"]
    is defined. `wf` holds uuid, name, dag, description, user, state. Returns how many jobs
    became claimable."""
    conn.execute("INSERT INTO workflows(uuid, name, dag, description, user, state, ts_def) "
                 "VALUES(:uuid, :name, :dag, :description, :user, 'template', :ts)", {**wf, "ts": now()})
    event(conn, "workflow", wf["uuid"], None, "template", wf["user"])
    conn.executemany("""
        INSERT INTO jobs(uuid, name, user, jobtype, payload, params, env, priority, timelimit,
                         site, state, max_attempts, wfuuid, vertex, infile, memory, disk, ts_def)
        VALUES(:uuid, :name, :user, :jobtype, :payload, :params, :env, :priority, :timelimit,
               :site, 'template', :max_attempts, :wfuuid, :vertex, :infile, :memory, :disk, :ts)""", jobs)
    conn.executemany(INSERT_EVENTS + "(:ts, 'job', :uuid, (SELECT id FROM jobs WHERE uuid=:uuid), 1, NULL, "
                                     "'template', :user, '')", jobs)
    conn.executemany("""
        INSERT INTO datasets(uuid, name, dirpath, datatype, datatag, comment, state, origin,
                             wfuuid, producer, consumer, ts)
        VALUES(:uuid, :name, :dirpath, :datatype, :datatag, :comment, 'pending', 'edge',
               :wfuuid, :producer, :consumer, :ts)""", datasets)
    return start_workflow(conn, wf["uuid"], wf["user"]) if wf["state"] == "defined" else 0


def vertex_job(vertex, attrs, tags, user):
    """A vertex as a job description: its attributes, the jobinfo overrides, and `tags`, a
    DATATAG=dirpath/name variable for every file it reads or writes."""
    env = json.loads(vertex["env"])
    env.update(attrs.get("env") or {})
    env.update(tags)
    job = {k: vertex[k] for k in ("payload", "jobtype", "timelimit", "priority")}
    job.update({k: v for k, v in attrs.items() if k != "env"})
    if "timeout" in job:
        job["timelimit"] = job.pop("timeout")
    job.update(env=env, user=user)
    if job["jobtype"] == "noop" and not job["payload"]:
        job["payload"] = "noop"
    return job


def note_arrival(conn, dirpath):
    """A data file arrived in `dirpath` (its stream): what no_new_work watches."""
    conn.execute("INSERT INTO arrivals(dirpath, ts, n) VALUES(?, ?, 1) ON CONFLICT(dirpath) DO UPDATE "
                 "SET ts = excluded.ts, n = n + 1", (dirpath, now()))


def start_workflow(conn, wfuuid, who):
    """template -> defined, then release its root jobs. Returns how many became claimable."""
    if conn.execute("UPDATE workflows SET state='defined' WHERE uuid=? AND state='template'",
                    (wfuuid,)).rowcount != 1:
        raise ApiError(409, f"workflow {wfuuid}: only a template workflow can be started")
    event(conn, "workflow", wfuuid, "template", "defined", who)
    return advance_workflow(conn, wfuuid)


def advance_workflow(conn, wfuuid):
    """Release, finish or cancel the template jobs of a workflow whose parents have ended, then
    let the workflow's state follow its jobs. A worklist: a job is looked at again only when a
    parent of it moved (noop chains), so a pass is O(vertices + edges) however deep the DAG.
    Returns how many jobs became claimable (defined)."""
    if conn.execute("SELECT state FROM workflows WHERE uuid=?", (wfuuid,)).fetchone()["state"] == "template":
        return 0                                    # not started: nothing is released yet
    jobs = {r["uuid"]: dict(r) for r in conn.execute(
        "SELECT uuid, vertex, state, jobtype, attempt FROM jobs WHERE wfuuid=?", (wfuuid,))}
    parents, children = {}, {}
    for d in conn.execute("SELECT producer, consumer FROM datasets WHERE wfuuid=? AND origin='edge'", (wfuuid,)):
        parents.setdefault(d["consumer"], []).append(jobs[d["producer"]])
        children.setdefault(d["producer"], []).append(d["consumer"])
    released = 0
    pending = collections.deque(u for u, j in jobs.items() if j["state"] == "template")
    while pending:
        job = jobs[pending.popleft()]
        new, info, changes = next_state(job, parents.get(job["uuid"], []))
        if new is None or not move_job(conn, job["uuid"], "template", new, "workflow", attempt=job["attempt"],
                                       info=info, changes=changes):
            continue
        job["state"] = new
        if new == "defined":
            released += 1
        else:                                       # finished (noop) or cancelled: tell its children
            pending.extend(c for c in children.get(job["uuid"], []) if jobs[c]["state"] == "template")
    conn.execute("UPDATE datasets SET state='ready' WHERE wfuuid=? AND state='pending' AND producer IN "
                 "(SELECT uuid FROM jobs WHERE wfuuid=? AND state='finished')", (wfuuid, wfuuid))
    follow_jobs(conn, wfuuid)
    return released


def next_state(job, parents):
    """(state, info, changes) a template job moves to given its parents, or (None, ...) to wait:
    cancelled if a parent ended badly, finished if a noop whose parents all finished, else
    defined once they all finished."""
    bad_parent = next((p for p in parents if p["state"] in END_JOB_STATES and p["state"] != "finished"), None)
    if bad_parent:
        return "cancelled", f"parent {bad_parent['vertex']} {bad_parent['state']}", {"ts_sto": now()}
    if not all(p["state"] == "finished" for p in parents):
        return None, "", {}
    if job["jobtype"] == "noop":
        return "finished", "noop", {"exit_code": 0, "ts_sto": now()}
    return "defined", "parents finished", {"ts_def": now()}


def follow_jobs(conn, wfuuid):
    """The workflow state follows its jobs (template and cancelled workflows stay put)."""
    wf = conn.execute("SELECT state FROM workflows WHERE uuid=?", (wfuuid,)).fetchone()
    if wf is None or wf["state"] in ("template", "cancelled", "failed", "finished"):
        return
    counts, real = {}, {}       # real: the jobs that run on a pilot (a noop finishes by itself)
    for r in conn.execute("SELECT state, jobtype = 'noop' AS noop, COUNT(*) AS n FROM jobs WHERE wfuuid=? "
                          "GROUP BY state, noop", (wfuuid,)):
        counts[r["state"]] = counts.get(r["state"], 0) + r["n"]
        if not r["noop"]:
            real[r["state"]] = r["n"]
    if any(counts.get(s) for s in FAILED_STATES):
        new = "failed"
    elif set(counts) == {"finished"}:
        new = "finished"
    elif set(counts) <= set(END_JOB_STATES):        # all ended, some cancelled by a user
        new = "cancelled"
    elif any(real.get(s) for s in ("dispatched", "running", "finished")):
        new = "running"         # defined until one of its jobs starts
    else:
        return
    if new != wf["state"]:
        t = now()
        changes = {"ts_sto": t} if new in ("failed", "finished", "cancelled") else {"ts_sta": t}
        sets = ", ".join(f"{k}=COALESCE({k}, ?)" for k in changes)
        if conn.execute(f"UPDATE workflows SET state=?, {sets} WHERE uuid=? AND state=?",
                        (new, *changes.values(), wfuuid, wf["state"])).rowcount:
            event(conn, "workflow", wfuuid, wf["state"], new, "workflow")


################################################################################################
# Lifecycle rules: how a job enters, is retried or ends, is cancelled, or is freed from a
# pilot that is gone. Each runs inside a caller's transaction.
################################################################################################
def insert_jobs(conn, rows, who):
    """Store validated jobs as the user `who` (the job's own `user` is only a claim: see Users);
    a uuid already known (a retried submission) is stored once. A defined `noop` job needs no
    pilot: it is stored finished. Returns the uuids."""
    t = now()
    for r in rows:
        done = r["jobtype"] == "noop" and r["state"] == "defined"
        row = dict(r, user=who, state="finished" if done else r["state"], exit_code=0 if done else None,
                   ts_def=t, ts_sto=t if done else None)
        cur = conn.execute("""
            INSERT INTO jobs(uuid, name, user, jobtype, payload, params, env, priority, timelimit,
                             site, state, max_attempts, infile, memory, disk, exit_code, ts_def, ts_sto)
            VALUES(:uuid, :name, :user, :jobtype, :payload, :params, :env, :priority, :timelimit,
                   :site, :state, :max_attempts, :infile, :memory, :disk, :exit_code, :ts_def, :ts_sto)
            ON CONFLICT(uuid) DO NOTHING""", row)
        if cur.rowcount:
            event(conn, "job", r["uuid"], None, row["state"], who, 1)
    return [r["uuid"] for r in rows]



def claimable(rows):
    """How many of these stored jobs a pilot may claim now (wake-ups to send)."""
    return sum(r["state"] == "defined" and r["jobtype"] != "noop" for r in rows)


def submission_row(conn, submission):
    return conn.execute("SELECT jobs FROM submissions WHERE id=?", (submission,)).fetchone()


def record_submission(conn, submission, jobs, digest=None):
    conn.execute("INSERT OR IGNORE INTO submissions(id, jobs, ts, digest) VALUES(?, ?, ?, ?)",
                 (submission, jobs, now(), digest))


def submission_digest(body):
    return as_str(body["digest"], "digest", allow_empty=False, max_len=128) if "digest" in body else None


def requeue_or_end(conn, job, end_state, who, info, changes=None, passed=None, retry=True):
    """End a job in end_state, or put it back to `defined` while attempts remain; an ended
    workflow job moves its workflow on. A failure's reason is kept with the job and counted
    in the error summary. The end is dated now, unless `changes` date it (ts_sto: a late end
    report); a retry is now. Returns (the job's new state, how many jobs became claimable), or
    (None, 0) if the job was no longer in the state `job` says."""
    changes = dict(changes or {})
    t = changes.setdefault("ts_sto", now())
    changes["reason"] = "" if end_state == "finished" else job_reason(
        changes.get("errmsg") or info, changes.get("stderr_tail", ""), changes.get("exit_code"))
    if not move_job(conn, job["uuid"], job["state"], end_state, who, attempt=job["attempt"],
                    pilot=job["pilot"], info=info, changes=changes, passed=passed, at=t):
        return None, 0
    if end_state in FAILED_STATES and job["jobtype"] != CANARY:    # a canary's failure is its site's alarm
        count_error(conn, job, end_state, changes.get("exit_code"), changes["reason"], t)
    if retry and end_state in RETRYABLE_STATES and job["attempt"] < job["max_attempts"]:
        move_job(conn, job["uuid"], end_state, "defined", who, attempt=job["attempt"], info="retry",
                 changes=dict(attempt=job["attempt"] + 1, pilot=None, ts_dis=None, ts_sta=None,
                              ts_sto=None, **dict.fromkeys(USAGE_BOUNDS)))
        return "defined", 1
    return end_state, advance_workflow(conn, job["wfuuid"]) if job["wfuuid"] else 0


EXIT_CODE_ONLY = re.compile(r"exit code -?\d+")
REASON_CHARS = 300
FOLDED = ((re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I), "<uuid>"),
          (re.compile(r"0x[0-9a-f]+|\b[0-9a-f]{12,}\b", re.I), "<hex>"),
          (re.compile(r"(?<![\w.])\d+(,\d{3})*(\.\d+)?(?!\w)"), "#"))   # a number alone (2,048 too), not a
                                                                        # name's (APA3, np04)


def job_reason(errmsg, stderr_tail, exit_code):
    """Why a job failed, in one line: its error message, else the last non-empty line of its
    stderr (where payloads say what went wrong), else its exit code."""
    if errmsg and not EXIT_CODE_ONLY.fullmatch(errmsg):
        line = errmsg
    else:
        line = next((x for x in reversed(stderr_tail.splitlines()) if x.strip()), "")
        line = line or (f"exit code {exit_code}" if exit_code is not None else errmsg)
    return " ".join(line.split())[:REASON_CHARS]


def normalise_reason(reason):
    """A reason with its numbers, uuids and hex folded, so the same failure groups together."""
    for pattern, replacement in FOLDED:
        reason = pattern.sub(replacement, reason)
    return reason


def unfold(reason, lines):
    """A folded reason with each '#' given back its number where every one of `lines` (its
    failures' own reasons) has the same: "used # MB, over its memory limit of 2,000 MB"."""
    parts = reason.split("#")
    numbers = []
    for line in lines:
        for pattern, replacement in FOLDED[:2]:
            line = pattern.sub(replacement, line)
        numbers.append([m.group(0) for m in FOLDED[2][0].finditer(line)])
    if not numbers or any(len(n) != len(parts) - 1 for n in numbers):
        return reason
    shown = parts[0]
    for i, part in enumerate(parts[1:]):
        same = {n[i] for n in numbers}
        shown += (same.pop() if len(same) == 1 else "#") + part
    return shown


DRIFT_JOBS = 2000                    # a job type's last jobs kept in memory for the drift alarm
DRIFT_BEFORE = 5                    # drift: the last window against the this many windows before it
DRIFT_RATIO = 2.0                   # ... a median this many times larger (or smaller) is a drift
DRIFT_MIN_JOBS = 10                 # ... with at least this many jobs in each
CPU_EFFICIENCY_MIN = 0.1            # seconds a job runs at least before its CPU % is shown
PROFILED_STATES = ("finished", "failed", "timeout")     # jobs whose run says what their type costs
PROFILE_BUCKET = 600                # seconds: a job type's profile is kept in buckets this long, 8 days
PROFILE_RATIO = 1.25                # histogram bins grow by this factor: a median is within 12 %


def profile_bin(value):
    return int(math.floor(math.log(max(value, 1e-3)) / math.log(PROFILE_RATIO)))


def bin_value(b):
    """The middle of a histogram bin, as the figure it stands for."""
    return PROFILE_RATIO ** (b + 0.5)


def profile_key(jobtype, metric, value, t):
    """The histogram cell a figure of a job type counts in: (bucket, jobtype, metric, bin)."""
    return int(t) // PROFILE_BUCKET, jobtype, metric, profile_bin(value)


def write_profiles(conn, counts):
    """Add {histogram cell: n} to the profiles table."""
    conn.executemany("INSERT INTO profiles VALUES(?, ?, ?, ?, ?) ON CONFLICT(bucket, jobtype, metric, bin) "
                     "DO UPDATE SET n = n + excluded.n", [(*key, n) for key, n in counts.items()])


def quantiles(histogram, *qs):
    """The quantiles `qs` of a {bin: n} histogram (None when it is empty)."""
    total = sum(histogram.values())
    if not total:
        return [None] * len(qs)
    out = []
    for q in qs:
        seen = 0
        for b in sorted(histogram):
            seen += histogram[b]
            if seen >= q * total:
                out.append(bin_value(b))
                break
    return out


USAGE_BOUNDS = {"cpu_user": MAX_SECONDS * 1024, "cpu_sys": MAX_SECONDS * 1024, "max_rss_mb": 2 ** 40,
                "read_bytes": 2 ** 62, "write_bytes": 2 ** 62, "output_bytes": 2 ** 62}


def usage_fields(usage):
    """What a pilot measured its payload consumed (end reports' `usage`), each figure bounded."""
    check_keys(usage, "usage", tuple(USAGE_BOUNDS))
    return {k: as_number(v, f"usage.{k}", 0, USAGE_BOUNDS[k]) for k, v in usage.items()}


def store_quality(conn, uuid, checks, metrics):
    """A finished job's checks and metrics. A job with metrics and no verdict of its own is
    judged by its type's bands (a team starts with numbers and no code); its row gets the
    verdict either way."""
    job = conn.execute("SELECT jobtype, infile, verdict FROM jobs WHERE uuid=?", (uuid,)).fetchone()
    if not checks and metrics:
        checks = band_checks(conn, job["jobtype"], metrics)
        worst = max(checks, key=lambda c: VERDICTS.index(c[1]), default=None)
        if worst:
            conn.execute("UPDATE jobs SET verdict=?, verdict_check=? WHERE uuid=?", (worst[1], worst[0], uuid))
    conn.executemany("INSERT OR REPLACE INTO checks(uuid, name, result, message) VALUES(?, ?, ?, ?)",
                     [(uuid, *c) for c in checks])
    t = now()
    conn.executemany("INSERT OR REPLACE INTO metrics(uuid, name, value, jobtype, infile, ts) VALUES(?, ?, ?, ?, ?, ?)",
                     [(uuid, *m, job["jobtype"], job["infile"], t) for m in metrics])


def band_checks(conn, jobtype, metrics):
    """A check per banded metric: BAD outside its error range, WARNING outside its warn range."""
    values = dict(metrics)
    checks = []
    for b in conn.execute("SELECT * FROM bands WHERE jobtype=? ORDER BY metric", (jobtype,)):
        if b["metric"] not in values:
            continue
        value = values[b["metric"]]
        if b["needs"] and values.get(b["needs"], -math.inf) < b["needs_min"]:
            checks.append((b["metric"], "INVALID", f"not judged: {b['needs']} "
                           f"{values.get(b['needs'], 'missing')} is under the {b['needs_min']:g} it needs"))
            continue
        for result, low, high in (("BAD", b["error_low"], b["error_high"]), ("WARNING", b["warn_low"], b["warn_high"])):
            if low is not None and value < low:
                checks.append((b["metric"], result, f"{value:g} below {low:g} ({result.lower()} band)"))
                break
            if high is not None and value > high:
                checks.append((b["metric"], result, f"{value:g} above {high:g} ({result.lower()} band)"))
                break
        else:
            checks.append((b["metric"], "OK", f"{value:g} within its bands"))
    return checks


def band_needs(ranges, metric):
    """(metric, least value) a band needs before it judges (a histogram with too few entries says
    nothing: its check is INVALID), or (None, None); a 400 naming the metric otherwise."""
    needs = ranges.get("needs") if isinstance(ranges, dict) else None
    if needs is None:
        return None, None
    if (not isinstance(needs, dict) or len(needs) != 1 or not all(isinstance(k, str) and k for k in needs)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in needs.values())):
        raise bad(f"bands: {str(metric)[:40]}.needs must be {{\"metric\": least value}}")
    return next(iter(needs.items()))


def band_range(ranges, metric, kind):
    """(low, high) of a band, either None (open); a 400 naming the metric otherwise."""
    if isinstance(ranges, dict) and not set(ranges) <= {"warn", "error", "needs"}:
        raise bad(f"bands: {str(metric)[:40]}: only warn, error and needs are known")
    pair = (ranges or {}).get(kind, [None, None]) if isinstance(ranges, dict) else None
    if not isinstance(pair, list) or len(pair) != 2 or not all(
            x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)) for x in pair):
        raise bad(f"bands: {str(metric)[:40]}.{kind} must be [low, high], numbers or null")
    return pair


def run_job(conn, jobtype, run):
    """The newest finished job of `jobtype` on an input file of run `run`, or None."""
    for (infile,) in conn.execute("SELECT infile FROM inputs WHERE infile LIKE ? ORDER BY ts DESC LIMIT 1000",
                                  (f"%{run}%",)).fetchall():
        if run_of(infile)[0] == run:
            found = conn.execute("SELECT uuid FROM jobs INDEXED BY jobs_infile WHERE infile=? AND infile != '' "
                                 "AND jobtype=? AND state='finished' ORDER BY id DESC LIMIT 1",
                                 (infile, jobtype)).fetchone()
            if found:
                return found[0]
    return None


def band_text(value):
    return "" if value is None else f"{value:g}"


CANARY_PERIOD = 600.0       # seconds between a site's canaries when it names no canary_period
CANARY_PRIORITY = 1000      # a canary goes before the data: it says whether the data can be processed


def newest_jobs(read, infile, columns="*"):
    """{job type: its newest job} on an input file, by the jobs_infile index; `read` is a
    connection's execute or Store.read."""
    return {j["jobtype"]: j for j in read(f"SELECT {columns} FROM jobs INDEXED BY jobs_infile WHERE infile = ? "
                                          "AND infile != '' ORDER BY id", (infile,))}


def newest_canary(conn, site):
    """The site's newest canary job, by the job-type index (a few rows a day a site)."""
    return conn.execute("SELECT state, ts_sto, ts_def, reason FROM jobs INDEXED BY jobs_jobtype_id WHERE jobtype = ? "
                        "AND site = ? ORDER BY id DESC LIMIT 1", (CANARY, site)).fetchone()


def count_error(conn, job, state, exit_code, line, t):
    """Count a failure for the error summary: by job type and reason, and by where it ran; and
    keep the attempt itself, so that each count can be listed (/failures)."""
    bucket, reason = int(t) // ERROR_BUCKET, normalise_reason(line)
    conn.execute("INSERT INTO errors VALUES(?, ?, ?, 1, ?, ?) ON CONFLICT(bucket, jobtype, reason) "
                 "DO UPDATE SET n = n + 1, last = excluded.last", (bucket, job["jobtype"], reason, t, t))
    place = (job["ran_site"] or "", job["host"] or "")
    conn.execute("INSERT INTO error_places VALUES(?, ?, ?, ?, ?, 1) ON CONFLICT(bucket, site, host, jobtype, reason) "
                 "DO UPDATE SET n = n + 1", (bucket, *place, job["jobtype"], reason))
    conn.execute("INSERT INTO error_hosts VALUES(?, ?, ?, 1) ON CONFLICT(bucket, site, host) DO UPDATE SET n = n + 1",
                 (bucket, *place))
    conn.execute("INSERT INTO attempt_failures(ts, uuid, attempt, jobtype, state, exit_code, site, host, reason, line) "
                 "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                 (t, job["uuid"], job["attempt"], job["jobtype"], state, exit_code, *place, reason, line))


def cancel_job(conn, job, who, info):
    """Cancel a job wherever it stands; a pilot running it is freed now and kills the payload
    at its next heartbeat (the job is no longer its own)."""
    if not move_job(conn, job["uuid"], job["state"], "cancelled", who, attempt=job["attempt"], info=info,
                    changes={"ts_sto": now()}):
        return False
    if job["pilot"] and job["state"] in ACTIVE_JOB_STATES:
        conn.execute("UPDATE pilots SET job=NULL, state='active' WHERE uuid=? AND job=? AND state IN "
                     "('dispatched','running')", (job["pilot"], job["uuid"]))
    return True


def release_jobs(conn, pilot_uuid, why, who="housekeeping", never_started=False, crashed=False):
    """Free the jobs of a pilot that is gone. They end pilotTO (or are retried while attempts
    remain), except that a job still dispatched to a pilot that deregistered, and so says it
    never started it, goes back to `defined` as it was. A pilot that says it crashed never says
    that: its job may be what killed it, so it uses an attempt, and the second pilot a job takes
    out ends it failed, never handed out again. The job it kept in reserve, never started, goes
    back as it was. Returns how many became claimable."""
    released = 0
    reserve = conn.execute("SELECT reserve FROM pilots WHERE uuid=?", (pilot_uuid,)).fetchone()
    for job in conn.execute(HELD_JOBS.format(columns="*"), (pilot_uuid,)).fetchall():
        if job["state"] == "dispatched" and (never_started or (reserve and job["uuid"] == reserve[0])):
            released += give_back(conn, job["uuid"], pilot_uuid, who, why, attempt=job["attempt"])
        elif crashed and pilots_crashed_by(conn, job["uuid"]):
            released += requeue_or_end(conn, dict(job), "failed", who, f"{why}; the second pilot to crash "
                                       "on this job: it is not handed out again", retry=False)[1]
        else:
            released += requeue_or_end(conn, dict(job), "pilotTO", who, why)[1]
    return released


def give_back(conn, uuid, pilot_uuid, who, why, attempt=None):
    """A job dispatched to a pilot that never started it goes back to `defined`, as it was
    before the claim (no attempt used); guarded by state and pilot, so a repeat changes nothing."""
    return move_job(conn, uuid, "dispatched", "defined", who, attempt=attempt, pilot=pilot_uuid, info=why,
                    changes=dict(pilot=None, ts_dis=None))


def pilots_crashed_by(conn, uuid):
    """How many pilots said they crashed while they held this job."""
    return conn.execute(f"SELECT COUNT(*) FROM events INDEXED BY events_job WHERE job={JOB_ID} AND info LIKE ?",
                        (uuid, CRASH_INFO + "%")).fetchone()[0]


################################################################################################
# Service: the operations behind the API, each one validated request and one transaction.
# Brokerage and workflows are classes of their own; Service holds the rest and both of them.
################################################################################################

# -- Service: brokerage ---------------------------------------------------------------------------
# A probe reads the whole row of the one job it finds: the claim answers with it, without a second read
CLAIM_ANY = ("SELECT * FROM jobs INDEXED BY jobs_claim "
             "WHERE state='defined' AND site=? ORDER BY priority DESC, ts_def, id LIMIT 1")
CLAIM_TYPE = ("SELECT * FROM jobs INDEXED BY jobs_claim_type "
              "WHERE state='defined' AND site=? AND jobtype=? ORDER BY priority DESC, ts_def, id LIMIT 1")


def best_claimable(conn, site, jobtypes):
    """The best defined job a pilot of `site` taking `jobtypes` (empty: any) may claim, or None.
    One indexed probe per (site, jobtype): the cost does not grow with the backlog, whatever
    sqlite's statistics say (INDEXED BY: the plan cannot change under ANALYZE). Job types at
    their cap are left out; the counts come from the same transaction, so a cap holds under
    any concurrency."""
    capped = capped_types(conn)
    if capped:
        jobtypes = [t for t in (jobtypes or waiting_types(conn)) if t not in capped]
        if not jobtypes:
            return None
    probes = [(s, *([t] if t else [])) for s in dict.fromkeys(("", site)) for t in (jobtypes or [None])]
    found = [conn.execute(CLAIM_TYPE if jobtypes else CLAIM_ANY, args).fetchone() for args in probes]
    found = [r for r in found if r is not None]
    return min(found, key=lambda r: (-r["priority"], r["ts_def"], r["id"]), default=None)


def capped_types(conn):
    """Job types with as many jobs dispatched or running as their cap allows (cap 0: suspended),
    and those paused (as if their cap were 0)."""
    return {r[0] for r in conn.execute(
        "SELECT t.name FROM jobtypes t WHERE t.cap <= (SELECT COALESCE(SUM(c.n), 0) FROM job_counts c "
        "WHERE c.jobtype = t.name AND c.state IN ('dispatched', 'running')) "
        "UNION SELECT jobtype FROM pauses WHERE paused IS NOT NULL")}


def waiting_types(conn):
    """Job types with defined jobs, from the counts table."""
    return [r[0] for r in conn.execute("SELECT jobtype FROM job_counts WHERE state='defined' AND n > 0")]


class Broker:
    """Brokerage: hands the best eligible job to a pilot in one transaction, and wakes pilots
    waiting in a long poll when work may have become claimable.

    Methods for the caller:
    - request_job(pilot_uuid, body): a pilot's job request (its API route), long-polled.
    - notify_work(jobs=None): call after a committed transaction made `jobs` jobs claimable;
      None wakes every waiting request (a directive, or shutdown).
    - stop(): end every long poll now; the server is shutting down.
    - count(name), latency_histogram(), counters: the figures /metrics shows.
    """

    def __init__(self, store):
        self.store = store
        self.work = threading.Condition()   # notified when a job may have become claimable
        self.generation = 0
        self.waiting = 0                    # job requests blocked on self.work
        self.passes = 0                     # wake-ups a request that found nothing may pass on
        self.stopping = threading.Event()
        self.counters = {"claims": 0, "empty_polls": 0, "reports": 0, "stale_reports": 0, "http_requests": 0}
        self.counters_lock = threading.Lock()   # request threads count concurrently
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)    # claim latency histogram, last = +Inf
        self.latency_sum = 0.0

    def request_job(self, pilot_uuid, body, secret):
        check_keys(body, "request", ("wait",))
        wait = min(as_number(body.get("wait", 0), "wait", 0), MAX_WAIT)
        deadline = now() + wait
        woken = False
        while True:
            with self.work:
                generation = self.generation
            try:
                job, directive = self.store.write(lambda conn: self.claim(conn, own_pilot(conn, pilot_uuid, secret)),
                                                  shared=True)
            except ApiError:
                if woken:       # the pilot is gone (stopped, deleted): its wake-up goes to another
                    self.notify_work(1)
                raise
            if job is not None:
                self.count_claim(job)
                return {"job": job, "directive": None}
            if directive or self.stopping.is_set():
                return {"job": None, "directive": directive}
            with self.work:
                if woken and self.passes > 0:       # woken for a job that is not ours: pass it on
                    self.passes -= 1
                    self.work.notify(1)
                while self.generation == generation and not self.stopping.is_set():
                    left = deadline - now()
                    if left <= 0:
                        self.count("empty_polls")
                        return {"job": None, "directive": None}
                    self.waiting += 1
                    try:
                        self.work.wait(left)
                    finally:
                        self.waiting -= 1
                woken = True

    def claim(self, conn, pilot, holding=None):
        """Hand the pilot (its live row, see live_pilot) its job: the one already dispatched to
        it (an answer it never got), else the best eligible defined job. One transaction.
        `holding`: the job the pilot runs next, claimed by its last report; the job claimed now
        waits in reserve behind it, but only while no job request waits (an idle pilot takes it
        now instead) and the job held is still dispatched: not reported running, so short so far
        (the pilot gives its reserve back once that job runs past RUNNING_REPORT_DELAY, and a
        reserve never waits behind a long job). Returns (job or None, directive)."""
        if pilot["directive"] in LEAVING:       # told to go: it gets no more work
            return None, pilot["directive"]
        if holding and self.waiting:
            return None, None
        dispatched = conn.execute(HELD_JOBS.format(columns="*") + " AND state='dispatched'",
                                  (pilot["uuid"],)).fetchall()
        if holding and holding not in (j["uuid"] for j in dispatched):
            return None, None
        return self.pick(conn, pilot, next((j for j in dispatched if j["uuid"] != holding), None), holding), None

    @staticmethod
    def pick(conn, pilot, job, holding=None):
        """`job`, dispatched to this pilot already (but not the one it is `holding`), else the best
        defined job it may take, now dispatched to it; None (the pilot marked `no jobs`, unless
        it holds one) when there is none. A pilot holding a job was moved by its report
        (apply_report)."""
        pilot_uuid = pilot["uuid"]
        if job is None:
            best = best_claimable(conn, pilot["site"], json.loads(pilot["jobtypes"]))
            if best is None:    # woken with nothing for it: write only if its state changes
                if pilot["state"] != "no jobs" and not holding:
                    move_pilot(conn, pilot_uuid, LIVE_PILOT_STATES, "no jobs", ts_beat=now())
                return None
            # Select, then a guarded update: atomic, as the write lock and BEGIN IMMEDIATE are
            # held (a returning clause needs sqlite 3.35; lxplus has 3.34).
            changes = dict(pilot=pilot_uuid, ts_dis=now(), host=pilot["host"], ran_site=pilot["site"])
            move_job(conn, best["uuid"], "defined", "dispatched", pilot_uuid, attempt=best["attempt"], changes=changes)
            job = {**dict(best), "state": "dispatched", **changes}
        if holding:
            conn.execute("UPDATE pilots SET reserve=? WHERE uuid=?", (job["uuid"], pilot_uuid))
        else:
            move_pilot(conn, pilot_uuid, LIVE_PILOT_STATES, "dispatched", job=job["uuid"], ts_beat=now())
        return job_to_dict(job)

    def notify_work(self, jobs=None):
        """Wake waiting job requests: one per newly claimable job (all of them when `jobs` is
        None: a directive or shutdown concerns every pilot). A request woken for a job its pilot
        may not take passes the wake-up on, at most once per waiting request, so such a job still
        reaches a pilot that may."""
        if jobs == 0:
            return
        with self.work:
            self.generation += 1
            if jobs is None:
                self.work.notify_all()
            else:
                self.passes = self.waiting
                self.work.notify(jobs)

    def stop(self):
        self.stopping.set()
        self.notify_work()

    def count(self, name):
        with self.counters_lock:
            self.counters[name] += 1

    def count_claim(self, job):
        """Call once the claim committed: the latency runs to this moment, so it includes the
        claim's queries and its commit (a claim that crawls shows here)."""
        waited = max(0.0, now() - job["ts_def"])
        with self.counters_lock:
            self.counters["claims"] += 1
            self.latency_sum += waited
            self.latency[next((i for i, le in enumerate(LATENCY_BUCKETS) if waited <= le),
                              len(LATENCY_BUCKETS))] += 1

    def latency_histogram(self):
        cumulative, buckets = 0, []
        for le, n in zip(list(LATENCY_BUCKETS) + ["+Inf"], self.latency):
            cumulative += n
            buckets.append((le, cumulative))
        return {"buckets": buckets, "sum": self.latency_sum, "count": cumulative}


DURATION_BUCKETS = (1, 5, 10, 30, 60, 300, 600, 1800, 3600, 14400)     # seconds
MEMORY_BUCKETS = (100, 250, 500, 1000, 2000, 4000, 8000)                # MB


class JobCosts:
    """What ended jobs cost, per job type: for /metrics, histograms of duration and peak memory
    and a counter of CPU seconds (since the server started, as Prometheus counters are); for a
    job type's profile, its histogram cells, kept here and written by housekeeping (flush), so
    the end of a job pays no write for them (a crash loses at most a pass of statistics)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pending = {}       # job uuid -> its figures, from the report's transaction until its commit
        self.types = {}         # jobtype -> {"duration": [counts], "memory": [counts], sums, cpu}
        self.profiles = collections.Counter()   # histogram cell -> jobs counted, not yet written
        self.recent = {}        # jobtype -> its last DRIFT_JOBS (ended, duration, peak memory): drift

    def observe(self, uuid):
        figures = self.pending.pop(uuid, None)
        if figures is None:
            return
        jobtype, wall, memory, cpu = figures
        ended = now()
        cells = [profile_key(jobtype, "duration", wall, ended)]
        if memory is not None:
            cells.append(profile_key(jobtype, "memory", memory, ended))
        if cpu is not None and wall > 0:
            cells.append(profile_key(jobtype, "cpu_eff", 100 * cpu / wall, ended))
        with self.lock:
            self.profiles.update(cells)
            t = self.types.setdefault(jobtype, {"duration": [0] * (len(DURATION_BUCKETS) + 1), "duration_sum": 0.0,
                                                "memory": [0] * (len(MEMORY_BUCKETS) + 1), "memory_sum": 0.0,
                                                "cpu": 0.0})
            self.recent.setdefault(jobtype, collections.deque(maxlen=DRIFT_JOBS)).append((ended, wall, memory))
            t["duration"][bisect.bisect_left(DURATION_BUCKETS, wall)] += 1
            t["duration_sum"] += wall
            t["cpu"] += cpu or 0.0
            if memory is not None:
                t["memory"][bisect.bisect_left(MEMORY_BUCKETS, memory)] += 1
                t["memory_sum"] += memory

    def flush(self, store):
        """Write the histogram cells counted since the last flush (a housekeeping pass)."""
        with self.lock:
            counts, self.profiles = self.profiles, collections.Counter()
        if counts:
            try:
                store.write(write_profiles, counts)
            except Exception:
                with self.lock:
                    self.profiles.update(counts)    # kept for the next pass
                raise

    def medians(self, t, window):
        """Per job type and metric (duration, memory): the exact medians of its jobs ended in the
        last `window` seconds and in the DRIFT_BEFORE windows before, with their counts."""
        with self.lock:
            recent = {jt: list(q) for jt, q in self.recent.items()}
        found = []
        for jobtype, ended in recent.items():
            for metric, i in (("duration", 1), ("memory", 2)):
                now_ = [e[i] for e in ended if e[0] > t - window and e[i] is not None]
                before = [e[i] for e in ended if t - (1 + DRIFT_BEFORE) * window < e[0] <= t - window
                          and e[i] is not None]
                found.append((jobtype, metric, median(now_), len(now_), median(before), len(before)))
        return found

    def unflushed(self, jobtype, metric, first_bucket):
        """{(bucket, bin): n} counted but not written yet, for reads that must be current."""
        with self.lock:
            return {(b, bin_): n for (b, jt, m, bin_), n in self.profiles.items()
                    if jt == jobtype and m == metric and b >= first_bucket}

    def snapshot(self):
        with self.lock:
            return {jt: {k: list(v) if isinstance(v, list) else v for k, v in t.items()} for jt, t in self.types.items()}


# -- Service: workflows ---------------------------------------------------------------------------
class Workflows:
    """The workflow operations of the API: DAG templates, workflows, datasets, injection.

    It needs the store and the broker, passed explicitly: every operation that makes jobs
    claimable calls broker.notify_work after its transaction commits.

    Methods for the caller (each one request): add_dag, get_dag, dag_graphml, list_dags,
    delete_dag; create_workflow, set_workflow_state, get_workflow, list_workflows,
    delete_workflow; inject, list_datasets, list_datatypes, define_datatype.
    """

    def __init__(self, store, broker):
        self.store, self.broker = store, broker

    # -- DAG templates ----------------------------------------------------------------------------
    def add_dag(self, body):
        check_keys(body, "dag", ("name", "description", "graphml", "replace"))
        name = as_str(body.get("name", ""), "name", allow_empty=False, max_len=128)
        if "/" in name:
            raise bad(f"name: {name!r} must not contain '/'")
        description = as_str(body.get("description", ""), "description", max_len=4096)
        replace = as_choice(body.get("replace", False), "replace", (True, False))
        vertices, edges = parse_graphml(as_str(body.get("graphml", ""), "graphml", False, MAX_BODY))
        with self.store.transaction() as conn:
            self.check_datatypes(conn, edges)
            if conn.execute("SELECT 1 FROM dags WHERE name=?", (name,)).fetchone():
                if not replace:
                    raise ApiError(409, f"name: a DAG called {name!r} exists already; replace it with "
                                        "replace: true (workflow.py -g FILE --replace), or choose another name")
                self.remove_dag(conn, name)
            conn.execute("INSERT INTO dags(name, description, ts) VALUES(?,?,?)", (name, description, now()))
            conn.executemany("INSERT INTO dag_vertices(dag,name,payload,env,jobtype,timelimit,priority) "
                             "VALUES(:dag,:name,:payload,:env,:jobtype,:timelimit,:priority)",
                             [{**v, "dag": name} for v in vertices])
            conn.executemany("INSERT INTO dag_edges(dag,source,target,name,dirpath,datatype,datatag,comment) "
                             "VALUES(:dag,:source,:target,:name,:dirpath,:datatype,:datatag,:comment)",
                             [{**e, "dag": name} for e in edges])
        return self.get_dag(name)

    def get_dag(self, name):
        dag, vertices, edges = dag_parts(self.store.read, name)
        return {**dag, "vertices": vertices, "edges": edges}

    def dag_graphml(self, name):
        _, vertices, edges = dag_parts(self.store.read, name)
        return {"name": name, "graphml": to_graphml(vertices, edges)}

    def list_dags(self):
        return {"dags": [dict(r) for r in self.store.read(
            "SELECT d.name, d.description, d.ts, (SELECT COUNT(*) FROM dag_vertices v WHERE v.dag=d.name) AS vertices, "
            "(SELECT COUNT(*) FROM workflows w WHERE w.dag=d.name) AS workflows FROM dags d ORDER BY d.name")]}

    def delete_dag(self, name):
        with self.store.transaction() as conn:
            dag_parts(conn.execute, name)
            self.remove_dag(conn, name)
        return {"deleted": name}

    @staticmethod
    def remove_dag(conn, name):
        """Delete a DAG template, unless workflows made from it still run (409)."""
        live = conn.execute("SELECT COUNT(*) FROM workflows WHERE dag=? AND state IN ('defined','running')",
                            (name,)).fetchone()[0]
        if live:
            raise ApiError(409, f"dag {name!r}: {live} workflow(s) made from it are still running")
        conn.execute("DELETE FROM dags WHERE name=?", (name,))
        event(conn, "dag", name, None, "deleted")

    @staticmethod
    def check_datatypes(conn, edges):
        """Every datatype an edge names must be defined: else its files get no extension."""
        known = {r["name"] for r in conn.execute("SELECT name FROM datatypes")}
        for e in edges:
            if e["datatype"] and e["datatype"] not in known:
                raise bad(f"graphml: edge {e['source']}->{e['target']}: datatype {e['datatype']!r} is not "
                          f"defined; define it with workflow.py --datatype {e['datatype']}:.EXT")

    # -- workflows --------------------------------------------------------------------------------
    def create_workflow(self, body, who):
        check_keys(body, "workflow", ("uuid", "dag", "name", "description", "state", "fileinfo", "jobinfo", "user"))
        dag_name = as_str(body.get("dag", ""), "dag", allow_empty=False, max_len=128)
        wf = {"uuid": as_uuid(body["uuid"], "uuid") if "uuid" in body else str(uuidlib.uuid4()),
              "dag": dag_name,
              "state": as_choice(body.get("state", "template"), "state", ("template", "defined")),
              "user": who,
              "description": as_str(body.get("description", ""), "description", max_len=4096),
              "name": as_str(body.get("name") or dag_name, "name", max_len=256)}
        plan = self.plan(wf, body.get("fileinfo"), body.get("jobinfo"))
        released = 0
        with self.store.transaction() as conn:
            # A creation repeated because its answer was lost was made once already.
            if not conn.execute("SELECT 1 FROM workflows WHERE uuid=?", (wf["uuid"],)).fetchone():
                released = self.instantiate_planned(conn, wf, plan)
        self.broker.notify_work(released)
        return self.get_workflow(wf["uuid"])

    def plan(self, wf, fileinfo, jobinfo, outdir=None):
        """Read the DAG and plan the workflow's rows outside the write lock: (dag's ts, rows)."""
        dag, vertices, edges = dag_parts(self.store.read, wf["dag"])
        extensions = {r["name"]: r["ext"] for r in self.store.read("SELECT name, ext FROM datatypes")}
        rows = plan_workflow(wf, vertices, edges, validate_fileinfo(fileinfo, edges),
                             validate_jobinfo(jobinfo, [v["name"] for v in vertices]), extensions, outdir)
        return dag["ts"], rows

    @staticmethod
    def instantiate_planned(conn, wf, plan):
        """Store the planned rows, unless the DAG was deleted or replaced meanwhile (409)."""
        dag_ts, (jobs, datasets) = plan
        if not conn.execute("SELECT 1 FROM dags WHERE name=? AND ts=?", (wf["dag"], dag_ts)).fetchone():
            raise ApiError(409, f"dag {wf['dag']!r}: deleted or replaced while the workflow was made; try again")
        return instantiate(conn, wf, jobs, datasets)

    def set_workflow_state(self, wfuuid, body, who):
        check_keys(body, "workflow", ("state",))
        state = as_choice(body.get("state"), "state", ("defined", "cancelled"))
        released = 0
        with self.store.transaction() as conn:
            wf = lookup(conn, "workflows", wfuuid)
            if state == "defined":
                released = start_workflow(conn, wfuuid, who)
            elif wf["state"] in ("finished", "failed", "cancelled"):
                raise ApiError(409, f"workflow {wfuuid}: is {wf['state']} already")
            else:
                for job in conn.execute("SELECT uuid, state, attempt, pilot FROM jobs WHERE wfuuid=? AND "
                                        "state IN ('template','defined','dispatched','running')",
                                        (wfuuid,)).fetchall():
                    cancel_job(conn, job, who, "workflow cancelled")
                conn.execute("UPDATE workflows SET state='cancelled', ts_sto=? WHERE uuid=?", (now(), wfuuid))
                event(conn, "workflow", wfuuid, wf["state"], "cancelled", who)
        self.broker.notify_work(released)
        return self.get_workflow(wfuuid)

    def get_workflow(self, wfuuid):
        with self.store.reading() as conn:
            wf = lookup(conn, "workflows", wfuuid)
            jobs = [dict(r) for r in conn.execute(
                "SELECT uuid, vertex, name, jobtype, state, exit_code, attempt, ts_sta, ts_sto, reason FROM jobs "
                "WHERE wfuuid=? ORDER BY id", (wfuuid,))]
            files = [dict(r) for r in conn.execute(
                "SELECT uuid, name, dirpath, datatype, datatag, state, producer, consumer FROM datasets "
                "WHERE wfuuid=? AND origin='edge' ORDER BY id", (wfuuid,))]
        return {**dict(wf), "jobs": jobs, "datasets": files}

    def list_workflows(self, query):
        rows, paging = page_of(self.store, "workflows", query, ("state", "dag", "name"))
        return {"workflows": rows, **paging}

    def delete_workflow(self, wfuuid, who):
        with self.store.transaction() as conn:
            lookup(conn, "workflows", wfuuid)
            active = conn.execute("SELECT COUNT(*) FROM jobs WHERE wfuuid=? AND state IN ('dispatched','running')",
                                  (wfuuid,)).fetchone()[0]
            if active:
                raise ApiError(409, f"workflow {wfuuid}: {active} job(s) still running; cancel it first")
            conn.execute("DELETE FROM jobs WHERE wfuuid=?", (wfuuid,))
            conn.execute("DELETE FROM datasets WHERE wfuuid=?", (wfuuid,))
            conn.execute("DELETE FROM workflows WHERE uuid=?", (wfuuid,))
            event(conn, "workflow", wfuuid, None, "deleted", who)
        return {"deleted": wfuuid}

    # -- data -------------------------------------------------------------------------------------
    def inject(self, body, who):
        """Register a new data file once (the server decides, by dirpath and name) and start its
        work in the same transaction: a workflow of `dag`, or the given `jobs`."""
        check_keys(body, "inject", ("name", "dirpath", "datatype", "size", "dag", "jobs", "user", "template",
                                    "fileinfo", "outdir"))
        name = as_str(body.get("name", ""), "name", allow_empty=False, max_len=1024)
        dirpath = as_str(body.get("dirpath", ""), "dirpath", allow_empty=False, max_len=4096)
        size = as_int(body.get("size", 0), "size", 0)
        if "dag" in body and "jobs" in body:
            raise bad("inject: give either dag or jobs")
        template = as_str(body.get("template", body.get("dag", "")), "template", max_len=256)
        path = os.path.join(dirpath, name)
        if "dag" not in body and "jobs" not in body:
            body = {**body, **self.work_like(template, path)}
        jobs = validate_submission({"jobs": body["jobs"]}) if "jobs" in body else None
        wf = plan = None
        if jobs is None:
            dag_name = as_str(body["dag"], "dag", allow_empty=False)
            wf = {"uuid": str(uuidlib.uuid4()), "dag": dag_name, "name": f"{dag_name}:{name}",
                  "description": f"injected {path}", "user": who, "state": "defined", "infile": path}
            outdir = as_str(body.get("outdir", ""), "outdir", max_len=4096) or None
            plan = self.plan(wf, body.get("fileinfo") or f"inherit:{path}", None, outdir)
        with self.store.transaction() as conn:
            cur = conn.execute("INSERT INTO datasets(uuid,name,dirpath,datatype,state,origin,wfuuid,size,"
                               "template,ts) VALUES(?,?,?,?,'ready','injected',?,?,?,?) ON CONFLICT DO NOTHING",
                               (str(uuidlib.uuid4()), name, dirpath, body.get("datatype", ""),
                                wf and wf["uuid"], size, template, now()))
            if not cur.rowcount:                    # known for this template: its work was started then
                return {"path": path, "registered": False}
            note_arrival(conn, dirpath)
            if jobs is not None:
                insert_jobs(conn, jobs, who)
                result, released = {"jobs": [j["uuid"] for j in jobs]}, len(jobs)
            else:
                result, released = {"workflow": wf["uuid"]}, self.instantiate_planned(conn, wf, plan)
        self.broker.notify_work(released)
        return {"path": path, "registered": True, **result}

    def list_datasets(self, query):
        rows, paging = page_of(self.store, "datasets", query, ("state", "origin", "wfuuid", "datatype"))
        return {"datasets": rows, **paging}

    DATASET_STATES = ("pending", "ready", "bad", "archived")

    def work_like(self, template, path):
        """The work of a file posted with only its template (a DAQ or transfer script, when the
        file closes): a DAG template's DAG, or the jobs of the newest file injected under the
        template, each made anew for `path`."""
        if template.startswith("dag:"):
            return {"dag": template[4:]}
        newest = self.store.read_one(
            "SELECT dirpath, name FROM datasets INDEXED BY datasets_template WHERE template = ? AND origin = 'injected' "
            "ORDER BY ts DESC LIMIT 1", (template,)) if template else None
        if newest is None:
            raise bad(f"inject: give dag, jobs, or the template of files injected before (no file has template "
                      f"{template!r} yet: start its injector once)")
        made = [copied_job(j, path) for t, j in newest_jobs(self.store.read, os.path.join(newest["dirpath"],
                                                                                         newest["name"])).items()
                if "@" not in t and not j["wfuuid"]]
        if not made:
            raise bad(f"inject: the newest file of template {template!r} has no job left to copy")
        return {"jobs": [{k: v for k, v in j.items() if k != "from"} for j in made]}

    def register_dataset(self, body, who):
        """A file registered by hand (the original's dataset.py -r): listed on /datasets, its own
        origin, tied to no work."""
        check_keys(body, "dataset", ("name", "dirpath", "datatype", "comment", "state", "size", "uuid"))
        row = {"uuid": as_uuid(body["uuid"], "uuid") if "uuid" in body else str(uuidlib.uuid4()),
               "name": as_str(body.get("name", ""), "name", allow_empty=False, max_len=1024),
               "dirpath": as_str(body.get("dirpath", ""), "dirpath", allow_empty=False, max_len=4096),
               "datatype": as_str(body.get("datatype", ""), "datatype", max_len=64),
               "comment": as_str(body.get("comment", ""), "comment", max_len=1024),
               "state": as_choice(body.get("state", "ready"), "state", self.DATASET_STATES),
               "size": as_int(body.get("size", 0), "size", 0)}
        with self.store.transaction() as conn:
            self.check_datatype(conn, row["datatype"])
            conn.execute("INSERT INTO datasets(uuid,name,dirpath,datatype,comment,state,origin,size,ts) "
                         "VALUES(:uuid,:name,:dirpath,:datatype,:comment,:state,'registered',:size,:ts) "
                         "ON CONFLICT(uuid) DO NOTHING", dict(row, ts=now()))
            note_arrival(conn, row["dirpath"])
            return dict(lookup(conn, "datasets", row["uuid"]))

    def adjust_dataset(self, uuid, body, who):
        check_keys(body, "dataset", ("state", "comment", "datatype"))
        if not body:
            raise bad("dataset: give state, comment and/or datatype")
        changes = {}
        if "state" in body:
            changes["state"] = as_choice(body["state"], "state", self.DATASET_STATES)
        if "comment" in body:
            changes["comment"] = as_str(body["comment"], "comment", max_len=1024)
        if "datatype" in body:
            changes["datatype"] = as_str(body["datatype"], "datatype", max_len=64)
        with self.store.transaction() as conn:
            lookup(conn, "datasets", uuid)
            self.check_datatype(conn, changes.get("datatype", ""))
            conn.execute("UPDATE datasets SET " + ", ".join(f"{k}=:{k}" for k in changes) + " WHERE uuid=:uuid",
                         dict(changes, uuid=uuid))
            return dict(lookup(conn, "datasets", uuid))

    def delete_dataset(self, uuid, who):
        """Forget a file record: an injected file is then started again by its injector (the way to
        rerun one file); a workflow's files go with their workflow."""
        with self.store.transaction() as conn:
            row = lookup(conn, "datasets", uuid)
            if row["origin"] == "edge":
                raise ApiError(409, f"dataset {uuid}: a file of workflow {row['wfuuid']}; delete the workflow instead")
            conn.execute("DELETE FROM datasets WHERE uuid=?", (uuid,))
        return {"deleted": uuid}

    @staticmethod
    def check_datatype(conn, name):
        if name and not conn.execute("SELECT 1 FROM datatypes WHERE name=?", (name,)).fetchone():
            raise bad(f"datatype: {name!r} is not defined (workflow.py --datatype NAME:EXT)")

    def delete_datatype(self, name):
        with self.store.transaction() as conn:
            if not conn.execute("SELECT 1 FROM datatypes WHERE name=?", (name,)).fetchone():
                raise ApiError(404, f"datatype {name!r}: no such datatype")
            used = conn.execute("SELECT dag FROM dag_edges WHERE datatype=? LIMIT 1", (name,)).fetchone()
            if used:
                raise ApiError(409, f"datatype {name!r}: DAG {used[0]!r} uses it")
            conn.execute("DELETE FROM datatypes WHERE name=?", (name,))
        return {"deleted": name}

    def list_datatypes(self):
        return {"datatypes": [dict(r) for r in self.store.read("SELECT name, ext, comment FROM datatypes ORDER BY name")]}

    def define_datatype(self, name, body):
        check_keys(body, "datatype", ("ext", "comment"))
        ext = as_str(body.get("ext", ""), "ext", max_len=16)
        comment = as_str(body.get("comment", ""), "comment", max_len=1024)
        self.store.write(lambda conn: conn.execute(
            "INSERT INTO datatypes(name, ext, comment) VALUES(?, ?, ?) "
            "ON CONFLICT(name) DO UPDATE SET ext=excluded.ext, comment=excluded.comment", (name, ext, comment)))
        return {"name": name, "ext": ext, "comment": comment}


# -- Service: published images -------------------------------------------------------------------
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".svg": "image/svg+xml"}
IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SVG_POLICY = "default-src 'none'; style-src 'unsafe-inline'; sandbox"   # an SVG shows, never runs


def sniff_image(data, ext):
    """The MIME type `data` really has if it is the image its extension says, else None."""
    magic = {".png": (b"\x89PNG\r\n\x1a\n",), ".jpg": (b"\xff\xd8\xff",), ".jpeg": (b"\xff\xd8\xff",),
             ".gif": (b"GIF87a", b"GIF89a")}
    if ext == ".svg":
        return IMAGE_TYPES[ext] if b"<svg" in data[:4096] else None
    return IMAGE_TYPES[ext] if ext in magic and data.startswith(magic[ext]) else None


class Images:
    """The images jobs publish (their plots), kept as files in a directory beside the database,
    never in a web root, one subdirectory per job; the images table says which exist.

    Methods for the caller: publish (a pilot's upload), open (serving), forget and sweep (purge)."""

    def __init__(self, store, directory, max_bytes=MAX_IMAGE_BYTES, max_count=MAX_IMAGES,
                 max_store=MAX_IMAGE_STORE, min_free=MIN_FREE):
        self.store, self.directory = store, directory
        self.max_bytes, self.max_count = max_bytes, max_count
        self.max_store, self.min_free = max_store, min_free

    def limits(self):
        return {"max_bytes": self.max_bytes, "max_count": self.max_count}

    def publish(self, uuid, name, data, secret):
        """Keep one image of a job its pilot is running; the pilot proves it holds the job."""
        with self.store.transaction() as conn:
            job = lookup(conn, "jobs", uuid)
            if not job["pilot"]:
                raise ApiError(403, f"X-P3S-Pilot-Secret: no pilot holds job {uuid}; images need the secret "
                                    "of the pilot running it")
            check_pilot_secret(conn, job["pilot"], secret)
            if job["state"] not in ACTIVE_JOB_STATES:
                raise ApiError(409, f"job {uuid}: is {job['state']}; images are published while it runs")
            mime = self.check_image(name, data)
            held = conn.execute("SELECT COUNT(*) FROM images WHERE job=? AND name != ?", (uuid, name)).fetchone()[0]
            if held >= self.max_count:
                raise bad(f"{name}: job {uuid} already published {held} images, the most a job may")
            self.check_free(len(data))
            self.write_file(uuid, name, data)
            conn.execute("DELETE FROM images WHERE job=? AND name=?", (uuid, name))    # a replaced image
            conn.execute("INSERT INTO images(job, name, type, size, jobtype, infile, ts) VALUES(?, ?, ?, ?, ?, ?, ?)",
                         (uuid, name, mime, len(data), job["jobtype"], job["infile"], now()))
            evicted = self.evict(conn, job["jobtype"])
        for job_uuid, old_name in evicted:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.directory, job_uuid, old_name))
        return {"job": uuid, "name": name, "type": mime, "size": len(data)}

    def free_bytes(self):
        try:
            return shutil.disk_usage(os.path.dirname(os.path.abspath(self.directory))).free
        except OSError:
            return None

    def check_free(self, size):
        """507 when this image would leave less than min_free on the database's filesystem: the
        database matters more than the plots."""
        free = self.free_bytes()
        if free is not None and free - size < self.min_free:
            raise ApiError(507, f"images: {free // 2**20} MiB free on the server's disk, below the floor of "
                                f"{self.min_free // 2**20} MiB (--min-free-mb); image refused, the job goes on")

    def evict(self, conn, jobtype):
        """Past max_store bytes in all, images go oldest first (their rows now, files after the
        commit): the writer's own job type's while it holds more than an even share of the store,
        so that one writer flooding the store pushes out its own plots, not every other type's."""
        evicted = []
        while conn.execute("SELECT bytes FROM image_store").fetchone()[0] > self.max_store:
            types = conn.execute("SELECT COUNT(*) FROM (SELECT DISTINCT jobtype FROM images INDEXED BY "
                                 "images_jobtype)").fetchone()[0]
            own = conn.execute("SELECT COALESCE(SUM(size), 0) FROM images INDEXED BY images_jobtype "
                               "WHERE jobtype=?", (jobtype,)).fetchone()[0]
            oldest = conn.execute("SELECT id, job, name FROM images INDEXED BY images_jobtype WHERE jobtype=? "
                                  "ORDER BY id LIMIT 1", (jobtype,)).fetchone() \
                if own > self.max_store / max(1, types) else None
            oldest = oldest or conn.execute("SELECT id, job, name FROM images ORDER BY id LIMIT 1").fetchone()
            if oldest is None:
                break
            conn.execute("DELETE FROM images WHERE id=?", (oldest["id"],))
            evicted.append((oldest["job"], oldest["name"]))
        return evicted

    def usage(self):
        """What /api/health says of the image store."""
        row = self.store.read_one("SELECT bytes, n FROM image_store")
        return {"bytes": row["bytes"], "count": row["n"], "max_bytes": self.max_store,
                "free_bytes": self.free_bytes(), "min_free_bytes": self.min_free}

    def check_image(self, name, data):
        """The image's MIME type, or a 400/413 naming what is wrong with it."""
        ext = os.path.splitext(name)[1].lower()
        if not IMAGE_NAME.fullmatch(name) or ext not in IMAGE_TYPES:
            raise bad(f"name: {name[:140]!r} must be a plain file name (letters, digits, . _ -) ending in "
                      f"{', '.join(IMAGE_TYPES)}")
        if len(data) > self.max_bytes:
            raise ApiError(413, f"{name}: {len(data)} bytes is over the image limit of {self.max_bytes}")
        mime = sniff_image(data, ext)
        if mime is None:
            raise bad(f"{name}: the content is not a {ext[1:].upper()} image")
        return mime

    def write_file(self, uuid, name, data):
        folder = os.path.join(self.directory, uuid)
        os.makedirs(folder, mode=0o750, exist_ok=True)
        partial = os.path.join(folder, f".{name}.part")
        with open(partial, "wb") as f:
            f.write(data)
        os.replace(partial, os.path.join(folder, name))

    def open(self, uuid, name):
        """(open file descriptor, MIME type) of a published image, or a 404 (no such row, or
        its file removed behind the server's back)."""
        row = self.store.read_one("SELECT type FROM images WHERE job=? AND name=?", (uuid, name))
        try:
            if row is not None:
                return os.open(os.path.join(self.directory, uuid, name), os.O_RDONLY | os.O_CLOEXEC), row["type"]
        except FileNotFoundError:
            pass
        raise ApiError(404, f"image {name[:140]!r} of job {uuid}: no such image")

    def forget(self, uuids):
        """Remove the files of deleted jobs (their rows went with the jobs, by trigger)."""
        for uuid in uuids:
            shutil.rmtree(os.path.join(self.directory, uuid), ignore_errors=True)

    def sweep(self, settle=TIDY_PERIOD):
        """Remove the folders of jobs deleted by other paths (a deleted workflow), left over by a
        crash between a file and its row; folders younger than `settle` may be mid-publish."""
        try:
            folders = [e.name for e in os.scandir(self.directory)
                       if e.is_dir() and e.stat().st_mtime < now() - settle]
        except FileNotFoundError:
            return
        for chunk in chunks(folders):
            kept = {r[0] for r in self.store.read(f"SELECT DISTINCT job FROM images WHERE job IN "
                                                  f"({','.join('?' * len(chunk))})", chunk)}
            self.forget(set(chunk) - kept)


# -- Service: alarms (what needs a person, and its delivery) --------------------------------------
class Notifier:
    """Delivers alarms to a person: a webhook (Mattermost's and Slack's incoming webhooks take
    the {"text": ...} body; the structured fields ride along) and/or a command with the alarm in
    its environment (mail, ntfy, a pager script). One thread, in order, outside every lock: a
    receiver that hangs delays only the next message. A failed delivery is retried with
    back-off (DELIVERY_BACKOFF, then given up), and each outcome reported (`report`).

    Methods for the caller: send(alarm, "raised", "repeated" or "cleared")."""

    def __init__(self, webhook=None, command=None, report=None):
        self.channels = [(kind, target)
                         for kind, target in (("webhook", webhook), ("command", command))
                         if target]
        self.report = report or (lambda result: None)
        self.queue = queue.Queue()
        self.delivered = 0
        if self.channels:
            threading.Thread(target=self.run, name="notifier", daemon=True).start()

    def send(self, a, state):
        for channel in self.channels:
            self.queue.put((channel, self.message(a, state)))

    def run(self):
        while True:
            (kind, target), message = self.queue.get()
            for tries, wait in enumerate((0, *DELIVERY_BACKOFF), 1):
                time.sleep(wait)
                error = self.deliver(kind, target, message)
                if error is None:
                    self.delivered += 1
                    self.report(f"delivered {self.delivered}; last: {message['text']}")
                    break
                self.report(f"{kind} failing (try {tries}): {error}; alarm: {message['text']}")
            else:
                log.error("alarm not delivered by %s after %d tries: %s", kind, tries,
                          message["text"])

    @staticmethod
    def deliver(kind, target, message):
        """None once delivered, else what went wrong."""
        try:
            if kind == "webhook":
                request = urllib.request.Request(target,
                                                 json.dumps(message).encode(), method="POST",
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=DELIVERY_TIMEOUT) as answer:
                    answer.read()
                return None
            env = dict(os.environ,
                       **{f"P3S_ALARM_{k.upper()}": str(v) for k, v in message.items()})
            ran = subprocess.run(shlex.split(target), env=env, capture_output=True, text=True,
                                 timeout=DELIVERY_TIMEOUT)
            if ran.returncode == 0:
                return None
            return f"exit code {ran.returncode}: {ran.stderr.strip()[-200:]}"
        except (OSError, ValueError, subprocess.TimeoutExpired, urllib.error.URLError) as e:
            return str(e)[:300]

    @staticmethod
    def message(a, state):
        """What a person gets: one line of text, and the alarm's fields."""
        since = time.strftime("%H:%M", time.localtime(a["since"]))
        word = {"raised": a["severity"].upper(),
                "repeated": a["severity"].upper() + ", still"}.get(state, "cleared")
        text = f"[p3s {word}] {a['message']} (since {since}; {socket.gethostname()} {a['link']})"
        return {
            "text": text, "state": state, "name": a["name"], "key": a["key"],
            "severity": a["severity"], "message": a["message"], "link": a["link"],
            "since": a["since"], "server": socket.gethostname()
        }


class Alarms:
    """What needs a person now, raised from bounded reads, remembered, and delivered.

    Methods for the caller: raised() (the alarms now, ranked), acknowledge() and history()
    (the routes), notice_starving(t) and record(t) (each housekeeping pass).

    The rules, in one place:
    - Severity: a critical alarm means a person must act now (CRITICAL; no_pilots only while
      work waits, pilots_lost only once the lost pass lost_share of the pilots or lost_count);
      the rest are warnings.
    - What hides what: a root cause hides its symptoms (explain()): with no pilot alive, the
      sites below nominal, the lost pilots and the starving jobs; a site with no live pilot, its
      starving jobs and its lost pilots; a paused job type, its failure rate and its starving
      jobs; a dead injector, its stream's missing data.
      A hidden alarm is listed with `explained_by`, never shown apart or sent.
    - No flapping (Alertmanager's `for:`): a condition is raised once it held `hold` seconds,
      and cleared once it stayed gone `clear_hold` seconds (shown "clearing" meanwhile); so a
      blip is never raised, and a condition that comes and goes is one alarm, not many. A
      critical condition is shown `pending` before its hold, never sent.
    - Ranking: criticals first, then by impact (the jobs it holds up), then the oldest.
    - Delivery (Notifier): a critical at once, a warning once it lasted `delay`; each once per
      raise, and its clear once if its raise was sent; a critical that eases to a warning is
      a clear for whoever was told; told and still raised, unacknowledged, it is told again
      ("repeated") every `repeat` seconds.
    - Acknowledgements hold until the alarm clears (or for `for` seconds); silences for their
      `for` seconds. Either greys the alarm and stops its delivery.
    """
    NAMES = ("no_pilots", "pilots_lost", "site_below_nominal", "pilot_lifetime", "failure_rate",
             "no_new_work", "service_silent", "starving", "disk_low", "db_failing", "bad_data",
             "jobtype_paused", "drift", "late_run", "backup_stale", "pilots_not_starting",
             "canary_failed")    # also the /metrics gauges
    CRITICAL = ("no_pilots", "no_new_work", "disk_low", "db_failing", "failure_rate",
                "pilots_lost", "backup_stale", "canary_failed")

    def __init__(self, service, no_new_work=0, starving_minutes=STARVING_MINUTES, settings=None):
        self.svc, self.store = service, service.store
        settings = {
            "delay": ALARM_DELAY, "lost_share": LOST_SHARE, "lost_count": LOST_COUNT,
            "lifetime_min_ended": LIFETIME_MIN_ENDED, "webhook": None, "command": None,
            "hold": ALARM_HOLD, "clear_hold": ALARM_CLEAR_HOLD, "drift_window": DRIFT_WINDOW,
            "repeat": ALARM_REPEAT, **(settings or {})
        }
        self.delay, self.lost_share = settings["delay"], settings["lost_share"]
        self.lost_count = settings["lost_count"]
        self.lifetime_min_ended = settings["lifetime_min_ended"]
        self.notifier = Notifier(settings["webhook"], settings["command"], self.delivery_status)
        self.told = set()           # alarm keys sent while the database could not record it
        self.no_new_work = no_new_work      # minutes without a new data file: alarm (0: off)
        self.starving_minutes = starving_minutes
        self.starving_since = {}            # (site, jobtype) -> when no live pilot could take them
        self.hold, self.clear_hold = settings["hold"], settings["clear_hold"]
        self.drift_window, self.repeat = settings["drift_window"], settings["repeat"]
        self.pending, self.absent = {}, {}  # key -> since when (see notice)

    # -- one alarm, and what explains it ----------------------------------------------------------
    @staticmethod
    def alarm(name, message, link, critical=None, **labels):
        """One alarm: its name, a key that tells apart the alarms of one name (by site, job type,
        service), severity, message and link. `critical` overrides the name's usual severity."""
        critical = name in Alarms.CRITICAL if critical is None else critical
        key = ":".join([
            name, *(str(labels[k])
                    for k in ("site", "jobtype", "service", "check", "stream") if k in labels)
        ])
        return {
            "name": name, "key": key, "severity": "critical" if critical else "warning",
            "message": message, "link": link, **labels
        }

    @staticmethod
    def explain(alarms):
        """Root causes hide their symptoms (the class docstring says which): the symptoms stay in
        the list with `explained_by`, and are neither shown apart nor sent."""
        keys = {a["key"] for a in alarms}
        dead_sites = {
            a["site"] for a in alarms if a["name"] == "site_below_nominal" and not a["live"]
        }
        for a in alarms:
            symptom = a["name"] in ("site_below_nominal", "starving", "pilots_lost")
            if symptom and "no_pilots" in keys:
                a["explained_by"] = "no_pilots"
            elif a["name"] == "starving" and a["site"] in dead_sites:
                a["explained_by"] = f"site_below_nominal:{a['site']}"
            elif (a["name"] in ("starving", "failure_rate")
                  and f"jobtype_paused:{a['jobtype']}" in keys):
                a["explained_by"] = f"jobtype_paused:{a['jobtype']}"    # the breaker acted on it
            elif a["name"] == "no_new_work" and a.get("stream"):
                injector = next(
                    (k for k in keys if k.startswith(f"service_silent:injector {a['stream']} (")),
                    None)
                if injector:
                    a["explained_by"] = injector    # its injector is dead: that is the problem
        return alarms

    @staticmethod
    def event(conn, t, a, kind, who="", why="", until=None):
        conn.execute(
            "INSERT INTO alarm_events(ts, key, name, kind, severity, message, who, why, until) "
            "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (t, a["key"], a["name"], kind, a["severity"], a["message"], who, why, until))

    @staticmethod
    def matching_ack(a, acks):
        """The newest acknowledgement or silence that covers alarm `a`, if any."""
        return next(
            (k for k in acks
             if k["name"] == a["name"] and (not k["site"] or k["site"] == a.get("site")) and
             (not k["jobtype"] or k["jobtype"] == a.get("jobtype"))), None)

    @staticmethod
    def ack_name(a):
        """What alarm.py --ack takes to name this alarm: its name, and its site or job type."""
        scope = [
            f"-s {a['site']}" if a.get("site") else "",
            f"-T {a['jobtype']}" if a.get("jobtype") else ""
        ]
        return " ".join([a["name"], *filter(None, scope)])

    # -- evaluation: the conditions, from bounded reads -------------------------------------------
    def raised(self, query=None):
        """What needs a person now, ranked: criticals first, then by impact (the jobs it holds
        up), then the oldest. Each alarm names the problem, the figure and the list that shows
        it, with its severity, since when it is raised, what explains it (a root cause hides its
        symptoms) and who acknowledged or silenced it. Bounded reads only (counts tables,
        indexes), so the summary stays cheap."""
        t = now()
        return {"alarms": self.shown(t, *self.observe(t))}

    def observe(self, t):
        """(the conditions that hold now, explained; the alarms stored as raised, by key)."""
        conditions = self.explain(self.evaluate(t))
        return conditions, {
            r["key"]: dict(r) for r in self.store.read("SELECT * FROM alarm_state")
        }

    def notice(self, t, conditions, stored):
        """Housekeeping: since when each condition not yet raised holds (`pending`), and since
        when each raised alarm's condition is gone (`absent`): the clocks of the holds."""
        keys = {a["key"] for a in conditions}
        self.pending = {k: self.pending.get(k, t) for k in keys if k not in stored}
        self.absent = {k: self.absent.get(k, t) for k in stored if k not in keys}

    def shown(self, t, conditions, stored):
        """The alarms a person sees: a condition once it held `hold` seconds (or was raised), and
        a raised alarm whose condition is gone, until it stayed gone `clear_hold` seconds. A
        critical condition not held long enough yet is shown `pending` (a person at the screen
        sees an outage at once), never raised nor sent before its hold."""
        acks = self.active_acks(t)
        found = []
        for a in conditions:
            kept = stored.get(a["key"])
            a["since"] = kept["since"] if kept else self.pending.get(a["key"], t)
            if a["key"] in stored or t - a["since"] >= self.hold:
                found.append(a)
            elif a["severity"] == "critical":
                found.append(dict(a, pending=True))
        keys = {a["key"] for a in conditions}
        for key, r in stored.items():
            gone = t - self.absent.get(key, t)
            if key not in keys and gone < self.clear_hold:
                found.append({
                    **{k: r[k] for k in ("name", "key", "severity", "link", "since")}, "impact": 0,
                    "message": f"{r['message']} (clearing: not seen for {gone:.0f} s)"
                })
        for a in found:
            a["ack"], a["ack_name"] = self.matching_ack(a, acks), self.ack_name(a)
        found.sort(
            key=lambda a: (a["severity"] != "critical", -a.get("impact", 0), a["since"], a["key"]))
        return found

    def evaluate(self, t):
        pilots = {r["state"]: r["n"] for r in self.store.read("SELECT state, n FROM pilot_counts")}
        live = sum(pilots.get(s, 0) for s in LIVE_PILOT_STATES)
        alarms = []
        if not live:
            waiting = self.store.read_one(
                "SELECT COALESCE(SUM(n), 0) FROM job_counts WHERE state='defined'")[0]
            alarms.append(
                self.alarm("no_pilots", f"no pilot is alive; {waiting} job(s) waiting", "/pilots",
                           critical=waiting > 0, impact=waiting))
        sites = {
            s["name"]: (s, self.svc.site_figures(s, t)) for s in self.svc.list_sites()["sites"]
        }
        for site, figures in sites.values():
            alarms += self.at_site(site, figures)
        alarms += self.lost_pilots(t, live, sites)
        free = self.svc.images.free_bytes()
        if free is not None and free < 2 * self.svc.images.min_free:
            alarms.append(
                self.alarm(
                    "disk_low",
                    f"the server's disk has {free // 2 ** 20} MiB free: published images are "
                    f"refused below {self.svc.images.min_free // 2 ** 20} MiB, and the "
                    "database stops when it is full", "/api/health"))
        if self.svc.hk_failing:
            alarms.append(
                self.alarm("db_failing", f"housekeeping fails: {self.svc.hk_failing[:200]}",
                           "/api/health"))
        backup = self.svc.backups and self.svc.backups.problem()
        if backup:
            alarms.append(self.alarm("backup_stale", backup, "/api/health"))
        return (alarms + self.paused(t) + self.failures(t) + self.flow(t) + self.starving(t)
                + self.bad_data(t) + self.drift(t) + self.late(t))

    def lost_pilots(self, t, live, sites):
        """Pilots lost in the last hour that were not replaced: those of a site back at nominal
        (its factory started others) are a healthy disturbance, not an alarm; the rest are one,
        critical past lost_count or lost_share of the pilots (never one alone). Lost at one site
        below nominal, they are that site's problem (explained by its alarm)."""
        below = {
            name for name, (site, figures) in sites.items()
            if not site["pilots"] or figures["live"] < site["pilots"] * (1 - self.tolerance(site))
        }
        rows = self.store.read("SELECT site, COUNT(*) AS n FROM pilots INDEXED BY pilots_state "
                               "WHERE state='lost' AND ts_beat > ? GROUP BY site", (t - 3600, ))
        lost = {r["site"]: r["n"] for r in rows if r["site"] not in sites or r["site"] in below}
        count = sum(lost.values())
        if not count:
            return []
        many = count > 1 and (count >= self.lost_count or count > self.lost_share * (live + count))
        found = self.alarm(
            "pilots_lost",
            f"{count} pilot(s) lost in the last hour and not replaced ({live} alive)",
            "/pilots?state=lost&ended=1h", critical=many, impact=count)
        [(where, _)] = lost.items() if len(lost) == 1 else [(None, 0)]
        if where in sites and sites[where][0]["pilots"]:
            found["explained_by"] = f"site_below_nominal:{where}"
        return [found]

    @staticmethod
    def tolerance(site):
        return SITE_TOLERANCE if site["tolerance"] is None else site["tolerance"]

    def paused(self, t):
        """Job types paused: critical when the circuit breaker did it (a broken release, a bad
        calibration: nothing of that type runs until a person looks), a warning when a person
        did."""
        found = []
        for r in self.store.read("SELECT * FROM pauses WHERE paused IS NOT NULL ORDER BY jobtype"):
            held = self.store.read_one("SELECT COALESCE(SUM(n), 0) FROM waiting WHERE jobtype=?",
                                       (r["jobtype"], ))[0]
            found.append(
                self.alarm(
                    "jobtype_paused", f"{r['jobtype']}: paused by {r['who']}: {r['why']}; {held} "
                    f"job(s) held (job.py --resume {r['jobtype']} -m WHY)",
                    f"/jobtype/{quote(r['jobtype'], safe='')}",
                    critical=r["who"] == "circuit breaker", jobtype=r["jobtype"], impact=held))
        return found

    def drift(self, t):
        """Inside a shift: a job type whose median duration or peak memory over the last
        drift_window (1 h) is DRIFT_RATIO times that of the windows before it (a new release, a
        slower input, a leak), from its last jobs in memory: exact medians, no 24-hour wait."""
        found = []
        for jobtype, metric, now_, n_now, before, n_before in self.svc.costs.medians(
                t, self.drift_window):
            if min(n_now, n_before) < DRIFT_MIN_JOBS or not now_ or not before:
                continue
            if max(now_ / before, before / now_) >= DRIFT_RATIO:
                unit = "s" if metric == "duration" else "MB"
                found.append(
                    self.alarm(
                        "drift", f"{jobtype}: median {metric} {figure(now_, unit)} over the "
                        f"last {self.drift_window / 60:g} min, {figure(before, unit)} before "
                        f"({n_now} and {n_before} jobs)", f"/jobtype/{quote(jobtype, safe='')}",
                        jobtype=jobtype, check=metric, impact=n_now))
        return found

    def late(self, t):
        """Files of the last hour whose job of a type with a deadline has not ended within it
        of their arrival (none submitted counts too): one alarm per type, naming the newest."""
        found = []
        for d in self.store.read("SELECT jobtype, seconds FROM deadlines"):
            late = [r["infile"] for r in self.store.read(
                "SELECT infile, ts FROM inputs INDEXED BY inputs_ts WHERE ts > ? AND ts < ? ORDER BY ts DESC "
                "LIMIT ?", (t - 3600, t - d["seconds"], LATENCY_FILES)) if not self.done_in_time(r, d)]
            if late:
                within = f"{d['seconds']:g} s" if d["seconds"] < 120 else f"{d['seconds'] / 60:g} min"
                found.append(self.alarm("late_run", f"{d['jobtype']}: {len(late)} file(s) of the last hour not "
                                        f"done within {within} of arriving; newest "
                                        f"{os.path.basename(late[0])}",
                                        "/runs?" + urlencode({"jobtype": d["jobtype"], "age": "1h"}),
                                        jobtype=d["jobtype"], impact=len(late)))
        return found

    def done_in_time(self, arrival, deadline):
        """Whether a file's job of the deadline's type ended within it of the file's arrival."""
        return self.store.read_one(
            "SELECT COUNT(*) FROM jobs INDEXED BY jobs_infile WHERE infile=? AND infile != '' AND jobtype=? "
            "AND ts_sto <= ?", (arrival["infile"], deadline["jobtype"], arrival["ts"] + deadline["seconds"]))[0] > 0

    def bad_data(self, t):
        """Files a check judged BAD (or INVALID) in the last hour: one alarm per job type and
        check, however many runs (ten bad runs of one check are one problem), with the newest
        one's message. From the index of bad verdicts alone."""
        found = []
        for r in self.store.read(
                "SELECT jobtype, verdict_check, verdict, COUNT(*) AS n, MAX(ts_sto) AS last "
                "FROM jobs INDEXED BY jobs_bad WHERE verdict IN ('BAD', 'INVALID') AND ts_sto > ? "
                "GROUP BY jobtype, verdict_check", (t - 3600, )):
            newest = self.store.read_one(
                "SELECT j.infile, c.message FROM jobs AS j INDEXED BY jobs_bad "
                "JOIN checks AS c ON c.uuid = j.uuid AND c.name = j.verdict_check "
                "WHERE j.verdict IN ('BAD', 'INVALID') AND j.ts_sto = ? "
                "AND j.jobtype = ? LIMIT 1", (r["last"], r["jobtype"]))
            said = (f"; newest {os.path.basename(newest['infile'])}: {newest['message'][:200]}"
                    if newest else "")
            found.append(
                self.alarm(
                    "bad_data", f"{r['jobtype']}: {r['n']} file(s) judged {r['verdict']} by "
                    f"{r['verdict_check']} in the last hour{said}",
                    "/runs?" + urlencode({"verdict": r["verdict"], "jobtype": r["jobtype"]}),
                    jobtype=r["jobtype"], check=r["verdict_check"], impact=r["n"]))
        return found

    def active_acks(self, t):
        return [
            dict(r) for r in self.store.read(
                "SELECT * FROM alarm_acks WHERE until IS NULL OR until > ? "
                "ORDER BY id DESC", (t, ))
        ]

    def starving(self, t):
        found = []
        for (site, jobtype), (since, n, refusing) in sorted(self.starving_since.items()):
            if t - since > self.starving_minutes * 60:
                where = f" at site {site}" if site else ""
                why = f"; the pilots that could, say: {refusing}" if refusing else ""
                found.append(
                    self.alarm(
                        "starving",
                        f"{n} {jobtype} job(s){where} wait with no pilot that takes them "
                        f"(for {(t - since) / 60:.0f} min){why}", "/jobs?" +
                        urlencode({"state": "defined", "jobtype": jobtype, "site": site}),
                        critical=t - since > STARVING_ESCALATE * self.starving_minutes * 60,
                        site=site, jobtype=jobtype, impact=n))
        return found

    def notice_nominal(self, t):
        """Housekeeping: the sites that reach their nominal pilots for the first time since they
        were defined; until then, below nominal is their standing state, not an alarm."""
        for site in self.store.read(
                "SELECT name, pilots, tolerance FROM sites WHERE met IS NULL AND pilots > 0"):
            live = self.store.read_one(f"SELECT COUNT(*) FROM pilots WHERE site=? AND state IN "
                                       f"({','.join('?' * len(LIVE_PILOT_STATES))})",
                                       (site["name"], *LIVE_PILOT_STATES))[0]
            if live >= site["pilots"] * (1 - self.tolerance(site)):
                self.store.write(lambda conn: conn.execute(
                    "UPDATE sites SET met=? WHERE name=? AND met IS NULL", (t, site["name"])))

    def notice_starving(self, t):
        """Housekeeping: which (site, jobtype) pairs of defined jobs no live pilot may take (by
        site, jobtype, or a cap of 0), and since when; from the waiting counts and the live pilots.
        A pilot that says it takes no job now (its disk below --min-free-mb) takes none of them:
        its note is kept to say why."""
        marks = ",".join("?" * len(LIVE_PILOT_STATES))
        pilots = [(r["site"], json.loads(r["jobtypes"]), r["note"]) for r in self.store.read(
            f"SELECT DISTINCT site, jobtypes, note FROM pilots INDEXED BY pilots_state "
            f"WHERE state IN ({marks})",
            LIVE_PILOT_STATES)]
        suspended = {
            r[0] for r in self.store.read("SELECT name FROM jobtypes WHERE cap = 0 UNION "
                                          "SELECT jobtype FROM pauses WHERE paused IS NOT NULL")
        }
        starving = {}
        for r in self.store.read("SELECT site, jobtype, n FROM waiting WHERE n > 0"):
            able = [
                p for p in pilots
                if (not r["site"] or p[0] == r["site"]) and (not p[1] or r["jobtype"] in p[1])
            ]
            if r["jobtype"] in suspended or not [p for p in able if not p[2]]:
                pair = (r["site"], r["jobtype"])
                refusing = next((p[2] for p in able if p[2]), "")
                starving[pair] = (self.starving_since.get(pair, (t, 0))[0], r["n"], refusing)
        self.starving_since = starving

    def flow(self, t):
        """Data flow stopped: no data file arrived (injected or registered, not a job a person
        submitted) for --alarm-no-new-work minutes, by stream (its directory: one stopped stream
        is named; a stream quiet for a day is over), or none ever; or a service (an injector)
        silent for SILENT_PERIODS of its periods."""
        found = []
        quiet = self.no_new_work * 60
        if self.no_new_work:
            streams = self.store.read("SELECT dirpath, ts FROM arrivals WHERE ts > ?",
                                      (t - 86400, ))
            for s in streams:
                if t - max(s["ts"], self.svc.resumed) > quiet:
                    found.append(
                        self.alarm(
                            "no_new_work", f"no new data file in {s['dirpath']} for "
                            f"{(t - s['ts']) / 60:.0f} minutes", "/datasets", stream=s["dirpath"]))
            if not streams and t - self.svc.resumed > quiet:
                found.append(self.alarm("no_new_work", "no data file has arrived for "
                                        f"{(t - self.svc.resumed) / 60:.0f} minutes", "/datasets"))
        for svc in self.store.read("SELECT * FROM services WHERE period > 0 AND retired IS NULL "
                                   "AND ts + ? * period < ?", (SILENT_PERIODS, t)):
            found.append(
                self.alarm(
                    "service_silent",
                    f"{svc['name']} on {svc['host']}: silent for {t - svc['ts']:.0f} s "
                    f"(it reports every {svc['period']:g} s)", "/services", service=svc["name"]))
        return found

    # -- memory, acknowledgements, delivery -------------------------------------------------------
    def record(self, t):
        """Housekeeping: remember since when each alarm is raised, write its history, and send
        it to a person: a critical one at once, a warning once it lasted alarm_delay, each once
        per raise (and its clear, if its raise was sent); never one explained by another, or
        acknowledged or silenced. Delivery runs in the notifier's thread, outside any lock."""
        conditions, stored = self.observe(t)
        self.notice(t, conditions, stored)
        shown = self.shown(t, conditions, stored)
        found = {a["key"]: a for a in shown if not a.get("pending")}
        pending = {a["name"] for a in shown if a.get("pending")}
        raised = [a for key, a in found.items() if key not in stored]
        cleared = [r for key, r in stored.items() if key not in found]
        changed = [
            a for key, a in found.items()
            if key in stored and stored[key]["severity"] != a["severity"]
        ]
        # a critical become a warning (no_pilots once nothing waits) is over for whoever was told
        eased = [
            stored[a["key"]] for a in changed
            if a["severity"] == "warning" and stored[a["key"]]["sent"]
        ]
        unsent = {r["key"] for r in eased} | {key for key, r in stored.items() if not r["sent"]}
        stale = {
            key for key, r in stored.items()    # told, nobody on it, still raised: again
            if self.repeat and r["sent"] > 1 and t - r["sent"] >= self.repeat
        }
        due = [a for a in found.values() if (a["key"] in unsent | stale or a["key"] not in stored)
               and not a.get("explained_by") and not a["ack"]
               and (a["severity"] == "critical" or t - a["since"] >= self.delay)]
        repeated = {a["key"] for a in due if a["key"] in stale}
        if not (raised or cleared or changed or due):
            return
        try:
            self.write_state(t, raised, changed, cleared, due, pending)
        except sqlite3.OperationalError:    # the database fails (db_failing, disk full): a person
            due = [a for a in due if a["key"] not in self.told]     # still hears of it, once
            self.told.update(a["key"] for a in due)
            cleared = eased = []
        else:
            self.told.clear()               # the database remembers what was sent
        for a in due:
            self.notifier.send(a, "repeated" if a["key"] in repeated else "raised")
        for r in cleared + eased:
            if r["sent"]:
                self.notifier.send(r, "cleared")

    def write_state(self, t, raised, changed, cleared, due, pending):
        """The alarms' memory and history, in one transaction (see record). An acknowledgement
        ends with its alarm's clear; one given to an alarm still `pending` is kept for it."""
        with self.store.transaction() as conn:
            for a in raised:
                conn.execute("INSERT OR REPLACE INTO alarm_state(key, name, severity, message, link, "
                             "since) VALUES(:key, :name, :severity, :message, :link, :since)", a)
                self.event(conn, t, a, "raised")
            for a in changed:
                conn.execute("UPDATE alarm_state SET severity=?, message=?, sent=0 WHERE key=?",
                             (a["severity"], a["message"], a["key"]))
                self.event(conn, t, a, "changed")
            for r in cleared:
                conn.execute("DELETE FROM alarm_state WHERE key=?", (r["key"],))
                self.event(conn, t, r, "cleared")
            conn.execute(
                "DELETE FROM alarm_acks WHERE kind='ack' AND until IS NULL AND name NOT IN "
                f"(SELECT name FROM alarm_state) AND name NOT IN ({', '.join('?' * len(pending))})",
                sorted(pending))
            for a in due:       # `sent`: when it was last told (0: never)
                conn.execute("UPDATE alarm_state SET sent=? WHERE key=?", (t, a["key"]))

    def acknowledge(self, body, who):
        """Acknowledge an alarm (until it clears, or for `for` seconds) or silence it (for `for`
        seconds, required), by name and optionally site or job type, saying who and why. An
        acknowledged or silenced alarm is shown greyed and not sent to anyone."""
        check_keys(body, "ack", ("name", "site", "jobtype", "kind", "who", "why", "for", "future"))
        ack = {"name": as_choice(body.get("name"), "name", self.NAMES),
               "kind": as_choice(body.get("kind", "ack"), "kind", ("ack", "silence")),
               "site": as_str(body.get("site", ""), "site", max_len=64),
               "jobtype": as_str(body.get("jobtype", ""), "jobtype", max_len=64),
               "who": who, "why": as_str(body.get("why", ""), "why", allow_empty=False, max_len=300),
               "ts": now()}
        if ack["kind"] == "silence" and "for" not in body:
            raise bad("for: a silence needs a duration in seconds (it ends by itself)")
        future = ack["kind"] == "silence" and body.get("future") is True
        if not future:
            self.check_raised(ack)
        ack["until"] = ack["ts"] + as_number(body["for"], "for", 1, 30 *
                                             86400) if "for" in body else None
        with self.store.transaction() as conn:
            ack["id"] = conn.execute(
                "INSERT INTO alarm_acks(kind, name, site, jobtype, who, why, until, ts) VALUES("
                ":kind, :name, :site, :jobtype, :who, :why, :until, :ts)", ack).lastrowid
            key = ":".join(x for x in (ack["name"], ack["site"], ack["jobtype"]) if x)
            self.event(conn, ack["ts"],
                       {"key": key, "name": ack["name"], "severity": "", "message": ""},
                       "acknowledged" if ack["kind"] == "ack" else "silenced", ack["who"],
                       ack["why"], ack["until"])
        return ack

    def check_raised(self, ack):
        """An acknowledgement (or a silence not meant for the future) must name an alarm raised
        now: a typo would otherwise be accepted and silence nothing."""
        raised = self.raised()["alarms"]
        if not any(a["name"] == ack["name"] and (not ack["site"] or a.get("site") == ack["site"])
                   and (not ack["jobtype"] or a.get("jobtype") == ack["jobtype"]) for a in raised):
            names = ", ".join(sorted({self.ack_name(a) for a in raised})) or "none"
            raise bad(f"name: no raised alarm is {self.ack_name(ack)!r} (raised now: {names}); "
                      "a silence for the future says future: true")

    def history(self, query):
        """Every alarm raised, changed, acknowledged, silenced and cleared in the last `age`
        (default 24 h), newest first: "what happened overnight?"."""
        check_keys(query, "query", ("age", "format", "refresh"))
        age = parse_age(query.get("age") or "24h")
        rows = self.store.read(
            "SELECT * FROM alarm_events INDEXED BY alarm_events_ts WHERE ts > ? "
            "ORDER BY ts DESC LIMIT 1000", (now() - age, ))
        return {"events": [dict(r) for r in rows]}

    def delivery_status(self, result):
        """The notifier's last outcome, as a line of the service `alarm delivery` (/services)."""
        with contextlib.suppress(Exception):
            self.svc.service_beat("alarm delivery",
                                  {"host": socket.gethostname(), "result": result[:1024]})

    def failures(self, t):
        """Job types whose attempts mostly fail (a retried job's first tries count: a type that
        fails every first try is broken though its jobs end well): from the per-minute end counts
        of the last hour; the alarm links to those attempts."""
        ended = {}
        self.store.move_tallies(reading=True)
        for r in self.store.read("SELECT jobtype, state, SUM(n) AS n FROM ends WHERE bucket >= ? "
                                 "GROUP BY jobtype, state", (int(t - 3600) // 60,)):
            ended.setdefault(r["jobtype"], {})[r["state"]] = r["n"]
        found = []
        for jobtype, states in sorted(ended.items()):
            total, bad_ones = sum(states.values()), sum(states.get(s, 0) for s in FAILED_STATES)
            if total >= FAILURE_MIN_ENDED and bad_ones > FAILURE_RATE * total and jobtype != CANARY:
                found.append(
                    self.alarm(
                        "failure_rate",
                        f"{jobtype}: {bad_ones} of {total} attempts ended failed, timeout "
                        f"or pilotTO in the last hour ({100 * bad_ones // total}%)",
                        "/failures?" + urlencode({"jobtype": jobtype, "since": "1h"}),
                        jobtype=jobtype, impact=bad_ones))
        return found

    def at_site(self, site, figures):
        """A site below its nominal number of pilots, or whose pilots die young: lost (a pilot
        that stopped, drained or finished its cycles ended on purpose), at least
        lifetime_min_ended of them in the hour, so that one kill -9 is not an alarm."""
        found = []
        if site["pilots"] and figures["live"] < site["pilots"] * (1 - self.tolerance(site)):
            waiting = self.store.read_one("SELECT COALESCE(SUM(n), 0) FROM waiting WHERE site=?",
                                          (site["name"],))[0]
            if site["met"] is None and figures["live"]:
                return found    # some pilots, never its nominal since defined: its standing state
            held_up = (f"; {waiting} job(s) wait for it" if waiting else
                       "") + (f"; {figures['lost_1h']} pilot(s) lost in the last hour"
                              if figures["lost_1h"] else "")
            found.append(
                self.alarm(
                    "site_below_nominal", f"{site['name']}: {figures['live']} live pilots of "
                    f"{site['pilots']} nominal{held_up}", f"/site/{site['name']}",
                    critical=not figures["live"] and waiting > 0, site=site["name"],
                    live=figures["live"], impact=waiting))
        canary = figures.get("canary_last")
        if canary and canary["state"] in ("failed", "timeout"):
            found.append(self.alarm(
                "canary_failed", f"{site['name']}: its canary {canary['state']} ({canary['reason'][:150]}): the "
                "site's pilots may fail real data too", f"/site/{site['name']}", site=site["name"]))
        if figures.get("unstarted_requests", 0) >= UNSTARTED_REQUESTS:
            found.append(self.alarm(
                "pilots_not_starting", f"{site['name']}: {figures['unstarted_requests']} pilot requests in a row "
                "registered no pilot at all: the batch jobs die before pilot.py starts? (their output: "
                "P3S_RUNDIR, pilot-slurm-*.log)", f"/site/{site['name']}", site=site["name"]))
        lives = figures["lost_lives_1h"]
        life = median(lives)
        if site["pilotlife"] and len(
                lives) >= self.lifetime_min_ended and life < site["pilotlife"] / 2:
            found.append(
                self.alarm(
                    "pilot_lifetime", f"{site['name']}: {len(lives)} pilots lost in the last hour "
                    f"lived {life:.0f} s (median) of {site['pilotlife']:g} s nominal",
                    "/pilots?" + urlencode({"site": site["name"], "state": "lost", "ended": "1h"}),
                    site=site["name"]))
        return found


# -- Service: backups (the database is the only copy of every job's history) ------------------------
BACKUP_NAME = re.compile(r"p3s-\d{8}-\d{6}\.db")


class Backups:
    """Online, consistent copies of the database every `every` seconds in `directory`, the
    newest `keep` kept, and the published images mirrored beside them (images/). A copy is
    sqlite's backup API from a reader of its own in one step: in WAL mode a reader holds no
    writer, and a copy in several steps would start over at every write of another connection
    (each claim, under full load: never done). It is written to a .part file, integrity-checked,
    then renamed, so a kill -9 mid-way leaves every earlier copy whole. The thread releases the
    GIL while sqlite copies: heartbeats are answered meanwhile."""

    def __init__(self, store, images_dir, directory, every, keep):
        self.store, self.images_dir, self.directory = store, images_dir, directory
        self.every, self.keep = every, keep
        self.error = None
        self.tried = None           # when the last copy was tried (a failed one is tried again an interval later)
        make_private_dirs(directory)
        for name in os.listdir(directory):
            if name.endswith(".part"):          # a copy a killed server left half written
                os.unlink(os.path.join(directory, name))
        kept = self.copies()
        self.last_ok = os.path.getmtime(kept[-1]) if kept else None

    def copies(self):
        """The whole copies, oldest first."""
        return [os.path.join(self.directory, n) for n in sorted(os.listdir(self.directory)) if BACKUP_NAME.fullmatch(n)]

    def loop(self, stopping):
        while not stopping.wait(max(1.0, (self.tried or self.last_ok or 0) + self.every - now())):
            self.take()

    def take(self):
        """One copy, checked, then the images mirrored and the oldest copies removed."""
        self.tried = now()
        path = os.path.join(self.directory, time.strftime("p3s-%Y%m%d-%H%M%S.db"))
        part = path + ".part"
        try:
            copy_database(self.store.path, part)
            os.replace(part, path)
            self.mirror_images()
            for old in self.copies()[:-self.keep]:
                os.unlink(old)
            self.last_ok, self.error = now(), None
            log.info("backup: %s", path)
        except (OSError, sqlite3.Error, StartupError) as e:
            self.error = f"{e}"[:300]
            log.error("backup to %s failed: %s", self.directory, self.error)
            with contextlib.suppress(OSError):
                os.unlink(part)

    def mirror_images(self):
        """The published images beside the copies: new ones copied, removed ones removed."""
        mirror = os.path.join(self.directory, "images")
        wanted = set()
        for top, _, names in os.walk(self.images_dir):
            for name in names:
                source = os.path.join(top, name)
                target = os.path.join(mirror, os.path.relpath(source, self.images_dir))
                wanted.add(target)
                if not os.path.exists(target) or os.path.getsize(target) != os.path.getsize(source):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copy2(source, target)
        for top, _, names in os.walk(mirror):
            for name in names:
                if os.path.join(top, name) not in wanted:
                    os.unlink(os.path.join(top, name))

    def status(self):
        age = None if self.last_ok is None else now() - self.last_ok
        return {"directory": self.directory, "every": self.every, "last_ok": self.last_ok, "age": age,
                "error": self.error, "copies": len(self.copies())}

    def problem(self):
        """What the backup_stale alarm says, if anything: a failure, or a copy older than twice
        the interval (none yet, once twice the interval has passed since the start)."""
        if self.error:
            return f"the last backup to {self.directory} failed: {self.error}"
        if self.last_ok is not None and now() - self.last_ok > 2 * self.every:
            return f"the last good backup is {ago(now() - self.last_ok)} old (every {ago(self.every)})"
        return None


def copy_database(source, target):
    """A consistent copy of the database at `source` into a new file `target`, checked whole."""
    src = sqlite3.connect(source, timeout=BUSY_MS / 1000)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
        problems = [r[0] for r in dst.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise StartupError(f"the copy {target} does not check: {'; '.join(problems)[:200]}")
        dst.execute("PRAGMA journal_mode=DELETE")
    finally:
        dst.close()
        src.close()
    with open(target, "rb+") as f:
        os.fsync(f.fileno())


def restore(backup, db_path):
    """server.py --restore FILE: check a copy (integrity, a schema this server knows), set the
    database it replaces aside (never deleted), and put the copy and its images in place."""
    if not os.path.isfile(backup):
        raise StartupError(f"--restore {backup}: no such file (the copies are p3s-YYYYMMDD-HHMMSS.db in --backup-dir)")
    with contextlib.closing(sqlite3.connect(f"file:{quote(os.path.abspath(backup))}?mode=ro", uri=True)) as conn:
        try:
            problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise StartupError(f"--restore {backup}: not a p3s database ({e})")
    if problems != ["ok"]:
        raise StartupError(f"--restore {backup}: the copy is damaged ({'; '.join(problems)[:200]}); restore an older one")
    if not 0 < version <= len(MIGRATIONS):
        raise StartupError(f"--restore {backup}: schema v{version} is not one this server knows (v1-v{len(MIGRATIONS)})")
    aside = f".before-restore-{time.strftime('%Y%m%d-%H%M%S')}"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.replace(db_path + suffix, db_path + aside + suffix)
    copy_database(backup, db_path + ".part")
    os.replace(db_path + ".part", db_path)
    images = os.path.join(os.path.dirname(os.path.abspath(backup)), "images")
    if os.path.isdir(images) and not os.path.exists(db_path + ".files"):
        shutil.copytree(images, db_path + ".files")
    log.warning("restored %s from %s (schema v%d); what it replaced is kept as %s*", db_path, backup, version,
                db_path + aside)


# -- Service: users, roles and the pages' sessions --------------------------------------------------
SHIFTER, EXPERT, ADMIN = ROLES = ("shifter", "expert", "admin")   # each may do all the one before may
SHARED_USER = "shared"      # who the write token (--token-file) acts as: an admin
USER_NAME = re.compile(r"[a-z][a-z0-9._-]{0,31}")
SESSION_HOURS = 12.0


class Caller(collections.namedtuple("Caller", "name role")):
    """Who a request acts as: a named user, the shared write token's user, or a pilot token."""

    def may(self, role):
        return self.role in ROLES and ROLES.index(self.role) >= ROLES.index(role)


def sha256_hex(text):
    return hashlib.sha256(text.encode()).hexdigest()


class Users:
    """Named users with a role, known by their token's sha256 (server.py --add-user), and the
    pages' sign-in sessions (a cookie whose sha256 is stored, and the CSRF token of its forms).
    The shared write token is the user SHARED_USER, an admin, and is never stored."""

    def __init__(self, store, session_hours=SESSION_HOURS):
        self.store, self.session_hours = store, session_hours

    @staticmethod
    def check(name, role):
        if not USER_NAME.fullmatch(name) or name == SHARED_USER:
            raise bad(f"user: {name!r} must be 1-32 lower-case letters, digits, '.', '_' or '-', "
                      f"starting with a letter, and not {SHARED_USER!r}")
        as_choice(role, "role", ROLES)

    def add(self, name, role, token):
        """A new user with its token (stored as its sha256 only); refused if the name is taken,
        reserved or malformed."""
        self.check(name, role)
        with self.store.transaction() as conn:
            if conn.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
                raise ApiError(409, f"user: {name!r} exists; --remove-user it first to give a new token")
            conn.execute("INSERT INTO users(name, role, token_sha256, created) VALUES(?, ?, ?, ?)",
                         (name, role, sha256_hex(token), now()))

    def remove(self, name):
        """Forget a user: its token and its sessions stop working at once."""
        with self.store.transaction() as conn:
            if not conn.execute("DELETE FROM users WHERE name=?", (name,)).rowcount:
                raise ApiError(404, f"user: {name!r} does not exist")
            conn.execute("DELETE FROM sessions WHERE user=?", (name,))

    def list(self):
        return [dict(r) for r in self.store.read("SELECT name, role, created FROM users ORDER BY name")]

    def by_token(self, token):
        row = self.store.read_one("SELECT name, role FROM users WHERE token_sha256=?", (sha256_hex(token),))
        return Caller(row["name"], row["role"]) if row else None

    def sign_in(self, caller):
        """A new session for a caller proved by its token: (cookie value, CSRF token)."""
        session, csrf, t = secrets.token_urlsafe(32), secrets.token_urlsafe(24), now()
        with self.store.transaction() as conn:
            conn.execute("DELETE FROM sessions WHERE expires < ?", (t,))
            conn.execute("INSERT INTO sessions(id_sha256, user, csrf, expires) VALUES(?, ?, ?, ?)",
                         (sha256_hex(session), caller.name, csrf, t + self.session_hours * 3600))
        return session, csrf

    def session(self, cookie):
        """The (Caller, CSRF token) of a live session, or None: expired, signed out, or its user
        removed (the role is read now, so a changed role applies at once)."""
        row = self.store.read_one("SELECT s.user, s.csrf, u.role FROM sessions s LEFT JOIN users u ON u.name = "
                                  "s.user WHERE s.id_sha256=? AND s.expires > ?", (sha256_hex(cookie), now()))
        if row is None or (row["role"] is None and row["user"] != SHARED_USER):
            return None
        return Caller(row["user"], row["role"] or ADMIN), row["csrf"]

    def sign_out(self, cookie):
        with self.store.transaction() as conn:
            conn.execute("DELETE FROM sessions WHERE id_sha256=?", (sha256_hex(cookie),))


# -- Service: leases, jobs, pilot protocol, sites, services, housekeeping ---------------------------
class Leases:
    """The lease clock, kept in memory: a heartbeat renews it without the database's write lock,
    so an outside sqlite3 shell, a long transaction or a slow disk never looks like silence.
    Housekeeping writes the beats heard to pilots.ts_beat and judges expired leases under the
    lock heartbeats take: a beat is either heard before its pilot's lease is judged, or answered
    `kill` (its job is being given away). A restarted server gives every lease a full term.

    Methods for the caller: beat() from a heartbeat; unwritten(), written(), last_heard(),
    judge() and released() from housekeeping."""

    def __init__(self):
        self.lock = threading.Lock()    # held for dict operations only, never across I/O
        self.heard = {}                 # pilot uuid -> its last heartbeat not yet in the database
        self.status = {}                # pilot uuid -> {"free_mb", "note"} its last heartbeat said
        self.expiring = set()           # pilots whose job is being given away

    def beat(self, uuid, t, status=None):
        """Record a heartbeat (and what it says of the pilot: free disk, a note); False if the
        pilot's job is being given away (answer `kill`)."""
        with self.lock:
            if uuid in self.expiring:
                return False
            self.heard[uuid] = t
            if status:
                self.status[uuid] = status
            return True

    def unwritten(self):
        """{uuid: (time, status)} of the beats not yet in the database."""
        with self.lock:
            return {uuid: (t, self.status.get(uuid)) for uuid, t in self.heard.items()}

    def written(self, beats):
        """These beats are in the database now; a newer one of the same pilot stays."""
        with self.lock:
            for uuid, (t, _) in beats.items():
                if self.heard.get(uuid) == t:
                    del self.heard[uuid]
                    self.status.pop(uuid, None)

    def last_heard(self, uuid):
        with self.lock:
            return self.heard.get(uuid, 0.0)

    def judge(self, pilots, silent_since):
        """The pilots (uuid, heartbeat) whose silence, counting beats heard in memory too, began
        before silent_since(heartbeat); they are marked expiring, so their beats get `kill` from
        now until released()."""
        with self.lock:
            expired = [uuid for uuid, beat in pilots if self.heard.get(uuid, 0.0) < silent_since(beat)]
            self.expiring.update(expired)
            return expired

    def released(self, uuids):
        with self.lock:
            self.expiring.difference_update(uuids)


class Service:
    """The operations behind the API routes that are not brokerage or workflows: jobs and their
    caps, the pilot protocol (register, report, heartbeat, stop, directives), sites and their
    factories' requests, services (clients that report, like injectors) and housekeeping.

    Methods for the caller: one per route (see ROUTES), each validating its request before
    one transaction; housekeeping_loop() for the housekeeping thread; stop() at shutdown.
    Attributes: store, broker (Broker), workflows (Workflows), images (Images) and alarms
    (Alarms), which the routes reach as "broker.request_job", "alarms.acknowledge", ...
    """

    def __init__(self, store, hk_period=2.0, retention_days=0, lease_beats=LEASE_BEATS, wal_limit=WAL_LIMIT,
                 no_new_work=0, starving_minutes=STARVING_MINUTES, images=None, alarm_settings=None,
                 breaker_min_failed=BREAKER_MIN_FAILED, timelimit_grace=TIMELIMIT_GRACE,
                 session_hours=SESSION_HOURS):
        self.store = store
        self.users = Users(store, session_hours)
        self.backups = None         # Backups, with --backup-dir
        self.breaker_min_failed, self.timelimit_grace = breaker_min_failed, timelimit_grace
        self.hk_failing = None      # the error of the last housekeeping pass, if it failed
        self.broker = Broker(store)
        self.costs = JobCosts()
        self.leases = Leases()
        self.images = images or Images(store, store.path + ".files")
        self.workflows = Workflows(store, self.broker)
        self.alarms = Alarms(self, no_new_work, starving_minutes, alarm_settings)
        self.hk_period = hk_period
        self.retention_days = retention_days
        self.lease_beats = lease_beats
        self.wal_limit = wal_limit
        self.wal_stuck = False
        self.resumed = now()        # silence is counted from here: the start, or the last pause
        self.last_pass = (time.monotonic(), self.resumed)
        self.last_tidy = self.resumed
        self.sampled_minute = None  # the minute of the last activity sample
        self.purged, self.purge_said = 0, 0.0   # retention's count since it last said so

    def stop(self):
        """Shutdown: end the housekeeping loop and every long poll."""
        self.broker.stop()

    def write_beats(self):
        """At a clean shutdown: the beats heard since the last pass go to the database."""
        beats = self.leases.unwritten()
        self.store.write(self._write_beats, beats)
        self.leases.written(beats)

    # -- jobs -------------------------------------------------------------------------------------
    def submit(self, body, who):
        """Store jobs in one transaction; with a `submission` id, record it, so that a client
        whose answer was lost can ask whether the submission was stored."""
        check_keys(body, "submission", ("jobs", "submission", "digest", "new_jobtypes"))
        rows = validate_submission(body)
        self.check_typos([r["jobtype"] for r in rows], body)
        submission = as_uuid(body["submission"], "submission") if "submission" in body else None
        digest = submission_digest(body)
        with self.store.transaction() as conn:
            uuids = insert_jobs(conn, rows, who)
            if submission:
                record_submission(conn, submission, len(rows), digest)
        self.broker.notify_work(claimable(rows))
        return {"uuids": uuids}

    def stage_part(self, submission, body):
        """One part of a submission too big for one request: validated now, stored aside, never
        claimable until the commit. Sending a part again replaces it (a retry after a lost answer)."""
        check_keys(body, "part", ("part", "jobs", "new_jobtypes"))
        part = as_int(body.get("part"), "part", 0, MAX_PARTS - 1)
        rows = validate_submission(body)
        self.check_typos([r["jobtype"] for r in rows], body)
        with self.store.transaction() as conn:
            if submission_row(conn, submission):
                raise ApiError(409, f"submission {submission}: already committed")
            conn.execute("INSERT OR REPLACE INTO staged(submission, part, jobs, n, ts) VALUES(?, ?, ?, ?, ?)",
                         (submission, part, json.dumps(rows), len(rows), now()))
        return {"submission": submission, "part": part, "staged": len(rows)}

    def commit_submission(self, submission, body, who):
        """Store every staged part of a submission in one transaction, or nothing. Committing again
        answers as the first commit did."""
        check_keys(body, "commit", ("parts", "digest"))
        parts = as_int(body.get("parts"), "parts", 1, MAX_PARTS)
        digest = submission_digest(body)
        with self.store.transaction() as conn:
            done = submission_row(conn, submission)
            if done:
                return {"submission": submission, "state": "committed", "jobs": done["jobs"]}
            staged = conn.execute("SELECT part, jobs FROM staged WHERE submission=? ORDER BY part",
                                  (submission,)).fetchall()
            missing = sorted(set(range(parts)) - {r["part"] for r in staged})
            if missing:
                raise ApiError(409, f"submission {submission}: part(s) {', '.join(map(str, missing))} of "
                                    f"{parts} not staged (expired after {STAGED_TTL} s, or never sent); "
                                    "nothing was stored: submit again")
            if len(staged) != parts:
                raise bad(f"parts: {len(staged)} parts are staged for submission {submission}, not {parts}")
            rows = [row for r in staged for row in json.loads(r["jobs"])]
            if len({r["uuid"] for r in rows}) != len(rows):
                raise bad("jobs: the same uuid appears twice in one submission")
            insert_jobs(conn, rows, who)
            conn.execute("DELETE FROM staged WHERE submission=?", (submission,))
            record_submission(conn, submission, len(rows), digest)
        self.broker.notify_work(claimable(rows))
        return {"submission": submission, "state": "committed", "jobs": len(rows)}

    def find_submissions(self, query):
        """The submissions of the last `age` (default 1 h) with this digest, newest first: was
        this file submitted already (its answer lost, and the user about to run it again)?"""
        check_keys(query, "query", ("digest", "age"))
        digest = as_str(query.get("digest", ""), "digest", allow_empty=False, max_len=128)
        since = now() - parse_age(query.get("age") or "1h")
        rows = self.store.read("SELECT id, jobs, ts FROM submissions INDEXED BY submissions_digest WHERE "
                               "digest=? AND ts > ? ORDER BY ts DESC LIMIT 10", (digest, since))
        return {"submissions": [dict(r) for r in rows]}

    def get_submission(self, submission):
        """Was this submission stored? committed (with its job count), staged (parts waiting for a
        commit, which expire), or none (nothing stored)."""
        with self.store.reading() as conn:
            done = submission_row(conn, submission)
            if done:
                return {"submission": submission, "state": "committed", "jobs": done["jobs"]}
            staged = conn.execute("SELECT COUNT(*), COALESCE(SUM(n), 0) FROM staged WHERE submission=?",
                                  (submission,)).fetchone()
        state = "staged" if staged[0] else "none"
        return {"submission": submission, "state": state, "jobs": 0, "staged_parts": staged[0],
                "staged_jobs": staged[1]}

    def get_job(self, uuid):
        """The job as anyone may read it: env values with secret-looking names are masked."""
        with self.store.reading() as conn:
            job = job_to_dict(lookup(conn, "jobs", uuid))
            job["env"] = {k: "(hidden)" if SECRET_NAME.search(k) else v for k, v in job["env"].items()}
            job["events"] = [dict(e) for e in conn.execute(
                f"SELECT ts, old, new, who, attempt, info FROM events INDEXED BY events_job WHERE job={JOB_ID} "
                "ORDER BY id", (uuid,))]
            job["checks"] = [dict(c) for c in conn.execute(
                "SELECT name, result, message FROM checks WHERE uuid=? ORDER BY name", (uuid,))]
            job["metrics"] = {m["name"]: m["value"] for m in conn.execute(
                "SELECT name, value FROM metrics WHERE uuid=? ORDER BY name", (uuid,))}
            found = conn.execute(PROVENANCE_OF, (uuid,)).fetchone()
            job["provenance"] = json.loads(found[0]) if found else None
        return job

    def known_jobtypes(self):
        return {r[0] for r in self.store.read("SELECT jobtype FROM job_counts UNION SELECT name FROM jobtypes")}

    def check_typos(self, names, body):
        """A job type that is new but a letter or two from a known one is most likely a typo
        ("monitr"): a 400 that says which was meant, unless the request says `new_jobtypes`
        (job.py --new-type). Names apart only by their digits (type1, type2) are meant apart."""
        if body.get("new_jobtypes") is True:
            return
        known = self.known_jobtypes()
        for name in dict.fromkeys(names):
            meant = name not in known and closest_jobtype(name, known)
            if meant:
                raise bad(f"jobtype: unknown job type {name!r}; did you mean {meant!r}? (a new type on "
                          "purpose: job.py --new-type, or \"new_jobtypes\": true)")

    def list_jobs(self, query):
        known = self.known_jobtypes() if query.get("jobtype") else ()
        if query.get("jobtype") and query["jobtype"] not in known:
            meant = closest_jobtype(query["jobtype"], known)
            raise bad(f"jobtype: no job of type {query['jobtype']!r}" + (f"; did you mean {meant!r}?" if meant else ""))
        where, args = job_conditions(query, *parse_states(query.get("state", "")))
        limit = min(as_int(query.get("limit", 100), "limit", 1), 10000)
        offset = as_int(query.get("offset", 0), "offset", 0)
        rows = self.store.read(f"SELECT * FROM jobs{where} ORDER BY id DESC LIMIT ? OFFSET ?", args + [limit, offset])
        return {"jobs": [job_to_dict(r, full=False) for r in rows]}

    def job_states(self, body):
        uuids = body.get("uuids") if isinstance(body, dict) else None
        if not isinstance(uuids, list) or len(uuids) > 10000:
            raise bad("uuids: must be a list of at most 10000 job uuids")
        uuids = [as_uuid(u, f"uuids[{i}]") for i, u in enumerate(uuids)]
        found = {}
        for chunk in chunks(uuids):
            for r in self.store.read("SELECT uuid, state, exit_code, reason FROM jobs WHERE uuid IN (%s)"
                                     % ",".join("?" * len(chunk)), chunk):
                found[r["uuid"]] = {"state": r["state"], "exit_code": r["exit_code"], "reason": r["reason"]}
        return {"jobs": found}

    ADJUSTABLE = {  # target state -> states a user may move a job from
        "defined": ("template", "failed", "timeout", "pilotTO", "cancelled"),
        "template": ("defined",),
        "cancelled": ("template", "defined", "dispatched", "running"),
    }

    def adjust(self, uuid, body, who):
        """A person's change of a job's state or priority, with why (kept in its history)."""
        check_keys(body, "adjust", ("state", "priority", "why"))
        if "state" not in body and "priority" not in body:
            raise bad("adjust: give state and/or priority")
        why = as_str(body.get("why", ""), "why", max_len=300)
        state = body.get("state")
        if state is not None:
            as_choice(state, "state", tuple(self.ADJUSTABLE))
        priority = as_int(body["priority"], "priority") if "priority" in body else None
        with self.store.transaction() as conn:
            job = lookup(conn, "jobs", uuid)
            if priority is not None:
                if job["state"] in END_JOB_STATES and state is None:
                    raise ApiError(409, f"job {uuid}: is {job['state']}; priority of an ended job cannot change")
                conn.execute("UPDATE jobs SET priority=? WHERE uuid=?", (priority, uuid))
                if state is None:
                    event(conn, "job", uuid, job["state"], job["state"], who, job["attempt"],
                          f"priority {job['priority']} -> {priority}" + (f": {why}" if why else ""))
            if state is not None and state != job["state"]:
                self.move_by_hand(conn, job, state, who, why)
            result = job_to_dict(lookup(conn, "jobs", uuid), False)
        if result["state"] == "defined":
            self.broker.notify_work(1)
        return result

    def move_by_hand(self, conn, job, state, who, why=""):
        """A user's state change: cancel, hold (template), or release or resubmit (defined), with
        why in its history."""
        uuid = job["uuid"]
        if job["state"] not in self.ADJUSTABLE[state]:
            raise ApiError(409, f"job {uuid}: cannot go from {job['state']} to {state}")
        if job["wfuuid"] and state != "cancelled":
            raise ApiError(409, f"job {uuid}: belongs to workflow {job['wfuuid']}, which releases it "
                                "when its parents finish; only cancelled can be set by hand")
        if state == "cancelled":
            cancel_job(conn, job, who, "cancelled by user" + (f": {why}" if why else ""))
        else:
            fields = {}
            if state == "defined" and job["state"] in END_JOB_STATES:   # a resubmission
                fields = dict(attempt=job["attempt"] + 1, pilot=None, exit_code=None,
                              ts_dis=None, ts_sta=None, ts_sto=None, ts_def=now())
            move_job(conn, uuid, job["state"], state, who, attempt=job["attempt"],
                     info=("retried" if fields else "adjusted") + (f": {why}" if why else ""), changes=fields)
        if job["wfuuid"]:
            advance_workflow(conn, job["wfuuid"])

    RETRY_MAX = 1000        # jobs one retry_failed may retry

    def retry_failed(self, body, who):
        """Retry, each as a new attempt, the failed jobs of a run range (among the newest
        RUN_SCAN input files), of one job type or all: the newest job of each type on each file
        if it failed, timed out or lost its pilot. With `dry_run`, only say which: the
        confirmation a page shows first. All or nothing, in one transaction."""
        check_keys(body, "retry", ("jobtype", "runs", "dry_run", "why"))
        jobtype = as_str(body.get("jobtype", ""), "jobtype", max_len=64)
        why = as_str(body.get("why", ""), "why", max_len=300)
        low, high = parse_run_range(as_str(body.get("runs", ""), "runs", max_len=40))
        if body.get("dry_run", False) not in (True, False):
            raise bad("dry_run: true or false")
        files = self.files_of_runs(low, high)
        with self.store.transaction() as conn:
            jobs = self.failed_in(conn, jobtype, files)
            if len(jobs) > self.RETRY_MAX:
                raise ApiError(409, f"retry: {len(jobs)} failed jobs chosen, more than {self.RETRY_MAX} at once; "
                                    "choose fewer runs")
            if not body.get("dry_run"):
                for job in jobs:
                    self.move_by_hand(conn, job, "defined", who, why)
        if jobs and not body.get("dry_run"):
            self.broker.notify_work(len(jobs))
        return {"dry_run": bool(body.get("dry_run")), "jobtype": jobtype, "runs": body.get("runs") or "", "why": why,
                "jobs": [{k: j[k] for k in ("uuid", "jobtype", "infile", "state", "attempt")} for j in jobs]}

    REPROCESS_ONLY = ("failed", "missing", "all")
    TAG = re.compile(r"[A-Za-z0-9._-]{1,32}")

    def reprocess(self, body, who):
        """New jobs, each carrying `tag` (their job type is TYPE@TAG: counted, listed, alarmed
        and shown as a column of its own, beside the prompt one), for the (file, job type) pairs
        of a run range: made from the prompt job that ran the pair (its payload, env, limits),
        the env changed by `set_env`. `only`: the pairs whose prompt job failed, those never
        submitted (made from the type's newest prompt job), or all; a pair with a job of the tag
        already is skipped, so a repeated campaign adds nothing. With `dry_run`, what it would
        create, changing nothing; else one submission, all or nothing."""
        check_keys(body, "reprocess", ("runs", "jobtype", "tag", "set_env", "only", "dry_run"))
        low, high = parse_run_range(as_str(body.get("runs", ""), "runs", max_len=40))
        tag = as_str(body.get("tag", ""), "tag", max_len=32)
        jobtype = as_str(body.get("jobtype", ""), "jobtype", max_len=64)
        only = as_choice(body.get("only", "all"), "only", self.REPROCESS_ONLY)
        if (tag or only != "missing") and not self.TAG.fullmatch(tag):
            raise bad(f"tag: {tag!r} must be 1-32 letters, digits, '.', '_' or '-' (no tag: only with "
                      "only=missing, which fills prompt processing's gaps)")
        set_env = as_env(body.get("set_env", {}), "set_env")
        if body.get("dry_run", False) not in (True, False):
            raise bad("dry_run: true or false")
        files = self.files_of_runs(low, high)
        with self.store.transaction() as conn:
            made = [copied_job(template, infile, tag, set_env)
                    for infile, template in self.reprocess_pairs(conn, files, jobtype, tag, only)]
            if made and not body.get("dry_run"):
                insert_jobs(conn, [validate_job({k: v for k, v in j.items() if k != "from"}, "reprocess")
                                   for j in made], who)
        if made and not body.get("dry_run"):
            self.broker.notify_work(len(made))
        return {"dry_run": bool(body.get("dry_run")), "tag": tag, "runs": f"{low}-{high}", "only": only,
                "jobs": [{"uuid": j["uuid"], "jobtype": j["jobtype"], "infile": j["infile"], "from": j["from"]}
                         for j in made]}

    def files_of_runs(self, low, high):
        files = [r["infile"] for r in self.store.read("SELECT infile FROM inputs INDEXED BY inputs_ts ORDER BY ts "
                                                      "DESC LIMIT ?", (RUN_SCAN,))
                 if low <= (run_of(r["infile"])[0] or -1) <= high]
        if len(files) > self.RETRY_MAX:
            raise ApiError(409, f"runs: {len(files)} input files in {low}-{high}, more than {self.RETRY_MAX} at "
                                "once; choose fewer runs")
        return files

    @staticmethod
    def reprocess_pairs(conn, files, jobtype, tag, only):
        """(input file, the prompt job to copy) of each pair a reprocess chooses."""
        newest_of_type = {}
        by_file = {}
        for infile in files:
            jobs = by_file[infile] = newest_jobs(conn.execute, infile)
            for name, j in jobs.items():
                if "@" not in name and not j["wfuuid"]:
                    newest_of_type[name] = j
        if jobtype and jobtype not in newest_of_type:      # its newest prompt job, on any file
            newest = conn.execute("SELECT * FROM jobs INDEXED BY jobs_jobtype_id WHERE jobtype = ? AND wfuuid IS NULL "
                                  "ORDER BY id DESC LIMIT 1", (jobtype,)).fetchone()
            if newest:
                newest_of_type[jobtype] = newest
        types = [jobtype] if jobtype else sorted(newest_of_type)
        for infile in reversed(files):                  # oldest run first, as the data came
            jobs = by_file[infile]
            for name in types:
                if (f"{name}@{tag}" if tag else name) in jobs or name not in newest_of_type:
                    continue
                prompt = jobs.get(name)
                if only == "all" and prompt is not None or only == "failed" and prompt is not None and \
                        prompt["state"] in FAILED_STATES:
                    yield infile, prompt
                elif only in ("missing", "all") and prompt is None:
                    yield infile, newest_of_type[name]

    @staticmethod
    def failed_in(conn, jobtype, files):
        """The jobs retry_failed chooses on these files (workflow jobs are left to their workflow)."""
        chosen = []
        for infile in files:
            chosen += [j for t, j in newest_jobs(conn.execute, infile).items() if (not jobtype or t == jobtype) and not j["wfuuid"]
                       and j["state"] in FAILED_STATES]
        return chosen

    def delete_job(self, uuid, who):
        with self.store.transaction() as conn:
            job = lookup(conn, "jobs", uuid)
            if job["state"] in ACTIVE_JOB_STATES:
                raise ApiError(409, f"job {uuid}: is {job['state']}; cancel it before deleting it")
            conn.execute("DELETE FROM jobs WHERE uuid=? AND state=?", (uuid, job["state"]))
            event(conn, "job", uuid, job["state"], "deleted", who)
        self.images.forget([uuid])
        return {"deleted": uuid}

    def list_jobtypes(self, query):
        """Each job type with its cap and its jobs by state, from the counts tables."""
        check_keys(query, "query", ("jobtype",))
        types = {}
        for r in self.store.read("SELECT state, jobtype, n FROM job_counts WHERE n > 0"):
            types.setdefault(r["jobtype"], {})[r["state"]] = r["n"]
        caps = {r["name"]: r["cap"] for r in self.store.read("SELECT name, cap FROM jobtypes")}
        paused = {r["jobtype"]: f"paused by {r['who']}: {r['why']}" for r in
                  self.store.read("SELECT * FROM pauses WHERE paused IS NOT NULL")}
        names = sorted(set(types) | set(caps) | set(paused))
        if query.get("jobtype"):
            names = [n for n in names if n == query["jobtype"]]
        return {"jobtypes": [{"name": n, "cap": caps.get(n), "paused": paused.get(n, ""),
                              **jobtype_counts(types.get(n, {}))} for n in names]}

    def pause_jobtype(self, name, body, who):
        """Pause a job type (its queued jobs stay queued; no pilot is given one) or resume it,
        saying why; who and why go to its history (the events of `jobtype:NAME`)."""
        check_keys(body, "pause", ("paused", "why", "who"))
        paused = body.get("paused")
        if paused not in (True, False):
            raise bad("paused: true (pause) or false (resume)")
        why = as_str(body.get("why", ""), "why", allow_empty=False, max_len=300)
        with self.store.transaction() as conn:
            self.set_paused(conn, as_str(name, "jobtype", allow_empty=False, max_len=64), paused, who, why, now())
        if not paused:
            self.broker.notify_work()
        return {"jobtype": name, "paused": paused, "who": who, "why": why}

    @staticmethod
    def set_paused(conn, name, paused, who, why, t):
        row = conn.execute("SELECT paused FROM pauses WHERE jobtype=?", (name,)).fetchone()
        if (row is not None and row["paused"] is not None) == paused:
            raise ApiError(409, f"jobtype {name!r}: is {'paused' if paused else 'not paused'} already")
        conn.execute("INSERT OR REPLACE INTO pauses(jobtype, paused, who, why, resumed) VALUES(?, ?, ?, ?, ?)",
                     (name, t if paused else None, who, why, None if paused else t))
        event(conn, "jobtype", "jobtype:" + name, "running" if paused else "paused",
              "paused" if paused else "running", who, info=why, at=t)

    def send_canaries(self, conn, t):
        """A site's canary (a small job its pilots run every canary_period: an early word that the
        site cannot process data, before real data is lost): submitted once the last one ended
        that long ago, never two waiting at once. Returns how many became claimable."""
        sent = []
        for site in conn.execute("SELECT name, canary, canary_period FROM sites WHERE canary != ''").fetchall():
            last = newest_canary(conn, site["name"])
            period = site["canary_period"] or CANARY_PERIOD
            if last is None or last["state"] in END_JOB_STATES and (last["ts_sto"] or 0) < t - period:
                sent.append(validate_job({"name": f"canary of {site['name']}", "jobtype": CANARY, "site": site["name"],
                                          "payload": site["canary"], "env": {"P3S_EXECMODE": "SHELL"},
                                          "priority": CANARY_PRIORITY, "timelimit": int(min(period, 600))}, "canary"))
        if sent:
            insert_jobs(conn, sent, "canary")
        return len(sent)

    def trip_breakers(self, conn, t):
        """The circuit breaker (DUNE's justIN): a job type whose attempts mostly fail stops
        being handed out, so it does not burn through the queue and the nodes. Failed or timed
        out attempts (not pilotTO: a pilot's loss is not the job's fault) of the last hour, since
        the type was last resumed, more than breaker_min_failed and more than BREAKER_ODDS times
        those finished."""
        if not self.breaker_min_failed:
            return
        pauses = {r["jobtype"]: r for r in conn.execute("SELECT * FROM pauses")}
        counts = {}
        for r in conn.execute("SELECT jobtype, state, bucket, n FROM ends WHERE bucket >= ? AND state IN "
                              "('finished', 'failed', 'timeout')", (int(t - 3600) // 60,)):
            pause = pauses.get(r["jobtype"])
            if pause is None or (pause["paused"] is None and r["bucket"] * 60 >= (pause["resumed"] or 0)):
                counts.setdefault(r["jobtype"], collections.Counter())[r["state"] == "finished"] += r["n"]
        for jobtype, c in sorted(counts.items()):
            if c[False] > self.breaker_min_failed and c[False] > BREAKER_ODDS * c[True]:
                reason = conn.execute("SELECT reason, COUNT(*) FROM attempt_failures INDEXED BY attempt_failures_error "
                                      "WHERE jobtype=? AND ts > ? GROUP BY reason ORDER BY 2 DESC LIMIT 1",
                                      (jobtype, t - 3600)).fetchone()
                top = f"; top reason: {reason[0]}" if reason else ""
                self.set_paused(conn, jobtype, True, "circuit breaker", f"{c[False]} of {sum(c.values())} attempts "
                                f"failed or timed out in the last hour{top}"[:300], t)

    def set_cap(self, name, body):
        """The most jobs of a type dispatched or running at once; 0 suspends it, null lifts it.
        Enforced when pilots claim, so submissions are never refused for a cap."""
        check_keys(body, "jobtype", ("cap", "new_jobtypes"))
        self.check_typos([name], body)
        cap = None if body.get("cap") is None else as_int(body["cap"], "cap", 0)
        with self.store.transaction() as conn:
            if cap is None:
                conn.execute("DELETE FROM jobtypes WHERE name=?", (name,))
            else:
                conn.execute("INSERT OR REPLACE INTO jobtypes(name, cap) VALUES(?, ?)", (name, cap))
        self.broker.notify_work()       # a raised or lifted cap may free waiting jobs
        return {"name": name, "cap": cap}

    # -- pilot protocol ---------------------------------------------------------------------------
    def register(self, body):
        check_keys(body, "register", ("uuid", "secret", "host", "pid", "site", "jobtypes", "extra", "heartbeat",
                                      "log", "request"))
        jobtypes = body.get("jobtypes", [])
        if not isinstance(jobtypes, list) or not all(isinstance(t, str) and t for t in jobtypes):
            raise bad("jobtypes: must be a list of non-empty strings")
        pilot = {
            "uuid": as_uuid(body["uuid"], "uuid") if "uuid" in body else str(uuidlib.uuid4()),
            "host": as_str(body.get("host", ""), "host", max_len=256),
            "pid": as_int(body.get("pid", 0), "pid", 0, MAX_PID),
            "site": as_str(body.get("site", ""), "site", max_len=64),
            "jobtypes": json.dumps(sorted(set(jobtypes))),
            "extra": as_str(body.get("extra", ""), "extra", max_len=256),
            "log": as_str(body.get("log", ""), "log", max_len=4096),
            "request": as_uuid(body["request"], "request") if body.get("request") else None,
        }
        secret = as_str(body.get("secret", ""), "secret", max_len=256) or secrets.token_urlsafe(24)
        if len(secret) < 16:
            raise bad("secret: at least 16 characters (the pilot's own credential)")
        pilot["secret"] = secret_hash(secret)
        site = self.site_defaults(pilot["site"]) or {}
        if pilot["site"] and not site:
            raise bad(f"site: {pilot['site']!r} is not defined; define it first with "
                      f"pilot.py --define-site -s {pilot['site']} (or start the pilot without -s)")
        default_beat = site.get("heartbeat") or DEFAULT_HEARTBEAT
        pilot["heartbeat"] = as_number(body.get("heartbeat", default_beat), "heartbeat", 0.1, MAX_HEARTBEAT)
        with self.store.transaction() as conn:
            if conn.execute("INSERT INTO pilots(uuid,secret,host,pid,site,jobtypes,extra,log,heartbeat,request,"
                            "state,ts_reg,ts_beat) VALUES(:uuid,:secret,:host,:pid,:site,:jobtypes,:extra,:log,"
                            ":heartbeat,:request,'active',:t,:t) ON CONFLICT(uuid) DO NOTHING",
                            {**pilot, "t": now()}).rowcount:
                event(conn, "pilot", pilot["uuid"], None, "active", pilot["host"], info=f"pid {pilot['pid']}")
                if pilot["request"]:    # one slot of its factory's request: no longer pending
                    conn.execute("UPDATE requests SET registered = registered + 1 WHERE id=? AND registered < count",
                                 (pilot["request"],))
            else:   # a registration repeated because its answer was lost: the same pilot, once
                own_pilot(conn, pilot["uuid"], secret)
        return {"uuid": pilot["uuid"], "secret": secret, "heartbeat": pilot["heartbeat"], "site": site or None,
                "lease": pilot["heartbeat"] * self.lease_beats, "images": self.images.limits(),
                "features": list(FEATURES)}

    REPORT_KEYS = ("pilot", "attempt", "state", "exit_code", "errmsg", "stdout", "stderr",
                   "pid", "stdout_path", "stderr_path", "runtime", "next", "usage", "ended_ago",
                   "checks", "metrics", "quality_error", "provenance", "ahead", "holding")

    def report(self, uuid, body, secret):
        check_keys(body, "report", self.REPORT_KEYS)
        pilot = as_uuid(body.get("pilot"), "pilot")
        attempt = as_int(body.get("attempt"), "attempt", 1)
        state = as_choice(body.get("state"), "state", ("running", "finished", "failed", "timeout", "pilotTO"))
        start, outcome = self.report_fields(body, state)
        quality = judge_quality(body) if state == "finished" else None
        if quality:
            outcome.update(quality[0])
        provenance = provenance_json(body.get("provenance")) if state != "running" else None
        if body.get("next", False) not in (True, False) or (body.get("next") and state == "running"):
            raise bad("next: true (an end report that also asks for the next job) or false")
        ahead = body.get("ahead", False)
        if ahead not in (True, False) or (ahead and not body.get("next")):
            raise bad("ahead: true (keep a job in reserve; only with next: true) or false")
        holding = as_uuid(body["holding"], "holding") if body.get("holding") is not None else None
        if holding and not ahead:
            raise bad("holding: the job the pilot runs next, claimed earlier; only with ahead: true")
        try:
            with self.store.transaction(shared=True) as conn:
                row = check_pilot_secret(conn, pilot, secret)
                claims_next = body.get("next") and row["directive"] not in LEAVING     # a leaving pilot claims nothing
                result = self.apply_report(conn, uuid, (pilot, row["state"]), attempt, state, start, outcome,
                                           claims_next, holding)
                if quality and (quality[1] or quality[2]) and not result.get("duplicate"):
                    store_quality(conn, uuid, *quality[1:])     # most jobs say nothing: no read
                if provenance and not result.get("duplicate"):
                    conn.execute("INSERT OR REPLACE INTO provenance(job, data) VALUES((SELECT id FROM jobs WHERE uuid=?), ?)",
                                 (uuid, provenance))
                if body.get("next"):    # the next job in the same transaction: one request, one commit
                    result["next"] = self.next_job(conn, row, result.get("duplicate"), ahead, holding)
        except Exception as e:
            self.costs.pending.pop(uuid, None)      # rolled back: not counted
            if isinstance(e, ApiError) and e.status == 409:
                self.broker.count("stale_reports")
            raise
        self.broker.count("reports")
        self.costs.observe(uuid)        # counted once written (the loop commits after: a commit that
                                        # fails, on a full disk, counts a retried report twice)
        claimed = result.get("next", {})
        for job in filter(None, (claimed.get("job"), claimed.get("reserve"))):
            self.broker.count_claim(job)
        self.broker.notify_work(result.pop("released", 0))
        return result

    def next_job(self, conn, pilot, replayed, ahead=False, holding=None):
        """The job an end report asks for, unless the pilot already runs one: a replayed end
        report (its answer was lost, the pilot went on) must not hand it a second job. `pilot`:
        the pilot's row as the report read it, before the report moved it (a claim reads only
        what a report leaves as it was: its directive, site, job types, host, and whether it is
        `no jobs` or live). `ahead`: the pilot keeps a job in reserve, to start it the moment
        the one before ends, while that one's report travels: the job claimed waits behind the
        one it is `holding`, or, where it holds none, a second job waits in reserve behind the
        first (Broker.claim says when)."""
        if replayed and conn.execute(RUNNING_JOB, (pilot["uuid"],)).fetchone():
            return {"job": None, "directive": None}
        pilot = live_pilot(conn, pilot)
        job, directive = self.broker.claim(conn, pilot, holding=holding)
        if not ahead:
            return {"job": job, "directive": directive}
        reserve = self.broker.claim(conn, pilot, holding=job["uuid"])[0] if job and not holding else None
        return {"job": job, "directive": directive, "reserve": reserve}

    @staticmethod
    def report_fields(body, state):
        """The job columns a report sets, as (how it started: pid, log paths and the seconds it
        has run, which date its start; how it ended: exit code, message, log tails, and when, if
        the report comes late: `ended_ago`, seconds by the pilot's clock)."""
        start, outcome = {}, {}
        if state == "running" or "pid" in body:
            start["pid"] = as_int(body.get("pid", 0), "pid", 0, MAX_PID)
            for key in ("stdout_path", "stderr_path"):
                start[key] = as_str(body.get(key, ""), key, max_len=4096)
        if "runtime" in body:
            start["runtime"] = as_number(body["runtime"], "runtime", 0, MAX_SECONDS)
        if state != "running":
            if body.get("exit_code") is not None:
                outcome["exit_code"] = as_int(body["exit_code"], "exit_code", -EXIT_CODES, EXIT_CODES)
            outcome["errmsg"] = as_str(body.get("errmsg", ""), "errmsg", max_len=4096)
            for key in ("stdout", "stderr"):
                outcome[key + "_tail"] = as_str(body.get(key, ""), key, max_len=4 * TAIL_BYTES)[-TAIL_BYTES:]
            outcome.update(usage_fields(body.get("usage") or {}))
            if "ended_ago" in body:
                outcome["ts_sto"] = now() - as_number(body["ended_ago"], "ended_ago", 0, MAX_SECONDS)
        elif "ended_ago" in body:
            raise bad("ended_ago: only an end report has it")
        return start, outcome

    def apply_report(self, conn, uuid, pilot_and_state, attempt, state, start, outcome, claims_next=False, holding=None):
        """A pilot's report, fenced by pilot and attempt: a repeat is acknowledged, a stale one
        refused with 409; `running` moves the job on, an end state ends or retries it. An end
        report for a job still dispatched (a short job: its pilot reports `running` only for jobs
        that outlast RUNNING_REPORT_DELAY) moves it through `running` in the same row update
        (a workflow's job in two, as its workflow follows each). An end report that `claims_next`
        leaves the pilot's state to the claim that follows (one change of state, not two); one
        `holding` the job its pilot started as this one ended leaves the pilot on that job.
        `pilot_and_state`: the reporting pilot and its state as this transaction read it."""
        pilot, pilot_state = pilot_and_state
        job = lookup(conn, "jobs", uuid)
        stale = job["pilot"] != pilot or job["attempt"] != attempt or job["state"] not in ACTIVE_JOB_STATES
        if stale or (state == "running" and job["state"] != "dispatched"):
            if self._already_reported(conn, job, pilot, attempt, state):
                return {"state": job["state"], "duplicate": True}
            raise ApiError(409, f"job {uuid}: report for attempt {attempt} by pilot {pilot} is stale; "
                                f"the job is {job['state']} (attempt {job['attempt']})" if stale else
                                f"job {uuid}: is already {job['state']}")
        passed = None
        if "ts_sto" in outcome:     # a late report: the job ended after it was claimed and started
            outcome["ts_sto"] = max(outcome["ts_sto"], job["ts_sta"] or 0, job["ts_dis"] or 0)
        if state == "running" or (job["state"] == "dispatched" and "runtime" in start):
            started = max(outcome.get("ts_sto", now()) - start.pop("runtime", 0.0), job["ts_dis"] or 0)
            if state == "running" or job["wfuuid"]:
                move_job(conn, uuid, "dispatched", "running", pilot, attempt=attempt, pilot=pilot,
                         changes={**start, "ts_sta": started})
                if move_pilot(conn, pilot, LIVE_PILOT_STATES, "running", ts_beat=now()):
                    pilot_state = "running"
                if job["wfuuid"]:
                    follow_jobs(conn, job["wfuuid"])
                if state == "running":
                    return {"state": "running"}
                job = dict(job, state="running", ts_sta=started)
            else:       # a short job: through `running` to its end in one row update
                outcome, passed = {**outcome, **start, "ts_sta": started}, ("running", started)
                job = dict(job, ts_sta=started)
        new_state, released = requeue_or_end(conn, dict(job), state, pilot, outcome.get("errmsg", ""), outcome,
                                             passed=passed)
        if state in PROFILED_STATES and job["ts_sta"]:
            cpu = outcome["cpu_user"] + outcome.get("cpu_sys", 0) if "cpu_user" in outcome else None
            self.costs.pending[uuid] = (job["jobtype"], outcome.get("ts_sto", now()) - job["ts_sta"],
                                        outcome.get("max_rss_mb"), cpu)
        self.pilot_reported(conn, pilot, pilot_state, uuid, holding, claims_next)
        return {"state": new_state, "released": released}

    def pilot_reported(self, conn, pilot, pilot_state, uuid, holding, claims_next):
        """The pilot's row after its end report: on the job it holds, if any; its state `active`
        unless it holds one or claims the next (then the claim sets it). The report is heard as
        a heartbeat, in memory (Leases), and the state is set only if it changes: an indexed
        column set, even to its own value, rewrites its index entries, a WAL page each a job."""
        new_state = pilot_state if pilot_state not in ("dispatched", "running") else \
            "dispatched" if holding else pilot_state if claims_next else "active"
        changes = ", state=?" if new_state != pilot_state else ""
        conn.execute("UPDATE pilots SET job=?, reserve=CASE WHEN reserve=? THEN NULL ELSE reserve END, "
                     f"jobs_done=jobs_done+1{changes} WHERE uuid=? AND job=?",
                     (holding, holding, *([new_state] if changes else []), pilot, uuid))
        self.leases.beat(pilot, now())

    @staticmethod
    def _already_reported(conn, job, pilot, attempt, state):
        """A report repeated because its answer was lost is acknowledged, not refused. Asked
        only of a report that cannot apply: a repeat never can (its job has moved on)."""
        return conn.execute("SELECT 1 FROM events INDEXED BY events_job WHERE job=? AND attempt=? AND new=? AND who=?",
                            (job["id"], attempt, state, pilot)).fetchone() is not None

    def heartbeat(self, pilot_uuid, body, secret):
        check_keys(body, "heartbeat", ("job", "free_mb", "note"))
        status = {"free_mb": as_number(body["free_mb"], "free_mb", 0, 2 ** 53) if "free_mb" in body else None,
                  "note": as_str(body.get("note", ""), "note", max_len=256)}
        job_uuid = body.get("job")
        if job_uuid is not None:
            job_uuid = as_uuid(job_uuid, "job")
        with self.store.reading() as conn:     # never the write lock: see Leases
            pilot = check_pilot_secret(conn, pilot_uuid, secret)
            if pilot["state"] not in LIVE_PILOT_STATES + ("lost",):
                raise ApiError(409, f"pilot {pilot_uuid}: is {pilot['state']}; register again")
            kept = self.leases.beat(pilot_uuid, now(), status)  # before reading the job: see Leases
            directive = pilot["directive"]
            if job_uuid is not None:
                job = conn.execute("SELECT state, pilot FROM jobs WHERE uuid=?", (job_uuid,)).fetchone()
                if not kept or job is None or job["pilot"] != pilot_uuid or job["state"] not in ACTIVE_JOB_STATES:
                    directive = directive or "kill"     # cancelled, deleted or given to another pilot
        return {"directive": directive}

    def release_reserve(self, pilot_uuid, body, secret):
        """A job a pilot claimed ahead and will not start (the job before it ran long, or the
        pilot is told to go) is given back, for any pilot to take now."""
        check_keys(body, "release", ("job",))
        job_uuid = as_uuid(body.get("job"), "job")
        with self.store.transaction(shared=True) as conn:
            check_pilot_secret(conn, pilot_uuid, secret)
            released = give_back(conn, job_uuid, pilot_uuid, pilot_uuid, "given back unstarted by the pilot "
                                 "that held it in reserve")
            conn.execute("UPDATE pilots SET reserve=NULL WHERE uuid=? AND reserve=?", (pilot_uuid, job_uuid))
        self.broker.notify_work(int(released))
        return {"released": released}

    def deregister(self, pilot_uuid, body, secret):
        check_keys(body, "deregister", ("reason",))
        reason = as_str(body.get("reason", ""), "reason", max_len=256)
        with self.store.transaction() as conn:
            check_pilot_secret(conn, pilot_uuid, secret)
            crashed = reason.startswith("crashed")
            if not move_pilot(conn, pilot_uuid, LIVE_PILOT_STATES, "stopped", info=reason,
                              ts_stop=now(), job=None, **({"note": reason[:200]} if crashed else {})):
                raise ApiError(409, f"pilot {pilot_uuid}: is not live")
            released = release_jobs(conn, pilot_uuid, "pilot stopped: " + reason, pilot_uuid,
                                    never_started=not crashed, crashed=crashed)
        self.broker.notify_work(released)
        return {"state": "stopped"}

    def mark_pilots(self, body, who):
        """Tell the selected live pilots to stop (kill the job, exit) or drain (finish it, exit);
        they act at their next heartbeat or job request."""
        check_keys(body, "mark", ("directive", "uuid", "site", "host", "state"))
        directive = as_choice(body.get("directive"), "directive", ("stop", "drain"))
        selectors = {k: as_str(body[k], k, allow_empty=False, max_len=256)
                     for k in ("uuid", "site", "host", "state") if body.get(k) is not None}
        if not selectors:
            raise bad("mark: give at least one of uuid, site, host, state")
        if "state" in selectors:
            as_choice(selectors["state"], "state", LIVE_PILOT_STATES)
        marks = ",".join("?" * len(LIVE_PILOT_STATES))
        cond = " AND ".join(f"{k}=?" for k in selectors)
        with self.store.transaction() as conn:
            marked = [r["uuid"] for r in conn.execute(
                f"SELECT uuid FROM pilots WHERE state IN ({marks}) AND {cond}",
                (*LIVE_PILOT_STATES, *selectors.values()))]
            for uuid in marked:
                conn.execute("UPDATE pilots SET directive=? WHERE uuid=?", (directive, uuid))
                event(conn, "pilot", uuid, None, directive, who, info="directive")
        self.broker.notify_work()      # idle pilots leave their long poll and see it
        return {"marked": marked}

    def list_pilots(self, query):
        where, args = where_equal(query, ("state", "site", "host"))
        limit = min(as_int(query.get("limit", 1000), "limit", 1), 10000)
        rows = self.store.read(f"SELECT * FROM pilots{where} ORDER BY id DESC LIMIT ?", args + [limit])
        return {"pilots": [pilot_to_dict(r) for r in rows]}

    # -- sites ------------------------------------------------------------------------------------
    def site_defaults(self, name):
        row = self.store.read_one("SELECT * FROM sites WHERE name=?", (name,)) if name else None
        if row is None:
            return None
        site = dict(row)
        site["env"] = json.loads(site["env"])
        return site

    # The original's site JSON names some fields differently; both spellings are taken.
    SITE_ALIASES = {"pilotperiod": "period", "pilotcycles": "cycles", "pilotbeat": "heartbeat"}

    def define_site(self, name, body):
        """Create or replace a site: the original's site JSON as is, or our field names."""
        as_str(name, "site", allow_empty=False, max_len=64)
        check_keys(body, "site", ("name", "period", "cycles", "heartbeat", "env", "server", "pilots", "pilotlife",
                                  "tolerance", "factory", "factory_period", "keep_hours", "memory", "disk",
                                  "floor", "probe", "canary", "canary_period", "factory_status", "factory_remove",
                                  *self.SITE_ALIASES))
        if body.get("name", name) != name:
            raise bad(f"name: {body['name']!r} differs from the site {name!r} it is stored as")
        body = {self.SITE_ALIASES.get(k, k): v for k, v in body.items() if v is not None}

        def number(key, minimum, maximum, kind=as_number):
            return kind(body[key], key, minimum, maximum) if key in body else None

        site = {"name": name, "period": number("period", 0, MAX_HEARTBEAT),
                "cycles": number("cycles", 0, None, as_int), "heartbeat": number("heartbeat", 0.1, MAX_HEARTBEAT),
                "pilots": number("pilots", 0, 100000, as_int), "pilotlife": number("pilotlife", 0, MAX_SECONDS),
                "tolerance": number("tolerance", 0, 1),
                "factory_period": number("factory_period", 1, MAX_SECONDS),
                "keep_hours": number("keep_hours", 0, 24 * 366),
                "memory": number("memory", 1, MAX_LIMIT_MB, as_int), "disk": number("disk", 1, MAX_LIMIT_MB, as_int),
                "floor": number("floor", 0, 100000, as_int), "probe": as_str(body.get("probe", ""), "probe", max_len=1024),
                "canary": as_str(body.get("canary", ""), "canary", max_len=4096),
                "factory_status": as_str(body.get("factory_status", ""), "factory_status", max_len=1024),
                "factory_remove": as_str(body.get("factory_remove", ""), "factory_remove", max_len=1024),
                "canary_period": number("canary_period", 1, MAX_SECONDS),
                "factory": as_str(body.get("factory", ""), "factory", max_len=1024),
                "server": as_str(body.get("server", ""), "server", max_len=256),
                "env": json.dumps(as_env(body.get("env", {}), "env"), sort_keys=True)}
        with self.store.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO sites(name, period, cycles, heartbeat, env, server, pilots, "
                         "pilotlife, tolerance, factory, factory_period, keep_hours, memory, disk, floor, probe, canary, "
                         "canary_period, factory_status, factory_remove, ts) VALUES(:name, :period, :cycles, :heartbeat, "
                         ":env, :server, :pilots, :pilotlife, :tolerance, :factory, :factory_period, :keep_hours, "
                         ":memory, :disk, :floor, :probe, :canary, :canary_period, :factory_status, :factory_remove, :ts)",
                         {**site, "ts": now()})
        return self.site_defaults(name)

    def list_sites(self):
        return {"sites": [self.site_defaults(r["name"]) for r in
                          self.store.read("SELECT name FROM sites ORDER BY name")]}

    def get_site(self, name):
        """A site with its population now: live and pending pilots, and `missing`, the pilots a
        factory (or a site's own cron line) should start: nominal - live - pending, at least 0."""
        site = self.site_defaults(name)
        if site is None:
            raise ApiError(404, f"site {name!r}: no such site")
        t = now()
        figures = self.site_figures(site, t)
        return {**site, **figures, "requests": self.recent_requests(name, t)}

    # -- pilot factories --------------------------------------------------------------------------
    def request_pilots(self, name, body):
        """A factory is about to start `count` pilots for the site: recorded, so that the pilots
        a batch queue still holds count as pending until they register or the request expires."""
        check_keys(body, "request", ("count", "expires"))
        count = as_int(body.get("count"), "count", 1, 100000)
        expires = as_number(body.get("expires", 900), "expires", 1, MAX_SECONDS)
        if self.site_defaults(name) is None:
            raise ApiError(404, f"site {name!r}: no such site")
        request = {"id": str(uuidlib.uuid4()), "site": name, "count": count, "ts": now()}
        with self.store.transaction() as conn:
            conn.execute("INSERT INTO requests(id, site, count, state, ts, expires) VALUES(?, ?, ?, 'open', ?, ?)",
                         (request["id"], name, count, request["ts"], request["ts"] + expires))
        return request

    def cancel_request(self, uuid):
        """The factory's command failed: its pilots will never come, so they are not pending."""
        with self.store.transaction() as conn:
            if not conn.execute("UPDATE requests SET state='cancelled' WHERE id=?", (uuid,)).rowcount:
                raise ApiError(404, f"request {uuid}: no such request")
        return {"id": uuid, "state": "cancelled"}

    def recent_requests(self, site, t):
        """A site's requests of the last day, newest first, with their pilots' fate: how many
        registered, how many are pending, how many ended within YOUNG_DEATH of registering."""
        rows = self.store.read("SELECT * FROM requests INDEXED BY requests_site WHERE site=? AND ts > ? "
                               "ORDER BY ts DESC LIMIT 20", (site, t - 86400))
        found = []
        for r in rows:
            young = self.store.read_one(   # an end the pilot did not choose: lost, or a crash it reported
                "SELECT COUNT(*) FROM pilots INDEXED BY pilots_request WHERE request=? AND (state = 'lost' OR "
                "state = 'stopped' AND note LIKE 'crashed%') AND ts_stop - ts_reg < ?", (r["id"], YOUNG_DEATH))[0]
            open_ = r["state"] == "open" and r["expires"] > t
            found.append({**dict(r), "pending": r["count"] - r["registered"] if open_ else 0, "died_young": young})
        return found

    def canary_status(self, site):
        """The site's newest ended canary (state, when, why), if the site has canaries."""
        if not site.get("canary"):
            return None
        with self.store.reading() as conn:
            last = conn.execute("SELECT state, ts_sto, reason FROM jobs INDEXED BY jobs_jobtype_id WHERE jobtype = ? "
                                "AND site = ? AND ts_sto IS NOT NULL ORDER BY id DESC LIMIT 1",
                                (CANARY, site["name"])).fetchone()
        return dict(last) if last else {"state": "none yet", "ts_sto": None, "reason": ""}

    def site_figures(self, site, t):
        """A site's pilots now and in the last hour, from bounded indexed reads of one snapshot."""
        self.store.move_tallies(reading=True)
        with self.store.snapshot():
            return self.read_site_figures(site, t)

    def read_site_figures(self, site, t):
        marks = ",".join("?" * len(LIVE_PILOT_STATES))
        old = t - (site["pilotlife"] or MAX_SECONDS) * LIFE_STAGGER     # a pilot past this retires soon
        rows = self.store.read(f"SELECT state, COUNT(*) AS n, SUM(ts_reg < ?) AS old FROM pilots WHERE site=? AND "
                               f"state IN ({marks}) GROUP BY state", (old, site["name"], *LIVE_PILOT_STATES))
        live, retiring = {r["state"]: r["n"] for r in rows}, sum(r["old"] for r in rows)
        ended = self.store.read("SELECT state, ts_stop - ts_reg AS life FROM pilots WHERE site=? AND state IN "
                                "('stopped', 'lost') AND ts_stop > ? LIMIT 10000", (site["name"], t - 3600))
        lives = [r["life"] for r in ended]
        finished = self.store.read_one("SELECT COALESCE(SUM(n), 0) FROM ends WHERE site=? AND bucket >= ? "
                                       "AND state='finished'", (site["name"], int(t - 3600) // 60))[0]
        pending = self.store.read_one("SELECT COALESCE(SUM(count - registered), 0) FROM requests INDEXED BY "
                                      "requests_site WHERE site=? AND ts > ? AND state='open' AND expires > ?",
                                      (site["name"], t - MAX_SECONDS, t))[0]
        failed = self.store.read_one("SELECT COALESCE(SUM(n), 0) FROM error_hosts WHERE bucket >= ? AND site = ?",
                                     (int(t - 3600) // ERROR_BUCKET, site["name"]))[0]   # as /failures?since=1h
        unstarted = self.store.read_one(    # of the day, since the last request that started a pilot: healed, none
            "SELECT COUNT(*) FROM requests INDEXED BY requests_site WHERE site=? AND ts > MAX(?, (SELECT COALESCE("
            "MAX(ts), 0) FROM requests INDEXED BY requests_site WHERE site=? AND ts > ? AND registered > 0)) "
            "AND state='open' AND expires <= ? AND registered = 0", (site["name"], t - 86400, site["name"], t - 86400, t))[0]
        nominal = site["pilots"] or 0
        waits = site.get("floor") is None or self.store.read_one(
            "SELECT COALESCE(SUM(n), 0) FROM waiting WHERE site IN (?, '')", (site["name"],))[0] > 0
        wanted = nominal if waits else min(nominal, site["floor"])
        return {"finished_1h": finished, "failed_attempts_1h": failed,
                "live": sum(live.values()), "pending": pending, "retiring": retiring, "wanted": wanted,
                "unstarted_requests": unstarted, "canary_last": self.canary_status(site),
                "missing": max(0, wanted - (sum(live.values()) - retiring) - pending),
                "running": live.get("running", 0) + live.get("dispatched", 0),
                "idle": live.get("active", 0) + live.get("no jobs", 0),
                "lost_1h": sum(r["state"] == "lost" for r in ended), "ended_1h": len(ended),
                "lost_lives_1h": [r["life"] for r in ended if r["state"] == "lost"],
                "mean_life_1h": sum(lives) / len(lives) if lives else None, "median_life_1h": median(lives)}

    # -- data quality: bands and reference runs ----------------------------------------------------
    def set_bands(self, jobtype, body):
        """A job type's bands, replacing its old ones: {"metric": {"warn": [low, high], "error":
        [low, high]}}, either end null (open). They judge a finished job's metrics when its
        payload wrote no verdict.json."""
        check_keys(body, "bands", ("bands",))
        bands = body.get("bands")
        if not isinstance(bands, dict) or len(bands) > MAX_METRICS:
            raise bad(f"bands: an object of at most {MAX_METRICS} metrics, each {{\"warn\": [low, high], "
                      "\"error\": [low, high]}")
        rows = [(jobtype, as_str(metric, "bands", allow_empty=False, max_len=MAX_QUALITY_NAME),
                 *band_range(ranges, metric, "warn"), *band_range(ranges, metric, "error"),
                 *band_needs(ranges, metric)) for metric, ranges in bands.items()]
        with self.store.transaction() as conn:
            conn.execute("DELETE FROM bands WHERE jobtype=?", (jobtype,))
            conn.executemany("INSERT INTO bands VALUES(?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return self.get_bands(jobtype)

    def get_bands(self, jobtype):
        return {"jobtype": jobtype, "bands": {
            r["metric"]: {"warn": [r["warn_low"], r["warn_high"]], "error": [r["error_low"], r["error_high"]],
                          **({"needs": {r["needs"]: r["needs_min"]}} if r["needs"] else {})}
            for r in self.store.read("SELECT * FROM bands WHERE jobtype=? ORDER BY metric", (jobtype,))}}

    def set_deadline(self, jobtype, body):
        """The most seconds a file may wait, from its arrival, for its job of this type to end;
        past it, the late_run alarm names the type and the files. null lifts it."""
        check_keys(body, "deadline", ("seconds",))
        seconds = None if body.get("seconds") is None else as_number(body["seconds"], "seconds", 1, MAX_SECONDS)
        with self.store.transaction() as conn:
            if seconds is None:
                conn.execute("DELETE FROM deadlines WHERE jobtype=?", (jobtype,))
            else:
                conn.execute("INSERT OR REPLACE INTO deadlines VALUES(?, ?)", (jobtype, seconds))
        return {"jobtype": jobtype, "seconds": seconds}

    def set_reference(self, jobtype, body, who):
        """Mark a run the reference of a job type (its newest finished job of that type on that
        run), with who and why: every job of the type is shown beside it."""
        check_keys(body, "reference", ("run", "why", "who"))
        run = as_int(body.get("run"), "run", 0, INT64 - 1)
        ref = {"jobtype": jobtype, "run": run, "why": as_str(body.get("why", ""), "why", allow_empty=False, max_len=300),
               "who": who, "ts": now()}
        with self.store.transaction() as conn:
            ref["job"] = run_job(conn, jobtype, run)
            if ref["job"] is None:
                raise ApiError(404, f"run: no finished {jobtype} job on run {run}")
            conn.execute("INSERT OR REPLACE INTO refs(jobtype, run, job, who, why, ts) "
                         "VALUES(:jobtype, :run, :job, :who, :why, :ts)", ref)
            event(conn, "reference", "reference:" + jobtype, None, str(run), ref["who"], info=ref["why"])
        return ref

    # -- notes --------------------------------------------------------------------------------------
    NOTE_KINDS = ("run", "file", "job")

    def add_note(self, body, who):
        """A person's note on a run (its number), a file (its path) or a job (its uuid), shown
        where it is seen: the run grid, the job page, the summary's last 12 hours. `hide`: the
        run grid may leave the noted run out (hide_noted=1), a run known to be bad."""
        check_keys(body, "note", ("kind", "target", "text", "who", "hide"))
        note = {"kind": as_choice(body.get("kind"), "kind", self.NOTE_KINDS),
                "target": as_str(body.get("target", ""), "target", allow_empty=False, max_len=4096),
                "text": as_str(body.get("text", ""), "text", allow_empty=False, max_len=1000),
                "who": who, "hide": body.get("hide", False), "ts": now()}
        if note["hide"] not in (True, False):
            raise bad("hide: true or false")
        if note["kind"] == "run":
            note["target"] = str(as_int(note["target"], "target", 0, INT64 - 1))
        elif note["kind"] == "job":
            note["target"] = as_uuid(note["target"], "target")
        with self.store.transaction() as conn:
            note["id"] = conn.execute("INSERT INTO notes(kind, target, text, who, hide, ts) VALUES(:kind, :target, "
                                      ":text, :who, :hide, :ts)", note).lastrowid
        return note

    def set_grid_order(self, body, who):
        """Save the run grid's column order for a stream (a directory of input files; "all" for
        every stream at once): it holds on every refresh and for every viewer, until changed."""
        check_keys(body, "order", ("stream", "types"))
        stream = as_str(body.get("stream", ""), "stream", allow_empty=False, max_len=4096)
        types = body.get("types")
        if not isinstance(types, list) or len(types) > 100:
            raise bad("types: a list of at most 100 job types is expected")
        names = [as_str(t, "types", allow_empty=False, max_len=64) for t in types]
        if any("," in n for n in names):
            raise bad("types: a job type name with a comma cannot be ordered")
        with self.store.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO grid_orders(stream, types, who, ts) VALUES(?, ?, ?, ?)",
                         (stream, ",".join(names), who, now()))
        return {"stream": stream, "types": names, "who": who}

    def list_notes(self, query):
        """Notes of the last `age` (default 12 h: a shift and its hand-over), newest first."""
        check_keys(query, "query", ("age",))
        rows = self.store.read("SELECT * FROM notes INDEXED BY notes_ts WHERE ts > ? ORDER BY ts DESC LIMIT 200",
                               (now() - parse_age(query.get("age") or "12h"),))
        return {"notes": [dict(r) for r in rows]}

    # -- services (injectors and other clients that report) ---------------------------------------
    def service_beat(self, name, body):
        """A client's status line (an injector's scan, a factory's round, a cron script's
        result), kept with its last SERVICE_LINES. A service that gives a period promises to
        report that often and alarms after SILENT_PERIODS silent ones; without one (0) it never
        alarms. A retired service that reports again is back."""
        check_keys(body, "service", ("host", "period", "result"))
        row = {"name": as_str(name, "service", allow_empty=False, max_len=256),
               "host": as_str(body.get("host", ""), "host", max_len=256),
               "period": as_number(body.get("period", 0), "period", 0, MAX_SECONDS),
               "result": as_str(body.get("result", ""), "result", max_len=1024), "ts": now()}
        if 0 < row["period"] < 0.1:
            raise bad(f"period: at least 0.1 s (or 0: no promise, no alarm), got {row['period']}")
        with self.store.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO services(name, host, period, result, ts, retired) "
                         "VALUES(:name, :host, :period, :result, :ts, NULL)", row)
            conn.execute("INSERT INTO service_lines(name, result, ts) VALUES(:name, :result, :ts)", row)
            conn.execute("DELETE FROM service_lines WHERE name=? AND id <= (SELECT id FROM service_lines WHERE "
                         "name=? ORDER BY id DESC LIMIT 1 OFFSET ?)", (name, name, SERVICE_LINES))
        return row

    def list_services(self, query=None):
        t = now()
        return {"services": [service_view(r, t) for r in self.store.read("SELECT * FROM services ORDER BY name")]}

    def get_service(self, name):
        """A service with its last lines, newest first."""
        row = self.store.read_one("SELECT * FROM services WHERE name=?", (name,))
        if row is None:
            raise ApiError(404, f"service {name[:100]!r}: no such service")
        lines = self.store.read("SELECT result, ts FROM service_lines WHERE name=? ORDER BY id DESC LIMIT ?",
                                (name, SERVICE_LINES))
        return {**service_view(row, now()), "lines": [dict(r) for r in lines]}

    def retire_service(self, name):
        """A service stopped on purpose (an injector done, a cron line removed): it never alarms,
        and retention purges it."""
        with self.store.transaction() as conn:
            if not conn.execute("UPDATE services SET retired=? WHERE name=?", (now(), name)).rowcount:
                raise ApiError(404, f"service {name[:100]!r}: no such service")
        return {"name": name, "retired": True}

    def delete_site(self, name):
        with self.store.transaction() as conn:
            if not conn.execute("DELETE FROM sites WHERE name=?", (name,)).rowcount:
                raise ApiError(404, f"site {name!r}: no such site")
        return {"deleted": name}

    # -- housekeeping -----------------------------------------------------------------------------
    def housekeep(self):
        """One pass: lost pilots, expired job leases, jobs overrunning their time limit."""
        t = self.notice_pause()
        self.store.move_tallies()       # first: the breakers and alarms below read the counts
        self.alarms.notice_starving(t)
        self.alarms.notice_nominal(t)
        self.store.write(self.trip_breakers, t)
        released = self.supervise(t) + self.store.write(self._time_out_jobs, t) + self.store.write(self.send_canaries, t)
        self.store.write(self._expire_staged, t)
        self.broker.notify_work(released)
        if self.retention_days:
            purged = self.store.write(self.purge, t - self.retention_days * 86400)
            if purged:
                self.images.forget(purged)
            self.say_purged(len(purged), t)
        self.keep_wal_small()
        self.costs.flush(self.store)
        if int(t) // 60 != self.sampled_minute:
            self.store.write(self.sample, t)
        if t - self.last_tidy > TIDY_PERIOD:
            self.last_tidy = t
            self.store.write(self.trim_counts, t)
            self.images.sweep()
            self.store.read("PRAGMA optimize")

    def say_purged(self, count, t):
        """Retention's work, said once a minute in a summary, not at every pass."""
        self.purged += count
        if self.purged and t - self.purge_said >= 60:
            log.info("retention: purged %d ended object(s) older than %g days in the last %.0f s", self.purged,
                     self.retention_days, t - self.purge_said)
            self.purged, self.purge_said = 0, t

    def sample(self, conn, t):
        """Once a minute: live pilots, running and queued jobs, for the activity charts."""
        pilots = conn.execute("SELECT COALESCE(SUM(n), 0) FROM pilot_counts WHERE state IN (%s)"
                              % ",".join("?" * len(LIVE_PILOT_STATES)), LIVE_PILOT_STATES).fetchone()[0]
        jobs = dict(conn.execute("SELECT state, SUM(n) FROM job_counts WHERE state IN "
                                 "('defined', 'dispatched', 'running') GROUP BY state").fetchall())
        conn.execute("INSERT OR REPLACE INTO samples VALUES(?, ?, ?, ?)",
                     (int(t) // 60, pilots, jobs.get("dispatched", 0) + jobs.get("running", 0),
                      jobs.get("defined", 0)))
        self.sampled_minute = int(t) // 60

    @staticmethod
    def trim_counts(conn, t):
        """The time-bucketed counts are kept 2 days (alarms, summary), the charts' 7 days."""
        for table, bucket, keep in (("job_ends", 10, 2), ("ends", 60, 7), ("errors", ERROR_BUCKET, 7),
                                    ("error_places", ERROR_BUCKET, 7), ("error_hosts", ERROR_BUCKET, 7),
                                    ("job_starts", 60, 7),
                                    ("profiles", PROFILE_BUCKET, 8)):
            conn.execute(f"DELETE FROM {table} WHERE bucket < ?", (int(t - keep * 86400) // bucket,))
        conn.execute("DELETE FROM samples WHERE minute < ?", (int(t - 7 * 86400) // 60,))
        conn.execute("DELETE FROM attempt_failures INDEXED BY attempt_failures_ts WHERE ts < ?",
                     (int(t - 7 * 86400) // ERROR_BUCKET * ERROR_BUCKET,))
        conn.execute("DELETE FROM submissions INDEXED BY submissions_ts WHERE ts < ?", (t - SUBMISSIONS_KEPT,))
        conn.execute("DELETE FROM alarm_events INDEXED BY alarm_events_ts WHERE ts < ?", (t - 30 * 86400,))
        conn.execute("DELETE FROM alarm_acks WHERE until < ?", (t,))

    def keep_wal_small(self):
        """Truncate a write-ahead log past its limit, or at every pass while the disk is short of
        space (the disk_low alarm's threshold): a log left grown by writes that failed for space
        would take back what a person frees, and writes would go on failing. Say so once if a
        reader prevents it."""
        free = self.images.free_bytes()
        tight = free is not None and free < 2 * self.images.min_free
        stuck = (tight or self.store.wal_bytes() > self.wal_limit) and not self.store.truncate_wal()
        if stuck and not self.wal_stuck:
            log.warning("write-ahead log at %d bytes and a reader keeps it from shrinking: a read still "
                        "in progress (a long page view) or an outside sqlite3 session left in a transaction; "
                        "retried at every pass", self.store.wal_bytes())
        self.wal_stuck = stuck

    def notice_pause(self):
        """The time of this pass. A pass far later than due (the server was stopped, swapped
        out, its VM migrated) or a jump of the wall clock is treated like a restart: nobody's
        silence counts from before it, so a server hiccup never blames the pilots."""
        t, mono = now(), time.monotonic()
        late = mono - self.last_pass[0] - self.hk_period
        jump = (t - self.last_pass[1]) - (mono - self.last_pass[0])
        if late > PAUSE_GAP or abs(jump) > PAUSE_GAP:
            log.warning("housekeeping %.1f s late, wall clock moved %+.1f s more than the monotonic "
                        "clock: counting pilots' silence from now", late, jump)
            self.resumed = t
        self.last_pass = (mono, t)
        return t

    def supervise(self, t):
        """The heartbeats heard in memory written, silent pilots shown lost, expired leases given
        away: one transaction, judged under the leases' lock (see Leases). Returns how many jobs
        became claimable."""
        beats = self.leases.unwritten()
        expired = []
        try:
            with self.store.transaction() as conn:
                self._write_beats(conn, beats)
                self._mark_lost_pilots(conn, t)
                expired, released = self._expire_leases(conn, t)
        finally:
            self.leases.released(expired)
        self.leases.written(beats)
        return released

    @staticmethod
    def _write_beats(conn, beats):
        for uuid, (ts, status) in beats.items():
            conn.execute("UPDATE pilots SET ts_beat=? WHERE uuid=? AND ts_beat < ? AND state != 'stopped'",
                         (ts, uuid, ts))        # a stopped pilot's last word was its stop
            if status:      # nor its note: a crashed pilot's says why it stopped
                conn.execute("UPDATE pilots SET free_mb=?, note=? WHERE uuid=? AND state != 'stopped'",
                             (status["free_mb"], status["note"], uuid))
            if conn.execute("SELECT state FROM pilots WHERE uuid=?", (uuid,)).fetchone() == ("lost",):
                bring_back(conn, uuid, ts)

    def _mark_lost_pilots(self, conn, t):
        """Pilots silent for LOST_AFTER_BEATS heartbeats are shown lost (the alarm); their jobs
        stay theirs until the lease runs out. Silence counts from the start or the last pause."""
        marks = ",".join("?" * len(LIVE_PILOT_STATES))
        lost = conn.execute(f"SELECT uuid FROM pilots INDEXED BY pilots_state WHERE state IN ({marks}) "
                            f"AND MAX(ts_beat, ?) + ? * heartbeat < ?",
                            (*LIVE_PILOT_STATES, self.resumed, LOST_AFTER_BEATS, t)).fetchall()
        for pilot in lost:
            if not self.leases.last_heard(pilot["uuid"]):
                move_pilot(conn, pilot["uuid"], LIVE_PILOT_STATES, "lost",
                           info=f"silent for {LOST_AFTER_BEATS} heartbeats", ts_stop=t)

    def _expire_leases(self, conn, t):
        """The job of a pilot silent for lease_beats heartbeats is given away: pilotTO, or back to
        defined while attempts remain. By then the pilot has killed it itself (it fences itself
        before its lease runs out), so it never runs twice at once. Returns (the pilots whose
        jobs were freed, how many jobs are claimable)."""
        silent = conn.execute("SELECT uuid, heartbeat FROM pilots INDEXED BY pilots_state WHERE state='lost' "
                              "AND job IS NOT NULL AND MAX(ts_beat, ?) + ? * heartbeat < ?",
                              (self.resumed, self.lease_beats, t)).fetchall()
        expired = self.leases.judge([tuple(r) for r in silent], lambda beat: t - self.lease_beats * beat)
        released = 0
        for uuid in expired:
            released += release_jobs(conn, uuid, f"pilot lost: its lease of {self.lease_beats} heartbeats ran out")
            conn.execute("UPDATE pilots SET job=NULL, reserve=NULL WHERE uuid=?", (uuid,))
        return expired, released

    def _time_out_jobs(self, conn, t):
        overdue = conn.execute("SELECT * FROM jobs INDEXED BY jobs_state_id WHERE state='running' AND timelimit > 0 "
                               "AND ts_sta + timelimit + ? < ?", (self.timelimit_grace, t)).fetchall()
        return sum(requeue_or_end(conn, dict(job), "timeout", "housekeeping", "no report after the time limit")[1]
                   for job in overdue)

    @staticmethod
    def _expire_staged(conn, t):
        """Parts of submissions never committed (the client died, or gave up) go after STAGED_TTL."""
        conn.execute("DELETE FROM staged INDEXED BY staged_ts WHERE ts < ?", (t - STAGED_TTL,))

    def purge(self, conn, cutoff):
        """Delete, at most PURGE_BATCH of each per pass, what ended before `cutoff`: standalone
        jobs, workflows with their jobs and files, stopped or lost pilots; and their history.
        Returns the uuids deleted."""
        gone = []
        for state in END_JOB_STATES:
            gone += delete_rows(conn, "jobs INDEXED BY jobs_ended", "state=? AND ts_sto < ? AND wfuuid IS NULL LIMIT ?",
                                (state, cutoff, PURGE_BATCH))
        for wf in conn.execute("SELECT uuid FROM workflows INDEXED BY workflows_state "
                               "WHERE state IN ('finished','failed','cancelled') "
                               "AND ts_sto < ? LIMIT ?", (cutoff, PURGE_BATCH)).fetchall():
            gone += delete_rows(conn, "jobs INDEXED BY jobs_wf", "wfuuid=?", (wf[0],))
            conn.execute("DELETE FROM datasets WHERE wfuuid=?", (wf[0],))
            conn.execute("DELETE FROM workflows WHERE uuid=?", (wf[0],))
            gone.append(wf[0])
        for state in ("stopped", "lost"):
            gone += delete_rows(conn, "pilots INDEXED BY pilots_state", "state=? AND ts_beat < ? LIMIT ?",
                                (state, cutoff, PURGE_BATCH))
        for svc in conn.execute("SELECT name FROM services WHERE retired < ?", (cutoff,)).fetchall():
            conn.execute("DELETE FROM service_lines WHERE name=?", (svc[0],))
            conn.execute("DELETE FROM services WHERE name=?", (svc[0],))
        conn.execute("DELETE FROM requests WHERE ts < ?", (cutoff,))
        gone += delete_rows(conn, "datasets INDEXED BY datasets_loose", "wfuuid IS NULL AND ts < ? LIMIT ?",
                            (cutoff, PURGE_BATCH))
        stale_inputs = conn.execute(          # the run grid's rows whose jobs are all purged
            "SELECT infile FROM inputs INDEXED BY inputs_ts WHERE ts < ? AND NOT EXISTS "
            "(SELECT 1 FROM jobs INDEXED BY jobs_infile WHERE jobs.infile = inputs.infile AND jobs.infile != '') LIMIT ?",
            (cutoff, PURGE_BATCH)).fetchall()
        conn.executemany("DELETE FROM inputs WHERE infile=?", stale_inputs)
        for chunk in chunks(gone):
            conn.execute(f"DELETE FROM events INDEXED BY events_uuid WHERE uuid IN ({','.join('?' * len(chunk))}) "
                         "AND job IS NULL", chunk)     # a job's own rows went with it (jobs_events_delete)
        return gone

    def housekeeping_loop(self):
        while not self.broker.stopping.wait(self.hk_period):
            try:
                self.housekeep()
                self.hk_failing = None
            except Exception as e:      # keep the thread alive; the next pass retries
                if str(e) != self.hk_failing:
                    log.error("housekeeping pass failed (said once until it changes): %s", e,
                              exc_info=not is_disk_full(e))
                self.hk_failing = str(e) or type(e).__name__
                if is_disk_full(e):             # give back what the log holds, so that space a
                    with contextlib.suppress(sqlite3.Error, OSError):   # person frees stays free
                        self.store.truncate_wal()
            try:
                self.alarms.record(now())
            except Exception as e:      # the alarms must not stop with the pass that raised them
                if str(e) != self.hk_failing:
                    log.error("recording alarms failed: %s", e)

    def health(self):
        wal = self.store.wal_bytes()
        return {"ok": True, "version": VERSION, "schema": self.store.schema_version,
                "wal_bytes": wal, "wal_large": wal > self.wal_limit, "images": self.images.usage(),
                "backup": self.backups.status() if self.backups else None}

    @staticmethod
    def auth_ok(who):
        """Reached only with a valid token: lets verifyImport.py check it, and say whose it is."""
        return {"ok": True, "user": who}


################################################################################################
# Views: the data behind every page. Each returns a dict, which is also the page's JSON twin.
# Every query here is bounded (LIMIT, counts tables, buckets) so pages stay fast at 1M jobs.
################################################################################################
WINDOWS = (("1m", 60), ("10m", 600), ("1h", 3600), ("24h", 86400))
CHART_RANGES = {"15m": (900, 60), "1h": (3600, 60), "6h": (6 * 3600, 300), "24h": (86400, 600),
                "7d": (7 * 86400, 3600)}
CHART_TICKS = {900: (180, "%H:%M"), 3600: (600, "%H:%M"), 6 * 3600: (3600, "%H:%M"), 86400: (3 * 3600, "%H:%M"),
               7 * 86400: (86400, "%a %d")}     # x-axis tick spacing and label per range
JOB_SORTS = {"submitted": "id", "priority": "priority", "state": "state", "jobtype": "jobtype",
             "ended": "ts_sto"}


# Defined jobs of a site and jobtype before a job (higher priority, or as high and older): two
# range counts on the claim index, whatever the backlog of other types or sites.
AHEAD = ("SELECT (SELECT COUNT(*) FROM jobs INDEXED BY jobs_claim_type WHERE state='defined' AND site=? "
         "AND jobtype=? AND priority > ?) + (SELECT COUNT(*) FROM jobs INDEXED BY jobs_claim_type "
         "WHERE state='defined' AND site=? AND jobtype=? AND priority = ? AND ts_def < ?)")


def parse_run_range(value):
    """'5010' or '5000-5010' -> (low, high)."""
    match = re.fullmatch(r"\s*(\d{1,9})\s*(?:-\s*(\d{1,9})\s*)?", value)
    if not match:
        raise bad(f"runs: expected a run number or a range such as 5000-5010, got {value!r}")
    low = int(match.group(1))
    return low, int(match.group(2) or low)


PLACED_ERRORS = 20          # /errors says where the 20 most frequent failures happened
FAILURE_WINDOWS = {"1m": 60, "10m": 600, "1h": 3600, "24h": 86400, "7d": 7 * 86400}    # /failures?since=


def tagged_differ(jobs):
    """Whether a file's reprocessed job (TYPE@TAG) ended otherwise than its prompt one (TYPE):
    another state or another verdict."""
    return any(name.partition("@")[0] in jobs and
               (j["state"], j.get("verdict")) != (jobs[name.partition("@")[0]]["state"],
                                                 jobs[name.partition("@")[0]].get("verdict"))
               for name, j in jobs.items() if "@" in name)


def run_verdicts(rows):
    """Each row's run verdict: the worst over the run's files shown and their job types, and
    what made it so (a run of several files is as good as its worst file)."""
    worst = {}
    for r in rows:
        if r["run"] is not None and r["verdict"] and (
                r["run"] not in worst or VERDICTS.index(r["verdict"]) > VERDICTS.index(worst[r["run"]][0])):
            worst[r["run"]] = (r["verdict"], f"{os.path.basename(r['infile'])}: {r['verdict_by']}")
    for r in rows:
        r["run_verdict"], r["run_verdict_by"] = worst.get(r["run"], (None, None))


def row_verdict(jobs):
    """A file's verdict: the worst of its jobs' (the newest of each type), and the job type and
    check that made it so; None until one of them has a verdict."""
    judged = [j for j in jobs if j.get("verdict")]
    worst = max(judged, key=lambda j: VERDICTS.index(j["verdict"]), default=None)
    return {"verdict": worst and worst["verdict"],
            "verdict_by": worst and f"{worst['jobtype']}: {worst['verdict_check']}"}


def failures_since(window, t):
    """Where a /failures window starts: for an hour or more, at the start of the error
    summary's 10-minute bucket, so that its counts agree; a shorter one (the summary's jobs
    ended in the last minute) exactly."""
    seconds = FAILURE_WINDOWS[window]
    return t - seconds if seconds < 3600 else int(t - seconds) // ERROR_BUCKET * ERROR_BUCKET


def most_first(rows):
    return sorted(rows, key=lambda r: (-r["last_1h"], -r["last_24h"]))


def summed(places, keys):
    """Failure counts summed by `keys` of where they ran, most in the last hour first: so the
    node or site behind a burst of failures stands out."""
    totals = {}
    for p in places:
        key = tuple(p[k] for k in keys)
        total = totals.setdefault(key, dict(zip(keys, key), last_1h=0, last_24h=0))
        total["last_1h"] += p["last_1h"]
        total["last_24h"] += p["last_24h"]
    return most_first(totals.values())


def newest_jobs_first_names_in_order(rows):
    """Images (newest first) regrouped: the jobs newest first, each job's images in name order
    (adc_mean_apa1, apa2, apa3), as a shifter reads them."""
    first = {}
    for i, r in enumerate(rows):
        first.setdefault(r["job"], i)
    return sorted((dict(r) for r in rows), key=lambda r: (first[r["job"]], r["name"]))


class Views:
    """The data behind every page; each method returns the dict that the page renders and that
    ?format=json returns as is.

    Methods for the caller (the pages table, PAGES): summary, manual, jobs, job, runs, plots,
    jobtype, errors, failures, pilots, pilot, sites, site, services, service, alarms_page,
    workflows, workflow, dags, dag, datasets, datatypes; metrics for /metrics; and for /file:
    resolve, listing. It reads through the service's store and calls no write operation.
    """

    def __init__(self, service, files_roots, private=(), links=()):
        self.svc, self.store = service, service.store
        self.roots = [os.path.realpath(r) for r in files_roots]
        self.private = {os.path.realpath(p) for p in private}   # never served, whatever the roots
        self.links = list(links)                                # (name, URL) for the summary header

    # -- summary ----------------------------------------------------------------------------------
    def counts(self):
        """(jobs by state, jobs by jobtype then state, pilots by state), from the counts tables."""
        by_state, by_type = {}, {}
        for r in self.store.read("SELECT state, jobtype, n FROM job_counts WHERE n > 0"):
            by_state[r["state"]] = by_state.get(r["state"], 0) + r["n"]
            by_type.setdefault(r["jobtype"], {})[r["state"]] = r["n"]
        pilots = {r["state"]: r["n"] for r in self.store.read("SELECT state, n FROM pilot_counts WHERE n > 0")}
        return by_state, by_type, pilots

    def summary(self, query):
        t = now()
        by_state, by_type, pilots = self.counts()
        caps = {r["name"]: r["cap"] for r in self.store.read("SELECT name, cap FROM jobtypes")}
        return {"time": t, "server": self.server_info(), "jobs_by_state": by_state, "jobs_by_jobtype": by_type,
                "caps": caps, "pilots_by_state": pilots, "ended": self.ended_counts(t),
                "recent_failures": self.recent_failures(10), "errors": self.error_summary(t, 10),
                "activity": self.activity(t, query), "latency": self.start_latency(t),
                "bad_data": self.bad_data_counts(t), "notes": self.svc.list_notes({})["notes"][:20],
                "alarms": self.svc.alarms.raised()["alarms"]}

    def server_info(self):
        """The summary header: where this is, how loaded, and the crew's own links (the shifter
        manual first: this server's /manual unless --link "Shifter manual=URL" points elsewhere)."""
        links = [{"name": n, "url": u} for n, u in self.links]
        if not any(x["name"].lower() == "shifter manual" for x in links):
            links.insert(0, {"name": "Shifter manual", "url": "/manual"})
        return {"host": socket.gethostname(), "load": list(os.getloadavg()), "links": links,
                "backup": self.svc.backups.status() if self.svc.backups else None}

    @staticmethod
    def manual(query):
        """The README's "For the shift crew" section, for the summary's header link."""
        try:
            with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
                text = f.read()
            start = text.index("\n## For the shift crew\n")
            end = text.find("\n## ", start + 1)
            return {"text": text[start:end if end > 0 else None].strip()}
        except (OSError, ValueError):
            return {"text": "README.md (For the shift crew) is not beside server.py; see the p3s repository."}

    def error_summary(self, t, limit=-1, jobtype=None):
        """Failures of the last 24 h by jobtype (or of one) and normalised reason, most frequent
        in the last hour first, from the 10-minute counts (bounded by distinct reasons, never by jobs);
        the first PLACED_ERRORS with their `shown` reason (see unfold_numbers)."""
        rows = self.store.read(
            "SELECT jobtype, reason, SUM(CASE WHEN bucket >= ? THEN n ELSE 0 END) AS last_1h, SUM(n) AS last_24h, "
            "MIN(first) AS first, MAX(last) AS last FROM errors WHERE bucket >= ?"
            f"{' AND jobtype = ?' if jobtype else ''} GROUP BY jobtype, reason "
            "ORDER BY last_1h DESC, last_24h DESC, last DESC LIMIT ?",
            (int(t - 3600) // ERROR_BUCKET, int(t - 86400) // ERROR_BUCKET, *([jobtype] if jobtype else []), limit))
        errors = [dict(r) for r in rows]
        self.unfold_numbers(errors[:PLACED_ERRORS], t)
        return errors

    def jobtype(self, name, query):
        """A job type's page: its counts and cap, its ends over time, what its jobs take (median
        and p95 over time, the last 24 h against the 7 days before) and its errors."""
        if name not in self.known_jobtypes():
            raise ApiError(404, f"jobtype {name!r}: no job of this type")
        t = now()
        activity = self.activity(t, query, jobtype=name)
        counts = {r["state"]: r["n"] for r in self.store.read("SELECT state, n FROM job_counts WHERE jobtype=? AND n > 0",
                                                               (name,))}
        cap = self.store.read_one("SELECT cap FROM jobtypes WHERE name=?", (name,))
        pause = self.store.read_one("SELECT * FROM pauses WHERE jobtype=? AND paused IS NOT NULL", (name,))
        pauses = [dict(r) for r in self.store.read("SELECT ts, new, who, info FROM events INDEXED BY events_uuid "
                                                   "WHERE uuid=? AND job IS NULL ORDER BY id DESC LIMIT 20",
                                                   ("jobtype:" + name,))]
        errors = self.error_summary(t, 50, jobtype=name)
        return {"name": name, "counts": counts, "cap": cap[0] if cap else None, "activity": activity,
                "paused": dict(pause) if pause else None, "pauses": pauses, "plots": self.file_latency(t, name),
                "profile": self.profile(name, "duration", t, activity),
                "profiles": {m: self.profile(name, m, t, activity) for m in ("memory", "cpu_eff")},
                "errors": errors, "time": t}

    def profile(self, jobtype, metric, t, activity):
        """A metric of a job type from its histograms (written, and those counted since the last
        housekeeping pass): median and p95 per chart bucket over the activity's range, and for
        the last 24 h against the 7 days before."""
        step = max(1, activity["bucket"] // PROFILE_BUCKET)
        start = int(t - activity["span"]) // PROFILE_BUCKET
        unflushed = self.svc.costs.unflushed(jobtype, metric, int(t - 8 * 86400) // PROFILE_BUCKET)
        series = {}
        for r in self.store.read("SELECT bucket / ? AS b, bin, SUM(n) AS n FROM profiles WHERE jobtype=? AND metric=? "
                                 "AND bucket >= ? GROUP BY b, bin", (step, jobtype, metric, start)):
            series.setdefault(r["b"], collections.Counter())[r["bin"]] += r["n"]
        for (bucket, bin_), n in unflushed.items():
            if bucket >= start:
                series.setdefault(bucket // step, collections.Counter())[bin_] += n
        width = step * PROFILE_BUCKET
        points = [{"ts": min(t, b * width + width / 2), "from": b * width, "to": b * width + width,
                   "n": sum(h.values()), **dict(zip(("median", "p95"), quantiles(h, 0.5, 0.95)))}
                  for b, h in sorted(series.items())]
        windows = {}
        day, week = int(t - 86400) // PROFILE_BUCKET, int(t - 8 * 86400) // PROFILE_BUCKET
        for label, low, high in (("last_24h", day, day + 10 ** 9), ("previous_7d", week, day)):
            h = collections.Counter({r["bin"]: r["n"] for r in self.store.read(
                "SELECT bin, SUM(n) AS n FROM profiles WHERE jobtype=? AND metric=? AND bucket >= ? AND bucket < ? "
                "GROUP BY bin", (jobtype, metric, low, high))})
            for (bucket, bin_), n in unflushed.items():
                if low <= bucket < high:
                    h[bin_] += n
            median, p95 = quantiles(h, 0.5, 0.95)
            windows[label] = {"n": sum(h.values()), "median": median, "p95": p95}
        return {"metric": metric, "points": points, **windows}

    def errors(self, query):
        t = now()
        errors = self.error_summary(t)
        hour, day = int(t - 3600) // ERROR_BUCKET, int(t - 86400) // ERROR_BUCKET
        for e in errors[:PLACED_ERRORS]:        # where the most frequent ones happened, by index
            e["hosts"] = [dict(r) for r in self.store.read(
                "SELECT site, host, SUM(CASE WHEN bucket >= ? THEN n ELSE 0 END) AS last_1h, SUM(n) AS last_24h "
                "FROM error_places INDEXED BY error_places_error WHERE jobtype = ? AND reason = ? AND bucket >= ? "
                "GROUP BY site, host ORDER BY last_1h DESC, last_24h DESC LIMIT 3", (hour, e["jobtype"], e["reason"], day))]
        places = [dict(r) for r in self.store.read(
            "SELECT site, host, SUM(CASE WHEN bucket >= ? THEN n ELSE 0 END) AS last_1h, SUM(n) AS last_24h "
            "FROM error_hosts WHERE bucket >= ? GROUP BY site, host", (hour, day))]
        return {"time": t, "errors": errors, "by_site": summed(places, ("site",)),
                "by_host": summed(places, ("site", "host"))[:20]}

    def unfold_numbers(self, errors, t):
        """Each error's `shown` reason: the numbers its last 50 failures of the day share (a
        memory limit, a time limit, an exit code), kept; those that differ folded."""
        for e in errors:
            lines = [r["line"] for r in self.store.read(
                "SELECT line FROM attempt_failures INDEXED BY attempt_failures_error WHERE jobtype = ? AND reason = ? "
                "AND ts >= ? ORDER BY ts DESC LIMIT 50", (e["jobtype"], e["reason"], t - 86400))]
            e["shown"] = unfold(e["reason"], lines)

    def failures(self, query):
        """What the error summary counts, one failed attempt a row (a retried job's too), newest
        first, with where it ran and what became of its job. Filters: jobtype and reason (folded,
        as the summary shows it), site, host and state, and the window (`since`, 7d by default:
        all that is kept; see failures_since)."""
        window = as_choice(query.get("since") or "7d", "since", tuple(FAILURE_WINDOWS))     # all that is kept
        if query.get("state"):
            as_choice(query["state"], "state", FAILED_STATES)      # a failed attempt's states only
        where, args = ["f.ts >= ?"], [failures_since(window, now())]
        for key in ("jobtype", "reason", "site", "host", "state"):
            if query.get(key):
                where.append(f"f.{key} = ?")
                args.append(query[key])
        index = "attempt_failures_error" if query.get("jobtype") and query.get("reason") else "attempt_failures_ts"
        limit, offset, page = page_window(query)
        tables, conditions = f"attempt_failures f INDEXED BY {index}", " AND ".join(where)
        rows = [dict(r) for r in self.store.read(
            "SELECT f.*, j.name, j.infile, j.state AS now_state, j.attempt AS now_attempt, j.max_attempts "
            f"FROM {tables} LEFT JOIN jobs j ON j.uuid = f.uuid WHERE {conditions} "
            "ORDER BY f.ts DESC, f.id DESC LIMIT ? OFFSET ?", args + [limit + 1, offset])]
        total = self.store.read_one(f"SELECT COUNT(*) FROM {tables} WHERE {conditions}", args)[0]
        return {"failures": rows[:limit], "page": page, "limit": limit, "more": len(rows) > limit, "total": total,
                "since": window, "filters": {k: query[k] for k in ("jobtype", "reason", "site", "host", "state")
                                             if query.get(k)},
                "choices": {"since": list(FAILURE_WINDOWS), "jobtype": self.known_jobtypes(), "state": FAILED_STATES}}

    def activity(self, t, query=None, jobtype=None):
        """The charts over a range (?range=15m, 1h, 6h, 24h or 7d; by default the shortest that holds
        the server's whole history, so a young server's activity is not a sliver): jobs claimed,
        finished and failed per bucket (from the per-minute counts), and per bucket the last
        per-minute sample of live pilots, running and queued jobs. With `jobtype`: its ends only
        (claims are not counted by type)."""
        name = (query or {}).get("range") or self.default_range(t)
        span, bucket = CHART_RANGES[as_choice(name, "range", tuple(CHART_RANGES))]
        per = bucket // 60          # minutes a bucket
        first = int(t - span) // bucket
        self.store.move_tallies(reading=True)
        bins = {b: {"start": b * bucket, "started": 0, "finished": 0, "failed": 0}
                for b in range(first + 1, int(t) // bucket + 1)}
        late = {"start": 0}     # a bucket begun since `t` (a job ended meanwhile) is left out
        for r in [] if jobtype else self.store.read(
                "SELECT bucket / ? AS b, SUM(n) AS n FROM job_starts WHERE bucket >= ? GROUP BY b", (per, (first + 1) * per)):
            bins.get(r["b"], late)["started"] = r["n"]
        if jobtype:
            for b in bins.values():
                b["started"] = None
        marks = ",".join("?" * len(FAILED_STATES))
        of_type = " AND jobtype = ?" if jobtype else ""
        for r in self.store.read(f"SELECT bucket / ? AS b, state = 'finished' AS good, SUM(n) AS n FROM ends "
                                 f"WHERE bucket >= ? AND state IN ('finished', {marks}){of_type} GROUP BY b, good",
                                 (per, (first + 1) * per, *FAILED_STATES, *([jobtype] if jobtype else []))):
            bins.get(r["b"], late)["finished" if r["good"] else "failed"] = r["n"]
        samples = [dict(r) for r in self.store.read(
            "SELECT MAX(minute) * 60 AS ts, pilots, running, queued FROM samples WHERE minute > ? "
            "GROUP BY minute / ? ORDER BY ts", (int(t - span) // 60, per))]
        return {"range": name, "span": span, "bucket": bucket, "bins": list(bins.values()), "samples": samples}

    def default_range(self, t):
        oldest = self.store.read_one("SELECT MIN(minute) FROM samples")[0]
        age = t - oldest * 60 if oldest is not None else 0
        return next((n for n, (span, _) in CHART_RANGES.items() if age <= span), "24h") if age < 86400 else "24h"

    def bad_data_counts(self, t):
        """Jobs of the last hour whose data was judged bad, by verdict: the index of bad verdicts
        alone, so the summary pays nothing for the good ones."""
        return {r[0]: r[1] for r in self.store.read(
            "SELECT verdict, COUNT(*) FROM jobs INDEXED BY jobs_bad WHERE verdict IN ('BAD', 'INVALID') "
            "AND ts_sto > ? GROUP BY verdict", (t - 3600,))}

    def ended_counts(self, t):
        """Per window: the jobs finished or cancelled (summed from the 10-second buckets), and
        the attempts failed, timed out or pilotTO, a retried job's too, counted as /failures lists
        them in that window."""
        self.store.move_tallies(reading=True)
        return {label: {r["state"]: r["n"] for r in self.store.read(
                    "SELECT state, SUM(n) AS n FROM job_ends WHERE bucket >= ? AND state IN ('finished', 'cancelled') "
                    "GROUP BY state UNION ALL SELECT state, COUNT(*) FROM attempt_failures INDEXED BY "
                    "attempt_failures_ts WHERE ts >= ? GROUP BY state",
                    (int(t - seconds) // 10, failures_since(label, t)))}
                for label, seconds in WINDOWS}

    def recent_failures(self, n):
        rows = []
        for state in FAILED_STATES:     # one indexed LIMIT query per state, merged
            rows += self.store.read("SELECT uuid, name, jobtype, state, exit_code, reason, infile, host, ts_sto "
                                    "FROM jobs WHERE state=? AND ts_sto IS NOT NULL ORDER BY ts_sto DESC LIMIT ?",
                                    (state, n))
        return sorted((dict(r) for r in rows), key=lambda r: -(r["ts_sto"] or 0))[:n]

    def start_latency(self, t):
        samples = [r[0] for r in self.store.read(
            "SELECT ts_sta - ts_def FROM jobs WHERE ts_sta > ? ORDER BY ts_sta DESC LIMIT 10000", (t - 3600,))]
        return {"median_s": median(samples), "samples": len(samples), "window": "1h",
                "plots": self.file_latency(t)}

    def file_latency(self, t, jobtype=None):
        """File to plots: from a file's arrival (its first job) to the end of its last job (of
        `jobtype`, if given), for the files of the last hour whose jobs have all ended: the
        original's goal, "a few minutes". Median and p95 in seconds, and how many files."""
        samples = []
        for r in self.store.read("SELECT infile, ts FROM inputs INDEXED BY inputs_ts WHERE ts > ? "
                                 "ORDER BY ts DESC LIMIT ?", (t - 3600, LATENCY_FILES)):
            ends = self.store.read("SELECT state, ts_sto FROM jobs INDEXED BY jobs_infile WHERE infile=? "
                                   "AND infile != ''" + (" AND jobtype=?" if jobtype else ""),
                                   (r["infile"], jobtype) if jobtype else (r["infile"],))
            if ends and all(e["state"] in END_JOB_STATES and e["ts_sto"] for e in ends):
                samples.append(max(e["ts_sto"] for e in ends) - r["ts"])
        samples.sort()
        p95 = samples[min(len(samples) - 1, int(0.95 * len(samples)))] if samples else None
        return {"median_s": median(samples), "p95_s": p95, "files": len(samples)}

    # -- jobs -------------------------------------------------------------------------------------
    def jobs(self, query):
        states, errors_only = parse_states(query.get("state", ""))
        known = self.check_jobtype(query.get("jobtype", ""))
        where, args = job_conditions(query, states, errors_only)
        sort = as_choice(query.get("sort", "submitted"), "sort", tuple(JOB_SORTS))
        order = as_choice(query.get("order", "desc"), "order", ("asc", "desc"))
        limit, offset, page = page_window(query)
        column = JOB_SORTS[sort]
        if sort == "ended":     # the jobs that ended, from the index of those alone
            where += (" AND " if where else " WHERE ") + "ts_sto IS NOT NULL"
        sql = ("SELECT uuid, name, user, jobtype, state, priority, site, ran_site, attempt, exit_code, reason, infile, "
               f"host, wfuuid, ts_def, ts_sta, ts_sto, cpu_user, cpu_sys, max_rss_mb FROM jobs{where} ORDER BY {column} {order}, id {order} "
               "LIMIT ? OFFSET ?")
        rows = [dict(r) for r in self.store.read(sql, args + [limit + 1, offset])]
        total = None if sort == "ended" else self.cheap_total(query, states, errors_only)
        return {"jobs": rows[:limit], "page": page, "limit": limit, "more": len(rows) > limit,
                "total": total, "sort": sort, "order": order,
                "filters": {k: query[k] for k in JOB_FILTERS if query.get(k)}, "choices": self.job_choices(known)}

    def cheap_total(self, query, states, errors_only):
        """The number of matching jobs when the counts table knows it, else None (no scan)."""
        if errors_only or any(query.get(k) for k in ("site", "ran_site", "host", "infile", "user", "workflow", "age",
                                                     "ended", "reason")):
            return None
        where, args = with_states(*where_equal(query, ("jobtype",)), states)
        return self.store.read_one(f"SELECT COALESCE(SUM(n), 0) FROM job_counts{where}", args)[0]

    def known_jobtypes(self):
        return sorted(self.svc.known_jobtypes())

    def check_jobtype(self, jobtype):
        """The known jobtypes; an unknown `jobtype` is a 400 naming them, not a silent empty list."""
        known = self.known_jobtypes()
        if jobtype and jobtype not in known:
            raise bad(f"jobtype: no job of type {jobtype!r}; known: {', '.join(known) or 'none'}")
        return known

    def job_choices(self, jobtypes):
        """What the job list's drop-downs offer: states, the jobtypes and sites known."""
        sites = {r[0] for r in self.store.read("SELECT name FROM sites UNION SELECT site FROM waiting")}
        return {"state": [*JOB_STATES, *STATE_GROUPS, "error"], "jobtype": jobtypes, "site": sorted(sites - {""}),
                "ran_site": sorted(sites - {""})}

    def job(self, uuid, query):
        job = self.svc.get_job(uuid)
        job["why_waiting"] = self.why_waiting(job)
        job["logs"] = [self.file_link(stream, job[f"{stream}_path"]) for stream in ("stdout", "stderr")
                       if job[f"{stream}_path"]]
        job["files"] = [self.file_link(k, v) for k, v in self.job_paths(job)]
        job["images"] = [dict(r) for r in self.store.read("SELECT name, type, size FROM images WHERE job=? "
                                                          "ORDER BY name", (uuid,))]
        run = run_of(job["infile"])[0] if job["infile"] else None
        job["notes"] = [n for kind, target in (("job", uuid), ("file", job["infile"]), ("run", run))
                        for n in self.notes_of(kind, [target]).get(str(target), [])]
        job["reference"] = self.reference_of(job)
        return job

    def trend(self, jobtype, metric, query):
        """A metric of a job type over run numbers (its newest TREND_POINTS values, younger than
        `age`, in the `runs` range), with its bands and its reference run's value."""
        check_keys(query, "query", ("age", "runs", "format", "refresh"))
        since = now() - parse_age(query["age"]) if query.get("age") else 0
        low, high = parse_run_range(query["runs"]) if query.get("runs") else (0, INT64)
        points = []
        for r in self.store.read("SELECT uuid, value, infile FROM metrics INDEXED BY metrics_trend WHERE jobtype=? "
                                 "AND name=? AND ts > ? ORDER BY ts DESC LIMIT ?", (jobtype, metric, since, TREND_POINTS)):
            run, subrun = run_of(r["infile"])
            if run is not None and low <= run <= high:
                points.append({"job": r["uuid"], "run": run, "subrun": subrun, "value": r["value"]})
        band = self.svc.get_bands(jobtype)["bands"].get(metric)
        ref = self.store.read_one("SELECT r.run, m.value FROM refs AS r JOIN metrics AS m ON m.uuid = r.job "
                                  "AND m.name = ? WHERE r.jobtype = ?", (metric, jobtype))
        return {"jobtype": jobtype, "metric": metric, "points": points, "band": band,
                "reference": dict(ref) if ref else None,
                "filters": {k: query[k] for k in ("age", "runs") if query.get(k)}}

    def reference_of(self, job):
        """The reference run of the job's type (unless this job is it): its job's plot names and
        metrics, for the job page to show beside this job's."""
        ref = self.store.read_one("SELECT * FROM refs WHERE jobtype=?", (job["jobtype"],))
        if ref is None or ref["job"] == job["uuid"]:
            return None
        return {**dict(ref), "images": [r[0] for r in self.store.read(
                    "SELECT name FROM images WHERE job=? ORDER BY name", (ref["job"],))],
                "metrics": {r["name"]: r["value"] for r in self.store.read(
                    "SELECT name, value FROM metrics WHERE uuid=?", (ref["job"],))}}

    def runs(self, query):
        """The run grid: input files (newest first) by job types, each cell the newest job of
        that type on that file, with its state and published images. Paged, bounded: it reads
        the input files' table and each shown file's jobs by index, never every job."""
        known = self.check_jobtype(query.get("jobtype", ""))
        limit, offset, page = page_window(query)
        since = now() - parse_age(query["age"]) if query.get("age") else 0
        streams = self.streams()
        stream = query.get("stream") or (streams[0][0] if len(streams) > 1 else "all")
        files = self.grid_files(since, query.get("runs"), "" if stream == "all" else stream, limit + 1, offset)
        rows, seen = [], set()
        for infile, ts in files[:limit]:
            jobs = {t: dict(j) for t, j in newest_jobs(self.store.read, infile, "uuid, name, jobtype, state, reason, "
                                                       "verdict, verdict_check, verdict_note, ts_def").items()}
            seen |= set(jobs)
            run, subrun = run_of(infile)
            rows.append({"infile": infile, "ts": ts, "run": run, "subrun": subrun, "jobs": jobs,
                         **row_verdict(jobs.values())})
        self.attach_images([j for r in rows for j in r["jobs"].values()])
        self.attach_not_ok([j for r in rows for j in r["jobs"].values()])
        saved = self.store.read_one("SELECT types FROM grid_orders WHERE stream=?", (stream,))
        chosen = [t for t in (query.get("types") or (saved["types"] if saved else "")).split(",") if t]
        types = [query["jobtype"]] if query.get("jobtype") else chosen + sorted(seen - set(chosen))
        run_verdicts(rows)
        runs, files = self.notes_of("run", [r["run"] for r in rows]), self.notes_of("file", [r["infile"] for r in rows])
        for r in rows:
            r["notes"] = runs.get(str(r["run"]), []) + files.get(r["infile"], [])
        if query.get("hide_noted"):
            rows = [r for r in rows if not any(n["hide"] for n in r["notes"])]
        if query.get("verdict"):
            wanted = as_choice(query["verdict"], "verdict", VERDICTS + ("none",))
            rows = [r for r in rows if (r["verdict"] or "none") == wanted]
        if query.get("differ"):
            rows = [r for r in rows if tagged_differ(r["jobs"])]
        bad_cells = {t: sum(1 for r in rows if (r["jobs"].get(t) or {}).get("verdict") in BAD_VERDICTS)
                     for t in types}
        versions = self.versions_of([j["uuid"] for r in rows for j in r["jobs"].values()]) if query.get("runs") else {}
        return {"rows": rows, "types": types, "page": page, "limit": limit, "more": len(files) > limit,
                "bad_cells": bad_cells, "time": now(), "versions": versions, "stream": stream, "saved_order": saved["types"] if saved else "",
                "filters": {k: query[k] for k in ("jobtype", "age", "runs", "types", "verdict", "hide_noted", "stream",
                                                  "differ") if query.get(k)},
                "streams": [{"stream": s, "files": n} for s, n in streams],
                "choices": {"jobtype": known, "verdict": ("",) + VERDICTS + ("none",)}}

    def versions_of(self, uuids):
        """{version variable: {value: jobs}} of these jobs' provenance: what a run was processed
        with, and whether two of its jobs differ."""
        found = {}
        for uuid in uuids[:VERSIONS_READ]:
            row = self.store.read_one(PROVENANCE_OF, (uuid,))
            for name, value in ((json.loads(row[0]).get("versions") or {}) if row else {}).items():
                counts = found.setdefault(name, {})
                counts[str(value)] = counts.get(str(value), 0) + 1
        return found

    FILE_STATUS = {"defined": "waits", "template": "waits", "dispatched": "runs", "running": "runs",
                   "finished": "finished", "cancelled": "cancelled"}

    def files(self, query):
        """The complement of the run grid: each input file of a stream (registered or with jobs,
        newest first) against each job type its stream's files get, saying whether it was never
        submitted, waits, runs, finished or failed after all its attempts. `missing=yes` keeps
        the files where a type was never submitted or failed for good. Bounded: the newest
        FILES_SCAN files."""
        streams = self.streams()
        stream = query.get("stream") or (streams[0][0] if streams else "all")
        seen = {r["infile"]: r["ts"] for r in self.store.read(
            "SELECT infile, ts FROM inputs INDEXED BY inputs_ts ORDER BY ts DESC LIMIT ?", (FILES_SCAN,))}
        for r in self.store.read("SELECT dirpath, name, ts FROM datasets INDEXED BY datasets_loose WHERE wfuuid IS NULL "
                                 "AND origin != 'edge' ORDER BY ts DESC LIMIT ?", (FILES_SCAN,)):
            seen.setdefault(os.path.join(r["dirpath"], r["name"]), r["ts"])
        paths = sorted((p for p in seen if stream == "all" or os.path.dirname(p) == stream), key=seen.get,
                       reverse=True)[:FILES_SCAN]
        rows, types = [], set()
        for path in paths:
            jobs = {t: j for t, j in newest_jobs(self.store.read, path, "jobtype, state").items()
                    if "@" not in t}                      # prompt processing's, not a campaign's
            types |= set(jobs)
            rows.append({"infile": path, "ts": seen[path], "run": run_of(path)[0], "jobs": jobs})
        types = sorted(types)
        for r in rows:
            r["status"] = {t: self.FILE_STATUS.get(r["jobs"][t]["state"], r["jobs"][t]["state"]) if t in r["jobs"]
                           else "never submitted" for t in types}
            r["missing"] = [t for t, s in r["status"].items() if s == "never submitted" or s in FAILED_STATES]
            del r["jobs"]
        if query.get("missing"):
            rows = [r for r in rows if r["missing"]]
        limit, offset, page = page_window(query)
        never = [r["run"] for r in rows if "never submitted" in r["status"].values() and r["run"] is not None]
        failed = [r["run"] for r in rows if set(r["status"].values()) & set(FAILED_STATES) and r["run"] is not None]
        return {"files": rows[offset:offset + limit], "types": types, "stream": stream, "page": page, "limit": limit,
                "more": len(rows) > offset + limit, "total": len(rows),
                "missing_runs": f"{min(never)}-{max(never)}" if never else "",
                "failed_runs": f"{min(failed)}-{max(failed)}" if failed else "",
                "streams": [{"stream": s, "files": n} for s, n in streams],
                "filters": {k: query[k] for k in ("stream", "missing") if query.get(k)}}

    def streams(self):
        """The data streams of the newest STREAM_SCAN input files (their directories), the most
        files first: the run grid shows the main one unless asked, so raw files and a DAG's
        text files, which share no job type, do not interleave."""
        dirs = collections.Counter(os.path.dirname(r["infile"]) for r in self.store.read(
            "SELECT infile FROM inputs INDEXED BY inputs_ts ORDER BY ts DESC LIMIT ?", (STREAM_SCAN,)))
        return sorted(dirs.items(), key=lambda x: (-x[1], x[0]))

    def grid_files(self, since, runs, stream, count, offset):
        """(input file, first seen) newest first, younger than `since`, in the run range and
        the stream if given."""
        if not runs and not stream:
            return [tuple(r) for r in self.store.read(
                "SELECT infile, ts FROM inputs INDEXED BY inputs_ts WHERE ts >= ? ORDER BY ts DESC LIMIT ? OFFSET ?",
                (since, count, offset))]
        low, high = parse_run_range(runs) if runs else (None, None)
        scanned = self.store.read("SELECT infile, ts FROM inputs INDEXED BY inputs_ts WHERE ts >= ? "
                                  "ORDER BY ts DESC LIMIT ?", (since, RUN_SCAN))
        inside = [tuple(r) for r in scanned if (not stream or os.path.dirname(r["infile"]) == stream)
                  and (not runs or low <= (run_of(r["infile"])[0] or -1) <= high)]
        return inside[offset:offset + count]

    def notes_of(self, kind, targets):
        """{target: [notes, newest first]} for these runs, files or jobs: one indexed read each."""
        found = {}
        for target in dict.fromkeys(str(t) for t in targets if t not in (None, "")):
            rows = self.store.read("SELECT * FROM notes INDEXED BY notes_target WHERE kind=? AND target=? "
                                   "ORDER BY id DESC LIMIT 20", (kind, target))
            if rows:
                found[target] = [dict(r) for r in rows]
        return found

    def attach_not_ok(self, jobs):
        """Each job's checks that were not OK, as job["not_ok"] ("check=RESULT"): read only for
        the jobs whose verdict is not OK, so a good grid costs nothing more."""
        for j in jobs:
            j["not_ok"] = [f"{c['name']}={c['result']}" for c in self.store.read(
                "SELECT name, result FROM checks WHERE uuid=? AND result != 'OK' ORDER BY name", (j["uuid"],))
            ] if j.get("verdict") not in (None, "OK") else []

    def attach_images(self, jobs):
        """Each job's published images (names, in name order) as job["images"]."""
        by_uuid = {j["uuid"]: j for j in jobs}
        for j in jobs:
            j["images"] = []
        for chunk in chunks(sorted(by_uuid)):
            for r in self.store.read(f"SELECT job, name FROM images WHERE job IN ({','.join('?' * len(chunk))}) "
                                     "ORDER BY name", chunk):
                by_uuid[r["job"]]["images"].append(r["name"])

    def plots(self, query):
        """The newest published images, per jobtype (or one), optionally of one input file/run
        and younger than an age: the shifter's flip-through of the last runs' plots."""
        known = self.check_jobtype(query.get("jobtype", ""))
        per_type = min(as_int(query.get("limit", 24), "limit", 1), 400)
        conds = [("i.ts >= ?", now() - parse_age(query["age"]))] if query.get("age") else []
        if query.get("infile"):
            conds.append(("i.infile LIKE ? ESCAPE '\\'", "%" + like_escape(query["infile"]) + "%"))
        jobtypes = [query["jobtype"]] if query.get("jobtype") else [
            r[0] for r in self.store.read("SELECT DISTINCT jobtype FROM images ORDER BY jobtype")]
        groups = []
        for jobtype in jobtypes:
            where = " AND ".join(["i.jobtype = ?"] + [c for c, _ in conds])
            rows = self.store.read("SELECT i.job, i.name, i.size, i.infile, i.ts, j.name AS job_name, j.state, "
                                   "j.reason "
                                   f"FROM images i LEFT JOIN jobs j ON j.uuid = i.job WHERE {where} "
                                   "ORDER BY i.id DESC LIMIT ?", [jobtype, *(a for _, a in conds), per_type])
            if rows:
                groups.append({"jobtype": jobtype, "images": newest_jobs_first_names_in_order(rows)})
        return {"groups": groups, "filters": {k: query[k] for k in ("jobtype", "infile", "age") if query.get(k)},
                "choices": {"jobtype": known}}

    @staticmethod
    def job_paths(job):
        """Files a job names: its input file and any absolute path in its environment."""
        paths = [("infile", job["infile"])] if job["infile"] else []
        paths += [(k, v) for k, v in sorted(job["env"].items())
                  if v.startswith("/") and (k, v) != ("P3S_INPUT_FILE", job["infile"])]
        return paths

    def why_waiting(self, job):
        """Plain reasons a job is not running yet; empty once it has started or ended."""
        if job["state"] == "template" and job["wfuuid"]:
            return self.waiting_for_parents(job)
        if job["state"] == "template":
            return ["held in state template: adjust it to defined to release it"]
        if job["state"] != "defined":
            return []
        reasons = self.cap_reasons(job["jobtype"])
        live = self.store.read("SELECT site, jobtypes FROM pilots WHERE state IN (%s)"
                               % ",".join("?" * len(LIVE_PILOT_STATES)), LIVE_PILOT_STATES)
        fits = [p for p in live if (not job["site"] or p["site"] == job["site"])
                and (p["jobtypes"] == "[]" or job["jobtype"] in json.loads(p["jobtypes"]))]
        if not fits:
            where = f" at site {job['site']!r}" if job["site"] else ""
            reasons.append(f"no live pilot takes jobtype {job['jobtype']!r}{where} "
                           f"({len(live)} pilot(s) alive)")
        ahead = sum(self.store.read_one(AHEAD, (site, job["jobtype"], job["priority"], site, job["jobtype"],
                                                job["priority"], job["ts_def"]))[0]
                    for site in dict.fromkeys(("", job["site"])))
        if ahead:
            reasons.append(f"{ahead} waiting job(s) of the same type come first (higher priority or older)")
        return reasons

    def cap_reasons(self, jobtype):
        pause = self.store.read_one("SELECT who, why FROM pauses WHERE jobtype=? AND paused IS NOT NULL", (jobtype,))
        if pause is not None:
            return [f"jobtype {jobtype} is paused by {pause['who']}: {pause['why']} "
                    f"(job.py --resume {jobtype} -m WHY resumes it)"]
        cap = self.store.read_one("SELECT cap FROM jobtypes WHERE name=?", (jobtype,))
        if cap is None:
            return []
        active = self.store.read_one("SELECT COALESCE(SUM(n), 0) FROM job_counts WHERE jobtype=? AND state IN "
                                     "('dispatched', 'running')", (jobtype,))[0]
        if cap[0] == 0:
            return [f"jobtype {jobtype} is suspended (cap 0): job.py -l -L N -T {jobtype} resumes it"]
        if active >= cap[0]:
            return [f"jobtype {jobtype} is at its cap of {cap[0]} ({active} running)"]
        return []

    def waiting_for_parents(self, job):
        wf = self.store.read_one("SELECT state FROM workflows WHERE uuid=?", (job["wfuuid"],))
        if wf and wf["state"] == "template":
            return [f"its workflow has not been started (workflow.py -m -u {job['wfuuid']} -s defined)"]
        parents = self.store.read("SELECT j.vertex, j.state FROM datasets d JOIN jobs j ON j.uuid = d.producer "
                                  "WHERE d.consumer=? AND j.state != 'finished' ORDER BY j.vertex", (job["uuid"],))
        return ["parents not finished: " + ", ".join(f"{p['vertex']} ({p['state']})" for p in parents)]

    # -- workflows --------------------------------------------------------------------------------
    def workflows(self, query):
        """Workflows with their progress (vertices finished of all) and their first failure."""
        listing = self.svc.workflows.list_workflows(query)
        by_uuid = {w["uuid"]: dict(w, done=0, vertices=0, failure=None) for w in listing["workflows"]}
        for chunk in chunks(sorted(by_uuid)):
            marks = ",".join("?" * len(chunk))
            for r in self.store.read(f"SELECT wfuuid, SUM(state = 'finished') AS done, COUNT(*) AS n FROM jobs "
                                     f"INDEXED BY jobs_wf WHERE wfuuid IN ({marks}) GROUP BY wfuuid", chunk):
                by_uuid[r["wfuuid"]].update(done=r["done"], vertices=r["n"])
            for r in self.store.read(f"SELECT wfuuid, uuid, vertex, state, reason FROM jobs INDEXED BY jobs_wf "
                                     f"WHERE wfuuid IN ({marks}) AND state IN ('failed', 'timeout', 'pilotTO')", chunk):
                by_uuid[r["wfuuid"]]["failure"] = by_uuid[r["wfuuid"]]["failure"] or dict(r)
        users = [r[0] for r in self.store.read("SELECT DISTINCT user FROM workflows ORDER BY user LIMIT 100")]
        dags = [r[0] for r in self.store.read("SELECT name FROM dags ORDER BY name")]
        return {**listing, "workflows": [by_uuid[w["uuid"]] for w in listing["workflows"]],
                "choices": {"state": ["template", "defined", "running", "finished", "failed", "cancelled"],
                            "dag": dags, "user": users}}

    def workflow(self, uuid, query):
        return self.svc.workflows.get_workflow(uuid)

    def dags(self, query):
        return self.svc.workflows.list_dags()

    def dag(self, name, query):
        """A DAG template: its vertices, its edges with their datatypes, and its workflows."""
        dag = self.svc.workflows.get_dag(name)
        dag["workflows"] = self.workflows({"dag": name, "limit": "25"})["workflows"]
        return dag

    def datatypes(self, query):
        return self.svc.workflows.list_datatypes()

    def datasets(self, query):
        """One row per file, with the work it started or belongs to: its workflow, the jobs that
        write and read it, or the jobs an injector started for it (found by their input file)."""
        listing = self.svc.workflows.list_datasets(query)
        names = {}
        uuids = sorted({u for d in listing["datasets"] for u in (d["producer"], d["consumer"]) if u})
        for chunk in chunks(uuids):
            names.update((r["uuid"], r["vertex"] or r["name"]) for r in self.store.read(
                f"SELECT uuid, vertex, name FROM jobs WHERE uuid IN ({','.join('?' * len(chunk))})", chunk))
        for d in listing["datasets"]:
            d["producer_name"], d["consumer_name"] = names.get(d["producer"]), names.get(d["consumer"])
        return listing

    # -- pilots -----------------------------------------------------------------------------------
    def pilots(self, query):
        rows, paging = page_of(self.store, "pilots", query, ("state", "site", "host"), since=("ended", "ts_stop"))
        t = now()
        pilots = [pilot_view(r, t) for r in rows]
        current = {p["job"] for p in pilots if p["job"]}
        jobs = {}
        for chunk in chunks(sorted(current)):
            jobs.update((r["uuid"], dict(r)) for r in self.store.read(
                f"SELECT uuid, name, infile FROM jobs WHERE uuid IN ({','.join('?' * len(chunk))})", chunk))
        for p in pilots:
            p["current"] = jobs.get(p["job"])
        sites = [r[0] for r in self.store.read("SELECT name FROM sites ORDER BY name")]
        return {"pilots": pilots, **paging, "choices": {"state": [*LIVE_PILOT_STATES, "lost", "stopped"], "site": sites}}

    def pilot(self, uuid, query):
        with self.store.reading() as conn:
            row = lookup(conn, "pilots", uuid)
        pilot = pilot_view(row, now())
        pilot["logs"] = [self.file_link("pilot log", row["log"])] if row["log"] else []
        pilot["recent_jobs"] = [dict(r) for r in self.store.read(
            "SELECT uuid, name, jobtype, state, exit_code, ts_sta, ts_sto FROM jobs WHERE pilot=? "
            "ORDER BY id DESC LIMIT 50", (uuid,))]
        pilot["events"] = [dict(e) for e in self.store.read(
            "SELECT ts, old, new, who, info FROM events INDEXED BY events_uuid WHERE uuid=? AND job IS NULL "
            "ORDER BY id", (uuid,))]
        return pilot

    # -- metrics ----------------------------------------------------------------------------------
    def metrics(self, query):
        _, by_type, pilots = self.counts()
        return {"jobs": [{"state": s, "jobtype": jt, "n": n} for jt, states in
                         sorted(by_type.items()) for s, n in sorted(states.items())],
                "pilots": pilots, "counters": dict(self.svc.broker.counters, commits=self.svc.store.commits,
                                                   write_blocks=self.svc.store.blocks),
                "waiting_requests": self.svc.broker.waiting, "costs": self.svc.costs.snapshot(),
                "claim_latency": self.svc.broker.latency_histogram(),
                "alarms": {a["name"]: a["severity"] for a in reversed(self.svc.alarms.raised()["alarms"])
                           if not a.get("explained_by") and not a.get("pending")},
                "backup": self.svc.backups.status() if self.svc.backups else None}

    def services(self, query):
        return self.svc.list_services()

    def alarms_page(self, query):
        return {**self.svc.alarms.raised(), **self.svc.alarms.history(query)}

    def service(self, name, query):
        return self.svc.get_service(name)

    # -- sites ------------------------------------------------------------------------------------
    def sites(self, query):
        t = now()
        return {"sites": [{**site, **self.svc.site_figures(site, t)} for site in self.svc.list_sites()["sites"]]}

    def site(self, name, query):
        site = self.svc.get_site(name)
        rows, paging = page_of(self.store, "pilots", {**query, "site": name}, ("site", "state"))
        said = self.store.read_one("SELECT result, ts FROM service_lines WHERE name=? ORDER BY id DESC LIMIT 1",
                                   (f"factory {name}",))
        return {**site, **paging, "pilots_list": [pilot_view(r, now()) for r in rows],
                "factory_said": dict(said) if said else None}

    # -- files ------------------------------------------------------------------------------------
    def resolve(self, path):
        """The real path of `path` if it lies under a files root (after resolving '..' and
        symlinks) and is not the server's own token or database; a 400 or 403 otherwise. For
        links only: what is served is checked again once opened (open_checked)."""
        if not path or "\0" in path or not os.path.isabs(path) or len(path) > 4096:
            raise bad(f"path: must be an absolute path of at most 4096 characters, got {path[:100]!r}")
        real = os.path.realpath(path)
        self.check_shown(path, real, None)
        return real

    def check_shown(self, path, real, st):
        """403 unless `real` lies under a root and is not private (by name, and by device and
        inode when `st` is given, so a hard link to the token is refused too)."""
        if real in self.private or (st is not None and (st.st_dev, st.st_ino) in self.private_ids()):
            raise ApiError(403, f"path: {path} is the server's own token or database")
        if not any(os.path.commonpath([real, root]) == root for root in self.roots):
            raise ApiError(403, f"path: {path} is outside the files roots this server may show")

    def private_ids(self):
        ids = set()
        for p in self.private:
            try:
                st = os.stat(p)
                ids.add((st.st_dev, st.st_ino))
            except OSError:
                pass
        return ids

    def open_checked(self, path):
        """(fd, stat) of `path`, opened first and then checked, so a symlink swapped in after a
        check cannot lead outside the roots: what was opened must be a regular file or a
        directory, under a root, and not private. O_NONBLOCK: a FIFO cannot pin a thread."""
        self.resolve(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ApiError(404, f"path: {path} does not exist") from None
        except OSError as e:
            raise ApiError(403, f"path: {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise ApiError(403, f"path: {path} is not a regular file or a directory")
            self.check_shown(path, os.path.realpath(f"/proc/self/fd/{fd}"), st)
            return fd, st
        except BaseException:
            os.close(fd)
            raise

    def file_link(self, label, path):
        try:
            real = self.resolve(path)
        except ApiError:
            return {"label": label, "path": path, "url": None}
        url = "/file?" + urlencode({"path": path}) if os.path.exists(real) else None
        return {"label": label, "path": path, "url": url}

    def listing(self, fd, path):
        """The entries of the directory open as `fd` (shown as `path`), private files left out."""
        private = self.private_ids()
        entries = []
        for name in sorted(os.listdir(fd))[:5000]:
            try:
                st = os.stat(name, dir_fd=fd)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in private:
                continue
            entries.append({"name": name, "path": os.path.join(path, name), "dir": stat.S_ISDIR(st.st_mode),
                            "size": st.st_size, "mtime": st.st_mtime})
        return {"path": path, "entries": entries}


################################################################################################
# HTML pages: pure renderers, plain HTML and a little CSS, no JavaScript. Every value goes
# through esc().
################################################################################################
CSS = """body{font:14px/1.4 sans-serif;margin:0 1.5em 2em}nav{background:#234;padding:.5em 1.5em;margin:0 -1.5em 1em}
nav a{color:#fff;margin-right:1.2em;text-decoration:none;font-weight:bold}table{border-collapse:collapse;margin:.5em 0 1.2em}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}th{background:#eee}
th a{color:#000}.num{text-align:right}pre{background:#f6f6f6;border:1px solid #ddd;padding:.5em;overflow:auto;max-height:30em}
.alarm{background:#c00;color:#fff;padding:.4em .8em;margin:.3em 0;font-weight:bold}.alarm a{color:#fff}
.alarm.warn{background:#fff3cd;color:#533;font-weight:normal;border-left:4px solid #e0a800}.alarm.warn a{color:#533}
.alarm.acked{background:#ddd;color:#555;font-weight:normal}.alarm.acked a{color:#555}
details.warnings{margin:.3em 0;padding:.3em .8em;background:#fff3cd;border-left:4px solid #e0a800}
details.warnings summary{cursor:pointer;font-weight:bold;color:#533}
.s-finished{color:#070}.s-failed,.s-timeout,.s-pilotTO,.s-lost{color:#c00;font-weight:bold}
.s-running,.s-dispatched{color:#06c}.s-cancelled,.s-stopped{color:#777}.s-defined,.s-nojobs,.s-active{color:#960}
.why{background:#ffd;border:1px solid #cc8;padding:.4em .8em}form{margin:.5em 0}label{margin-right:.8em}
.bad,.bad a{color:#c00;font-weight:bold}.head{color:#555;margin:0 0 .6em}h1+.head{margin-top:-.6em}.refresh{float:right;color:#cde}
.refresh a{margin:0 0 0 .6em;font-weight:normal}.chart{margin:.2em 1.5em .8em 0;display:inline-block;vertical-align:top}
.thumbs a{display:inline-block;margin:0 .6em .6em 0;text-align:center;font-size:12px}
.thumbs img{display:block;max-width:260px;max-height:200px;border:1px solid #ccc;background:#fff}
.cards{display:flex;flex-wrap:wrap;gap:.6em}.card{border:1px solid #ddd;padding:.3em .4em;max-width:100%}
.card-head{font-size:12px;margin-bottom:.2em;max-width:66em;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.card .thumbs img{max-width:200px;max-height:150px}.bad-card{border-color:#c00;background:#fff5f5}
.thumbs.bad-job img{border:3px solid #c00;opacity:.75}.thumbs.bad-job a{color:#c00}
.reason{max-width:40em}table.list td{white-space:nowrap}
table.grid td{padding:2px 4px}.cell{display:block;padding:2px 6px;color:#000;text-decoration:none;border-radius:2px}
.g-finished{background:#cfc}.g-failed,.g-timeout,.g-pilotTO{background:#f99;font-weight:bold}
.g-none{color:#888;border:1px dashed #bbb}.g-running,.g-dispatched{background:#cde8ff}.g-defined,.g-template{background:#ffe9a8}.g-cancelled{background:#ddd}
.strip img{height:40px;margin:2px 2px 0 0;border:1px solid #ccc}table.list .reason,table.list .cut{display:inline-block;max-width:17em;overflow:hidden;text-overflow:ellipsis;
vertical-align:bottom}table.list .cut{max-width:13em}table.list td{padding:2px 5px}
.v{display:inline-block;padding:0 5px;border-radius:2px;font-size:12px;font-weight:bold;color:#fff;margin-left:3px}
.v-OK{background:#080}.v-WARNING{background:#c80}.v-BAD{background:#c00}.v-INVALID{background:#707}
.v-none{background:#fff;color:#777;border:1px solid #bbb;font-weight:normal}
.note{background:#eef;border-left:3px solid #66c;padding:1px 5px;margin:2px 0;font-size:13px;max-width:40em}
nav .who{float:right;color:#cde;margin-left:1.5em}nav .who a{margin:0}nav form{display:inline;margin:0 0 0 .4em}
form.act{display:inline-block;margin:.2em .6em .2em 0}.signin{color:#777;font-size:13px;margin-right:.6em}
.actions{background:#f4f6fa;border:1px solid #dde;padding:.3em .6em;margin:.5em 0}
.why-cell{display:-webkit-box;-webkit-line-clamp:2;-webkit-box-orient:vertical;font-weight:normal;font-size:11px;
max-width:16em;overflow:hidden;overflow-wrap:anywhere}"""
NAV = (("/", "Summary"), ("/runs", "Runs"), ("/files?missing=yes", "Missing"), ("/jobs", "Jobs"), ("/pilots", "Pilots"), ("/sites", "Sites"), ("/workflows", "Workflows"),
       ("/dags", "DAGs"), ("/datasets", "Datasets"), ("/errors", "Errors"), ("/plots", "Plots"),
       ("/services", "Services"), ("/alarms", "Alarms"))
REFRESH_CHOICES = (("never", ""), ("10 s", "10"), ("30 s", "30"), ("1 min", "60"))


def link(href, text):
    return f'<a href="{esc(href)}">{esc(text)}</a>'


# How a page says a state where its API name would mislead: a pilot with "no jobs" is idle.
STATE_WORDS = {"no jobs": "idle"}


def state_cell(state):
    word = STATE_WORDS.get(state, state)
    return f'<span class="s-{esc(re.sub(r"[^A-Za-z]", "", state or ""))}">{esc(word)}</span>'


def verdict_badge(verdict, title=""):
    """A verdict as a badge that reads without colour (its word) and without hover."""
    return (f'<span class="v v-{esc(verdict)}" title="{esc(title)}">{esc(verdict)}</span>' if verdict in VERDICTS
            else "")


def note_line(note, short=False):
    """A person's note as a line: the text (cut on the run grid, whole on hover), who, when."""
    text = note["text"] if not short or len(note["text"]) <= 60 else note["text"][:57] + "..."
    hidden = " (hidden from the run grid on request)" if note["hide"] and not short else ""
    return (f'<div class="note" title="{esc(note["text"])}">&#9998; {esc(text)} '
            f'<small>{esc(note["who"])}, {esc(short_when(note["ts"]))}{esc(hidden)}</small></div>')


def no_verdict_why(job):
    """Why a job has no verdict, in words: a failed job never shows OK."""
    if job.get("verdict") or job["state"] in ("template", "defined", "dispatched", "running"):
        return ""
    if job["state"] != "finished":
        return "no verdict: the job did not finish"
    return f"no verdict: {job['verdict_note']}" if job.get("verdict_note") else ""  # none asked: none said


def short_when(ts, today=None):
    """A date on one line in a list: the time alone for today, else the day and minute."""
    try:
        if not ts:
            return ""
        local = time.localtime(ts)
        if time.strftime("%Y-%m-%d", local) == (today or time.strftime("%Y-%m-%d")):
            return time.strftime("%H:%M:%S", local)
        return time.strftime("%Y-%m-%d %H:%M", local)
    except (OverflowError, OSError, ValueError, TypeError):
        return "?"


def when(ts):
    """A date as pages show it; any stored value renders (an absurd one as "?")."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""
    except (OverflowError, OSError, ValueError, TypeError):
        return "?"


def ago(seconds):
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def table(headers, rows, kind=""):
    """headers: safe HTML strings; rows: lists of safe HTML cells (escape before passing).
    kind "list": one line a row (long cells cut, their text on hover)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{kind}"><tr>{head}</tr>{body}</table>' if body else "<p><i>none</i></p>"


class PageQuery(dict):
    """A page's query parameters, and what is never in its URL: `viewer`, the signed-in
    session that views it (a Viewer, or None), whose role the renderers offer actions by, and
    `target`, the page's own path and query, where an action's form comes back to."""
    viewer, target = None, "/"


Viewer = collections.namedtuple("Viewer", "caller csrf")


def action_form(query, action, fields, button, why="", role=SHIFTER, extra=""):
    """A form that POSTs one page action (see PAGE_ACTIONS) for the signed-in viewer, with its
    CSRF token and the page to come back to; `why`: the placeholder of a required reason, `extra`
    more inputs. Empty for a viewer whose role may not act; a sign-in link for nobody signed in."""
    viewer = getattr(query, "viewer", None)
    if viewer is None:
        return f'<span class="signin">{link(href("/signin", next=getattr(query, "target", "/")), "sign in")} to {esc(button.lower())}</span>'
    if not viewer.caller.may(role):
        return ""
    hidden = {"action": action, "csrf": viewer.csrf, "back": query.target, **fields}
    inputs = "".join(f'<input type="hidden" name="{esc(k)}" value="{esc(v)}">' for k, v in hidden.items())
    reason = f'<input name="why" required maxlength="300" size="28" placeholder="{esc(why)}"> ' if why else ""
    return (f'<form class="act" method="post" action="/act">{inputs}{extra}{reason}'
            f'<button type="submit">{esc(button)}</button></form>')


def viewer_nav(query):
    """The nav bar's right end: who is signed in, with sign-out, or the sign-in link."""
    viewer = getattr(query, "viewer", None)
    if viewer is None:
        return f'<span class="who">{link(href("/signin", next=getattr(query, "target", "/")), "sign in")}</span>'
    return (f'<span class="who">{esc(viewer.caller.name)} ({esc(viewer.caller.role)}) '
            f'<form method="post" action="/signout"><input type="hidden" name="csrf" value="{esc(viewer.csrf)}">'
            '<button type="submit">sign out</button></form></span>')


def page(title, body, query):
    refresh = query.get("refresh", "")
    meta = (f'<meta http-equiv="refresh" content="{int(refresh)}">'
            if refresh.isascii() and refresh.isdigit() and len(refresh) <= 4 and 0 < int(refresh) <= 3600 else "")
    nav = "".join(link(href, text) for href, text in NAV) + viewer_nav(query)
    nav += '<span class="refresh">refresh:' + "".join(
        f" <b>{esc(label)}</b>" if refresh == value else link(with_query(query, refresh=value), label)
        for label, value in REFRESH_CHOICES) + "</span>"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'>{meta}<title>p3s: {esc(title)}</title>"
            f"<style>{CSS}</style></head><body><nav>{nav}</nav><h1>{esc(title)}</h1>{body}"
            f"<p><small>p3s {VERSION} · {esc(when(now()))} · {link('?' + urlencode({**query, 'format': 'json'}), 'JSON')}"
            f" · {link('/metrics', 'metrics (Prometheus)')} · {link('/api/health', 'health')}</small></p></body></html>")


def href(path, **params):
    """A link with its query parameters URL-encoded (names may hold '&', '#', spaces)."""
    return path + "?" + urlencode(params)


def with_query(query, **changes):
    merged = {k: v for k, v in {**query, **changes}.items() if v not in (None, "")}
    return "?" + urlencode(merged)


def pager(data, query, noun="jobs"):
    parts = []
    if data["page"] > 1:
        parts.append(link(with_query(query, page=data["page"] - 1), "← newer page"))
    parts.append(f"page {data['page']}")
    if data.get("total") is not None:
        parts.append(f"of {max(1, -(-data['total'] // data['limit']))} ({data['total']} {noun})")
    if data["more"]:
        parts.append(link(with_query(query, page=data["page"] + 1), "next page →"))
    sizes = " ".join(f"<b>{n}</b>" if n == data["limit"] else link(with_query(query, limit=n, page=None), n)
                     for n in PER_PAGE)
    return "<p>" + " · ".join(parts) + f" · per page: {sizes}</p>"


def cap_text(cap):
    return "" if cap is None else "suspended" if cap == 0 else f"at most {cap}"


def count_cell(n, url, bad_state=False):
    """A count in a table: a link unless zero; failures that happened in red."""
    if not n:
        return "0"
    return f'<span class="bad">{link(url, n)}</span>' if bad_state else link(url, n)


def server_header(d):
    info = d["server"]
    links = "".join(" · " + link(x["url"], x["name"]) for x in info["links"])
    return (f'<p class="head">{esc(info["host"])} · updated {esc(when(d["time"]))} · load '
            f'{esc(" ".join(f"{x:.2f}" for x in info["load"]))}{backup_text(info.get("backup"))}{links}</p>')


def backup_text(backup):
    """The summary's word on the backups: the newest good copy's age, or that the last failed."""
    if not backup:
        return ""
    if backup["error"]:
        return ' · <span class="bad">backup failed</span>'
    return " · backup " + (esc(ago(backup["age"])) + " ago" if backup["age"] is not None else "none yet")


def render_summary(d, query):
    states = [s for s in JOB_STATES if s in d["jobs_by_state"]]
    alarms = alarm_bars(d["alarms"], d["time"], query)
    caps = d.get("caps", {})
    type_rows = [[link(f"/jobtype/{quote(jt, safe='')}", jt)] +
                 [count_cell(counts.get(s, 0), href("/jobs", jobtype=jt, state=s), s in FAILED_STATES)
                  for s in states] + [esc(sum(counts.values())), esc(cap_text(caps.get(jt)))]
                 for jt, counts in sorted(d["jobs_by_jobtype"].items())]
    all_row = ([["<b>all</b>"] + [count_cell(d["jobs_by_state"][s], href("/jobs", state=s), s in FAILED_STATES)
                                  for s in states] + [esc(sum(d["jobs_by_state"].values())), ""]])
    by_type = table(["jobtype"] + [state_cell(s) for s in states] + ["total", "cap"], type_rows + all_row)
    pilots = table([state_cell(s) for s in d["pilots_by_state"]],
                   [[link(href("/pilots", state=s), n) for s, n in d["pilots_by_state"].items()]])
    ended = table(["in the last", "finished", "failed", "timeout", "pilotTO", "cancelled"],
                  [[esc(w)] + [count_cell(c.get(s, 0), href("/failures", state=s, since=w) if s in FAILED_STATES
                                          else href("/jobs", state=s, ended=w), s in FAILED_STATES)
                               for s in END_JOB_STATES] for w, c in d["ended"].items()])
    lat = d["latency"]
    latency = (f"<p>Submit-to-start latency, median over the last hour: <b>{lat['median_s'] * 1000:.0f} ms</b> "
               f"({lat['samples']} jobs)</p>" if lat["median_s"] is not None
               else "<p>No job started in the last hour.</p>") + plots_latency(lat.get("plots"))
    failures = table(["ended", "job", "jobtype", "input file", "state", "exit code", "host", "reason"],
                     [[esc(short_when(f["ts_sto"])), link(f"/job/{f['uuid']}", f["name"] or f["uuid"][:8]),
                       esc(f["jobtype"]), infile_cell(f["infile"]), state_cell(f["state"]), esc(f["exit_code"]),
                       esc(f["host"]), reason_cell(f["reason"])] for f in d["recent_failures"]])
    notes = ("<h2>Notes of the last 12 hours</h2>" + "".join(
        note_line(n) + f"<small>on {esc(n['kind'])} {esc(n['target'])}</small>" for n in d["notes"])
        if d.get("notes") else "")
    body = (f"{server_header(d)}{alarms}{data_line(d.get('bad_data', {}))}{notes}"
            f"{activity_charts(d['activity'], d['time'], query)}<h2>Jobs by type and state</h2>{by_type}"
            f"<h2>{link('/errors', 'Errors')} (top 10, last 24 h)</h2><p class='head'>every failed attempt, "
            f"the retried ones too (a count opens them, with what became of each job)</p>{error_table(d['errors'])}"
            f"<h2>Recent failures</h2>{failures}<h2>Pilots</h2>{pilots}<h2>Jobs ended</h2>"
            f"<p class='head'>failed, timeout and pilotTO count every attempt, a retried job's too; a count "
            f"opens what it counts</p>{ended}{latency}")
    return page("Summary", body, query)


def data_line(bad):
    """Is the data good? One line under the alarms: the files judged BAD or INVALID in the last
    hour, each count opening them on the run grid; or that none was."""
    if not bad:
        return "<p>Data of the last hour: <b>no file judged BAD or INVALID</b> by its checks.</p>"
    counts = " and ".join(link(href("/runs", verdict=v, age="1h"), f"{bad[v]} {v}") for v in BAD_VERDICTS if bad.get(v))
    return f"<p class='bad'>Data of the last hour: {counts} (jobs judged by their checks)</p>"


def plots_latency(lat):
    """File to plots, in one line: how long after a file arrives its last job has ended."""
    if not lat or lat["median_s"] is None:
        return ""
    return (f"<p>File to plots (a file's arrival to the end of its last job), last hour: median "
            f"<b>{ago(lat['median_s'])}</b>, p95 {ago(lat['p95_s'])} ({lat['files']} files)</p>")


def alarm_since(a, t):
    return f"since {time.strftime('%H:%M', time.localtime(a['since']))} ({ago(t - a['since'])})"


def ack_text(ack):
    if not ack:
        return ""
    until = f" until {when(ack['until'])}" if ack["until"] else " until it clears"
    return f"{'acknowledged' if ack['kind'] == 'ack' else 'silenced'} by {ack['who']}{until}: {ack['why']}"


def alarm_bar(a, t, query):
    """One alarm as a bar: its message (a link to what it counts), since when, and who is on it;
    a critical still pending its hold in amber, saying so; acknowledge and silence, signed in."""
    parts = [link(a["link"], a["message"]), esc(alarm_since(a, t))]
    if a.get("pending"):
        parts.append("<b>pending</b>: raised and sent if it lasts")
    if a["ack"]:
        parts.append(esc(ack_text(a["ack"])))
    kind = ("alarm acked" if a["ack"] else "alarm warn" if a.get("pending") or a["severity"] != "critical"
            else "alarm")
    acts = "" if a["ack"] else alarm_actions(a, query)
    return f'<div class="{kind}">{" · ".join(parts)}{acts}</div>'


def alarm_actions(a, query):
    """Acknowledge (until it clears) or silence (for a while) this alarm, with a reason."""
    scope = {"name": a["name"], "site": a.get("site") or "", "jobtype": a.get("jobtype") or ""}
    if getattr(query, "viewer", None) is None:
        return " · " + action_form(query, "ack", scope, "Acknowledge")
    return (" " + action_form(query, "ack", scope, "Acknowledge", why="why: who is on it")
            + action_form(query, "silence", {**scope, "for": "2h"}, "Silence 2 h", why="why silence it"))


def alarm_bars(alarms, t, query):
    """The summary's alarms: each critical as its own bar, the warnings in one line that opens
    to their list (no JavaScript: <details>); alarms explained by another are left out."""
    shown = [a for a in alarms if not a.get("explained_by")]
    critical = [a for a in shown if a["severity"] == "critical"]       # a pending one too: seen at once
    warnings = [a for a in shown if a["severity"] != "critical"]
    bars = "".join(alarm_bar(a, t, query) for a in critical)
    if warnings:
        bars += (f'<details class="warnings"><summary>{len(warnings)} warning{"s" * (len(warnings) > 1)} · '
                 f'{link("/alarms", "all alarms and their history")}</summary>'
                 + "".join(alarm_bar(a, t, query) for a in warnings) + "</details>")
    return bars


def render_signin(query, error=""):
    """The sign-in page: a token once, then a session cookie (see Handler.sign_in)."""
    viewer = getattr(query, "viewer", None)
    said = f'<p class="why">{esc(error)}</p>' if error else ""
    now_in = (f"<p>Signed in as <b>{esc(viewer.caller.name)}</b> ({esc(viewer.caller.role)}).</p>"
              if viewer else "")
    form = (f'<form method="post" action="/signin"><input type="hidden" name="next" '
            f'value="{esc(local_path(query.get("next", "/")))}"><label>token <input type="password" name="token" '
            'required size="48" autocomplete="current-password"></label> <button type="submit">sign in</button></form>')
    return page("Sign in", said + now_in + form + "<p>Your token is the file <code>server.py --add-user</code> wrote "
                "for you (the one <code>P3S_TOKEN_FILE</code> names). Signed in, the pages let you act as that "
                "user: a shifter retries, cancels, acknowledges, notes and pauses; an expert and an admin do "
                "more. Reading needs no sign-in unless the server runs with <code>--private-pages</code>.</p>",
                query)


def render_confirm(action, fields, result, query):
    """What a page action would do (its dry run), and the button that does it."""
    jobs = result["jobs"]
    rows = [[link(f"/job/{j['uuid']}", j["uuid"][:8]), esc(j["jobtype"]), infile_cell(j["infile"]),
             state_cell(j["state"]), j["attempt"]] for j in jobs]
    what = f"{len(jobs)} failed job(s) of {result['jobtype'] or 'every job type'} in runs {result['runs']}"
    confirm = action_form(query, action, {k: fields.get(k, "") for k in ("jobtype", "runs", "why")} | {"confirm": "1"},
                          f"Retry these {len(jobs)} jobs") if jobs else "<p>Nothing to do.</p>"
    return page("Confirm: retry", f"<p>This will retry {esc(what)}, each as a new attempt:</p>"
                + table(["job", "type", "input", "state", "attempt"], rows) + confirm
                + f"<p>{link(query.target, '← back, do nothing')}</p>", query)


def render_manual(d, query):
    return page("Shifter manual", f'<pre style="white-space:pre-wrap;max-width:110em">{esc(d["text"])}</pre>', query)


def render_alarms(d, query):
    t = now()
    current = table(["severity", "alarm", "name (alarm.py --ack)", "since", "explained by",
                     "acknowledged / silenced"],
                    [[("critical, pending" if a.get("pending") else '<span class="s-failed">critical</span>')
                      if a["severity"] == "critical" else esc("warning"),
                      link(a["link"], a["message"]), f"<code>{esc(Alarms.ack_name(a))}</code>", esc(alarm_since(a, t)),
                      esc(a.get("explained_by", "")), esc(ack_text(a["ack"])) or alarm_actions(a, query).lstrip(" ·")]
                     for a in d["alarms"]])
    history = table(["time", "event", "alarm", "severity", "message", "who", "why"],
                    [[esc(when(e["ts"])), esc(e["kind"]), esc(e["key"]), esc(e["severity"]), esc(e["message"]),
                      esc(e["who"]), esc(e["why"])] for e in d["events"]])
    body = (f"<h2>Now</h2>{current}<p><small>Acknowledge or silence with <code>alarm.py --ack NAME -m WHY</code> "
            f"or <code>alarm.py --silence NAME --for 2h -m WHY</code>.</small></p>"
            f"<h2>History</h2>{filter_form(('age',), query, {})}{history}")
    return page("Alarms", body, query)


def percent(value):
    return "" if value is None else f"{value:.0f} %"


def megabytes(value):
    return "" if value is None else f"{value:,.0f} MB"


def job_name_cell(job):
    name = job["name"] or job["uuid"][:8]
    return f'<span class="cut" title="{esc(name)}">{link("/job/" + job["uuid"], name)}</span>'


def infile_cell(path, as_run=True):
    """An input file in a list's narrow column: its run and subrun when its name has them (what
    tells two DQM files apart, never cut off), else (or not `as_run`) its name; the whole path on
    hover."""
    if not path:
        return ""
    shown = infile_label(path) if as_run else os.path.basename(path)
    return f'<span class="cut" title="{esc(path)}">{esc(shown)}</span>'


def ran_at_cell(job):
    """Where the job ran: its pilot's site and host (each a filter link), nothing before."""
    parts = [link(href("/jobs", ran_site=job["ran_site"]), job["ran_site"]) if job.get("ran_site") else "",
             link(href("/jobs", host=job["host"]), job["host"]) if job.get("host") else ""]
    return " · ".join(p for p in parts if p)


def reason_cell(reason):
    return f'<span class="reason" title="{esc(reason)}">{esc(reason[:160])}</span>'


def error_table(errors, with_places=False):
    """The error summary; `with_places` adds where each failure happened most (site, host)."""
    def attempts(e, since):
        return href("/failures", jobtype=e["jobtype"], reason=e["reason"], since=since)
    rows = [[esc(e["jobtype"]), link(attempts(e, "24h"), e.get("shown") or e["reason"] or "(no reason)"),
             count_cell(e["last_1h"], attempts(e, "1h"), True), count_cell(e["last_24h"], attempts(e, "24h")),
             esc(when(e["first"])), esc(when(e["last"]))] +
            ([places_cell(e)] if with_places else []) for e in errors]
    return table(["jobtype", "reason (# a number that differs between its failures)", "last 1 h", "last 24 h", "first seen", "last seen"] +
                 (["where (24 h)"] if with_places else []), rows)


def places_cell(error):
    """The hosts a failure happened on, most first: `node7 (5)` alone says a node is bad."""
    return ", ".join(link(href("/failures", jobtype=error["jobtype"], reason=error["reason"], since="24h",
                               **place_query(p)),
                          " · ".join(x for x in (p["site"], p["host"]) if x) or "(none)") +
                     f" ({p['last_24h']})" for p in error.get("hosts", []))


def render_errors(d, query):
    intro = ("<p class='head'>Every failed, timed-out or pilotTO attempt (a retried job's too, so there may be "
             "more than failed jobs) by jobtype and reason (its error message, else the last line of its stderr, "
             "else its exit code), counted in 10-minute buckets. Each count links to its attempts, one a row, with "
             "what became of their jobs.</p>")
    def place_table(rows, keys):
        return table([*keys, "last hour", "last 24 h"],
                     [[link(href("/failures", since="24h", **place_query(r)), r[k] or "(none)")
                       if k in ("site", "host") else esc(r[k]) for k in keys] +
                      [count_cell(r["last_1h"], href("/failures", since="1h", **place_query(r)), True),
                       count_cell(r["last_24h"], href("/failures", since="24h", **place_query(r)))] for r in rows])
    return page("Errors of the last 24 hours",
                intro + error_table(d["errors"], with_places=True) + "<h2>By site</h2>" +
                place_table(d["by_site"], ("site",)) + "<h2>By host (the 20 with most failures)</h2>" +
                place_table(d["by_host"], ("site", "host")), query)


def place_query(row):
    """The /failures filters that select the failures counted in an error_places row."""
    return {k: v for k, v in (("site", row.get("site")), ("host", row.get("host"))) if v}


def render_failures(d, query):
    """The failed attempts, one a row, as the error summary counts them."""
    def outcome(f):
        if f["now_state"] is None:
            return "<i>job deleted</i>"
        retried = f["now_attempt"] > f["attempt"]
        return state_cell(f["now_state"]) + (f" (attempt {esc(f['now_attempt'])})" if retried else "")
    rows = [[esc(short_when(f["ts"])), link(f"/job/{f['uuid']}", f["name"] or f["uuid"][:8]), esc(f["jobtype"]),
             esc(f"{f['attempt']} of {f['max_attempts']}" if f["max_attempts"] else f["attempt"]),
             infile_cell(f["infile"] or ""), state_cell(f["state"]), esc(f["exit_code"]),
             esc(" · ".join(x for x in (f["site"], f["host"]) if x)), reason_cell(f["line"]), outcome(f)]
            for f in d["failures"]]
    intro = ("<p class='head'>Each failed, timed-out or pilotTO attempt, a retried job's too, newest first: what "
             f"the {link('/errors', 'error summary')} counts. <b>now</b> is what became of its job.</p>")
    form = filter_form(["jobtype", "reason", "site", "host", "state", "since"], query, choices=d["choices"],
                       labels={"reason": "reason (folded)", "since": "in the last"})
    return page("Failed attempts", intro + form + pager(d, query, "attempts") +
                table(["ended", "job", "jobtype", "try", "input file", "state", "exit", "ran at", "reason", "now"],
                      rows, "list"), query)


# -- activity charts: inline SVG, no JavaScript; a <title> on each slot is its hover text ---------
CHART_W, CHART_H, CHART_PAD = 360, 90, 30
LATENCY_FILES = 500             # files of the last hour the file-to-plots latency reads at most
TREND_POINTS = 2000             # values a trend page draws at most (the newest)


def nice_ticks(ymax):
    """A few round y-axis values (counts: whole numbers) from 0 to above ymax: (ticks, top).
    The top leaves a tenth of room above the highest value, so that a steady line at its
    maximum (4 live pilots out of 4) is not drawn on the frame's edge, where nobody sees it."""
    room = max(ymax * 1.1, 1)
    magnitude = 10 ** math.floor(math.log10(room / 3))
    step = max(1, next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= room / 3))
    top = step * math.ceil(room / step)
    return [step * i for i in range(int(round(top / step)) + 1)], top


def tick_label(value):
    return f"{value:g}" if value < 10000 else f"{value / 1000:g}k"


def chart_frame(title, activity, t, top, ticks, marks, legend=()):
    """An SVG chart of the range before `t`: time axis in local time, y ticks, `marks` inside;
    `legend`: (label, colour) pairs named after the title."""
    span = activity["span"]
    every, fmt = CHART_TICKS[span]
    xs = [(chart_x(x, t, span), time.strftime(fmt, time.localtime(x))) for x in time_ticks(t - span, t, every)]
    x_axis = "".join(f'<line x1="{x:.1f}" y1="{CHART_H}" x2="{x:.1f}" y2="{CHART_H + 4}" stroke="#999"/>'
                     f'<text x="{x:.1f}" y="{CHART_H + 15}" font-size="10" text-anchor="middle">{esc(label)}</text>'
                     for x, label in xs)
    y_axis = "".join(f'<line x1="{CHART_PAD}" y1="{CHART_H - v / top * CHART_H:.1f}" x2="{CHART_PAD + CHART_W}" '
                     f'y2="{CHART_H - v / top * CHART_H:.1f}" stroke="#e4e4e4"/>'
                     f'<text x="{CHART_PAD - 4}" y="{max(9.0, CHART_H - v / top * CHART_H + 3):.1f}" font-size="10" '
                     f'text-anchor="end">{tick_label(v)}</text>' for v in ticks)
    keys = ", ".join(f'<span style="color:{colour}">{esc(label)}</span>' for label, colour in legend)
    return (f'<div class="chart"><b>{esc(title)}{": " + keys if keys else ""}</b><br>'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_W + CHART_PAD + 20}" height="{CHART_H + 20}" '
            f'role="img" aria-label="{esc(title)}">'
            f'<rect x="{CHART_PAD}" y="0" width="{CHART_W}" height="{CHART_H}" fill="#fafafa" stroke="#ccc"/>'
            f'{y_axis}{marks}{x_axis}</svg></div>')


def time_ticks(start, end, every):
    """Local-time instants that are whole multiples of `every` seconds (local midnight-aligned)."""
    offset = -time.localtime(start).tm_gmtoff
    x = math.ceil((start - offset) / every) * every + offset
    while x <= end:
        yield x
        x += every


def chart_x(ts, t, span):
    return CHART_PAD + (ts - (t - span)) / span * CHART_W


def slot_label(activity, start):
    return time.strftime("%a %H:%M" if activity["span"] > 86400 else "%H:%M", time.localtime(start))


def bars_chart(activity, t):
    """Jobs finished (green) and failed (red) per bucket, stacked; claims as a blue line (not
    for one job type: claims are not counted by type)."""
    bins, span = activity["bins"], activity["span"]
    claims = all(b["started"] is not None for b in bins)
    ticks, top = nice_ticks(max([b["finished"] + b["failed"] for b in bins] +
                                [b["started"] for b in bins if claims] + [1]))
    width = CHART_W * activity["bucket"] / span
    scale = CHART_H / top
    marks, line = [], []
    for b in bins:
        x = chart_x(b["start"], t, span)
        good, failed = b["finished"] * scale, b["failed"] * scale
        started = f'{b["started"]} started, ' if claims else ""
        label = f'{slot_label(activity, b["start"])}: {started}{b["finished"]} finished, {b["failed"]} failed'
        marks.append(f'<g><title>{esc(label)}</title><rect x="{x:.1f}" y="0" width="{width:.1f}" '
                     f'height="{CHART_H}" fill-opacity="0"/>'
                     + (f'<rect class="finished" x="{x:.1f}" y="{CHART_H - good:.1f}" width="{width:.1f}" '
                        f'height="{good:.1f}" fill="#3a3"/>' if good else "")
                     + (f'<rect class="failed" x="{x:.1f}" y="{CHART_H - good - failed:.1f}" width="{width:.1f}" '
                        f'height="{failed:.1f}" fill="#d22"/>' if failed else "") + "</g>")
        if claims:
            line.append(f"{x + width / 2:.1f},{CHART_H - b['started'] * scale:.1f}")
    if claims:
        marks.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="#26c" stroke-width="1"/>')
    minutes = activity["bucket"] // 60
    per = f"{minutes} min" if minutes < 60 else "hour"
    return chart_frame(f"Jobs per {per}", activity, t, top, ticks, "".join(marks),
                       (("finished", "#3a3"), ("failed", "#d22")) + ((("started", "#26c"),) if claims else ()))


def profile_chart(title, activity, points, t, unit="s"):
    """Median (blue) and p95 (orange) of a job type's figure per bucket, from its histograms:
    each a step across the time its bucket covers (10 minutes at least), so that one bucket is
    a line, not a dot at the edge of a short range."""
    span = activity["span"]
    ticks, top = nice_ticks(max([p["p95"] for p in points] + [1]))
    scale = CHART_H / top
    def steps(key, colour):
        return "".join(f'<line x1="{chart_x(max(p["from"], t - span), t, span):.1f}" '
                       f'x2="{chart_x(min(p["to"], t), t, span):.1f}" y1="{CHART_H - p[key] * scale:.1f}" '
                       f'y2="{CHART_H - p[key] * scale:.1f}" stroke="{colour}" stroke-width="1.5"/>' for p in points)
    lines = steps("median", "#26c") + steps("p95", "#e80")
    dots = "".join(f'<circle cx="{chart_x(p["ts"], t, span):.1f}" cy="{CHART_H - p["median"] * scale:.1f}" r="2" '
                   f'fill="#26c"><title>{esc(slot_label(activity, p["ts"]))}: median {p["median"]:.3g} {unit}, '
                   f'p95 {p["p95"]:.3g} {unit} ({p["n"]} jobs)</title></circle>' for p in points)
    return chart_frame(title, activity, t, top, ticks, lines + dots, (("median", "#26c"), ("p95", "#e80")))


def line_chart(title, activity, key, t, color):
    """A sampled figure over the range, a line through every bucket's last sample (held flat
    to now, so a steady value is a line, not a dot); hover a bucket for its value."""
    samples, span = activity["samples"], activity["span"]
    ticks, top = nice_ticks(max([s[key] for s in samples] + [1]))
    scale = CHART_H / top
    points = [(chart_x(s["ts"], t, span), CHART_H - s[key] * scale) for s in samples]
    if points:
        points.append((chart_x(t, t, span), points[-1][1]))
    width = CHART_W * activity["bucket"] / span
    hovers = "".join(f'<rect x="{chart_x(s["ts"], t, span) - width:.1f}" y="0" width="{width:.1f}" '
                     f'height="{CHART_H}" fill-opacity="0"><title>{esc(slot_label(activity, s["ts"]))}: '
                     f'{esc(s[key])}</title></rect>' for s in samples)
    line = (f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in points)}" fill="none" '
            f'stroke="{color}" stroke-width="1.5"/>' if points else "")
    return chart_frame(title, activity, t, top, ticks, line + hovers)


def activity_charts(activity, t, query):
    choices = " ".join(f"<b>{esc(n)}</b>" if n == activity["range"] else link(with_query(query, range=n), n)
                       for n in CHART_RANGES)
    return (f'<div><p class="head">Activity over the last {esc(activity["range"])} · range: {choices}</p>'
            + bars_chart(activity, t) + line_chart("Live pilots", activity, "pilots", t, "#26c") +
            line_chart("Queue depth (defined jobs)", activity, "queued", t, "#c80") + "</div>")


def filter_form(fields, query, choices=None, labels=None):
    """Text inputs for `fields`, drop-downs for those in `choices` (the current value kept);
    `labels` names a field for people where its parameter name would not."""
    choices, labels = choices or {}, labels or {}

    def field(f):
        value = query.get(f, "")
        label = esc(labels.get(f, f))
        if f not in choices:
            return f'<label>{label} <input name="{esc(f)}" value="{esc(value)}" size="10"></label>'
        options = ["", *choices[f]] + ([value] if value and value not in choices[f] else [])
        opts = "".join(f'<option value="{esc(o)}"{" selected" if o == value else ""}>'
                       f'{esc(STATE_WORDS.get(o, o) or "any")}</option>' for o in options)
        return f'<label>{label} <select name="{esc(f)}">{opts}</select></label>'
    return f'<form method="get">{"".join(field(f) for f in fields)}<button>filter</button></form>'


def duration(job):
    end = job["ts_sto"] or (now() if job["state"] == "running" else None)
    return ago(end - job["ts_sta"]) if job["ts_sta"] and end else ""


def render_jobs(d, query):
    def sort_header(label, key):
        if key not in JOB_SORTS:
            return esc(label)
        order = "asc" if d["sort"] == key and d["order"] == "desc" else "desc"
        mark = {"asc": " ▲", "desc": " ▼"}[d["order"]] if d["sort"] == key else ""
        return link(with_query(query, sort=key, order=order, page=None), label + mark)

    headers = [sort_header(*h) for h in (("job", "name"), ("state", "state"), ("jobtype", "jobtype"),
                                         ("input file", ""), ("reason", ""), ("exit", ""), ("ran at", ""),
                                         ("asked for", ""), ("prio", "priority"), ("try", ""), ("user", ""),
                                         ("submitted", "submitted"), ("took", ""), ("cpu", ""), ("mem", ""),
                                         ("ended", "ended"))]
    today = time.strftime("%Y-%m-%d")
    rows = [[job_name_cell(j), state_cell(j["state"]), esc(j["jobtype"]),
             infile_cell(j["infile"]), reason_cell(j["reason"]), esc(j["exit_code"]), ran_at_cell(j),
             esc(j["site"] or "any"), esc(j["priority"]), esc(j["attempt"]), esc(j["user"]),
             esc(short_when(j["ts_def"], today)), esc(duration(j)), esc(percent(cpu_efficiency(j))),
             esc(megabytes(j.get("max_rss_mb"))), esc(short_when(j["ts_sto"], today))] for j in d["jobs"]]
    shown = (f"<p>Jobs whose reason is like <b>{esc(query['reason'])}</b> "
             f"({link(with_query(query, reason=None), 'any reason')})</p>" if query.get("reason") else "")
    retry = ""
    if getattr(query, "viewer", None):
        retry = '<div class="actions">' + action_form(
            query, "retry_failed", {"jobtype": query.get("jobtype", "")},
            f"Retry the failed {query.get('jobtype') or 'jobs'} of these runs…", why="why retry them",
            extra='<input name="runs" required size="12" placeholder="5000-5010"> ') + "</div>"
    body = (filter_form(("state", "jobtype", "site", "ran_site", "host", "user", "workflow", "age"), query,
                        d["choices"], {"site": "asked for", "ran_site": "ran at"}) + shown + retry +
            pager(d, query) + table(headers, rows, "list") + pager(d, query))
    return page("Jobs", body, query)


def file_list(items):
    return "<ul>" + "".join(
        f"<li>{esc(f['label'])}: " + (link(f["url"], f["path"]) if f["url"] else
                                     f"{esc(f['path'])} <small>(not readable by the server)</small>") + "</li>"
        for f in items) + "</ul>" if items else "<p>none</p>"


JOB_FIELDS = (("infile", "input file"), ("name", "name"), ("uuid", "job id"), ("state", "state"),
              ("reason", "reason"), ("errmsg", "pilot's message"), ("exit_code", "exit code"),
              ("jobtype", "job type"), ("payload", "payload"), ("params", "parameters"), ("priority", "priority"),
              ("timelimit", "time limit (s)"), ("attempt", "attempt"), ("max_attempts", "attempts allowed"),
              ("site", "site asked for"), ("ran_site", "ran at site"), ("host", "host"), ("pilot", "pilot"),
              ("pid", "process id"), ("wfuuid", "workflow"), ("vertex", "workflow step"), ("user", "submitted by"),
              ("ts_def", "submitted"), ("ts_dis", "dispatched"), ("ts_sta", "started"), ("ts_sto", "ended"),
              ("cpu_user", "CPU user (s)"), ("cpu_sys", "CPU system (s)"), ("max_rss_mb", "peak memory (MB)"),
              ("read_bytes", "bytes read"), ("write_bytes", "bytes written"), ("output_bytes", "output size (bytes)"),
              ("memory", "memory limit (MB)"), ("disk", "disk limit (MB)"),
              ("stdout_path", "stdout file"), ("stderr_path", "stderr file"))


def cpu_efficiency(job):
    """CPU time over wall time, in percent, for an ended job that reported its usage and ran
    long enough for the ratio to mean something (under CPU_EFFICIENCY_MIN it is noise)."""
    if (job.get("cpu_user") is None or not job.get("ts_sta") or not job.get("ts_sto")
            or job["ts_sto"] - job["ts_sta"] < CPU_EFFICIENCY_MIN):
        return None
    return 100 * (job["cpu_user"] + (job.get("cpu_sys") or 0)) / (job["ts_sto"] - job["ts_sta"])


def cost_text(job):
    """`took 12 s · CPU 95 % · peak 2,150 MB`, what is known of it."""
    parts = [f"took {ago(job['ts_sto'] - job['ts_sta'])}"] if job.get("ts_sta") and job.get("ts_sto") else []
    eff = cpu_efficiency(job)
    if eff is not None:
        parts.append(f"CPU {eff:.0f} %")
    if job.get("max_rss_mb") is not None:
        parts.append(f"peak {job['max_rss_mb']:,.0f} MB")
    return " · ".join(parts)


def job_field_rows(d):
    """The job's fields in human words, empty ones left out, the pilot's message only where it
    says more than the reason."""
    rows = []
    for key, label in JOB_FIELDS:
        value = d.get(key)
        if value in (None, "") or key == "errmsg" and (value == d.get("reason") or EXIT_CODE_ONLY.fullmatch(value)):
            continue
        cell = (state_cell(value) if key == "state" else link(f"/pilot/{value}", value) if key == "pilot" else
                link(f"/workflow/{value}", value) if key == "wfuuid" else
                esc(when(value)) if key.startswith("ts_") else esc(value))
        rows.append([esc(label), cell])
    return rows


def job_headline(d):
    """What differs between jobs, first: state, reason, exit code, where it ran, since when it
    waits; a part with nothing to say is left out, never shown empty."""
    parts = [state_cell(d["state"])]
    if d.get("verdict"):
        parts.append("data " + verdict_badge(d["verdict"]) + (f" by <b>{esc(d['verdict_check'])}</b>"
                                                              if d["verdict"] != "OK" else ""))
    if d["reason"]:
        parts.append(f"<b>{esc(d['reason'])}</b>")
    if d["exit_code"] is not None:
        parts.append(f"exit code <b>{esc(d['exit_code'])}</b>")
    if d["attempt"] > d["max_attempts"]:
        parts.append(f"attempt {esc(d['attempt'])} (retried by hand; {esc(d['max_attempts'])} automatic)")
    elif d["attempt"] > 1 or d["max_attempts"] > 1:
        parts.append(f"attempt {esc(d['attempt'])} of {esc(d['max_attempts'])}")
    if d["host"]:
        parts.append("ran at " + " · ".join(esc(x) for x in (d.get("ran_site"), d["host"]) if x))
    if cost_text(d):
        parts.append(esc(cost_text(d)))
    if d["state"] in ("template", "defined", "dispatched"):
        parts.append(f"waiting since {esc(when(d['ts_def']))} ({esc(ago(now() - d['ts_def']))})")
    logs = " ".join(link(f["url"], f["label"]) for f in d["logs"] if f["url"])
    if logs:
        parts.append("logs: " + logs)
    return "<p style='font-size:120%'>" + " · ".join(parts) + "</p>"


def job_title(d):
    """The input file (run and subrun) first, then the name: what tells two DQM jobs apart."""
    names = [os.path.basename(d["infile"]) if d["infile"] else "", d["name"]]
    return "Job " + (" · ".join(n for n in names if n) or d["uuid"])


def quality_section(d):
    """The job's checks, worst first, and its metrics; what was refused, and why."""
    checks = sorted(d.get("checks", ()), key=lambda c: (-VERDICTS.index(c["result"]), c["name"]))
    rows = [[verdict_badge(c["result"]), esc(c["name"]), esc(c["message"])] for c in checks]
    parts = [table(["result", "check", "message"], rows)] if rows else []
    if d.get("metrics"):
        parts.append(metrics_table(d["metrics"], d.get("reference"), d["jobtype"]))
    note = no_verdict_why(d) or d.get("verdict_note")      # a verdict may come with metrics refused
    if note:
        parts.append(f"<p class='bad'>{esc(note)}</p>")
    return "<h2>Data quality</h2>" + "".join(parts) if parts else ""


def metrics_table(metrics, ref, jobtype):
    """The job's metrics, each a link to its trend over runs, and beside each the reference
    run's value and the difference."""
    rows = []
    for name, value in metrics.items():
        cells = [link(f"/trend/{quote(jobtype, safe='')}/{quote(name, safe='')}", name), esc(f"{value:.6g}")]
        if ref:
            other = ref["metrics"].get(name)
            change = "" if other is None else f"{value - other:+.4g}" + (
                f" ({100 * (value - other) / other:+.0f} %)" if other else "")
            cells += [esc("" if other is None else f"{other:.6g}"), esc(change)]
        rows.append(cells)
    headers = ["metric", "value"] + ([f"reference (run {esc(ref['run'])})", "difference"] if ref else [])
    return table(headers, rows)


def beside_reference(d):
    """Each plot beside the reference run's plot of the same name: the shift's comparison by eye,
    made for it."""
    ref = d["reference"]
    pairs = [[thumbnails(d["uuid"], [i]), thumbnails(ref["job"], [i])] for i in d["images"]
             if i["name"] in ref["images"]]
    if not pairs:
        return ""
    rest = [i for i in d["images"] if i["name"] not in ref["images"]]
    return (f"<h2>Beside the reference run {esc(ref['run'])}</h2><p class='head'>marked by {esc(ref['who'])}: "
            f"{esc(ref['why'])}</p>" + table(["this job", f"reference, run {esc(ref['run'])}"], pairs)
            + (thumbnails(d["uuid"], rest) if rest else ""))


RETRY_BY_HAND = FAILED_STATES + ("cancelled",)


def job_actions(d, query):
    """What a shifter may do to this job from its page: retry an ended one as a new attempt,
    cancel or reprioritise one still to end, note any. A workflow's job is its workflow's to
    release: only cancel."""
    uuid, state, acts = {"uuid": d["uuid"]}, d["state"], []
    if getattr(query, "viewer", None) is None:
        return f'<div class="actions">{action_form(query, "retry", uuid, "Act on this job")}</div>'
    if state in RETRY_BY_HAND and not d["wfuuid"]:
        acts.append(action_form(query, "retry", uuid, f"Retry (attempt {d['attempt'] + 1})", why="why retry it"))
    if state in ("template", "defined", "dispatched", "running"):
        acts.append(action_form(query, "cancel", uuid, "Cancel", why="why cancel it"))
    if state in ("template", "defined") and not d["wfuuid"]:
        acts.append(action_form(query, "priority", uuid, "Set priority", extra=f'<input name="priority" '
                                f'type="number" value="{esc(d["priority"])}" style="width:5em"> '))
    acts.append(action_form(query, "note", {"kind": "job", "target": d["uuid"]}, "Add note", why="note on this job"))
    return f'<div class="actions">{"".join(acts)}</div>'


def provenance_section(p):
    """Which code made this job's plots, from which input, in which environment (see pilot.py's
    Provenance)."""
    if not p:
        return ""
    if p.get("error"):
        return f"<h2>Provenance</h2><p class='bad'>{esc(p['error'])}</p>"
    def joined(*parts):
        return esc(" · ".join(x for x in parts if x)) or "-"
    rows = [["ran", esc(f.get("path", "")), joined(f"sha256 {f['sha256']}" if f.get("sha256") else f.get("error", ""),
                                                  f"git {f['git']}" if f.get("git") else "")]
            for f in p.get("payload", ())]
    given = p.get("input") or {}
    if given:
        rows.append(["read", esc(given.get("path", "")),
                     joined(f"adler32 {given['adler32']}" if given.get("adler32") else given.get("skipped") or
                            given.get("error", ""), f"{given['size']:,} bytes, modified {when(given['mtime'])}"
                            if "size" in given else "")])
    rows += [["version", esc(k), joined(str(v))] for k, v in sorted((p.get("versions") or {}).items())]
    rows.append(["environment", "every variable, secrets masked", joined(f"sha256 {p.get('env_sha256', '')}")])
    where = " · ".join(f"{k} {p[k]}" for k in ("site", "host", "pilot", "p3s") if p.get(k))
    return ("<h2>Provenance</h2>" + table(["", "what", "identity"], rows)
            + f"<p class='head'>{esc(where)} · <code>job.py --provenance UUID</code> for the JSON</p>")


def render_job(d, query):
    info = table(["field", "value"], job_field_rows(d))
    env = table(["variable", "value"], [[esc(k), esc(v)] for k, v in sorted(d["env"].items())])
    timeline = table(["time", "from", "to", "attempt", "by", "info"],
                     [[esc(when(e["ts"])), state_cell(e["old"]), state_cell(e["new"]), esc(e["attempt"]),
                       esc(e["who"]), esc(e["info"])] for e in d["events"]])
    why = ("<div class='why'><b>Why is this job not running?</b><ul>" +
           "".join(f"<li>{esc(r)}</li>" for r in d["why_waiting"]) + "</ul></div>") if d["why_waiting"] else ""
    tails = "".join(f"<h2>{s} (last 64 KiB)</h2><pre>{esc(d[s + '_tail'])}</pre>"
                    for s in ("stdout", "stderr") if d[s + "_tail"])
    images = f"<h2>Plots</h2>{thumbnails(d['uuid'], d['images'])}" if d["images"] else ""
    if d.get("reference"):
        images = beside_reference(d) or images
    notes = "<h2>Notes</h2>" + "".join(note_line(n) for n in d["notes"]) if d.get("notes") else ""
    body = (f"{job_headline(d)}{job_actions(d, query)}{why}{notes}{quality_section(d)}{images}{info}"
            f"{provenance_section(d.get('provenance'))}<h2>Environment</h2>{env}<h2>Timeline</h2>{timeline}"
            f"<h2>Log files</h2>{file_list(d['logs'])}<h2>Files</h2>{file_list(d['files'])}{tails}")
    return page(job_title(d), body, query)


def image_url(job, name):
    return f"/image/{job}/{quote(name)}"


def thumbnails(job, images, failed_why=None):
    """Each image as a thumbnail linking to its full size; a failed job's framed in red, its
    reason on hover, so its plots never pass for good ones."""
    mark = f' bad-job" title="{esc(failed_why)}' if failed_why is not None else ""
    return f'<div class="thumbs{mark}">' + "".join(
        f'<a href="{esc(image_url(job, i["name"]))}"><img src="{esc(image_url(job, i["name"]))}" '
        f'alt="{esc(i["name"])}" loading="lazy">{esc(i["name"])}</a>' for i in images) + "</div>"


def plots_of_job(job, images):
    """A job's heading (name, input file, time, and its state if it did not finish) and plots."""
    first = images[0]
    failed = first.get("state") in FAILED_STATES
    state = f" · {state_cell(first['state'])} {reason_cell(first.get('reason') or '')}" if failed else ""
    return (f'<div class="card{" bad-card" if failed else ""}"><div class="card-head">'
            f"{link(f'/job/{job}', first['job_name'] or job[:8])} · "
            f"{infile_cell(first['infile'], as_run=False) or 'no input file'} · {esc(short_when(first['ts']))}{state}</div>"
            f"{thumbnails(job, images, (first.get('reason') or first['state']) if failed else None)}</div>")


SHORT_REASONS = ((re.compile(r"used ([\d,]+) MB, over its memory limit of ([\d,]+) MB"), r"memory \1 > \2 MB"),
                 (re.compile(r"killed at its time limit of (\d+) s"), r"time limit \1 s"),
                 (re.compile(r"wrote ([\d,]+) MB to its directory, over its disk limit.*"), r"disk \1 MB"),
                 (re.compile(r"exit code (-?\d+)"), r"exit \1"),
                 (re.compile(r"pilot lost: .*"), "pilot lost"),
                 (re.compile(r"%MSG-\w\s+(.*)"), r"\1"))        # art's message-facility prefix says nothing
WAIT_SHOWN = 300        # seconds a grid cell's job waits before the cell says so


def short_reason(reason):
    """A failure's reason in a few words for a wall screen (no mouse to hover): a memory kill
    and an art::Exception must look different at a glance."""
    for pattern, words in SHORT_REASONS:
        if pattern.fullmatch(reason):
            reason = pattern.sub(words, reason)
            break
    return reason if len(reason) <= 60 else reason[:59] + "…"


def cell_words(job, t):
    """What a cell says under its state: why it failed, or how long it has waited."""
    if job["state"] in FAILED_STATES and job["reason"]:
        return short_reason(job["reason"])
    if job["state"] in ("defined", "dispatched") and job.get("ts_def") and t - job["ts_def"] >= WAIT_SHOWN:
        return "waits " + ago(t - job["ts_def"])
    return ""


def grid_cell(job, jobtype, t=None):
    """One job of the run grid: its state as the cell's colour, a link to it, why it failed or
    how long it waits in a few words (its whole reason on hover), and a strip of its first
    images (framed red if the job did not finish). A file with no job of the type says so: a
    blank cell could be a page that did not load."""
    if job is None:
        return f'<span class="cell g-none" title="no {esc(jobtype)} job for this file">no job</span>'
    title = f"{job['state']}: {job['reason']}" if job["reason"] else job["state"]
    words = cell_words(job, t or now())
    words = f'<small class="why-cell">{esc(words)}</small>' if words else ""
    shown = job["images"][:4]
    strip = "".join(f'<img src="{esc(image_url(job["uuid"], n))}" alt="{esc(n)}" title="{esc(n)}" loading="lazy">'
                    for n in shown)
    more = f"<small>+{len(job['images']) - len(shown)}</small>" if len(job["images"]) > len(shown) else ""
    badge = verdict_badge(job.get("verdict"), f"{job.get('verdict_check')}" if job.get("verdict") else "")
    return (f'<a class="cell g-{esc(re.sub(r"[^A-Za-z]", "", job["state"]))}" href="/job/{esc(job["uuid"])}" '
            f'title="{esc(title)}">{esc(job["state"])}{badge}{words}</a>'
            + (f'<div class="strip">{strip}{more}</div>' if shown else ""))


def runs_csv(d):
    """The good-run list as analysers take it away: one line per input file, with its verdict,
    what made it so and every check that was not OK. A cell that a spreadsheet would read as
    a formula is quoted as text."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["run", "subrun", "file", "verdict", "verdict_by", "not_ok", "run_verdict", "run_verdict_by"])
    for r in d["rows"]:
        not_ok = " ".join(f"{j['jobtype']}:{c}" for j in r["jobs"].values() for c in j.get("not_ok", ()))
        writer.writerow([spreadsheet_safe(x) for x in (r["run"], r["subrun"], r["infile"], r["verdict"] or "",
                                                       r["verdict_by"] or "", not_ok, r.get("run_verdict") or "",
                                                       r.get("run_verdict_by") or "")])
    return out.getvalue()


def spreadsheet_safe(value):
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text


def render_runs(d, query):
    """The run grid: "does run 5010 look OK?" in one look."""
    headers = (["input file", "data"] + [link(href("/runs", **{**d["filters"], "jobtype": t}), t)
                                         + (f' <span class="bad">{d["bad_cells"][t]} bad</span>'
                                            if d["bad_cells"].get(t) else "") for t in d["types"]])
    rows = []
    for r in d["rows"]:
        label = infile_label(r["infile"])
        act = (f' <small>{link(href("/runs", **{**d["filters"], "runs": r["run"]}), "act")}</small>'
               if r["run"] is not None and getattr(query, "viewer", None) else "")
        first = (f'<a href="{esc(href("/jobs", infile=r["infile"]))}" title="{esc(r["infile"])}">{esc(label)}</a>{act}'
                 f'<br><small>{esc(short_when(r["ts"]))}</small>'
                 + "".join(note_line(n, short=True) for n in r.get("notes", ())))
        verdict = (verdict_badge(r["verdict"]) + (f"<br><small>{esc(r['verdict_by'])}</small>"
                                                  if r["verdict"] != "OK" else "")) if r["verdict"] else ""
        if r.get("run_verdict") and r["run_verdict"] != r["verdict"]:     # a worse file of the same run
            verdict += f"<br><small>run: {verdict_badge(r['run_verdict'], r['run_verdict_by'])}</small>"
        rows.append([first, verdict] + [grid_cell(r["jobs"].get(t), t, d.get("time")) for t in d["types"]])
    intro = ("<p class='head'>One row per input file, newest first; one column per job type (the order "
             "saved for the stream, else by name; <code>types=a,b,c</code> puts these first). A cell is the "
             "newest job of that type on that file: its colour is its state, its badge the data's verdict (the "
             "payload's checks), under it why it failed or how long it waits; click for the job. <i>data</i>: "
             "the file's worst verdict and what made it so; &#9998; a person's note on the run or file.</p>")
    body = (intro + filter_form(("jobtype", "runs", "age", "types", "verdict", "hide_noted", "differ"), query,
                                {**d["choices"], "hide_noted": ("yes",), "differ": ("yes",)},
                                {"runs": "run(s)", "types": "column order", "hide_noted": "hide noted runs",
                                 "differ": "reprocessed differs"}) +
            stream_line(d, query) + run_actions(d, query) + pager(d, query) + table(headers, rows, "grid")
            + pager(d, query) + order_form(d, query))
    return page("Run grid", body, query)


FILE_STATUS_CLASS = {"never submitted": "g-none", "waits": "g-defined", "runs": "g-running", "finished": "g-finished",
                     "failed": "g-failed", "timeout": "g-failed", "pilotTO": "g-failed", "cancelled": "g-cancelled"}


def render_files(d, query):
    """/files: what is missing, per input file."""
    rows = [[f'<span title="{esc(r["infile"])}">{link(href("/jobs", infile=r["infile"]), infile_label(r["infile"]))}</span>'
             f'<br><small>{esc(short_when(r["ts"]))}</small>']
            + [f'<span class="cell {FILE_STATUS_CLASS[r["status"][t]]}">{esc(r["status"][t])}</span>' for t in d["types"]]
            for r in d["files"]]
    hint = (f"<p>Submit the never-submitted ones: <code>python job.py --reprocess --runs {esc(d['missing_runs'])} "
            "--only missing</code> (add <code>--dry-run</code> to see them first).</p>" if d["missing_runs"] else "")
    hint += (f"<p>Retry the failed ones from their runs' row: {link(href('/runs', runs=d['failed_runs']), 'runs ' + d['failed_runs'])}"
             "</p>" if d.get("failed_runs") else "")
    missing = ("<b>missing only</b> · " + link(with_query(query, missing=None, page=None), "every file")
               if query.get("missing") else link(with_query(query, missing="yes", page=None), "missing only"))
    body = (f"<p class='head'>Each input file of the stream against each job type its files get: never submitted, "
            f"waits, runs, finished, or failed after all its attempts · {missing}</p>"
            + stream_line({**d, "streams": d["streams"]}, query) + hint + pager(d, query, "files")
            + table(["input file"] + [esc(t) for t in d["types"]], rows, "grid") + pager(d, query, "files"))
    return page("Files: what is missing", body, query)


def infile_label(path):
    """A file as its run and subrun when its name has them, else its name."""
    run, subrun = run_of(path)
    return f"run {run}" + (f" · {subrun}" if subrun is not None else "") if run is not None else os.path.basename(path)


def stream_line(d, query):
    """The streams (directories of input files) to choose from, the one shown in bold."""
    if len(d.get("streams", ())) < 2:
        return ""
    shown = [(s["stream"], f"{s['stream'] or '(no directory)'} ({s['files']})") for s in d["streams"]]
    return "<p class='head'>stream: " + " · ".join(
        f"<b>{esc(label)}</b>" if value == d["stream"] else link(with_query(query, stream=value, page=None), label)
        for value, label in shown + [("all", "all, interleaved")]) + "</p>"


def order_form(d, query):
    """Save the columns' order for this stream, for every viewer and refresh."""
    if not d["types"] or d["filters"].get("jobtype"):
        return ""
    saved = f" (saved: {esc(d['saved_order'])})" if d.get("saved_order") else ""
    return "<div class='actions'>" + action_form(
        query, "save_order", {"stream": d["stream"]}, "Save column order",
        extra=f'<input name="types" size="60" value="{esc(",".join(d["types"]))}"> ') + saved + "</div>"


def select(name, options, chosen=""):
    return (f'<select name="{esc(name)}">' + "".join(
        f'<option value="{esc(v)}"{" selected" if v == chosen else ""}>{esc(label)}</option>'
        for v, label in options) + "</select> ")


def versions_line(versions):
    """The software versions the runs' jobs ran with; in red where two jobs differ."""
    if not versions:
        return ""
    parts = []
    for name, values in sorted(versions.items()):
        said = ", ".join(f"{esc(v)} ({n} job{'s' * (n > 1)})" for v, n in sorted(values.items()))
        parts.append(f"<span class='bad'>{esc(name)} differs: {said}</span>" if len(values) > 1 else f"{esc(name)} {said}")
    return "<br>versions: " + " · ".join(parts)


def run_actions(d, query):
    """For the runs chosen (runs=N or N-M): retry their failed jobs (a confirmation first); for
    one run, a note, hiding it from the grid (a note too), or marking it a job type's reference."""
    runs = d["filters"].get("runs")
    if not runs or not d["rows"]:
        return ""
    types = [(t, t) for t in d["types"]]
    one = {"jobtype": d["filters"].get("jobtype", "")}
    acts = [action_form(query, "retry_failed", {"runs": runs}, f"Retry failed jobs of runs {runs}…", why="why retry them",
                        extra=select("jobtype", [("", "every job type")] + types, one["jobtype"]))]
    low, high = parse_run_range(runs)
    if low == high:
        target = {"kind": "run", "target": str(low)}
        acts += [action_form(query, "note", target, "Add note", why=f"note on run {low}"),
                 action_form(query, "note", {**target, "hide": "1"}, "Hide run", why="why hide it (a known bad run)"),
                 action_form(query, "reference", {"run": str(low)}, "Mark reference",
                             why="why this run", extra=select("jobtype", types, one["jobtype"]))]
    return f'<div class="actions"><b>Runs {esc(runs)}:</b> {"".join(acts)}{versions_line(d.get("versions"))}</div>'


def plot_sections(groups, by_run):
    """(heading, jobs' cards) by job type, or with `by_run` by the run of the input file
    (newest run first, its jobs of every type together)."""
    cards = {}
    for group in groups:
        by_job = {}
        for i in group["images"]:
            by_job.setdefault(i["job"], []).append(i)
        for job, images in by_job.items():
            run = run_of(images[0]["infile"] or "")[0]
            key = (f"run {run}" if run is not None else "no run number") if by_run else group["jobtype"]
            cards.setdefault(key, []).append((images[0]["ts"], plots_of_job(job, images)))
    if by_run:
        order = sorted(cards, key=lambda k: -max(ts for ts, _ in cards[k]))
        return [(esc(k), "".join(c for _, c in sorted(cards[k], key=lambda x: -x[0]))) for k in order]
    return [(link(href("/plots", jobtype=k), k), "".join(c for _, c in cards[k])) for k in cards]


def render_plots(d, query):
    by_run = query.get("group") == "run"
    switch = ("grouped by run · " + link(with_query(query, group=None), "group by job type") if by_run else
              "grouped by job type · " + link(with_query(query, group="run"), "group by run"))
    sections = [f"<h2>{head}</h2><div class='cards'>{cards}</div>" for head, cards in plot_sections(d["groups"], by_run)]
    body = (filter_form(("jobtype", "infile", "age"), query, d["choices"]) + f"<p class='head'>{switch}</p>" +
            ("".join(sections) or "<p><i>no published images match</i> · jobs publish the PNG, JPEG, GIF "
             "and SVG files they write to their own directory, <code>$P3S_JOB_DIR</code></p>"))
    return page("Plots", body, query)


def pilot_row(p):
    free = "" if p.get("free_mb") is None else f"{p['free_mb']:.0f} MB"
    return [link(f"/pilot/{p['uuid']}", p["uuid"][:8]), state_cell(p["state"]), esc(p["host"]), esc(p["pid"]),
            esc(p["site"]), esc(", ".join(p["jobtypes"]) or "any"), esc(ago(p["life"])), esc(ago(p["beat_age"])),
            esc(p["jobs_done"]), current_job_cell(p), esc(free),
            f'<span class="bad">{esc(p["note"])}</span>' if p.get("note") else "", esc(p["extra"])]


def current_job_cell(pilot):
    """The pilot's job as a link named by its input file (else its name), if it has one."""
    if not pilot["job"]:
        return ""
    job = pilot.get("current") or {}
    label = os.path.basename(job.get("infile") or "") or job.get("name") or pilot["job"][:8]
    title = esc(job.get("infile") or "")
    return f'<span title="{title}">{link("/job/" + pilot["job"], label)}</span>'


PILOT_HEADERS = ["pilot", "state", "host", "pid", "site", "jobtypes", "life", "last heartbeat", "jobs done",
                 "current job", "disk free", "note", "extra"]


def render_pilots(d, query):
    body = (filter_form(("state", "site", "host", "ended"), query, d["choices"]) + pager(d, query) +
            table(PILOT_HEADERS, [pilot_row(p) for p in d["pilots"]], "list"))
    return page("Pilots", body, query)


def render_pilot(d, query):
    jobs = table(["job", "jobtype", "state", "exit", "started", "ended"],
                 [[link(f"/job/{j['uuid']}", j["name"] or j["uuid"][:8]), esc(j["jobtype"]), state_cell(j["state"]),
                   esc(j["exit_code"]), esc(when(j["ts_sta"])), esc(when(j["ts_sto"]))] for j in d["recent_jobs"]])
    history = table(["time", "state", "info"], [[esc(when(e["ts"])), state_cell(e["new"]), esc(e["info"])]
                                               for e in d["events"]])
    body = (table(PILOT_HEADERS, [pilot_row(d)]) +
            f"<p>registered {esc(when(d['ts_reg']))}, heartbeat every {esc(d['heartbeat'])} s</p>"
            f"<h2>Log</h2>{file_list(d['logs'])}<h2>Recent jobs</h2>{jobs}<h2>History</h2>{history}")
    return page(f"Pilot {d['uuid']}", body, query)


SITE_HEADERS = ["site", "nominal pilots", "live", "pending", "running", "idle", "lost (1 h)", "ended (1 h)",
                "jobs finished (1 h)", "failed attempts (1 h)", "mean pilot life (1 h)", "nominal life", "canary"]


def site_row(s):
    short = s["pilots"] and s["live"] < s["pilots"] * (1 - (SITE_TOLERANCE if s["tolerance"] is None
                                                         else s["tolerance"]))
    name = s["name"]
    live = (count_cell(s["live"], href("/pilots", site=name), short) if s["live"] or not short
            else '<span class="bad">0</span>')      # none live of a nominal few: the worst, in red
    standing = " <small>(never yet)</small>" if s["pilots"] and s.get("met") is None else ""
    return [link(f"/site/{name}", name), esc(s["pilots"]) + standing, live, esc(s["pending"]),
            count_cell(s["running"], href("/pilots", site=name, state="running")),
            count_cell(s["idle"], href("/pilots", site=name, state="no jobs")),
            count_cell(s["lost_1h"], href("/pilots", site=name, state="lost", ended="1h")),
            count_cell(s["ended_1h"], href("/pilots", site=name, ended="1h")),
            count_cell(s["finished_1h"], href("/jobs", ran_site=name, state="finished", ended="1h")),
            count_cell(s["failed_attempts_1h"], href("/failures", site=name, since="1h"), True),
            esc(ago(s["mean_life_1h"])), esc(ago(s["pilotlife"])), canary_cell(s.get("canary_last"))]


def canary_cell(canary):
    """The site's last canary: its state and age, in red (with why) if it failed."""
    if not canary:
        return ""
    age = f" {ago(now() - canary['ts_sto'])} ago" if canary["ts_sto"] else ""
    if canary["state"] in FAILED_STATES:
        return f'<span class="bad" title="{esc(canary["reason"])}">{esc(canary["state"] + age)}</span>'
    return esc(canary["state"] + age)


def render_sites(d, query):
    body = (table(SITE_HEADERS, [site_row(s) for s in d["sites"]]) +
            "<p><small>Define a site with <code>pilot.py --define-site -s NAME --pilots N ...</code> "
            "or <code>-j site.json</code>.</small></p>")
    return page("Sites", body, query)


def site_settings(d):
    """A site's settings as a person reads them: units, and what applies when one is not set."""
    def given(key, shown, default):
        return shown(d[key]) if d.get(key) is not None else default
    return [("server", d.get("server") or "this one"),
            ("pilots (nominal)", given("pilots", str, "none: no alarm, no factory")),
            ("pilot life", given("pilotlife", lambda s: f"{ago(s)}: a pilot takes no job after 85-100 % of it",
                                 "none: a pilot lives until stopped")),
            ("warm pilots while no work waits (floor)", given("floor", str, "nominal, always")),
            ("tolerance below nominal", given("tolerance", "{:.0%}".format, f"{SITE_TOLERANCE:.0%} (default)")),
            ("job request wait (period)", given("period", "{:g} s".format, "10 s (default)")),
            ("job requests per pilot (cycles)", given("cycles", lambda c: str(c) if c else "until stopped",
                                                      "until stopped (default)")),
            ("heartbeat", given("heartbeat", "{:g} s".format, "10 s (default)")),
            ("memory limit of a job", given("memory", "{:,} MB".format, "none, unless the job sets one")),
            ("disk limit of a job", given("disk", "{:,} MB".format, "none, unless the job sets one")),
            ("factory command", d.get("factory") or "none"),
            ("factory's batch status / remove", " / ".join(x for x in (d.get("factory_status"), d.get("factory_remove"))
                                                           if x) or "none: pending inferred by the server"),
            ("probe (pilots take no job while it fails)", d.get("probe") or "none"),
            ("canary", f"{d['canary']} every {ago(d.get('canary_period') or CANARY_PERIOD)}" if d.get("canary") else "none"),
            ("factory period", given("factory_period", "{:g} s".format, "60 s (default)")),
            ("keep job files", given("keep_hours", "{:g} h".format, "the pilot's --keep-job-files"))]


def render_site(d, query):
    settings = table(["setting", "value"], [[esc(k), esc(v)] for k, v in site_settings(d)])
    env = table(["variable", "value"], [[esc(k), esc(v)] for k, v in sorted(d["env"].items())])
    pilots = table(PILOT_HEADERS, [pilot_row(p) for p in d["pilots_list"]])
    requests = table(["requested", "pilots", "registered", "pending", "ended young", "state"],
                     [[esc(when(r["ts"])), esc(r["count"]), esc(r["registered"]), esc(r["pending"]),
                       esc(r["died_young"]), esc(r["state"])] for r in d["requests"]])
    said = d.get("factory_said")
    factory = (f"<p>its factory, {esc(ago(now() - said['ts']))} ago: <b>{esc(said['result'])}</b> "
               f"({link('/service/' + quote('factory ' + d['name'], safe=''), 'its lines')})</p>" if said else "")
    body = (table(SITE_HEADERS, [site_row(d)]) + factory + f"<p>missing: <b>{esc(d['missing'])}</b> pilot(s): wanted "
            f"{esc(d.get('wanted', d['pilots']))} - (live {esc(d['live'])} - retiring {esc(d.get('retiring', 0))}) - "
            f"pending {esc(d['pending'])}</p>" + f"<h2>Settings</h2>{settings}<h2>Environment</h2>{env}"
            f"<h2>Pilot requests (factory)</h2>{requests}<h2>Pilots</h2>{pager(d, query)}{pilots}")
    return page(f"Site {d['name']}", body, query)


def service_state(x):
    if x["retired"]:
        return esc("retired")
    return state_cell("lost") if x["silent"] else esc("alive")


def render_services(d, query):
    rows = [[link(f"/service/{quote(x['name'], safe='')}", x["name"]), esc(x["host"]), service_state(x),
             esc(ago(x["age"])) + " ago", esc(f"{x['period']:g} s" if x["period"] else "none"), esc(x["result"])]
            for x in d["services"]]
    body = table(["service", "host", "state", "last seen", "period", "last result"], rows)
    return page("Services", body + "<p><small>Injectors, pilot factories and cron scripts "
                "(<code>service.py -n NAME -m MESSAGE</code>) report here.</small></p>", query)


def render_jobtype(d, query):
    """A job type at a glance: is it running, failing, slower than last week?"""
    states = [s for s in JOB_STATES if d["counts"].get(s)]
    counts = table([state_cell(s) for s in states] + ["cap"],
                   [[count_cell(d["counts"][s], href("/jobs", jobtype=d["name"], state=s), s in FAILED_STATES)
                     for s in states] + [esc(cap_text(d["cap"]) or "none")]])
    p = d["profile"]
    measures = [("duration", p, "s"), ("peak memory", d["profiles"]["memory"], "MB"),
                ("CPU efficiency", d["profiles"]["cpu_eff"], "%")]
    drift = table(["", "jobs (24 h)", "median, last 24 h", "p95, last 24 h", "median, 7 days before",
                   "p95, 7 days before"],
                  [[esc(label), esc(m["last_24h"]["n"]), esc(approx(m["last_24h"]["median"], unit)),
                    esc(approx(m["last_24h"]["p95"], unit)), esc(approx(m["previous_7d"]["median"], unit)),
                    esc(approx(m["previous_7d"]["p95"], unit))] for label, m, unit in measures])
    doubled = [label for label, m, _ in measures[:2] if m["last_24h"]["median"] and m["previous_7d"]["median"]
               and m["last_24h"]["median"] >= 2 * m["previous_7d"]["median"]]
    warning = (f"<p class='bad'>The median {' and '.join(doubled)} of the last 24 h is at least twice that of "
               "the 7 days before: a new software version, a slower input?</p>" if doubled else "")
    choices = " ".join(f"<b>{esc(n)}</b>" if n == d["activity"]["range"] else link(with_query(query, range=n), n)
                       for n in CHART_RANGES)
    charts = (f'<p class="head">over the last {esc(d["activity"]["range"])} · range: {choices}</p>'
              + bars_chart(d["activity"], d["time"])
              + profile_chart("Duration (s)", d["activity"], p["points"], d["time"])
              + profile_chart("Peak memory (MB)", d["activity"], d["profiles"]["memory"]["points"], d["time"], "MB"))
    paused = (f"<div class='alarm'>Paused by {esc(d['paused']['who'])} at {esc(when(d['paused']['paused']))}: "
              f"{esc(d['paused']['why'])}. Its jobs wait; <code>job.py --resume {esc(d['name'])} -m WHY</code> "
              "lets them run.</div>" if d.get("paused") else "")
    act = ("resume", "Resume: let its jobs run", "why resume") if d.get("paused") else \
        ("pause", "Pause: hand out none of its jobs", "why pause it")
    cap = action_form(query, "cap", {"jobtype": d["name"]}, "Set cap (empty: none)", role=EXPERT,
                      extra=f'<input name="cap" type="number" min="0" style="width:5em" value="{esc(d["cap"] if d["cap"] is not None else "")}"> ')
    paused += (f'<div class="actions">{action_form(query, act[0], {"jobtype": d["name"]}, act[1], why=act[2])}'
               f'{cap if getattr(query, "viewer", None) else ""}</div>')
    pauses = ("<h2>Paused and resumed</h2>" + table(["time", "now", "by", "why"], [
        [esc(when(e["ts"])), state_cell(e["new"]), esc(e["who"]), esc(e["info"])] for e in d["pauses"]])
        if d.get("pauses") else "")
    body = (f"{paused}{counts}{plots_latency(d.get('plots'))}{warning}{charts}<h2>What its jobs take</h2>"
            f"{drift}{pauses}"
            f"<h2>Errors of the last 24 hours</h2>{error_table(d['errors'])}"
            f"<p>{link(href('/runs', jobtype=d['name']), 'its run grid')} · "
            f"{link(href('/plots', jobtype=d['name']), 'its plots')} · "
            f"{link(href('/jobs', jobtype=d['name']), 'its jobs')}</p>")
    return page(f"Job type {d['name']}", body, query)


def trend_chart(d, width=720, height=240, pad=50):
    """The metric over run numbers as an SVG: its bands shaded (error red, warn amber), the
    reference run's value dashed, each point a link to its job (its run and value on hover)."""
    points, band, ref = d["points"], d["band"] or {}, d["reference"]
    values = [p["value"] for p in points] + [v for pair in band.values() for v in pair if v is not None]
    values += [ref["value"]] if ref else []
    lo, hi = min(values), max(values)
    lo, hi = (lo - 1, hi + 1) if lo == hi else (lo - (hi - lo) * 0.05, hi + (hi - lo) * 0.05)
    r0, r1 = min(p["run"] for p in points), max(p["run"] for p in points)
    r1 = max(r1, r0 + 1)

    def x(run):
        return pad + (run - r0) / (r1 - r0) * width

    def y(value):
        return height - (value - lo) / (hi - lo) * height
    shades = ""
    for kind, colour in (("warn", "#fff3cd"), ("error", "#fde0e0")):     # error over warn
        low, high = band.get(kind, [None, None])
        for top, bottom in ((hi, high), (low, lo)):      # above the band's high, below its low
            if top is not None and bottom is not None and top > bottom:
                shades += (f'<rect x="{pad}" y="{y(top):.1f}" width="{width}" height="{y(bottom) - y(top):.1f}" '
                           f'fill="{colour}"/>')
    ref_line = (f'<line x1="{pad}" y1="{y(ref["value"]):.1f}" x2="{pad + width}" y2="{y(ref["value"]):.1f}" '
                f'stroke="#555" stroke-dasharray="4 3"/><text x="{pad + width - 2}" y="{y(ref["value"]) - 3:.1f}" '
                f'font-size="10" text-anchor="end">reference, run {esc(ref["run"])}</text>' if ref else "")
    dots = "".join(f'<a href="/job/{esc(p["job"])}"><circle cx="{x(p["run"]):.1f}" cy="{y(p["value"]):.1f}" '
                   f'r="3" fill="#1f5fbf"><title>run {esc(p["run"])}: {esc(format(p["value"], ".6g"))}</title>'
                   f'</circle></a>' for p in points)
    axes = "".join(f'<text x="{pad - 4}" y="{max(9.0, y(v) + 3):.1f}" font-size="10" text-anchor="end">'
                   f'{esc(format(v, ".4g"))}</text>' for v in (lo, (lo + hi) / 2, hi))
    axes += "".join(f'<text x="{x(r):.1f}" y="{height + 14}" font-size="10" text-anchor="middle">{esc(r)}</text>'
                    for r in sorted({r0, r1, (r0 + r1) // 2}))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + pad + 20}" height="{height + 22}" role="img" '
            f'aria-label="{esc(d["metric"])} by run"><rect x="{pad}" y="0" width="{width}" height="{height}" '
            f'fill="#fafafa" stroke="#ccc"/>{shades}{ref_line}{axes}{dots}</svg>')


def render_trend(d, query):
    """Is this metric drifting, run after run? The trend of one metric of one job type."""
    form = filter_form(("runs", "age"), query, {}, {"runs": "run(s)"})
    chart = (trend_chart(d) if d["points"] else "<p>No value of this metric in the runs and age chosen.</p>")
    return page(f"{d['metric']} of {d['jobtype']}, by run", form + trend_legend(d) + chart, query)


def trend_legend(d):
    """In words what the chart shades and dashes: the bands' ends and the reference's value."""
    said = [f"{kind} outside [{band_text(low)}, {band_text(high)}]" for kind, (low, high) in (d["band"] or {}).items()
            if low is not None or high is not None]
    if d["reference"]:
        said.append(f"reference run {d['reference']['run']}: {d['reference']['value']:.4g}")
    return f"<p class='head'>{esc(' · '.join(said))}</p>" if said else ""


def render_service(d, query):
    lines = table(["time", "result"], [[esc(when(x["ts"])), esc(x["result"])] for x in d["lines"]])
    head = table(["service", "host", "state", "last seen", "period"],
                 [[esc(d["name"]), esc(d["host"]), service_state(d), esc(ago(d["age"])) + " ago",
                   esc(f"{d['period']:g} s" if d["period"] else "none")]])
    return page(f"Service {d['name']}", f"{head}<h2>Last {len(d['lines'])} lines</h2>{lines}", query)


def render_listing(d, query):
    rows = [[link("/file?" + urlencode({"path": e["path"]}), e["name"] + ("/" if e["dir"] else "")),
             f"<span class='num'>{esc(e['size'])}</span>", esc(when(e["mtime"]))] for e in d["entries"]]
    return page(d["path"], table(["name", "size", "modified"], rows), query)


def render_metrics(d):
    """Prometheus text exposition format."""
    out = ["# HELP p3s_jobs Jobs by state and jobtype.", "# TYPE p3s_jobs gauge"]
    out += [f'p3s_jobs{{state="{prom(j["state"])}",jobtype="{prom(j["jobtype"])}"}} {j["n"]}' for j in d["jobs"]]
    out += ["# HELP p3s_pilots Pilots by state.", "# TYPE p3s_pilots gauge"]
    out += [f'p3s_pilots{{state="{prom(s)}"}} {n}' for s, n in sorted(d["pilots"].items())]
    for name, help_text in (("claims", "Jobs handed to pilots."), ("empty_polls", "Job requests that found no job."),
                            ("reports", "Pilot reports accepted."), ("stale_reports", "Pilot reports refused as stale."),
                            ("http_requests", "HTTP requests served (pages and API)."),
                            ("commits", "Database commits (each may carry several writers' blocks: group commit)."),
                            ("write_blocks", "Write blocks committed (requests that wrote, and housekeeping).")):
        out += [f"# HELP p3s_{name}_total {help_text}", f"# TYPE p3s_{name}_total counter",
                f"p3s_{name}_total {d['counters'][name]}"]
    out += ["# HELP p3s_waiting_requests Job requests (long polls) waiting for work now.",
            "# TYPE p3s_waiting_requests gauge", f"p3s_waiting_requests {d['waiting_requests']}"]
    out += ["# HELP p3s_alarm 1 while the alarm is raised (see /api/alarms).", "# TYPE p3s_alarm gauge"]
    out += [f'p3s_alarm{{name="{name}",severity="{d["alarms"].get(name, default_severity(name))}"}} '
            f'{int(name in d["alarms"])}' for name in Alarms.NAMES]
    hist = d["claim_latency"]
    out += ["# HELP p3s_claim_latency_seconds Seconds from a job's submission to the committed claim that "
            "hands it to a pilot.",
            "# TYPE p3s_claim_latency_seconds histogram"]
    out += [f'p3s_claim_latency_seconds_bucket{{le="{le}"}} {n}' for le, n in hist["buckets"]]
    out += [f"p3s_claim_latency_seconds_sum {hist['sum']:.6f}", f"p3s_claim_latency_seconds_count {hist['count']}"]
    if d.get("backup") and d["backup"]["age"] is not None:
        out += ["# HELP p3s_backup_age_seconds Age of the newest good copy of the database (--backup-dir).",
                "# TYPE p3s_backup_age_seconds gauge", f"p3s_backup_age_seconds {d['backup']['age']:.0f}"]
    return "\n".join(out + cost_metrics(d["costs"])) + "\n"


def cost_metrics(costs):
    """Per job type: duration and peak memory histograms, CPU seconds (jobs ended since start)."""
    out = []
    for name, key, bounds, help_text in (
            ("p3s_job_duration_seconds", "duration", DURATION_BUCKETS, "Wall time of ended jobs, by job type."),
            ("p3s_job_peak_memory_megabytes", "memory", MEMORY_BUCKETS, "Peak resident memory of ended jobs.")):
        out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        for jobtype, t in sorted(costs.items()):
            label, cumulative = prom(jobtype), 0
            for le, n in zip([*bounds, "+Inf"], t[key]):
                cumulative += n
                out.append(f'{name}_bucket{{jobtype="{label}",le="{le}"}} {cumulative}')
            out += [f'{name}_sum{{jobtype="{label}"}} {t[key + "_sum"]:.3f}',
                    f'{name}_count{{jobtype="{label}"}} {cumulative}']
    out += ["# HELP p3s_job_cpu_seconds_total CPU seconds (user + system) of ended jobs, by job type.",
            "# TYPE p3s_job_cpu_seconds_total counter"]
    out += [f'p3s_job_cpu_seconds_total{{jobtype="{prom(jt)}"}} {t["cpu"]:.3f}' for jt, t in sorted(costs.items())]
    return out


def default_severity(name):
    return "critical" if name in Alarms.CRITICAL else "warning"


def prom(value):
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


STATE_FILL = {"finished": "#9d9", "failed": "#f88", "timeout": "#f88", "pilotTO": "#f88", "running": "#8bf",
              "dispatched": "#8bf", "defined": "#fd7", "template": "#ddd", "cancelled": "#bbb"}
BOX_W, BOX_H, GAP_X, GAP_Y = 150, 44, 70, 24


def dag_layers(jobs, datasets):
    """Layer of each job: the length of the longest path from a root to it."""
    names = [j["uuid"] for j in jobs]
    edges = [{"source": d["producer"], "target": d["consumer"]} for d in datasets]
    children = {n: [] for n in names}
    for e in edges:
        children[e["source"]].append(e["target"])
    layer = {n: 0 for n in names}
    for n in topological_order(names, edges)[0]:
        for child in children[n]:
            layer[child] = max(layer[child], layer[n] + 1)
    return layer


def dag_svg(jobs, datasets, link_jobs=True):
    """The workflow's DAG as inline SVG: layers left to right, boxes coloured by job state
    (a template's vertices: no job to link to)."""
    layer = dag_layers(jobs, datasets)
    columns = {}
    for j in sorted(jobs, key=lambda j: j["vertex"] or ""):
        columns.setdefault(layer[j["uuid"]], []).append(j)
    pos = {j["uuid"]: (20 + col * (BOX_W + GAP_X), 20 + row * (BOX_H + GAP_Y))
           for col, members in columns.items() for row, j in enumerate(members)}
    width = 40 + (max(columns) + 1) * (BOX_W + GAP_X) - GAP_X
    height = 40 + max(len(m) for m in columns.values()) * (BOX_H + GAP_Y) - GAP_Y
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto"><path d="M0,0L10,5L0,10z" fill="#555"/></marker></defs>']
    for d in datasets:
        (x1, y1), (x2, y2) = pos[d["producer"]], pos[d["consumer"]]
        parts.append(f'<line x1="{x1 + BOX_W}" y1="{y1 + BOX_H / 2}" x2="{x2}" y2="{y2 + BOX_H / 2}" '
                     f'stroke="#555" marker-end="url(#arrow)"><title>{esc(d["datatag"])}: '
                     f'{esc(os.path.join(d["dirpath"], d["name"]))}</title></line>')
    for j in jobs:
        x, y = pos[j["uuid"]]
        box = (f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" '
               f'rx="6" fill="{STATE_FILL.get(j["state"], "#fff")}" stroke="#333"/>'
               f'<text x="{x + BOX_W / 2}" y="{y + 18}" text-anchor="middle" font-weight="bold">'
               f'{esc(j["vertex"])}</text><text x="{x + BOX_W / 2}" y="{y + 35}" text-anchor="middle">'
               f'{esc(j["state"] if link_jobs else j.get("jobtype", ""))}</text>')
        parts.append(f'<a href="/job/{esc(j["uuid"])}">{box}</a>' if link_jobs else box)
    return "".join(parts) + "</svg>"


def workflow_files(datasets):
    """One row per file, however many edges carry it (a DAG's input read by three filters is
    one file): its datatags, types and states joined."""
    files = {}
    for f in datasets:
        row = files.setdefault(os.path.join(f["dirpath"], f["name"]), {"datatag": {}, "datatype": {}, "state": {}})
        for key in row:
            row[key][f[key]] = None
    return [[esc(path)] + [esc(", ".join(k for k in row[key] if k)) for key in ("datatag", "datatype", "state")]
            for path, row in files.items()]


def render_workflow(d, query):
    jobs = table(["vertex", "state", "exit", "attempt", "started", "ended", "reason"],
                 [[link(f"/job/{j['uuid']}", j["vertex"]), state_cell(j["state"]), esc(j["exit_code"]),
                   esc(j["attempt"]), esc(when(j["ts_sta"])), esc(when(j["ts_sto"])), reason_cell(j.get("reason") or "")]
                  for j in d["jobs"]])
    files = table(["file", "datatag", "type", "state"], workflow_files(d["datasets"]))
    failed = [f"vertex <b>{esc(j['vertex'])}</b> {state_cell(j['state'])}" + (f": {esc(j['reason'])}" if j.get("reason") else "")
              for j in d["jobs"] if j["state"] in FAILED_STATES]
    about = ([state_cell(d["state"]), f"DAG {esc(d['dag'])}"] + failed
             + ([esc(d["description"])] if d["description"] else []))
    body = (f"<p>{' · '.join(about + [link('/jobs?workflow=' + d['uuid'], 'its jobs')])}</p>"
            f"{dag_svg(d['jobs'], d['datasets'])}"
            f"<h2>Jobs</h2>{jobs}<h2>Files</h2>{files}")
    return page(f"Workflow {d['name']}", body, query)


def progress_cell(w):
    """`2 / 3 vertices`, and the failed vertex with its reason."""
    text = f"{w['done']} / {w['vertices']}"
    failure = w.get("failure")
    if failure:
        text = esc(text) + f' · <span class="bad">{link("/job/" + failure["uuid"], failure["vertex"])} ' \
                           f'{esc(failure["state"])}</span> {reason_cell(failure["reason"])}'
        return text
    return esc(text)


def workflow_rows(workflows):
    return [[link(f"/workflow/{w['uuid']}", w["name"]), state_cell(w["state"]), progress_cell(w),
             link(f"/dag/{quote(w['dag'], safe='')}", w["dag"]), esc(w["user"]), esc(short_when(w["ts_def"])),
             esc(short_when(w["ts_sto"]))] for w in workflows]


WORKFLOW_HEADERS = ["workflow", "state", "progress (vertices finished)", "dag", "user", "created", "ended"]


def render_workflows(d, query):
    body = (filter_form(("state", "dag", "user"), query, d["choices"]) + pager(d, query) +
            table(WORKFLOW_HEADERS, workflow_rows(d["workflows"]), "list"))
    return page("Workflows", body, query)


def render_dags(d, query):
    rows = [[link(f"/dag/{quote(x['name'], safe='')}", x["name"]), esc(x["vertices"]),
             link(href("/workflows", dag=x["name"]), x["workflows"]), esc(x["description"]), esc(when(x["ts"]))]
            for x in d["dags"]]
    return page("DAG templates", table(["name", "vertices", "workflows", "description", "registered"], rows) +
                f"<p>{link('/datatypes', 'Data types')}</p>", query)


def render_dag(d, query):
    """A DAG template: its drawing, vertices, edges with datatypes, and the workflows made from it."""
    boxes = [{"uuid": v["name"], "vertex": v["name"], "state": "template", "jobtype": v["jobtype"]} for v in d["vertices"]]
    arrows = [{**e, "producer": e["source"], "consumer": e["target"]} for e in d["edges"]]
    vertices = table(["vertex", "jobtype", "payload", "time limit (s)", "priority"],
                     [[esc(v["name"]), esc(v["jobtype"]), f"<code>{esc(v['payload'])}</code>", esc(v["timelimit"]),
                       esc(v["priority"])] for v in d["vertices"]])
    edges = table(["from", "to", "file", "datatype", "datatag", "comment"],
                  [[esc(e["source"]), esc(e["target"]), esc(os.path.join(e["dirpath"], e["name"])),
                    esc(e["datatype"]), esc(e["datatag"]), esc(e["comment"])] for e in d["edges"]])
    svg = dag_svg(boxes, arrows, link_jobs=False) if boxes else ""
    body = (f"<p>{esc(d['description'])}</p>{svg}<h2>Vertices</h2>{vertices}<h2>Edges</h2>{edges}"
            f"<h2>Workflows made from it</h2>{table(WORKFLOW_HEADERS, workflow_rows(d['workflows']), 'list')}"
            f"<p>{link(href('/workflows', dag=d['name']), 'all its workflows')} · "
            f"{link('/api/dags/' + quote(d['name'], safe='') + '/graphml', 'GraphML')}</p>")
    return page(f"DAG {d['name']}", body, query)


def render_datatypes(d, query):
    rows = [[esc(x["name"]), esc(x["ext"]), esc(x["comment"]), link(href("/datasets", datatype=x["name"]), "files")]
            for x in d["datatypes"]]
    return page("Data types", table(["name", "extension", "comment", ""], rows) +
                "<p><small>Define one with <code>workflow.py --datatype NAME:EXT</code> or "
                "<code>dataset.py -R -j '{...}'</code>.</small></p>", query)


def dataset_work(x):
    """The work a file record belongs to or started: its workflow, the jobs writing and
    reading it, or an injected file's jobs (by their input file)."""
    parts = []
    if x["wfuuid"]:
        parts.append(link(f"/workflow/{x['wfuuid']}", "workflow " + x["wfuuid"][:8]))
    for role, key in (("from", "producer"), ("to", "consumer")):
        if x.get(key):
            parts.append(f"{role} " + link(f"/job/{x[key]}", x.get(key + "_name") or x[key][:8]))
    if x["origin"] == "injected" and not x["wfuuid"]:
        parts.append(link(href("/jobs", infile=os.path.join(x["dirpath"], x["name"])), "its jobs"))
    return " · ".join(parts)


def template_text(template):
    """Which injector template a file record is for ("jobs:/x/dqm.json" -> "jobs dqm.json"): a
    file is registered once per template, so two injectors on one directory list it twice."""
    kind, _, what = (template or "").partition(":")
    return f"{kind} {os.path.basename(what)}" if what else kind


def render_datasets(d, query):
    rows = [[f'<span title="{esc(os.path.join(x["dirpath"], x["name"]))}">{esc(x["name"])}</span>',
             esc(x["datatype"]), esc(x["datatag"]), esc(x["state"]), esc(x["origin"]),
             f'<span title="{esc(x.get("template") or "")}">{esc(template_text(x.get("template")))}</span>',
             dataset_work(x), esc(short_when(x["ts"]))] for x in d["datasets"]]
    body = (filter_form(("state", "origin", "datatype"), query) + pager(d, query) +
            table(["file", "type", "datatag", "state", "origin", "for (template)", "work", "registered"], rows, "list") +
            f"<p>{link('/datatypes', 'Data types')}</p>")
    return page("Datasets", body, query)


################################################################################################
# HTTP: the routes table (API), the pages table, the request handler and the server.
################################################################################################
# Path parameters of the routes and pages: <uuid> is checked by as_uuid, so a typo gets a clear
# 400; <dag> is a DAG name, <jobtype> a job type, <service> a reporting client (URL-quoted),
# <name> a site or datatype name.
PATH_PARAMS = {"<uuid>": r"(?P<uuid>[^/]+)", "<dag>": r"(?P<name>[^/]{1,128})",
               "<jobtype>": r"(?P<name>[^/]{1,64})", "<service>": r"(?P<name>[^/]{1,256})",
               "<metric>": r"(?P<metric>[^/]{1,128})",
               "<name>": r"(?P<name>[A-Za-z0-9_.-]{1,64})"}


def path_regex(path):
    """'/api/jobs/<uuid>' -> a compiled regex matching the whole path."""
    return re.compile("^" + re.sub(r"<\w+>", lambda m: PATH_PARAMS[m.group(0)], path) + "$")


# The API. Each row: method, path (as documented in the README's "HTTP API"), the operation
# (a Service method, or "broker." / "workflows." one), the request parts passed after the path
# parameters, and the credential it needs: the least role a user's token must have (SHIFTER,
# EXPERT, ADMIN; the shared write token is an admin), REGISTER (an expert's token or the pilot
# token), PILOT (that pilot's own secret, checked by the operation), or None (a read).
REGISTER, PILOT = "register", "pilot"
API = (
    ("GET", "/api/health", "health", (), None),
    ("POST", "/api/auth", "auth_ok", ("who",), SHIFTER),
    ("POST", "/api/jobs", "submit", ("body", "who"), EXPERT),
    ("GET", "/api/jobs", "list_jobs", ("query",), None),
    ("POST", "/api/jobs/states", "job_states", ("body",), None),
    ("PUT", "/api/submissions/<uuid>/part", "stage_part", ("body",), EXPERT),
    ("POST", "/api/submissions/<uuid>/commit", "commit_submission", ("body", "who"), EXPERT),
    ("GET", "/api/submissions", "find_submissions", ("query",), None),
    ("GET", "/api/submissions/<uuid>", "get_submission", (), None),
    ("GET", "/api/jobs/<uuid>", "get_job", (), None),
    ("POST", "/api/jobs/<uuid>/adjust", "adjust", ("body", "who"), SHIFTER),
    ("POST", "/api/jobs/retry", "retry_failed", ("body", "who"), SHIFTER),
    ("POST", "/api/reprocess", "reprocess", ("body", "who"), EXPERT),
    ("DELETE", "/api/jobs/<uuid>", "delete_job", ("who",), ADMIN),
    ("POST", "/api/jobs/<uuid>/report", "report", ("body", "secret"), PILOT),
    ("POST", "/api/pilots", "register", ("body",), REGISTER),
    ("GET", "/api/pilots", "list_pilots", ("query",), None),
    ("POST", "/api/pilots/directive", "mark_pilots", ("body", "who"), EXPERT),
    ("POST", "/api/pilots/<uuid>/request", "broker.request_job", ("body", "secret"), PILOT),
    ("POST", "/api/pilots/<uuid>/heartbeat", "heartbeat", ("body", "secret"), PILOT),
    ("POST", "/api/pilots/<uuid>/stop", "deregister", ("body", "secret"), PILOT),
    ("POST", "/api/pilots/<uuid>/release", "release_reserve", ("body", "secret"), PILOT),
    ("GET", "/api/dags", "workflows.list_dags", (), None),
    ("POST", "/api/dags", "workflows.add_dag", ("body",), EXPERT),
    ("GET", "/api/dags/<dag>", "workflows.get_dag", (), None),
    ("GET", "/api/dags/<dag>/graphml", "workflows.dag_graphml", (), None),
    ("DELETE", "/api/dags/<dag>", "workflows.delete_dag", (), ADMIN),
    ("GET", "/api/workflows", "workflows.list_workflows", ("query",), None),
    ("POST", "/api/workflows", "workflows.create_workflow", ("body", "who"), EXPERT),
    ("GET", "/api/workflows/<uuid>", "workflows.get_workflow", (), None),
    ("POST", "/api/workflows/<uuid>/state", "workflows.set_workflow_state", ("body", "who"), EXPERT),
    ("DELETE", "/api/workflows/<uuid>", "workflows.delete_workflow", ("who",), ADMIN),
    ("POST", "/api/inject", "workflows.inject", ("body", "who"), EXPERT),
    ("GET", "/api/datasets", "workflows.list_datasets", ("query",), None),
    ("GET", "/api/datatypes", "workflows.list_datatypes", (), None),
    ("PUT", "/api/datatypes/<name>", "workflows.define_datatype", ("body",), EXPERT),
    ("DELETE", "/api/datatypes/<name>", "workflows.delete_datatype", (), ADMIN),
    ("POST", "/api/datasets", "workflows.register_dataset", ("body", "who"), EXPERT),
    ("POST", "/api/datasets/<uuid>/adjust", "workflows.adjust_dataset", ("body", "who"), EXPERT),
    ("DELETE", "/api/datasets/<uuid>", "workflows.delete_dataset", ("who",), ADMIN),
    ("GET", "/api/sites", "list_sites", (), None),
    ("GET", "/api/sites/<name>", "get_site", (), None),
    ("POST", "/api/sites/<name>/requests", "request_pilots", ("body",), EXPERT),
    ("POST", "/api/requests/<uuid>/cancel", "cancel_request", (), EXPERT),
    ("PUT", "/api/sites/<name>", "define_site", ("body",), EXPERT),
    ("DELETE", "/api/sites/<name>", "delete_site", (), ADMIN),
    ("GET", "/api/jobtypes", "list_jobtypes", ("query",), None),
    ("PUT", "/api/runs/order", "set_grid_order", ("body", "who"), SHIFTER),
    ("GET", "/api/alarms", "alarms.raised", (), None),
    ("GET", "/api/alarms/history", "alarms.history", ("query",), None),
    ("POST", "/api/alarms/ack", "alarms.acknowledge", ("body", "who"), SHIFTER),
    ("GET", "/api/services", "list_services", (), None),
    ("POST", "/api/notes", "add_note", ("body", "who"), SHIFTER),
    ("PUT", "/api/bands/<jobtype>", "set_bands", ("body",), EXPERT),
    ("GET", "/api/bands/<jobtype>", "get_bands", (), None),
    ("PUT", "/api/references/<jobtype>", "set_reference", ("body", "who"), SHIFTER),
    ("PUT", "/api/jobtypes/<jobtype>/deadline", "set_deadline", ("body",), EXPERT),
    ("GET", "/api/notes", "list_notes", ("query",), None),
    ("POST", "/api/services/<service>/beat", "service_beat", ("body",), EXPERT),
    ("GET", "/api/services/<service>", "get_service", (), None),
    ("DELETE", "/api/services/<service>", "retire_service", (), ADMIN),
    ("PUT", "/api/jobtypes/<jobtype>", "set_cap", ("body",), EXPERT),
    ("POST", "/api/jobtypes/<jobtype>/pause", "pause_jobtype", ("body", "who"), SHIFTER),
    ("PUT", "/api/jobs/<uuid>/images/<name>", "images.publish", ("raw", "secret"), PILOT),
)


def routes_by_method(api):
    """{method: its routes, in the order of `api`}: a request is matched against its method's
    paths alone."""
    routes = collections.defaultdict(list)
    for method, path, name, parts, auth in api:
        routes[method].append((path_regex(path), name, parts, auth))
    return dict(routes)


ROUTES = routes_by_method(API)
WRITES = {name: (parts, auth) for method, path, name, parts, auth in API if auth in ROLES}   # what a page action calls

# The pages' actions (POST /act, from a signed-in page's form): each is an API operation, done
# with that route's role as the signed-in user, its request built from the form's fields:
# fields -> (path parameters, body).
PAGE_ACTIONS = {
    "retry": ("adjust", lambda f: ([as_uuid(f.get("uuid", ""), "uuid")], {"state": "defined", "why": f.get("why", "")})),
    "cancel": ("adjust", lambda f: ([as_uuid(f.get("uuid", ""), "uuid")], {"state": "cancelled",
                                                                          "why": f.get("why", "")})),
    "priority": ("adjust", lambda f: ([as_uuid(f.get("uuid", ""), "uuid")], {"priority": f.get("priority", ""),
                                                                             "why": f.get("why", "")})),
    "note": ("add_note", lambda f: ([], {"kind": f.get("kind"), "target": f.get("target", ""),
                                         "text": f.get("why", ""), "hide": f.get("hide") == "1"})),
    "ack": ("alarms.acknowledge", lambda f: ([], {"name": f.get("name"), "site": f.get("site", ""),
                                                 "jobtype": f.get("jobtype", ""), "why": f.get("why", "")})),
    "silence": ("alarms.acknowledge", lambda f: ([], {"name": f.get("name"), "site": f.get("site", ""),
                                                     "jobtype": f.get("jobtype", ""), "why": f.get("why", ""),
                                                     "kind": "silence", "for": parse_age(f.get("for", ""), "for")})),
    "pause": ("pause_jobtype", lambda f: ([f.get("jobtype", "")], {"paused": True, "why": f.get("why", "")})),
    "resume": ("pause_jobtype", lambda f: ([f.get("jobtype", "")], {"paused": False, "why": f.get("why", "")})),
    "cap": ("set_cap", lambda f: ([f.get("jobtype", "")], {"cap": f.get("cap") or None})),
    "reference": ("set_reference", lambda f: ([f.get("jobtype", "")], {"run": f.get("run"), "why": f.get("why", "")})),
    "save_order": ("set_grid_order", lambda f: ([], {"stream": f.get("stream", ""),
                                                     "types": [t.strip() for t in f.get("types", "").split(",") if t.strip()]})),
    "retry_failed": ("retry_failed", lambda f: ([], {"jobtype": f.get("jobtype", ""), "runs": f.get("runs", ""),
                                                     "why": f.get("why", ""), "dry_run": f.get("confirm") != "1"})),
}
FORM_PATHS = ("/signin", "/signout", "/act")
SESSION_COOKIE = "p3s_session"


def local_path(value):
    """Where a form may send the browser back to: a path of this server, never another site."""
    ok = value.startswith("/") and not value.startswith("//") and "\\" not in value \
        and not any(ord(c) < 32 for c in value)
    return value if ok else "/"

# Pages that are API reads too: the good-run list is /runs, as JSON (or ?format=csv).
PAGE_APIS = {"/api/runs": "/runs"}
CSV_PAGES = {"runs": runs_csv}

# The pages. Each row: path, Views method, HTML renderer (/metrics and /file are served apart).
PAGES = [(path_regex(path), name, render) for path, name, render in (
    ("/", "summary", render_summary),
    ("/jobs", "jobs", render_jobs),
    ("/runs", "runs", render_runs),
    ("/dag/<dag>", "dag", render_dag),
    ("/datatypes", "datatypes", render_datatypes),
    ("/jobtype/<jobtype>", "jobtype", render_jobtype),
    ("/trend/<jobtype>/<metric>", "trend", render_trend),
    ("/job/<uuid>", "job", render_job),
    ("/pilots", "pilots", render_pilots),
    ("/pilot/<uuid>", "pilot", render_pilot),
    ("/sites", "sites", render_sites),
    ("/site/<name>", "site", render_site),
    ("/services", "services", render_services),
    ("/alarms", "alarms_page", render_alarms),
    ("/manual", "manual", render_manual),
    ("/service/<service>", "service", render_service),
    ("/workflows", "workflows", render_workflows),
    ("/workflow/<uuid>", "workflow", render_workflow),
    ("/dags", "dags", render_dags),
    ("/datasets", "datasets", render_datasets),
    ("/files", "files", render_files),
    ("/errors", "errors", render_errors),
    ("/failures", "failures", render_failures),
    ("/plots", "plots", render_plots),
)]


CLIENT_GONE = (socket.timeout, TimeoutError, ConnectionError)   # socket.timeout: Python 3.9's own
IMAGE_PATH = re.compile(r"/image/(?P<uuid>[^/]+)/(?P<name>[^/]+)")


def file_type(path, head):
    """The Content-Type /file sends: an image's own when its bytes say so, else text."""
    ext = os.path.splitext(path)[1].lower()
    if ext in IMAGE_TYPES and sniff_image(head, ext):
        return IMAGE_TYPES[ext]
    return "text/plain; charset=utf-8"


def operation(service, name):
    """The bound method a route names: 'submit' or 'broker.request_job'."""
    target = service
    for part in name.split("."):
        target = getattr(target, part)
    return target


REQUEST_LINE = re.compile(r"([A-Z]{1,20}) (\S{1,65536}) (HTTP/1\.[01])")
MAX_HEADERS = 100       # header lines of one request


class Headers:
    """A request's header fields, by name in any case: the part of email.message.Message
    that the handler and http.server read (get, get_all, in, values)."""

    def __init__(self):
        self.fields = {}        # lower-case name -> its values in arrival order

    def add(self, name, value):
        self.fields.setdefault(name.lower(), []).append(value)

    def fold(self, line):
        """An obs-fold continuation line: kept in the last value, as email does, to be refused."""
        if not self.fields:
            raise ValueError("Bad header: a continuation line before any field")
        values = self.fields[next(reversed(self.fields))]
        values[-1] += "\r\n" + line

    def get(self, name, default=None):
        values = self.fields.get(name.lower())
        return values[0] if values else default

    def get_all(self, name):
        return self.fields.get(name.lower())

    def __contains__(self, name):
        return name.lower() in self.fields

    def values(self):
        return [v for values in self.fields.values() for v in values]


def read_headers(rfile):
    """The header section of a request, up to its empty line; ValueError says what is wrong."""
    headers = Headers()
    for _ in range(MAX_HEADERS + 1):
        line = rfile.readline(65537)
        if len(line) > 65536:
            raise ValueError("Header line over 64 KiB")
        if line in (b"\r\n", b"\n", b""):
            return headers
        text = line.decode("iso-8859-1").rstrip("\r\n")
        if text[:1] in (" ", "\t"):
            headers.fold(text)
            continue
        name, colon, value = text.partition(":")
        if not colon or not name or not HEADER_NAME.fullmatch(name):
            raise ValueError(f"Bad header line ({text[:60]!r})")
        headers.add(name, value.strip(" \t"))
    raise ValueError(f"Headers over {MAX_HEADERS} lines")


HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")    # RFC 9110 token: no space before the colon


class Handler(BaseHTTPRequestHandler):
    """One request of a kept-alive HTTP/1.1 connection (a pilot's next request skips the TCP
    handshake), read from the bytes the connection loop gathered or from the socket in a thread
    (see ConnectionLoop)."""
    server_version = "p3s/" + VERSION
    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16          # an answer's head and body leave in one send, at the request's end
    dated = (0, "")             # (second, its Date header): made once a second, not per answer

    def date_time_string(self, timestamp=None):
        """The Date header; email.utils formats it in Python, so it is made once a second."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        second = int(time.time())
        if Handler.dated[0] != second:
            Handler.dated = (second, super().date_time_string(second))
        return Handler.dated[1]

    @classmethod
    def for_one_request(cls, server, peer, rfile, wfile, since=None):
        """A handler for the next request of a connection the loop holds (socketserver's way,
        the constructor, serves a connection to its end). `since`: when the connection began to
        wait for this request, which dates its deadline; None for a request already read whole."""
        handler = cls.__new__(cls)
        handler.server, handler.client_address = server, peer.address
        handler.request = handler.connection = peer.connection
        handler.rfile, handler.wfile, handler.since = rfile, wfile, since
        handler.authenticated, handler.close_connection = peer.authenticated, True
        return handler

    def parse_request(self):
        """The request line and header fields, small and strict (http.server parses headers
        through the email package, a quarter of this server's Python time): `METHOD target
        HTTP/1.x`, at most MAX_HEADERS lines of `Name: value` (no space before the colon); a
        folded line is kept folded for check_framing to refuse. On a malformed request, the
        error is sent and False returned."""
        self.command, self.request_version, self.close_connection = None, "HTTP/1.0", True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        match = REQUEST_LINE.fullmatch(self.requestline)
        if not match:
            self.send_error(400, f"Bad request line ({self.requestline[:100]!r})")
            return False
        self.command, self.path, self.request_version = match.group(1, 2, 3)
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")    # never an absolute URI without a scheme
        try:
            self.headers = read_headers(self.rfile)
        except ValueError as e:
            self.send_error(431 if "over" in str(e) else 400, str(e))
            return False
        connection = self.headers.get("Connection", "").lower()
        self.close_connection = self.request_version == "HTTP/1.0" and connection != "keep-alive" \
            or connection == "close"
        if self.headers.get("Expect", "").lower() == "100-continue" and self.request_version == "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def await_body(self):
        """A body read from the socket is under the request's deadline too, stretched by the time
        its length takes at MIN_BODY_RATE, and the connection stays displaceable until it has
        come: a client trickling its body holds a slot no longer than one trickling its headers."""
        length = self.headers.get("Content-Length", "")
        if self.body_pending and self.since is not None and length.isdigit():
            self.server.awaiting(self, self.since, int(length) / MIN_BODY_RATE)
        else:
            self.server.not_awaiting(self)

    def handle_expect_100(self):
        """The interim answer leaves at once: the client waits for it before sending its body."""
        super().handle_expect_100()
        self.wfile.flush()
        return True

    def handle_one_request(self):
        """While it waits for a request's line and headers, the connection has a deadline and may
        be displaced by a new one when every slot is taken (see P3SServer); a request the loop
        read whole (`since` None) waits for nothing."""
        if self.since is not None:
            self.server.awaiting(self, self.since)
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True    # the client left before its answer was sent
        finally:
            self.server.not_awaiting(self)

    def do_GET(self):
        self.dispatch("GET")

    def do_HEAD(self):
        """A GET's status and headers without its body (uptime checkers, `curl -I`)."""
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def dispatch(self, method):
        self.server.service.broker.count("http_requests")
        url = urlsplit(self.path)
        self.body_pending = (self.headers.get("Content-Length", "0") not in ("", "0")
                             or "Transfer-Encoding" in self.headers)
        self.await_body()
        try:
            self.check_framing(method)
        except ApiError as e:           # the stream can no longer be trusted: answer, then close
            self.close_connection = self.body_pending = True
            return self.send_json(e.status, {"error": e.message})
        if not self.host_allowed():
            host = self.headers.get("Host", "")
            return self.send_json(421, {"error": f"Host: {host[:100]!r} is not a name of this server; "
                                                 "start it with --allow-host NAME to serve it by that name"})
        if method == "GET" and (not url.path.startswith("/api/") or url.path in PAGE_APIS):
            return self.serve_page(url)
        if method == "POST" and url.path in FORM_PATHS:
            return self.serve_form(url.path)
        try:
            name, groups, parts, auth = self.find_route(method, url.path)
            caller = None
            if auth is None and self.server.private_pages and url.path != "/api/health":
                auth = SHIFTER                  # a read, from a user
            if auth in ROLES or auth == REGISTER:
                caller = self.check_token(auth)
                self.authenticated = True       # proved: its body may take its time, undisplaced
            raw = self.read_raw() if method in ("POST", "PUT") else b""
            request = {"body": parse_json_body(raw) if raw.strip() and "body" in parts else {}, "raw": raw,
                       "query": {k: v[-1] for k, v in parse_qs(url.query).items()},
                       "who": caller and caller.name,
                       "secret": self.headers.get("X-P3S-Pilot-Secret", "")}
            result = operation(self.server.service, name)(*groups, *(request[p] for p in parts))
            self.authenticated = self.authenticated or auth is not None
            self.send_json(200, result)
        except ApiError as e:
            self.send_json(e.status, {"error": e.message})
        except CLIENT_GONE:
            self.close_connection = True    # it stopped sending (or left): nothing to answer
        except WriterBusy:
            raise                           # the connection loop's: a thread serves it again
        except Exception as e:
            self.answer_failure(e)

    def answer_failure(self, error):
        """The answer to a request that failed for the server's sake: 503 while the disk is full
        (it works again once space is freed), else 500, and the traceback in the log."""
        if is_disk_full(error):
            return self.send_json(503, {"error": "disk full: the server cannot store anything until space is freed"})
        log.error("%s %s failed", self.command, self.path, exc_info=error)
        self.send_json(500, {"error": "internal server error; see the server log"})

    def check_framing(self, method):
        """RFC 9112, strictly, so that no proxy in front and this server can disagree on where a
        request ends (request smuggling): no Transfer-Encoding, no folded header lines, one
        Content-Length of digits only; a body on a method that takes none is read and dropped
        (never left on the connection to be read as the next request)."""
        if "Transfer-Encoding" in self.headers:
            raise ApiError(501, "Transfer-Encoding: not supported; send a Content-Length")
        if any("\n" in value or "\r" in value for value in self.headers.values()):
            raise bad("headers: a folded (obs-fold) header line is not allowed")
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1:
            raise bad("Content-Length: given more than once")
        if lengths and not re.fullmatch(r"[0-9]{1,15}", lengths[0]):
            raise bad("Content-Length: must be digits only")
        length = int(lengths[0]) if lengths else 0
        if method not in ("POST", "PUT") and length:
            if length > self.server.max_body:
                raise ApiError(413, f"body: {length} bytes is over the limit of {self.server.max_body}")
            self.read_exactly(length)
            self.body_pending = False

    def read_exactly(self, length):
        """Read `length` bytes of body; a client that stops sending first gets a 400 and the close."""
        data = self.rfile.read(length) if length > 0 else b""
        if len(data) != length:
            raise bad(f"body: {len(data)} of {length} bytes arrived before the client stopped sending")
        return data

    def serve_page(self, url):
        """HTML pages, their JSON twins (?format=json), the CSV of /runs (?format=csv), the
        pages that are also API reads (PAGE_APIS), /metrics, /file and /signin."""
        query = PageQuery((k, v[-1]) for k, v in parse_qs(url.query).items())
        query.target = url.path + ("?" + url.query if url.query else "")
        if url.path in PAGE_APIS:
            url, query["format"] = url._replace(path=PAGE_APIS[url.path]), query.get("format") or "json"
        as_json = query.get("format") == "json"
        views = self.server.views
        try:
            query.viewer = self.viewer()
            if url.path == "/signin":
                return self.send_html(200, render_signin(query))
            if self.server.private_pages and query.viewer is None and not self.token_reader():
                return self.ask_to_sign_in(query, as_json or url.path == "/metrics")
            if url.path == "/metrics":
                data = views.metrics(query)
                return (self.send_json(200, data) if as_json else
                        self.send_bytes(200, render_metrics(data).encode(), "text/plain; version=0.0.4"))
            if url.path == "/file":
                return self.serve_file(query.get("path", ""), query, as_json)
            match = IMAGE_PATH.fullmatch(url.path)
            if match:
                return self.send_file(*self.server.service.images.open(as_uuid(match["uuid"], "uuid"),
                                                                        unquote(match["name"])))
            for regex, name, render in PAGES:
                match = regex.match(url.path)
                if match:
                    groups = [as_uuid(v, "uuid") if k == "uuid" else unquote(v)
                              for k, v in match.groupdict().items()]
                    data = getattr(views, name)(*groups, query)
                    if query.get("format") == "csv":
                        return self.send_csv(name, data)
                    return self.send_json(200, data) if as_json else self.send_html(200, render(data, query))
            raise ApiError(404, f"{url.path}: no such page")
        except ApiError as e:
            if as_json:
                return self.send_json(e.status, {"error": e.message})
            self.send_html(e.status, page(f"Error {e.status}", f"<p>{esc(e.message)}</p>", {}))
        except Exception:
            log.exception("GET %s failed", self.path)
            self.send_html(500, page("Error 500", "<p>internal server error; see the server log</p>", {}))

    # -- the pages' sign-in and actions (plain HTML forms: POST, then a redirect) ----------------
    def viewer(self):
        """The Viewer of this request's session cookie, if it is live."""
        cookie = self.session_cookie()
        found = cookie and self.server.service.users.session(cookie)
        return Viewer(*found) if found else None

    def session_cookie(self):
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == SESSION_COOKIE:
                return value
        return ""

    def token_reader(self):
        """Whether a --private-pages read carries a user's token (a script, Prometheus)."""
        header = self.headers.get("Authorization", "")
        caller = self.server.identify(header[7:]) if header.startswith("Bearer ") else None
        return caller is not None and caller.role is not None

    def ask_to_sign_in(self, query, as_data):
        if as_data:
            return self.send_json(401, {"error": "Authorization: these pages are private (--private-pages); "
                                                 "sign in, or send a user's token"})
        self.redirect(href("/signin", next=query.target))

    def serve_form(self, path):
        """A form posted from our own pages: /signin, /signout, or /act (one of PAGE_ACTIONS).
        Each must come from this server's own pages (Origin) and, but for the sign-in, carry its
        session's CSRF token; a refusal is an error page that changes nothing."""
        viewer, fields = None, {}
        try:
            fields = self.read_form()
            if path == "/signin":
                return self.sign_in(fields)
            viewer = self.viewer()
            if viewer is None:
                raise ApiError(401, "sign in first: your session has ended, or you never signed in")
            if not hmac.compare_digest(fields.get("csrf", "").encode(), viewer.csrf.encode()):
                raise ApiError(403, "csrf: this form is not from your session's page; reload the page and try again")
            if path == "/signout":
                self.server.service.users.sign_out(self.session_cookie())
                return self.redirect("/", f"{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict")
            self.page_action(viewer, fields)
        except ApiError as e:
            query = PageQuery()
            query.viewer, back = viewer, local_path(fields.get("back", "/"))
            self.send_html(e.status, page(f"Not done ({e.status})", f'<p class="why">{esc(e.message)}</p>'
                                                                     f"<p>{link(back, '← back')}</p>", query))
        except WriterBusy:
            raise
        except Exception as e:
            self.answer_failure(e)

    def read_form(self):
        """The fields of a urlencoded form from this server's own pages."""
        origin = self.headers.get("Origin") or self.headers.get("Referer") or ""
        if urlsplit(origin).netloc.lower() != self.headers.get("Host", "").lower() or not origin:
            raise ApiError(403, f"Origin: {origin[:100]!r} is not this server's pages; a form may only be "
                                "sent from them")
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            raise ApiError(415, "Content-Type: a form must be application/x-www-form-urlencoded")
        raw = self.read_raw()
        return {k: v[-1] for k, v in parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True).items()}

    def sign_in(self, fields):
        """A token proved once opens a session: an HttpOnly, SameSite=Strict cookie."""
        caller = self.server.identify(fields.get("token", "").strip())
        if caller is None or caller.role is None:
            query = PageQuery(next=fields.get("next", "/"))
            return self.send_html(403, render_signin(query, "wrong token: give the token of a user "
                                                            "(server.py --add-user) or the write token"))
        session, _ = self.server.service.users.sign_in(caller)
        secure = "; Secure" if self.headers.get("X-Forwarded-Proto", "").lower() == "https" else ""
        self.redirect(local_path(fields.get("next", "/")),
                      f"{SESSION_COOKIE}={session}; Path=/; Max-Age={int(self.server.service.users.session_hours * 3600)}; "
                      f"HttpOnly; SameSite=Strict{secure}")

    def page_action(self, viewer, fields):
        """Do one of PAGE_ACTIONS as the viewer, through the API's own operation and role; a
        dry run (retry_failed before its confirmation) shows what it would do instead."""
        action = fields.get("action", "")
        if action not in PAGE_ACTIONS:
            raise bad(f"action: {action!r} is not one of {', '.join(PAGE_ACTIONS)}")
        name, request = PAGE_ACTIONS[action]
        parts, role = WRITES[name]
        if not viewer.caller.may(role):
            raise ApiError(403, f"{action}: user {viewer.caller.name} is a {viewer.caller.role}; this needs the "
                                f"{role} role")
        args, body = request(fields)
        given = {"body": body, "who": viewer.caller.name}
        result = operation(self.server.service, name)(*args, *(given[p] for p in parts))
        if body.get("dry_run"):
            query = PageQuery()
            query.viewer, query.target = viewer, local_path(fields.get("back", "/"))
            return self.send_html(200, render_confirm(action, fields, result, query))
        self.redirect(local_path(fields.get("back", "/")))

    def redirect(self, location, cookie=None):
        """303 See Other: after a form, the browser GETs the page it came from."""
        try:
            self.send_response(303)
            self.send_header("Location", location)
            if cookie:
                self.send_header("Set-Cookie", cookie)
            self.send_header("Content-Length", "0")
            self.end_headers()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def send_csv(self, name, data):
        if name not in CSV_PAGES:
            raise ApiError(400, "format: csv is served for /runs only (json for every page)")
        self.send_bytes(200, CSV_PAGES[name](data).encode(), "text/csv; charset=utf-8")

    def serve_file(self, path, query, as_json):
        views = self.server.views
        fd, st = views.open_checked(path)
        if stat.S_ISDIR(st.st_mode):
            try:
                data = views.listing(fd, path)
            finally:
                os.close(fd)
            return self.send_json(200, data) if as_json else self.send_html(200, render_listing(data, query))
        self.send_file(fd, file_type(path, os.pread(fd, 4096, 0)))    # the fd checked, never the path again

    def send_file(self, fd, mime):
        """Stream a file with a Content-Type that cannot script our pages: images as images
        (SVG under a policy that runs nothing), everything else as plain text."""
        with open(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                self.send_response(200)
                self.send_header("Content-Type", mime)
                self.send_header("Content-Length", str(size))
                if mime == IMAGE_TYPES[".svg"]:
                    self.send_header("Content-Security-Policy", SVG_POLICY)
                self.end_headers()
                left = size if self.command != "HEAD" else 0
                while left > 0:
                    chunk = f.read(min(left, 1 << 16))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass

    def end_headers(self):
        self.send_header("X-Content-Type-Options", "nosniff")     # every answer: no guessing types
        super().end_headers()

    def send_html(self, status, text):
        self.send_bytes(status, text.encode(), "text/html; charset=utf-8")

    def find_route(self, method, path):
        """The route of `method` matching `path` (only this method's paths are matched: a
        pilot's report passes no GET); a 405 if another method's does, else a 404."""
        for regex, name, parts, auth in ROUTES.get(method, ()):
            match = regex.match(path)
            if match:
                groups = {k: unquote(v) for k, v in match.groupdict().items()}
                if "uuid" in groups:
                    groups["uuid"] = as_uuid(groups["uuid"], "uuid")
                return name, list(groups.values()), parts, auth
        if any(regex.match(path) for routes in ROUTES.values() for regex, *_ in routes):
            raise ApiError(405, f"{method} {path}: method not allowed")
        raise ApiError(404, f"{path}: no such endpoint")

    def host_allowed(self):
        """Only names this server answers to (DNS rebinding: a web page must not read a
        loopback-only server through a name of its own that resolves to 127.0.0.1)."""
        host = self.headers.get("Host", "")
        name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        return not name or name.lower() in self.server.allowed_hosts or is_ip(name)

    def check_token(self, auth):
        """The Caller a request's token proves, if it may do what `auth` asks: the write token
        passes everywhere, a user's token up to its role, the pilot token only where pilots
        register."""
        header = self.headers.get("Authorization", "")
        given = header[7:] if header.startswith("Bearer ") else ""
        if not given:
            raise ApiError(401, "Authorization: missing token; set P3S_TOKEN or P3S_TOKEN_FILE")
        caller = self.server.identify(given)
        if caller is None:
            raise ApiError(403, "Authorization: wrong token")
        if caller.role is None:
            if auth == REGISTER:
                return caller
            raise ApiError(403, "Authorization: the pilot token may only register pilots")
        needed = EXPERT if auth == REGISTER else auth
        if not caller.may(needed):
            raise ApiError(403, f"Authorization: user {caller.name} is a {caller.role}; this needs the "
                                f"{needed} role (server.py --add-user NAME --role {needed})")
        return caller

    def read_raw(self):
        """The request body, at most max_body bytes (413 above, and the body dropped)."""
        length = int(self.headers.get("Content-Length", "0"))     # digits only: check_framing
        if length > self.server.max_body:
            self.discard(length)
            raise ApiError(413, f"body: {length} bytes is over the limit of {self.server.max_body}; "
                                "send less at a time (job.py splits big submissions itself)")
        raw = self.read_exactly(length)
        self.body_pending = False
        self.server.not_awaiting(self)      # what follows is the server's time, not the client's
        return raw

    def discard(self, length):
        """Read and drop an oversized body (up to DISCARD_LIMIT), so the client sees the 413
        instead of a connection reset; past the limit, the connection is closed."""
        left = min(length, DISCARD_LIMIT)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)
        self.close_connection = True

    def send_json(self, status, obj):
        self.send_bytes(status, json.dumps(obj).encode(), "application/json")

    def send_bytes(self, status, data, ctype):
        try:
            self.send_response(status)
            if getattr(self, "body_pending", False):    # refused before its body was read: the
                self.send_header("Connection", "close")     # rest of the stream is not a request
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass    # the client gave up; a pilot's retry will ask again

    def log_message(self, fmt, *args):
        if log.isEnabledFor(logging.DEBUG):     # every answer is logged: format only when shown
            log.debug("%s %s", self.client_address[0], fmt % args)


class P3SServer(HTTPServer):
    """HTTPServer that no crowd can deny; it accepts connections and its ConnectionLoop serves
    them. Connections served at once are capped; when every slot is taken, a new connection
    displaces the oldest one idling before a request that never proved a token or secret, else
    gets a quick 503 and close. One address holds at most max_per_client connections (loopback
    and --pilot-net addresses are not limited). A request's line and headers must arrive within
    `header_timeout` in all: a client trickling a byte at a time is cut off there.

    Methods for the caller: serve_forever() and the rest of socketserver's; awaiting(waiter) and
    not_awaiting(waiter), from the loop (a Peer) and the Handler, around the wait for a request;
    release(ip) once a connection is closed."""
    request_queue_size = 1024

    def __init__(self, address, service, views, token, max_body=MAX_BODY, pilot_token="",
                 allowed_hosts=(), max_connections=MAX_CONNECTIONS, max_per_client=MAX_PER_CLIENT,
                 pilot_nets=(), header_timeout=HEADER_TIMEOUT, private_pages=False):
        self.service, self.views, self.token, self.max_body = service, views, token, max_body
        self.private_pages = private_pages          # reading needs a sign-in or a token too
        self.header_timeout = header_timeout
        self.stopping = False                       # set by stop_soon
        self.pilot_token = pilot_token
        self.slots = threading.BoundedSemaphore(max_connections)
        self.max_per_client = max_per_client
        self.unlimited = [ipaddress.ip_network(n, strict=False) for n in ("127.0.0.1/32", "::1/128", *pilot_nets)]
        self.conn_lock = threading.Lock()
        self.per_client = collections.Counter()     # open connections by client address
        self.idle = {}                              # handler -> (deadline, since): awaiting a request
        super().__init__(address, Handler)
        names = {address[0], *LOOPBACK_NAMES, socket.gethostname(), socket.getfqdn(), *allowed_hosts}
        self.allowed_hosts = {n.lower() for n in names if n}
        threading.Thread(target=self.enforce_deadlines, name="deadlines", daemon=True).start()
        self.loop = ConnectionLoop(self)

    def identify(self, token):
        """The Caller a token proves, or None: the write token, the pilot token (no role), or a
        named user's."""
        if hmac.compare_digest(token.encode(), self.token.encode()):
            return Caller(SHARED_USER, ADMIN)
        if self.pilot_token and hmac.compare_digest(token.encode(), self.pilot_token.encode()):
            return Caller("pilot", None)
        return self.service.users.by_token(token)

    def stop_soon(self):
        """Leave serve_forever at once, between two requests: a flag it reads after each turn
        (service_actions), and a connection of our own that wakes its wait for connections."""
        self.stopping = True
        threading.Thread(target=self.wake_listener, daemon=True).start()

    def wake_listener(self):
        with contextlib.suppress(OSError):
            socket.create_connection(self.server_address[:2], timeout=1).close()

    def service_actions(self):
        if self.stopping:
            raise Stopping

    def awaiting(self, handler, since=None, more=0.0):
        """`handler` (or a Peer) waits for a request, since `since` (monotonic; default now), for
        header_timeout, and `more` seconds for a body that long."""
        t = time.monotonic() if since is None else since
        with self.conn_lock:
            self.idle[handler] = (t + self.header_timeout + more, t)

    def not_awaiting(self, handler):
        with self.conn_lock:
            self.idle.pop(handler, None)

    def enforce_deadlines(self):
        """Cut off connections whose request has not arrived in full by its deadline."""
        while True:
            time.sleep(0.5)
            t = time.monotonic()
            with self.conn_lock:
                late = [h for h, (deadline, _) in self.idle.items() if deadline < t]
            for handler in late:
                cut_off(handler.connection)

    def limited(self, ip):
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return True
        return not any(address in net for net in self.unlimited)

    def refuse(self, request, why):
        try:
            request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Connection: close\r\n\r\n" + json.dumps({"error": why}).encode())
        except OSError:
            pass
        self.shutdown_request(request)

    def take_slot(self):
        """A slot for a new connection: a free one, or one freed by displacing the oldest idle
        connection that never proved a token or secret."""
        if self.slots.acquire(blocking=False):
            return True
        with self.conn_lock:
            anonymous = [(since, h) for h, (_, since) in self.idle.items() if not h.authenticated]
            victim = min(anonymous, key=lambda pair: pair[0])[1] if anonymous else None
            if victim is not None:
                del self.idle[victim]
        if victim is None:
            return False
        cut_off(victim.connection)
        return self.slots.acquire(timeout=1.0)

    def process_request(self, request, client_address):
        ip = client_address[0]
        with self.conn_lock:
            crowded = self.limited(ip) and self.per_client[ip] >= self.max_per_client
        if crowded:
            return self.refuse(request, f"server busy: at most {self.max_per_client} connections from one address")
        if not self.take_slot():
            return self.refuse(request, "server busy: too many connections; retry later")
        with self.conn_lock:
            self.per_client[ip] += 1
        with contextlib.suppress(OSError):     # answers go out without waiting for an ACK
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.loop.adopt(Peer(request, client_address))

    def release(self, ip):
        with self.conn_lock:
            self.per_client[ip] -= 1
            if not self.per_client[ip]:
                del self.per_client[ip]
        self.slots.release()


LOOP_HEAD = 64 * 1024       # bytes of a request's line and headers the loop waits for, then a thread reads
LOOP_BODY = 256 * 1024      # a report's body, two 64 KiB tails and more, at most; bigger ones go to a thread
LOOP_INBOX = LOOP_HEAD + LOOP_BODY  # bytes read ahead of one connection at most, while its request is served
LOOP_ROUNDS = 8             # reads of the ready connections one turn makes at most, then it commits
HOT_REQUEST = re.compile(rb"POST /api/(?:jobs/[^/?\s]{1,64}/(report)|pilots/[^/?\s]{1,64}/heartbeat)"
                         rb"(?:\?\S*)? HTTP/1\.1\r\n")
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,15})[ \t]*\r\n", re.I)
ODD_HEADER = re.compile(rb"\r\n(?:transfer-encoding|expect)[ \t]*:|\r\n[ \t]", re.I)   # a thread's to read
TO_THREAD = "thread"
IDLE_WORKERS = 16           # threads kept waiting for the loop's next hand-off


class Peer:
    """A client connection while the loop holds it: what has arrived of its next request, what is
    left to send of its last answer, and whether it proved a token or secret (see take_slot)."""

    def __init__(self, connection, address):
        self.connection, self.address = connection, address
        self.inbox, self.outbox = bytearray(), bytearray()
        self.authenticated = self.answering = False
        self.closing = False    # close it once its answer is sent (Connection: close, an error)
        self.ended = False      # it sent all it will: answer what came whole, then close
        self.events = 0         # what the loop's selector watches it for
        self.since = None       # when it began to wait for its next request: a thread's deadline


class Replay(io.RawIOBase):
    """A connection's stream for a thread's handler: first the bytes the loop read already, then
    the socket."""

    def __init__(self, head, connection):
        super().__init__()
        self.head = bytes(head)
        self.socket = socket.SocketIO(connection, "rb")

    def readable(self):
        return True

    def readinto(self, buffer):
        if not self.head:
            return self.socket.readinto(buffer)
        n = min(len(buffer), len(self.head))
        buffer[:n], self.head = self.head[:n], self.head[n:]
        return n

    def close(self):
        self.socket.close()     # else the socket's own close would wait for this reader's
        super().close()


class Answer:
    """An answer the loop wrote in a turn, sent once the turn's commit is durable."""

    def __init__(self, peer, handler, joined):
        self.peer, self.handler, self.joined = peer, handler, joined


class Workers:
    """Threads for the requests the loop hands off. An idle one takes the next request, else a
    new one starts (a long poll holds its thread for up to MAX_WAIT, so there is no cap but the
    connections'); at most IDLE_WORKERS wait for work, the others end."""

    def __init__(self):
        self.tasks = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0

    def run(self, fn, *args):
        with self.lock:
            if self.idle:
                self.idle -= 1
                return self.tasks.put((fn, args))
        threading.Thread(target=self.work, args=(fn, args), daemon=True).start()

    def work(self, fn, args):
        while True:
            fn(*args)
            with self.lock:
                if self.idle >= IDLE_WORKERS:
                    return
                self.idle += 1
            fn, args = self.tasks.get()


class ConnectionLoop:
    """One thread watches every connection between its requests (selectors), and serves the
    pilots' reports and heartbeats itself: a turn reads every ready connection, runs their
    requests through the Handler, commits their writes once, then sends the answers. The
    threads a server had per connection cost each other as much CPU as the requests themselves
    (measured in docs/benchmarks.md), and the answers of a turn share one group commit. Any
    other request, and any the loop does not see plainly framed (no Content-Length, a
    Transfer-Encoding, Expect, a folded line, a bare LF, a head or body too big to buffer), is
    read and answered on the socket by a worker thread (Workers), the Handler as it always was,
    and the connection comes back to the loop afterwards. So is a report whose write would wait,
    for our write lock (a big submission) or for the database (an outside sqlite3 shell): the
    loop never waits for a writer, so no heartbeat does (WriterBusy). Deadlines and
    displacement stay the server's (awaiting)."""

    def __init__(self, server):
        self.server, self.store = server, server.service.store
        self.selector = selectors.DefaultSelector()
        self.arrivals = queue.SimpleQueue()
        self.wake_in, self.wake_out = socket.socketpair()
        for end in (self.wake_in, self.wake_out):
            end.setblocking(False)
        self.selector.register(self.wake_in, selectors.EVENT_READ)
        self.ready = set()      # peers whose inbox may hold a request to serve
        self.workers = Workers()
        threading.Thread(target=self.run, name="connections", daemon=True).start()

    def adopt(self, peer):
        """Take a connection (new, or back from a thread); thread-safe."""
        self.arrivals.put(peer)
        with contextlib.suppress(BlockingIOError):     # full: a wake-up is pending already
            self.wake_out.send(b"x")

    def run(self):
        self.store.keep_reader()
        while True:
            try:
                self.turn(self.selector.select(0 if self.ready else None))
            except Exception:       # a bug must not leave every connection unserved
                log.exception("the connection loop's turn failed")
                time.sleep(0.1)

    def turn(self, events):
        answers = []
        for _ in range(LOOP_ROUNDS):
            self.take(events)
            answers += self.serve_ready()
            if len(answers) >= MAX_BATCH:
                break
            events = self.selector.select(0)
            if not events:
                break
        failed = self.store.commit_joined([b for a in answers for b in a.joined])
        for answer in answers:
            self.send(answer, next((failed[b] for b in answer.joined if b in failed), None))

    def take(self, events):
        for key, mask in events:
            if key.fileobj is self.wake_in:
                self.welcome()
            elif mask & selectors.EVENT_WRITE:
                self.flush(key.data)
            else:
                self.receive(key.data)

    def welcome(self):
        with contextlib.suppress(OSError):
            self.wake_in.recv(4096)
        while not self.arrivals.empty():
            peer = self.arrivals.get()
            peer.connection.setblocking(False)
            self.await_request(peer)
            self.read_on(peer)

    def receive(self, peer):
        try:
            data = peer.connection.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:                # the client left or shut its side, or its deadline cut it off
            peer.ended = True
            self.watch(peer, 0)
        peer.inbox += data
        if len(peer.inbox) >= LOOP_INBOX:
            self.watch(peer, 0)     # read on once what it sent is served
        self.ready.add(peer)

    def serve_ready(self):
        answers = []
        for peer in list(self.ready):
            self.ready.discard(peer)
            if peer.outbox or peer.answering:
                continue            # its last answer first: flush() makes it ready again
            request = self.next_request(peer)
            if request is TO_THREAD:
                self.hand_to_thread(peer)
            elif request is not None:
                answers += self.serve_here(peer, request)
            elif peer.ended:        # nothing whole left of what it sent
                self.close(peer)
        return answers

    def next_request(self, peer):
        """A hot request whole (its bytes, taken from the inbox), TO_THREAD, or None: wait."""
        inbox = peer.inbox
        if inbox.find(b"\n", 0, LOOP_HEAD) < 0:
            return TO_THREAD if len(inbox) > LOOP_HEAD else None
        hot = HOT_REQUEST.match(inbox)
        if not hot or hot[1] and self.store.write_lock.locked():
            return TO_THREAD        # a report waits for a long writer (a big submission) in a thread
        head_end = inbox.find(b"\r\n\r\n", 0, LOOP_HEAD)
        if head_end < 0:
            bare_lf = inbox.count(b"\n") != inbox.count(b"\r\n")
            return TO_THREAD if bare_lf or len(inbox) > LOOP_HEAD else None
        head = bytes(inbox[:head_end + 2])
        lengths = CONTENT_LENGTH.findall(head)
        if len(lengths) != 1 or ODD_HEADER.search(head) or head.count(b"\n") != head.count(b"\r\n") \
                or int(lengths[0]) > min(LOOP_BODY, self.server.max_body):
            return TO_THREAD
        end = head_end + 4 + int(lengths[0])
        if len(inbox) < end:
            return None
        request = bytes(inbox[:end])
        del inbox[:end]
        return request

    def serve_here(self, peer, request):
        """[its Answer], or [] when its write would wait for the database: a thread then serves
        it, and the loop goes on (see WriterBusy)."""
        self.server.not_awaiting(peer)
        handler = Handler.for_one_request(self.server, peer, io.BytesIO(request), io.BytesIO())
        try:
            with self.store.commit_later() as joined:
                handler.handle_one_request()
        except WriterBusy:
            peer.inbox[:0] = request
            self.hand_to_thread(peer)
            return []
        peer.answering = True
        peer.authenticated = handler.authenticated
        return [Answer(peer, handler, joined)]

    def send(self, answer, error):
        """Send an answer, or, when the commit it waited for failed, what a thread's request
        would have answered then."""
        handler = answer.handler
        if error is not None:
            handler.wfile = io.BytesIO()
            handler.answer_failure(error)
        peer = answer.peer
        peer.outbox += handler.wfile.getvalue()
        peer.closing = handler.close_connection
        peer.answering = False
        self.flush(peer)

    def flush(self, peer):
        try:
            sent = peer.connection.send(peer.outbox)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return self.close(peer)
        del peer.outbox[:sent]
        if peer.closing and not peer.outbox:
            return self.close(peer)
        self.await_request(peer)
        if peer.outbox:             # a client slow to read: the rest when it can take it, by its deadline
            self.watch(peer, selectors.EVENT_WRITE)
        else:
            self.read_on(peer)

    def read_on(self, peer):
        """Serve what it sent, and read more of it only while the loop holds less than
        LOOP_INBOX of it: a client that sends faster than it is answered waits in its kernel
        buffers, not in the server's memory. (At LOOP_INBOX its next request is whole, or is a
        thread's to read, so serving it always makes room.) One that shut its side is read no
        more: what it sent whole is answered, then it is closed."""
        reading = not peer.ended and len(peer.inbox) < LOOP_INBOX
        self.watch(peer, selectors.EVENT_READ if reading else 0)
        if peer.inbox or peer.ended:
            self.ready.add(peer)

    def await_request(self, peer):
        """From now, its next request (or the rest of its answer) has the server's deadline."""
        peer.since = time.monotonic()
        self.server.awaiting(peer, peer.since)

    def watch(self, peer, events):
        if events == peer.events:
            return
        if not peer.events:
            self.selector.register(peer.connection, events, peer)
        elif events:
            self.selector.modify(peer.connection, events, peer)
        else:
            self.selector.unregister(peer.connection)
        peer.events = events

    def hand_to_thread(self, peer):
        self.watch(peer, 0)
        self.server.not_awaiting(peer)     # the thread's handler awaits it now
        try:
            self.workers.run(self.serve_in_thread, peer)
        except RuntimeError as e:           # the process's thread limit: this client retries
            log.warning("cannot start a thread for a request from %s (%s): connection closed; "
                        "raise the server's limit of processes and threads (ulimit -u)", peer.address[0], e)
            self.end(peer)

    def serve_in_thread(self, peer):
        """One request read and answered by the Handler on the socket itself, as a thread per
        connection did; a kept connection goes back to the loop with what was read beyond it."""
        connection = peer.connection
        try:
            connection.settimeout(self.server.header_timeout)
            with io.BufferedReader(Replay(peer.inbox, connection), 1 << 16) as rfile:
                with connection.makefile("wb", Handler.wbufsize) as wfile:
                    handler = Handler.for_one_request(self.server, peer, rfile, wfile, since=peer.since)
                    handler.handle_one_request()
                if handler.close_connection:
                    return self.end(peer)
                connection.setblocking(False)
                peer.inbox = bytearray(rfile.peek() + rfile.raw.head)
            peer.authenticated = handler.authenticated
            self.adopt(peer)
        except OSError:
            self.end(peer)
        except Exception:
            log.exception("a request from %s failed", peer.address[0])
            self.end(peer)

    def close(self, peer):
        self.watch(peer, 0)
        self.ready.discard(peer)
        self.end(peer)

    def end(self, peer):
        """Close a connection the loop no longer watches, and free its slot."""
        self.server.not_awaiting(peer)
        self.server.shutdown_request(peer.connection)
        self.server.release(peer.address[0])


def cut_off(connection):
    """End a connection from another thread: its blocked read returns at once."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


################################################################################################
# CLI
################################################################################################
def floor_problem(python=sys.version_info, sqlite=sqlite3.sqlite_version_info):
    """None if this Python and sqlite are at or above the floor, else one line saying what to do."""
    if tuple(python[:2]) < MIN_PYTHON:
        return (f"Python {'.'.join(map(str, python[:3]))} is older than {'.'.join(map(str, MIN_PYTHON))}, "
                "the oldest p3s runs on; use python3.9 or newer (lxplus: /usr/bin/python3)")
    if tuple(sqlite) < MIN_SQLITE:
        return (f"sqlite {'.'.join(map(str, sqlite))} is older than {'.'.join(map(str, MIN_SQLITE))}, "
                "the oldest p3s runs on; run the server on a node with RHEL 8 or newer, or point "
                "LD_LIBRARY_PATH at a newer libsqlite3")
    return None


def filesystem_type(path, mountinfo="/proc/self/mountinfo"):
    """The type of the filesystem holding `path` (e.g. 'ext4', 'afs', 'fuse.eos'), from the
    mount with the longest mount point above it; None if /proc is not there to say."""
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    path = os.path.realpath(path)
    best, best_type = "", None
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, rest.split()[0]
    return best_type


def is_network_fs(fstype):
    return bool(fstype) and fstype != "fuseblk" and (fstype in NETWORK_FS or fstype.startswith("fuse."))


def check_db_filesystem(db_path, allow_network_fs, mountinfo="/proc/self/mountinfo"):
    """Refuse a database on a network filesystem, unless allowed."""
    db_dir = os.path.dirname(os.path.abspath(db_path))
    fstype = filesystem_type(db_dir, mountinfo)
    if is_network_fs(fstype) and not allow_network_fs:
        raise StartupError(f"--db {db_path}: {db_dir} is on {fstype}, a network filesystem where sqlite's "
                           "locking is unsafe; put the database on a local disk, e.g. --db "
                           f"/var/tmp/{os.environ.get('USER', 'p3s')}/p3s.db (or --allow-network-fs)")


def warn_token_on_afs(token_source):
    if os.path.isfile(token_source) and filesystem_type(token_source) in ("afs", "openafs"):
        log.warning("token file %s is on AFS, whose directory ACLs ignore its mode 0600: anyone who "
                    "may read that directory may write to p3s; use --token-file on a local disk "
                    "or in a private AFS directory", token_source)


def is_network(text):
    try:
        ipaddress.ip_network(text, strict=False)
        return True
    except ValueError:
        return False


def is_ip(name):
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


FD_RESERVE = 64        # descriptors kept for the listening socket, logs, the writer, /file and images
FDS_PER_READER = 3     # a sqlite reader: the database, its WAL and its shared memory


def connections_for_descriptors(connections, readers=MAX_READERS):
    """Raise the soft descriptor limit toward the hard one, then the connection cap that fits in
    it beside the readers: a flood gets quick 503s, never failed accepts or "unable to open
    database file"."""
    want = connections + readers * FDS_PER_READER + FD_RESERVE
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < want:
            soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    except (ImportError, ValueError, OSError):
        return connections
    if soft == resource.RLIM_INFINITY or soft >= want:
        return connections
    fits = max(16, soft - readers * FDS_PER_READER - FD_RESERVE)
    log.warning("--max-connections %d lowered to %d: the file descriptor limit is %d (ulimit -n)",
                connections, fits, soft)
    return fits


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token_file(path, option):
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as e:
        raise StartupError(f"{option} {path}: {e.strerror}") from None
    if not token:
        raise StartupError(f"{option} {path}: the file is empty")
    return token


def load_pilot_token(path, token):
    """The optional pilot token: it may register pilots and nothing else."""
    if not path:
        return ""
    pilot_token = read_token_file(path, "--pilot-token-file")
    if pilot_token == token:
        raise StartupError(f"--pilot-token-file {path}: holds the write token; give pilots a token of their own")
    return pilot_token


def load_token(token_file, db_path, host):
    """The write token: --token-file, else $P3S_TOKEN, else one generated beside the database.

    A generated token is only for users of this machine, so the server then binds loopback only."""
    if token_file:
        return read_token_file(token_file, "--token-file"), token_file
    if os.environ.get("P3S_TOKEN"):
        return os.environ["P3S_TOKEN"].strip(), "$P3S_TOKEN"
    if not is_loopback(host):
        raise StartupError(f"--host {host}: a non-loopback address needs a token (--token-file or P3S_TOKEN)")
    path = os.path.splitext(db_path)[0] + ".token"
    if not os.path.exists(path):
        write_new_token(path)
    with open(path) as f:
        return f.read().strip(), path


def write_new_token(path):
    """A fresh random token in a new file only its owner may read (never over an existing one);
    returns the token."""
    token = secrets.token_urlsafe(32)
    make_private_dirs(os.path.dirname(os.path.abspath(path)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def make_private_dirs(directory):
    """Make the missing directories down to `directory`, each 0700 whatever the umask
    (os.makedirs gives the parents it makes the umask's mode: 0777 under umask 000)."""
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for made in reversed(missing):
        os.mkdir(made, 0o700)
        os.chmod(made, 0o700)       # mkdir's mode is masked by the umask


def new_token_command(path):
    """server.py --new-token FILE: make a token file and exit (0 made, 2 refused)."""
    try:
        write_new_token(path)
    except FileExistsError:
        print(f"server.py: --new-token {path}: the file exists; use it, or remove it first", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"server.py: --new-token {path}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"wrote a new token to {path} (mode 0600); give it to the server with --token-file and to "
          f"the tools with P3S_TOKEN_FILE")
    return 0


def user_token_path(db_path, name):
    """Where --add-user writes a user's token by default: a private directory beside the database."""
    return os.path.join(os.path.splitext(db_path)[0] + "-users", name + ".token")


def users_command(args):
    """server.py --add-user, --remove-user, --list-users: change the database's users and exit
    (0 done, 2 refused). A running server sees the change at the next request."""
    store = Store(args.db)
    users = Users(store)
    try:
        if args.list_users:
            listed = users.list()
            for u in listed:
                print(f"{u['name']:<32} {u['role']:<8} since {when(u['created'])}")
            if not listed:
                print(f"no named users yet: the write token acts as the admin {SHARED_USER!r}; add one with "
                      "--add-user NAME --role ROLE")
        elif args.remove_user:
            users.remove(args.remove_user)
            print(f"removed user {args.remove_user}: its token and sessions no longer work")
        else:
            add_user(users, args.add_user, args.role, args.user_token_file or user_token_path(args.db, args.add_user))
    except ApiError as e:
        print(f"server.py: {e.message}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


def add_user(users, name, role, path):
    """A new user whose token goes to a new 0600 file at `path` (undone if the user is refused)."""
    users.check(name, role)
    if any(u["name"] == name for u in users.list()):
        raise ApiError(409, f"user: {name!r} exists; --remove-user it first to give a new token")
    try:
        token = write_new_token(path)
    except OSError as e:
        raise ApiError(400, f"--user-token-file {path}: {e.strerror}; remove it first, or give another path")
    try:
        users.add(name, role, token)
    except ApiError:
        os.unlink(path)
        raise
    print(f"added {role} {name}; their token is in {path} (mode 0600): give it to them for P3S_TOKEN_FILE "
          "and the pages' sign-in")


SERVER_EPILOG = """environment:
  P3S_TOKEN       the write token, when no --token-file is given

exit codes:
  0   stopped (SIGTERM, SIGINT), or --new-token or a user command did its work
  1   cannot open the database or listen on the port
  2   a bad option, or a start refused (an old Python or sqlite, a network filesystem, a token problem)"""


class Stopping(Exception):
    """Leaves the serving loop at once, between two requests (see P3SServer.stop_soon)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the tools' convention for bad options: one line on stderr, exit 2
    (the same class as serverAPI.py's, kept here so this file runs alone)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def parse_args(argv):
    p = ArgumentParser(description="p3s server: jobs, pilots and workflows over HTTP/JSON.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SERVER_EPILOG)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--db", default=DEFAULT_DB, help="sqlite database (default p3s.db beside server.py)")
    p.add_argument("--pilot-token-file", metavar="FILE",
                   help="a second token that may only register pilots (for batch accounts that run "
                   "pilots but must not submit, adjust or delete)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a name clients may use for this server besides loopback, its IPs and its host "
                   "name (repeatable); requests naming another Host get 421")
    p.add_argument("--alarm-no-new-work", type=float, default=0, metavar="MINUTES",
                   help="alarm when no data file arrived in a stream (injected or registered) for this "
                        "long (default 0: off)")
    p.add_argument("--alarm-webhook", metavar="URL",
                   help="POST each alarm raised and cleared to URL as JSON {\"text\": ...} (Mattermost, Slack)")
    p.add_argument("--alarm-command", metavar="CMD",
                   help="run CMD for each alarm raised and cleared, with P3S_ALARM_* in its environment")
    p.add_argument("--timelimit-grace", type=float, default=TIMELIMIT_GRACE, metavar="SECONDS",
                   help="a running job whose pilot said nothing this long past its time limit ends timeout "
                        "(default %(default)s)")
    p.add_argument("--breaker-min-failed", type=int, default=BREAKER_MIN_FAILED, metavar="N",
                   help="pause a job type when more than N of its attempts failed in the last hour and they "
                        "are twice those that finished (default %(default)s; 0: never)")
    p.add_argument("--alarm-drift-window", type=float, default=DRIFT_WINDOW, metavar="SECONDS",
                   help="the drift alarm compares a job type's jobs of this last window with the 5 before "
                        "(default %(default)s)")
    p.add_argument("--alarm-repeat", type=float, default=ALARM_REPEAT / 3600, metavar="HOURS",
                   help="an alarm told, still raised and acknowledged by nobody is told again after this "
                        "long (default %(default)s; 0: never)")
    p.add_argument("--alarm-hold", type=float, default=ALARM_HOLD, metavar="SECONDS",
                   help="a condition is raised once it held this long (default %(default)s)")
    p.add_argument("--alarm-clear-hold", type=float, default=ALARM_CLEAR_HOLD, metavar="SECONDS",
                   help="a raised alarm clears once its condition stayed gone this long (default %(default)s)")
    p.add_argument("--alarm-delay", type=float, default=ALARM_DELAY / 60, metavar="MINUTES",
                   help="a warning is sent once it has lasted this long; a critical at once (default %(default)s)")
    p.add_argument("--alarm-lost-share", type=float, default=LOST_SHARE, metavar="FRACTION",
                   help="pilots_lost is critical past this share of the pilots (default %(default)s)")
    p.add_argument("--alarm-lost-count", type=int, default=LOST_COUNT, metavar="N",
                   help="... or past this many lost in an hour (default %(default)s)")
    p.add_argument("--alarm-lifetime-pilots", type=int, default=LIFETIME_MIN_ENDED, metavar="N",
                   help="pilot_lifetime needs at least N pilots lost in the hour (default %(default)s)")
    p.add_argument("--alarm-starving", type=float, default=STARVING_MINUTES, metavar="MINUTES",
                   help="alarm when defined jobs wait this long with no live pilot that may take them "
                   "(default %(default)s)")
    p.add_argument("--max-per-client", type=int, default=MAX_PER_CLIENT, metavar="N",
                   help="connections one address may hold, except loopback and --pilot-net addresses "
                   "(default %(default)s)")
    p.add_argument("--pilot-net", action="append", default=[], metavar="CIDR",
                   help="a network of worker nodes whose addresses --max-per-client does not limit "
                   "(repeatable), e.g. 10.0.0.0/8")
    p.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT, metavar="SECONDS",
                   help="a request's line and headers must arrive within this, and a kept connection idle "
                   "this long is closed (default %(default)s)")
    p.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS, metavar="N",
                   help="connections served at once; beyond, a quick 503 (default %(default)s)")
    p.add_argument("--wal-limit", type=int, default=WAL_LIMIT, metavar="BYTES",
                   help="truncate the write-ahead log once it grows past this (default %(default)s); "
                   "/api/health says wal_large while a reader keeps it from shrinking")
    p.add_argument("--skip-check", action="store_true",
                   help="skip the integrity check (PRAGMA quick_check) at start, for huge databases")
    p.add_argument("--allow-network-fs", action="store_true",
                   help="let --db lie on AFS, NFS, EOS or another network filesystem (unsafe: "
                   "sqlite's locking does not hold there)")
    p.add_argument("--token-file", help="file holding the write token (default: $P3S_TOKEN, else "
                   "a token generated beside the database, loopback only)")
    p.add_argument("--new-token", metavar="FILE",
                   help="write a new random token to FILE (mode 0600, never over an existing file) and exit")
    p.add_argument("--add-user", metavar="NAME",
                   help="add a named user with --role to --db, write their token (see --user-token-file) and exit")
    p.add_argument("--role", choices=ROLES, default=SHIFTER,
                   help="with --add-user: shifter (retry, cancel, acknowledge, note, pause), expert (also "
                   "submit, sites, caps, DAGs) or admin (also delete) (default %(default)s)")
    p.add_argument("--user-token-file", metavar="FILE",
                   help="with --add-user: where the token goes (default: DB-users/NAME.token beside --db)")
    p.add_argument("--remove-user", metavar="NAME", help="remove a user: their token and sessions stop working; exit")
    p.add_argument("--list-users", action="store_true", help="list the named users and their roles; exit")
    p.add_argument("--backup-dir", metavar="DIR",
                   help="keep online copies of the database (and the published images) in DIR, a local "
                   "disk other than the database's (default: none)")
    p.add_argument("--backup-every", default="30m", metavar="AGE",
                   help="with --backup-dir: how often, e.g. 10m, 1h (default %(default)s)")
    p.add_argument("--backup-keep", type=int, default=48, metavar="N",
                   help="with --backup-dir: the newest N copies are kept (default %(default)s)")
    p.add_argument("--restore", metavar="FILE",
                   help="before starting, replace --db by this copy (checked; the old database is set "
                   "aside, never deleted), then serve it")
    p.add_argument("--session-hours", type=float, default=SESSION_HOURS, metavar="HOURS",
                   help="how long a sign-in to the pages lasts (default %(default)s)")
    p.add_argument("--private-pages", action="store_true",
                   help="the pages and every read need a sign-in or a token too (default: reading is open)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.add_argument("--housekeeping", type=float, default=2.0, metavar="SECONDS",
                   help="seconds between housekeeping passes (default 2)")
    p.add_argument("--lease-beats", type=int, default=LEASE_BEATS, metavar="N",
                   help="a silent pilot's job is given away after N of its heartbeats (default "
                   "%(default)s; it is shown lost after 3)")
    p.add_argument("--files-root", action="append", metavar="DIR",
                   help="directory whose files (job logs, outputs) the pages may show; repeatable "
                   "(default: logs/ beside server.py, where pilots write job logs by default)")
    p.add_argument("--retention-days", type=float, default=0, metavar="DAYS",
                   help="purge jobs, workflows and pilots that ended more than DAYS ago (default 0 = keep all)")
    p.add_argument("--link", action="append", default=[], metavar="NAME=URL",
                   help="a link in the summary's header, e.g. \"Shifter manual=https://...\" (repeatable)")
    p.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES, metavar="BYTES",
                   help=f"largest image a job may publish (default {MAX_IMAGE_BYTES}; within --max-body)")
    p.add_argument("--max-image-store", type=int, default=MAX_IMAGE_STORE // 2 ** 20, metavar="MB",
                   help="published images kept in all, in MiB; past it the oldest go (default %(default)s)")
    p.add_argument("--min-free-mb", type=int, default=MIN_FREE // 2 ** 20, metavar="MB",
                   help="MiB the database's filesystem keeps free: images are refused (507) below it, "
                   "an alarm warns at twice it (default %(default)s)")
    p.add_argument("--max-images", type=int, default=MAX_IMAGES, metavar="N",
                   help=f"most images one job may publish (default {MAX_IMAGES})")
    p.add_argument("--max-body", type=int, default=MAX_BODY, metavar="BYTES",
                   help=f"largest request body accepted (default {MAX_BODY})")
    args = p.parse_args(argv)
    if args.lease_beats <= LOST_AFTER_BEATS:
        p.error(f"--lease-beats {args.lease_beats}: must be more than {LOST_AFTER_BEATS} (a pilot is lost after "
                f"{LOST_AFTER_BEATS} silent heartbeats, its job given away after the lease)")
    if args.header_timeout <= 0:
        p.error(f"--header-timeout {args.header_timeout:g}: must be more than 0 seconds")
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port}: must be between 0 and 65535")
    for net in args.pilot_net:
        if not is_network(net):
            p.error(f"--pilot-net {net!r}: not a network; give an address or CIDR such as 10.0.0.0/8")
    bad_links = [x for x in args.link if "=" not in x or not x.split("=", 1)[1].startswith(("http://", "https://", "/"))]
    if bad_links:
        p.error(f"--link {bad_links[0]!r}: give NAME=URL with an http(s):// or /path URL")
    db_dir = os.path.dirname(os.path.abspath(args.db))
    if not os.path.isdir(db_dir):
        p.error(f"--db {args.db}: the directory {db_dir} does not exist")
    try:
        args.backup_every = parse_age(args.backup_every, "--backup-every")
    except ApiError as e:
        p.error(e.message)
    if args.backup_every < 1 or args.backup_keep < 1:
        p.error("--backup-every and --backup-keep: at least 1 second and 1 copy")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.new_token:
        return new_token_command(args.new_token)
    if args.add_user or args.remove_user or args.list_users:
        return users_command(args)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = floor_problem()
    if problem:
        print(f"server.py: {problem}", file=sys.stderr)
        return 2
    try:
        check_db_filesystem(args.db, args.allow_network_fs)
        token, token_source = load_token(args.token_file, args.db, args.host)
        pilot_token = load_pilot_token(args.pilot_token_file, token)
        warn_token_on_afs(token_source)
        if args.restore:
            restore(args.restore, args.db)
        store = Store(args.db)
        if not args.skip_check:
            store.check_integrity()
    except (OSError, sqlite3.Error) as e:
        print(f"server.py: --db {args.db}: {e}", file=sys.stderr)
        return 1
    except StartupError as e:
        print(f"server.py: {e}", file=sys.stderr)
        return 2
    images = Images(store, args.db + ".files", args.max_image_bytes, args.max_images,
                    args.max_image_store * 2 ** 20, args.min_free_mb * 2 ** 20)
    service = Service(store, args.housekeeping, args.retention_days, args.lease_beats, args.wal_limit,
                      args.alarm_no_new_work, args.alarm_starving, images,
                      {"delay": args.alarm_delay * 60, "lost_share": args.alarm_lost_share,
                       "lost_count": args.alarm_lost_count, "lifetime_min_ended": args.alarm_lifetime_pilots,
                       "webhook": args.alarm_webhook, "command": args.alarm_command,
                       "hold": args.alarm_hold, "clear_hold": args.alarm_clear_hold,
                       "drift_window": args.alarm_drift_window, "repeat": args.alarm_repeat * 3600},
                      args.breaker_min_failed, args.timelimit_grace, args.session_hours)
    try:
        private = [args.db + suffix for suffix in ("", "-wal", "-shm", "-journal")]
        private += [f for f in (token_source, args.pilot_token_file) if f and os.path.isfile(f)]
        views = Views(service, args.files_root or [DEFAULT_FILES_ROOT], private,
                      [tuple(x.split("=", 1)) for x in args.link])
        httpd = P3SServer((args.host, args.port), service, views, token, args.max_body, pilot_token,
                          args.allow_host, connections_for_descriptors(args.max_connections),
                          args.max_per_client, args.pilot_net, args.header_timeout, args.private_pages)
    except OSError as e:
        print(f"server.py: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    if token_source.endswith(".token") and not args.token_file:
        log.warning("no token given: using %s; binding %s only", token_source, args.host)
    hk = threading.Thread(target=service.housekeeping_loop, name="housekeeping", daemon=True)
    hk.start()
    if args.backup_dir:
        try:
            service.backups = Backups(store, images.directory, args.backup_dir, args.backup_every, args.backup_keep)
        except OSError as e:
            print(f"server.py: --backup-dir {args.backup_dir}: {e.strerror}", file=sys.stderr)
            return 2
        threading.Thread(target=service.backups.loop, args=(service.broker.stopping,), name="backups",
                         daemon=True).start()

    def shut_down(signum, frame):
        service.stop()
        httpd.stop_soon()

    signal.signal(signal.SIGTERM, shut_down)
    signal.signal(signal.SIGINT, shut_down)
    host, port = httpd.server_address[:2]
    log.info("p3s server %s: serving on http://%s:%d (db %s, schema v%d)",
             VERSION, host, port, os.path.abspath(args.db), store.schema_version)
    try:
        httpd.serve_forever(poll_interval=0.5)
    except Stopping:
        pass
    finally:
        httpd.server_close()
        with contextlib.suppress(Exception):    # best effort: a restart gives full leases anyway
            service.write_beats()
        with contextlib.suppress(Exception):    # best effort: statistics, not jobs
            service.costs.flush(store)
        store.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
