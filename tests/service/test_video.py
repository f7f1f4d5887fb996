"""POST /predict/video on a real (generated) video, and the tracker and smoother on their own."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from facemodels.face.tracking import EmaSmoother, IouTracker, iou_matrix

cv2 = pytest.importorskip("cv2")

FACE = Path(__file__).resolve().parents[1] / "fixtures" / "astronaut.jpg"
SRC_FPS = 10
SECONDS = 2.0


def _make_video(path: Path, *, seconds: float = SECONDS, fps: int = SRC_FPS) -> bytes:
    """Two copies of the face photo on a grey canvas, moving apart (MJPG in AVI)."""
    tile = cv2.resize(cv2.imread(str(FACE)), (240, 240))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (800, 320))
    assert writer.isOpened()
    n = round(seconds * fps)
    for i in range(n):
        canvas = np.full((320, 800, 3), 90, np.uint8)
        d = int(140 * i / max(n - 1, 1))
        canvas[40:280, 150 - d:390 - d] = tile
        canvas[40:280, 410 + d:650 + d] = tile
        writer.write(canvas)
    writer.release()
    return path.read_bytes()


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return _make_video(tmp_path_factory.mktemp("video") / "two.avi")


@pytest.fixture(scope="module")
def client(make_settings):
    from fastapi.testclient import TestClient

    from service.main import create_app

    settings = make_settings(video_max_seconds=5.0, video_max_bytes=4 * 2**20)
    with TestClient(create_app(settings)) as c:
        yield c


def _post(client, data: bytes, **params):
    return client.post("/predict/video", params=params, content=data,
                       headers={"content-type": "video/x-msvideo"})


def test_two_tracks_with_stable_ids(client, video: bytes) -> None:
    r = _post(client, video, fps=5)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = math.ceil(SECONDS * SRC_FPS * 5 / SRC_FPS)
    assert body["video"]["fps"] == 5
    assert body["video"]["frames"] == expected
    assert body["video"]["source_frames"] == SECONDS * SRC_FPS
    tracks = body["tracks"]
    assert [t["id"] for t in tracks] == [1, 2]
    for t in tracks:
        assert t["frames_seen"] == expected == len(t["timeline"])
        assert [f["frame"] for f in t["timeline"]] == list(range(expected))
        assert [f["t"] for f in t["timeline"]] == pytest.approx([k / 5 for k in range(expected)])
        assert sum(t["summary"]["time_share"].values()) == pytest.approx(1.0, abs=1e-3)
        assert sum(t["summary"]["mean"].values()) == pytest.approx(1.0, abs=1e-3)
        for f in t["timeline"]:
            assert sum(f["smoothed"].values()) == pytest.approx(1.0, abs=1e-3)
    # Each id keeps its face: one moves left, the other right.
    centre = {t["id"]: [(f["box"][0] + f["box"][2]) / 2 for f in t["timeline"]] for t in tracks}
    left, right = sorted(centre, key=lambda k: centre[k][0])
    assert np.all(np.diff(centre[left]) <= 1) and centre[left][-1] < centre[left][0] - 100
    assert np.all(np.diff(centre[right]) >= -1) and centre[right][-1] > centre[right][0] + 100


def test_sampling_rate_and_multipart_and_csv(client, video: bytes) -> None:
    r = client.post("/predict/video", params={"fps": 2, "format": "csv", "smoothing_s": 0},
                    files={"file": ("two.avi", video, "video/x-msvideo")})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/csv")
    lines = r.text.strip().splitlines()
    assert lines[0].startswith("frame,t,track,x1,y1,x2,y2")
    assert len(lines) == 1 + 2 * math.ceil(SECONDS * 2)  # two tracks, 4 sampled frames
    r = _post(client, video, fps=2, smoothing_s=0)
    for t in r.json()["tracks"]:
        for f in t["timeline"]:  # smoothing off: smoothed == raw
            assert f["smoothed"] == f["emotions"]


def test_truncated_video_is_400(client, video: bytes) -> None:
    r = _post(client, video[: len(video) // 2])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "truncated_video"
    r = _post(client, video[:2000])  # the header only
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_video"


def test_non_video_is_415(client) -> None:
    r = _post(client, b"this is not a video at all" * 50)
    assert r.status_code == 415, r.text
    r = client.post("/predict/video", content=FACE.read_bytes(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 415, r.text
    r = _post(client, FACE.read_bytes())  # a JPEG declared as a video (FFmpeg would open it)
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"


def test_over_long_and_over_large_videos_are_413(client, tmp_path: Path) -> None:
    long = _make_video(tmp_path / "long.avi", seconds=8.0, fps=2)  # 8 s > the 5 s limit
    r = _post(client, long)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "video_too_long"
    r = _post(client, b"\0" * (4 * 2**20 + 1))
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


def test_too_many_frames_is_413(make_settings, video: bytes) -> None:
    from fastapi.testclient import TestClient

    from service.main import create_app

    with TestClient(create_app(make_settings(video_max_frames=3, warmup=False))) as c:
        r = _post(c, video, fps=5)  # 10 sampled frames > 3
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "too_many_frames"


# --- the tracker and smoother ---------------------------------------------------------------

def test_iou_matrix() -> None:
    iou = iou_matrix(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]]))
    assert iou[0] == pytest.approx([1.0, 1 / 3, 0.0])


def test_tracker_memory() -> None:
    tr = IouTracker(min_iou=0.3, max_missed=2)
    assert tr.update([[0, 0, 10, 10], [50, 50, 60, 60]]) == [1, 2]
    assert tr.update([[51, 50, 61, 60], [1, 0, 11, 10]]) == [2, 1]  # order of boxes does not matter
    assert tr.update([[52, 50, 62, 60]]) == [2]  # 1 missed once
    assert tr.update([]) == []  # 1 missed twice, 2 once
    assert tr.update([[1, 0, 11, 10]]) == [1]  # 1 comes back within its memory
    assert tr.update([]) == [] and tr.update([]) == [] and tr.update([]) == []
    assert tr.update([[1, 0, 11, 10]]) == [3]  # past the memory: a new id
    assert tr.active == 1


def test_ema_time_constant() -> None:
    sm = EmaSmoother(tau_s=1.0)
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert sm.update(1, 0.0, a) == pytest.approx(a)
    out = sm.update(1, 1.0, b)  # one time constant later: 1 - 1/e of the way
    assert out == pytest.approx([math.exp(-1), 1 - math.exp(-1)])
    assert out.sum() == pytest.approx(1.0)
    assert EmaSmoother(0.0).update(1, 0.0, b) == pytest.approx(b)
