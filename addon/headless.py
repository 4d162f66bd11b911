"""Headless commands: ``blender -b scene.blend -c keyframe_worlds <command>`` and ``keyframe-worlds scene <command> --blend``.

Both parse the same arguments and call the same functions the operators call
(``scene_cameras.export_trajectories``, ``jobs.prepare_job``,
``importers.import_bundle``). Commands:

- ``trajectory``: write the chosen cameras' trajectories in any bridge format.
- ``import-trajectory``: create keyframed cameras from a trajectory file (with their
  lens and image paths; ``--points``: a COLMAP model's points3D as a point cloud) and save.
- ``generate``: prepare the job from the scene, start the engine service (its own
  Python, a separate process) as the add-on does, run the job with progress on
  stdout, fetch the bundle; non-zero exit on failure.
- ``import``: bring a result bundle into the file and save it.
- ``farm``: one self-contained job folder per shot (marker-bound camera, or each chosen camera) and the Open Job
  Description template that runs them (``farm.export_farm``).

This module imports ``bpy`` only inside the command handlers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..bridge.errors import ERROR_PREFIX, KeyframeWorldsError
from ..bridge.formats import FORMATS
from ..bridge.panorama import PERSPECTIVE, PROJECTIONS
from ..bridge.paths import check_output
from .choices import CAMERA_SOURCES, GENERATORS, OFFLOAD_MODES

BLENDER_COMMAND = "keyframe_worlds"
_registered = []



def _frames(text: str) -> tuple[int, int]:
    try:
        a, b = text.split("-") if "-" in text[1:] else (text, text)
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"frames must look like A-B (e.g. 1-120), got {text!r}") from None


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value} (a bundle without meshes: import with --no-meshes)")
    return value


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """What a job is made with, as `generate` and `farm` both take it: generator, prompt, seed, the reference's
    depth and render samples, the bundle's meshes, the worldstereo variant and offload."""
    parser.add_argument("--generator", default="preview", choices=GENERATORS,
                        help="preview: the memory rendered along the cameras, no weights; worldstereo: the diffusion model")
    parser.add_argument("--prompt", default="", help="what the world looks like (used by worldstereo)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the generator")
    parser.add_argument("--depth", choices=("scene", "none"), default="scene",
                        help="depth of the rendered reference from the scene")
    parser.add_argument("--samples", type=int, default=16, help="Cycles samples for the reference render")
    parser.add_argument("--mesh-every", type=_at_least_one, metavar="N",
                        help="a depth mesh in the bundle every N frames of each camera, N >= 1 (default: 8, the spec's)")
    parser.add_argument("--mesh-stride", type=_at_least_one, metavar="N",
                        help="a mesh vertex every N pixels (default: 4, the spec's)")
    parser.add_argument("--variant", default="worldstereo-memory-dmd", help="worldstereo: the model variant")
    parser.add_argument("--offload", default="none", choices=OFFLOAD_MODES, help="worldstereo: GPU offload mode")


def _add_camera_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--camera", action="append", help="camera object name (repeatable); default: --cameras")
    p.add_argument("--cameras", choices=CAMERA_SOURCES, default="SCENE", help="which cameras when no --camera is given")
    p.add_argument("--frames", type=_frames, help="frame range A-B (default: the scene's)")
    p.add_argument("--step", type=int, default=1, help="every Nth frame")


