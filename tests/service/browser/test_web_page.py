"""The web page (``GET /``) in a real headless Chromium against the real server.

The server is ``python -m service.cli`` on a loopback port with the shipped checkpoints on the
CPU; Chromium is Debian's, driven by Playwright for Python, with a fake camera that plays a video
made from the real face photo. Every test ends with :meth:`PageProbe.check`: each request the page
made went to the server, and the console shows no error (but the HTTP errors a test provokes).

``WEB_PAGE_SCREENSHOTS=docs`` saves the README's screenshots from these runs.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.service.browser.support import REPO, Server, find_chromium, need_playwright, run_server

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

FACE = REPO / "tests" / "fixtures" / "astronaut.jpg"
API_KEY = "s3cret-key-for-the-page"
PHONE = {"width": 375, "height": 740}

FACES_JS = """(list) => Array.from(document.querySelectorAll(list + ' > li.face')).map((li) => ({
  title: li.querySelector('.face-title').textContent,
  meta: li.querySelector('.face-meta').textContent,
  frontalHidden: li.querySelector('.frontal-figure').hidden,
  frontalSrc: li.querySelector('.frontal-figure img').getAttribute('src') || '',
  frontalWidth: li.querySelector('.frontal-figure img').naturalWidth,
  bars: Array.from(li.querySelectorAll('.bar')).map((b) => ({
    emotion: b.dataset.emotion, prob: Number(b.dataset.prob),
    text: b.querySelector('.bar-value').textContent,
    width: parseFloat(b.querySelector('.bar-fill').style.width),
  })),
}))"""

OVERLAY_PIXELS_JS = """() => {
  const c = document.getElementById('cam-overlay');
  if (!c.width || !c.height) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
  return n;
}"""

#: Text whose contrast with its background is under 4.5:1 (WCAG AA for normal text).
LOW_CONTRAST_JS = """() => {
  const parse = (c) => {
    const m = /rgba?\\(([^)]+)\\)/.exec(c);
    if (!m) return null;
    const p = m[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
    return { r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1 };
  };
  const lum = ({ r, g, b }) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (e) => {
    for (; e; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c && c.a > 0.5) return c;
    }
    return { r: 255, g: 255, b: 255, a: 1 };
  };
  const bad = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const text = n.textContent.trim();
    const e = n.parentElement;
    if (!text || e.closest('[hidden], svg, canvas, [aria-hidden="true"]')) continue;
    const rect = e.getBoundingClientRect();
    if (!rect.width || !rect.height) continue;
    const style = getComputedStyle(e);
    const fg = parse(style.color);
    const [hi, lo] = [lum(fg), lum(background(e))].sort((a, b) => b - a);
    const ratio = (hi + 0.05) / (lo + 0.05);
    const where = `${e.tagName.toLowerCase()}.${e.className} "${text.slice(0, 40)}"`;
    if (ratio < 4.5) bad.push(`${where}: ${ratio.toFixed(2)}`);
  }
  return bad;
}"""


def _expect():
    from playwright.sync_api import expect

    return expect


def _faces(page, list_selector: str) -> list[dict]:
    return page.evaluate(FACES_JS, list_selector)


def _api_predict(server: Server, **params: str) -> dict:
    response = httpx.post(f"{server.origin}/predict", params={"tta": "false", "frontalize": "auto", **params},
                          files={"file": (FACE.name, FACE.read_bytes(), "image/jpeg")}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _assert_cards_match(shown: list[dict], expected: dict) -> None:
    """The page's cards show the API's faces: 7 bars in class order with its numbers, and the yaw."""
    assert len(expected["faces"]) >= 1
    assert len(shown) == len(expected["faces"])
    for card, face in zip(shown, expected["faces"], strict=True):
        assert [b["emotion"] for b in card["bars"]] == list(face["emotions"])
        assert len(card["bars"]) == 7
        for bar in card["bars"]:
            p = face["emotions"][bar["emotion"]]
            assert bar["prob"] == pytest.approx(p, abs=1e-4), bar
            assert float(bar["text"].removesuffix(" %")) == pytest.approx(p * 100, abs=0.051), bar
            assert bar["width"] == pytest.approx(p * 100, abs=0.02), bar
        assert f": {face['dominant']} (" in card["title"]
        yaw = "yaw unknown" if face["yaw"] is None else f"yaw {face['yaw']:.1f}°"
        assert yaw in card["meta"]


def _screenshot(page, name: str, *, full_page: bool = False) -> None:
    folder = os.environ.get("WEB_PAGE_SCREENSHOTS")
    if folder:
        target = Path(folder) if Path(folder).is_absolute() else REPO / folder
        target.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target / name), full_page=full_page)


def _probe(page) -> dict:
    return page.evaluate("() => ({ max: window.__probe.maxInflight, n: window.__probe.predicts, "
                         "starts: window.__probe.starts.slice(), inflight: window.__probe.inflight })")


# --- 1. a photo --------------------------------------------------------------------------------


def test_photo_shows_boxes_landmarks_and_bars_matching_the_api(tab, server: Server) -> None:
    expect = _expect()
    page = tab.open()
    page.set_input_files("#file", str(FACE))
    expect(page.locator("#photo-faces > li.face").first).to_be_visible(timeout=30_000)
    status = re.compile("1 face · model default · 320\u00d7320 px · answered in [0-9]+ ms")
    expect(page.locator("#photo-status")).to_contain_text(status)
    expected = _api_predict(server, model="default")
    _assert_cards_match(_faces(page, "#photo-faces"), expected)

    n = len(expected["faces"])
    assert page.locator("#photo-overlay rect.face-box").count() == n
    assert page.locator("#photo-overlay circle.landmark").count() == 5 * n
    boxes = page.eval_on_selector_all(
        "#photo-overlay rect.face-box",
        "rects => rects.map(r => ['x', 'y', 'width', 'height'].map(k => Number(r.getAttribute(k))))")
    for (x, y, w, h), face in zip(boxes, expected["faces"], strict=True):
        x1, y1, x2, y2 = face["box"]
        assert (x, y, w, h) == pytest.approx((x1, y1, x2 - x1, y2 - y1), abs=0.05)
    tags = page.locator("#photo-overlay text.face-tag").all_text_contents()
    assert tags == [f"{i + 1} {f['dominant']} {round(f['emotions'][f['dominant']] * 100)}%"
                    for i, f in enumerate(expected["faces"])]
    # the overlay lies exactly on the image
    img, overlay = page.locator("#photo-img").bounding_box(), page.locator("#photo-overlay").bounding_box()
    assert overlay == pytest.approx(img, abs=1)

    # no frontaliser on this server: no /frontalize request, every thumbnail hidden
    assert all(card["frontalHidden"] for card in _faces(page, "#photo-faces"))
    assert not [u for u in tab.probe.requests if urlsplit(u).path == "/frontalize"]
    expect(page.locator("#frontalize option[value=on]")).to_be_disabled()
    _screenshot(page, "web_page_photo.png", full_page=True)
    tab.probe.check()


def test_model_and_tta_controls_reach_the_api(tab, server: Server) -> None:
    expect = _expect()
    page = tab.open()
    options = page.locator("#model option").evaluate_all("os => os.map(o => o.value)")
    assert options == ["default", "ensemble"]
    page.set_input_files("#file", str(FACE))
    expect(page.locator("#photo-status")).to_contain_text("model default", timeout=30_000)
    page.get_by_label("Model", exact=True).select_option("ensemble")  # a change analyses again
    page.get_by_label("Test-time augmentation").check()
    expect(page.locator("#photo-status")).to_contain_text("model ensemble with TTA", timeout=30_000)
    _assert_cards_match(_faces(page, "#photo-faces"), _api_predict(server, model="ensemble", tta="true"))
    predicts = [u for u in tab.probe.requests if urlsplit(u).path == "/predict"]
    assert "model=ensemble" in predicts[-1] and "tta=true" in predicts[-1]
    tab.probe.check()


#: Drop a file on the drop zone, or paste it, as the browser would (a DataTransfer with a File).
TRANSFER_JS = """({ b64, name, type, how }) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type }));
  const target = document.getElementById('dropzone');
  if (how === 'drop') {
    for (const kind of ['dragenter', 'dragover', 'drop']) {
      target.dispatchEvent(new DragEvent(kind, { dataTransfer: data, bubbles: true, cancelable: true }));
    }
  } else {
    document.body.dispatchEvent(new ClipboardEvent('paste', { clipboardData: data, bubbles: true,
                                                              cancelable: true }));
  }
}"""


def test_a_dropped_or_pasted_photo_is_analysed(tab) -> None:
    expect = _expect()
    page = tab.open()
    photo = {"b64": base64.b64encode(FACE.read_bytes()).decode(), "name": "dropped.jpg", "type": "image/jpeg"}
    page.evaluate(TRANSFER_JS, {**photo, "how": "drop"})
    expect(page.locator("#photo-status")).to_contain_text("1 face", timeout=30_000)
    assert _probe(page)["n"] == 1
    page.locator("#photo-result").evaluate("e => { e.hidden = true; }")
    page.evaluate(TRANSFER_JS, {**photo, "name": "pasted.jpg", "how": "paste"})
    expect(page.locator("#photo-result")).to_be_visible(timeout=30_000)
    assert _probe(page)["n"] == 2
    assert len(_faces(page, "#photo-faces")[0]["bars"]) == 7
    tab.probe.check()


# --- 2. a file that is not an image ---------------------------------------------------------------


def test_non_images_show_readable_errors_and_the_next_upload_works(tab, tmp_path: Path) -> None:
    expect = _expect()
    page = tab.open()
    error = page.locator("#photo-error")

    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")
    page.set_input_files("#file", str(pdf))
    expect(error).to_be_visible(timeout=30_000)
    expect(error).to_contain_text("This kind of file is not accepted")
    expect(error).to_contain_text("content type 'application/pdf' is not supported")
    expect(error).to_contain_text("(415 unsupported_media_type)")
    expect(page.locator("#photo-result")).to_be_hidden()
    assert error.get_attribute("role") == "alert"

    fake = tmp_path / "holiday.jpg"
    fake.write_bytes(b"this text file pretends to be a JPEG\n" * 20)
    page.set_input_files("#file", str(fake))
    expect(error).to_contain_text("The image could not be read")
    expect(error).to_contain_text("not a recognisable image (400 not_an_image)")

    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\0" * (10 * 2**20 + 1))  # one byte over the default FER_MAX_UPLOAD_BYTES
    page.set_input_files("#file", str(huge))
    expect(error).to_contain_text("Too large for this server")
    expect(error).to_contain_text("(413 payload_too_large)")

    page.set_input_files("#file", str(FACE))
    expect(page.locator("#photo-faces > li.face").first).to_be_visible(timeout=30_000)
    expect(error).to_be_hidden()
    assert len(_faces(page, "#photo-faces")[0]["bars"]) == 7
    tab.probe.check(expected_http_errors=(400, 413, 415))


def test_a_busy_server_is_asked_again_after_retry_after(tab) -> None:
    """A 503 with Retry-After (here made by intercepting the first /predict) is waited out."""
    expect = _expect()
    page = tab.open()
    calls: list[float] = []

    def first_busy(route) -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            route.fulfill(status=503, headers={"Retry-After": "2"}, content_type="application/json",
                          body=json.dumps({"error": {"code": "queue_full",
                                                     "message": "model default has 1024 faces queued"}}))
        else:
            route.continue_()

    page.route(re.compile(r".*/predict\?.*"), first_busy)
    page.set_input_files("#file", str(FACE))
    error = page.locator("#photo-error")
    expect(error).to_contain_text("The server is busy; sending again in 2 s (Retry-After)", timeout=30_000)
    expect(error).to_contain_text("model default has 1024 faces queued (503 queue_full)")
    expect(page.locator("#photo-faces > li.face").first).to_be_visible(timeout=30_000)
    expect(error).to_be_hidden()
    assert len(calls) == 2
    assert calls[1] - calls[0] >= 1.9, "the photo was sent again before Retry-After had passed"
    tab.probe.check(expected_http_errors=(503,))


# --- 3. the webcam ----------------------------------------------------------------------------


def _sockets(page) -> dict:
    return page.evaluate("() => JSON.parse(JSON.stringify(window.__socketProbe))")


def _start_webcam(page, fps: str, *, smoothing: str | None = None) -> None:
    page.get_by_role("tab", name="Webcam").click()
    _expect()(page.locator("#panel-webcam")).to_be_visible()
    page.get_by_label("Frames per second").fill(fps)
    if smoothing is not None:
        page.get_by_label("Smoothing").fill(smoothing)
    page.get_by_role("button", name="Start camera").click()


def _check_stop_stops_the_frames(page, count) -> None:
    page.get_by_role("button", name="Stop camera").click()
    _expect()(page.locator("#cam-status")).to_have_text("Camera off.")
    sent = count()
    time.sleep(1.2)
    assert count() == sent, "frames were sent after the camera was stopped"


def test_webcam_streams_frames_over_the_websocket(tab) -> None:
    """The webcam view sends its frames over WS /stream, one at a time, and shows the answers:
    the faces with the server's track ids and smoothed probabilities. No /predict request."""
    expect = _expect()
    answers_on_the_wire: list[dict] = []  # the server's answers, as the browser's network layer got them
    tab.page.on("websocket", lambda ws: ws.on(
        "framereceived", lambda payload: answers_on_the_wire.append(json.loads(payload))))
    page = tab.open()
    _start_webcam(page, "15", smoothing="1")  # faster than the server: answers set the pace
    status = page.locator("#cam-status")
    expect(status).to_contain_text(re.compile(r"Frame ([6-9]|\d\d+): 1 face .* WebSocket"), timeout=60_000)
    assert status.get_attribute("data-transport") == "websocket"

    sockets = _sockets(page)
    (url,) = sockets["urls"]
    parts = urlsplit(url)
    assert parts.scheme == "ws" and parts.path == "/stream"
    assert "model=default" in parts.query and "smoothing_s=1" in parts.query
    assert sockets["protocols"] == ["fer.stream"]
    answers = sockets["answers"]
    assert len(answers) >= 6
    assert [a["seq"] for a in answers] == list(range(len(answers)))  # every frame answered
    assert all(a["dropped_count"] == 0 for a in answers)
    assert all(len(a["faces"]) == 1 and a["faces"][0]["track"] == 1 for a in answers), answers[-1]
    assert sockets["maxInflight"] == 1, f"{sockets['maxInflight']} frames were unanswered at once"
    wire = [a["seq"] for a in answers_on_the_wire]
    assert len(wire) >= 6 and wire == [a["seq"] for a in answers][:len(wire)]
    assert _probe(page)["n"] == 0, "a webcam frame went to /predict"

    # the overlay shows the face, and the card the server's smoothed probabilities of track 1
    overlay = page.locator("#cam-overlay")
    assert int(overlay.get_attribute("data-faces")) == 1
    assert page.evaluate(OVERLAY_PIXELS_JS) > 500
    assert overlay.bounding_box() == pytest.approx(page.locator("#cam-video").bounding_box(), abs=1)
    page.get_by_label("Frames per second").fill("0.5")  # hold still while the card is compared
    time.sleep(0.5)
    (card,) = _faces(page, "#cam-faces")
    assert card["title"].startswith("Face 1: ")
    shown = {b["emotion"]: b["prob"] for b in card["bars"]}
    assert any(shown == pytest.approx(a["faces"][0]["smoothed"], abs=1e-6)
               for a in _sockets(page)["answers"][-2:]), shown

    # a steady, adjustable rate: at 2 frames/s, frames start about 500 ms apart
    page.get_by_label("Frames per second").fill("2")
    time.sleep(2.2)  # the frame scheduled at the slower rate goes out
    before = len(_sockets(page)["starts"])
    time.sleep(3.2)
    starts = _sockets(page)["starts"][before:]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) >= 3, f"frames stopped flowing: starts {starts}"
    assert min(gaps) >= 400, f"frames were sent faster than 2 per second: gaps {gaps} ms"
    assert max(gaps) <= 2500, f"the frames stalled: gaps {gaps} ms"
    _screenshot(page, "web_page_webcam.png", full_page=True)

    # a changed setting opens a new stream with it
    page.get_by_label("Smoothing").fill("0")
    expect(page.locator("#cam-status")).to_contain_text(re.compile(r"Frame \d+: 1 face"), timeout=30_000)
    sockets = _sockets(page)
    assert len(sockets["urls"]) == 2 and "smoothing_s=0" in sockets["urls"][1]
    assert sockets["closes"][0]["code"] == 1000

    _check_stop_stops_the_frames(page, lambda: _sockets(page)["sends"])
    expect(page.locator("#cam-status")).to_have_text("Camera off.")
    page.wait_for_function("() => window.__socketProbe.closes.length === 2")
    assert _sockets(page)["maxInflight"] == 1
    tab.probe.check()


