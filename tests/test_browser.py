"""End to end in real headless Chromium: what a person sees on the summary and a job page."""
import html
import http.server
import re
import subprocess
import threading

import pytest

from conftest import CHROMIUM, CHROMIUM_FLAGS as FLAGS, P3S, Browser, shell_job

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


def browse(tmp_path, url):
    """The DOM Chromium builds for url, after any script would have run, and its visible text."""
    profile = tmp_path / f"chromium-{len(list(tmp_path.glob('chromium-*')))}"
    result = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    body = re.sub(r"(?s)<(style|title)>.*?</\1>", " ", dom)
    text = html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body)))
    return dom, text


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    server = P3S(tmp_path, ["--files-root", str(root)]).start()
    server.logs = root / "logs"
    yield server
    server.stop()


def test_summary_and_job_page_in_a_real_browser(served, tmp_path):
    evil = "<script>document.title='pwned'</script>"
    uuids = served.submit([shell_job("echo all good", name="calib run 7"),
                           shell_job("echo 'bad channel 42' >&2; exit 3", name=evil, jobtype="dqm")])
    served.run("pilot.py", "-c", "2", "-p", "1", "-L", served.logs)

    dom, text = browse(tmp_path, served.url + "/")
    assert "<title>p3s: Summary</title>" in dom
    assert "no pilot is alive" in text
    assert "Jobs by type and state" in text and "Recent failures" in text
    assert evil in text, "the failed job's name is not shown as text"
    assert re.search(r"all \d+ \d+ 2", text), "the totals row is missing"

    dom, text = browse(tmp_path, served.url + f"/job/{uuids[1]}")
    title = re.search(r"<title>(.*?)</title>", dom).group(1)
    assert title.startswith("p3s: Job &lt;script&gt;") and title != "pwned", "a script from a job name ran"
    assert f"Job {evil}" in text
    assert "failed · bad channel 42 · exit code 3 · ran at" in text
    assert "bad channel 42" in text, "the stderr tail is not visible"
    assert re.search(r'<a href="/file\?path=[^"]+\.err">stderr</a>', dom), "no link to the stderr log"
    assert "Timeline" in text and "running failed" in text


def screenshot(tmp_path, url, name):
    """A full-page PNG of url as a person sees it; kept in the test's temp dir to look at."""
    shot = tmp_path / "screenshots" / name
    shot.parent.mkdir(exist_ok=True)
    profile = tmp_path / f"chromium-{len(list(tmp_path.glob('chromium-*')))}"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1400",
                    f"--screenshot={shot}", url], capture_output=True, timeout=90, check=True)
    assert shot.stat().st_size > 10000, f"{shot}: an empty page?"
    print(f"screenshot: {shot}")
    return shot


def test_plots_reasons_and_activity_in_a_real_browser(served, tmp_path):
    """A DQM job writes two PNGs and an SVG carrying a script; another fails with a message on
    stderr. The shifter sees the thumbnails, the SVG runs nothing, /plots lists them, the
    summary names the failure's reason and its chart has this hour's bars."""
    from conftest import tiny_png
    tiny_png(tmp_path / "adc_mean_apa1.png", (200, 40, 40), (320, 200))
    tiny_png(tmp_path / "adc_rms_apa1.png", (40, 40, 200), (320, 200))
    (tmp_path / "evd.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="320" height="200"><rect width="320" height="200" '
        'fill="#3a3"/><script>document.documentElement.setAttribute("data-pwned", "yes")</script></svg>')
    plots = shell_job(f"cp {tmp_path}/adc_mean_apa1.png {tmp_path}/adc_rms_apa1.png {tmp_path}/evd.svg "
                      "$P3S_OUTPUT_DIR/", name="Monitor:Main", jobtype="monitor",
                      infile="/eos/np04/run_012345_0001.root")
    failing = shell_job("echo 'opening run 12345'; echo 'ERROR: RawDecoder: APA3 FEMB 12 returned no frames' >&2;"
                        " exit 3", name="Purity", jobtype="purity", infile="/eos/np04/run_012345_0001.root")
    uuids = served.submit([plots, failing])
    served.run("pilot.py", "-c", "2", "-p", "0", "-L", served.logs)
    served.wait_jobs(uuids)

    dom, text = browse(tmp_path, served.url + f"/job/{uuids[0]}")
    assert len(re.findall(r'<img src="/image/[^"]+\.png"', dom)) == 2 and '<img src="/image/' in dom
    assert re.search(r'<img src="/image/[^"]+/evd\.svg"', dom)
    svg_dom, _ = browse(tmp_path, served.url + f"/image/{uuids[0]}/evd.svg")
    assert "<rect" in svg_dom and 'data-pwned="yes"' not in svg_dom, "the SVG's script ran"

    dom, text = browse(tmp_path, served.url + "/plots")
    assert "monitor" in text and "run_012345_0001.root" in text and dom.count('<img src="/image/') == 3

    dom, text = browse(tmp_path, served.url + "/")
    assert "ERROR: RawDecoder: APA3 FEMB 12 returned no frames" in text, "the reason is the stderr's last line"
    errors = text.split("Errors (top 10")[1]
    assert "APA3 FEMB 12 returned no frames" in errors, "one failure's group keeps its own numbers"
    assert re.search(r'<rect class="finished"[^>]*height="[1-9]', dom) and '<rect class="failed"' in dom

    for path, name in (("/", "summary.png"), (f"/job/{uuids[0]}", "job-with-plots.png"), ("/plots", "plots.png")):
        screenshot(tmp_path, served.url + path, name)


