"""The ``worldstereo`` generator in the job runner: tiny models on the CPU, a synthetic scene, real bundles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from keyframe_worlds.bridge.errors import KeyframeWorldsError
from keyframe_worlds.bridge.spec import MANIFEST_FILENAME, load_job, load_manifest
from keyframe_worlds.engine.generators import SegmentRequest, get_generator
from keyframe_worlds.engine.generators.options import check_options, parse_worldstereo_options as parse_options
from keyframe_worlds.engine.generators.worldstereo import segment_keyframes
from keyframe_worlds.engine.io.images import read_rgb, write_png
from keyframe_worlds.engine.world.memory import PointMemory
from keyframe_worlds.engine.models.weights import WrongVariantError
from keyframe_worlds.engine.testing.tiny_models import write_tiny_variant, write_tiny_wan_folder
from keyframe_worlds.bridge.jobs import CancelReason, JobCancelled, Progress
from keyframe_worlds.engine.run.runner import run_job
from keyframe_worlds.engine.testing.synthetic import demo_scene, intrinsics_for_fov, look_at_c2w_opencv, raycast

W, H = 64, 48  # trajectories; generation at 64x48 too (6x8 latents) to keep the CPU run short


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_gen")
    wan = write_tiny_wan_folder(root / "wan")
    dmd = write_tiny_variant(root / "worldstereo-memory-dmd", "worldstereo-memory-dmd", seed=21)
    camera = write_tiny_variant(root / "worldstereo-camera", "worldstereo-camera", seed=22)
    return root, wan, dmd, camera


def options(folders, **extra):
    _, wan, dmd, _ = folders
    opts = {"checkpoint": str(dmd), "wan_dir": str(wan), "size": [H, W], "keyframes": 3, "keyframe_stride": 2,
            "device": "cpu"}
    opts.update(extra)
    return opts


@pytest.fixture(scope="module")
def generator(folders):
    return get_generator("worldstereo", options(folders))


def test_options_are_checked_with_clear_messages(folders, tmp_path):
    _, wan, dmd, camera = folders
    with pytest.raises(KeyframeWorldsError, match="options.segment_length: unknown option of the worldstereo generator"):
        parse_options({"checkpoint": "x", "segment_length": 4}, check_paths=False)
    # every problem at once, each with its field path
    problems = check_options("worldstereo", {"checkpoint": "x", "offload": "bogus", "steps": -1, "frobnicate": 1},
                             check_paths=False)
    assert sorted(p.path for p in problems) == ["options.frobnicate", "options.offload", "options.steps"]
    assert check_options("preview", {"segment_length": 0, "temporal": "yes", "x": 1}) != []
    assert sorted(p.path for p in check_options("preview", {"segment_length": 0, "temporal": "yes", "x": 1})) == [
        "options.segment_length", "options.temporal", "options.x"]
    for bad, message in [({"steps": 0}, "options.steps"), ({"size": [50, 64]}, "options.size"),
                         ({"device": "gpu"}, "options.device"), ({"offload": "disk"}, "options.offload"),
                         ({"variant": "worldstereo-2"}, "options.variant"), ({"guidance_scale": "high"}, "guidance"),
                         ({"keyframes": 1}, "options.keyframes"), ({"keyframe_stride": 0}, "keyframe_stride"),
                         ({"clip_pixels": "0-1"}, "options.clip_pixels: must be one of uint8, unit")]:
        with pytest.raises(KeyframeWorldsError, match=message):
            parse_options({"checkpoint": "x", **bad}, check_paths=False)
    with pytest.raises(KeyframeWorldsError, match="options.checkpoint.*KEYFRAME_WORLDS_WORLDSTEREO_DIR"):
        parse_options({}, environ={})
    from_env = parse_options({"variant": "worldstereo-memory"}, environ={"KEYFRAME_WORLDS_WORLDSTEREO_DIR": "/models"},
                             check_paths=False)
    assert str(from_env.checkpoint) == "/models/worldstereo-memory"
    defaults = parse_options({"checkpoint": str(dmd)})
    assert defaults.size is None and defaults.keyframes == 21 and defaults.keyframe_stride == 4
    with pytest.raises(KeyframeWorldsError, match=r"options.checkpoint: .* \(no config.json\)"):
        parse_options({"checkpoint": str(tmp_path)})
    with pytest.raises(KeyframeWorldsError, match="options.wan_dir: folder not found"):
        parse_options({"checkpoint": str(dmd), "wan_dir": str(tmp_path / "nowhere")})
    with pytest.raises(WrongVariantError, match="worldstereo-camera"):
        get_generator("worldstereo", options(folders, checkpoint=str(dmd), variant="worldstereo-camera"))
    with pytest.raises(KeyframeWorldsError, match="options.steps: worldstereo-memory-dmd is distilled for 4 steps"):
        get_generator("worldstereo", options(folders, steps=40))
    with pytest.raises(KeyframeWorldsError, match="options.guidance_scale: .* without guidance"):
        get_generator("worldstereo", options(folders, guidance_scale=5))
    with pytest.raises(KeyframeWorldsError, match=r"\(no config.json\)"):
        get_generator("worldstereo", options(folders, checkpoint=str(tmp_path / "nothing")))


def test_keyframes_follow_the_training_stride():
    assert segment_keyframes(81, 21, 4).tolist() == list(range(0, 81, 4))
    assert segment_keyframes(30, 21, 4).tolist() == np.linspace(0, 29, 9, dtype=int).tolist()
    assert segment_keyframes(21, 21, 1).tolist() == list(range(21))
    assert segment_keyframes(2, 21, 4).tolist() == [0, 1]
    assert segment_keyframes(1, 21, 4).tolist() == [0]


def test_generator_settings(generator, folders):
    assert generator.segment_length == 5 and generator.uses_references
    assert "worldstereo-memory-dmd" in generator.label and "re-projected" in generator.label
    camera = get_generator("worldstereo", options(folders, checkpoint=str(folders[3]), steps=1))
    assert not camera.uses_references and "1 steps" in camera.label
    assert generator.pipeline.clip_pixels == "uint8"  # as the released inference feeds CLIP
    assert get_generator("worldstereo", options(folders, clip_pixels="unit")).pipeline.clip_pixels == "unit"


def scene_request(count=5, step=0.05):
    k = intrinsics_for_fov(W, H, 70.0)
    ref = look_at_c2w_opencv((0.0, -4.0, 1.6), (0.0, 2.0, 0.8))
    memory = PointMemory.from_rgbd(*raycast(demo_scene(), ref, k, W, H), ref, k, max_points=None)
    c2w = torch.stack([look_at_c2w_opencv((step * i, -4.0, 1.6), (0.0, 2.0, 0.8)) for i in range(count)])
    intr = k[None].repeat(count, 1).to(torch.float64)
    return SegmentRequest(c2w, intr, W, H, memory.render(c2w, intr, W, H), memory, prompt="a room", seed=3)


class SpyPipeline:
    """The generator's pipeline, recording each call's conditions and output (and step callbacks)."""

    def __init__(self, inner):
        self.inner, self.calls, self.steps = inner, [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, cond, callback=None, **kw):
        def step(i, n):
            self.steps.append(i)
            if callback is not None:
                callback(i, n)

        out = self.inner(cond, callback=step, **kw)
        self.calls.append((cond, out))
        return out


def test_a_segment_keyframes_generated_and_frames_between_reprojected(generator):
    request = scene_request()
    seen, steps = [], []
    generator.pipeline = spy = SpyPipeline(generator.pipeline)
    try:
        result = generator.generate(request, on_frame=seen.append, on_step=lambda i, n: steps.append((i, n)))
        again = generator.generate(request)
    finally:
        generator.pipeline = spy.inner
    outputs = spy.calls
    assert result.rgb.shape == (5, H, W, 3) and result.rgb.dtype == torch.uint8 and result.depth is None
    assert torch.equal(result.rgb, again.rgb)  # deterministic for the job seed
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]  # every denoising step of the distilled schedule
    assert seen == [4]  # then all 5 frames at once, once they are assembled
    cond, out = outputs[0]
    assert cond.frames == 3 and cond.ref_index.tolist() == [0]  # keyframes 0, 2, 4; single-view reference
    for j, t in enumerate([0, 2, 4]):
        assert torch.equal(result.rgb[t], out.frames[j])  # generated at the trajectory size: kept as is
    # the frame between comes from its generated neighbours, not from the memory render
    to_keys = (result.rgb[1].float() - result.rgb[0].float()).abs().mean()
    to_render = (result.rgb[1].float() - request.rendered.rgb[1].float()).abs().mean()
    assert to_keys < 0.5 * to_render
    # the conditioning image is keyframe 0's render (the reference view): covered where the memory is
    covered = request.memory.render(request.c2w_opencv[:1], request.intrinsics[:1], W, H).mask[0]
    image = ((cond.image[0].permute(1, 2, 0) + 1) * 127.5).round()
    assert torch.allclose(image[covered], request.rendered.rgb[0][covered].float(), atol=1)


def write_job(folder, opts, walk_n=10):
    k = intrinsics_for_fov(W, H, 70.0)

    def frames(eyes, target, first):
        return [{"frame": first + i, "c2w_opencv": look_at_c2w_opencv(e, target).tolist(),
                 "fx": float(k[0]), "fy": float(k[1]), "cx": float(k[2]), "cy": float(k[3])}
                for i, e in enumerate(eyes)]

    walk = frames([(-0.4 + 0.08 * i, -4.0, 1.6) for i in range(walk_n)], (0.0, 2.0, 0.8), 1)
    turn = frames([(0.0, -3.5, 1.5)] * 5, (-1.0, 2.0, 0.8), 101)
    rgb, z = raycast(demo_scene(), torch.tensor(walk[0]["c2w_opencv"], dtype=torch.float64), k, W, H)
    write_png(folder / "ref.png", rgb.numpy())
    np.save(folder / "ref_depth.npy", z.numpy())
    job = {"version": 1, "name": "ws", "generator": "worldstereo", "prompt": "a room", "seed": 9,
           "reference": {"image": "ref.png", "depth": "ref_depth.npy"},
           "trajectories": [{"name": "Walk", "fps": 24.0, "width": W, "height": H, "frames": walk},
                            {"name": "Turn", "fps": 24.0, "width": W, "height": H, "frames": turn}],
           "output": {"mesh_every": 2, "mesh_stride": 4, "point_budget": 50000}, "options": opts}
    (folder / "job.json").write_text(json.dumps(job))
    return load_job(folder / "job.json")


class Recorder(Progress):
    def __init__(self, cancel_after=None):
        super().__init__()
        self.reports, self.denoising, self.cancel_after = [], [], cancel_after

    def report(self, event):
        self.reports.append((event.stage, event.done, event.total))
        if event.steps:
            self.denoising.append((event.done, event.in_flight, event.step, event.steps, event.message))

    def cancel_reason(self):
        steps = sum(1 for r in self.reports if r[0] == "generate")
        return CancelReason.CANCELLED if self.cancel_after is not None and steps >= self.cancel_after else None


def test_run_job_segments_and_cameras_share_the_memory(folders, tmp_path):
    spec = write_job(tmp_path, options(folders))
    generator = get_generator("worldstereo", spec.options)
    seen = []
    inner = generator.generate

    def spy(request, on_frame=None, on_step=None):
        seen.append((len(request.memory), [r.key for r in request.references], request.pairs.tolist()))
        return inner(request, on_frame, on_step)

    generator.generate = spy
    generator.pipeline = pipe_spy = SpyPipeline(generator.pipeline)
    progress = Recorder()
    manifest = run_job(spec, tmp_path / "out", progress=progress, generator=generator)
    assert load_manifest(tmp_path / "out").generator == "worldstereo"
    assert "WorldStereo" in manifest.generator_label
    assert [len(t.frames) for t in manifest.trajectories] == [10, 5]
    # walk: segments of 5 frames (2), turn: one segment; the memory grows after every segment
    assert len(seen) == 3
    sizes = [s[0] for s in seen]
    assert sizes[0] < sizes[1] < sizes[2]
    # the second walk segment and the other camera retrieve frames generated earlier, not only the reference
    assert any(key != ("Walk", 1) for key in seen[1][1])
    assert any(key[0] == "Walk" and key != ("Walk", 1) for key in seen[2][1])
    generate = [r for r in progress.reports if r[0] == "generate"]
    assert len(generate) == 3 * (4 + 1)  # every denoising step of every segment, then the frames
    assert generate[-1][1] == 15 and all(a[1] <= b[1] for a, b in zip(generate, generate[1:]))
    # each step: the frames finished before the segment, and the segment's share of the work so far
    assert [(d[0], d[2]) for d in progress.denoising] == [(done, s) for done in (0, 5, 10) for s in (1, 2, 3, 4)]
    assert [d[1] for d in progress.denoising] == [5 * s / 4 for s in (1, 2, 3, 4)] * 3
    assert progress.denoising[0][4] == "Walk frames 1-5" and progress.denoising[-1][4] == "Turn frames 101-105"
    # the second walk segment is conditioned on what the first one added to the memory: fewer holes in
    # its render than the reference alone leaves at the same cameras
    k = intrinsics_for_fov(W, H, 70.0)
    walk = spec.trajectories[0]
    c2w0 = torch.from_numpy(walk.c2w_opencv[0])
    initial = PointMemory.from_rgbd(*raycast(demo_scene(), c2w0, k, W, H), c2w0, k, max_points=None)
    keys = segment_keyframes(5, 3, 2) + 5
    alone = initial.render(torch.from_numpy(walk.c2w_opencv[keys]), k[None].repeat(3, 1).double(), W, H)
    cond = pipe_spy.calls[1][0]
    assert cond.render_mask[0, 0, 1:].mean() < 0.5 * (~alone.mask[1:]).float().mean()
    # the same job and seed give the same frames
    again = run_job(spec, tmp_path / "again", generator=generator)
    for first, second in zip(manifest.trajectories, again.trajectories):
        for a, b in zip(first.frames, second.frames):
            assert np.array_equal(read_rgb(tmp_path / "out" / a.image), read_rgb(tmp_path / "again" / b.image))


def test_cancelling_stops_between_denoising_steps(folders, tmp_path):
    spec = write_job(tmp_path, options(folders))
    generator = get_generator("worldstereo", spec.options)
    generator.pipeline = spy = SpyPipeline(generator.pipeline)
    with pytest.raises(JobCancelled, match="generate"):
        run_job(spec, tmp_path / "out", progress=Recorder(cancel_after=2), generator=generator)
    assert spy.steps == [1, 2]  # stopped right after the second step of the first segment
    assert not spy.calls and not (tmp_path / "out" / MANIFEST_FILENAME).exists()


def test_the_service_status_moves_with_the_denoising_steps(folders, tmp_path):
    """A worldstereo job through the engine's job manager and runner: the status a client polls shows
    each denoising step, its progress moves within a segment, and frames count only once final."""
    import shutil
    import time

    from keyframe_worlds.engine.service.jobs import JobManager

    snapshots = []

    class Watched(JobManager):
        def _update(self, job_id, **changes):
            super()._update(job_id, **changes)
            if "progress" in changes:
                s = self.get(job_id)
                snapshots.append((s.frames_done, s.progress, s.step, s.steps))

    write_job(tmp_path, options(folders))
    doc = json.loads((tmp_path / "job.json").read_text())
    manager = Watched(tmp_path / "jobs", ["cpu"])
    manager.start()
    try:
        status = manager.submit(doc, {key: (lambda path, key=key: shutil.copy(tmp_path / doc["reference"][key], path))
                                      for key in ("image", "depth")})
        deadline = time.monotonic() + 120
        while not manager.get(status.id).state.finished and time.monotonic() < deadline:
            time.sleep(0.05)
        final = manager.get(status.id)
    finally:
        manager.stop()
    assert final.state.value == "completed", final.error
    assert final.step is None and final.steps is None and final.frames_done == 15
    stepping = [s for s in snapshots if s[3] is not None]
    assert [(s[0], s[2], s[3]) for s in stepping] == [(done, k, 4) for done in (0, 5, 10) for k in (1, 2, 3, 4)]
    # progress counts the denoised share of the segment in flight: 5 frames x k/4 of 15
    assert [s[1] for s in stepping] == pytest.approx([(done + 5 * k / 4) / 15 for done in (0, 5, 10) for k in (1, 2, 3, 4)])
    progress = [s[1] for s in snapshots]
    assert progress == sorted(progress)