#: Sends the page's stream to a path with no WebSocket route: the server refuses the handshake
#: (HTTP 403), as a proxy without WebSocket support would, so the socket cannot open.
NO_STREAM_JS = """
(() => {
  const Real = window.WebSocket;
  window.WebSocket = new Proxy(Real, {
    construct(target, [url, protocols]) {
      return new target(String(url).replace("/stream", "/no-stream-here"), protocols);
    },
  });
})();
"""


def test_webcam_falls_back_to_one_request_per_frame_when_the_socket_cannot_open(tab) -> None:
    expect = _expect()
    tab.context.add_init_script(NO_STREAM_JS)
    page = tab.open()
    _start_webcam(page, "15")
    status = page.locator("#cam-status")
    expect(status).to_contain_text(re.compile(r"Frame ([6-9]|\d\d+): 1 face .* HTTP"), timeout=60_000)
    assert status.get_attribute("data-transport") == "http"
    assert _sockets(page)["sends"] == 0 and _sockets(page)["closes"][0]["code"] == 1006
    (card,) = _faces(page, "#cam-faces")
    assert card["title"].startswith("Face 1: ")
    assert sum(b["prob"] for b in card["bars"]) == pytest.approx(1.0, abs=1e-3)  # smoothed: still sums to 1

    # never two frames in flight: counted in the page (fetch) and on the network
    probe = _probe(page)
    assert probe["n"] >= 6
    assert probe["max"] == 1, f"{probe['max']} /predict requests were in flight at once"
    assert tab.probe.max_predicts_in_flight() == 1

    # a 503 pauses the camera's frames for Retry-After seconds
    calls: list[float] = []

    def one_busy(route) -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            route.fulfill(status=503, headers={"Retry-After": "2"}, content_type="application/json",
                          body=json.dumps({"error": {"code": "queue_full", "message": "queue full"}}))
        else:
            route.continue_()

    page.route(re.compile(r".*/predict\?.*"), one_busy)
    expect(page.locator("#cam-error")).to_contain_text("next frame in 2 s (Retry-After)", timeout=10_000)
    expect(page.locator("#cam-error")).to_be_hidden(timeout=10_000)
    assert len(calls) >= 2 and calls[1] - calls[0] >= 1.9, f"a frame was sent within Retry-After: {calls}"
    page.unroute(re.compile(r".*/predict\?.*"))

    _check_stop_stops_the_frames(page, lambda: _probe(page)["n"])
    assert _probe(page)["max"] == 1
    assert tab.probe.max_predicts_in_flight() == 1
    # Chromium logs the refused handshake; nothing else may be logged
    refused = [m for m in tab.probe.console_errors if "WebSocket" in m and "/no-stream-here" in m]
    assert refused, tab.probe.console_errors
    tab.probe.console_errors[:] = [m for m in tab.probe.console_errors if m not in refused]
    tab.probe.check(expected_http_errors=(503,))


