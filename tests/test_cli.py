"""A new user's first hour: every CLI message says what happened, with the right exit status,
and nothing is stored where a message says nothing was (issue: a CLI that never misleads)."""
import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from conftest import COMPAT, ROOT, TOOLS, shell_job, tiny_png, tool_command


def tool(*args, env=None, timeout=60, input=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, args[0]), *map(str, args[1:])], env=env,
                          capture_output=True, text=True, timeout=timeout, input=input)


def test_new_token_writes_a_private_file_once_and_server_and_tools_use_it(tmp_path, start_server):
    token = tmp_path / "private" / "p3s.token"
    made = tool("server.py", "--new-token", token)
    assert made.returncode == 0 and str(token) in made.stdout
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    first = token.read_text()
    again = tool("server.py", "--new-token", token)
    assert again.returncode == 2 and "exists" in again.stderr and token.read_text() == first
    served = start_server(["--token-file", str(token)])     # the later --token-file wins over the harness's
    env = dict(served.env, P3S_TOKEN_FILE=str(token))
    assert served.run("job.py", "-j", json.dumps(shell_job("true")), env=env).returncode == 0


def test_new_token_makes_every_missing_directory_private_whatever_the_umask(tmp_path):
    """os.makedirs gives the parents it makes the umask's mode: 0777 under umask 000."""
    token = tmp_path / "a" / "b" / "c" / "p3s.token"
    made = subprocess.run(["sh", "-c", 'umask 000; exec "$0" "$@"', *tool_command("server.py"),
                           "--new-token", str(token)], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    modes = [stat.S_IMODE(d.stat().st_mode) for d in (tmp_path / "a", tmp_path / "a" / "b", token.parent)]
    assert modes == [0o700] * 3 and stat.S_IMODE(token.stat().st_mode) == 0o600, [oct(m) for m in modes]


def test_a_missing_token_file_is_a_local_error_and_nothing_is_sent_as_submitted(p3s):
    env = dict(p3s.env, P3S_TOKEN_FILE=str(p3s.dir / "no-such-token"))
    result = p3s.run("job.py", "-j", json.dumps(shell_job("true")), env=env, timeout=20)
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
    assert "no-such-token" in result.stderr and "--new-token" in result.stderr
    assert p3s.api.list_jobs() == []
    listed = p3s.run("job.py", "--list", env=env)          # reading needs no token
    assert listed.returncode == 0 and listed.stdout == "no jobs\n", "an empty list printed only its header"
    assert p3s.run("job.py", "--list", "--state", "failed").stdout == "no jobs (state failed)\n"


def test_a_pilot_with_a_wrong_server_says_so_at_once_without_v(tmp_path):
    env = dict(os.environ, P3S_SERVER="http://127.0.0.1:9", P3S_TOKEN="x")
    pilot = subprocess.Popen([sys.executable, os.path.join(ROOT, "pilot.py"), "-L", str(tmp_path)],
                             env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = pilot.stderr.readline()          # the first line, while the pilot still retries
        assert "server not reachable at http://127.0.0.1:9" in line and "retrying for 120 s" in line
        assert re.search(r"until \d\d:\d\d:\d\d", line) and pilot.poll() is None
    finally:
        pilot.kill()
        pilot.wait()


def test_a_404_names_the_url_that_was_asked(p3s):
    env = dict(p3s.env, P3S_SERVER=p3s.url + "/p3s")        # a wrong path prefix
    result = p3s.run("job.py", "--list", env=env)
    assert result.returncode == 2 and f"GET {p3s.url}/p3s/api/jobs" in result.stderr


@pytest.mark.parametrize("command", [["job.py", "--list"], ["workflow.py", "--list"], ["pilot.py", "-U"]])
def test_a_reader_that_stops_reading_ends_the_tool_quietly(p3s, command):
    p3s.submit([shell_job("true")] * 30)
    p3s.api.add_dag("d1", open(os.path.join(COMPAT, "1filter.graphml")).read())
    pipeline = subprocess.run(f"{sys.executable} {ROOT}/{command[0]} {' '.join(command[1:])} | head -1",
                              shell=True, env=p3s.env, capture_output=True, text=True, timeout=60)
    assert pipeline.stdout.strip() and pipeline.stderr == "", pipeline.stderr


@pytest.mark.parametrize("name", TOOLS)
def test_every_help_ends_with_the_environment_it_reads_and_its_exit_codes(name):
    text = tool(name, "--help", env=dict(os.environ, COLUMNS="200")).stdout
    assert "environment:" in text and "exit codes:" in text
    sources = [name] + ([] if name == "server.py" else ["serverAPI.py"])
    read = set()
    for source in sources:
        code = open(os.path.join(ROOT, source)).read()
        read |= set(re.findall(r'environ(?:\.get\(|\[)"(P3S_[A-Z_]+)"', code))
    missing = [v for v in read if v not in text.split("environment:")[1]]
    assert not missing, f"{name} --help does not list {missing}"


def test_pgen_refuses_an_undefined_site_at_once(p3s, tmp_path):
    env = dict(p3s.env, P3S_RUNDIR=str(tmp_path / "run"), P3S_PYTHON=sys.executable)
    result = subprocess.run([os.path.join(ROOT, "pgen.sh"), "2", "-s", "nosuchsite"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "started" not in result.stdout
    assert "site 'nosuchsite' is not defined" in result.stderr
    assert not list((tmp_path / "run").glob("pilot-*.pid")), "a pilot was started"


def test_pgen_tidies_its_run_directory_of_ended_pilots_and_their_old_logs(p3s, tmp_path):
    """A 37-minute soak left 60 pid and log files: each pgen.sh run removes the pid files of
    pilots that ended and their logs past P3S_LOG_DAYS; a live pilot's files stay."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "pilot-old-1.pid").write_text(f"999999 1 {ROOT}\n")             # a pilot long gone
    (run / "pilot-old-1.log").write_text("old\n")
    os.utime(run / "pilot-old-1.log", (time.time() - 3 * 86400, time.time() - 3 * 86400))
    (run / "pilot-recent-1.log").write_text("ended an hour ago\n")
    os.utime(run / "pilot-recent-1.log", (time.time() - 3600, time.time() - 3600))
    env = dict(p3s.env, P3S_RUNDIR=str(run), P3S_PYTHON=sys.executable)
    started = subprocess.run([os.path.join(ROOT, "pgen.sh"), "1", "-p", "1", "-L", str(p3s.logs)], env=env,
                             capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    names = sorted(os.listdir(run))
    assert "pilot-old-1.pid" not in names and "pilot-old-1.log" not in names
    assert "pilot-recent-1.log" in names and len([n for n in names if n.endswith(".pid")]) == 1
    assert subprocess.run([os.path.join(ROOT, "pkill.sh"), "-t", "5"], env=env, capture_output=True).returncode == 0


def test_execmode_with_any_value_runs_through_the_shell_and_x_forces_it(p3s):
    with_yes, plain = p3s.submit([
        {"payload": "echo $((6*7)) | tr 4 X", "env": {"P3S_EXECMODE": "yes"}},
        {"payload": "echo $((6*7)) | tr 4 X"}])
    p3s.run("pilot.py", "-c", "2", "-p", "1", "-L", p3s.logs)
    assert p3s.job(with_yes)["stdout_tail"] == "X2\n"
    assert p3s.job(plain)["stdout_tail"] == "$((6*7)) | tr 4 X\n", "no shell without P3S_EXECMODE"
    [forced] = p3s.submit([{"payload": "echo $((6*7)) | tr 4 X"}])
    p3s.run("pilot.py", "-x", "-c", "1", "-p", "1", "-L", p3s.logs)
    assert p3s.job(forced)["stdout_tail"] == "X2\n"


def test_pilot_usage_prints_states_and_exit_codes():
    text = tool("pilot.py", "-U").stdout
    assert all(state in text for state in ("defined", "pilotTO", "timeout", "cancelled")) and "-9" in text


def test_job_py_original_options_V_and_caps_for_every_type_and_the_ones_p3s_drops(p3s):
    [uuid] = p3s.submit([shell_job("true")], "-V", "v08_27_01")
    assert p3s.job(uuid)["env"]["DUNETPCVER"] == "v08_27_01"
    p3s.submit([shell_job("true", jobtype="reco"), shell_job("true", jobtype="monitor")])
    assert p3s.run("job.py", "-l", "-L", "3").returncode == 0
    caps = {t["name"]: t["cap"] for t in p3s.api.list_jobtypes()}
    assert caps == {"default": 3, "reco": 3, "monitor": 3}
    for args, says in ((["-i", "7"], "-u UUID"), (["-U"], "--help"), (["-d", "-p", "1", "-u", uuid], "retention-days")):
        refused = p3s.run("job.py", *args)
        assert refused.returncode == 2 and says in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert p3s.run("job.py", "-a", "-u", uuid, "-p", "7").returncode == 0      # -p: the original's priority
    assert p3s.job(uuid)["priority"] == 7


def test_workflow_l_lists_the_dags(p3s):
    p3s.api.add_dag("filters", open(os.path.join(COMPAT, "3filters.graphml")).read())
    listed = p3s.run("workflow.py", "-l")
    assert listed.returncode == 0 and re.search(r"^  filters  \d+ vertices", listed.stdout, re.M)


def test_summary_for_scripts(p3s):
    p3s.submit([shell_job("true"), shell_job("exit 1")])
    p3s.run("pilot.py", "-c", "2", "-p", "1", "-L", p3s.logs)
    lines = dict(line.split(" ", 1) for line in p3s.run("job.py", "--summary").stdout.splitlines()
                 if not line.startswith("alarm "))
    assert "finished=1" in lines["jobs"] and "failed=1" in lines["jobs"]
    assert "finished=1" in lines["ended_1h"] and "stopped=1" in lines["pilots"]


def test_try_runs_a_job_here_with_the_env_a_pilot_gives_it_and_stores_nothing(p3s, tmp_path):
    png = tmp_path / "plot.png"
    tiny_png(png)
    job = tmp_path / "wrapper.json"
    job.write_text(json.dumps({"payload": f"echo in=$P3S_INPUT_FILE data=$P3S_DATA; cd $P3S_OUTPUT_DIR; "
                                          f"mkdir $P3S_JOB_UUID; cp {png} $P3S_JOB_UUID/; exit 4",
                               "env": {"P3S_EXECMODE": "SHELL", "P3S_OUTPUT_DIR": str(tmp_path)}}))
    result = p3s.run("pilot.py", "--try", job, "-j", os.path.join(COMPAT, "lxvm.json"), "-f", "/data/run7.root")
    assert result.returncode == 3, result.stderr
    assert "in=/data/run7.root data=/eos/experiment/neutplatform/protodune/rawdata/np04/output" in result.stdout
    assert "exit code 4; a pilot would publish 1 image(s)" in result.stdout
    assert p3s.api.list_jobs() == [] and p3s.api.list_pilots() == []
    job.write_text(json.dumps({"payload": "true", "env": ["P3S_EXECMODE=SHELL"]}))
    refused = p3s.run("pilot.py", "--try", job)
    assert refused.returncode == 2 and "env must be an object" in refused.stderr and "Traceback" not in refused.stderr


def test_try_says_in_one_line_that_a_payload_cannot_start_and_leaves_no_empty_directory(p3s, tmp_path):
    """The original's simplejob1.json names a script on its author's disk: the very mistake
    --try exists to catch. It died with a traceback and left /tmp/p3s-try-* behind."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    result = p3s.run("pilot.py", "--try", os.path.join(COMPAT, "simplejob1.json"),
                     env=dict(p3s.env, TMPDIR=str(scratch)))
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert "cannot start the payload: No such file or directory: /home/maxim/projects/p3s/inputs/jobs/" \
           "simplejob1.sh" in result.stderr
    assert list(scratch.iterdir()) == [], "a job directory was left behind"


def test_settings_precedence_cli_over_site_over_defaults(p3s):
    """-p, -c and -b given on the command line win over the site's; the site's win over the
    pilot's defaults; both the pilot and the server (its lease) use the same heartbeat."""
    p3s.api.define_site("np04", period=40, cycles=1, heartbeat=7)
    explicit = p3s.run("pilot.py", "-s", "np04", "-p", "0.5", "-c", "1", "-b", "0.5", "-L", p3s.logs, timeout=30)
    assert "period 0.5, cycles 1, heartbeat 0.5" in explicit.stderr, explicit.stderr
    from_site = p3s.run("pilot.py", "-s", "np04", "-p", "0.5", "-L", p3s.logs, timeout=30)
    assert "period 0.5, cycles 1, heartbeat 7" in from_site.stderr, from_site.stderr
    assert sorted(p["heartbeat"] for p in p3s.api.list_pilots()) == [0.5, 7], "the server's lease uses another"


def test_datasets_from_the_command_line_and_deleting_an_injected_record_starts_the_file_again(p3s, tmp_path):
    made = p3s.run("dataset.py", "-r", "--name", "run5010_1.root", "--dirpath", "/eos/np04/raw", "--datatype", "ROOT")
    assert made.returncode == 0, made.stderr
    uuid = made.stdout.strip()
    assert p3s.run("dataset.py", "-a", "-u", uuid, "-s", "bad", "-m", "corrupt header").returncode == 0
    [row] = p3s.api.list_datasets()
    assert (row["state"], row["comment"], row["origin"]) == ("bad", "corrupt header", "registered")
    refused = p3s.run("dataset.py", "-r", "--name", "x", "--dirpath", "/d", "--datatype", "NOPE")
    assert refused.returncode == 2 and "NOPE" in refused.stderr and len(p3s.api.list_datasets()) == 1
    assert p3s.run("dataset.py", "-d", "-u", uuid).returncode == 0 and p3s.api.list_datasets() == []

    assert p3s.run("dataset.py", "-R", "-j", '{"name": "LOG", "ext": ".log", "comment": "payload logs"}').returncode == 0
    assert {"name": "LOG", "ext": ".log", "comment": "payload logs"} in p3s.api.list_datatypes()
    assert p3s.run("dataset.py", "-D", "LOG").returncode == 0
    p3s.api.add_dag("filters", open(os.path.join(COMPAT, "3filters.graphml")).read())
    used = p3s.run("dataset.py", "-D", "TXT")
    assert used.returncode == 2 and "filters" in used.stderr

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "run7.txt").write_text("TEST1\n")
    jobs = json.dumps([shell_job("true")])
    scan = ["injector.py", "-d", inbox, "-j", jobs, "--settle", "0", "-p", "0.2", "-c", "2"]
    assert p3s.run(*scan).returncode == 0 and len(p3s.api.list_jobs()) == 1
    assert p3s.run(*scan).returncode == 0 and len(p3s.api.list_jobs()) == 1, "a file started twice"
    [injected] = p3s.api.list_datasets(origin="injected")
    assert p3s.run("dataset.py", "-d", "-u", injected["uuid"]).returncode == 0
    assert p3s.run(*scan).returncode == 0 and len(p3s.api.list_jobs()) == 2, "the file was not started again"
