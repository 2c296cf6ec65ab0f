"""Operating a fleet: sites with the original's fields, and job-type caps enforced at claim time."""
import contextlib
import json
import os
import subprocess
import sys
import threading
import time

from conftest import COMPAT, ROOT, shell_job, wait_until


def test_the_originals_site_file_defines_a_site_unchanged(p3s):
    path = os.path.join(COMPAT, "lxvm.json")
    result = p3s.run("pilot.py", "--define-site", "-j", path)
    assert result.returncode == 0, result.stderr
    [site] = p3s.api.list_sites()
    original = json.load(open(path))
    assert (site["name"], site["server"], site["pilots"]) == ("lxvm", "p3s-web:80", 120)
    assert (site["period"], site["cycles"], site["heartbeat"]) == (40, 0, 100) and site["env"] == original["env"]
    listing = p3s.run("pilot.py", "--sites").stdout.splitlines()
    assert listing[0].split()[:6] == ["name", "pilots", "pilotlife", "period", "cycles", "heartbeat"]
    assert listing[1].split()[:2] == ["lxvm", "120"] and "None" not in listing[1] and "{'" not in listing[1]
    assert p3s.run("pilot.py", "--define-site", "-s", "small", "--pilots", "4", "--pilot-life", "3600").returncode == 0
    assert {s["name"]: s["pilotlife"] for s in p3s.api.list_sites()} == {"lxvm": None, "small": 3600}
    assert p3s.run("pilot.py", "--delete-site", "-s", "small").returncode == 0
    assert [s["name"] for s in p3s.api.list_sites()] == ["lxvm"]


def test_a_pilot_naming_an_undefined_site_refuses_to_start(p3s):
    result = p3s.run("pilot.py", "-s", "neutdqm", "-c", "1", "-L", p3s.logs)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "--define-site" in result.stderr and "neutdqm" in result.stderr
    assert p3s.api.list_pilots() == []
    env = dict(p3s.env, P3S_SITE="neutdqm")
    assert p3s.run("pilot.py", "-c", "1", "-L", p3s.logs, env=env).returncode == 2
    assert p3s.run("pilot.py", "-c", "1", "-p", "0", "-L", p3s.logs).returncode == 0, "no site at all still runs"


def test_a_cap_holds_under_six_pilots_and_other_types_flow_past(p3s):
    ledger = p3s.dir / "ledger"
    capped = [shell_job(f"echo start $(date +%s.%N) >> {ledger}; sleep 0.3; echo end $(date +%s.%N) >> {ledger}",
                        jobtype="evdisp") for _ in range(12)]
    others = [shell_job("true", jobtype="monitor") for _ in range(30)]
    assert p3s.run("job.py", "-l", "-T", "evdisp", "-L", "2").returncode == 0
    uuids = p3s.submit(capped + others)
    seen, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            counts = p3s.api.call("GET", "/metrics", query={"format": "json"})["jobs"]
            seen.append(sum(c["n"] for c in counts if c["jobtype"] == "evdisp"
                            and c["state"] in ("dispatched", "running")))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for _ in range(6):
            p3s.pilot("-p", "1")
        monitor_done = p3s.wait_jobs(uuids[12:], timeout=60)
        evdisp_left = sum(p3s.job(u)["state"] != "finished" for u in uuids[:12])
        p3s.wait_jobs(uuids[:12], timeout=60)
    finally:
        stop.set()
        sampler.join()
    assert {s["state"] for s in monitor_done.values()} == {"finished"}
    assert evdisp_left > 0, "the other type did not flow past the capped one"
    assert max(seen) <= 2, f"{max(seen)} evdisp jobs at once on the server"
    events = sorted((float(t), +1 if kind == "start" else -1)
                    for kind, t in (line.split() for line in ledger.read_text().splitlines()))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2, f"{peak} evdisp payloads ran at once"
    listing = p3s.run("job.py", "-l").stdout
    assert "evdisp" in listing and "monitor" in listing


