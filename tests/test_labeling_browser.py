"""The labelling app in headless Chromium (Debian's chromium + chromedriver; .ci/run installs them).

Each test drives the real pages against a real ``tn-ray label serve`` process and checks what the
server stored; screenshots of every page go to $TN_RAY_SCREENSHOTS (``docs/img`` refreshes the
pictures the README and docs/labeling.md show) or a temporary folder.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from labeling_helpers import PAIR, Annotator, Server, make_comparison, make_manifest

from tn_ray.cli import main
from tn_ray.data.tia2 import load_labels

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# screenshots of every page: to a temporary folder, or to docs/img (the README's and docs/labeling.md's
# pictures) with TN_RAY_SCREENSHOTS=docs/img, so a plain test run leaves the work tree as it was
SHOTS = Path(os.environ.get("TN_RAY_SCREENSHOTS") or tempfile.mkdtemp(prefix="tn_ray_screenshots_"))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    assert not missing, f"{missing} not found: apt-get install -y chromium chromium-driver (as .ci/run does)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1000,940",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(
        service=Service(CHROMEDRIVER), options=opts
    )  # an explicit driver: selenium-manager downloads nothing
    driver.set_page_load_timeout(30)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def wait_ready(driver, pos=None, timeout=15):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        body = d.find_element("tag name", "body")
        return body.get_attribute("data-state") == "ready" and (
            pos is None or body.get_attribute("data-pos") == str(pos)
        )

    WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(ready)


def wait_images(driver):
    """Until every image on the page has loaded (served and decoded)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 15).until(
        lambda d: d.execute_script(
            "return document.images.length > 0 && [...document.images].every(i => i.complete && i.naturalWidth > 0)"
        )
    )


def shot(driver, name):
    """Screenshot once every image on the page has loaded."""
    if driver.find_elements("css selector", "img"):
        wait_images(driver)
    driver.save_screenshot(str(SHOTS / name))


def press(driver, key, next_pos):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()
    wait_ready(driver, next_pos)


def start(driver, server, name):
    """The first page: type a name, press Start; lands on the task page."""
    driver.get(server.url)
    box = driver.find_element("id", "name")
    box.send_keys(name)
    driver.find_element("id", "go").click()
    wait_ready(driver)


def text(driver, id_):
    return driver.find_element("id", id_).text


def test_label_by_keys_reload_relabel_export(browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    manifest = make_manifest(tmp_path, n=5)
    db = tmp_path / "answers.sqlite"
    server = Server("--manifest", str(manifest), "--db", str(db))
    try:
        browser.get(server.url)
        wait_for_text(browser, "info", "5 images")
        shot(browser, "labeling_start.png")
        start(browser, server, "alice")
        assert browser.current_url.endswith("/task?annotator=alice")
        assert text(browser, "progress-text") == "0 / 5 done"
        for pos, key in enumerate("12312"):
            if pos == 2:
                shot(browser, "labeling_label.png")
            press(browser, key, pos + 1)
        assert text(browser, "progress-text") == "5 / 5 done" and "All done" in text(browser, "msg")
        browser.refresh()
        wait_ready(browser, 5)
        assert text(browser, "progress-text") == "5 / 5 done"
        press(browser, Keys.ARROW_LEFT, 4)
        press(browser, Keys.ARROW_LEFT, 3)
        assert browser.find_element("css selector", "button.chosen").get_attribute("data-label") == "good"
        assert text(browser, "prompt") == "4 red cubes on a table"
        press(browser, "3", 4)  # relabel the fourth image: good -> skip, then on to the fifth
        assert browser.find_element("css selector", "button.chosen").get_attribute("data-label") == "bad"
        press(browser, Keys.ARROW_RIGHT, 5)
        shot(browser, "labeling_done.png")
        browser.refresh()
        wait_ready(browser, 5)
        press(browser, Keys.ARROW_LEFT, 4)
        press(browser, Keys.ARROW_LEFT, 3)
        assert browser.find_element("css selector", "button.chosen").get_attribute("data-label") == "skip"
        for name, label in (("bob", "bad"), ("carol", "good")):  # two more annotators make TIA2's three labels
            ann = Annotator(server, name)
            for _ in range(5):
                ann.answer(ann.state()["pos"], label=label)
    finally:
        server.stop()
    out = tmp_path / "tia2" / "human_annotations" / "human_labels_counting.json"
    assert main(["label", "export", "--manifest", str(manifest), "--db", str(db), "--out", str(out)]) == 0
    df = load_labels("counting", tmp_path / "tia2")
    assert list(df["image_id"]) == [f"img/s{i}.png" for i in range(5)]
    assert [x[0] for x in df["labels"]] == [1, 0, -1, -1, 0]  # alice's keys 1 2 3 1 2, the fourth relabelled 3
    assert all(list(x[1:]) == [0, 1] for x in df["labels"])
    with sqlite3.connect(db) as con:
        events = con.execute("SELECT COUNT(*) FROM events WHERE annotator = 'alice'").fetchone()[0]
    assert events == 6  # five labels and one relabel, each written as given


def wait_for_text(driver, id_, part, timeout=15):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: part in d.find_element("id", id_).text)


