"""Leases instead of hopes: a stopped or cut-off pilot never runs a job twice at once, and the
fleet outlives a paused server. Each test failed on the code before the lease and watchdog."""
import signal
import time

from conftest import P3S, alive, shell_job, wait_until


def overlap_checking_job(tmp, **fields):
    """A job whose every attempt records its pid, and says OVERLAP if an earlier attempt's
    payload still runs when it starts (a zombie, dead but not yet reaped, does not count)."""
    pids, ledger = tmp / "pids", tmp / "ledger"
    payload = (f"for p in $(cat {pids} 2>/dev/null); do s=$(cut -d' ' -f3 /proc/$p/stat 2>/dev/null); "
               f"[ -n \"$s\" ] && [ \"$s\" != Z ] && echo OVERLAP >> {ledger}; done; "
               f"echo $$ >> {pids}; echo start $P3S_JOB_UUID >> {ledger}; sleep 30 & wait")
    return shell_job(payload, **fields), pids, ledger


def test_a_stopped_pilot_loses_its_job_only_after_the_watchdog_killed_it(tmp_path):
    server = P3S(tmp_path, ["--lease-beats", "6"]).start()       # lease: 6 x 0.5 s
    try:
        job, pids, ledger = overlap_checking_job(tmp_path, max_attempts=2, timeout=8)
        [uuid] = server.submit([job])
        first = server.pilot("-p", "1", "-b", "0.5", "--kill-grace", "1")
        wait_until(lambda: pids.exists(), 15, what="the first attempt to start")
        first_payload = int(pids.read_text())
        first.send_signal(signal.SIGSTOP)           # a pilot that cannot speak, or be spoken to
        stopped = time.monotonic()
        wait_until(lambda: not alive(first_payload), 10, what="the watchdog to kill the payload")
        assert server.job(uuid)["attempt"] == 1, "the job was given away before its payload died"
        server.pilot("-p", "1", "-b", "0.5")
        wait_until(lambda: server.job(uuid)["attempt"] == 2 and len(pids.read_text().split()) == 2, 20,
                   what="the retry to start on another pilot")
        assert time.monotonic() - stopped >= 6 * 0.5 - 0.5
        first.send_signal(signal.SIGCONT)
        time.sleep(2)
        assert "OVERLAP" not in ledger.read_text()
        assert first.poll() is None, "the pilot exited after its pause"
        record = next(p for p in server.api.list_pilots() if p["pid"] == first.pid)
        assert record["state"] in ("active", "no jobs", "dispatched", "running"), record["state"]
    finally:
        server.stop()


def test_a_paused_server_kills_nothing_and_every_pilot_carries_on(tmp_path):
    """SIGSTOP the server longer than PAUSE_GAP (and 12 heartbeats): housekeeping sees its own
    gap and blames nobody; running jobs finish once; every pilot is still there."""
    server = P3S(tmp_path).start()
    try:
        ledger = tmp_path / "ledger"
        uuids = server.submit([shell_job(f'echo "$P3S_JOB_UUID" >> {ledger}; sleep 8')] * 3)
        pilots = [server.pilot("-p", "1", "-b", "0.5") for _ in range(3)]
        wait_until(lambda: all(server.job(u)["state"] == "running" for u in uuids), 20, what="jobs running")
        server.proc.send_signal(signal.SIGSTOP)
        time.sleep(6)
        server.proc.send_signal(signal.SIGCONT)
        states = server.wait_jobs(uuids, timeout=30)
        assert {s["state"] for s in states.values()} == {"finished"}
        assert sorted(ledger.read_text().split()) == sorted(uuids), "a job ran twice"
        assert all(p.poll() is None for p in pilots), "a pilot exited after the server's pause"
        assert all(p["state"] != "lost" for p in server.api.list_pilots()), "pilots blamed for the pause"
        assert all(server.job(u)["attempt"] == 1 for u in uuids)
    finally:
        server.stop()
