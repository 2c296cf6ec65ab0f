#!/usr/bin/env python3
"""p3s service tool: publish a status line to the Services page, as the original's service.py did.

    python service.py -n inputsize -m "np04 inbox: 1.2 TB, 312 files"              # from cron
    python service.py -n inputsize -m "..." --period 600     # promise a line every 10 min: alarms
                                                             # after 3 silent periods
    python service.py -n inputsize --retire                  # stopped on purpose: never alarms
    python service.py -n inputsize --show                    # its last lines
    python service.py --list

A service without --period never alarms; one with it raises `service_silent` after 3 periods
without a line. Each service keeps its last 100 lines (/service/<name>).

Environment: P3S_SERVER, P3S_TOKEN / P3S_TOKEN_FILE, P3S_RETRY_FOR (see README).
Exit codes: 0 success, 2 bad input or a request the server refused, 1 server or network failure.
"""
import socket
import sys
import time

from serverAPI import ArgumentParser, add_verbosity, Client, format_table, run_cli


def parse_args(argv):
    p = ArgumentParser(description="Publish a status line to the p3s Services page.")
    p.add_argument("-n", "--name", help="the service's name")
    p.add_argument("-m", "--message", help="the status line to publish")
    p.add_argument("--period", type=float, default=0, metavar="SECONDS",
                   help="with -m: the service promises a line this often; 3 silent periods alarm (default 0: never)")
    p.add_argument("--host", default=socket.gethostname(), help="with -m: where it runs (default this host)")
    p.add_argument("--retire", action="store_true", help="retire service -n: stopped on purpose, never alarms")
    p.add_argument("--show", action="store_true", help="show service -n with its last lines")
    p.add_argument("--list", action="store_true", help="list the services")
    p.add_argument("-S", "--server", help="server URL (default $P3S_SERVER or http://127.0.0.1:8000)")
    add_verbosity(p, "say more")
    args = p.parse_args(argv)
    actions = [args.message is not None, args.retire, args.show, args.list]
    if sum(actions) != 1:
        p.error("give exactly one of -m MESSAGE, --retire, --show, --list")
    if not args.list and not args.name:
        p.error("-m, --retire and --show need -n NAME")
    if args.period < 0:
        p.error(f"--period {args.period:g}: must not be negative")
    return args


def act(client, args):
    if args.list:
        rows = [dict(s, state="retired" if s["retired"] else "SILENT" if s["silent"] else "alive",
                     seen=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["ts"])))
                for s in client.call("GET", "/api/services")["services"]]
        print(format_table(rows, ("name", "state", "host", "period", "seen", "result")))
    elif args.show:
        service = client.get_service(args.name)
        for line in service["lines"]:
            print(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(line["ts"])), line["result"])
    elif args.retire:
        client.retire_service(args.name)
    else:
        client.service_beat(args.name, args.period, args.message, args.host, retry_for=None)
    return 0


def main(argv=None):
    args = parse_args(argv)
    return run_cli("service.py", lambda: act(Client(args.server), args))


if __name__ == "__main__":
    sys.exit(main())
