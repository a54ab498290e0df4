"""/playground in a real browser: headless Debian chromium driven by Debian's chromedriver
(Selenium, never its Manager), against a real `vdiff` serving the shipped demo model with
--api-key. The page is public; the key it sends is typed into its key field, as a user would.

Skipped, naming what is missing, when chromium or chromedriver is not installed (CI installs
both). Each test saves a screenshot in its tmp_path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from command_harness import served_vdiff
from playground_screenshot import browser_paths, headless_chromium, open_playground

KEY = "playground-test-key"
PROMPT = "What is 2 + 3?"

# Records what the page sends (a wrapper around fetch) and every state its canvas goes through (a
# MutationObserver: one record per drawn step, "_" a masked cell, "#" a decoded one and "r" a masked
# one showing an APD draft that was not accepted).
RECORD = """
window.sent = [];
const fetch0 = window.fetch;
window.fetch = (url, init) => {
  window.sent.push({url: String(url), at: performance.now(), body: init && init.body,
                    auth: init && init.headers && init.headers.Authorization});
  return fetch0(url, init);
};
window.canvasStates = {};
for (const canvas of document.querySelectorAll('.panel .canvas')) {
  const states = window.canvasStates[canvas.closest('.panel').id] = [];
  new MutationObserver(() => states.push([...canvas.querySelectorAll('.cell')]
      .map((cell) => cell.classList.contains('rejected') ? 'r'
        : cell.classList.contains('masked') ? '_' : '#').join('')))
    .observe(canvas, {subtree: true, childList: true, attributes: true, characterData: true});
}
"""


@pytest.fixture(scope="module")
def chromium_installed() -> None:
    missing = [name for name, path in browser_paths().items() if path is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def demo_url(chromium_installed: None) -> Iterator[str]:
    """`vdiff --api-key KEY` with the shipped demo model and its APD verifier (started only when a
    browser is there)."""
    with served_vdiff(None, "--api-key", KEY, "--verifier", "vdiff-demo-ar") as (port, _):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def browser(chromium_installed: None, tmp_path: Path) -> Iterator[WebDriver]:
    driver = headless_chromium(1280, 1000)
    try:
        yield driver
    finally:
        driver.save_screenshot(str(tmp_path / "playground.png"))  # the page as the test left it
        driver.quit()


def start(browser: WebDriver, url: str, key: str = KEY, compare: bool = False, prompt: str = PROMPT) -> None:
    open_playground(browser, url)
    browser.execute_script(RECORD)
    if compare:
        browser.find_element(By.CSS_SELECTOR, "label[for=view-compare]").click()
    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    browser.find_element(By.ID, "api-key").send_keys(key)


def set_box(browser: WebDriver, panel: str, name: str, value: str) -> None:
    box = browser.find_element(By.ID, f"{panel}-{name}")
    if box.tag_name == "select":
        Select(box).select_by_value(value)
    else:
        box.clear()
        box.send_keys(value)


def finish(browser: WebDriver, *panels: str) -> dict[str, str]:
    """Waits for the panels' runs to end; their states (done or error)."""

    def ended(driver: WebDriver) -> bool:
        states = [driver.find_element(By.ID, f"panel-{p}").get_attribute("data-state") for p in panels]
        return all(state in ("done", "error") for state in states)

    WebDriverWait(browser, 60, poll_frequency=0.1).until(ended)
    return {p: browser.find_element(By.ID, f"panel-{p}").get_attribute("data-state") or "" for p in panels}


def text_of(browser: WebDriver, selector: str) -> str:
    return str(browser.find_element(By.CSS_SELECTOR, selector).get_property("textContent"))


def severe_console_entries(browser: WebDriver) -> list[dict[str, Any]]:
    return [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_the_page_loads_with_no_console_errors_and_labels_every_control(browser: WebDriver, demo_url: str) -> None:
    """Served without the key the API needs; no console error (a missing asset, a failed
    request or a script error would be one); every control labelled; live regions in place."""
    open_playground(browser, demo_url)
    assert browser.title == "vdiff playground"
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')]"
        ".filter((el) => el.labels.length === 0).map((el) => el.id || el.outerHTML)"
    )
    assert unlabelled == []
    assert browser.find_element(By.ID, "status").get_attribute("aria-live") == "polite"
    assert browser.find_element(By.CSS_SELECTOR, "#panel-single .counters").get_attribute("aria-live") == "polite"
    assert browser.find_element(By.ID, "api-key").get_attribute("type") == "password"
    assert not browser.find_element(By.ID, "panel-single").find_element(By.XPATH, "..").get_attribute("hidden")
    assert severe_console_entries(browser) == []


