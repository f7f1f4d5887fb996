"""Do frontalised faces look frontal, and can they be told from real ones? (Issue #12 bars 7 and 8.)

* :func:`frontal_check`: the serving detector (RetinaFace) on frontalised faces. A 64x64 output
  is too small for it, so each face is upscaled x4 (bicubic) into the middle of a 320-pixel grey
  canvas, exactly as FER2013's 48x48 faces are for their landmarks
  (:func:`training.data.aligned_views.detect_face_landmarks`); the yaw of each found face is
  :func:`facemodels.face.pose.estimate_yaw` of its five landmarks.
* :func:`realism_probe`: a tiny CNN (:class:`ProbeNet`, fixed seed, a few CPU-seconds) trained to
  tell real frontal crops from frontalised ones and tested on other people. The smaller its
  balanced test accuracy, the closer the frontalised faces are to real ones: what an
  adversarial loss should buy over warp-only.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facemodels.face.pose import estimate_yaw
from training.data.aligned_views import CANVAS, UPSCALE, detect_face_landmarks

__all__ = ["FRONTAL_CHECK_HOW", "SERVING_SCORE_THRESHOLD", "ProbeNet", "frontal_check", "realism_probe",
           "realism_probe_seeds"]

log = logging.getLogger(__name__)

#: The service's default ``FER_DETECTION_THRESHOLD``: a face counts as found as the service finds it.
SERVING_SCORE_THRESHOLD = 0.6

FRONTAL_CHECK_HOW = (f"RetinaFace (serving detector, score > {SERVING_SCORE_THRESHOLD}) on each face "
                     f"upscaled x{UPSCALE} (bicubic) in a {CANVAS}px grey canvas; "
                     "yaw = estimate_yaw(5 landmarks)")


def frontal_check(faces: np.ndarray, detector: Any, *, within: float = 15.0) -> dict[str, Any]:
    """Detector on uint8 ``(N, S, S)`` faces: how many are found, and how frontal they read.

    Returns:
        ``n``, ``found``, ``found_fraction``, ``median_abs_yaw`` (degrees, over found faces),
        ``within_15`` (fraction of found faces with ``|yaw| <= within``) and ``within_15_of_all``
        (the same over all faces, a miss counting as not frontal).
    """
    landmarks = (detect_face_landmarks(np.ascontiguousarray(faces), detector,
                                       min_score=SERVING_SCORE_THRESHOLD) if len(faces) else [])
    yaw = np.array([float(estimate_yaw(np.asarray(lm))) for lm in landmarks if lm is not None])
    n, found = len(faces), len(yaw)
    inside = int((np.abs(yaw) <= within).sum())
    return {"n": n, "found": found, "found_fraction": found / n if n else float("nan"),
            "median_abs_yaw": float(np.median(np.abs(yaw))) if found else float("nan"),
            "within_15": inside / found if found else float("nan"),
            "within_15_of_all": inside / n if n else float("nan"), "how": FRONTAL_CHECK_HOW}


class ProbeNet(nn.Module):
    """Four stride-2 3x3 convs (8-16-32-32 channels, ReLU), 4x4 average pool, one logit (fake)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        chans = [1, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(chans):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Linear(chans[-1] * 16, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))[:, 0]


def _scaled(faces: np.ndarray | Tensor) -> Tensor:
    return torch.as_tensor(np.asarray(faces), dtype=torch.float32)[:, None] / 127.5 - 1.0


def _balanced_accuracy(logits: Tensor, fake: Tensor) -> tuple[float, float]:
    pred = logits > 0
    real_ok = float((~pred[~fake]).float().mean()) if (~fake).any() else float("nan")
    fake_ok = float(pred[fake].float().mean()) if fake.any() else float("nan")
    return (real_ok + fake_ok) / 2, float((pred == fake).float().mean())