# --- 4. nothing leaves the server -------------------------------------------------------------


def test_the_page_loads_only_its_own_files_and_cannot_reach_elsewhere(tab) -> None:
    page = tab.open()
    page.wait_for_load_state("networkidle")
    paths = sorted({urlsplit(u).path for u in tab.probe.requests})
    assert paths == ["/", "/models", "/readyz", "/static/app.css", "/static/app.js", "/static/favicon.svg"]
    # the Content-Security-Policy stops anything the page might try to send elsewhere
    outcome = page.evaluate("() => fetch('http://192.0.2.1/steal').then(() => 'sent', (e) => 'blocked')")
    assert outcome == "blocked"
    assert not tab.probe.foreign_requests()
    refused = [m for m in tab.probe.console_errors if "Content Security Policy" in m]
    assert refused, tab.probe.console_errors
    tab.probe.console_errors[:] = [m for m in tab.probe.console_errors if m not in refused]
    tab.probe.check()


# --- API key and frontalised thumbnails (a second server) -----------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, detector_weights: Path) -> Iterator[Server]:
    """The real service with FER_API_KEY set and a (tiny, untrained) frontaliser loaded."""
    find_chromium()  # no browser, no point starting the server
    need_playwright()
    import torch

    from facemodels.checkpoint import save_checkpoint
    from facemodels.models import create_model

    tmp = tmp_path_factory.mktemp("keyed")
    kwargs = {"width": 8, "feat_dim": 32, "noise_dim": 8, "d_width": 8}
    torch.manual_seed(0)
    frontalizer = save_checkpoint(tmp / "frontalizer", create_model("frontalizer", num_classes=3, **kwargs),
                                  arch="frontalizer", model_kwargs=kwargs,
                                  metrics={"FER2013-PublicTest": {"frontalize_helps": []}})
    with run_server(tmp, detector_weights, FER_API_KEY=API_KEY, FER_USE_SHIPPED_EXTRAS="false",
                    FER_FRONTALIZER_CHECKPOINT=str(frontalizer)) as s:
        yield s


