"""An aerial-imagery visual teacher: GeoEmbed V3, a self-supervised ResNet-18 for nadir tiles.

The paper's visual teachers are CN-CLIP image encoders (A.2.1), trained on photos; the default
stand-in here, EfficientNet-Lite0, is an ImageNet classifier. The package ``geoembed==1.1.2`` (MIT)
ships weights learnt without labels on aerial orthophotos (``weights/v3.npz``: a CIFAR-style
ResNet-18 -- 3x3 stride-1 stem, no max-pool -- for 128 px tiles at ~0.15 m, inputs scaled to
[-1, 1]). Its own code runs on an OpenCL runtime (netcl) that these machines lack, so the package
is installed without dependencies and never imported: this module finds the npz through
``importlib`` and loads it into the small torch module below (written here because the layout --
stride-1 stem, ``short.*`` shortcut names -- is not torchvision's).

Which output (measured on the real-imagery probe, docs/EVALUATION.md): the package's 256-d
retrieval head (4x4 pooled map -> linear -> L2 norm) probes weaker than the 512-channel layer-4
map averaged over the image, so ``embed_images`` returns the latter. The network is fully
convolutional and the image is read at its own resolution (no resize: the weights are sensitive to
ground scale); ``patch_features`` averages the same map onto the model's patch grid.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import numpy as np

from refound_core.errors import InputError
from refound_core.teachers.base import ImageTeacher, PatchFeaturizer, file_signature


def weights_path() -> str:
    spec = importlib.util.find_spec("geoembed")  # finds the package without running its netcl imports
    path = os.path.join(spec.submodule_search_locations[0], "weights", "v3.npz") if spec else ""
    if not path or not os.path.isfile(path):
        raise InputError("visual teacher 'geoembed' needs the geoembed package's weights: run `make setup` "
                         "(requirements/teachers-nodeps.txt installs geoembed==1.1.2 without dependencies)")
    return path


def _resnet18_cifar():
    import torch.nn as nn
    import torch.nn.functional as F

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else None)

        def forward(self, x):
            h = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(h + (x if self.short is None else self.short(x)))

    class ResNet18(nn.Module):
        def __init__(self, base=64):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, base, 3, 1, 1, bias=False), nn.BatchNorm2d(base))
            widths = [(base, base, 1), (base, 2 * base, 2), (2 * base, 4 * base, 2), (4 * base, 8 * base, 2)]
            for i, (cin, cout, stride) in enumerate(widths, 1):
                setattr(self, f"layer{i}", nn.Sequential(Block(cin, cout, stride), Block(cout, cout, 1)))

        def forward(self, x):  # [B, 3, H, W] in [-1, 1] -> [B, 512, H/8, W/8]
            h = F.relu(self.stem(x))
            return self.layer4(self.layer3(self.layer2(self.layer1(h))))

    return ResNet18()


class GeoEmbedV3Teacher(ImageTeacher, PatchFeaturizer):
    """GeoEmbed V3 (self-supervised on aerial tiles) as the visual foundation model.

    * ``embed_images``: the 512-channel layer-4 map, averaged over the whole image, 512-d.
    * ``patch_features(images, grid)``: the same map average-pooled to ``grid x grid`` (row-major).
    """

    dim = 512
    feature_dim = 512

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._model = None

    def identity(self) -> str:
        return f"geoembed-v3-aerial-ssl(weights={file_signature(weights_path())},layer4,pool=avg,native-res)"

    def _load(self):
        if self._model is not None:
            return self._model
        import torch

        model = _resnet18_cifar()
        with np.load(weights_path(), allow_pickle=False) as z:
            state = {k[3:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("bb.")}
        model.load_state_dict(state, strict=True)  # every backbone weight, running mean and variance
        self._model = model.to(self.device).eval()
        return self._model

    def _feature_maps(self, images: Sequence[np.ndarray]):
        import torch

        arrays = [np.asarray(img) for img in images]
        for arr in arrays:
            if arr.ndim != 3 or arr.shape[2] < 3:
                raise InputError(f"teacher image of shape {arr.shape} is not [H, W, 3]: images must be RGB uint8")
        if len({a.shape[:2] for a in arrays}) != 1:
            raise InputError("geoembed teacher: the images of one batch must share a size")
        x = torch.from_numpy(np.ascontiguousarray(np.stack([a[..., :3] for a in arrays]))).to(self.device)
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        with torch.inference_mode():
            return self._load()(x)

    def embed_images(self, images):
        return self._feature_maps(images).mean(dim=(2, 3)).float().cpu().numpy()

    def patch_features(self, images, grid):
        return self._to_grid(self._feature_maps(images), grid)

    def embed_and_patch_features(self, images, grid) -> tuple:
        """Both outputs from one forward pass (the teacher cache's DVFM + MGDM targets)."""
        fmap = self._feature_maps(images)
        return fmap.mean(dim=(2, 3)).float().cpu().numpy(), self._to_grid(fmap, grid)

    @staticmethod
    def _to_grid(fmap, grid):
        import torch.nn.functional as F

        return F.adaptive_avg_pool2d(fmap, int(grid)).flatten(2).transpose(1, 2).float().cpu().numpy()
