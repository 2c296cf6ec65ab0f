#!/usr/bin/env python3
"""Check that this machine can run p3s: Python and sqlite versions, every module the tools use,
then (unless --offline) that the server answers and accepts our token.

    python verifyImport.py [-S URL] [--offline]

Prints one OK line per check and "Success" at the end; exit 0, else the first failure and 1.
"""
import argparse
import importlib
import sys

MIN_PYTHON = (3, 9)
MIN_SQLITE = (3, 35, 0)     # UPDATE ... RETURNING, used by the brokerage
MODULES = ("argparse", "ctypes", "getpass", "hmac", "html", "http.server", "ipaddress", "json",
           "logging", "queue", "re", "secrets", "shlex", "signal", "socket", "sqlite3",
           "subprocess", "threading", "urllib.request", "uuid", "xml.etree.ElementTree")
OWN_MODULES = ("serverAPI", "server", "job", "pilot", "workflow", "injector")


class CheckFailed(Exception):
    pass


def check_versions():
    if sys.version_info < MIN_PYTHON:
        raise CheckFailed(f"Python {sys.version.split()[0]} is older than {'.'.join(map(str, MIN_PYTHON))}")
    print(f"OK python {sys.version.split()[0]}")
    import sqlite3
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise CheckFailed(f"sqlite {sqlite3.sqlite_version} is older than "
                          f"{'.'.join(map(str, MIN_SQLITE))} (needed for UPDATE ... RETURNING)")
    print(f"OK sqlite {sqlite3.sqlite_version}")


def check_modules():
    for name in MODULES + OWN_MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:
            raise CheckFailed(f"import {name}: {e}") from None
        print(f"OK import {name}")


def check_server(url):
    from serverAPI import Client, P3SError
    client = Client(url, retry_for=2)
    try:
        health = client.health()
        print(f"OK server {client.server} (p3s {health['version']}, schema v{health['schema']})")
        client.check_token()
        print("OK token accepted")
    except P3SError as e:
        raise CheckFailed(str(e)) from None


def main(argv=None):
    p = argparse.ArgumentParser(description="Check that this machine can run p3s.")
    p.add_argument("-S", "--server", help="server URL (default $P3S_SERVER or http://127.0.0.1:8000)")
    p.add_argument("--offline", action="store_true", help="skip the server and token checks")
    args = p.parse_args(argv)
    try:
        check_versions()
        check_modules()
        if not args.offline:
            check_server(args.server)
    except CheckFailed as e:
        print(f"FAILED {e}", file=sys.stderr)
        return 1
    print("Success")
    return 0


if __name__ == "__main__":
    sys.exit(main())
