"""The explorer page in a real browser: headless Chromium (Debian's chromium and
chromium-driver) driven by selenium against tools/serve.py started on a free localhost port.

Skipped, saying how to install them, where the browser or selenium is missing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from conftest import REPO, tool_env
from PIL import Image

INSTALL = ("install the browser with: apt-get update && apt-get install -y chromium "
           "chromium-driver (and pip install selenium)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not CHROMIUM or not CHROMEDRIVER:
    pytest.skip(f"headless Chromium not found: {INSTALL}", allow_module_level=True)
selenium = pytest.importorskip("selenium", reason=f"selenium is missing: {INSTALL}")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

MAX_UPLOAD = 300_000
WAIT = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """tools/serve.py on the tiny run, on a free port; stopped after the module."""
    folder = tmp_path_factory.mktemp("serve")
    port = free_port()
    log = open(folder / "serve.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tools" / "serve.py"), f"--checkpoint={tiny_run['checkpoint']}",
         f"--data_root={tiny_run['data']}", f"--cache_dir={folder / 'cache'}", f"--port={port}",
         f"--max_upload_bytes={MAX_UPLOAD}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=tool_env())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"tools/serve.py exited with {proc.returncode}:\n"
                                     f"{(folder / 'serve.log').read_text()[-4000:]}")
            try:
                fetch(f"{url}/api/info")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise AssertionError("tools/serve.py did not answer within 600 s") from None
                time.sleep(1.0)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                 "--window-size=1500,1100"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield browser
    browser.quit()


def idle(driver) -> None:
    """Waits until the page has no request in flight."""
    time.sleep(0.05)  # let a debounced refresh start
    WebDriverWait(driver, WAIT).until(
        lambda d: d.execute_script("return document.body.dataset.busy") == "0")


def shown(driver) -> list[int]:
    return [int(t.get_attribute("data-gallery"))
            for t in driver.find_elements(By.CSS_SELECTOR, "#ranking .tile[data-rank]")]


def score_rows(driver) -> list[str]:
    return [row.get_attribute("data-attribute")
            for row in driver.find_elements(By.CSS_SELECTOR, "#scores tr[data-attribute]")]


def test_the_page_in_a_browser(server, driver, tmp_path):
    info = fetch(f"{server}/api/info")
    k = info["defaults"]["k"]
    driver.get(server)
    WebDriverWait(driver, WAIT).until(lambda d: len(shown(d)) == min(k, info["num_gallery"]))
    idle(driver)

    # Browse: worst AP first; pick the second query.
    listing = fetch(f"{server}/api/queries?order=worst_ap&limit=300")["queries"]
    items = driver.find_elements(By.CSS_SELECTOR, "#query-list li")
    assert [int(li.get_attribute("data-index")) for li in items] == [q["index"] for q in listing]
    items[1].click()
    idle(driver)
    q = listing[1]["index"]
    assert driver.find_element(By.ID, "query-info").text.startswith(listing[1]["file"])
    answer = fetch(f"{server}/api/rank?query={q}")
    assert shown(driver) == answer["indices"]
    frames = [t.get_attribute("data-match")
              for t in driver.find_elements(By.CSS_SELECTOR, "#ranking .tile[data-rank]")]
    assert frames == ["hit" if m else "miss" for m in answer["gallery"]["true_match"]]
    assert score_rows(driver) == [a["attribute"] for a in answer["selected_attributes"]]
    first_row = driver.find_element(By.CSS_SELECTOR, "#scores tr[data-attribute] td:nth-child(3)")
    assert first_row.text == f"{100 * min(max(answer['matching_scores'][0][0], 0), 1):.0f}"

    # The threshold slider: all the way down, then up; the table follows at once.
    slider = driver.find_element(By.ID, "threshold")
    slider.send_keys(Keys.HOME)
    idle(driver)
    assert driver.find_element(By.ID, "threshold-value").text == "0.00"
    low = fetch(f"{server}/api/rank?query={q}&threshold=0")
    assert score_rows(driver) == [a["attribute"] for a in low["selected_attributes"]]
    slider.send_keys(Keys.END)
    idle(driver)
    assert driver.find_element(By.ID, "threshold-value").text == "0.49"
    high = fetch(f"{server}/api/rank?query={q}&threshold=0.49")
    assert score_rows(driver) == [a["attribute"] for a in high["selected_attributes"]]
    assert len(low["selected"]) > len(high["selected"])
    slider.send_keys(Keys.HOME)
    idle(driver)

    # Every mode explain_rankings offers is a button; the complete one draws a full pie.
    labels = driver.find_elements(By.CSS_SELECTOR, "#modes label")
    assert [lb.get_attribute("data-mode") for lb in labels] == [m["name"] for m in info["modes"]]
    driver.find_element(By.CSS_SELECTOR, '#modes label[data-mode="complete"]').click()
    idle(driver)
    driver.find_element(By.CSS_SELECTOR, '#ranking .tile[data-rank="2"]').click()
    detail = driver.find_element(By.ID, "detail")
    assert detail.is_displayed()
    assert driver.find_element(By.ID, "detail-title").text.startswith("rank 2:")
    assert "= d²" in driver.find_element(By.ID, "pie-caption").text
    assert driver.find_elements(By.CSS_SELECTOR, "#pie path, #pie circle")
    # Attribute maps of the opened pair: two overlays, loaded from /api/maps as images.
    overlays = driver.find_elements(By.CSS_SELECTOR, "#maps img.map")
    assert len(overlays) == 2
    WebDriverWait(driver, 120).until(lambda d: all(
        d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
        for img in d.find_elements(By.CSS_SELECTOR, "#maps img.map")))
    # Each attribute's caution (not learned / not measured by the head) shows under the
    # selector with its map, and only then; unlearned attributes are starred in the steering.
    by_status = {a["status"]: a for a in info["attributes"]}
    assert set(by_status) <= {"learned", "not learned", "not measured"} and by_status
    select = Select(driver.find_element(By.CSS_SELECTOR, "#maps select"))
    caution = driver.find_element(By.CSS_SELECTOR, "#maps .caution")
    for status, a in by_status.items():
        select.select_by_value(a["name"])
        assert caution.is_displayed() == (status != "learned")
        if status != "learned":
            assert caution.text == a["caution"]
    starred = [row.get_attribute("data-attribute") for row in driver.find_elements(
        By.CSS_SELECTOR, "#steer-table tbody tr.weak")]
    assert starred == [a["name"] for a in info["attributes"] if a["status"] == "not learned"]
    assert driver.find_element(By.ID, "steer-note").is_displayed() == bool(starred)
    driver.find_element(By.CSS_SELECTOR, '#modes label[data-mode="projection"]').click()
    idle(driver)
    assert "|r|²" in driver.find_element(By.ID, "pie-caption").text
    assert "choose one of those modes" in driver.find_element(By.ID, "maps").text
    driver.find_element(By.CSS_SELECTOR, '#modes label[data-mode="paper"]').click()
    idle(driver)
    assert "positive part" in driver.find_element(By.ID, "pie-caption").text
    assert "negative (pull together)" in driver.find_element(By.ID, "negatives").text

    # Steering: ignore the upper-body colours, require an attribute present.
    driver.find_element(By.ID, "ignore-up").click()
    idle(driver)
    ups = [a["name"] for a in info["attributes"] if a["name"].startswith("up") and
           a["name"] != "up"]
    steered = fetch(f"{server}/api/rank?query={q}&threshold=0&ignore={','.join(ups)}")
    assert shown(driver) == steered["indices"]
    moves = driver.find_elements(By.CSS_SELECTOR, "#ranking .move")
    assert len(moves) == len(steered["indices"])
    for rank, (move, before) in enumerate(zip(moves, steered["previous_ranks"], strict=True),
                                          start=1):
        text = move.text
        assert text == ("=" if before == rank else f"▲{before - rank}" if before > rank
                        else f"▼{rank - before}")
    WebDriverWait(driver, WAIT).until(
        lambda d: "with this steering: mAP" in d.find_element(By.ID, "split-metrics").text)
    name = "backpack"
    Select(driver.find_element(By.CSS_SELECTOR, f'[data-require="{name}"]')
           ).select_by_value("present")
    idle(driver)
    required = fetch(f"{server}/api/rank?query={q}&threshold=0&ignore={','.join(ups)}"
                     f"&require={name}")
    assert shown(driver) == required["indices"]
    a = [x["name"] for x in info["attributes"]].index(name)
    full = fetch(f"{server}/api/rank?query={q}&threshold=0&k={info['max_k']}")
    probability = {g: p for g, p in zip(full["indices"], np.asarray(
        full["gallery_probabilities"])[:, full["selected"].index(a)], strict=True)}
    assert all(probability[g] > 0.5 for g in shown(driver))
    driver.find_element(By.ID, "steer-reset").click()
    idle(driver)
    assert not driver.find_elements(By.CSS_SELECTOR, "#ranking .move")

    # Upload a gallery image: it finds itself at rank 1, with no true/false frames.
    twin = fetch(f"{server}/api/rank?query={q}")["indices"][0]
    path = os.path.join(fetch(f"{server}/api/info")["run"]["data_root"],
                        fetch(f"{server}/api/rank?query={q}")["gallery_paths"][0])
    upload = driver.find_element(By.ID, "upload")
    upload.send_keys(path)
    WebDriverWait(driver, WAIT).until(
        lambda d: "ranked your image" in d.find_element(By.ID, "upload-message").text)
    idle(driver)
    assert shown(driver)[0] == twin
    assert driver.find_element(By.ID, "query-info").text.startswith("your image:")
    assert {t.get_attribute("data-match") for t in
            driver.find_elements(By.CSS_SELECTOR, "#ranking .tile[data-rank]")} == {"unknown"}

    # Bad files get a clear message; the page goes on working.
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not a picture")
    upload.send_keys(str(bad))
    message = driver.find_element(By.ID, "upload-message")
    WebDriverWait(driver, WAIT).until(lambda d: "not an image" in message.text)
    assert "error" in message.get_attribute("class")
    huge = tmp_path / "huge.png"
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), np.uint8)).save(
        out, "PNG")
    huge.write_bytes(out.getvalue())
    assert huge.stat().st_size > MAX_UPLOAD
    upload.send_keys(str(huge))
    WebDriverWait(driver, WAIT).until(lambda d: "server accepts at most" in message.text)
    items = driver.find_elements(By.CSS_SELECTOR, "#query-list li")
    items[0].click()
    idle(driver)
    assert shown(driver) == fetch(f"{server}/api/rank?query={listing[0]['index']}"
                                  f"&threshold=0")["indices"]

    # Search by file name.
    search = driver.find_element(By.ID, "search")
    search.send_keys(listing[2]["file"][:12])
    WebDriverWait(driver, WAIT).until(lambda d: listing[2]["file"] in d.execute_script(
        "return [...document.querySelectorAll('#query-list .name')].map(e => e.textContent)"))
    idle(driver)

    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"
              and "/api/rank" not in e["message"]]  # the refused uploads log their 400 / 413
    assert not errors, errors
    driver.save_screenshot(str(tmp_path / "explorer.png"))
    assert urllib.parse.urlparse(server).hostname == "127.0.0.1"


def test_report_page_shows_the_caution_of_the_chosen_map(driver, tiny_run, tmp_path):
    """The static report's map switch (a click on an attribute row) also switches the caution
    of attributes the head has not learned or that were not measured."""
    from reid_jax.explain import learned
    from reid_jax.explain import run as explain_run

    result = explain_run.run(checkpoint=tiny_run["checkpoint"], data_root=tiny_run["data"],
                             output_dir=tmp_path / "out", queries=1, k=3, threshold=0.0,
                             attribute_maps=True, map_queries=1, progress=False)
    cautions = learned.cautions(result.summary["head_accuracy"])
    driver.get(f"file://{tmp_path / 'out' / 'report' / 'queries.html'}")
    card = driver.find_element(By.CSS_SELECTOR, "section[data-strips]")
    caution = card.find_element(By.CSS_SELECTOR, ".caution")
    rows = card.find_elements(By.CSS_SELECTOR, "tr.pick[data-attr]")
    names = [row.get_attribute("data-attr") for row in rows]
    assert any(n in cautions for n in names), (names, sorted(cautions))
    for row, name in zip(rows, names, strict=True):
        row.find_element(By.CSS_SELECTOR, "th").click()
        assert card.find_element(By.CSS_SELECTOR, ".mapname").text == name
        assert caution.is_displayed() == (name in cautions)
        if name in cautions:
            assert caution.text == cautions[name]
    card.find_element(By.CSS_SELECTOR, 'a[data-attr=""]').click()  # hide the maps
    assert not caution.is_displayed()