def _shuffled(n: int, size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Index batches of ``size`` from successive random permutations of ``range(n)``."""
    pool = torch.empty(0, dtype=torch.long)
    while True:
        while len(pool) < size:
            pool = torch.cat([pool, torch.randperm(n, generator=gen)])
        yield pool[:size]
        pool = pool[size:]


def realism_probe(train_real: np.ndarray, train_fake: np.ndarray, test_real: np.ndarray,
                  test_fake: np.ndarray, *, seed: int = 0, steps: int = 400, batch_size: int = 64,
                  lr: float = 2e-3, name: str = "") -> dict[str, Any]:
    """Train :class:`ProbeNet` on real vs frontalised uint8 ``(N, S, S)`` faces; test on others.

    Each of ``steps`` batches holds ``batch_size / 2`` real and as many fake faces, each set
    drawn in reshuffled passes (balanced batches, so CFP's 5:2 frontal:profile ratio does not set
    a floor), with random horizontal flips; Adam, binary cross-entropy. The default, 400 steps, is
    about 7 passes over CFP's 1,800 training profiles. Everything is seeded and runs in a
    forked RNG, so the caller's random state is untouched.

    Returns:
        ``test_accuracy`` (balanced: the mean of the real and the fake recall; chance 0.5),
        ``test_accuracy_plain``, ``train_accuracy`` (balanced), the counts and the recipe.
    """
    if min(len(train_real), len(train_fake), len(test_real), len(test_fake)) == 0:
        raise ValueError("the realism probe needs real and frontalised faces for training and testing")
    started = time.perf_counter()
    xr, xf = _scaled(train_real), _scaled(train_fake)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        net = ProbeNet()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        half = max(1, batch_size // 2)
        real_idx, fake_idx = _shuffled(len(xr), half, gen), _shuffled(len(xf), half, gen)
        net.train()
        for _ in range(steps):
            x = torch.cat([xr[next(real_idx)], xf[next(fake_idx)]])
            y = torch.cat([torch.zeros(half), torch.ones(half)])
            flip = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.binary_cross_entropy_with_logits(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        with torch.inference_mode():
            def scores(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
                x = torch.cat([a, b])
                logits = torch.cat([net(x[s:s + 512]) for s in range(0, len(x), 512)])
                fake = torch.arange(len(x)) >= len(a)
                return logits, fake

            train_bal, _ = _balanced_accuracy(*scores(xr, xf))
            test_bal, test_plain = _balanced_accuracy(*scores(_scaled(test_real), _scaled(test_fake)))
    seconds = time.perf_counter() - started
    log.info("realism probe %s: balanced accuracy train %.3f, test %.3f (%.0f s)", name, train_bal, test_bal,
             seconds)
    return {"test_accuracy": test_bal, "test_accuracy_plain": test_plain, "train_accuracy": train_bal,
            "train_real": len(train_real), "train_fake": len(train_fake), "test_real": len(test_real),
            "test_fake": len(test_fake), "seconds": round(seconds, 1),
            "recipe": f"ProbeNet (4 stride-2 convs, {sum(p.numel() for p in net.parameters())} "
                      f"params), {steps} steps of balanced batches of {batch_size}, Adam lr {lr}, "
                      f"flips, seed {seed}"}


def realism_probe_seeds(train_real: np.ndarray, train_fake: np.ndarray, test_real: np.ndarray,
                        test_fake: np.ndarray, *, seeds: Sequence[int] = (0, 1, 2),
                        **kwargs: Any) -> dict[str, Any]:
    """:func:`realism_probe` once per seed: ``test_accuracy`` is the mean over seeds (one probe's
    balanced accuracy on 500 + 200 faces has a standard error of about 0.02), with the per-seed
    values and their spread beside it; the other fields are the first seed's."""
    runs = [realism_probe(train_real, train_fake, test_real, test_fake, seed=s, **kwargs) for s in seeds]
    accs = [r["test_accuracy"] for r in runs]
    return {**runs[0], "test_accuracy": float(np.mean(accs)), "test_accuracy_per_seed": accs,
            "test_accuracy_spread": float(max(accs) - min(accs)), "seeds": list(seeds),
            "recipe": runs[0]["recipe"].replace(f"seed {seeds[0]}", f"mean over seeds {list(seeds)}")}
