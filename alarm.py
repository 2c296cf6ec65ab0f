#!/usr/bin/env python3
"""p3s alarm tool: what is raised now, what happened overnight, and who is on it.

    python alarm.py                                          # the alarms now, criticals first
    python alarm.py --history --age 12h                      # raised, cleared, acknowledged, ...
    python alarm.py --ack no_new_work -m "DAQ stopped for calibration"
    python alarm.py --silence site_below_nominal -s np04 --for 2h -m "node reboots"
    python alarm.py --silence disk_low --for 1h --future -m "disk swap at 14:00"   # not raised yet

An acknowledged alarm stays on the page, greyed with who, why and until when, and is not sent
to anyone; an acknowledgement lasts until the alarm clears (or --for), a silence for --for
and then ends by itself. -s and -T narrow it to one site or job type of that alarm.

Environment: P3S_SERVER, P3S_TOKEN / P3S_TOKEN_FILE, P3S_RETRY_FOR, USER (see README).
Exit codes: 0 success, 2 bad input or a request the server refused, 1 server or network failure.
"""
import sys
import time

from serverAPI import ArgumentParser, add_verbosity, Client, format_table, run_cli

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text):
    """'90', '30m', '2h', '1d' -> seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in UNITS else (text, "s")
    try:
        seconds = float(number) * UNITS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a duration such as 90, 30m, 2h or 1d") from None
    if seconds <= 0:
        raise ValueError(f"{text!r}: must be more than 0")
    return seconds


def parse_args(argv):
    p = ArgumentParser(description="See, acknowledge and silence p3s alarms.")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--history", action="store_true", help="what the alarms did (default the last 24 h)")
    action.add_argument("--ack", metavar="NAME", help="acknowledge alarm NAME (until it clears, or --for)")
    action.add_argument("--silence", metavar="NAME", help="silence alarm NAME for --for")
    p.add_argument("-s", "--site", default="", help="with --ack/--silence: only this site's")
    p.add_argument("-T", "--jobtype", default="", help="with --ack/--silence: only this job type's")
    p.add_argument("-m", "--why", help="with --ack/--silence: why (shown beside the alarm)")
    p.add_argument("--for", dest="duration", type=duration, metavar="DURATION",
                   help="how long: 90, 30m, 2h, 1d (required with --silence)")
    p.add_argument("--future", action="store_true",
                   help="with --silence: the alarm is not raised now (a planned intervention)")
    p.add_argument("--age", default="24h", help="with --history: how far back (default %(default)s)")
    p.add_argument("-S", "--server", help="server URL (default $P3S_SERVER or http://127.0.0.1:8000)")
    add_verbosity(p, "say more")
    args = p.parse_args(argv)
    if (args.ack or args.silence) and not args.why:
        p.error("--ack and --silence need -m WHY")
    if args.silence and args.duration is None:
        p.error("--silence needs --for DURATION (a silence ends by itself)")
    return args


def clock(ts):
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else ""


def show_now(client):
    alarms = client.call("GET", "/api/alarms")["alarms"]
    rows = [{"severity": a["severity"] + (", pending" if a.get("pending") else ""), "since": clock(a["since"]),
             "alarm": a["message"], "name": a.get("ack_name", a["name"]),
             "note": f"explained by {a['explained_by']}" if a.get("explained_by") else
             f"{a['ack']['kind']} by {a['ack']['who']}: {a['ack']['why']}" if a.get("ack") else ""}
            for a in alarms]
    print(format_table(rows, ("severity", "name", "since", "alarm", "note")) if rows else "no alarm raised")


def show_history(client, age):
    events = client.call("GET", "/api/alarms/history", query={"age": age})["events"]
    rows = [dict(e, time=clock(e["ts"])) for e in reversed(events)]
    print(format_table(rows, ("time", "kind", "key", "severity", "message", "who", "why")) if rows
          else f"nothing happened in the last {age}")


def act(client, args):
    if args.history:
        show_history(client, args.age)
    elif args.ack or args.silence:
        body = {"name": args.ack or args.silence, "kind": "ack" if args.ack else "silence", "site": args.site,
                "jobtype": args.jobtype, "why": args.why}
        if args.duration:
            body["for"] = args.duration
        if args.future:
            body["future"] = True
        done = client.call("POST", "/api/alarms/ack", body)
        until = f"until {clock(done['until'])}" if done["until"] else "until it clears"
        print(f"{done['name']}: {'acknowledged' if args.ack else 'silenced'} by {done['who']} {until}")
    else:
        show_now(client)
    return 0


def main(argv=None):
    args = parse_args(argv)
    return run_cli("alarm.py", lambda: act(Client(args.server), args))


if __name__ == "__main__":
    sys.exit(main())
