"""The three packages keep their one-way imports: checked by import-linter and by a real request."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import REPO

# Run in a fresh interpreter: training, tqdm and matplotlib cannot be imported at all there, so
# any import of them on the serving path fails the request (torch.hub's optional tqdm import
# falls back by itself). Then a real /predict goes through the app on the shipped model.
_SERVE_WITHOUT_TRAINING = r"""
import importlib.abc, importlib.machinery, json, sys

BLOCKED = ("training", "tqdm", "matplotlib")

class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"{spec.name} is blocked in this test", name=spec.name)

    def exec_module(self, module):
        raise AssertionError("unreachable")

sys.meta_path.insert(0, Block())
import service.main
from fastapi.testclient import TestClient

with TestClient(service.main.create_app()) as client:
    r = client.post("/predict", content=open(sys.argv[1], "rb").read(),
                    headers={"content-type": "image/jpeg"})
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"status": r.status_code, "faces": len(r.json().get("faces", [])), "loaded": loaded}))
"""


def test_import_contracts_hold() -> None:
    exe = shutil.which("lint-imports")
    assert exe is not None, "import-linter is a dev dependency: pip install -e '.[dev]'"
    out = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_predict_never_loads_training_tqdm_or_matplotlib(detector_weights: Path,
                                                          tmp_path: Path) -> None:
    env = {**os.environ, "FER_DETECTOR_WEIGHTS": str(detector_weights), "FER_DEVICE": "cpu",
           "FER_USE_SHIPPED_EXTRAS": "false", "FER_TORCH_THREADS": "1", "FER_CACHE_DIR": str(tmp_path)}
    photo = REPO / "tests" / "fixtures" / "astronaut.jpg"
    out = subprocess.run([sys.executable, "-c", _SERVE_WITHOUT_TRAINING, str(photo)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"status": 200, "faces": 1, "loaded": []}
