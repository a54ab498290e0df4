#!/usr/bin/env python3
"""Screenshot the playground's compare view mid-animation, for docs/playground.png.

    python tools/playground_screenshot.py [--url http://127.0.0.1:8000] [--out docs/playground.png]

Without --url it starts `vdiff` (the shipped demo model) on free loopback ports and stops it
afterwards. The page runs "one token per step" against "threshold 0.9" on the same prompt and
the picture is taken while the left canvas is still filling, the right one already done. Needs
Debian's chromium and chromedriver (`apt-get install chromium chromium-driver`); the browser
tests (tests/browser/) start their browser with `headless_chromium` from here.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Hello, who are you?"  # the demo model answers with a sentence that fills its canvas


def browser_paths() -> dict[str, str | None]:
    """Debian's chromium and chromedriver, or None for what is not installed."""
    return {"chromium": shutil.which("chromium"), "chromedriver": shutil.which("chromedriver")}


def headless_chromium(width: int = 1280, height: int = 1000) -> WebDriver:
    """Headless chromium that logs its console (goog:loggingPrefs). Both the browser and the
    driver are named by path, so Selenium Manager never runs: it would download them."""
    paths = browser_paths()
    if paths["chromium"] is None or paths["chromedriver"] is None:
        raise RuntimeError("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = paths["chromium"]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 f"--window-size={width},{height}"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=paths["chromedriver"]), options=options)


def open_playground(browser: WebDriver, url: str) -> None:
    """Load /playground and wait for its script to have built the panels."""
    browser.get(f"{url}/playground")
    WebDriverWait(browser, 20).until(lambda b: b.execute_script("return document.body.dataset.ready") == "true")


@contextlib.contextmanager
def demo_server() -> Iterator[str]:
    """`vdiff` with the shipped demo model on free loopback ports; its URL once healthy."""
    from vdiff.serve.launcher import free_loopback_address

    port, triton = free_loopback_address().http_port, free_loopback_address()
    command = [sys.executable, "-m", "vdiff.serve.cli", "--host", "127.0.0.1", "--port", str(port),
               "--triton-http-port", str(triton.http_port), "--triton-grpc-port", str(triton.grpc_port),
               "--triton-metrics-port", str(triton.metrics_port)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("vdiff did not become healthy")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(90)


def mid_animation(browser: WebDriver) -> bool:
    """The left (one token per step) canvas about half decoded, the right one done."""
    state = browser.execute_script(
        """const cells = document.querySelectorAll('#panel-left .cell');
        const masked = document.querySelectorAll('#panel-left .cell.masked').length;
        return [cells.length, masked, document.getElementById('panel-right').dataset.state];"""
    )
    total, masked, right = state
    return bool(total) and 0.4 * total <= masked <= 0.6 * total and right == "done"


def screenshot(url: str, out: Path, key: str = "") -> None:
    browser = headless_chromium(1280, 1080)
    try:
        open_playground(browser, url)
        browser.find_element(By.CSS_SELECTOR, "label[for=view-compare]").click()
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(PROMPT)
        if key:
            browser.find_element(By.ID, "api-key").send_keys(key)
        browser.find_element(By.ID, "run").click()
        WebDriverWait(browser, 60, poll_frequency=0.02).until(mid_animation)
        browser.save_screenshot(str(out))
    finally:
        browser.quit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running vdiff (default: start one with the demo model)")
    parser.add_argument("--api-key", default="", help="the key of that server, if it has one")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "playground.png")
    args = parser.parse_args(argv)
    if args.url:
        screenshot(args.url.rstrip("/"), args.out, args.api_key)
    else:
        with demo_server() as url:
            screenshot(url, args.out)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
