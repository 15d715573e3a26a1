"""tag_app.py end to end: served on a free loopback port and driven in headless Chromium.

The browser is Debian's chromium with its chromedriver (`.ci/run` installs both), driven by Selenium
with the driver named explicitly (Selenium Manager offline: nothing is downloaded). Where the
browser or the app's packages are missing the tests skip saying what to install; with CI set they
fail instead. What the page shows is read from its `data-*` attributes and compared with
tag_images.py (run with the options the page prints), validation_loop.py and the dataset's sidecars.
A screenshot of each tab is saved (and copied to $TAG_APP_SCREENSHOT when set: the README's picture).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from broken_corpus import write_text_as_image
from conftest import ROOT, TrainedRun, run_cli
from image_preprocess import load_image
from tag_app_helpers import demo_labels
from tagging import open_model

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _need(what: str) -> None:
    """Skip naming what is missing; under CI (the CI variable set) fail instead: CI never skips the browser test."""
    message = f"the browser test needs {what}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must run this test: .ci/run installs it)")
    pytest.skip(message)


def _selenium() -> Any:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.is_file():
            _need(f"{path} (apt-get install {package})")
    try:
        import gradio  # noqa: F401
        from selenium import webdriver
    except ImportError as exc:
        _need(f"gradio and selenium ({exc}; pip install -r requirements-app.txt)")
    return webdriver


@dataclass
class Served:
    """The running page and what it was started on."""

    url: str
    run: Path
    models: dict[str, Path]  # page name -> checkpoint folder
    images: list[Path]
    base: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def served(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """tag_app.py on two checkpoints of a copy of the trained run (its evaluation is kept in the copy)."""
    _selenium()
    base = tmp_path_factory.mktemp("tag_app")
    run = base / "run"
    shutil.copytree(trained_run.run_dir / "checkpoints", run / "checkpoints")
    best = (run / "checkpoints" / "best").read_text(encoding="utf-8").strip()
    other = next(p.name for p in sorted((run / "checkpoints").glob("step_*")) if p.name != best)
    images = []
    for source in sorted(trained_run.data.rglob("*.png"))[:3]:
        images.append(Path(shutil.copy(source, base / source.name)))
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_TEMP_DIR=str(base / "uploads"))
    # paths relative to the page's working folder, as a user types them (and as the page prints them)
    args = [str(ROOT / "tag_app.py"), "run", f"run/checkpoints/{other}", "--port", str(port), "--num-workers", "0", "--batch-size", "4"]
    proc = subprocess.Popen([sys.executable, *args], cwd=base, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8")
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"tag_app.py exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise AssertionError("tag_app.py did not start listening in 120 s")
            time.sleep(0.3)
        yield Served(
            f"http://127.0.0.1:{port}", run, {f"run/{best}": run / "checkpoints" / best, f"run/{other}": run / "checkpoints" / other}, images, base
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser(served: Served) -> Iterator[Any]:
    """Headless Chromium on the page; Selenium Manager kept offline (the driver is given)."""
    webdriver = _selenium()
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never download a driver or a browser
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400", "--disable-gpu"):
        options.add_argument(arg)
    options.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.get(served.url)
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, condition: Any, timeout: float = 60) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)


def _css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def _upload(driver: Any, paths: list[Path]) -> None:
    """Clear the upload box (when it holds files) and upload these."""
    for button in _css(driver, "#upload button"):
        if (button.get_attribute("aria-label") or "") == "Clear":
            button.click()
            _wait(driver, lambda d: not _css(d, "#results .oo-image"))
            break
    _wait(driver, lambda d: _css(d, "#upload input[type=file]"))[0].send_keys("\n".join(str(p) for p in paths))
    names = [p.name for p in paths]
    _wait(driver, lambda d: [e.get_attribute("data-image") for e in _css(d, "#results .oo-image")] == names)


def _page_models(driver: Any) -> dict[str, dict[str, Any]]:
    """Per image, per model: chosen tags {name: (prob, only, delta)}, the caption and the printed command."""
    shown: dict[str, dict[str, Any]] = {}
    for image in _css(driver, "#results .oo-image"):
        per_model: dict[str, Any] = {}
        for column in image.find_elements("css selector", ".oo-model"):
            model = column.get_attribute("data-model")
            tags = {}
            for line in column.find_elements("css selector", ".oo-tag"):
                if line.get_attribute("data-section") != "rating":
                    delta = line.get_attribute("data-delta")
                    tags[line.get_attribute("data-tag")] = (
                        float(line.get_attribute("data-prob")),
                        line.get_attribute("data-only") == "1",
                        float(delta) if delta else None,
                    )
            caption = column.find_element("css selector", "textarea.oo-caption").get_attribute("value")
            command = column.find_element("css selector", "code.oo-command").text
            per_model[model] = {"tags": tags, "caption": caption, "command": command}
        shown[image.get_attribute("data-image")] = per_model
    return shown


def _screenshot(driver: Any, path: Path) -> None:
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    target = os.environ.get("TAG_APP_SCREENSHOT_DIR")  # the README's picture: the same shot in 256 colours (small)
    if target:
        with Image.open(path) as shot:
            shot.convert("RGB").quantize(256).save(Path(target) / path.name, optimize=True)


def test_tag_tab_matches_tag_images_and_survives_a_broken_file(served: Served, browser: Any) -> None:
    not_a_model = served.base / "holiday_photos"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("no model here", encoding="utf-8")
    _wait(browser, lambda d: _css(d, "#open-path textarea, #open-path input"))[0].send_keys(str(not_a_model))
    _css(browser, "#open-button")[0].click()
    _wait(browser, lambda d: "Could not open" in _css(d, "#message")[0].text)
    assert "is not a model" in _css(browser, "#message")[0].text

    broken = write_text_as_image(served.base / "broken.png")
    _upload(browser, [broken])
    failed = _css(browser, "#results .oo-image")[0]
    assert failed.get_attribute("data-failed") == "1"
    assert "broken.png" in failed.text and "UnidentifiedImageError" in failed.text
    assert "broken.png" in _css(browser, "#message")[0].text

    _upload(browser, served.images)  # the next request works
    shown = _page_models(browser)
    assert set(shown) == {p.name for p in served.images}
    folder = served.base / "to_tag"
    folder.mkdir()
    for path in served.images:
        shutil.copy(path, folder)
    written: dict[str, dict[str, Any]] = {}
    for model in served.models:
        command = shown[served.images[0].name][model]["command"]
        argv = [a if a != "DIR" else str(folder) for a in shlex.split(command)[2:]]
        out = served.base / f"{model.replace('/', '_')}.json"
        proc = run_cli([str(ROOT / "tag_images.py"), *argv, "--overwrite", "--num-workers", "0", "--json", str(out)], cwd=served.base)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        payload = json.loads(out.read_text(encoding="utf-8"))["images"]
        captions = {p.name: (folder / p.name).with_suffix(".txt").read_text(encoding="utf-8") for p in served.images}
        written[model] = {"json": payload, "captions": captions}
    first, second = list(served.models)
    marked = 0
    for name, per_model in shown.items():
        for model, other in ((first, second), (second, first)):
            ours = written[model]["json"][name]
            theirs = written[other]["json"][name]
            assert per_model[model]["caption"] == written[model]["captions"][name]
            expected = {**ours["general"], **ours["character"]}
            assert set(per_model[model]["tags"]) == set(expected)
            their_chosen = {**theirs["general"], **theirs["character"]}
            for tag, (p, only, delta) in per_model[model]["tags"].items():
                assert p == pytest.approx(expected[tag], abs=1e-6)
                assert only == (tag not in their_chosen), (name, model, tag)
                marked += only
                if tag in their_chosen:
                    assert delta == pytest.approx(expected[tag] - their_chosen[tag], abs=2e-6)
    assert marked > 0  # the two checkpoints disagree somewhere, and the page marks it
    _screenshot(browser, served.base / "tag_app.png")


def test_validation_tab_shows_validation_loop_figures_and_real_mistakes(served: Served, browser: Any) -> None:
    from selenium.webdriver.common.keys import Keys

    best = served.models[next(iter(served.models))]
    reference = served.base / "reference"
    proc = run_cli([str(ROOT / "validation_loop.py"), "--checkpoint", str(best), "--out", str(reference), "--num-workers", "0"], cwd=served.base)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    next(t for t in _css(browser, "button[role=tab]") if t.text.strip() == "Validation").click()
    rows = _wait(browser, lambda d: _css(d, "#val-table tr.oo-row"))
    table = {r.get_attribute("data-tag"): r for r in rows}
    with (reference / "per_tag.csv").open(encoding="utf-8") as handle:
        expected = list(csv.DictReader(handle))
    assert set(table) == {r["tag"] for r in expected}
    for ref in expected:
        row = table[ref["tag"]]
        assert row.get_attribute("data-category") == ref["category"]
        assert int(row.get_attribute("data-support")) == int(ref["support"])
        assert int(row.get_attribute("data-train-frequency")) == int(ref["train_frequency"])
        for key in ("ap", "f1", "precision", "recall"):
            a, b = float(ref[key]), float(row.get_attribute(f"data-{key}"))
            assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, abs=1e-9), (ref["tag"], key)
    cut = float(json.loads((reference / "thresholds.json").read_text(encoding="utf-8"))["default_threshold"])
    wrong = [r for r in expected if int(r["support"]) > 0 and 0 < float(r["recall"]) < 1]
    tag = max(wrong or expected, key=lambda r: int(r["support"]))["tag"]
    field = _css(browser, "#val-tag input")[0]
    field.click()
    field.send_keys(tag)
    field.send_keys(Keys.ENTER)
    items = _wait(browser, lambda d: _css(d, f'#val-worst ol[data-tag="{tag}"] li.oo-worst'))
    _wait(browser, lambda d: len(_css(d, "#val-fp img, #val-fn img")) >= 1)

    model = open_model(best)
    column = model.labels.names.index(tag)
    for item in items:
        kind, path, p = item.get_attribute("data-kind"), Path(item.get_attribute("data-path")), float(item.get_attribute("data-prob"))
        labels = demo_labels(path)
        assert (tag in labels) == (kind == "fn"), (path.name, kind)  # a false positive is labelled without the tag
        assert (p >= cut) == (kind == "fp")
        probs = model(load_image(path, model.preprocess)[None])[0]
        assert probs[column] == pytest.approx(p, abs=1e-4)  # the score shown is the model's on that image
        assert (tag in item.get_attribute("data-predicted").split(",")) == (kind == "fp")
    fp = [i for i in items if i.get_attribute("data-kind") == "fp"]
    fn = [i for i in items if i.get_attribute("data-kind") == "fn"]
    assert [float(i.get_attribute("data-prob")) for i in fp] == sorted((float(i.get_attribute("data-prob")) for i in fp), reverse=True)
    assert [float(i.get_attribute("data-prob")) for i in fn] == sorted(float(i.get_attribute("data-prob")) for i in fn)
    assert len(_css(browser, "#val-fp img")) >= min(1, len(fp)) and len(_css(browser, "#val-fn img")) >= min(1, len(fn))
    assert (served.run / "eval" / best.name / "predictions.npz").is_file()  # kept next to the run's reports
    _screenshot(browser, served.base / "tag_app_validation.png")
