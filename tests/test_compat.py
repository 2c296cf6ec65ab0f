"""Users of the original p3s move over unchanged: its command lines, environment variables,
payload wrappers and injector habits, each driven through the real tools; the outcome is
asserted, not only the exit code."""
import json
import os
import subprocess
import time

from conftest import (COMPAT, ROOT, alive, fresh_copy, graphml, readme_block, run_readme, shell_job,
                      wait_until)


def one_line_refusal(result, text):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and text in result.stderr, result.stderr


# -- command lines ---------------------------------------------------------------------------------
def test_verbosity_n_on_every_tool_a_bare_v_and_the_environment(p3s):
    path = p3s.dir / "one.json"
    path.write_text(json.dumps(shell_job("true")))
    assert p3s.run("job.py", "-j", path, "-v", "2").returncode == 0
    assert p3s.run("job.py", "--list", "-v").returncode == 0
    assert p3s.run("workflow.py", "--list", "-v", "4").returncode == 0
    assert p3s.run("verifyImport.py", "--offline", "-v", "1").stdout.count("OK import") > 10
    pilot = p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs, "-v", "3")
    assert pilot.returncode == 0 and "DEBUG" in pilot.stderr
    quiet = p3s.run("pilot.py", "-c", "1", "-p", "0", "-L", p3s.logs, env=dict(p3s.env, P3S_VERBOSITY="0"))
    assert "DEBUG" not in quiet.stderr
    loud = p3s.run("pilot.py", "-c", "1", "-p", "0", "-L", p3s.logs, env=dict(p3s.env, P3S_VERBOSITY="2"))
    assert "DEBUG" in loud.stderr
    one_line_refusal(p3s.run("job.py", "--list", "-v", "7"), "must be 0 to 4")
    one_line_refusal(p3s.run("injector.py", "-d", p3s.dir, "-j", path, env=dict(p3s.env, P3S_VERBOSITY="loud")),
                     "P3S_VERBOSITY")


def test_job_py_one_job_per_input_file_for_each_job(p3s):
    path = p3s.dir / "two.json"
    path.write_text(json.dumps([shell_job("true", name="reco", state="template"),
                                shell_job("true", name="dqm", state="template")]))
    uuids = p3s.run("job.py", "-j", path, "-f", "/data/a.root,/data/b.root").stdout.split()
    jobs = [p3s.job(u) for u in uuids]
    assert sorted((j["name"], j["infile"]) for j in jobs) == [
        ("dqm", "/data/a.root"), ("dqm", "/data/b.root"), ("reco", "/data/a.root"), ("reco", "/data/b.root")]
    assert all(j["env"]["P3S_INPUT_FILE"] == j["infile"] for j in jobs)


def test_adjust_and_delete_take_a_comma_list(p3s):
    uuids = p3s.submit([shell_job("true", state="template")] * 3)
    assert p3s.run("job.py", "-a", "-u", ",".join(uuids[:2]), "-s", "cancelled").returncode == 0
    assert [p3s.job(u)["state"] for u in uuids] == ["cancelled", "cancelled", "template"]
    assert p3s.run("job.py", "-d", "-u", ",".join(uuids[:2])).returncode == 0
    assert [j["uuid"] for j in p3s.api.list_jobs()] == [uuids[2]]


def test_inline_json_a_delay_and_a_dry_run(p3s):
    inline = json.dumps([shell_job("true", state="template")] * 3)
    started = time.monotonic()
    result = p3s.run("job.py", "-j", inline, "-D", "100")
    assert result.returncode == 0 and len(result.stdout.split()) == 3
    assert time.monotonic() - started >= 0.2, "-D did not space the submissions"
    dry = p3s.run("job.py", "-j", json.dumps({"payload": "reco.sh", "name": "dry"}), "-t")
    assert dry.returncode == 0 and json.loads(dry.stdout)[0]["name"] == "dry"
    assert len(p3s.api.list_jobs()) == 3, "-t sent something"
    one_line_refusal(p3s.run("job.py", "-j", "{not json", "-t"), "malformed JSON")