def add_scene_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``trajectory``, ``import-trajectory``, ``generate`` and ``import`` to ``subparsers``."""
    t = subparsers.add_parser("trajectory", help="write camera trajectories from the scene")
    _add_camera_arguments(t)
    t.add_argument("--format", required=True, choices=FORMATS, help="the trajectory format to write")
    t.add_argument("--out", required=True, help="the file (or, for colmap and colmap-binary, folder) to write")
    t.set_defaults(scene_handler=cmd_trajectory)

    it = subparsers.add_parser("import-trajectory", help="create keyframed cameras from a trajectory file and save")
    it.add_argument("trajectory", help="trajectory file or folder (a COLMAP model folder, transforms.json, ...)")
    it.add_argument("--from", dest="fmt", choices=FORMATS, help="its format (default: detected)")
    it.add_argument("--points", action="store_true", help="a COLMAP model's points3D as a point cloud object, in the cameras' world")
    it.add_argument("--clip-lens", action="store_true",
                    help="set the lens distortion on the scene's active movie clip's tracking camera")
    it.add_argument("--save", help="save as this .blend (default: save the opened file)")
    it.set_defaults(scene_handler=cmd_import_trajectory)

    g = subparsers.add_parser("generate", help="run a job from the scene in the engine")
    _add_camera_arguments(g)
    g.add_argument("--out", required=True, help="job folder: job.json, reference and the result bundle (bundle/)")
    g.add_argument("--name", default=None, help="job name (default: the folder's name)")
    _add_job_arguments(g)
    g.add_argument("--reference", help="reference image file (default: render the first frame from the scene)")
    g.add_argument("--projection", choices=PROJECTIONS, default=PERSPECTIVE,
                   help="what the --reference image is: the camera's view, or a 2:1 equirectangular panorama around it")
    g.add_argument("--depth-file", help="reference depth file (.npy z-depth in metres, or .exr)")
    g.add_argument("--seed-object", default="", help="a mesh or point-cloud object whose points seed the memory (reference.points)")
    g.add_argument("--engine-python", help="the engine's Python (default: $KEYFRAME_WORLDS_ENGINE_PYTHON, else this Python)")
    g.add_argument("--model-dir", help="worldstereo: folder with one folder per variant (and the Wan2.1 I2V folder)")
    g.add_argument("--device", default="auto", help="engine device: auto (every CUDA GPU, else cpu), cpu, cuda:0 ...")
    g.add_argument("--import", dest="import_result", action="store_true", help="import the result and save the file")
    g.set_defaults(scene_handler=cmd_generate)

    i = subparsers.add_parser("import", help="import a result bundle into the file and save it")
    i.add_argument("bundle", help="result bundle folder (with manifest.json)")
    i.add_argument("--no-meshes", action="store_true", help="leave out the depth meshes")
    i.add_argument("--no-points", action="store_true", help="leave out the point cloud")
    i.add_argument("--no-video", action="store_true", help="do not put the generated video on the cameras")
    i.add_argument("--point-maps", action="store_true", help="each camera's point maps as a (hidden) background image sequence")
    i.add_argument("--dynamic-masks", action="store_true", help="each camera's dynamic masks as a (hidden) background image sequence")
    i.add_argument("--consistency", action="store_true", help="the point cloud's material shows its consistency attribute")
    i.add_argument("--save", help="save as this .blend (default: save the opened file)")
    i.set_defaults(scene_handler=cmd_import)

    f = subparsers.add_parser("farm", help="write one job folder per shot and an Open Job Description template",
                              description="One self-contained job folder per shot (each marker-bound camera over its "
                              "frames, or each chosen camera) and template.yaml, which runs them with keyframe-worlds run "
                              "(openjd run, AWS Deadline Cloud).")
    f.add_argument("--camera", action="append", help="one job per named camera (repeatable); default: --cameras")
    f.add_argument("--cameras", choices=CAMERA_SOURCES, default="MARKERS",
                   help="MARKERS: one job per camera-bound timeline marker; SELECTED, ALL, SCENE: one job per camera")
    f.add_argument("--frames", type=_frames, help="frame range A-B (default: the scene's)")
    f.add_argument("--step", type=int, default=1, help="every Nth frame")
    f.add_argument("--out", required=True, help="folder for the job folders and template.yaml")
    _add_job_arguments(f)
    f.add_argument("--engine-python", help="the template's default EnginePython (the farm worker's engine Python)")
    f.add_argument("--output-dir", help="the template's default OutputDir (where the farm writes the bundles)")
    f.set_defaults(scene_handler=cmd_farm)


def build_parser(prog: str) -> argparse.ArgumentParser:
    from ..cli import show_defaults

    parser = argparse.ArgumentParser(prog=prog, description="Keyframe Worlds headless commands on the open Blender file")
    add_scene_commands(parser.add_subparsers(dest="scene_command", required=True, metavar="COMMAND"))
    return show_defaults(parser)


def run(args: argparse.Namespace) -> int:
    """Run a parsed command on the open file; errors become a message and exit status 2."""
    try:
        return int(args.scene_handler(args) or 0)
    except KeyframeWorldsError as exc:
        print(f"{ERROR_PREFIX} {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from ..bridge.paths import describe_os_error

        print(f"{ERROR_PREFIX} {describe_os_error(exc)}", file=sys.stderr)
        return 2


# --- entry points -----------------------------------------------------------------


def blender_cli(argv: list[str]) -> int:
    """``blender -b file.blend -c keyframe_worlds ...``."""
    parser = build_parser(f"blender -b FILE.blend -c {BLENDER_COMMAND}")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and bad usage; Blender wants a status
        return int(exc.code or 0)
    return run(args)


def register_blender_command() -> None:
    import bpy

    if not _registered and hasattr(bpy.utils, "register_cli_command"):
        _registered.append(bpy.utils.register_cli_command(BLENDER_COMMAND, blender_cli))


def unregister_blender_command() -> None:
    import bpy

    while _registered:
        bpy.utils.unregister_cli_command(_registered.pop())


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``keyframe-worlds scene <command> --blend FILE`` (the console command, with the bpy module)."""
    scene = subparsers.add_parser("scene", help="headless Blender commands on a .blend file (needs the bpy module)",
                                  description="keyframe-worlds scene COMMAND --blend FILE ... (or scene --blend FILE COMMAND ...)")
    scene.add_argument("--blend", dest="blend_before", metavar="FILE", help="the .blend file to open")
    commands = scene.add_subparsers(dest="scene_command", required=True, metavar="COMMAND")
    add_scene_commands(commands)
    # --blend is also taken after the command, as the README writes it: both orders work.
    for parser in commands.choices.values():
        parser.add_argument("--blend", dest="blend_after", metavar="FILE", help="the .blend file to open")
    scene.set_defaults(handler=cmd_scene)


