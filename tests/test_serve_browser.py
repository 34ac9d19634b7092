"""dinofeat serve in a real browser: Debian's chromium driven by selenium (no browser is
downloaded; these tests skip when /usr/bin/chromium or chromedriver is absent).

Upload a photo and see k results, click one to search with it, attention overlays, the
duplicates view with its slider, keyboard moves in the grid, and an error shown for a bad
upload. Writes a screenshot of the page (``DINOFEAT_SERVE_SCREENSHOT=path.png`` keeps one,
reduced to a 256-colour PNG for the docs)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="dinofeat serve needs the serve extra: "
                                        "pip install 'dinofeat[serve]'")
pytest.importorskip("uvicorn", reason="dinofeat serve needs the serve extra")
pytest.importorskip("selenium", reason="the browser tests need selenium: pip install "
                                       "'dinofeat[serve-test]'")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install "
                "chromium chromium-driver; scripts/test.sh does it as root)",
                allow_module_level=True)

from _serve import Server, build_index  # noqa: E402  (only once the skips above passed)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-browser")
    index, weights, photos = build_index(root, n=16)
    srv = Server(index, "--model", str(weights))
    yield srv, photos, root
    srv.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--window-size=1366,768",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=90):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    # the page replaces the result cards when an answer arrives: elements found just
    # before that go stale, and the condition is simply tried again
    return WebDriverWait(driver, timeout, poll_frequency=0.2,
                         ignored_exceptions=[StaleElementReferenceException]).until(condition)


def _choose_file(driver, path: Path):
    from selenium.webdriver.common.by import By
    field = driver.find_element(By.ID, "file")
    driver.execute_script("arguments[0].hidden = false;", field)  # chromedriver types into
    field.send_keys(str(path))                                       # visible inputs only
    driver.execute_script("arguments[0].hidden = true;", field)


def test_search_click_duplicates_and_errors_in_chromium(site, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    srv, photos, root = site
    d = browser
    d.get(srv.url + "/")
    _wait(d, lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    assert f"{len(photos)} images" in d.find_element(By.ID, "index-info").text

    # upload a photo: k results, itself first with score 1
    k = d.find_element(By.ID, "k")
    k.clear()
    k.send_keys("6")
    _choose_file(d, photos[3])
    cards = lambda d: d.find_elements(By.CSS_SELECTOR, "#results .card")
    first_id = lambda d: d.execute_script(
        "const c = document.querySelector('#results .card'); return c && c.dataset.id")
    _wait(d, lambda d: len(cards(d)) == 6)
    first = cards(d)[0]
    assert photos[3].name in first.find_element(By.CLASS_NAME, "name").text
    assert first.find_element(By.CLASS_NAME, "score").text == "1.000"
    _wait(d, lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && "
        "i.naturalWidth > 0)"))
    assert "6 results" in d.find_element(By.ID, "search-status").text

    # click the third result: a new search with it, which comes back first
    target = cards(d)[2]
    target_id = target.get_attribute("data-id")
    target.find_element(By.TAG_NAME, "button").click()
    _wait(d, lambda d: first_id(d) == target_id)

    # keyboard: arrows move between cards, Enter searches with the focused one
    cards(d)[0].find_element(By.TAG_NAME, "button").send_keys(Keys.ARROW_RIGHT)
    focused = d.switch_to.active_element
    second_id = cards(d)[1].get_attribute("data-id")
    assert focused.find_element(By.XPATH, "..").get_attribute("data-id") == second_id
    focused.send_keys(Keys.ENTER)
    _wait(d, lambda d: first_id(d) == second_id)

    # attention overlays replace the thumbnails
    d.find_element(By.ID, "show-attention").click()
    _choose_file(d, photos[5])
    _wait(d, lambda d: d.execute_script(
        "const imgs = [...document.querySelectorAll('#results img')];"
        "return imgs.length === 6 && imgs.every(i => i.src.startsWith('blob:') && i.complete"
        " && i.naturalWidth > 0) && document.querySelector('#query-img').src"
        ".startsWith('blob:')"))
    shot = tmp_path / "search.png"
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("DINOFEAT_SERVE_SCREENSHOT")
    if keep:
        from PIL import Image
        Image.open(shot).convert("RGB").quantize(256).save(keep, optimize=True)

    # a bad upload shows the server's error
    bad = root / "notes.jpg"
    bad.write_text("not a photo")
    _choose_file(d, bad)
    err = d.find_element(By.ID, "error")
    _wait(d, lambda d: err.is_displayed())
    assert "notes.jpg" in err.text and "not an image" in err.text

    # duplicates: the re-saved copy is grouped with its original; the slider regroups
    d.find_element(By.ID, "tab-dups").click()
    groups = lambda d: d.find_elements(By.CSS_SELECTOR, "#groups > li")
    _wait(d, lambda d: "groups" in d.find_element(By.ID, "dup-status").text)
    _wait(d, lambda d: any("copy_of_first.jpg" in g.text for g in groups(d)))
    assert d.execute_script(
        "const c = document.querySelector('#histogram');"
        "const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "return px.some((v, i) => i % 4 === 3 && v > 0)")  # something drawn
    slider = d.find_element(By.ID, "threshold")
    before = d.find_element(By.ID, "dup-status").text
    for _ in range(15):
        slider.send_keys(Keys.ARROW_LEFT)
    _wait(d, lambda d: d.find_element(By.ID, "threshold-value").text == "0.75")
    _wait(d, lambda d: "≥ 0.75" in d.find_element(By.ID, "dup-status").text)
    assert d.find_element(By.ID, "dup-status").text != before
    d.save_screenshot(str(tmp_path / "duplicates.png"))
    assert not err.is_displayed()