def test_api_key_is_asked_for_and_frontalised_thumbnails_are_shown(make_tab, keyed_server: Server) -> None:
    expect = _expect()
    tab = make_tab(on=keyed_server)
    page = tab.open()
    # GET /models needs the key: the page says so and shows the key field before anything is sent
    expect(page.locator("#server-status")).to_contain_text(
        "This server needs an API key: type it in the API key field")
    expect(page.locator("#api-key-form")).to_be_visible()

    page.set_input_files("#file", str(FACE))  # sent without a key: a 401, and the key is asked for
    error = page.locator("#photo-error")
    expect(error).to_contain_text("This server needs an API key", timeout=30_000)
    key = page.get_by_label("API key")
    expect(key).to_be_visible()
    expect(key).to_be_focused()
    key.fill("not-the-key")
    key.press("Enter")
    expect(error).to_contain_text("missing or wrong X-API-Key header (401 unauthorized)")
    expect(page.locator("#server-status")).to_contain_text("(missing or wrong X-API-Key header)")
    key.fill(API_KEY)
    key.press("Enter")  # the photo is sent again with the key, and the models are listed
    expect(page.locator("#photo-faces > li.face").first).to_be_visible(timeout=30_000)
    expect(error).to_be_hidden()
    expect(page.locator("#server-status")).to_contain_text("frontaliser loaded")
    expect(page.locator("#frontalize option[value=on]")).to_be_enabled()
    thumb = page.locator("#photo-faces .frontal-figure").first
    expect(thumb).to_be_visible(timeout=30_000)
    (card,) = _faces(page, "#photo-faces")
    assert card["frontalSrc"].startswith("data:image/png;base64,")
    assert card["frontalWidth"] == 64
    assert len(card["bars"]) == 7
    assert any(urlsplit(u).path == "/frontalize" for u in tab.probe.requests)
    tab.probe.check(expected_http_errors=(401,))