def test_cap_zero_suspends_a_type_and_says_why_and_removing_it_resumes(p3s):
    assert p3s.run("job.py", "-l", "-T", "purity", "-L", "0").returncode == 0
    [uuid] = p3s.submit([shell_job("true", jobtype="purity")])
    p3s.run("pilot.py", "-c", "1", "-p", "0.5", "-L", p3s.logs)
    assert p3s.job(uuid)["state"] == "defined"
    page = p3s.api.call("GET", f"/job/{uuid}", query={"format": "json"})
    assert any("purity is suspended (cap 0)" in r for r in page["why_waiting"])
    summary = p3s.api.call("GET", "/", query={"format": "json"})
    assert summary["caps"] == {"purity": 0}
    shown = p3s.run("job.py", "-l", "-T", "purity", "--no-cap")
    assert shown.returncode == 0 and shown.stdout.splitlines()[1].split()[:2] == ["purity", "1"]  # no cap
    p3s.run("pilot.py", "-c", "1", "-p", "1", "-L", p3s.logs)
    assert p3s.job(uuid)["state"] == "finished"
    assert p3s.run("job.py", "-l", "-T", "purity", "-L", "-5").returncode == 2
    wait_until(lambda: p3s.api.list_jobtypes("purity")[0]["cap"] is None, 5, what="the cap removed")


def test_a_site_below_its_nominal_pilots_raises_an_alarm_that_clears(p3s):
    p3s.api.define_site("lxvm", pilots=3, tolerance=0.2, heartbeat=0.5)

    def raised():
        return p3s.alarms("site_below_nominal")

    [alarm] = raised()
    assert alarm["message"] == "lxvm: 0 live pilots of 3 nominal" and alarm["link"] == "/site/lxvm"
    assert alarm["explained_by"] == "no_pilots", "with no pilot alive at all, one problem: no_pilots"
    assert '<td><span class="bad">0</span></td>' in p3s.page("/sites"), "0 live of 3 nominal, not in red"
    metrics = p3s.api.call("GET", "/metrics", query={"format": "json"})
    assert metrics["alarms"] == {"no_pilots": "warning"}, "nothing waits: no_pilots is a warning"
    p3s.pilot("-p", "1", "--jobtype", "elsewhere")             # alive, not at the site
    wait_until(lambda: raised() and not raised()[0].get("explained_by"), 15, what="the site alarm on its own")
    for _ in range(3):
        p3s.pilot("-s", "lxvm", "-p", "1")
    wait_until(lambda: not raised() and p3s.api.get_site("lxvm")["live"] == 3, 15,
               what="the alarm to clear with 3 live pilots")
    site = p3s.api.call("GET", "/site/lxvm", query={"format": "json"})
    assert site["live"] == 3 and len(site["pilots_list"]) == 3
    sites_page = p3s.api.call("GET", "/sites", query={"format": "json"})["sites"]
    assert [(s["name"], s["pilots"], s["live"]) for s in sites_page] == [("lxvm", 3, 3)]
    settings = p3s.page("/site/lxvm")
    for said in ("<td>tolerance below nominal</td><td>20%</td>", "<td>memory limit of a job</td><td>none, "
                 "unless the job sets one</td>", "<td>pilot life</td><td>none: a pilot lives until stopped</td>"):
        assert said in settings, "a site setting shown raw or blank"


def test_a_nominal_never_met_is_the_sites_standing_state_not_an_alarm(p3s):
    """An original site file's 120 pilots, of which one runs: /sites says the nominal was never
    met, and no alarm warns of it for ever. A site that met its nominal and falls below it alarms."""
    p3s.api.define_site("lxvm", pilots=120, heartbeat=0.5)
    p3s.api.define_site("np04", pilots=2, tolerance=0, heartbeat=0.5)
    p3s.pilot("-s", "lxvm", "-p", "1")
    np04 = [p3s.pilot("-s", "np04", "-p", "1") for _ in range(2)]
    wait_until(lambda: len(p3s.api.list_pilots()) == 3, 15, what="3 pilots")
    wait_until(lambda: "2 <small>(never yet)</small>" not in p3s.page("/sites"), 10, what="np04 at nominal")
    assert "120 <small>(never yet)</small>" in p3s.page("/sites")
    np04[0].terminate()
    wait_until(lambda: p3s.alarms("site_below_nominal"), 15, what="np04 below the nominal it met")
    assert [a["key"] for a in p3s.alarms("site_below_nominal")] == ["site_below_nominal:np04"]


