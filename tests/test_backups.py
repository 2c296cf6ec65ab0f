"""The database is the only copy of every job's history: online copies every interval, checked,
the images beside them; a restore that checks before it serves; the database deleted under load
and restored, at most one interval lost, the pilots working on."""
import os
import sqlite3
import time

from conftest import fill, shell_job, wait_until


def health(server):
    return server.api.call("GET", "/api/health")["backup"]


def copies(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".db"))


def test_the_database_deleted_under_load_is_restored_losing_at_most_one_interval(start_server, tmp_path):
    backups = tmp_path / "backups"
    server = start_server(["--backup-dir", str(backups), "--backup-every", "2", "--backup-keep", "3"])
    server.pilot("-p", "1")
    kept = server.submit([shell_job("sleep 0.2", jobtype="reco") for _ in range(20)])
    done = time.time()
    wait_until(lambda: (health(server)["last_ok"] or 0) > done + 0.5, 15, what="a copy made after the first jobs")
    status = health(server)
    assert status["error"] is None and status["age"] < 3 and 1 <= status["copies"] <= 3
    assert "p3s_backup_age_seconds " in server.page("/metrics") and " · backup " in server.page("/")
    server.submit([shell_job("true", jobtype="reco") for _ in range(5)])      # may be lost: after the copy
    wait_until(lambda: len(copies(backups)) == 3, 15, what="three copies kept, no more")
    time.sleep(2.5)
    assert len(copies(backups)) == 3, "more copies than --backup-keep"
    newest = backups / copies(backups)[-1]
    server.kill9()
    for suffix in ("", "-wal", "-shm"):                 # the disk is lost
        if os.path.exists(server.db + suffix):
            os.unlink(server.db + suffix)
    server.extra_args += ["--restore", str(newest)]
    server.start()
    known = {j["uuid"] for j in server.api.list_jobs(limit=1000)}
    assert set(kept) <= known, "a job submitted before the last copy was lost"
    [after] = server.submit([shell_job("echo after the restore", jobtype="reco")])
    server.wait_jobs([after], timeout=45)
    assert server.job(after)["state"] == "finished", "the pilot did not work on after the restore"
    assert "restored" in (tmp_path / "server.log").read_text()


def test_a_restore_checks_the_copy_first_and_sets_the_old_database_aside(start_server, tmp_path):
    server = start_server()
    [uuid] = server.submit([shell_job("true")])
    server.stop()
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    refused = server.run("server.py", "--db", server.db, "--token-file", server.token_file, "--port", "0",
                         "--restore", damaged, timeout=30)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "--restore" in refused.stderr and os.path.exists(server.db)
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version=999")
    refused = server.run("server.py", "--db", server.db, "--token-file", server.token_file, "--port", "0",
                         "--restore", newer, timeout=30)
    assert refused.returncode == 2 and "schema v999" in refused.stderr
    refused = server.run("server.py", "--db", server.db, "--token-file", server.token_file, "--port", "0",
                         "--restore", tmp_path / "p3s-2026.db", timeout=30)
    assert refused.returncode == 2 and "--restore" in refused.stderr and "no such file" in refused.stderr, refused.stderr
    server.start()
    assert server.job(uuid)["state"] == "defined", "a refused restore touched the database"


def test_a_backup_that_fails_is_an_alarm_and_a_half_written_copy_is_never_kept(start_server, tmp_path, small_fs):
    (small_fs / "p3s-20260101-000000.db.part").write_bytes(b"half")     # a server killed mid-copy
    server = start_server(["--backup-dir", str(small_fs), "--backup-every", "2"])
    assert not (small_fs / "p3s-20260101-000000.db.part").exists()
    wait_until(lambda: health(server)["copies"] >= 1, 15, what="a first copy")
    filler = fill(small_fs)                             # the next copy cannot fit
    wait_until(lambda: server.alarms("backup_stale"), 15, what="the backup_stale alarm")
    [alarm] = server.alarms("backup_stale")
    assert alarm["severity"] == "critical" and "failed" in alarm["message"]
    said = (tmp_path / "server.log").read_text().count("backup to")
    time.sleep(4.5)
    assert (tmp_path / "server.log").read_text().count("backup to") - said <= 3, "a failed backup retried every second"
    assert not [n for n in os.listdir(small_fs) if n.endswith(".part")], "a half-written copy was kept"
    filler.unlink()
    wait_until(lambda: not server.alarms("backup_stale"), 15, what="the alarm to clear once a copy is made")
