#!/usr/bin/env python3
"""Check that this machine can run p3s: Python and sqlite versions, every module the tools use,
then (unless --offline) that the server answers and accepts our token.

    python verifyImport.py [-S URL] [--offline]

Prints one OK line per check and "Success" at the end; exit 0, else the first failure and 1.
"""
import importlib
import os
import sys

from serverAPI import ArgumentParser, add_verbosity

MODULES = ("argparse", "collections", "getpass", "hashlib", "hmac", "html", "http.server", "ipaddress",
           "json", "logging", "math", "queue", "re", "resource", "secrets", "select", "shlex", "signal",
           "socket", "sqlite3", "stat", "subprocess", "threading", "urllib.request", "uuid",
           "xml.etree.ElementTree")
OWN_MODULES = ("serverAPI", "server", "job", "pilot", "workflow", "injector")


class CheckFailed(Exception):
    pass


def check_versions():
    """The floor (Python 3.9, sqlite 3.26) is kept in server.py, which the server checks too."""
    import sqlite3
    from server import DEFAULT_DB, filesystem_type, floor_problem, is_network_fs
    problem = floor_problem()
    if problem:
        raise CheckFailed(problem)
    print(f"OK python {sys.version.split()[0]}")
    print(f"OK sqlite {sqlite3.sqlite_version}")
    fstype = filesystem_type(os.path.dirname(DEFAULT_DB))
    if is_network_fs(fstype):
        print(f"NOTE this clone is on {fstype}: start the server with a database on a local disk, "
              f"e.g. python server.py --db /var/tmp/{os.environ.get('USER', 'p3s')}/p3s.db")


def check_modules(verbose):
    for name in MODULES + OWN_MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:
            raise CheckFailed(f"import {name}: {e}") from None
        if verbose:
            print(f"OK import {name}")
    print(f"OK {len(MODULES + OWN_MODULES)} modules import")


def check_server(url):
    from serverAPI import Client, InputError, P3SError
    client = Client(url, retry_for=2)
    try:
        health = client.health()
        print(f"OK server {client.server} (p3s {health['version']}, schema v{health['schema']})")
        user = client.check_token().get("user")
        print(f"OK token accepted (user {user})" if user else "OK token accepted")
    except (P3SError, InputError) as e:     # InputError: the token file is missing or unreadable
        raise CheckFailed(str(e)) from None


def main(argv=None):
    p = ArgumentParser(description="Check that this machine can run p3s.")
    p.add_argument("-S", "--server", help="server URL (default $P3S_SERVER or http://127.0.0.1:8000)")
    p.add_argument("--offline", action="store_true", help="skip the server and token checks")
    add_verbosity(p, "list every module imported")
    args = p.parse_args(argv)
    try:
        check_versions()
        check_modules(args.verbose)
        if not args.offline:
            check_server(args.server)
    except CheckFailed as e:
        print(f"FAILED {e}", file=sys.stderr)
        return 1
    print("Success")
    return 0


if __name__ == "__main__":
    sys.exit(main())
