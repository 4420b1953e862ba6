"""A headless Chromium (selenium + the system's chromium and chromium-driver) and a live HTTP server for the
storefront page's browser tests and the screenshot script. Without a browser the caller fails with the one
install command: never a silent skip."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

INSTALL_HINT = "sudo apt-get install -y chromium chromium-driver  (Debian/Ubuntu; `make test` does it as root)"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


class NoBrowser(RuntimeError):
    """No headless Chromium and driver on this machine."""


def browser_paths() -> tuple[str, str]:
    """(chromium binary, chromedriver): from CHROMIUM_BINARY / CHROMEDRIVER, else the PATH."""
    browser = os.environ.get("CHROMIUM_BINARY") or next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser or not driver:
        missing = " and ".join(name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path)
        raise NoBrowser(f"the browser tests need {missing}: {INSTALL_HINT}")
    return browser, driver


@contextmanager
def headless_chromium(width: int = 1400, height: int = 1000) -> Iterator:
    """A selenium WebDriver on the system Chromium (no driver download: the driver path is given)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        raise NoBrowser("selenium is not installed: install the lock (make install)") from exc
    browser, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(app, port: int | None = None, start_timeout_s: float = 30) -> Iterator[str]:
    """Serve an ASGI app with uvicorn in a thread on 127.0.0.1; yields its base URL."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the storefront service did not start on port {port}")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