def test_pgen_takes_the_originals_quoted_options_without_eval(p3s):
    rundir, marker = p3s.dir / "run", p3s.dir / "pwned"
    env = dict(p3s.env, P3S_RUNDIR=str(rundir), P3S_NODE="node9")
    p3s.api.define_site("np04")
    result = subprocess.run([f"{ROOT}/pgen.sh", "2", f"-s np04 -b 0.5 -L {p3s.logs} -e 'batch 12'"],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(p3s.api.list_pilots(state="no jobs")) == 2, 20, what="two pilots idle")
    assert {(p["site"], p["extra"]) for p in p3s.api.list_pilots()} == {("np04", "batch 12")}
    hostile = subprocess.run([f"{ROOT}/pgen.sh", "1", f"-e '$(touch {marker})' -L {p3s.logs} -b 0.5"],
                             env=env, capture_output=True, text=True, timeout=30)
    assert hostile.returncode == 0
    wait_until(lambda: len(p3s.api.list_pilots(state="no jobs")) == 3, 20, what="the third pilot")
    assert not marker.exists(), "pgen.sh ran a command from its argument"
    assert any(p["extra"] == f"$(touch {marker})" for p in p3s.api.list_pilots())
    pids = [int(open(rundir / f).read().split()[0]) for f in os.listdir(rundir) if f.endswith(".pid")]
    assert len(pids) == 3 and all(alive(pid) for pid in pids)
    stopped = subprocess.run([f"{ROOT}/pkill.sh", "-t", "3"], env=env, capture_output=True, text=True, timeout=30)
    assert stopped.returncode == 0 and "stopped 3 pilot(s)" in stopped.stdout, stopped.stdout + stopped.stderr
    wait_until(lambda: not any(alive(pid) for pid in pids), 10, what="pkill.sh to stop every pilot")
    assert {p["state"] for p in p3s.api.list_pilots()} == {"stopped"}, "the pilots did not deregister"


def test_a_second_graphml_of_the_same_name_says_how_to_replace_it(p3s):
    path = p3s.dir / "chain.graphml"
    path.write_text(graphml([("a", "x", "true"), ("b", "x", "true")], [("a", "b", "f", "F")]))
    assert p3s.run("workflow.py", "-g", path).returncode == 0
    one_line_refusal(p3s.run("workflow.py", "-g", path), "--replace")
    wf = p3s.run("workflow.py", "-a", "chain", "-n", "night-run", "-s", "defined").stdout.strip()
    one_line_refusal(p3s.run("workflow.py", "-g", path, "--replace"), "still running")
    assert p3s.run("workflow.py", "-m", "-u", wf, "-s", "cancelled").returncode == 0
    path.write_text(graphml([("a", "x", "true")], []))
    assert p3s.run("workflow.py", "-g", path, "--replace").returncode == 0
    assert len(p3s.api.get_dag("chain")["vertices"]) == 1
    p3s.run("workflow.py", "-a", "chain", "-n", "other")
    deleted = p3s.run("workflow.py", "-d", "-w", "workflow", "-n", "night-run,other")
    assert deleted.returncode == 0 and deleted.stdout.count("deleted workflow") == 2
    assert p3s.api.list_workflows() == []
    one_line_refusal(p3s.run("workflow.py", "-d", "-w", "workflow", "-n", "night-run"), "no workflow of that name")


def test_an_edge_of_an_undefined_datatype_is_refused_by_name(p3s):
    path = p3s.dir / "odd.graphml"
    path.write_text(graphml([("a", "x", "true"), ("b", "x", "true")], [("a", "b", "f", "F")])
                    .replace(">TXT<", ">NTUPLE<"))
    one_line_refusal(p3s.run("workflow.py", "-g", path), "datatype 'NTUPLE' is not defined")
    assert p3s.api.list_dags() == []


