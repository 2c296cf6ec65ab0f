"""Chaos, bounded: 600 wrapper-payload jobs on 20 pilots while pilots are killed with -9 and
the server is stopped for 4 heartbeats. Nothing is lost, no job runs twice at the same time,
and every pilot that was not killed is still there at the end."""
import random
import signal
import time

from conftest import shell_job, wait_until

JOBS, PILOTS, KILLS = 600, 20, 8
BEAT = 0.5


def wrapper_job(runs):
    """`sh -c` spawning a child, as production wrappers do. Each run records its shell's pid in
    runs/<job uuid> and, first, says OVERLAP if a pid recorded there still runs (not a zombie)."""
    check = (f'for p in $(cat {runs}/$P3S_JOB_UUID 2>/dev/null); do s=$(cut -d" " -f3 /proc/$p/stat 2>/dev/null); '
             f'[ -n "$s" ] && [ "$s" != Z ] && echo $P3S_JOB_UUID >> {runs}/OVERLAP; done; ')
    return shell_job(check + f"echo $$ >> {runs}/$P3S_JOB_UUID; sh -c 'sleep 0.2' & wait", max_attempts=20)


def test_chaos_nothing_lost_nothing_twice_at_once_every_pilot_alive(tmp_path, start_server):
    random.seed(7)
    server = start_server(["--lease-beats", "10"])    # lease 5 s; pilots fence at 3 s
    runs = tmp_path / "runs"
    runs.mkdir()
    uuids = server.submit([wrapper_job(runs)] * JOBS)
    pilots = [server.pilot("-p", "1", "-b", str(BEAT), "--kill-grace", "1") for _ in range(PILOTS)]
    killed = set()
    deadline = time.monotonic() + 100
    for i in range(KILLS):
        time.sleep(0.7)
        victim = random.choice([p for p in pilots if p not in killed])
        victim.send_signal(signal.SIGKILL)
        killed.add(victim)
        pilots.append(server.pilot("-p", "1", "-b", str(BEAT), "--kill-grace", "1"))
        if i == KILLS // 2:
            server.proc.send_signal(signal.SIGSTOP)         # 4 heartbeats of a frozen server
            time.sleep(4 * BEAT)
            server.proc.send_signal(signal.SIGCONT)
    states = server.wait_jobs(uuids, timeout=max(10, deadline - time.monotonic()))
    assert {s["state"] for s in states.values()} == {"finished"}, "a job was lost"
    assert not (runs / "OVERLAP").exists(), f"ran twice at once: {(runs / 'OVERLAP').read_text()}"
    retried = [j for j in server.api.list_jobs(limit=JOBS) if j["attempt"] > 1]
    assert retried, "no job was interrupted: the chaos did not bite"
    survivors = [p for p in pilots if p not in killed]
    assert all(p.poll() is None for p in survivors), "a pilot exited during the chaos"
    wait_until(lambda: sum(p["state"] in ("active", "no jobs") for p in server.api.list_pilots(limit=100))
               == len(survivors), 10, what="every surviving pilot live on the server")
