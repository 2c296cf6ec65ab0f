#!/usr/bin/env python3
"""huey beside p3s (a benchmark, not a tool): jobs/s of SqliteHuey with process workers, each
task spawning /bin/true with subprocess, as p3s's pilots do. Runs under a Python that has huey
(dispatch.py --systems --huey-venv DIR makes one); p3s itself never imports it.

    DIR/bin/python bench/huey_run.py --workers 4 --jobs 2000     # prints {"jobs_per_s": ...}

The clock runs from the first enqueue to the last result stored (the submission inside the
window, as in dispatch.py's p3s figure). Idle workers poll every 10-100 ms (-d 0.01 -m 0.1), so
none sleeps through the start. Loopback-free (sqlite only); bounded in time.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

TIME_LIMIT = 300
TASKS = '''
import os, subprocess
from huey import SqliteHuey
huey = SqliteHuey(filename=os.environ["BENCH_HUEY_DB"])

@huey.task()
def run_true():
    subprocess.run(["/bin/true"], check=False)
    return True
'''


def run(workers, n_jobs):
    with tempfile.TemporaryDirectory(prefix="p3s-huey-") as tmp:
        with open(os.path.join(tmp, "bench_tasks.py"), "w") as f:
            f.write(TASKS)
        env = dict(os.environ, BENCH_HUEY_DB=os.path.join(tmp, "huey.db"), PYTHONPATH=tmp)
        sys.path.insert(0, tmp)
        os.environ.update(env)
        import bench_tasks
        consumer = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "huey_consumer"),
                                     "bench_tasks.huey", "-k", "process", "-w", str(workers), "-d", "0.01",
                                     "-m", "0.1", "-q"], env=env, cwd=tmp,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(2)                   # its workers started and polling
            started = time.perf_counter()
            for _ in range(n_jobs):
                bench_tasks.run_true()
            deadline = time.monotonic() + TIME_LIMIT
            while bench_tasks.huey.result_count() < n_jobs and time.monotonic() < deadline:
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
            if bench_tasks.huey.result_count() < n_jobs:
                raise SystemExit("huey: the jobs did not end in time")
        finally:
            consumer.terminate()
            consumer.wait(30)
    return {"jobs_per_s": round(n_jobs / elapsed, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2000)
    args = p.parse_args(argv)
    print(json.dumps(run(args.workers, args.jobs)))


if __name__ == "__main__":
    main()