def cmd_scene(args: argparse.Namespace) -> int:
    try:
        import bpy
    except ImportError:
        raise KeyframeWorldsError("the bpy module is not installed in this Python (pip install bpy==5.0.1), "
                                  "or run: blender -b FILE.blend -c keyframe_worlds ...") from None
    given = [b for b in (getattr(args, "blend_before", None), getattr(args, "blend_after", None)) if b]
    if not given:
        raise KeyframeWorldsError("scene: give the .blend file with --blend FILE")
    if len(given) == 2 and given[0] != given[1]:
        raise KeyframeWorldsError(f"scene: two different --blend files given ({given[0]}, {given[1]}): give one")
    blend = Path(given[0])
    if not blend.is_file():
        raise KeyframeWorldsError(f".blend file not found: {blend}")
    bpy.ops.wm.open_mainfile(filepath=str(blend.resolve()))
    return run(args)


# --- commands ---------------------------------------------------------------------


def _named_cameras(scene, names: list[str]) -> list:
    cams = []
    for name in names:
        obj = scene.objects.get(name)
        if obj is None or obj.type != "CAMERA":
            have = ", ".join(o.name for o in scene.objects if o.type == "CAMERA") or "none"
            raise KeyframeWorldsError(f"no camera named {name!r} in scene {scene.name!r} (cameras: {have})")
        cams.append(obj)
    return cams


def _camera_choice(args, scene) -> tuple[str, list]:
    """``(source, objects)``: named cameras travel as an explicit "SELECTED" list, without touching the selection."""
    if args.camera:
        return "SELECTED", _named_cameras(scene, args.camera)
    return args.cameras, [o for o in scene.objects if o.select_get()]


def _print_warnings(warnings) -> None:
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)


def cmd_trajectory(args) -> int:
    check_output(args.out, "--out", folder=None)
    import bpy

    from .scene_cameras import export_trajectories

    scene = bpy.context.scene
    source, selected = _camera_choice(args, scene)
    start, end = args.frames if args.frames else (None, None)
    warnings: list[str] = []
    trajectories, written = export_trajectories(scene, source, args.out, args.format, start=start, end=end, step=args.step,
                                                selected=selected, warnings=warnings)
    _print_warnings(warnings)
    print(f"wrote {len(trajectories)} camera(s), {sum(len(t) for t in trajectories)} frame(s) as {args.format}: "
          + ", ".join(str(p) for p in written))
    return 0


def cmd_import_trajectory(args) -> int:
    import bpy

    from .scene_cameras import import_trajectory_file

    target = _save_target(args)
    result = import_trajectory_file(bpy.context.scene, args.trajectory, args.fmt, points=args.points, clip_lens=args.clip_lens)
    _print_warnings(result.warnings)
    bpy.ops.wm.save_as_mainfile(filepath=str(Path(target).resolve()))
    points = f", {len(result.point_cloud.data.points)} points as {result.point_cloud.name!r}" if result.point_cloud is not None else ""
    print(f"imported {len(result.cameras)} camera(s): {', '.join(o.name for o in result.cameras)}{points}; saved {target}")
    return 0


def _save_target(args) -> str:
    """Where to save: ``--save``, else the opened file; checked before the scene changes."""
    import bpy

    target = args.save or bpy.data.filepath
    if not target:
        raise KeyframeWorldsError("the file has never been saved: give --save PATH.blend")
    check_output(target, "--save" if args.save else "the opened file", folder=False)
    return target


