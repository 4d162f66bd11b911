"""Input preparation for the WorldStereo pipelines: sizes, keyframes, cameras, render and references.

Everything here is plain torch/numpy (no diffusers), and matches the reference
implementation's data loaders number for number where they define something
(``pipeline_prep_goldens.json`` in the shared fixtures checks it):

- Generation size: the entry of a size map (``DEFAULT_SCALE_MAP``, height x
  width, all multiples of 16) whose aspect ratio is closest to the input's.
- Keyframes: a trajectory of ``N`` cameras longer than the model's ``F``
  keyframes is sub-sampled at ``np.linspace(0, N - 1, F, dtype=int)``.
- Intrinsics are rescaled per axis from the input size to the generation size
  (row 0 by ``W / w``, row 1 by ``H / h``), so ``fx != fy`` in general.

Conventions in: our protocol's (camera-to-world, OpenCV axes; intrinsics
``(fx, fy, cx, cy)`` in pixels, continuous pixel coordinates; see
``bridge/cameras.py``). Conventions out: the networks' (world-to-camera
OpenCV matrices, 3x3 pixel intrinsics, video tensors ``[B, C, F, H, W]`` in
[-1, 1], ``render_mask`` 1 = hole). The c2w -> w2c conversion is the bridge's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ...bridge.errors import KeyframeWorldsError
from ..models.camera import camera_qt, plucker_embedding
from ..world.cameras import intrinsics_matrices, rescale_intrinsics, w2c_from_c2w_opencv

#: Generation sizes (height, width) of the reference data loaders; the closest aspect ratio wins.
DEFAULT_SCALE_MAP = ((480, 768), (512, 720), (576, 640), (608, 608), (640, 576), (720, 512), (768, 480))
#: Latent frames the released models were trained with (81 video frames, every 4th a keyframe).
DEFAULT_KEYFRAMES = 21
#: Pixels per latent pixel of the Wan VAE, times the transformer's 2x2 patch.
SIZE_MULTIPLE = 16


def assign_generation_size(height: int, width: int, scale_map=None) -> tuple[int, int]:
    """``(H, W)`` of the size-map entry whose ``H / W`` is closest to ``height / width`` (first on ties)."""
    scale_map = DEFAULT_SCALE_MAP if scale_map is None else scale_map
    if not scale_map:
        raise KeyframeWorldsError("the generation size map is empty")
    ratio = height / width
    best = int(np.argmin(np.abs(np.array([h / w for h, w in scale_map]) - ratio)))
    h, w = (int(v) for v in scale_map[best])
    check_generation_size(h, w)
    return h, w


def check_generation_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise KeyframeWorldsError(
            f"generation size {height}x{width} must be positive multiples of {SIZE_MULTIPLE} (VAE 8x, patch 2x)"
        )


def keyframe_indices(count: int, keyframes: int = DEFAULT_KEYFRAMES) -> np.ndarray:
    """Which of ``count`` cameras become the model's keyframes: all of them if ``count <= keyframes``,
    else ``np.linspace(0, count - 1, keyframes, dtype=int)`` (first and last always included)."""
    if count < 1 or keyframes < 1:
        raise KeyframeWorldsError(f"need at least one camera and one keyframe, got {count} and {keyframes}")
    if count <= keyframes:
        return np.arange(count)
    return np.linspace(0, count - 1, keyframes, dtype=int)










def uint8_to_video(frames: torch.Tensor, height: int, width: int, mode: str = "bicubic") -> torch.Tensor:
    """``(F, h, w, 3)`` uint8 -> ``[1, 3, F, H, W]`` float32 in [-1, 1], resized if needed (clipped after)."""
    video = frames.detach().cpu().permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [F, 3, h, w]
    if video.shape[-2:] != (height, width):
        video = F.interpolate(video, size=(height, width), mode=mode, align_corners=False if mode != "nearest" else None)
    return video.clamp(-1, 1).permute(1, 0, 2, 3)[None].contiguous()


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """``[1, 3, F, H, W]`` in [-1, 1] -> ``(F, H, W, 3)`` uint8 (rounded)."""
    frames = ((video[0].float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous()


@dataclass
class SegmentConditions:
    """Everything the networks are conditioned on for one segment of ``F`` keyframes at ``H x W``.

    image: ``[1, 3, H, W]`` in [-1, 1], the first keyframe's image (the I2V condition).
    render_video: ``[1, 3, F, H, W]`` in [-1, 1], the memory rendered along the keyframe cameras;
    frame 0 is ``image`` itself.
    render_mask: ``[1, 1, F, H, W]`` float, 1 = hole (nothing rendered), 0 = covered; frame 0 all 0.
    camera_embedding: ``[1, 6, F, H, W]`` Pluecker map of the keyframe cameras.
    w2c: ``[F, 4, 4]`` world-to-camera (OpenCV); intrinsics: ``[F, 3, 3]`` pixels at ``H x W``.
    Memory variants also: reference_video ``[1, 3, F_ref, H, W]`` in [-1, 1]; ref_index ``[F_ref]``
    (reference k sits next to keyframe ``ref_index[k] + 1``); camera_qt ``[1, F, 7]`` and
    camera_qt_ref ``[1, F_ref, 7]``.
    """

    image: torch.Tensor
    render_video: torch.Tensor
    render_mask: torch.Tensor
    camera_embedding: torch.Tensor
    w2c: torch.Tensor
    intrinsics: torch.Tensor
    reference_video: torch.Tensor | None = None
    ref_index: torch.Tensor | None = None
    camera_qt: torch.Tensor | None = None
    camera_qt_ref: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return self.render_video.shape[2]

    @property
    def height(self) -> int:
        return self.image.shape[-2]

    @property
    def width(self) -> int:
        return self.image.shape[-1]

    @property
    def has_references(self) -> bool:
        return self.reference_video is not None


@dataclass(frozen=True)
class Reference:
    """A retrieved memory frame for the memory variants: ``rgb`` ``(h, w, 3)`` uint8 at any size,
    ``c2w_opencv`` ``(4, 4)``; ``attach_to`` the keyframe (>= 1) it is shown next to."""

    rgb: torch.Tensor
    c2w_opencv: torch.Tensor
    attach_to: int


def attach_references(pairs: torch.Tensor | None, keyframes: np.ndarray) -> list[tuple[int, int]]:
    """``(reference, keyframe)`` attachments from the retrieval's per-frame pairing.

    ``pairs[t]`` is the best reference of segment frame ``t`` (-1: none). As in
    the reference memory bank, each reference is attached once, to the first
    keyframe (from keyframe 1 on; keyframe 0 is the conditioning image) whose
    best reference it is. Returned in keyframe order.
    """
    if pairs is None:
        return []
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for j in range(1, len(keyframes)):
        r = int(pairs[int(keyframes[j])])
        if r >= 0 and r not in seen:
            seen.add(r)
            out.append((r, j))
    return out


def prepare_conditions(
    image: torch.Tensor,
    render_rgb: torch.Tensor,
    render_covered: torch.Tensor,
    c2w_opencv: torch.Tensor,
    intrinsics: torch.Tensor,
    input_wh: tuple[int, int],
    height: int,
    width: int,
    memory: bool,
    references: list[Reference] | None = None,
) -> SegmentConditions:
    """Build :class:`SegmentConditions` for ``F`` keyframes.

    image: ``(h, w, 3)`` uint8, the view of keyframe 0. render_rgb: ``(F, h', w', 3)`` uint8 and
    render_covered: ``(F, h', w')`` bool (True where the memory covers the pixel), any size (resized
    bicubic / nearest to ``H x W`` when they differ). c2w_opencv ``(F, 4, 4)``; intrinsics ``(F, 4)``
    in pixels of ``input_wh``. ``memory``: build the memory variants' inputs; with no references
    the conditioning image itself is the one reference, attached to keyframe 1, with keyframe 0's
    camera (the reference single-view setting).
    """
    check_generation_size(height, width)
    count = render_rgb.shape[0]
    if c2w_opencv.shape != (count, 4, 4) or intrinsics.shape != (count, 4) or render_covered.shape[0] != count:
        raise KeyframeWorldsError(
            f"cameras, intrinsics and render must cover the same {count} keyframes, got c2w {list(c2w_opencv.shape)}, "
            f"intrinsics {list(intrinsics.shape)}, mask {list(render_covered.shape)}"
        )
    if memory and count < 2:
        raise KeyframeWorldsError("the memory variants need at least 2 keyframes (references attach from keyframe 1)")
    cond = uint8_to_video(image[None], height, width)[:, :, 0]  # [1, 3, H, W]
    render_video = uint8_to_video(render_rgb, height, width)
    render_video[:, :, 0] = cond  # keyframe 0 is the conditioning image itself
    hole = (~render_covered.detach().cpu().bool()).float()[:, None]  # [F, 1, h, w]
    if hole.shape[-2:] != (height, width):
        hole = F.interpolate(hole, size=(height, width), mode="nearest")
    render_mask = hole.permute(1, 0, 2, 3)[None].contiguous()
    render_mask[:, :, 0] = 0.0
    w2c = w2c_from_c2w_opencv(c2w_opencv)
    k = rescale_intrinsics(intrinsics_matrices(intrinsics.detach().cpu()), input_wh, (width, height))
    camera_embedding = plucker_embedding(k, w2c, count, height, width, normalize=True, right_multiply=True)
    out = SegmentConditions(cond, render_video, render_mask, camera_embedding, w2c, k)
    if memory:
        if references:
            refs = sorted(references, key=lambda r: r.attach_to)
            for r in refs:
                if not 1 <= r.attach_to < count:
                    raise KeyframeWorldsError(f"a reference must attach to a keyframe in 1..{count - 1}, got {r.attach_to}")
            out.reference_video = torch.cat([uint8_to_video(r.rgb[None], height, width) for r in refs], dim=2)
            out.ref_index = torch.tensor([r.attach_to - 1 for r in refs], dtype=torch.long)
            w2c_ref = w2c_from_c2w_opencv(torch.stack([torch.as_tensor(r.c2w_opencv) for r in refs]))
        else:
            out.reference_video = cond[:, :, None].clone()
            out.ref_index = torch.tensor([0], dtype=torch.long)
            w2c_ref = w2c[0:1]
        out.camera_qt, out.camera_qt_ref = camera_qt(w2c, w2c_ref)
    return out