def test_webcam_asks_for_the_key_and_streams_with_it_as_a_subprotocol(make_tab, keyed_server: Server) -> None:
    expect = _expect()
    tab = make_tab(on=keyed_server)
    page = tab.open()
    _start_webcam(page, "5")
    error = page.locator("#cam-error")
    expect(error).to_contain_text("This server needs an API key", timeout=30_000)
    expect(error).to_contain_text("(close code 1008)")
    expect(page.locator("#cam-status")).to_have_text("Camera paused: an API key is needed.")
    key = page.get_by_label("API key")
    expect(key).to_be_focused()
    key.fill(API_KEY)
    key.press("Enter")  # the camera goes on, its stream carrying the key
    expect(page.locator("#cam-status")).to_contain_text(re.compile(r"Frame \d+: 1 face .* WebSocket"),
                                                        timeout=60_000)
    expect(error).to_be_hidden()
    sockets = _sockets(page)
    assert [c["code"] for c in sockets["closes"]][:1] == [1008]
    assert sockets["protocols"] == ["fer.stream", "fer.stream"]  # the server never echoes the key
    assert all(API_KEY not in u for u in sockets["urls"]), "the key went into a URL"
    assert len(sockets["answers"]) >= 1 and sockets["answers"][-1]["faces"][0]["track"] == 1
    page.get_by_role("button", name="Stop camera").click()
    tab.probe.check(expected_http_errors=(401,))  # GET /models, asked without the key on loading


