"""The learned refiner on top of the warp-only frontaliser, and the warp -> refine pipeline.

:class:`~facemodels.frontalizer.warp.MeshWarp` frontalises with a 3D mean
face; its errors are the mean shape's (a nose too narrow, a jaw too wide) and what it cannot see
(the hidden half, filled from the mirror). :class:`FrontalRefiner` is a small U-Net
(:class:`RefinerNet`, about 0.5 M parameters at the default width) that reads

* the warped face, the mirrored face (the input sampled at each pixel's mirror point), the
  visibility of each output pixel's own point, the face mask and the fitted yaw (as sin yaw),

and predicts

* a **residual flow** of at most ``max_flow`` output pixels (``tanh``-bounded) that displaces the
  warp's sampling grids, so the *input* is re-sampled once with corrected correspondences (no
  second resampling of the warped output);
* a **blend mask** ``m`` in (0, 1) and an **inpainting image** ``I`` for what the warp cannot see.
  ``I`` is predicted as a residual over the re-sampled warp, so the output is
  ``warp + m * (I - warp)``.

The flow and the inpainting residual come from a zero-initialised last convolution, so a fresh
refiner reproduces warp-only exactly (up to float rounding): training starts at the baseline.
:func:`frontalize` is the inference entry (uint8 crops + five landmarks -> uint8 frontal faces;
``refiner=None`` is warp-only). The checkpoint is an ordinary registry model (``frontal_refiner``,
safetensors + card): :func:`load_refiner`. No training code is imported here.

The network with its bounded outputs is :meth:`FrontalRefiner.heads`, the part exported to ONNX
(:func:`facemodels.onnx_export.export_refiner`); :func:`onnx_heads` runs that graph in its place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facemodels.checkpoint import load_checkpoint
from facemodels.frontalizer.warp import DEFAULT_SIZE, MeshWarp, WarpFields, sample_input
from facemodels.models import ModelCfg, register_model

__all__ = [
    "DEFAULT_MAX_FLOW",
    "DEFAULT_WIDTH",
    "IN_CHANNELS",
    "REFINER_ARCH",
    "FrontalRefiner",
    "Heads",
    "Refined",
    "RefinerNet",
    "default_cfg",
    "displace_grid",
    "frontal_refiner",
    "frontalize",
    "load_refiner",
    "onnx_heads",
]

REFINER_ARCH = "frontal_refiner"
#: Net input: warped face, mirrored face, visibility, face mask, sin(yaw).
IN_CHANNELS = 5
#: Net output: flow x, flow y, mask logit, inpainting residual.
OUT_CHANNELS = 4
DEFAULT_WIDTH = 16
#: Flow bound in output pixels (at 64x64, a few percent of the face).
DEFAULT_MAX_FLOW = 3.0
#: The blend mask starts at sigmoid(-2) = 0.12; harmless, as the residual starts at zero.
MASK_BIAS = -2.0

#: What :meth:`FrontalRefiner.heads` computes: net inputs ``(N, 5, S, S)`` -> flow ``(N, S, S, 2)``
#: (output pixels), blend mask ``(N, 1, S, S)`` and inpainting residual ``(N, 1, S, S)`` (0..255
#: scale). PyTorch's own method, or an ONNX Runtime session of its graph (:func:`onnx_heads`).
Heads = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]


def default_cfg(image_size: int = DEFAULT_SIZE) -> ModelCfg:
    """Gray ``image_size`` squares in the FER framing scaled to [-1, 1]; one output: the face."""
    return ModelCfg(image_size=image_size, input_size=image_size, in_chans=1, mean=(0.5,), std=(0.5,),
                    class_names=("frontal",))


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2),
                         nn.Conv2d(cout, cout, 3, 1, 1), nn.LeakyReLU(0.2))


class RefinerNet(nn.Module):
    """U-Net: ``(N, 5, S, S)`` -> ``(N, 4, S, S)`` raw outputs (flow x, flow y, mask logit, residual).

    Four levels (``width`` x 1, 2, 4, 8 channels at S, S/2, S/4, S/8), two 3x3 convs each, skip
    connections, bilinear upsampling; no normalisation layers (a face's output does not depend
    on its batch). The head is zero-initialised except the mask bias (:data:`MASK_BIAS`).
    """

    def __init__(self, *, in_chans: int = IN_CHANNELS, width: int = DEFAULT_WIDTH) -> None:
        super().__init__()
        chans = [width, 2 * width, 4 * width, 8 * width]
        self.down = nn.ModuleList([_block(in_chans, chans[0])] +
                                  [_block(chans[i - 1], chans[i], 2) for i in range(1, len(chans))])
        self.up = nn.ModuleList([_block(chans[i + 1] + chans[i], chans[i]) for i in range(len(chans) - 1)])
        self.head = nn.Conv2d(chans[0], OUT_CHANNELS, 3, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.bias[2] = MASK_BIAS

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for block in reversed(self.up):
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.head(x)


@dataclass(frozen=True)
class Refined:
    """One refinement: every image is ``(N, 1, S, S)`` float in the 0..255 scale (not clamped).

    Attributes:
        faces: the refined faces.
        warped: warp-only (the input re-sampled without the flow).
        mirrored: the mirror samples inside the face mask (background outside).
        flow: ``(N, S, S, 2)`` displacement in output pixels.
        mask: blend mask in (0, 1); residual: ``I - warp`` (0..255 scale).
    """

    faces: Tensor
    warped: Tensor
    mirrored: Tensor
    flow: Tensor
    mask: Tensor
    residual: Tensor


def displace_grid(grid: Tensor, flow: Tensor) -> Tensor:
    """Warp sampling grids ``(N, R*S, S, 2)`` (R stacked ``S x S`` blocks) read at ``p + flow(p)``.

    Bilinear in the grids, so the result stays differentiable in ``flow``; a zero flow returns
    the grids (exactly at ``S`` a power of two, else to float rounding).
    """
    n, s = flow.shape[0], flow.shape[1]
    rows = grid.shape[1] // s
    field = grid.reshape(n, rows, s, s, 2).permute(0, 1, 4, 2, 3).reshape(n, rows * 2, s, s)
    ys, xs = torch.meshgrid(torch.arange(s, dtype=flow.dtype, device=flow.device),
                            torch.arange(s, dtype=flow.dtype, device=flow.device), indexing="ij")
    pos = torch.stack([xs, ys], -1)[None] + flow
    norm = (pos + 0.5) * (2.0 / s) - 1.0
    out = F.grid_sample(field, norm, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(n, rows, 2, s, s).permute(0, 1, 3, 4, 2).reshape(n, rows * s, s, 2)


class FrontalRefiner(nn.Module):
    """The trained part: :class:`RefinerNet` plus how its outputs act on the warp.

    :meth:`refine` takes float sources ``(N, 1, H, W)`` in 0..255 and their
    :class:`~facemodels.frontalizer.warp.WarpFields` from a :class:`MeshWarp` of size
    ``cfg.image_size``; it is differentiable in the network's weights (training uses it as is).
    """

    def __init__(self, cfg: ModelCfg, *, width: int = DEFAULT_WIDTH,
                 max_flow: float = DEFAULT_MAX_FLOW) -> None:
        super().__init__()
        if cfg.in_chans != 1 or cfg.input_size != cfg.image_size:
            raise ValueError("the refiner takes gray uncropped faces (in_chans 1, input_size == image_size)")
        if max_flow <= 0:
            raise ValueError(f"max_flow must be positive, got {max_flow}")
        self.cfg, self.max_flow, self.width = cfg, float(max_flow), width
        self.net = RefinerNet(width=width)

    def net_inputs(self, warped: Tensor, mirrored: Tensor, fields: WarpFields, alpha: Tensor) -> Tensor:
        """The network's 5 channels, each in [-1, 1]."""
        n, _, s, _ = warped.shape
        yaw = torch.as_tensor(fields.pose.yaw, dtype=warped.dtype, device=warped.device)
        yaw = torch.sin(torch.deg2rad(yaw))
        return torch.cat([warped / 127.5 - 1.0, mirrored / 127.5 - 1.0,
                          fields.visibility.to(warped)[:, None] * 2 - 1,
                          alpha.to(warped).expand(n, 1, s, s) * 2 - 1,
                          yaw[:, None, None, None].expand(n, 1, s, s)], 1)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The network and its bounded outputs (see :data:`Heads`): what is exported to ONNX."""
        raw = self.net(x)
        flow = self.max_flow * torch.tanh(raw[:, :2].permute(0, 2, 3, 1))
        return flow, torch.sigmoid(raw[:, 2:3]), 255.0 * torch.tanh(raw[:, 3:4])

    def refine(self, src: Tensor, fields: WarpFields, warp: MeshWarp, *, heads: Heads | None = None,
               ) -> Refined:
        """Warp ``src`` with ``fields``, run the network, re-sample with its flow, blend.

        ``heads`` runs the network in place of :meth:`heads` (an ONNX Runtime session's, say);
        the warp's sampling before and after it stays here, in PyTorch.
        """
        if warp.size != self.cfg.image_size:
            raise ValueError(f"the warp outputs {warp.size}px, the refiner takes {self.cfg.image_size}px")
        s = warp.size
        weight = fields.own_weight.to(src.device)
        alpha = torch.from_numpy(warp.raster.alpha).to(src)[None, None]
        samples = sample_input(src, fields.grid.to(src.device), fields.factor)
        warped = warp.blend(samples, weight)
        mirrored = alpha * samples[:, :, s:2 * s] + (1 - alpha) * samples[:, :, 2 * s:]
        flow, mask, residual = (heads or self.heads)(self.net_inputs(warped, mirrored, fields, alpha))
        resampled = warp.blend(sample_input(src, displace_grid(fields.grid.to(src.device), flow),
                                            fields.factor), weight)
        return Refined(faces=resampled + mask * residual, warped=warped, mirrored=mirrored, flow=flow,
                       mask=mask, residual=residual)

    def forward(self, src: Tensor, fields: WarpFields, warp: MeshWarp) -> Tensor:
        return self.refine(src, fields, warp).faces


@register_model(task="refine")
def frontal_refiner(num_classes: int = 1, cfg: ModelCfg | None = None, *, width: int = DEFAULT_WIDTH,
                    max_flow: float = DEFAULT_MAX_FLOW) -> FrontalRefiner:
    """The warp refiner (see :class:`FrontalRefiner`); ``num_classes`` is 1 (the frontal face)."""
    cfg = cfg or default_cfg()
    if num_classes != 1 or cfg.num_classes != 1:
        raise ValueError(f"the refiner has one output (the frontal face), got num_classes={num_classes}")
    return FrontalRefiner(cfg, width=width, max_flow=max_flow)


def load_refiner(path: str, *, device: str | torch.device = "cpu") -> FrontalRefiner:
    """Load a ``frontal_refiner`` checkpoint (safetensors + card; nothing is unpickled).

    Raises:
        facemodels.checkpoint.CheckpointError: missing or corrupt files.
        ValueError: the checkpoint is another architecture.
    """
    model, card = load_checkpoint(path, device=device)
    if card["arch"] != REFINER_ARCH:
        raise ValueError(f"{path} is a {card['arch']!r} checkpoint, not a {REFINER_ARCH}")
    return model


def onnx_heads(session: Any) -> Heads:
    """:meth:`FrontalRefiner.heads` on an ONNX Runtime session of the refiner's graph (CPU tensors
    in and out), the graph :func:`facemodels.onnx_export.export_refiner` writes."""
    from facemodels.onnx_export import REFINER_INPUT, REFINER_OUTPUTS

    def run(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        flow, mask, residual = session.run(list(REFINER_OUTPUTS),
                                           {REFINER_INPUT: x.detach().cpu().float().contiguous().numpy()})
        return torch.from_numpy(flow), torch.from_numpy(mask), torch.from_numpy(residual)

    return run


def _gray(images: np.ndarray | Tensor) -> Tensor:
    x = torch.as_tensor(images).cpu()
    if x.dtype != torch.uint8 or x.ndim not in (3, 4):
        raise ValueError(f"expected uint8 (N, H, W) or (N, H, W, 3) images, got {x.dtype} {tuple(x.shape)}")
    if x.ndim == 4:  # RGB -> gray as every other crop in the project (OpenCV's weights)
        x = torch.from_numpy(np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY)
                                       for f in x.numpy()])) if len(x) else x[..., 0]
    return x


@torch.inference_mode()
def frontalize(images: np.ndarray | Tensor, landmarks: np.ndarray, refiner: FrontalRefiner | None = None,
               *, warp: MeshWarp | None = None, batch_size: int = 256, heads: Heads | None = None,
               ) -> np.ndarray | Tensor:
    """uint8 faces ``(N, H, W)`` (or RGB) + five landmarks ``(N, 5, 2)`` -> uint8 frontal faces.

    ``refiner=None`` is warp-only (:meth:`MeshWarp.frontalize`, channels kept). With a refiner the
    output is gray ``(N, S, S)`` at the refiner's size, in the FER framing (resize to 48 for the
    expression classifiers). Returns numpy for numpy input, else a CPU tensor. Landmarks must be
    finite (drop faces the detector missed). ``heads`` runs the refiner's network instead of
    PyTorch (:func:`onnx_heads`; see :meth:`FrontalRefiner.refine`).
    """
    if refiner is None:
        return (warp or MeshWarp()).frontalize(images, landmarks)
    size = refiner.cfg.image_size
    warp = warp or MeshWarp(size)
    x = _gray(images)
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (x.shape[0], 5, 2):
        raise ValueError(f"expected ({x.shape[0]}, 5, 2) landmarks, got {lm.shape}")
    device = next(refiner.parameters()).device
    refiner.eval()
    out = [torch.empty(0, size, size, dtype=torch.uint8)]
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        fields = warp.fields(lm[start:start + batch_size])
        faces = refiner.refine(chunk[:, None].float().to(device), fields, warp, heads=heads).faces
        out.append(faces[:, 0].round().clamp(0, 255).to(torch.uint8).cpu())
    result = torch.cat(out)
    return result.numpy() if isinstance(images, np.ndarray) else result