# -- environment variables -------------------------------------------------------------------------
def test_pilot_environment_site_logs_and_a_server_url_with_a_slash(tmp_path, start_server):
    root = tmp_path / "root"
    server = start_server(["--files-root", str(root)])
    joblog, pilotlog = root / "joblog", root / "pilotlog"
    server.api.define_site("np04")
    [uuid] = server.submit([shell_job("echo hello", site="np04")])
    env = dict(server.env, P3S_SITE="np04", P3S_JOBLOG=str(joblog), P3S_PILOTLOG=str(pilotlog),
               P3S_SERVER=server.url + "/")
    assert server.run("pilot.py", "-c", "1", "-p", "1", env=env).returncode == 0
    assert server.job(uuid)["state"] == "finished"
    out = server.job(uuid)["stdout_path"]
    assert out.startswith(str(joblog) + "/") and open(out).read() == "hello\n"
    [pilot] = server.api.list_pilots()
    assert pilot["site"] == "np04" and (pilotlog / f"{pilot['uuid']}.log").exists()
    page = server.api.call("GET", f"/pilot/{pilot['uuid']}?format=json")
    assert page["logs"][0]["url"], "the pilot page does not link its log"


def test_p3s_input_file_from_the_shell_or_the_env_becomes_the_infile(p3s):
    path = p3s.dir / "job.json"
    path.write_text(json.dumps(shell_job("true", state="template", env={"P3S_EXECMODE": "SHELL",
                                                                        "P3S_INPUT_FILE": "/data/json.root"})))
    [from_env] = p3s.run("job.py", "-j", path).stdout.split()
    assert p3s.job(from_env)["infile"] == "/data/json.root"
    [from_shell] = p3s.run("job.py", "-j", path, env=dict(p3s.env, P3S_INPUT_FILE="/data/shell.root")).stdout.split()
    job = p3s.job(from_shell)
    assert job["infile"] == job["env"]["P3S_INPUT_FILE"] == "/data/shell.root"


def test_copy_mode_runs_a_copy_from_the_jobs_own_scratch_directory(p3s):
    script = p3s.dir / "reco.sh"
    script.write_text("#!/bin/sh\necho \"$0\"\n")
    script.chmod(0o755)
    uuids = p3s.submit([{"payload": str(script), "env": {"P3S_MODE": "COPY"}}] * 2)
    p3s.run("pilot.py", "-c", "2", "-p", "1", "-L", p3s.logs)
    for uuid in uuids:
        job = p3s.job(uuid)
        assert job["state"] == "finished"
        assert job["stdout_tail"].strip() == os.path.join(os.path.dirname(job["stdout_path"]), uuid, "reco.sh")


# -- the injector and the production data path -----------------------------------------------------
def injector(p3s, *args, cycles=3):
    return p3s.run("injector.py", "--settle", "0.2", "-p", "0.3", "-c", cycles, *args)


def test_bare_names_for_the_originals_wrappers_and_a_user_on_every_job(p3s):
    data = p3s.dir / "data"
    data.mkdir()
    (data / "run42.txt").write_text("RAW\n")
    wrapper = p3s.dir / "wrapper.sh"             # the original's production wrapper style
    wrapper.write_text('#!/bin/sh\ncat "$P3S_DATA/$P3S_INPUT_DIR/$P3S_INPUT_FILE"\necho "file=$P3S_INPUT_FILE"\n')
    wrapper.chmod(0o755)
    jobs = p3s.dir / "jobs.json"
    jobs.write_text(json.dumps({"payload": str(wrapper), "env": {"P3S_DATA": ""}}))
    result = injector(p3s, "-d", data, "-j", jobs, "--bare-name")
    assert result.returncode == 0, result.stderr
    [job] = p3s.api.list_jobs()
    assert job["user"] and job["infile"] == str(data / "run42.txt")
    p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs)
    assert p3s.job(job["uuid"])["stdout_tail"] == "RAW\nfile=run42.txt\n"