def test_a_prompt_animates_and_ends_with_the_api_answer(browser: WebDriver, demo_url: str) -> None:
    """One token per step over 24 positions, started by Ctrl+Enter: the canvas passes through
    several partly masked states, and the text the deltas built equals what the openai client
    gets from the same server for the same settings."""
    start(browser, demo_url)
    set_box(browser, "single", "algorithm", "schedule")
    for name in ("steps", "block_length", "max_tokens"):
        set_box(browser, "single", name, "24")
    browser.find_element(By.ID, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    assert finish(browser, "single") == {"single": "done"}, text_of(browser, "#panel-single .error")

    (sent,) = browser.execute_script("return window.sent")
    assert sent["url"] == "v1/chat/completions" and sent["auth"] == f"Bearer {KEY}"
    # the boxes left empty (cache) and those the algorithm does not use (threshold, ...) are not sent
    assert json.loads(sent["body"]) == {
        "messages": [{"role": "user", "content": PROMPT}], "stream": True, "stream_canvas": True,
        "algorithm": "low_confidence", "steps": 24, "block_length": 24, "temperature": 0, "max_tokens": 24,
    }  # fmt: skip
    recorded = browser.execute_script("return window.canvasStates['panel-single']")
    states = [state for state in dict.fromkeys(recorded) if state]  # "": the canvas cleared at the start
    partly = [state for state in states if "_" in state and "#" in state]
    assert len(states[0]) == 24 and len(partly) >= 2, states
    assert int(text_of(browser, "#panel-single [data-counter=nfe]")) >= 2

    client = openai.OpenAI(base_url=f"{demo_url}/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="vdiff-demo", messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=24,
        extra_body={"algorithm": "low_confidence", "steps": 24, "block_length": 24},
    )  # fmt: skip
    answer = text_of(browser, "#panel-single .answer")
    assert answer and answer == reply.choices[0].message.content
    assert severe_console_entries(browser) == []


def test_compare_shows_fewer_forward_passes_for_threshold_decoding(browser: WebDriver, demo_url: str) -> None:
    """The compare view's own pair, one token per step against threshold 0.9, started together."""
    start(browser, demo_url, compare=True)
    assert browser.find_element(By.ID, "panel-single").find_element(By.XPATH, "..").get_attribute("hidden")
    browser.find_element(By.ID, "run").click()
    assert finish(browser, "left", "right") == {"left": "done", "right": "done"}

    left, right = browser.execute_script("return window.sent")
    assert json.loads(left["body"])["steps"] == 72 and json.loads(right["body"])["threshold"] == 0.9
    assert abs(left["at"] - right["at"]) < 100  # milliseconds: both requests left together
    nfe = {side: int(text_of(browser, f"#panel-{side} [data-counter=nfe]")) for side in ("left", "right")}
    assert nfe["right"] < nfe["left"], nfe
    assert text_of(browser, "#panel-left .answer") and text_of(browser, "#panel-right .answer")


def test_a_wrong_api_key_gets_a_clear_message_and_error_bodies_show(browser: WebDriver, demo_url: str) -> None:
    """The 401 says what to do; with the right key, a 400's message shows as the server wrote it."""
    start(browser, demo_url, key="not-the-key")
    browser.find_element(By.ID, "run").click()
    assert finish(browser, "single") == {"single": "error"}
    message = text_of(browser, "#panel-single .error")
    assert message.startswith("The server refused the API key (401: Unauthorized)"), message
    assert "--api-key" in message and message in text_of(browser, "#status")
    assert text_of(browser, "#panel-single .answer") == ""

    key = browser.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys(KEY)
    set_box(browser, "single", "max_tokens", "100000")
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, 30).until(lambda b: "400" in text_of(b, "#panel-single .error"))
    message = text_of(browser, "#panel-single .error")
    assert message.startswith("The server answered 400: 'max_tokens' or 'max_completion_tokens' is too large: 100000")


def test_an_apd_round_shows_the_drafts_the_verifier_did_not_accept(browser: WebDriver, demo_url: str) -> None:
    """APD on a count across 100: the first round drafts further than the verifier accepts (32
    drafts, 26 accepted, on this model); for that step the rest show on still-masked cells, then
    they clear; the answer is the one the openai client gets for the same settings."""
    count = "Count from 95 to 104"
    start(browser, demo_url, prompt=count)
    set_box(browser, "single", "algorithm", "apd")
    set_box(browser, "single", "apd_mixture_weight", "0.5")
    browser.find_element(By.ID, "run").click()
    assert finish(browser, "single") == {"single": "done"}, text_of(browser, "#panel-single .error")
    states = [s for s in dict.fromkeys(browser.execute_script("return window.canvasStates['panel-single']")) if s]
    assert any("r" in state for state in states), states
    assert "r" not in states[-1]  # shown for their step only
    client = openai.OpenAI(base_url=f"{demo_url}/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="vdiff-demo", messages=[{"role": "user", "content": count}], temperature=0,
        extra_body={"algorithm": "apd", "apd_mixture_weight": 0.5},
    )  # fmt: skip
    assert text_of(browser, "#panel-single .answer") == reply.choices[0].message.content
    assert severe_console_entries(browser) == []
