"""Sparse 3D points and where the cameras saw them: a COLMAP model's ``points3D``, free of COLMAP's ids.

Points are in world coordinates (metres, the world of the trajectories they
come with: COLMAP's world as ``formats.py`` reads it, unchanged). A point's
track lists the views that observed it, each with the index of the 2D
feature (keypoint) in that view. A view is a trajectory frame, named by
``(camera name, frame number)``, so tracks survive renumbered images, a
subset of cameras and a round trip through any trajectory format.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import KeyframeWorldsError

ViewKey = tuple[str, int]
"""A trajectory frame: (camera name, scene frame number)."""

UNKNOWN_ERROR = -1.0
"""The ``error`` of a point whose reprojection error is not known (COLMAP's default)."""


@dataclass(frozen=True, eq=False)
class SparsePoints:
    """N points, their colours and reprojection errors, and T track elements in all.

    Attributes:
        xyz: ``(N, 3)`` float64 world coordinates in metres.
        rgb: ``(N, 3)`` uint8 colours (sRGB).
        error: ``(N,)`` float64 mean reprojection error in pixels (``UNKNOWN_ERROR`` when unknown).
        ids: ``(N,)`` int64 point ids (COLMAP's ``POINT3D_ID``), unique and non-negative.
        track_offsets: ``(N + 1,)`` int64; point ``i``'s track is elements ``track_offsets[i]:track_offsets[i + 1]``.
        track_views: ``(T,)`` int64 index into ``views`` of each track element.
        track_keypoints: ``(T,)`` int64 index into that view's ``keypoints`` of each track element.
        views: ``(V,)`` the views that hold keypoints, as ``(camera, frame)``, each once.
        keypoints: ``(V,)`` per view, ``(M, 2)`` float64 2D feature positions in continuous pixels
            (COLMAP's ``POINTS2D``; a keypoint no track names is an unmatched feature).
    """

    xyz: np.ndarray
    rgb: np.ndarray
    error: np.ndarray
    ids: np.ndarray
    track_offsets: np.ndarray
    track_views: np.ndarray
    track_keypoints: np.ndarray
    views: tuple[ViewKey, ...] = ()
    keypoints: tuple[np.ndarray, ...] = ()

    def __post_init__(self) -> None:
        xyz = np.asarray(self.xyz, dtype=np.float64).reshape(-1, 3)
        n = len(xyz)
        rgb = np.asarray(self.rgb)
        if rgb.shape != (n, 3) or (rgb.size and (rgb.min() < 0 or rgb.max() > 255)):
            raise KeyframeWorldsError(f"points: rgb must be {n}x3 values in 0-255, got shape {list(rgb.shape)}")
        arrays = {
            "xyz": xyz,
            "rgb": rgb.astype(np.uint8),
            "error": np.asarray(self.error, dtype=np.float64).reshape(-1),
            "ids": np.asarray(self.ids, dtype=np.int64).reshape(-1),
            "track_offsets": np.asarray(self.track_offsets, dtype=np.int64).reshape(-1),
            "track_views": np.asarray(self.track_views, dtype=np.int64).reshape(-1),
            "track_keypoints": np.asarray(self.track_keypoints, dtype=np.int64).reshape(-1),
        }
        for key, value in arrays.items():
            object.__setattr__(self, key, value)
        views = tuple((str(c), int(f)) for c, f in self.views)
        keypoints = tuple(np.asarray(k, dtype=np.float64).reshape(-1, 2) for k in self.keypoints)
        object.__setattr__(self, "views", views)
        object.__setattr__(self, "keypoints", keypoints)
        self._check()

    def _check(self) -> None:
        n, t = len(self.xyz), len(self.track_views)
        if not np.all(np.isfinite(self.xyz)):
            raise KeyframeWorldsError("points: xyz has non-finite coordinates")
        if len(self.error) != n or len(self.ids) != n:
            raise KeyframeWorldsError(f"points: error and ids need one value per point ({n})")
        if n and (self.ids.min() < 0 or len(np.unique(self.ids)) != n):
            raise KeyframeWorldsError("points: ids must be unique and non-negative")
        off = self.track_offsets
        if len(off) != n + 1 or off[0] != 0 or off[-1] != t or np.any(np.diff(off) < 0) or len(self.track_keypoints) != t:
            raise KeyframeWorldsError(f"points: track_offsets must run from 0 to the {t} track elements, one step per point")
        if len(self.views) != len(self.keypoints) or len(set(self.views)) != len(self.views):
            raise KeyframeWorldsError("points: views must be distinct, with one keypoint array each")
        if t:
            if self.track_views.min() < 0 or self.track_views.max() >= len(self.views):
                raise KeyframeWorldsError(f"points: a track names view {int(self.track_views.max())}, but there are {len(self.views)} views")
            counts = np.array([len(k) for k in self.keypoints], dtype=np.int64)
            if self.track_keypoints.min() < 0 or np.any(self.track_keypoints >= counts[self.track_views]):
                bad = int(np.argmax((self.track_keypoints < 0) | (self.track_keypoints >= counts[self.track_views])))
                view = self.views[self.track_views[bad]]
                raise KeyframeWorldsError(f"points: a track names keypoint {int(self.track_keypoints[bad])} of view {view}, "
                                          f"which has {counts[self.track_views[bad]]} keypoints")
            # A keypoint is the observation of at most one point (as in COLMAP).
            flat = self.track_views * (int(counts.max()) + 1) + self.track_keypoints
            if len(np.unique(flat)) != t:
                raise KeyframeWorldsError("points: a keypoint appears in more than one track element")

    @classmethod
    def from_xyz(cls, xyz: np.ndarray, rgb: np.ndarray | None = None, error: np.ndarray | None = None) -> "SparsePoints":
        """Points without tracks: ids ``1..N``, grey where no colour is given, unknown error where none."""
        xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
        n = len(xyz)
        return cls(
            xyz=xyz,
            rgb=np.full((n, 3), 128, np.uint8) if rgb is None else rgb,
            error=np.full(n, UNKNOWN_ERROR) if error is None else error,
            ids=np.arange(1, n + 1),
            track_offsets=np.zeros(n + 1, np.int64),
            track_views=np.zeros(0, np.int64),
            track_keypoints=np.zeros(0, np.int64),
        )

    def __len__(self) -> int:
        return len(self.xyz)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SparsePoints):
            return NotImplemented
        same = all(np.array_equal(getattr(self, k), getattr(other, k))
                   for k in ("xyz", "rgb", "error", "ids", "track_offsets", "track_views", "track_keypoints"))
        return (same and self.views == other.views and len(self.keypoints) == len(other.keypoints)
                and all(np.array_equal(a, b) for a, b in zip(self.keypoints, other.keypoints)))

    def track(self, i: int) -> list[tuple[ViewKey, int]]:
        """Point ``i``'s observations as ``((camera, frame), keypoint index)``."""
        lo, hi = self.track_offsets[i], self.track_offsets[i + 1]
        return [(self.views[v], int(k)) for v, k in zip(self.track_views[lo:hi], self.track_keypoints[lo:hi])]

    def keypoint_points(self) -> tuple[np.ndarray, ...]:
        """Per view, ``(M,)`` int64: for each keypoint the index of the point whose track holds it, or -1 (one pass over the tracks)."""
        out = tuple(np.full(len(k), -1, np.int64) for k in self.keypoints)
        point_of_element = np.repeat(np.arange(len(self)), np.diff(self.track_offsets))
        order = np.argsort(self.track_views, kind="stable")
        bounds = np.searchsorted(self.track_views[order], np.arange(len(self.views) + 1))
        for v, target in enumerate(out):
            elements = order[bounds[v]:bounds[v + 1]]
            target[self.track_keypoints[elements]] = point_of_element[elements]
        return out

    def select_views(self, keep) -> "SparsePoints":
        """The same points with only the views in ``keep`` (a set of ``(camera, frame)``) and the track elements in them."""
        keep = set(keep)
        kept = [i for i, v in enumerate(self.views) if v in keep]
        new_index = np.full(len(self.views), -1, np.int64)
        new_index[kept] = np.arange(len(kept))
        mask = new_index[self.track_views] >= 0
        point_of_element = np.repeat(np.arange(len(self)), np.diff(self.track_offsets))
        offsets = np.concatenate([[0], np.cumsum(np.bincount(point_of_element[mask], minlength=len(self)))])
        return SparsePoints(self.xyz, self.rgb, self.error, self.ids, offsets, new_index[self.track_views[mask]],
                            self.track_keypoints[mask], tuple(self.views[i] for i in kept), tuple(self.keypoints[i] for i in kept))
