#!/usr/bin/env python3
"""A DQM payload to copy: it reads its input file, draws nothing fancy, and says whether the
data is good, the way p3s reads it (docs/jobs.md, "Data quality"):

    $P3S_JOB_DIR/verdict.json   [{"check": NAME, "result": "OK|WARNING|BAD|INVALID", "message": TEXT}]
    $P3S_JOB_DIR/metrics.json   {"name": number, ...}

Submit it with examples/dqm_check.json (python job.py -j examples/dqm_check.json -f FILE), or
name it in an injector's job template. Standard library only; replace `measure` with your
real analysis (LArSoft, a ROOT macro called through subprocess, ...).
"""
import json
import os
import sys
import zlib


def measure(path):
    """Stand-in figures from the file's bytes: yours come from the detector's data."""
    with open(path, "rb") as f:
        data = f.read(1 << 20)
    spread = len(set(data)) / 256 if data else 0.0
    return {"bytes_read": len(data), "byte_spread": round(spread, 3), "adler32": zlib.adler32(data)}


def checks_of(metrics):
    """A check per question a shifter asks, each with a message a person understands."""
    found = [{"check": "readable", "result": "OK" if metrics["bytes_read"] else "BAD",
              "message": f"{metrics['bytes_read']} bytes read"}]
    spread = metrics["byte_spread"]
    found.append({"check": "byte_spread", "result": "OK" if spread > 0.9 else "WARNING" if spread > 0.5 else "BAD",
                  "message": f"{spread:.0%} of byte values seen (a dead stream repeats itself)"})
    return found


def main():
    infile = os.environ.get("P3S_INPUT_FILE") or (sys.argv[1] if len(sys.argv) > 1 else "")
    out = os.environ.get("P3S_JOB_DIR", ".")
    if not infile or not os.path.isfile(infile):
        verdict = [{"check": "readable", "result": "INVALID", "message": f"no input file {infile!r}"}]
        metrics = {}
    else:
        metrics = measure(infile)
        verdict = checks_of(metrics)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({k: v for k, v in metrics.items() if k != "adler32"}, f)
    with open(os.path.join(out, "verdict.json"), "w") as f:
        json.dump(verdict, f, indent=1)
    print("checks:", ", ".join(f"{c['check']}={c['result']}" for c in verdict))
    return 0     # the job finished; whether the data is good is the verdict's to say


if __name__ == "__main__":
    sys.exit(main())
