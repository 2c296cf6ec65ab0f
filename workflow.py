#!/usr/bin/env python3
"""p3s workflow tool: DAG templates in GraphML, and workflows made from them.

    python workflow.py -g 3filters.graphml [-n NAME] [-D "description"]   # register a DAG
    python workflow.py -a 3filters -s defined -f fileinfo.json             # start a workflow
    python workflow.py -m -u UUID -s cancelled                            # modify its state
    python workflow.py -d -w workflow -u UUID                             # delete (or -w dag -n NAME)
    python workflow.py -G 3filters > 3filters.graphml                     # download a DAG
    python workflow.py --list | --show UUID|NAME

-f takes `sticky` (names from the GraphML), `inherit:PATH` (the root's input is PATH, the other
files are named after it), a JSON string or a .json file keyed "source:target"; without -f each
file gets a fresh uuid name with its datatype's extension. -j takes per-vertex job attributes,
as a JSON string or a .json file keyed by vertex name.

Exit codes: 0 success, 2 bad input or a request the server refused, 1 server or network failure.
"""
import json
import os
import sys
import uuid as uuidlib

from serverAPI import ArgumentParser, add_verbosity, Client, InputError, P3SError, run_cli


def parse_args(argv):
    p = ArgumentParser(description="Manage p3s DAG templates and workflows.")
    p.add_argument("-g", "--graphml", metavar="FILE", help="register the DAG template in FILE (GraphML)")
    p.add_argument("-a", "--add", metavar="DAG", help="create a workflow from DAG")
    p.add_argument("-m", "--modify", action="store_true", help="change the state of workflow -u")
    p.add_argument("-d", "--delete", action="store_true", help="delete a DAG (-w dag -n NAME) or a workflow "
                   "(-w workflow -u UUID) with its jobs and files")
    p.add_argument("-G", "--get", metavar="NAME", help="print DAG NAME as GraphML")
    p.add_argument("--list", action="store_true", help="list DAGs and recent workflows")
    p.add_argument("-l", "--list-dags", action="store_true", help="list the DAG templates (the original's -l)")
    p.add_argument("--datatype", metavar="NAME:EXT", help="define a datatype and the extension of its "
                   "generated file names, e.g. ROOT:.root")
    p.add_argument("--datatypes", action="store_true", help="list the datatypes")
    p.add_argument("--show", metavar="UUID|NAME", help="show a workflow (by uuid) or a DAG (by name)")
    p.add_argument("-n", "--name", help="name of the DAG (-g, -d -w dag) or of the workflow (-a; with "
                   "-d -w workflow: delete the workflows of this name, or of each in a comma list)")
    p.add_argument("--replace", action="store_true",
                   help="with -g: replace the DAG of that name (refused while workflows of it run)")
    p.add_argument("-D", "--description", default="", help="with -g or -a: a description")
    p.add_argument("-s", "--state", help="with -a: template (default) or defined (start it now); "
                   "with -m: defined (start) or cancelled")
    p.add_argument("-f", "--fileinfo", help="with -a: file names: sticky, inherit:PATH, JSON or a .json file")
    p.add_argument("-j", "--jobinfo", help="with -a: per-vertex job attributes: JSON or a .json file")
    p.add_argument("-u", "--uuid", help="the workflow to modify or delete")
    p.add_argument("-w", "--what", choices=("dag", "workflow"), help="with -d: what to delete")
    p.add_argument("--json", dest="json_out", action="store_true", help="print results as JSON")
    p.add_argument("-S", "--server", help="server URL (default $P3S_SERVER or http://127.0.0.1:8000)")
    add_verbosity(p, "say more")
    args = p.parse_args(argv)
    actions = [args.graphml, args.add, args.modify, args.delete, args.get, args.list, args.list_dags, args.show,
               args.datatype, args.datatypes]
    if sum(bool(a) for a in actions) != 1:
        p.error("give exactly one of -g FILE, -a DAG, -m, -d, -G NAME, --list, -l, --show, --datatype, --datatypes")
    if args.datatype and ":" not in args.datatype:
        p.error(f"--datatype {args.datatype!r}: expected NAME:EXT, e.g. ROOT:.root")
    if args.modify and not (args.uuid and args.state):
        p.error("-m needs -u UUID and -s STATE")
    if args.delete and not (args.what == "dag" and args.name or args.what == "workflow" and (args.uuid or args.name)):
        p.error("-d needs -w dag -n NAME, or -w workflow with -u UUID or -n NAME[,NAME...]")
    if args.replace and not args.graphml:
        p.error("--replace goes with -g FILE")
    return args


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise InputError(f"{path}: {e.strerror}") from None


