"""End to end in real headless Chromium: what a person sees on the summary and a job page."""
import html
import re
import shutil
import subprocess

import pytest

from conftest import P3S, shell_job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


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
    assert "APA3 FEMB # returned no frames" in text, "the error summary groups it"
    assert re.search(r'<rect class="finished"[^>]*height="[1-9]', dom) and '<rect class="failed"' in dom

    for path, name in (("/", "summary.png"), (f"/job/{uuids[0]}", "job-with-plots.png"), ("/plots", "plots.png")):
        screenshot(tmp_path, served.url + path, name)