# --- accessibility ----------------------------------------------------------------------------


def test_keyboard_labels_contrast_and_a_phone_sized_viewport(make_tab) -> None:
    expect = _expect()
    tab = make_tab(viewport=PHONE)
    page = tab.open()
    for label in ("Model", "Frontalise turned faces", "Test-time augmentation"):
        expect(page.get_by_label(label, exact=True)).to_be_visible()

    # the keyboard reaches the photo picker, and Enter opens the file chooser (the chooser is
    # awaited first: Playwright starts intercepting choosers without waiting for the browser)
    with page.expect_file_chooser() as chooser:
        for _ in range(20):
            page.keyboard.press("Tab")
            if page.evaluate("() => document.activeElement.id") == "pick":
                break
        expect(page.get_by_role("button", name="Choose a photo…")).to_be_focused()
        page.keyboard.press("Enter")
    chooser.value.set_files(str(FACE))
    expect(page.locator("#photo-faces > li.face").first).to_be_visible(timeout=30_000)

    # a phone-sized viewport: nothing is wider than the screen
    width = page.evaluate("() => [document.documentElement.scrollWidth, "
                          "document.documentElement.clientWidth]")
    assert width[0] <= width[1] == PHONE["width"], width
    assert page.locator("#photo-img").bounding_box()["width"] <= PHONE["width"]
    assert page.evaluate(LOW_CONTRAST_JS) == []
    _screenshot(page, "web_page_phone.png", full_page=True)

    # tabs follow the arrow keys; the webcam's controls are labelled too
    page.get_by_role("tab", name="Photo").focus()
    page.keyboard.press("ArrowRight")
    expect(page.get_by_role("tab", name="Webcam")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_role("tab", name="Webcam")).to_be_focused()
    expect(page.locator("#panel-webcam")).to_be_visible()
    expect(page.locator("#panel-photo")).to_be_hidden()
    expect(page.get_by_label("Frames per second")).to_be_visible()
    expect(page.get_by_label("Smoothing")).to_be_visible()
    assert page.evaluate(LOW_CONTRAST_JS) == []
    tab.probe.check()