def test_both_wrapper_shapes_find_the_file_at_a_site_from_lxvm_json_with_the_inbox_under_its_data(p3s):
    """The later production wrappers read $P3S_DATA/$P3S_INPUT_DIR/$P3S_INPUT_FILE (P3S_DATA from
    the site), the earlier ones $P3S_INPUT_DIR/$P3S_INPUT_FILE: --bare-name data and dir."""
    data = p3s.dir / "eos" / "output"
    inbox = data / "inbox"
    inbox.mkdir(parents=True)
    site = json.load(open(os.path.join(COMPAT, "lxvm.json")))
    site["env"]["P3S_DATA"] = str(data)                  # the rest of the original file unchanged
    site_file = p3s.dir / "lxvm.json"
    site_file.write_text(json.dumps(site))
    assert p3s.run("pilot.py", "--define-site", "-j", site_file).returncode == 0
    later, earlier = p3s.dir / "later.sh", p3s.dir / "earlier.sh"
    later.write_text('#!/bin/sh\ncat "$P3S_DATA/$P3S_INPUT_DIR/$P3S_INPUT_FILE"\n')
    earlier.write_text('#!/bin/sh\ncat "$P3S_INPUT_DIR/$P3S_INPUT_FILE"\n')
    for jobtype, wrapper, shape, named in (("data", later, "data", {"site": "lxvm"}), ("dir", earlier, "dir", {"site": "lxvm"}),
                                           ("nosite", later, "data", {})):     # as the original's jobs were written
        wrapper.chmod(0o755)
        jobs = p3s.dir / f"{jobtype}.json"
        jobs.write_text(json.dumps({"payload": str(wrapper), "jobtype": jobtype, **named}))
        (inbox / f"np04_raw_run5010_{jobtype}.root").write_text(f"RAW {jobtype}\n")
        result = injector(p3s, "-d", inbox, "-j", jobs, "--bare-name", shape, "-g", f"*_{jobtype}.root")
        assert result.returncode == 0, result.stderr
    p3s.run("pilot.py", "-s", "lxvm", "-c", "3", "-p", "1", "-L", p3s.logs)
    outputs = {j["jobtype"]: (j["state"], p3s.job(j["uuid"])["stdout_tail"]) for j in p3s.api.list_jobs()}
    assert outputs == {"data": ("finished", "RAW data\n"), "dir": ("finished", "RAW dir\n"),
                       "nosite": ("finished", "RAW nosite\n")}, outputs
    outside = p3s.dir / "elsewhere"
    outside.mkdir()
    refused = injector(p3s, "-d", outside, "-j", p3s.dir / "data.json", "--bare-name")
    assert refused.returncode == 2 and "not under P3S_DATA" in refused.stderr and "--bare-name dir" in refused.stderr


def test_two_templates_on_one_directory_each_start_once_per_file(p3s):
    data = p3s.dir / "data"
    data.mkdir()
    for i in range(3):
        (data / f"run{i}.txt").write_text("x\n")
    monitor, evdisp = p3s.dir / "monitor.json", p3s.dir / "evdisp.json"
    monitor.write_text(json.dumps(shell_job("true", jobtype="monitor", state="template")))
    evdisp.write_text(json.dumps(shell_job("true", jobtype="evdisp", state="template")))
    for template in (monitor, evdisp, monitor):       # the third run finds everything started
        result = injector(p3s, "-d", data, "-j", template)
        assert result.returncode == 0, result.stderr
    assert sorted(j["jobtype"] for j in p3s.api.list_jobs()) == ["evdisp"] * 3 + ["monitor"] * 3
    assert "0 file(s) started, 3 skipped" in result.stderr, "skipped files not counted without -v"
    listed = p3s.page("/datasets")
    assert listed.count(">jobs monitor.json<") == 3 and listed.count(">jobs evdisp.json<") == 3, \
        "a file listed once per template with nothing saying which"


def test_injected_workflows_write_their_outputs_to_outdir(p3s):
    assert p3s.run("workflow.py", "-g", os.path.join(COMPAT, "3filters.graphml")).returncode == 0
    data, out = p3s.dir / "in", p3s.dir / "out"
    data.mkdir()
    out.mkdir()
    (data / "run7.txt").write_text("TEST1\nTEST2\nTEST3\n")
    result = injector(p3s, "-d", data, "--dag", "3filters", "--outdir", out)
    assert result.returncode == 0, result.stderr
    p3s.run("pilot.py", "-c", "3", "-p", "1", "-L", p3s.logs)
    [wf] = p3s.api.list_workflows()
    assert p3s.api.get_workflow(wf["uuid"])["state"] == "finished"
    assert sorted(os.listdir(out)) == ["run7_OUTTXT1.txt", "run7_OUTTXT2.txt", "run7_OUTTXT3.txt"]
    assert wf["user"], "the injector's workflow has no user"


