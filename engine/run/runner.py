"""Run a job: reference -> memory -> segments (render, retrieve, generate, depth, fuse) -> result bundle.

``run_job`` is a plain function so the command line and the engine's workers
call the same thing. Progress goes through the bridge's
:class:`~keyframe_worlds.bridge.jobs.Progress`, which is also where
cancellation is checked: at every stage, frame and denoising step a cancelled
job stops with :class:`~keyframe_worlds.bridge.jobs.JobCancelled`. Every file
of the bundle is written atomically and the manifest last, so an interrupted
job leaves complete files and no manifest; a checkpoint after every segment
(``checkpoint``) lets the same spec resume there.

Retrieval cadence: the reference and every ``generator.retrieval_every``-th
frame of a trajectory (default ``RETRIEVAL_EVERY``; the ``worldstereo``
generator's keyframe stride, so only frames it truly generated) are kept as
candidates the spatial-stereo memory may show the generator later. This is
the runner's own rule, independent of the bundle's ``output.mesh_every``, so an
output setting never changes what is generated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ...bridge.atomic import remove_temporary_files
from ...bridge.errors import KeyframeWorldsError
from ...bridge.jobs import Progress
from ...bridge.panorama import EQUIRECTANGULAR
from ...bridge.spec import JobSpec, ResultManifest, projection_problem, view_images
from ...bridge.trajectory import Trajectory
from .bundle import BundleWriter
from ..generators import Generator, ReferenceFrame, SegmentRequest, get_generator
from ..io.inputs import check_depth_matches, read_reference_depth, read_reference_rgb
from ..testing import faults
from ..world.cameras import rescale_intrinsics_vec
from ..world.depth import DepthEstimator
from ..world.memory import PointMemory
from ..world.retrieval import CandidateView, retrieve, target_samples
from . import checkpoint
from .geometry import DEFAULT_REFERENCE_DEPTH_M, build_depth_estimator, panorama_depth, reference_depth
from .lens import pinhole_job, pinhole_trajectory, undistort_view
from .seed import read_seed_points, seed_depth_at, seed_memory

RETRIEVAL_SCALE = 0.125  # candidate depth maps and target samples at 1/8 of the frame size


@dataclass
class _History:
    """Earlier frames kept for retrieval: low-resolution depth and the frame itself."""

    candidates: list[CandidateView]
    frames: list[ReferenceFrame]


def _resize(array: np.ndarray, width: int, height: int, nearest: bool) -> np.ndarray:
    from PIL import Image

    if array.shape[1] == width and array.shape[0] == height:
        return array
    mode = Image.NEAREST if nearest else Image.BILINEAR
    if array.ndim == 2:
        return np.asarray(Image.fromarray(array.astype(np.float32), "F").resize((width, height), mode))
    return np.asarray(Image.fromarray(array).resize((width, height), mode))


# Reference pixels where the depth map has no surface (sky, the far background) become a backdrop this
# many times further than the scene's far depth, so later frames see the reference's sky, not a guess.
BACKDROP_DISTANCE_FACTOR = 4.0
BACKDROP_CONFIDENCE = 0.05


def add_backdrop(memory: PointMemory, rgb: torch.Tensor, depth_z_m: torch.Tensor, c2w: torch.Tensor, k: torch.Tensor,
                 where: torch.Tensor | None = None) -> int:
    """Add the reference's no-surface pixels (of ``where``, (H, W) bool, default all) as a far, low-confidence backdrop;
    returns how many points."""
    surface = depth_z_m > 0
    empty = ~surface if where is None else ~surface & where.to(surface.device)
    if not bool(empty.any()) or not bool(surface.any()):
        return 0
    far = float(torch.quantile(depth_z_m[surface].float().cpu(), 0.98)) * BACKDROP_DISTANCE_FACTOR
    return memory.add_rgbd(rgb, torch.full_like(depth_z_m, far), c2w, k, frame_index=0, confidence=BACKDROP_CONFIDENCE,
                           where=empty)


#: How far (relative) a perspective reference's aspect may differ from its camera's before its resize is reported.
STRETCH_TOLERANCE = 0.01


def load_reference(spec: JobSpec, warnings: list[str] | None = None) -> tuple[Trajectory, int, np.ndarray, np.ndarray | None]:
    """The reference trajectory, frame index, RGB (H, W, 3) uint8 and depth (H, W) or None.

    A perspective reference comes at the trajectory's size (z-depth); an equirectangular one at its own size
    (depth: distance along the rays). A 2:1 image for a camera of another shape is refused, never squashed; any
    other image whose aspect is not its camera's is stretched to it, and ``warnings`` (when given) gets a line
    saying so.
    """
    traj, index = spec.reference_view()
    raw_rgb = read_reference_rgb(spec.reference.image)
    raw_h, raw_w = raw_rgb.shape[:2]
    problem = projection_problem(spec.reference.projection, raw_w, raw_h, traj, spec.reference.image)
    if problem:
        raise KeyframeWorldsError(f"reference.projection: {problem}")
    panorama = spec.reference.projection == EQUIRECTANGULAR
    stretch = (raw_w / raw_h) / (traj.width / traj.height)
    if not panorama and abs(stretch - 1.0) > STRETCH_TOLERANCE and warnings is not None:
        warnings.append(f"reference.image {spec.reference.image} is {raw_w}x{raw_h} px but camera {traj.name!r} is "
                        f"{traj.width}x{traj.height}: it was stretched {stretch:.3f}x horizontally to fit; give an image "
                        "of the camera's aspect")
    rgb = raw_rgb if panorama else _resize(raw_rgb, traj.width, traj.height, nearest=False)
    depth = None
    if spec.reference.depth:
        depth = read_reference_depth(spec.reference.depth)
        check_depth_matches(depth, raw_rgb, spec.reference.depth, spec.reference.image)
        if not panorama:
            depth = _resize(depth, traj.width, traj.height, nearest=True)
    return traj, index, rgb, depth


def lift_panorama_reference(memory: PointMemory, rgb: torch.Tensor, distance: torch.Tensor, confidence, c2w: torch.Tensor,
                            traj: Trajectory, frame: int, history: "_History") -> None:
    """An equirectangular reference into the memory (and its no-surface pixels as the far backdrop); the memory
    seen along the panorama's four horizontal cube faces, at the reference camera's size, joins the retrieval
    candidates (the generators take perspective views only)."""
    from ..world.panorama import face_camera, lift_panorama

    lift_panorama(memory, rgb, distance, c2w, frame_index=0, confidence=confidence)
    surface = distance > 0
    if bool(surface.any()) and not bool(surface.all()):
        far = float(torch.quantile(distance[surface].float().cpu(), 0.98)) * BACKDROP_DISTANCE_FACTOR
        lift_panorama(memory, rgb, torch.full_like(distance, far), c2w, frame_index=0, confidence=BACKDROP_CONFIDENCE,
                      where=~surface)
    f = traj.width / 2.0  # a 90-degree horizontal view, square pixels
    k = torch.tensor([f, f, traj.width / 2.0, traj.height / 2.0], dtype=torch.float64)
    for face in ("front", "right", "back", "left"):
        face_c2w = face_camera(c2w, face)
        seen = memory.render(face_c2w[None], k[None], traj.width, traj.height)
        cand, view = _candidate((f"{traj.name} {face}", frame), seen.rgb[0], seen.depth_z_m[0], face_c2w, k, traj.width, traj.height)
        history.candidates.append(cand)
        history.frames.append(view)


def lift_reference_views(spec: JobSpec, memory: PointMemory, estimator: DepthEstimator, progress: Progress,
                         history: "_History", device: torch.device) -> int:
    """``reference.views``: every frame with an image in that trajectory file (a ``pano_bank``, ...) is fused into
    the first memory with its own camera, its depth estimated against what the memory already holds (a learned
    network aligned to it, else the memory's completion). Returns how many views."""
    folder = Path(spec.reference.views)
    count = 0
    pinholes: dict[str, Trajectory] = {}  # camera name -> the pinhole keeping its lens's field of view
    for source, i, path in view_images(folder):
        if source.name not in pinholes:  # a new camera: its own alignment history
            estimator.reset()
            lines: list[str] = []
            pinholes[source.name] = pinhole_trajectory(source, lines)
            for line in lines:
                progress.log(f"reference views {line}")
        traj = pinholes[source.name]
        raw = read_reference_rgb(path, what=f"reference.views {traj.name!r} frame {int(traj.frames[i])}")
        if raw.shape[:2] != (traj.height, traj.width):
            raise KeyframeWorldsError(f"reference.views: {path} is {raw.shape[1]}x{raw.shape[0]} px but its camera "
                                      f"{traj.name!r} is {traj.width}x{traj.height}")
        raw, valid = undistort_view(source, traj, i, raw)
        rgb = torch.from_numpy(raw).to(device)
        c2w, k = _camera(traj, i)
        rendered = memory.render(c2w[None], k[None], traj.width, traj.height)
        depth = estimator.estimate(rgb[None], rendered, point_confidence=memory.confidence, intrinsics=k[None])
        depth_z_m = depth.depth_z_m[0]
        if valid is not None:  # pinhole pixels the distorted view does not reach hold nothing
            depth_z_m = torch.where(torch.from_numpy(valid).to(device), depth_z_m, torch.zeros_like(depth_z_m))
        memory.fuse(rgb, depth_z_m, c2w, k, frame_index=0, confidence=depth.confidence[0])
        cand, frame = _candidate((traj.name, int(traj.frames[i])), rgb, depth_z_m, c2w, k, traj.width, traj.height)
        history.candidates.append(cand)
        history.frames.append(frame)
        count += 1
    if count == 0:
        raise KeyframeWorldsError(f"reference.views: {folder} has no frame with an image")
    progress.log(f"reference views: {count} from {folder}, {len(memory)} points")
    return count


def _camera(traj: Trajectory, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    c2w = torch.from_numpy(traj.c2w_opencv[i]).to(torch.float64)
    k = torch.tensor([traj.fx[i], traj.fy[i], traj.cx[i], traj.cy[i]], dtype=torch.float64)
    return c2w, k


def _candidate(key, rgb: torch.Tensor, depth: torch.Tensor, c2w, k, width: int, height: int) -> tuple[CandidateView, ReferenceFrame]:
    w = max(int(round(width * RETRIEVAL_SCALE)), 1)
    h = max(int(round(height * RETRIEVAL_SCALE)), 1)
    small = torch.nn.functional.interpolate(depth[None, None].cpu().float(), size=(h, w), mode="nearest")[0, 0]
    return CandidateView(key, c2w, rescale_intrinsics_vec(k, (width, height), (w, h)), w, h, small), ReferenceFrame(key, rgb.cpu(), depth.cpu(), c2w, k)


def _log_fits(progress: Progress, traj: Trajectory, start: int, fits) -> None:
    """One log line per segment: how the learned depth was aligned to the memory."""
    if not fits:
        return
    sources = sorted({f.source for f in fits})
    scales = [f.scale for f in fits]
    progress.log(f"depth {traj.name} frames {int(traj.frames[start])}-{int(traj.frames[start + len(fits) - 1])}: "
                 f"aligned by {', '.join(sources)}, scale {min(scales):.4g}-{max(scales):.4g}")


def run_job(
    spec: JobSpec,
    out_dir: str | Path,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
    generator: Generator | None = None,
    resume: bool = False,
    depth_estimator: DepthEstimator | None = None,
) -> ResultManifest:
    """Run a validated job (reference paths absolute, see ``JobSpec.resolve``); write the bundle to ``out_dir``.

    generator: an already built generator (e.g. the one a worker keeps warm);
    default: the one the job names, built from its options on ``device``.
    depth_estimator: depth for the reference and the generated frames (default: what the job's ``geometry``
    configures, see ``geometry.build_depth_estimator``: a learned network aligned to the memory, else
    :class:`MemoryDepthCompletion` for frames whose generator gives no depth).
    resume: continue from the checkpoint an interrupted run of the same spec left in
    ``out_dir``. A checkpoint is written after every segment either way
    (``checkpoint``) and removed when the bundle is complete.
    """
    progress = progress or Progress()
    device = torch.device(device)
    generator = generator or get_generator(spec.generator, spec.options, device)
    total = sum(len(t) for t in spec.run_trajectories())  # execution.trajectories: only these, from the reference's memory

    progress.stage("reference", "reading the reference")
    # Distorted cameras become the pinholes keeping their field of view; checkpoints still name the job as given.
    lens = pinhole_job(spec)
    for line in lens.log:
        progress.log(line)
    warnings: list[str] = []
    ref_traj, ref_index, ref_rgb_np, ref_depth_np = load_reference(lens.spec, warnings)
    for line in warnings:
        progress.warn(line)
    ref_rgb_np, ref_depth_np, ref_valid = lens.undistort_reference(ref_rgb_np, ref_depth_np)
    ref_c2w, ref_k = _camera(ref_traj, ref_index)
    memory = PointMemory(device=device, max_points=spec.output.point_budget)
    if spec.reference.points:
        seed = read_seed_points(spec.reference.points)
        progress.log(f"memory seeded with {seed_memory(memory, seed)} of {len(seed.positions_world)} points of {seed.source}")
        if ref_depth_np is None:
            ref_depth_np = seed_depth_at(memory, ref_c2w, ref_k, ref_traj.width, ref_traj.height)
            progress.log(f"reference depth: the seed's points at the reference camera ({float((ref_depth_np > 0).mean()):.0%} "
                         "of the pixels)")
    estimator = depth_estimator or build_depth_estimator(spec.geometry, device)
    if estimator.learned:
        progress.log(f"depth: {getattr(getattr(estimator, 'predictor', None), 'info', estimator.name)}")
    progress.stage("memory", "lifting the reference")
    # A read-only array (a decoded image's buffer) would become a tensor torch may not write to.
    ref_rgb = torch.from_numpy(ref_rgb_np if ref_rgb_np.flags.writeable else ref_rgb_np.copy()).to(device)
    panorama = spec.reference.projection == EQUIRECTANGULAR
    flat_depth_m = float(spec.options.get("reference_depth_m", DEFAULT_REFERENCE_DEPTH_M))
    given_depth = None if ref_depth_np is None else torch.from_numpy(ref_depth_np).to(device)
    if panorama:
        lifted = panorama_depth(ref_rgb, given_depth, estimator, flat_depth_m)
    else:
        lifted = reference_depth(ref_rgb, given_depth, ref_k, estimator, flat_depth_m)
    progress.log(f"reference depth: {lifted.source}")
    if lifted.focal_px is not None:
        progress.log(f"reference focal: the depth network estimates {lifted.focal_px:.1f} px, the camera has "
                     f"{float(ref_k[0]):.1f} px")
    if lifted.warning:
        warnings.append(lifted.warning)
        progress.warn(lifted.warning)
    ref_depth = lifted.depth_z_m.to(device)
    valid = None if ref_valid is None else torch.from_numpy(ref_valid).to(device)
    if valid is not None:  # pinhole pixels the distorted plate does not reach hold nothing
        ref_depth = torch.where(valid, ref_depth, torch.zeros_like(ref_depth))
    if panorama:
        history = _History([], [])
        lift_panorama_reference(memory, ref_rgb, ref_depth, lifted.confidence, ref_c2w, ref_traj,
                                int(ref_traj.frames[ref_index]), history)
    else:
        if spec.reference.points:  # the seed keeps what it shows; the reference adds only what the seed does not explain
            memory.fuse(ref_rgb, ref_depth, ref_c2w, ref_k, frame_index=0, confidence=lifted.confidence)
        else:
            memory.add_rgbd(ref_rgb, ref_depth, ref_c2w, ref_k, frame_index=0, confidence=lifted.confidence)
        add_backdrop(memory, ref_rgb, ref_depth, ref_c2w, ref_k, where=valid)
        cand, frame = _candidate((ref_traj.name, int(ref_traj.frames[ref_index])), ref_rgb, ref_depth, ref_c2w, ref_k, ref_traj.width, ref_traj.height)
        history = _History([cand], [frame])
    if spec.reference.views:
        lift_reference_views(spec, memory, estimator, progress, history, device)
    progress.stage("memory", f"{len(memory)} points", done=1, total=1)

    geometry = spec.geometry
    bundle = BundleWriter(out_dir, spec.name, generator.name, generator.label, spec.seed, flow=geometry.flow,
                          point_maps=geometry.point_maps,
                          flow_device=str(device) if geometry.device == "auto" else geometry.device)
    done = 0
    global_index = 1
    mesh_every = spec.output.mesh_every
    retrieval_every = generator.retrieval_every
    restored = None
    if resume and Path(out_dir).is_dir():
        # A killed earlier run may have left half-written temporary files; they are not part of any result.
        removed = remove_temporary_files(out_dir)
        if removed:
            progress.log(f"removed {removed} temporary file(s) an interrupted run left")
    if resume:
        resumed_memory = PointMemory(device=device, max_points=spec.output.point_budget)
        restored = checkpoint.load(out_dir, spec, resumed_memory, _History, CandidateView, ReferenceFrame,
                                   trajectories=lens.spec.trajectories)
    if restored is not None:
        saved, history = restored
        memory, done, global_index = resumed_memory, saved.done, saved.global_index
        bundle.resume(saved.finished, saved.finished_meshes)
        progress.log(f"resuming from the checkpoint: {done} of {total} frames were finished")
        progress.frames(done, total, f"resuming after {done} finished frames")
    for traj_index, traj in enumerate(lens.spec.run_trajectories()):  # execution.trajectories: only these
        if restored is not None and traj_index < saved.trajectory:
            continue
        output = bundle.trajectory(traj, source=lens.source_lens(traj.name))
        estimator.reset()  # alignment history is per trajectory
        first = 0
        if restored is not None and traj_index == saved.trajectory:
            checkpoint.replay_video(output, saved.frames)
            output.meshes, first = list(saved.meshes), saved.next_start
        try:
            for start in range(first, len(traj), generator.segment_length):
                stop = min(start + generator.segment_length, len(traj))
                c2w = torch.from_numpy(traj.c2w_opencv[start:stop]).to(torch.float64)
                intr = torch.from_numpy(np.stack([traj.fx, traj.fy, traj.cx, traj.cy], -1)[start:stop]).to(torch.float64)
                stamp = memory.stamp
                rendered = memory.render(c2w, intr, traj.width, traj.height)
                request = SegmentRequest(c2w, intr, traj.width, traj.height, rendered, memory,
                                         prompt=spec.prompt, seed=spec.seed, frame_offset=start,
                                         depth=estimator if estimator.learned else None)
                if generator.uses_references:
                    samples = target_samples(memory, c2w, intr, traj.width, traj.height, RETRIEVAL_SCALE)
                    picked = retrieve(samples, history.candidates)
                    request.references = [history.frames[i] for i in picked.selected]
                    request.pairs = picked.pairs

                def on_frame(i: int, _start=start) -> None:
                    progress.frames(done + i + 1, total, f"{traj.name} frame {int(traj.frames[_start + i])}")
                    faults.at_frames(done + i + 1)

                def on_step(step: int, steps: int, _count=stop - start,
                            _span=f"{traj.name} frames {int(traj.frames[start])}-{int(traj.frames[stop - 1])}") -> None:
                    progress.frames(done, total, _span, in_flight=_count * step / steps, step=step, steps=steps)

                result = generator.generate(request, on_frame, on_step=on_step)
                if estimator.learned or result.depth is None:
                    # A learned estimator gives every generated frame geometry of its own, aligned to the memory.
                    depth = estimator.estimate(result.rgb, rendered, point_confidence=memory.confidence, intrinsics=intr)
                    _log_fits(progress, traj, start, getattr(estimator, "last_fits", ()))
                else:
                    depth = result.depth
                for t in range(stop - start):
                    i = start + t
                    one = type(rendered)(rendered.rgb[t : t + 1], rendered.depth_z_m[t : t + 1], rendered.mask[t : t + 1], rendered.point_index[t : t + 1])
                    memory.fuse(result.rgb[t], depth.depth_z_m[t], c2w[t], intr[t], frame_index=global_index,
                                confidence=depth.confidence[t], prior=(one, stamp))
                    rgb_np = result.rgb[t].cpu().numpy()
                    depth_np = depth.depth_z_m[t].cpu().numpy()
                    output.write_frame(i, rgb_np, depth_np)
                    if i % mesh_every == 0:
                        output.write_mesh(i, depth_np, spec.output.mesh_stride)
                    if i % retrieval_every == 0:
                        cand, frame = _candidate((traj.name, int(traj.frames[i])), result.rgb[t], depth.depth_z_m[t], c2w[t], intr[t], traj.width, traj.height)
                        history.candidates.append(cand)
                        history.frames.append(frame)
                    global_index += 1
                done += stop - start
                output.flush()  # the checkpoint may only list frames whose files exist
                checkpoint.save(out_dir, spec, checkpoint.RunState(traj_index, stop, done, global_index, list(bundle.trajectories),
                                                                   output.frames, output.meshes, list(bundle.meshes)), memory, history)
                faults.after_checkpoint()
        except BaseException:
            output.abort()
            raise
        bundle.add(output)

    progress.stage("export", f"point cloud, {len(memory)} points")
    bundle.write_point_cloud(
        memory.positions_world.cpu().numpy(), memory.colors.cpu().numpy(),
        memory.confidence.cpu().numpy(), memory.frame_index.cpu().numpy(),
    )
    bundle.trajectories = [replace(rt, source=lens.sources.get(rt.trajectory.name)) for rt in bundle.trajectories]
    manifest = bundle.finish(tuple(warnings))
    checkpoint.remove(out_dir)
    progress.stage("done", f"{total} frames -> {out_dir}", done=total, total=total)
    return manifest