@pytest.fixture
def browser(tmp_path):
    b = Browser(tmp_path)
    yield b
    b.close()


def evil_site(target_url, fields):
    """Another site (localhost, not 127.0.0.1: another site to a browser) whose page posts a
    form to p3s at once: the cross-site request forgery a signed-in shifter's browser must not
    carry out."""
    inputs = "".join(f'<input type="hidden" name="{k}" value="{v}">' for k, v in fields.items())
    body = (f'<html><body><form id="f" method="post" action="{target_url}">{inputs}</form>'
            '<script>document.getElementById("f").submit()</script></body></html>').encode()

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Evil)
    site.daemon_threads = True          # Chromium's idle preconnections must not hold the shutdown
    threading.Thread(target=site.serve_forever, daemon=True).start()
    return site


def test_a_shifter_works_the_shift_from_the_browser_alone(tmp_path, browser):
    """Sign in; see the failed jobs of run 5003 and retry them (after a confirmation that lists
    them); acknowledge the alarm; note the run; pause and resume a job type; a cross-site page
    that posts to p3s while the shifter is signed in changes nothing. Each action is in the
    history under the shifter's name."""
    server = P3S(tmp_path, ["--alarm-hold", "0"]).start()
    try:
        alice = server.add_user("alice", "shifter")
        token = open(alice["P3S_TOKEN_FILE"]).read().strip()
        data = "/data/np04_raw_run{:06d}_0001_dl1.root"
        failed = server.submit([shell_job("echo 'art::Exception: ProductNotFound' >&2; exit 65", jobtype="purity",
                                          infile=data.format(5003))])[0]
        server.run("pilot.py", "-c", "1", "-p", "1", "-L", tmp_path / "logs")
        waiting = server.submit([shell_job("true", jobtype="monitor", infile=data.format(5004))])[0]

        text = browser.open(server.url + "/runs?runs=5003")
        assert "sign in" in text and "Retry failed jobs" not in text
        browser.open(server.url + "/signin?next=%2Fruns%3Fruns%3D5003")
        text = browser.press("sign in", {"token": token})
        assert "alice (shifter)" in text and "Run grid" in text
        text = browser.press("Retry failed jobs of runs 5003", {"why": "calibration DB back"})
        assert "This will retry 1 failed job(s) of every job type in runs 5003" in text
        assert server.job(failed)["state"] == "failed", "the confirmation page retried already"
        browser.screenshot(tmp_path / "screenshots" / "confirm-retry.png")
        browser.press("Retry these 1 jobs")
        assert (server.job(failed)["state"], server.job(failed)["attempt"]) == ("defined", 2)

        text = browser.open(server.url + "/alarms")
        assert "no pilot" in text.lower()
        browser.screenshot(tmp_path / "screenshots" / "alarms-signed-in.png")
        text = browser.press("Acknowledge", {"why": "alice: pilots restarting on np04-srv-012"}, within="document.querySelector('table')")
        assert "acknowledged by alice" in text

        browser.open(server.url + "/runs?runs=5003")
        text = browser.press("Add note", {"why": "HV trip at 14:02"})
        assert "HV trip at 14:02" in text and "alice" in text

        browser.open(server.url + "/jobtype/monitor")
        text = browser.press("Pause", {"why": "noisy APA 3"})
        assert "Paused by alice" in text
        text = browser.press("Resume", {"why": "APA 3 masked"})
        assert "Paused by alice" not in text

        browser.open(server.url + f"/job/{waiting}")
        evil = evil_site(server.url + "/act", {"action": "cancel", "uuid": waiting, "back": "/"})
        try:
            browser.open(f"http://localhost:{evil.server_address[1]}/")
        finally:
            evil.shutdown()
        text = browser.text()
        assert "Not done (403)" in text and "Origin" in text, "the forged form never reached p3s: " + text
        assert "alice (shifter)" not in text, "the browser sent the session cookie to a cross-site form"
        assert server.job(waiting)["state"] == "defined", "a cross-site page cancelled a job"
        whos = [(e["who"], e["info"]) for e in server.job(failed)["events"] if e["info"].startswith("retried")]
        assert whos == [("alice", "retried: calibration DB back")], "the action is not in the history with why"
        history = server.api.call("GET", "/api/alarms/history", query={"age": "1h"})["events"]
        assert any(e["kind"] == "acknowledged" and e["who"] == "alice" for e in history)
        text = browser.open(server.url + f"/job/{failed}")
        browser.screenshot(tmp_path / "screenshots" / "job-signed-in.png")
        assert "Cancel" in text and "Add note" in text
    finally:
        server.stop()
