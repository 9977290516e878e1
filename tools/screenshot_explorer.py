r"""Screenshots the explorer page of a running tools/serve.py with headless Chromium.

  python tools/serve.py --run_dir=demo_run &
  python tools/screenshot_explorer.py --url=http://127.0.0.1:8000 \
      --output=tools/screenshots/explorer.png [--query_position=0] [--ignore=upblack,upwhite] \
      [--require=backpack] [--rank=3] [--size=1500x1100]

Opens the page, picks the query at --query_position of the worst-AP list, applies the steering,
clicks rank --rank (its error composition) and saves a PNG. Needs Debian's chromium and
chromium-driver (apt-get install -y chromium chromium-driver) and selenium; nothing is fetched
from the network.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from absl import app, flags

from reid_jax import cli

_URL = flags.DEFINE_string("url", "http://127.0.0.1:8000", "The explorer's address.")
_OUTPUT = flags.DEFINE_string("output", "tools/screenshots/explorer.png", "PNG to write.")
_QUERY_POSITION = flags.DEFINE_integer("query_position", 0,
                                       "Query to show: its place in the worst-AP list.")
_IGNORE = flags.DEFINE_list("ignore", [], "Attributes to ignore.")
_REQUIRE = flags.DEFINE_list("require", [], "Attributes required present.")
_FORBID = flags.DEFINE_list("forbid", [], "Attributes required absent.")
_RANK = flags.DEFINE_integer("rank", 1, "Rank whose error composition is opened (0: none).")
_SIZE = flags.DEFINE_string("size", "1500x1100", "Window size WIDTHxHEIGHT.")
_TIMEOUT = flags.DEFINE_float("timeout", 60.0, "Seconds to wait for the page.")


def browser(width: int, height: int, profile: str):
    """A headless Chromium driven by selenium (Debian's chromium and chromedriver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    service = Service(executable_path=shutil.which("chromedriver") or "chromedriver")
    return webdriver.Chrome(options=options, service=service)


def idle(driver, timeout: float) -> None:
    """Waits until the page has no request in flight and every image has loaded (the map
    overlays load on their own, after the page's requests: the first computes the maps)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
        "return document.body.dataset.busy === '0' && "
        "Array.from(document.querySelectorAll('img.map')).every(i => i.complete)"))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    width, height = (int(v) for v in _SIZE.value.lower().split("x"))
    profile = tempfile.mkdtemp(prefix="explorer-chromium-")
    driver = browser(width, height, profile)
    try:
        wait = WebDriverWait(driver, _TIMEOUT.value)
        driver.get(_URL.value)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ranking .tile[data-rank]"))
        items = driver.find_elements(By.CSS_SELECTOR, "#query-list li")
        if _QUERY_POSITION.value >= len(items):
            raise app.UsageError(f"--query_position={_QUERY_POSITION.value}: the list shows "
                                 f"{len(items)} queries")
        items[_QUERY_POSITION.value].click()
        idle(driver, _TIMEOUT.value)
        for name in _IGNORE.value:
            driver.find_element(By.CSS_SELECTOR, f'[data-ignore="{name}"]').click()
            idle(driver, _TIMEOUT.value)
        for names, value in ((_REQUIRE.value, "present"), (_FORBID.value, "absent")):
            for name in names:
                Select(driver.find_element(By.CSS_SELECTOR, f'[data-require="{name}"]')
                       ).select_by_value(value)
                idle(driver, _TIMEOUT.value)
        if _RANK.value:
            driver.find_element(By.CSS_SELECTOR,
                                f'#ranking .tile[data-rank="{_RANK.value}"]').click()
        idle(driver, _TIMEOUT.value)
        driver.execute_script("window.scrollTo(0, 0)")
        os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
        driver.save_screenshot(_OUTPUT.value)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"wrote {_OUTPUT.value} ({width}x{height}) from {_URL.value}")


if __name__ == "__main__":
    cli.run(main)