def structured(value, option):
    """-f/-j values: a keyword (sticky, inherit:...), a JSON string, or a .json file."""
    if value is None or value == "sticky" or value.startswith("inherit:"):
        return value
    text = value if value.lstrip().startswith("{") else read_text(value)
    try:
        return json.loads(text)
    except ValueError as e:
        raise InputError(f"{option} {value}: malformed JSON: {e}") from None


def register_dag(client, args):
    name = args.name or os.path.splitext(os.path.basename(args.graphml))[0]
    dag = client.add_dag(name, read_text(args.graphml), args.description, replace=args.replace)
    return dag, f"dag {dag['name']}: {len(dag['vertices'])} vertices, {len(dag['edges'])} edges"


def add_workflow(client, args):
    options = {"name": args.name, "description": args.description, "state": args.state or "template",
               "fileinfo": structured(args.fileinfo, "-f"), "jobinfo": structured(args.jobinfo, "-j"),
               "uuid": str(uuidlib.uuid4())}   # stored once, even if retried
    wf = client.create_workflow(args.add, **{k: v for k, v in options.items() if v is not None})
    return wf, wf["uuid"]


def modify(client, args):
    wf = client.set_workflow_state(args.uuid, args.state)
    return wf, f"{wf['uuid']} {wf['state']}"


def delete(client, args):
    if args.what == "dag":
        return client.delete_dag(args.name), f"deleted dag {args.name}"
    if args.uuid:
        return client.delete_workflow(args.uuid), f"deleted workflow {args.uuid}"
    deleted = []
    for name in args.name.split(","):
        found = client.list_workflows(name=name, limit=400)
        if not found:
            raise InputError(f"-n {name}: no workflow of that name")
        deleted += [client.delete_workflow(w["uuid"])["deleted"] for w in found]
    return {"deleted": deleted}, "\n".join(f"deleted workflow {u}" for u in deleted)


def get_graphml(client, args):
    text = client.dag_graphml(args.get)
    return {"name": args.get, "graphml": text}, text.rstrip("\n")


def dag_lines(dags):
    return [f"  {d['name']}  {d['vertices']} vertices, {d['workflows']} workflows  {d['description']}" for d in dags]


def list_dags(client, args):
    dags = client.list_dags()
    return {"dags": dags}, "\n".join(["DAGs:"] + dag_lines(dags))


def list_all(client, args):
    dags, workflows = client.list_dags(), client.list_workflows(limit=100)
    lines = ["DAGs:"] + dag_lines(dags)
    lines += ["workflows:"] + [f"  {w['uuid']}  {w['state']:9}  {w['dag']}  {w['name']}" for w in workflows]
    return {"dags": dags, "workflows": workflows}, "\n".join(lines)


def show(client, args):
    try:
        wf = client.get_workflow(args.show)
    except P3SError as e:
        if e.status not in (400, 404):
            raise
        dag = client.get_dag(args.show)
        lines = [f"dag {dag['name']}: {dag['description']}"]
        lines += [f"  vertex {v['name']} ({v['jobtype']}): {v['payload']}" for v in dag["vertices"]]
        lines += [f"  edge {e['source']} -> {e['target']}: {e['name']} ({e['datatype']}, {e['datatag']})"
                  for e in dag["edges"]]
        return dag, "\n".join(lines)
    lines = [f"workflow {wf['uuid']} {wf['name']} (dag {wf['dag']}): {wf['state']}"]
    lines += [f"  {j['vertex']:12} {j['state']:10} exit {j['exit_code']}  {j['uuid']}" for j in wf["jobs"]]
    lines += [f"  file {d['dirpath'].rstrip('/')}/{d['name']} ({d['datatag']}): {d['state']}" for d in wf["datasets"]]
    return wf, "\n".join(lines)


def define_datatype(client, args):
    name, ext = args.datatype.split(":", 1)
    result = client.define_datatype(name, ext)
    return result, f"datatype {result['name']}: {result['ext']}"


def list_datatypes(client, args):
    types = client.list_datatypes()
    return {"datatypes": types}, "\n".join(f"{t['name']}  {t['ext']}" for t in types)


ACTIONS = (("datatype", define_datatype), ("datatypes", list_datatypes), ("graphml", register_dag),
           ("add", add_workflow), ("modify", modify), ("delete", delete), ("get", get_graphml),
           ("list", list_all), ("list_dags", list_dags), ("show", show))


def main(argv=None):
    args = parse_args(argv)
    action = next(fn for attr, fn in ACTIONS if getattr(args, attr))

    def act():
        result, text = action(Client(args.server), args)
        print(json.dumps(result, indent=2) if args.json_out else text)
        return 0

    return run_cli("workflow.py", act)


if __name__ == "__main__":
    sys.exit(main())