def test_readme_injector_example_runs_as_written(tmp_path):
    env = fresh_copy(tmp_path)
    script = ("python server.py 2>/dev/null &\n"
              "python workflow.py -g tests/compat/3filters.graphml >/dev/null\n"
              + readme_block("Try it (with the server running and the DAG"))
    result = run_readme(tmp_path, env, script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-3:] == ["run7_OUTTXT1.txt", "run7_OUTTXT2.txt", "run7_OUTTXT3.txt"]


# -- a site defined from the original's lxvm.json, unchanged ------------------------------------------
def test_wrappers_at_an_original_site_publish_exactly_their_own_plots(p3s):
    """lxvm.json sets P3S_OUTPUT_DIR=/tmp: the original's base, shared by every job. The earlier
    wrappers write to `$P3S_OUTPUT_DIR/$P3S_JOB_UUID`, the later ones to
    `$P3S_DATA/$P3S_MONITOR_DIR/$P3S_JOB_UUID`, native payloads to `$P3S_JOB_DIR`: each job
    publishes its own plots, and nothing else in the shared base."""
    import shutil
    from conftest import tiny_png
    assert p3s.run("pilot.py", "--define-site", "-j", os.path.join(COMPAT, "lxvm.json")).returncode == 0
    plot = tiny_png(p3s.dir / "plot.png")
    foreign = tiny_png(p3s.dir / "foreign.png")
    stray = f"/tmp/p3s-test-stray-{os.urandom(6).hex()}.png"      # another user's file in the base
    shutil.copy(foreign, stray)
    earlier = f'cd $P3S_OUTPUT_DIR; mkdir $P3S_JOB_UUID; cd $P3S_JOB_UUID; cp {plot} adc_mean.png'
    later = f'D=$P3S_DATA/$P3S_MONITOR_DIR/$P3S_JOB_UUID; mkdir -p $D; cp {plot} $D/evd.png'
    native = f'cp {plot} $P3S_JOB_DIR/native.png; echo "$P3S_JOB_UUID $P3S_OUTPUT_DIR"'
    data = p3s.dir / "data"
    jobs = [shell_job(earlier, site="lxvm"), shell_job(earlier, site="lxvm"),
            shell_job(later, site="lxvm", env={"P3S_EXECMODE": "SHELL", "P3S_DATA": str(data),
                                                "P3S_MONITOR_DIR": "monitor"}),
            shell_job(native, site="lxvm")]
    uuids = p3s.submit(jobs)
    try:
        ran = p3s.run("pilot.py", "-s", "lxvm", "-c", "4", "-p", "1", "-b", "0.5", "-L", p3s.logs)
        assert ran.returncode == 0 and "not published" not in ran.stderr, ran.stderr
        published = {}
        for uuid in uuids:
            job = p3s.job(uuid)
            assert job["state"] == "finished", job["stderr_tail"]
            page = p3s.api.call("GET", f"/job/{uuid}", query={"format": "json"})
            published[uuid] = [i["name"] for i in page["images"]]
        assert published == {uuids[0]: ["adc_mean.png"], uuids[1]: ["adc_mean.png"], uuids[2]: ["evd.png"],
                             uuids[3]: ["native.png"]}, "only each job's own directory, never the base /tmp"
        assert p3s.job(uuids[3])["stdout_tail"].split() == [uuids[3], "/tmp"], "the site's base, as the original"
    finally:
        os.unlink(stray)
        for uuid in uuids:
            shutil.rmtree(f"/tmp/{uuid}", ignore_errors=True)


def test_a_job_or_site_cannot_set_the_pilots_per_job_values(p3s):
    for body in ({"payload": "true", "env": {"P3S_JOB_UUID": "mine"}},
                 {"payload": "true", "env": {"P3S_JOB_DIR": "/tmp"}}):
        path = p3s.dir / "bad.json"
        path.write_text(json.dumps(body))
        one_line_refusal(p3s.run("job.py", "-j", path), "is set by the pilot for each job")
    site = p3s.dir / "site.json"
    site.write_text(json.dumps({"name": "x", "env": {"P3S_PILOT_UUID": "p"}}))
    one_line_refusal(p3s.run("pilot.py", "--define-site", "-j", site), "P3S_PILOT_UUID is set by the pilot")
    assert p3s.api.list_jobs() == [] and p3s.api.list_sites() == []
