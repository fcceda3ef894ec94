"""The HTML report: self-contained, escaped, and rendered by a real headless Chromium.

The browser tests need Debian's `chromium` (`apt-get install -y chromium`; `.ci/run` installs
it) and are skipped, saying so, where it is absent.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from synthetic import Site, make_report, sample_report

import deadrelu
from deadrelu.formats.html import HtmlFormat
from deadrelu.formats.interface import Outcome
from deadrelu.gates import GatePolicy, evaluate

pytest.importorskip("matplotlib", reason="the html format needs matplotlib (pip install 'deadrelu[html]')")

FIX = Path(__file__).resolve().parent.parent / "fixtures"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless browser test: no chromium on PATH (Debian: apt-get install -y chromium)")


def render(report, policy: GatePolicy | None = None) -> str:
    return HtmlFormat().render(Outcome(report, evaluate(report, policy or GatePolicy())))


@pytest.fixture(scope="module")
def convnet_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    report = deadrelu.scan(FIX / "convnet.ts.pt", FIX / "convnet.calib.npy")
    path = tmp_path_factory.mktemp("html") / "convnet report.html"  # a space: file URLs must be quoted
    path.write_text(render(report, GatePolicy(max_site_dead_fraction=0.1)), encoding="utf-8")
    return path


def test_page_is_self_contained(convnet_page: Path) -> None:
    page = convnet_page.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page), "loads something from the network"
    assert "<link" not in page and "@import" not in page and "url(http" not in page
    assert "<script src" not in page
    assert page.count("<svg") == 13 + 1  # the overview and one per site
    assert page.count('data-chart="site"') == 13


def test_names_and_messages_are_escaped() -> None:
    report = make_report([Site('evil"<script>alert(1)</script>', 4, dead=(0,)), Site("ok", 4)])
    page = render(report, GatePolicy(max_dead=0))
    assert "<script>alert(1)</script>" not in page
    assert "evil&quot;&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_ids_are_unique_across_inlined_svgs() -> None:
    page = render(sample_report())
    ids = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids) == len(set(ids))


def chromium(*args: str, url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    profile = tmp_path / "profile"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args, url]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@needs_chromium
def test_chromium_runs_the_script_and_lays_out_every_chart(convnet_page: Path, tmp_path: Path) -> None:
    url = convnet_page.as_uri() + "#q=layer2&sort=dead&dir=desc"
    dom = chromium("--dump-dom", "--window-size=1280,2000", url=url, tmp_path=tmp_path).stdout
    assert 'data-deadrelu-ready="true"' in dom, "the page script did not run"
    assert re.search(r'<table id="site-table"[^>]*data-ready="true"', dom)
    rendered = re.findall(r'<figure class="chart[^"]*"[^>]*data-rendered="true"', dom)
    assert len(rendered) == 14, "a chart has no layout box or no drawing in the browser"
    body = dom[dom.index("<tbody>"):dom.index("</tbody>")]
    rows = re.findall(r"<tr([^>]*)>.*?<a href=\"#site-\d+\">([^<]+)</a>", body)
    visible = [name for attrs, name in rows if "hidden" not in attrs]
    assert visible == ["layer2.relu_2", "layer2.relu", "layer2.relu_1"]  # filtered, then sorted by dead desc
    assert re.search(r'<th data-key="dead"[^>]*aria-sort="descending"', dom)
    assert "3 of 13 sites" in dom


@needs_chromium
def test_chromium_screenshot_shows_the_charts(convnet_page: Path, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars",
             url=convnet_page.as_uri(), tmp_path=tmp_path)
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2400)
    pixels = np.asarray(image, dtype=np.int16)
    red = int((np.abs(pixels - (0xC6, 0x28, 0x28)) < 12).all(axis=-1).sum())
    blue = int((np.abs(pixels - (0x3B, 0x6E, 0xA8)) < 12).all(axis=-1).sum())
    assert red > 5000, f"no dead-unit bars painted ({red} red pixels)"  # the overview bar chart
    assert blue > 5000, f"no histograms painted ({blue} blue pixels)"
    print(f"screenshot: {shot}")