def cmd_generate(args) -> int:
    import bpy

    from ..bridge.jobs import TerminalProgress
    from .jobs import JobSettings, prepare_job, run_through_engine, worldstereo_options

    check_output(args.out, "--out", folder=True, create_parents=True)
    scene = bpy.context.scene
    out = Path(args.out).resolve()
    source, selected = _camera_choice(args, scene)
    start, end = args.frames if args.frames else (None, None)
    settings = JobSettings(
        name=args.name or out.name, cameras=source, frame_start=start, frame_end=end, frame_step=args.step,
        reference="FILE" if args.reference else "RENDER", reference_path=args.reference or "", projection=args.projection,
        depth="FILE" if args.depth_file else ("SCENE" if args.depth == "scene" and not args.reference else "NONE"),
        depth_path=args.depth_file or "", prompt=args.prompt, generator=args.generator, seed=args.seed, samples=args.samples,
        mesh_every=args.mesh_every, mesh_stride=args.mesh_stride, seed_object=args.seed_object,
        options=worldstereo_options(args.model_dir, args.variant, args.offload) if args.generator == "worldstereo" else {},
    )
    prepared = prepare_job(scene, settings, out, selected=selected)
    _print_warnings(prepared.warnings)
    print(f"job: {prepared.spec_path} ({sum(len(t) for t in prepared.spec.trajectories)} frames)", flush=True)
    bar = TerminalProgress(stream=sys.stdout)  # one line, redrawn in place at every poll
    bundle = run_through_engine(prepared.spec_path, out / "bundle", python=args.engine_python, device=args.device,
                                on_status=bar.show_status)
    print(f"bundle: {bundle}", flush=True)
    if args.import_result:
        from .importers import import_bundle

        result = import_bundle(scene, bundle)
        _print_warnings(result.warnings)  # the manifest's warnings and the import's own, as `scene import` prints them
        bpy.ops.wm.save_mainfile()
        print(f"imported into {bpy.data.filepath}: collection {result.collection.name!r}")
    else:
        from ..bridge.spec import load_manifest

        _print_warnings(load_manifest(bundle).warnings)
    return 0


def cmd_import(args) -> int:
    import bpy

    from .importers import ImportOptions, import_bundle

    target = _save_target(args)  # before changing the scene
    options = ImportOptions(video=not args.no_video, point_cloud=not args.no_points, meshes=not args.no_meshes,
                            point_maps=args.point_maps, dynamic_masks=args.dynamic_masks, consistency=args.consistency)
    result = import_bundle(bpy.context.scene, args.bundle, options)
    _print_warnings(result.warnings)
    bpy.ops.wm.save_as_mainfile(filepath=str(Path(target).resolve()))
    points = len(result.point_cloud.data.points) if result.point_cloud is not None else 0
    print(f"imported {len(result.cameras)} camera(s), {len(result.meshes)} mesh(es), {points} points into "
          f"collection {result.collection.name!r}; saved {target}")
    return 0


def cmd_farm(args) -> int:
    import bpy

    from .farm import export_farm
    from .jobs import JobSettings, worldstereo_options

    check_output(args.out, "--out", folder=True, create_parents=True)
    scene = bpy.context.scene
    source, selected = _camera_choice(args, scene)
    start, end = args.frames if args.frames else (None, None)
    settings = JobSettings(
        cameras=source, frame_start=start, frame_end=end, frame_step=args.step, reference="RENDER",
        depth="SCENE" if args.depth == "scene" else "NONE", prompt=args.prompt, generator=args.generator, seed=args.seed,
        samples=args.samples, mesh_every=args.mesh_every, mesh_stride=args.mesh_stride,
        # No model folder: the farm machine's (--model-dir, $KEYFRAME_WORLDS_WORLDSTEREO_DIR) is used.
        options=worldstereo_options(None, args.variant, args.offload) if args.generator == "worldstereo" else {},
    )
    export = export_farm(scene, settings, args.out, selected=selected, engine_python=args.engine_python,
                         output_dir=args.output_dir)
    _print_warnings(export.warnings)
    for folder in export.job_dirs:
        print(f"job folder: {folder}")
    print(f"template: {export.template} ({len(export.job_dirs)} task(s)); run it with: openjd run {export.template} "
          f"--step Validate --run-dependencies -p EnginePython=PYTHON -p OutputDir=DIR")
    return 0
