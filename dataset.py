#!/usr/bin/env python3
"""p3s dataset tool: register, adjust, list and delete file records and datatypes, as the
original's dataset.py did.

    python dataset.py -r --name run5010_1.root --dirpath /eos/np04/raw --datatype ROOT
    python dataset.py -r -j '{"name": "run5010_1.root", "dirpath": "/eos/np04/raw", "comment": "by hand"}'
    python dataset.py -a -u UUID -s bad -m "corrupt header"
    python dataset.py -d -u UUID[,UUID...]       # an injected file is then started again by its injector
    python dataset.py --list [--origin injected] [--state ready]
    python dataset.py -R -j '{"name": "HDF5", "ext": ".h5"}'    # define a datatype
    python dataset.py -D HDF5                                   # delete one no DAG uses

Exit codes: 0 success, 2 bad input or a request the server refused, 1 server or network failure.
"""
import json
import sys

from serverAPI import ArgumentParser, add_verbosity, Client, InputError, format_table, run_cli

LIST_COLUMNS = ("uuid", "state", "origin", "datatype", "dirpath", "name", "comment")
STATES = ("pending", "ready", "bad", "archived")


def parse_args(argv):
    p = ArgumentParser(description="Register, adjust, list and delete p3s file records and datatypes.")
    p.add_argument("-r", "--register", action="store_true", help="register a file (--name and --dirpath, or -j)")
    p.add_argument("-a", "--adjust", action="store_true", help="change the state, comment or datatype of -u")
    p.add_argument("-d", "--delete", action="store_true", help="delete the record(s) -u")
    p.add_argument("--list", action="store_true", help="list file records, newest first")
    p.add_argument("-R", "--register-type", action="store_true", help="define a datatype from -j {name, ext}")
    p.add_argument("-D", "--delete-type", metavar="NAME", help="delete datatype NAME (refused while a DAG uses it)")
    p.add_argument("-j", "--json", dest="json_in", metavar="JSON",
                   help="with -r, -a or -R: the fields as a JSON object (the original's form)")
    p.add_argument("-u", "--uuid", help="with -a or -d: the record(s), UUID or UUID1,UUID2,...")
    p.add_argument("--name", help="with -r: the file's name")
    p.add_argument("--dirpath", help="with -r: its directory")
    p.add_argument("--datatype", help="with -r or -a: its datatype; with --list: only this datatype")
    p.add_argument("-s", "--state", choices=STATES, help="with -r or -a: its state; with --list: only this state")
    p.add_argument("-m", "--comment", help="with -r or -a: a comment")
    p.add_argument("--origin", choices=("injected", "edge", "registered"), help="with --list: only this origin")
    p.add_argument("--limit", type=int, default=100, help="with --list: at most this many (default 100)")
    p.add_argument("--json-out", action="store_true", help="print results as JSON")
    p.add_argument("-S", "--server", help="server URL (default $P3S_SERVER or http://127.0.0.1:8000)")
    add_verbosity(p, "say more")
    args = p.parse_args(argv)
    actions = [args.register, args.adjust, args.delete, args.list, args.register_type, bool(args.delete_type)]
    if sum(actions) != 1:
        p.error("give exactly one of -r, -a, -d, --list, -R, -D NAME")
    if (args.adjust or args.delete) and not args.uuid:
        p.error("-a and -d need -u UUID")
    if args.register_type and not args.json_in:
        p.error('-R needs -j \'{"name": NAME, "ext": EXT}\'')
    return args


def fields_of(args, names):
    """The fields from -j JSON, then the options given (which win)."""
    fields = {}
    if args.json_in:
        try:
            fields = json.loads(args.json_in)
        except ValueError as e:
            raise InputError(f"-j: malformed JSON: {e}") from None
        if not isinstance(fields, dict):
            raise InputError("-j: expected a JSON object")
    given = {"name": args.name, "dirpath": args.dirpath, "datatype": args.datatype, "state": args.state,
             "comment": args.comment}
    fields.update({k: v for k, v in given.items() if k in names and v is not None})
    return fields


def show(args, obj, text):
    print(json.dumps(obj, indent=2) if args.json_out else text)


def act(client, args):
    if args.register:
        row = client.register_dataset(**fields_of(args, ("name", "dirpath", "datatype", "state", "comment")))
        show(args, row, row["uuid"])
    elif args.adjust:
        changes = fields_of(args, ("datatype", "state", "comment"))
        if not changes:
            raise InputError("-a needs -s STATE, -m COMMENT and/or --datatype")
        for uuid in args.uuid.split(","):
            row = client.adjust_dataset(uuid, **changes)
            show(args, row, f"{row['uuid']} {row['state']} {row['comment']}".rstrip())
    elif args.delete:
        for uuid in args.uuid.split(","):
            show(args, client.delete_dataset(uuid), f"deleted {uuid}")
    elif args.list:
        rows = client.list_datasets(state=args.state, origin=args.origin, datatype=args.datatype, limit=args.limit)
        show(args, rows, format_table(rows, LIST_COLUMNS))
    elif args.register_type:
        fields = fields_of(args, ())
        if not isinstance(fields.get("name"), str) or not fields["name"]:
            raise InputError('-R: the JSON needs a "name"')
        row = client.define_datatype(fields["name"], str(fields.get("ext", "")), str(fields.get("comment", "")))
        show(args, row, f"{row['name']} {row['ext']}")
    else:
        show(args, client.delete_datatype(args.delete_type), f"deleted datatype {args.delete_type}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    return run_cli("dataset.py", lambda: act(Client(args.server), args))


if __name__ == "__main__":
    sys.exit(main())
