"""Schemathesis over the whole OpenAPI document that the app serves.

Every operation gets generated requests, ones that fit the document and ones that do not, sent
through the real app (in-process ASGI, the tiny checkpoint, FER_API_KEY set). Every answer must
agree with the document: no 5xx; a documented status, content type and headers; a body of the
documented schema; valid data accepted and invalid data refused; and the key enforced where the
document declares it (schemathesis also resends a request without the key and with a wrong one).

Bounded by a fixed number of examples per operation and mode (about a minute on one core, measured
2026-12-02), no shrinking, derandomised so that a run is reproducible.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import negative_data_rejection

from service.main import create_app

KEY = "schemathesis-key"
EXAMPLES = 50  # per operation and generation mode

#: What the checks take as the right answer where the document cannot say it all. A request can
#: fit the document and still be refused for its content: bytes that are no usable image or video
#: (400), or a format found by looking at them that is not served (415, as RFC 9110 allows: a
#: still image sent as a video, a GIF as a JPEG); a schema cannot describe a JPEG. Or for a limit
#: the deployment sets: 413, and 422 for fps above FER_VIDEO_MAX_FPS or a face index past the
#: faces found. 501 (no frontaliser loaded) and 503 (a queue full) are documented answers, not
#: server errors. Everything else keeps schemathesis' defaults: a 404, 405 or 500 still fails.
CONFIG = SchemathesisConfig.from_dict({
    # the key as the document's ApiKey scheme; schemathesis also probes without it and with a wrong one
    "auth": {"openapi": {"ApiKey": {"api_key": KEY}}},
    # the API ignores query parameters it does not know, as HTTP APIs do
    "generation": {"allow-extra-parameters": False},
    "checks": {
        "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "501", "503"]},
        "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "413", "415", "422", "501",
                                                           "503"]},
        "negative_data_rejection": {"expected-statuses": ["400", "401", "413", "415", "422", "501", "503"]},
    },
})


@pytest.fixture(scope="module")
def api_schema(make_settings) -> Iterator[schemathesis.schemas.BaseSchema]:
    """The document as the keyed app serves it; loading it starts the app's lifespan."""
    app = create_app(make_settings(api_key=KEY, warmup=False, max_wait_ms=1.0))
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", app, headers={"X-API-Key": KEY},
                                             config=CONFIG)
    finally:
        shutdown_lifespans()  # stops the app's models and batchers with this module


def _run(operation, mode: GenerationMode) -> None:
    # /predict/batch answers a body of bad images with 200 and an error entry per image (its
    # documented contract), so there "rejected" means: every entry of a 200 is an error.
    per_image = operation.label == "POST /predict/batch" and mode is GenerationMode.NEGATIVE

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        if not per_image:
            case.call_and_validate()
            return
        response = case.call_and_validate(excluded_checks=[negative_data_rejection])
        if response.status_code == 200:
            results = response.json()["results"]
            assert results and all(r["error"] and r["result"] is None for r in results), results

    check()


@pytest.mark.slow
def test_every_operation_conforms_to_the_document(api_schema) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /predict", "POST /predict/batch", "GET /models",
                                               "GET /metrics", "POST /predict/video"}
    failures = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _run(operation, mode)
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE, operation.label  # nothing there to break
            except (AssertionError, BaseExceptionGroup) as e:  # every operation runs; all failures
                # are reported together
                failures.append(f"--- {operation.label} ({mode.value}) ---\n{e}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize(("path", "media_type"), [
    ("/detect", "image/jpeg"), ("/predict", "image/jpeg"), ("/predict", "multipart/form-data"),
    ("/predict/batch", "multipart/form-data"), ("/predict/batch", "application/json"),
    ("/frontalize", "image/jpeg"),
])
def test_answers_with_a_face_conform_to_the_document(api_schema, face_jpeg: bytes, path: str,
                                                     media_type: str) -> None:
    """Generated bytes hold no face: the photo does, so the face items are checked too."""
    body = {"image/jpeg": face_jpeg,
            "multipart/form-data": {"files": [face_jpeg]} if path.endswith("batch") else {"file": face_jpeg},
            "application/json": {"images": [base64.b64encode(face_jpeg).decode()]}}[media_type]
    case = api_schema[path]["POST"].Case(media_type=media_type, body=body, headers={"X-API-Key": KEY})
    response = case.call_and_validate()
    assert response.status_code == 200, response.text
    answer = response.json()
    faces = answer["results"][0]["result"]["faces"] if path.endswith("batch") else answer["faces"]
    assert len(faces) == 1
