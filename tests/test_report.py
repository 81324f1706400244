"""The HTML report's charts are inline SVG whose labels the browser draws, so Chinese class names are legible
wherever the report is opened, even when the machine that wrote it has no CJK font. Checked in headless
Chromium under a fontconfig that holds no CJK font (and, where one is installed, against one that does)."""
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_jsonl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FIELDS = ["学历要求", "专业要求", "工作年限要求", "编程语言", "加分项"]
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")


def fontconfig(tmp_path: Path, font_dirs: list[str], name: str = "latin") -> dict:
    """An environment whose fontconfig sees only `font_dirs` (a machine state of our choosing)."""
    conf = tmp_path / f"fonts-{name}.conf"
    dirs = "".join(f"<dir>{d}</dir>" for d in font_dirs)
    conf.write_text(f'<?xml version="1.0"?><!DOCTYPE fontconfig SYSTEM "fonts.dtd"><fontconfig>{dirs}'
                    f"<cachedir>{tmp_path / 'fc-cache'}</cachedir></fontconfig>")
    return {**os.environ, "FONTCONFIG_FILE": str(conf)}


def latin_only_fonts(tmp_path: Path) -> list[str]:
    import matplotlib
    folder = tmp_path / "latin-fonts"
    folder.mkdir(parents=True)
    for f in glob.glob(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans*.ttf")):
        shutil.copy(f, folder)
    return [str(folder)]


def chromium(env: dict, tmp_path: Path, *args) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120, env=env)


def test_chart_labels_are_browser_text_without_cjk_fonts(tmp_path):
    env = fontconfig(tmp_path, latin_only_fonts(tmp_path))
    listed = subprocess.run(["fc-list", ":lang=zh"], capture_output=True, text=True, env=env).stdout
    assert listed.strip() == "", listed  # the state under test: no font with Chinese glyphs
    gold = [{"id": f"r{i}", "gold": {f: [f"v{i % 3}"] for f in FIELDS}} for i in range(6)]
    preds = [{"id": g["id"], "prediction": {f: (v if i % 2 else ["x"]) for f, v in g["gold"].items()},
              "status": "ok"} for i, g in enumerate(gold)]
    write_jsonl(tmp_path / "gold.jsonl", gold)
    write_jsonl(tmp_path / "preds.jsonl", preds)
    report = tmp_path / "report"
    made = subprocess.run([sys.executable, "-m", "extractor", "eval", tmp_path / "preds.jsonl", "--gold", tmp_path / "gold.jsonl",
                           "--task", "jd_requirements", "--report", report, "--quiet"],
                          capture_output=True, text=True, env={**env, "MPLCONFIGDIR": str(tmp_path / "mpl")})
    assert made.returncode == 0, made.stderr
    page = (report / "report.html").read_text(encoding="utf-8")
    assert "<img" not in page and "data:image/png" not in page  # no chart is a picture of its labels
    assert (report / "f1_per_class.png").read_bytes()[:4] == b"\x89PNG"  # PNGs still written
    dom = chromium(env, tmp_path, "--dump-dom", f"file://{report / 'report.html'}").stdout
    chart = re.search(r'<svg id="f1-chart".*?</svg>', dom, re.S).group(0)
    labels = set(re.findall(r"<text[^>]*>([^<]+)</text>", chart))
    assert set(FIELDS) <= labels and "micro F1 0.500" in labels  # every label is text the browser draws
    # Where a CJK font is installed (.ci/run installs one), the browser draws the chart with it: the SVG chart
    # renders differently with and without that font, while a chart rasterised here (the PNG) cannot change.
    system = subprocess.run(["fc-list", ":lang=zh", "file"], capture_output=True, text=True).stdout.splitlines()
    cjk_dirs = sorted({str(Path(line.split(":")[0]).parent) for line in system if line.strip()})
    if not cjk_dirs:
        return
    with_cjk = fontconfig(tmp_path, latin_only_fonts(tmp_path / "b") + cjk_dirs, "cjk")
    svg_page, png_page = tmp_path / "svg.html", tmp_path / "png.html"
    svg_page.write_text(f"<!doctype html><meta charset='utf-8'><body style='margin:0'>{chart}", encoding="utf-8")
    png_page.write_text(f"<!doctype html><body style='margin:0'><img src='{report / 'f1_per_class.png'}'>")
    shots = {}
    for name, state in (("latin", env), ("cjk", with_cjk)):
        for page in (svg_page, png_page):
            shot = tmp_path / f"{page.stem}-{name}.png"
            chromium(state, tmp_path, "--window-size=800,400", f"--screenshot={shot}", f"file://{page}")
            shots[page.stem, name] = shot.read_bytes()
    assert shots["svg", "latin"] != shots["svg", "cjk"]
    assert shots["png", "latin"] == shots["png", "cjk"]