def test_a_job_type_that_mostly_fails_raises_an_alarm(p3s):
    def raised():
        return [a["message"] for a in p3s.alarms("failure_rate")]

    p3s.submit([shell_job("exit 3", jobtype="purity")] * 3 + [shell_job("true", jobtype="purity")])
    p3s.run("pilot.py", "-c", "4", "-p", "1", "-L", p3s.logs)
    assert raised() == [], "raised with fewer than 5 jobs ended"
    p3s.submit([shell_job("exit 3", jobtype="purity")] + [shell_job("true", jobtype="monitor")] * 6)
    p3s.run("pilot.py", "-c", "7", "-p", "1", "-L", p3s.logs)
    assert raised() == ["purity: 4 of 5 attempts ended failed, timeout or pilotTO in the last hour (80%)"]
    [link] = [a["link"] for a in p3s.alarms("failure_rate")]
    assert link == "/failures?jobtype=purity&since=1h"
    assert json.loads(p3s.page(link + "&format=json"))["total"] == 4, "the link lists what the alarm counts"
    p3s.submit([shell_job("true", jobtype="purity")] * 4)
    p3s.run("pilot.py", "-c", "4", "-p", "1", "-L", p3s.logs)
    assert raised() == [], "4 of 9 is under half: the alarm should clear"


def test_a_silent_injector_and_stopped_data_flow_raise_alarms(tmp_path, start_server):
    server = start_server(["--alarm-no-new-work", "0.02"])    # 1.2 s
    def raised(name):
        return [a["message"] for a in server.alarms(name)]

    data = tmp_path / "data"
    data.mkdir()
    (data / "run1.txt").write_text("x")
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps(shell_job("true", state="template")))
    scan = ["-d", data, "-j", jobs, "--settle", "0", "-p", "0.3"]
    injector = subprocess.Popen([sys.executable, os.path.join(ROOT, "injector.py"), *map(str, scan)],
                                env=server.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: server.api.call("GET", "/api/services")["services"], 10, what="the injector's first scan")
    services = server.api.call("GET", "/api/services")["services"]
    assert len(services) == 1 and services[0]["result"] == "1 started, 0 skipped"
    assert raised("service_silent") == []
    injector.kill()             # a crash: no clean exit, so no retirement
    injector.wait()
    wait_until(lambda: raised("service_silent") and raised("no_new_work"), 10,
               what="the injector's silence and the stopped flow to raise alarms")
    assert "injector" in raised("service_silent")[0] and str(data) in raised("service_silent")[0]
    (data / "run2.txt").write_text("x")
    assert server.run("injector.py", *scan, "-c", "2").returncode == 0
    assert raised("service_silent") == [] and raised("no_new_work") == [], "the alarms did not clear"
    page = server.api.call("GET", "/services", query={"format": "json"})
    assert page["services"][0]["result"] == "0 started, 0 skipped" and not page["services"][0]["silent"]
    assert len(server.api.list_jobs()) == 2, "run2 was not started once"


def test_jobs_no_live_pilot_may_take_raise_the_starving_alarm_until_one_comes(tmp_path, start_server):
    server = start_server(["--alarm-starving", "0.02"])    # 1.2 s
    def raised():
        return [a["message"] for a in server.alarms("starving")]

    server.api.define_site("neutdqm")
    uuids = server.submit([shell_job("true", jobtype="purity", site="neutdqm")] * 3)
    server.pilot("-p", "1", "--jobtype", "monitor")             # alive, but not for these
    wait_until(raised, 10, what="the starving alarm")
    assert raised()[0].startswith("3 purity job(s) at site neutdqm wait with no pilot that takes them")
    assert server.alarms("starving")[0]["severity"] == "warning"
    wait_until(lambda: server.alarms("starving")[0]["severity"] == "critical", 10,
               what="the starving alarm to escalate after three times its threshold")
    server.pilot("-p", "1", "-s", "neutdqm", "--jobtype", "purity")
    server.wait_jobs(uuids, timeout=30)
    wait_until(lambda: not raised(), 10, what="the alarm to clear")


