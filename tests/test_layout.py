"""Every page of a realistic shift, laid out by real headless Chromium at 1400 px: no page
scrolls sideways, and no element covers another (a table over a chart, a long reason over the
next column). The pages have no JavaScript; the measuring script is the test's, added by a
loopback proxy that serves every page of the server under one origin, each in a 1400 px frame."""
import http.server
import json
import os
import re
import subprocess
import threading
import urllib.error
import urllib.request

import pytest

from conftest import CHROMIUM, COMPAT, shell_job, tiny_png

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")

MEASURE = """<script>
function boxes(doc) {
  const kinds = 'nav, h1, h2, h3, p, form, table, pre, svg, .chart, .card, .alarm, details, img';
  return Array.from(doc.querySelectorAll(kinds)).filter(e => {
    const r = e.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && (!e.checkVisibility || e.checkVisibility());});
}
function overlaps(doc) {
  const els = boxes(doc), found = [];
  for (let i = 0; i < els.length; i++) for (let j = i + 1; j < els.length; j++) {
    const a = els[i], b = els[j];
    if (a.contains(b) || b.contains(a)) continue;
    const r = a.getBoundingClientRect(), s = b.getBoundingClientRect();
    const w = Math.min(r.right, s.right) - Math.max(r.left, s.left);
    const h = Math.min(r.bottom, s.bottom) - Math.max(r.top, s.top);
    if (w > 1 && h > 1) found.push(a.tagName + '.' + a.className + ' / ' + b.tagName + '.' + b.className);
  }
  return found.slice(0, 5);
}
window.onload = () => {
  const out = {};
  for (const f of document.querySelectorAll('iframe')) {
    const doc = f.contentDocument;
    out[f.dataset.path] = {width: doc.documentElement.scrollWidth, overlaps: overlaps(doc),
                           title: doc.title};
  }
  document.getElementById('result').textContent = JSON.stringify(out);
};
</script>"""


def proxy(target, paths):
    """A loopback server: /__all__ is every path in a 1400 px frame, anything else is fetched
    from the p3s server as is (so frames, images and the measuring script share one origin)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/__all__":
                frames = "".join(f'<iframe data-path="{p}" src="{p}" width="1400" height="1200"></iframe>'
                                 for p in paths)
                body, kind = f"<html><body><pre id='result'></pre>{frames}{MEASURE}</body></html>".encode(), "text/html"
            else:
                try:
                    with urllib.request.urlopen(target + self.path, timeout=30) as answer:
                        body, kind = answer.read(), answer.headers["Content-Type"]
                except urllib.error.HTTPError as e:
                    body, kind = e.read(), e.headers["Content-Type"]
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def a_shift(p3s, tmp_path):
    """A short DQM shift: a site from lxvm.json, plots, failures with real-looking reasons, a
    workflow, an injected file; returns one uuid of each kind for the pages that need one."""
    site = json.load(open(os.path.join(COMPAT, "lxvm.json")))
    site_file = tmp_path / "lxvm.json"
    site_file.write_text(json.dumps(site))
    p3s.run("pilot.py", "--define-site", "-j", site_file)
    png = tmp_path / "adc.png"
    tiny_png(png, size=(400, 260))
    long_reason = "ERROR: RawDecoder: APA3 FEMB 12 returned no frames after " + "retrying the fragment " * 8
    jobs = []
    for run in range(5008, 5012):
        infile = f"/eos/experiment/neutplatform/protodune/rawdata/np04/np04_raw_run00{run}_0001_dl1.root"
        jobs += [shell_job(f"for a in 1 2 3; do cp {png} $P3S_JOB_DIR/adc_mean_apa$a.png; done", name="Monitor:Main",
                           jobtype="monitor", infile=infile, site="lxvm"),
                 shell_job(f"echo '{long_reason}' >&2; exit 3" if run == 5010 else "true", name="Purity",
                           jobtype="purity", infile=infile, site="lxvm")]
    uuids = p3s.submit(jobs)
    p3s.api.add_dag("3filters", open(os.path.join(COMPAT, "3filters.graphml")).read())
    wf = p3s.api.create_workflow("3filters", state="template")
    p3s.run("pilot.py", "-s", "lxvm", "-c", str(len(jobs)), "-p", "1", "-L", p3s.logs)
    pilot = p3s.api.list_pilots()[0]["uuid"]
    p3s.run("service.py", "-n", "inputsize", "-m", "1.2 TB in the inbox")
    return {"job": uuids[0], "failed": uuids[5], "workflow": wf["uuid"], "pilot": pilot}


def test_every_page_fits_1400_px_and_nothing_overlaps(p3s, tmp_path):
    ids = a_shift(p3s, tmp_path)
    paths = ["/", "/?range=7d", "/runs", "/jobs", "/jobs?limit=400", f"/job/{ids['job']}", f"/job/{ids['failed']}",
             "/pilots", f"/pilot/{ids['pilot']}", "/sites", "/site/lxvm", "/services", "/service/inputsize",
             "/alarms", "/manual", "/workflows", f"/workflow/{ids['workflow']}", "/dags", "/dag/3filters",
             "/datasets", "/datatypes", "/errors", "/failures", "/plots", "/plots?group=run", "/jobtype/purity",
             "/files", "/files?missing=yes", "/signin"]
    front = proxy(p3s.url, paths)
    try:
        result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1500,900",
                                 "--virtual-time-budget=20000", f"--user-data-dir={tmp_path / 'chromium'}",
                                 "--dump-dom", f"http://127.0.0.1:{front.server_address[1]}/__all__"],
                                capture_output=True, text=True, timeout=120)
    finally:
        front.shutdown()
    found = json.loads(re.search(r'<pre id="result">(.*?)</pre>', result.stdout, re.S).group(1).replace("&quot;", '"'))
    assert sorted(found) == sorted(paths), "a page did not load"
    wide = {p: r["width"] for p, r in found.items() if r["width"] > 1400}
    covered = {p: r["overlaps"] for p, r in found.items() if r["overlaps"]}
    assert not wide, f"pages wider than 1400 px: {wide}"
    assert not covered, f"elements covering others: {covered}"
    assert all(r["title"].startswith("p3s: ") for r in found.values())
