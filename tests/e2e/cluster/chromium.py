"""Headless Chromium (Selenium) on the package's Airflow deployment: start it, sign in, wait.

Debian's ``chromium`` and ``chromium-driver`` (``.ci/system-deps``) with explicit paths, so Selenium
Manager never looks for (or downloads) a browser or driver.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from tests.airflow_cluster import AirflowCluster

from . import USERS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromium-driver (apt)")

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    """``probe()`` once it is truthy (WebDriver and HTTP errors count as not yet)."""
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except (WebDriverException, requests.RequestException) as err:
            last = err
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(0.25)


def start_chromium(profile: Path, log: Path, *, width: int = 1440, height: int = 1800) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(arg)
    # No calls to Google's services: this machine's network is closed, and they would fail at start.
    for arg in ("--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER), log_output=str(log)), options=options)


def sign_in(driver: Any, cluster: AirflowCluster, user: str = "admin") -> None:
    """As a user does: Airflow's login page, which stores the JWT it gets in the ``_token`` cookie."""
    from selenium.webdriver.common.by import By

    driver.get(f"{cluster.base_url}/auth/login")
    wait_for("the login form", lambda: driver.find_element(By.NAME, "username")).send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(USERS[user][1])
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for("the redirect after sign-in", lambda: "/auth/login" not in driver.current_url)
    assert wait_for("the _token cookie", lambda: driver.get_cookie("_token"))