def test_pilots_dying_young_raise_the_pilot_lifetime_alarm_but_one_kill_or_a_drain_does_not(p3s):
    import signal

    def raised(name="pilot_lifetime"):
        return p3s.alarms(name)

    p3s.api.define_site("short", pilotlife=600, heartbeat=0.5)
    drained = [p3s.pilot("-s", "short", "-p", "1") for _ in range(5)]
    wait_until(lambda: p3s.api.get_site("short")["live"] == 5, 15, what="5 pilots")
    for pilot in drained:
        pilot.send_signal(signal.SIGUSR1)               # a planned drain: they end on purpose
        pilot.wait(15)
    assert raised() == [] and raised("pilots_lost") == [], "a drain is not an alarm"
    steady = [p3s.pilot("-s", "short", "-p", "1") for _ in range(5)]
    first = p3s.pilot("-s", "short", "-p", "1")
    wait_until(lambda: p3s.api.get_site("short")["live"] == 6, 15, what="6 pilots")
    first.kill()                                        # 1 of 6: under the 20% share
    wait_until(lambda: raised("pilots_lost"), 10, what="the lost pilot")
    [lost] = raised("pilots_lost")
    assert lost["severity"] == "warning" and raised() == [], "one kill -9 is a warning, not a lifetime alarm"
    more = [p3s.pilot("-s", "short", "-p", "1") for _ in range(4)]
    wait_until(lambda: p3s.api.get_site("short")["live"] == 9, 15, what="4 more pilots")
    for pilot in more:
        pilot.kill()
    wait_until(raised, 15, what="the lifetime alarm once 5 pilots were lost young")
    [life] = raised()
    assert life["message"].startswith("short: 5 pilots lost in the last hour lived") and "of 600 s" in life["message"]
    assert raised("pilots_lost")[0]["severity"] == "critical", "5 lost pilots in an hour"
    assert all(p.poll() is None for p in steady)


def test_the_sites_page_counts_each_sites_finished_jobs_and_failed_attempts_as_the_lists_it_links(p3s):
    """A site's failures are its failed attempts, a retried job's too (a site that fails every
    first attempt is sick though its jobs end well), counted as the /failures list it links
    to shows them: one failed job and one retried twice are 3 failed attempts, 3 rows."""
    p3s.api.define_site("lxvm")
    p3s.api.define_site("neut")
    p3s.submit([shell_job("true"), shell_job("true"), shell_job("exit 3"), shell_job("exit 4", max_attempts=2)])
    assert p3s.run("pilot.py", "-s", "lxvm", "-c", "5", "-p", "0", "-L", p3s.logs).returncode == 0
    p3s.submit([shell_job("true")])
    assert p3s.run("pilot.py", "-s", "neut", "-c", "1", "-p", "0", "-L", p3s.logs).returncode == 0
    sites = p3s.api.call("GET", "/sites", query={"format": "json"})["sites"]
    assert [(s["name"], s["finished_1h"], s["failed_attempts_1h"]) for s in sites] == [("lxvm", 2, 3), ("neut", 1, 0)]
    page = p3s.page("/sites")
    assert '<span class="bad"><a href="/failures?site=lxvm&amp;since=1h">3</a></span>' in page
    listed = p3s.api.call("GET", "/failures", query={"site": "lxvm", "since": "1h", "format": "json"})
    assert listed["total"] == 3 and len(listed["failures"]) == 3


def test_a_sites_pilots_ended_in_the_last_hour_link_to_those_pilots_only(p3s):
    """`ended (1 h)` and `lost (1 h)` open the pilots they count (/pilots?ended=1h), not every
    pilot that ever ended there: one that ended two hours ago is in neither."""
    import sqlite3
    p3s.api.define_site("lxvm")
    for _ in range(2):
        assert p3s.run("pilot.py", "-s", "lxvm", "-c", "1", "-p", "0", "-L", p3s.logs).returncode == 0
    aged, kept = [p["uuid"] for p in p3s.api.list_pilots()]
    with contextlib.closing(sqlite3.connect(p3s.db, timeout=30)) as db, db:     # it ended 2 h ago
        db.execute("UPDATE pilots SET ts_stop = ts_stop - 7200 WHERE uuid = ?", (aged,))
    [site] = p3s.api.call("GET", "/sites", query={"format": "json"})["sites"]
    assert site["ended_1h"] == 1
    assert '<a href="/pilots?site=lxvm&amp;ended=1h">1</a>' in p3s.page("/sites")
    shown = p3s.api.call("GET", "/pilots", query={"site": "lxvm", "ended": "1h", "format": "json"})["pilots"]
    assert [p["uuid"] for p in shown] == [kept]
    assert 'name="ended" value="1h"' in p3s.page("/pilots?site=lxvm&ended=1h")
    assert "ended: expected a number of seconds" in p3s.page("/pilots?ended=soon", status=400)
