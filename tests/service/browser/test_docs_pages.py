"""/docs (Swagger UI) and /redoc in a real headless Chromium that can reach nothing but the server.

Every request to another host is aborted, as on a machine without internet: the pages must
still render the document from the files the server itself serves, and send nothing elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.browser.support import PageProbe, Server, find_chromium, need_playwright, run_server

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory: pytest.TempPathFactory, detector_weights: Path,
                tiny_checkpoint: Path) -> Iterator[Server]:
    """The real service on the tiny checkpoint (the pages need no model), no API key."""
    find_chromium()  # no browser, no point starting the server
    need_playwright()
    with run_server(tmp_path_factory.mktemp("docs"), detector_weights,
                    FER_CLASSIFIER_CHECKPOINT=str(tiny_checkpoint), FER_USE_SHIPPED_EXTRAS="false",
                    FER_WEB_PAGE="false", FER_WARMUP="false") as server:
        yield server


@pytest.mark.parametrize(("path", "rendered"), [
    ("docs", ".swagger-ui .opblock-summary-path[data-path='/predict/batch']"),
    ("redoc", "[data-section-id='tag/faces/operation/predict_batch_predict_batch_post']"),
])
def test_doc_page_renders_with_no_other_host_reachable(browser, docs_server: Server, path: str,
                                                       rendered: str) -> None:
    from playwright.sync_api import expect

    context = browser.new_context(base_url=docs_server.url)
    aborted: list[str] = []

    def offline(route) -> None:
        aborted.append(route.request.url)
        route.abort("internetdisconnected")

    context.route(lambda url: not url.startswith(docs_server.origin), offline)
    page = context.new_page()
    probe = PageProbe(origin=docs_server.origin)
    probe.attach(context, page)
    try:
        page.goto(path)
        expect(page.get_by_text("FER service").first).to_be_visible(timeout=30_000)
        expect(page.locator(rendered).first).to_be_attached(timeout=30_000)
        assert not aborted, f"requests left the browser for other hosts: {aborted}"
        assert not probe.page_errors, probe.page_errors
        # The one thing the page's Content-Security-Policy stops before it leaves the browser:
        # ReDoc's logo on Redocly's CDN (ReDoc then hides it).
        refused = [m for m in probe.console_errors if "violates the following Content Security" in m]
        assert all("cdn.redoc.ly" in m for m in refused), refused
        assert all("cdn.redoc.ly" in url for url in probe.foreign_requests()), probe.foreign_requests()
        assert not set(probe.console_errors) - set(refused), probe.console_errors
    finally:
        context.close()
