"""Learned depth aligned to what the point memory knows, then fused with the memory's own depth.

Per frame, in four steps (:class:`AlignedLearnedDepth` runs them all):

1. **Support.** Pixels where the memory's render is visible and trusted:
   ``mask & depth > 0 & finite``, and, when the memory's per-point
   confidences are given, the visible point's confidence at least
   ``confidence_threshold`` (so the runner's far backdrop, confidence 0.05,
   never anchors a fit).
2. **Fit** (:func:`robust_line_fit`), in the space where the prediction is
   affine:

   - ``relative-disparity``: ``1 / z_memory = scale * x + shift`` (1/m).
     Disparity, not depth, because that is where these networks are affine
     invariant (their training loss is scale-and-shift invariant in inverse
     depth).
   - ``relative-depth``: ``z_memory = scale * x + shift`` (m).
   - ``metric-depth``: ``z_memory = scale * x``, scale only, solved as a shift
     in log-depth. Why no shift: a metric network's error is dominated by a
     global scale (the focal length / object-size ambiguity of one image);
     an additive offset in metres has no such physical cause, and fitting one
     on the visible pixels (often one surface at one distance) is ill
     conditioned and, extrapolated into disocclusions at other distances, can
     push depth through zero. In log space the fit weighs every pixel by its
     relative error, as depth errors grow with distance.

   Outliers (generated content that moved, a wrong memory point, a network's
   error at an edge) are rejected by iteratively reweighted least squares
   with Tukey's biweight, the residual scale re-estimated each step as
   1.4826 x the median absolute residual; it starts from a Theil-Sen fit
   (median of pairwise slopes). Why Tukey: a redescending weight gives gross
   outliers exactly zero weight whatever their size (Huber still lets each
   pull linearly), and its cut adapts to the measured residual spread
   (trimmed least squares drops a fixed fraction, too many or too few).
   Tukey's objective is not convex, hence the Theil-Sen start, which
   tolerates ~29% outliers. A frame needs ``min_support_pixels`` support
   pixels and half as many inliers, and a positive scale. When the support
   spans almost one distance (``min_log_depth_spread``), scale and shift of a
   relative prediction cannot be told apart and the fit is scale only.
3. **Temporal smoothing** along the trajectory: each fitted frame takes the
   median, over the fitted frames within ``smoothing_radius`` of it
   (including the previous call's last ones), of log-scale and of shift.
   A centred median because the whole segment is at hand (no lag, unlike an
   exponential filter) and one bad frame's fit is dropped, not smeared into
   its neighbours.
4. **Fallback** for a frame without a fit, in order: the smoothed parameters
   of the nearest fitted frame of the call (``nearest-frame``); the last
   parameters of the previous call (``previous-call``; reset between
   trajectories); for metric networks the prediction as it is
   (``as-predicted``); for relative ones the memory completion
   (:class:`~engine.depth.MemoryDepthCompletion`, ``memory-completion``),
   since a relative prediction with nothing metric to anchor it has no scale.

Fusion (:func:`fuse_with_memory`): where the memory is not trusted
(disocclusions, new content, untrusted points) the depth is the aligned
estimate. Where it is, the two are blended in log-depth by their agreement
``r = |log z_aligned - log z_memory|``: full blend (``memory_weight`` on the
memory) up to ``agree_tolerance``, fading linearly to the memory's depth alone
at ``disagree_tolerance``, because one frame's estimate is not evidence
enough to move what the memory has committed to. Confidences:

==============================================  ============================================
pixel                                           confidence
==============================================  ============================================
memory trusted, estimate agrees                 ``visible_confidence`` (1.0)
memory trusted, estimate strongly disagrees     ``disagree_confidence`` (0.1), linear between
estimate only, frame aligned (fit, neighbour,   ``estimate_confidence`` (0.5)
previous call)
estimate only, unaligned metric prediction      ``fallback_confidence`` (0.3)
memory completion frames                        as :class:`~engine.depth.MemoryDepthCompletion`
==============================================  ============================================

Depth is z-depth in metres along the camera's optical axis (OpenCV camera
frame, z forward); the output is clamped to ``[near_m, far_m]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...bridge.errors import KeyframeWorldsError
from .depth import DEFAULT_DEPTH_M, DepthEstimate, DepthEstimator, MemoryDepthCompletion
from .render import RenderOutput
from .learned_depth import (KINDS, METRIC_DEPTH, MIN_DEPTH_M, RELATIVE_DEPTH, RELATIVE_DISPARITY, DepthPrediction,
                            DepthPredictor)

#: Where a frame's alignment parameters came from (:attr:`AlignmentFit.source`).
SOURCE_FIT = "fit"
SOURCE_NEAREST = "nearest-frame"
SOURCE_PREVIOUS = "previous-call"
SOURCE_AS_PREDICTED = "as-predicted"
SOURCE_COMPLETION = "memory-completion"
SOURCE_DEFAULT_SCALE = "default-scale"
#: Sources whose parameters tie the frame to the memory (the estimate gets ``estimate_confidence``).
ANCHORED_SOURCES = (SOURCE_FIT, SOURCE_NEAREST, SOURCE_PREVIOUS)
#: 1.4826 x MAD estimates a Gaussian's standard deviation.
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class AlignmentSettings:
    """How predictions are aligned to the memory and fused with it (see the module docstring).

    confidence_threshold: memory points below it do not support fits (used only when per-point
    confidences are given). min_support_pixels: support a frame needs for its own fit.
    max_support_pixels: support pixels a fit uses at most (evenly strided, deterministic); two
    parameters' standard error falls as 1/sqrt(n), and 16384 pixels leave it far below a depth
    network's own error at a fraction of a full frame's cost.
    robust: Tukey IRLS (False: ordinary least squares, for comparison). tukey_c: the biweight's
    cut in residual sigmas. iterations: IRLS steps at most. theil_sen_pairs: random pixel pairs
    of the Theil-Sen start (fixed seed). smoothing_radius: frames on each side of the median
    filter (0: none). min_log_depth_spread: below this median absolute deviation of the support's
    log memory depth (0.02: about +-2% in depth) a relative fit is scale only, shift 0.
    agree_tolerance, disagree_tolerance: log-depth differences where blending
    starts to fade and where only the memory is kept. memory_weight: the memory's weight in
    the log-depth blend. *_confidence: see the module docstring's table. near_m, far_m: clamp
    of the output depth (metres). default_median_depth_m: :func:`lift_reference`'s median depth
    for a relative network with no known depth.
    """

    confidence_threshold: float = 0.1
    min_support_pixels: int = 256
    max_support_pixels: int = 16384
    robust: bool = True
    tukey_c: float = 4.685
    iterations: int = 20
    theil_sen_pairs: int = 4096
    smoothing_radius: int = 2
    min_log_depth_spread: float = 0.02
    agree_tolerance: float = 0.05
    disagree_tolerance: float = 0.25
    memory_weight: float = 0.75
    visible_confidence: float = 1.0
    estimate_confidence: float = 0.5
    fallback_confidence: float = 0.3
    disagree_confidence: float = 0.1
    near_m: float = MIN_DEPTH_M
    far_m: float = 1000.0
    default_median_depth_m: float = DEFAULT_DEPTH_M

    def __post_init__(self):
        problems = []
        if self.min_support_pixels < 3:
            problems.append(f"min_support_pixels must be at least 3, got {self.min_support_pixels}")
        if self.max_support_pixels < self.min_support_pixels:
            problems.append("max_support_pixels must be at least min_support_pixels")
        if self.min_log_depth_spread < 0:
            problems.append(f"min_log_depth_spread must be >= 0, got {self.min_log_depth_spread}")
        if self.smoothing_radius < 0:
            problems.append(f"smoothing_radius must be >= 0, got {self.smoothing_radius}")
        if not 0 <= self.agree_tolerance < self.disagree_tolerance:
            problems.append("need 0 <= agree_tolerance < disagree_tolerance")
        if not 0.0 <= self.memory_weight <= 1.0:
            problems.append(f"memory_weight must be in [0, 1], got {self.memory_weight}")
        for name in ("visible_confidence", "estimate_confidence", "fallback_confidence", "disagree_confidence"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.near_m < self.far_m:
            problems.append("need 0 < near_m < far_m")
        if self.tukey_c <= 0 or self.iterations < 1 or self.theil_sen_pairs < 1:
            problems.append("tukey_c, iterations and theil_sen_pairs must be positive")
        if self.default_median_depth_m <= 0:
            problems.append("default_median_depth_m must be positive")
        if problems:
            raise KeyframeWorldsError("alignment settings: " + "; ".join(problems))


@dataclass(frozen=True)
class AlignmentFit:
    """One frame's alignment, for the runner's log.

    ``scale``, ``shift``: the parameters applied (``relative-disparity``:
    ``1/z = scale x + shift`` in 1/m; ``relative-depth``: ``z = scale x + shift``
    in m; ``metric-depth``: ``z = scale x``, shift 0). ``source``: where they
    came from (``fit``, ``nearest-frame``, ``previous-call``, ``as-predicted``,
    ``memory-completion``, ``default-scale``). ``support``: trusted memory
    pixels in the frame; ``inliers``: those the robust fit kept (0 without a
    fit). ``rmse_m``: RMS of aligned minus memory depth over the inliers, in
    metres (NaN without a fit). ``fit_scale``, ``fit_shift``: the frame's own fit
    before smoothing (None without one).
    """

    frame: int
    kind: str
    scale: float
    shift: float
    source: str
    support: int
    inliers: int
    rmse_m: float
    fit_scale: float | None = None
    fit_shift: float | None = None


@dataclass
class LineFit:
    """``y ~ slope * x + intercept`` over 1-D samples; ``inliers``: (N,) bool; ``sigma``: residual scale."""

    slope: float
    intercept: float
    inliers: torch.Tensor
    sigma: float


def _weighted_line(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, fit_slope: bool,
                   fallback: tuple[float, float]) -> tuple[float, float]:
    sw = w.sum()
    if float(sw) <= 0:
        return fallback
    if not fit_slope:
        return 1.0, float((w * (y - x)).sum() / sw)
    mx, my = (w * x).sum() / sw, (w * y).sum() / sw
    sxx = (w * (x - mx) ** 2).sum()
    if float(sxx) <= 1e-30:
        return fallback
    slope = (w * (x - mx) * (y - my)).sum() / sxx
    return float(slope), float(my - slope * mx)


def robust_line_fit(x: torch.Tensor, y: torch.Tensor, *, fit_slope: bool = True, robust: bool = True,
                    tukey_c: float = 4.685, iterations: int = 20, pairs: int = 4096, seed: int = 0) -> LineFit:
    """Fit ``y ~ slope x + intercept`` (``fit_slope=False``: slope fixed at 1) to 1-D samples.

    robust: Theil-Sen start, then Tukey-biweight IRLS with the residual scale
    re-estimated from the median absolute residual at every step (see the
    module docstring); False: ordinary least squares, every sample an inlier.
    Computed in float64 on the samples' device; the pair sampling uses a CPU
    generator seeded with ``seed``, so a fit is reproducible.
    """
    x = x.to(torch.float64).flatten()
    y = y.to(torch.float64).flatten()
    n = x.numel()
    everything = torch.ones(n, dtype=torch.bool, device=x.device)
    if not robust:
        slope, intercept = _weighted_line(x, y, torch.ones_like(x), fit_slope, (1.0, 0.0))
        sigma = float((y - slope * x - intercept).pow(2).mean().sqrt())
        return LineFit(slope, intercept, everything, sigma)
    # 1. Robust start.
    if fit_slope:
        generator = torch.Generator().manual_seed(seed)
        i = torch.randint(0, n, (pairs,), generator=generator).to(x.device)
        j = torch.randint(0, n, (pairs,), generator=generator).to(x.device)
        dx = x[i] - x[j]
        spread = float((x - x.median()).abs().median())
        usable = dx.abs() > 1e-9 * max(spread, 1e-300)
        if int(usable.sum()) < 3:
            slope = 1.0
        else:
            slope = float(((y[i] - y[j])[usable] / dx[usable]).median())
    else:
        slope = 1.0
    intercept = float((y - slope * x).median())
    # 2. Tukey IRLS.
    floor = 1e-9 * float(y.abs().median()) + 1e-300
    sigma = floor
    for _ in range(iterations):
        residual = y - slope * x - intercept
        sigma = max(MAD_TO_SIGMA * float(residual.abs().median()), floor)
        u = residual / (tukey_c * sigma)
        weight = torch.where(u.abs() < 1, (1 - u * u) ** 2, torch.zeros_like(u))
        new_slope, new_intercept = _weighted_line(x, y, weight, fit_slope, (slope, intercept))
        converged = abs(new_slope - slope) <= 1e-10 * max(abs(slope), 1e-300) \
            and abs(new_intercept - intercept) <= 1e-10 * max(abs(intercept), sigma)
        slope, intercept = new_slope, new_intercept
        if converged:
            break
    residual = y - slope * x - intercept
    sigma = max(MAD_TO_SIGMA * float(residual.abs().median()), floor)
    return LineFit(slope, intercept, residual.abs() < tukey_c * sigma, sigma)


def trusted_memory(rendered: RenderOutput, point_confidence: torch.Tensor | None = None,
                   threshold: float = 0.1) -> torch.Tensor:
    """(T, H, W) bool: the render shows a point with a positive, finite depth and, when
    ``point_confidence`` (the memory's (N,) per-point confidences) is given, at least ``threshold``."""
    depth = rendered.depth_z_m
    trusted = rendered.mask & torch.isfinite(depth) & (depth > 0)
    if point_confidence is not None:
        index = rendered.point_index.clamp_min(0)
        conf = point_confidence.to(depth.device)[index.flatten()].reshape(index.shape)
        trusted = trusted & (rendered.point_index >= 0) & (conf >= threshold)
    return trusted


def to_depth(values: torch.Tensor, kind: str, scale: float, shift: float, near_m: float, far_m: float) -> torch.Tensor:
    """Aligned z-depth (metres) from raw ``values`` of ``kind`` with ``scale``, ``shift``
    (their meaning per kind: :class:`AlignmentFit`), clamped to ``[near_m, far_m]``."""
    values = torch.nan_to_num(values.to(torch.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if kind == RELATIVE_DISPARITY:
        # Disparity at or below 1/far (the sky, an undershoot of the resampling) is "far".
        disparity = (scale * values + shift).clamp_min(1.0 / far_m)
        return (1.0 / disparity).clamp(near_m, far_m)
    if kind == RELATIVE_DEPTH:
        return (scale * values + shift).clamp(near_m, far_m)
    if kind == METRIC_DEPTH:
        return (scale * values).clamp(near_m, far_m)
    raise KeyframeWorldsError(f"unknown depth kind {kind!r}; expected one of {', '.join(KINDS)}")


def _strided(index: torch.Tensor, most: int) -> torch.Tensor:
    if index.numel() <= most:
        return index
    pick = torch.linspace(0, index.numel() - 1, most, device=index.device).round().long()
    return index[pick]


@dataclass
class _FrameFit:
    params: tuple[float, float] | None  # (log scale, shift), None without a fit
    support: int
    inliers: int
    rmse_m: float


def fit_frame(values: torch.Tensor, kind: str, memory_depth: torch.Tensor, support: torch.Tensor,
              settings: AlignmentSettings) -> _FrameFit:
    """Fit one frame's (H, W) raw ``values`` to the (H, W) ``memory_depth`` on the ``support`` mask."""
    values = values.to(torch.float32)
    ok = support & torch.isfinite(values)
    if kind == METRIC_DEPTH:
        ok = ok & (values > 0)  # the fit is in log-depth
    count = int(support.sum())
    index = _strided(torch.nonzero(ok.flatten()).flatten(), settings.max_support_pixels)
    if index.numel() < settings.min_support_pixels:
        return _FrameFit(None, count, 0, math.nan)
    x = values.flatten()[index].double()
    z = memory_depth.flatten()[index].double()
    fit_args = dict(robust=settings.robust, tukey_c=settings.tukey_c, iterations=settings.iterations,
                    pairs=settings.theil_sen_pairs)
    if kind == METRIC_DEPTH:
        line = robust_line_fit(x.log(), z.log(), fit_slope=False, **fit_args)
        scale, shift = math.exp(line.intercept), 0.0
    else:
        y = 1.0 / z if kind == RELATIVE_DISPARITY else z
        log_z = z.log()
        if float((log_z - log_z.median()).abs().median()) < settings.min_log_depth_spread:
            # The memory shows one distance only (a wall facing the camera): scale and shift are not
            # separable, and a line fit would follow the noise; fit the scale alone, in log space.
            positive = (x > 0) & (y > 0)
            if int(positive.sum()) < settings.min_support_pixels:
                return _FrameFit(None, count, 0, math.nan)
            line = robust_line_fit(x[positive].log(), y[positive].log(), fit_slope=False, **fit_args)
            scale, shift = math.exp(line.intercept), 0.0
            inliers = torch.zeros_like(x, dtype=torch.bool)
            inliers[positive] = line.inliers
            line.inliers = inliers
        else:
            line = robust_line_fit(x, y, **fit_args)
            scale, shift = line.slope, line.intercept
    inliers = int(line.inliers.sum())
    if not (math.isfinite(scale) and math.isfinite(shift)) or scale <= 0 or inliers < settings.min_support_pixels // 2:
        return _FrameFit(None, count, inliers, math.nan)
    aligned = to_depth(x[line.inliers].float(), kind, scale, shift, settings.near_m, settings.far_m).double()
    rmse = float((aligned - z[line.inliers]).pow(2).mean().sqrt())
    return _FrameFit((math.log(scale), shift), count, inliers, rmse)


def smooth_parameters(params: list[tuple[float, float] | None], radius: int,
                      history: list[tuple[float, float]] | None = None) -> list[tuple[float, float] | None]:
    """Centred median filter of (log scale, shift) over the fitted frames within ``radius``.

    params: one entry per frame, None where the frame has no fit (it stays
    None). history: the previous call's last fitted parameters, oldest first;
    they extend the window before frame 0.
    """
    history = list(history or [])[-radius:] if radius else []
    sequence = history + list(params)
    offset = len(history)
    out: list[tuple[float, float] | None] = []
    for t, own in enumerate(params):
        if own is None or radius == 0:
            out.append(own)
            continue
        lo, hi = max(0, t + offset - radius), min(len(sequence), t + offset + radius + 1)
        window = torch.tensor([p for p in sequence[lo:hi] if p is not None], dtype=torch.float64)
        # torch's median of an even count is the lower middle; the mean of both middles is symmetric
        ordered = window.sort(dim=0).values
        k = ordered.shape[0]
        middle = (ordered[(k - 1) // 2] + ordered[k // 2]) / 2
        out.append((float(middle[0]), float(middle[1])))
    return out


@dataclass
class AlignedPrediction:
    """``depth_z_m``: (T, H, W) float32 aligned estimate in metres (NaN on ``memory-completion``
    frames, which have no aligned estimate); ``fits``: one :class:`AlignmentFit` per frame."""

    depth_z_m: torch.Tensor
    fits: list[AlignmentFit]


@dataclass
class AlignmentHistory:
    """What carries over between calls along one trajectory: the last fitted (log scale, shift)
    pairs (oldest first) and the last applied ones, for the kind they were made for."""

    kind: str | None = None
    fitted: list[tuple[float, float]] = field(default_factory=list)
    last: tuple[float, float] | None = None


def align_prediction(prediction: DepthPrediction, memory_depth: torch.Tensor, trusted: torch.Tensor,
                     settings: AlignmentSettings = AlignmentSettings(),
                     history: AlignmentHistory | None = None) -> AlignedPrediction:
    """Align each frame of ``prediction`` to the (T, H, W) ``memory_depth`` on the ``trusted``
    (T, H, W) pixels: fit, smooth, fall back (see the module docstring). ``history`` (optional)
    is read and updated in place."""
    kind = prediction.kind
    if kind not in KINDS:
        raise KeyframeWorldsError(f"unknown depth kind {kind!r}; expected one of {', '.join(KINDS)}")
    values = prediction.values
    if tuple(memory_depth.shape) != tuple(values.shape) or tuple(trusted.shape) != tuple(values.shape):
        raise KeyframeWorldsError(f"prediction {tuple(values.shape)}, memory depth {tuple(memory_depth.shape)} and "
                                  f"trusted mask {tuple(trusted.shape)} must have the same (T, H, W) shape")
    memory_depth = memory_depth.to(values.device, torch.float32)
    trusted = trusted.to(values.device)
    frames = [fit_frame(values[t], kind, memory_depth[t], trusted[t], settings) for t in range(values.shape[0])]
    usable_history = history if history is not None and history.kind == kind else None
    smoothed = smooth_parameters([f.params for f in frames], settings.smoothing_radius,
                                 usable_history.fitted if usable_history else None)
    fitted = [t for t, p in enumerate(smoothed) if p is not None]
    depth = torch.full_like(values, math.nan, dtype=torch.float32)
    fits = []
    for t, frame in enumerate(frames):
        if smoothed[t] is not None:
            params, source = smoothed[t], SOURCE_FIT
        elif fitted:
            nearest = min(fitted, key=lambda s: (abs(s - t), s))
            params, source = smoothed[nearest], SOURCE_NEAREST
        elif usable_history is not None and usable_history.last is not None:
            params, source = usable_history.last, SOURCE_PREVIOUS
        elif kind == METRIC_DEPTH:
            params, source = (0.0, 0.0), SOURCE_AS_PREDICTED
        else:
            params, source = None, SOURCE_COMPLETION
        scale, shift = (math.exp(params[0]), params[1]) if params is not None else (math.nan, math.nan)
        if params is not None:
            depth[t] = to_depth(values[t], kind, scale, shift, settings.near_m, settings.far_m)
        own = frame.params
        fits.append(AlignmentFit(
            frame=t, kind=kind, scale=scale, shift=shift, source=source, support=frame.support,
            inliers=frame.inliers if own is not None else 0, rmse_m=frame.rmse_m if own is not None else math.nan,
            fit_scale=math.exp(own[0]) if own is not None else None, fit_shift=own[1] if own is not None else None,
        ))
    if history is not None:
        if history.kind != kind:
            history.kind, history.fitted, history.last = kind, [], None
        own_fits = [f.params for f in frames if f.params is not None]
        history.fitted = (history.fitted + own_fits)[-max(settings.smoothing_radius, 1):]
        anchored = [smoothed[t] for t in fitted]
        if anchored:
            history.last = anchored[-1]
    return AlignedPrediction(depth_z_m=depth, fits=fits)


def fuse_with_memory(aligned: AlignedPrediction, rendered: RenderOutput, trusted: torch.Tensor,
                     settings: AlignmentSettings = AlignmentSettings(), rgb: torch.Tensor | None = None,
                     completion: MemoryDepthCompletion | None = None) -> DepthEstimate:
    """The fusion depth and its confidence (see the module docstring's table).

    aligned: from :func:`align_prediction`; rendered: the memory along the same
    cameras; trusted: (T, H, W) bool from :func:`trusted_memory`; rgb: (T, H, W, 3)
    uint8, guides the memory completion of frames that have no aligned estimate.
    Returns depth (T, H, W) float32 metres, positive everywhere, and confidence in [0, 1].
    """
    s = settings
    estimate = aligned.depth_z_m
    device = estimate.device
    memory = rendered.depth_z_m.to(device, torch.float32)
    trusted = trusted.to(device)
    log_est = torch.log(torch.nan_to_num(estimate, nan=1.0).clamp_min(s.near_m))
    log_mem = torch.log(torch.where(trusted, memory, torch.ones_like(memory)).clamp_min(s.near_m))
    diff = log_est - log_mem
    # agreement: 1 up to agree_tolerance, 0 from disagree_tolerance on
    agreement = ((s.disagree_tolerance - diff.abs()) / (s.disagree_tolerance - s.agree_tolerance)).clamp(0.0, 1.0)
    blended = torch.exp(log_mem + agreement * (1.0 - s.memory_weight) * diff)
    frame_conf = torch.tensor([s.estimate_confidence if f.source in ANCHORED_SOURCES else s.fallback_confidence
                               for f in aligned.fits], dtype=torch.float32, device=device)[:, None, None]
    visible_conf = s.disagree_confidence + agreement * (s.visible_confidence - s.disagree_confidence)
    depth = torch.where(trusted, blended, estimate)
    confidence = torch.where(trusted, visible_conf, frame_conf.expand_as(depth))
    completion_frames = [f.frame for f in aligned.fits if f.source == SOURCE_COMPLETION]
    if completion_frames:
        idx = torch.tensor(completion_frames, device=device)
        sub = RenderOutput(rendered.rgb[idx], rendered.depth_z_m[idx].to(device, torch.float32),
                           rendered.mask[idx].to(device), rendered.point_index[idx])
        guide = rgb[idx] if rgb is not None else torch.zeros(*sub.depth_z_m.shape, 3, dtype=torch.uint8, device=device)
        completed = (completion or MemoryDepthCompletion()).estimate(guide, sub)
        depth[idx] = completed.depth_z_m.to(device)
        confidence[idx] = completed.confidence.to(device)
    depth = torch.nan_to_num(depth, nan=s.far_m).clamp(s.near_m, s.far_m)
    return DepthEstimate(depth_z_m=depth.to(torch.float32), confidence=confidence.clamp(0.0, 1.0).to(torch.float32))


class AlignedLearnedDepth(DepthEstimator):
    """A learned depth network aligned to the memory and fused with it, behind :class:`DepthEstimator`.

    predictor: a :class:`~engine.world.learned_depth.LearnedDepthEstimator`
    (or anything with its ``predict``). Keeps the alignment history of the
    trajectory it is used along: call :meth:`reset` when a new trajectory
    starts. :attr:`last_fits` holds the last call's per-frame
    :class:`AlignmentFit` for the runner's log.
    """

    name = "learned-aligned"
    learned = True

    def __init__(self, predictor: DepthPredictor, settings: AlignmentSettings = AlignmentSettings(),
                 completion: MemoryDepthCompletion | None = None):
        self.predictor = predictor
        self.settings = settings
        self.completion = completion or MemoryDepthCompletion()
        self.history = AlignmentHistory()
        self.last_fits: list[AlignmentFit] = []

    def reset(self) -> None:
        """Forget the previous calls' parameters (a new trajectory)."""
        self.history = AlignmentHistory()
        self.last_fits = []

    def estimate(self, rgb: torch.Tensor, rendered: RenderOutput, *, point_confidence: torch.Tensor | None = None,
                 intrinsics: torch.Tensor | None = None) -> DepthEstimate:
        """rgb: (T, H, W, 3) uint8 frames; rendered: the memory along their cameras.
        point_confidence: the memory's (N,) per-point confidences (``PointMemory.confidence``), to
        keep untrusted points out of the fit; intrinsics: (T, 4) for networks that use a focal."""
        prediction = self.predictor.predict(rgb, rendered, intrinsics=intrinsics)
        trusted = trusted_memory(rendered, point_confidence, self.settings.confidence_threshold)
        aligned = align_prediction(prediction, rendered.depth_z_m, trusted, self.settings, self.history)
        self.last_fits = aligned.fits
        return fuse_with_memory(aligned, rendered, trusted, self.settings, rgb, self.completion)


def lift_reference(predictor: DepthPredictor, rgb: torch.Tensor, *, intrinsics: torch.Tensor | None = None,
                   known_depth_z_m: torch.Tensor | None = None,
                   settings: AlignmentSettings = AlignmentSettings()) -> tuple[DepthEstimate, AlignmentFit]:
    """Depth for a reference image that comes without (complete) depth, to lift into the memory.

    rgb: (H, W, 3) uint8. intrinsics: (4,) ``fx, fy, cx, cy`` in pixels (Depth
    Pro's focal). known_depth_z_m: (H, W) metres where something is known (a
    partial blockout render, a scan), 0 elsewhere; it prompts Prompt Depth
    Anything, the prediction is aligned to it and fused with it as with the
    memory.

    Without enough known depth (``min_support_pixels``): a metric network's
    depth is used as predicted (``as-predicted``, ``estimate_confidence``); a
    relative one gets the stated default: shift 0 and the scale that puts the
    median depth of the image at ``default_median_depth_m`` (``default-scale``,
    ``fallback_confidence``; the runner's flat plane for a depthless reference
    is as far and as trusted, but this one has the image's shape).
    Returns a (1, H, W) :class:`DepthEstimate` and the fit.
    """
    if rgb.dim() != 3:
        raise KeyframeWorldsError(f"lift_reference needs rgb as (H, W, 3) uint8, got {tuple(rgb.shape)}")
    height, width = rgb.shape[:2]
    s = settings
    if known_depth_z_m is None:
        known_depth_z_m = torch.zeros(height, width, dtype=torch.float32, device=rgb.device)
    known = known_depth_z_m.to(rgb.device, torch.float32)
    if tuple(known.shape) != (height, width):
        raise KeyframeWorldsError(f"known depth is {tuple(known.shape)}, the image ({height}, {width})")
    known = torch.where(torch.isfinite(known) & (known > 0), known, torch.zeros_like(known))
    mask = known > 0
    rendered = RenderOutput(rgb[None], known[None], mask[None], torch.where(mask, 0, -1).long()[None])
    prediction = predictor.predict(rgb[None], rendered if bool(mask.any()) else None,
                                   intrinsics=None if intrinsics is None else intrinsics.reshape(1, 4))
    aligned = align_prediction(prediction, known[None], mask[None], s)
    fit = aligned.fits[0]
    if fit.source == SOURCE_FIT:
        return fuse_with_memory(aligned, rendered, mask[None], s, rgb[None]), fit
    values = prediction.values[0].to(torch.float32)
    kind = prediction.kind
    if kind == METRIC_DEPTH:
        scale, source, confidence = 1.0, SOURCE_AS_PREDICTED, s.estimate_confidence
    else:
        positive = values[torch.isfinite(values) & (values > 0)]
        if positive.numel() == 0:
            raise KeyframeWorldsError("the depth network predicted nothing positive for the reference image; "
                                      "give the reference a depth")
        typical = float(positive.median())
        scale = 1.0 / (s.default_median_depth_m * typical) if kind == RELATIVE_DISPARITY \
            else s.default_median_depth_m / typical
        source, confidence = SOURCE_DEFAULT_SCALE, s.fallback_confidence
    depth = to_depth(values, kind, scale, 0.0, s.near_m, s.far_m)[None]
    fit = AlignmentFit(frame=0, kind=kind, scale=scale, shift=0.0, source=source, support=fit.support,
                       inliers=0, rmse_m=math.nan)
    return DepthEstimate(depth_z_m=depth, confidence=torch.full_like(depth, confidence)), fit