def test_two_annotators_at_once_never_share_a_pair(browser, tmp_path):
    manifest = make_manifest(tmp_path, n=6)
    db = tmp_path / "answers.sqlite"
    server = Server("--manifest", str(manifest), "--db", str(db), "--per-item", "1")
    try:
        tabs = {}
        for name in ("ann", "ben"):  # two tabs, two annotators, interleaved key presses
            browser.switch_to.new_window("tab")
            start(browser, server, name)
            tabs[name] = browser.current_window_handle
        shown = {"ann": [], "ben": []}
        for i in range(3):
            for name, key in (("ann", "1"), ("ben", "2")):
                browser.switch_to.window(tabs[name])
                shown[name].append(browser.find_element("css selector", "#image img").get_attribute("src"))
                press(browser, key, i + 1)
        for name in tabs:
            browser.switch_to.window(tabs[name])
            assert "All done" in text(browser, "msg")
            browser.close()
        browser.switch_to.window(browser.window_handles[0])
        start(browser, server, "cat")  # a third annotator: every image already has its one annotator
        assert "Nothing is left for you" in text(browser, "msg")
    finally:
        server.stop()
    assert not set(shown["ann"]) & set(shown["ben"]) and len(set(shown["ann"] + shown["ben"])) == 6
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT annotator, value, COUNT(*) FROM answers GROUP BY annotator, value").fetchall()
        items = con.execute("SELECT COUNT(DISTINCT item_id) FROM answers").fetchone()[0]
    assert sorted(rows) == [("ann", "1", 3), ("ben", "0", 3)] and items == 6


def test_comparison_tally_equals_clicks(browser, tmp_path):
    out, key_path = make_comparison(tmp_path, prompts=3)
    key = pd.read_csv(key_path).set_index("question")
    server = Server("--export", str(out), "--per-item", "1")
    clicks = [("set1", "tie"), ("set2", "set2"), ("set1", "set1")]
    expected = {"alignment": {"win": 0, "tie": 0, "lose": 0}, "quality": {"win": 0, "tie": 0, "lose": 0}}
    try:
        start(browser, server, "judge")
        assert not any(r in browser.page_source for r in PAIR)  # nothing on the page names a reward
        for pos, (alignment, quality) in enumerate(clicks):
            wait_ready(browser, pos)
            if pos == 0:
                browser.find_element("css selector", 'input[name="alignment"][value="set1"]').click()
                shot(browser, "labeling_compare.png")
            set1_files = [
                s.get_attribute("src").split("/api/image/")[1]
                for s in browser.find_elements("css selector", "#set1 img")
            ]
            question = key.index[[json.loads(f) == set1_files for f in key["set1_files"]]][0]
            for crit, choice in (("alignment", alignment), ("quality", quality)):
                browser.find_element("css selector", f'input[name="{crit}"][value="{choice}"]').click()
                side = {"set1": key.loc[question, "set1_reward"], "set2": key.loc[question, "set2_reward"]}.get(choice)
                expected[crit]["tie" if side is None else ("win" if side == PAIR[0] else "lose")] += 1
            browser.find_element("id", "submit").click()
        wait_ready(browser, 3)
        assert "All done" in text(browser, "msg")
    finally:
        server.stop()
    report = tmp_path / "tally"
    assert main(["label", "tally", "--export", str(out), "--out", str(report)]) == 0
    table = pd.read_csv(report / "tally.csv").set_index("criterion")
    for crit, counts in expected.items():
        assert {o: int(table.loc[crit, o]) for o in counts} == counts
        assert table.loc[crit, "n"] == 3 and (table.loc[crit, "reward_a"], table.loc[crit, "reward_b"]) == PAIR
    assert "| A " in (report / "tally.md").read_text()
    shutil.copy(report / "tally.png", SHOTS / "labeling_tally.png")


def test_token_link_works_in_the_browser(browser, tmp_path):
    """Off loopback (127.0.0.2): the printed link sets the cookie, then pages, API and images work;
    without it the browser gets 401 only."""
    server = Server(
        "--manifest", str(make_manifest(tmp_path, n=2)), "--host", "127.0.0.2", env={"TN_RAY_LABEL_TOKEN": ""}
    )
    try:
        browser.delete_all_cookies()
        browser.get(server.url + "task?annotator=eve")
        assert "token required" in browser.page_source
        browser.get(server.url + server.query)
        assert browser.current_url == server.url  # the token left the address bar
        start(browser, server, "eve")
        wait_ready(browser, 0)
        wait_images(browser)
        assert text(browser, "progress-text") == "0 / 2 done"
        press(browser, "1", 1)
    finally:
        server.stop()
