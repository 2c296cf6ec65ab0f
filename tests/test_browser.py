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
    assert "failed · exit code 3 · attempt 1/1" in text
    assert "bad channel 42" in text, "the stderr tail is not visible"
    assert re.search(r'<a href="/file\?path=[^"]+\.err">stderr</a>', dom), "no link to the stderr log"
    assert "Timeline" in text and "running failed" in text
