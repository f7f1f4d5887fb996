"""Fixtures for the browser tests: the real server, Debian's Chromium with a fake camera, a page."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.service.browser.support import (
    FETCH_PROBE,
    SOCKET_PROBE,
    PageProbe,
    Server,
    find_chromium,
    need_playwright,
    run_server,
    write_y4m,
)

DESKTOP = {"width": 1280, "height": 900}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, detector_weights: Path) -> Iterator[Server]:
    """The real service with the shipped checkpoints (default and ensemble), no API key and no
    frontaliser (the keyed server of test_web_page.py has one)."""
    find_chromium()  # no browser, no point starting the server
    need_playwright()
    with run_server(tmp_path_factory.mktemp("server"), detector_weights,
                    FER_FRONTALIZER="off") as s:
        yield s


@pytest.fixture(scope="session")
def fake_camera(tmp_path_factory: pytest.TempPathFactory, face_image: np.ndarray) -> Path:
    """A .y4m video of the real face photo, played by Chromium as its camera."""
    return write_y4m(tmp_path_factory.mktemp("camera") / "face.y4m", face_image)


@pytest.fixture(scope="module")
def browser(fake_camera: Path) -> Iterator[object]:
    chromium = find_chromium()
    sync_api = need_playwright()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=chromium, headless=True,
            args=["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                  f"--use-file-for-fake-video-capture={fake_camera}"])
        try:
            yield b
        finally:
            b.close()


class Tab:
    """A fresh browser context and page, with a :class:`PageProbe` attached before anything loads."""

    def __init__(self, browser, server: Server, viewport: dict[str, int]) -> None:
        self.server = server
        self.context = browser.new_context(viewport=viewport, permissions=["camera"],
                                           base_url=server.url)
        self.context.add_init_script(FETCH_PROBE)
        self.context.add_init_script(SOCKET_PROBE)
        self.page = self.context.new_page()
        self.probe = PageProbe(origin=server.origin)
        self.probe.attach(self.context, self.page)

    def open(self) -> object:
        """Load the page and wait until it has talked to the server (models listed)."""
        from playwright.sync_api import expect

        self.page.goto(self.server.url)
        expect(self.page.locator("#server-status")).to_contain_text("Ready", timeout=30_000)
        return self.page

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def make_tab(browser, server: Server):
    """Factory: ``make_tab(server=..., viewport=...)``; every tab is closed after the test."""
    tabs: list[Tab] = []

    def make(*, on: Server | None = None, viewport: dict[str, int] = DESKTOP) -> Tab:
        tab = Tab(browser, on or server, viewport)
        tabs.append(tab)
        return tab

    yield make
    for tab in tabs:
        tab.close()


@pytest.fixture
def tab(make_tab) -> Tab:
    return make_tab()
