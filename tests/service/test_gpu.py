"""CUDA paths of the service and trainer; skipped on machines without a GPU (CI has none)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.main import create_app

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_service_runs_on_cuda(make_settings, face_jpeg: bytes) -> None:
    with TestClient(create_app(make_settings(device="cuda"))) as c:
        assert c.get("/readyz").json()["device"].startswith("cuda")
        r = c.post("/predict?tta=true", content=face_jpeg, headers={"content-type": "image/jpeg"})
        assert r.status_code == 200 and len(r.json()["faces"]) == 1
        assert "fer_gpu_memory_bytes" in c.get("/metrics").text


def test_cuda_and_cpu_agree(tiny_checkpoint: Path) -> None:
    from facemodels.checkpoint import load_checkpoint
    from facemodels.predict import predict_probs

    faces = torch.randint(0, 256, (8, 48, 48), dtype=torch.uint8)
    cpu_model, _ = load_checkpoint(tiny_checkpoint, device="cpu")
    gpu_model, _ = load_checkpoint(tiny_checkpoint, device="cuda")
    a = predict_probs(cpu_model, faces, tta=True)
    b = predict_probs(gpu_model, faces.cuda(), tta=True)
    assert torch.allclose(a, b, atol=1e-3)
