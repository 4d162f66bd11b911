"""Operators: read properties, call a plain function, report the project's error type."""

from __future__ import annotations

from pathlib import Path

import bpy
from bpy.props import BoolProperty, EnumProperty, IntProperty, StringProperty
from bpy_extras.io_utils import ExportHelper, ImportHelper

from ..bridge.errors import KeyframeWorldsError

FORMAT_ITEMS = [
    ("keyframe-worlds", "Keyframe Worlds (.json)", "Lossless: every camera, frame number, fps, intrinsics, lens and image path"),
    ("worldstereo", "WorldStereo camera.json", "Upstream WorldStereo: world-to-camera OpenCV extrinsics and pixel intrinsics"),
    ("nerfstudio", "nerfstudio transforms.json", "Camera-to-world in the OpenGL camera frame, per-frame intrinsics"),
    ("colmap", "COLMAP text (folder)", "cameras.txt, images.txt and points3D.txt in the chosen folder"),
    ("colmap-binary", "COLMAP binary (folder)", "cameras.bin, images.bin and points3D.bin in the chosen folder"),
    ("pano_bank", "WorldStereo pano_bank", "Upstream's panorama bank: cameras.json keyed 0000..., pinhole cameras"),
]

CAMERA_SOURCE_ITEMS = [
    ("SCENE", "Scene Camera", "The scene's active camera"),
    ("SELECTED", "Selected Cameras", "Every selected camera object"),
    ("ALL", "All Cameras", "Every camera in the scene"),
    ("MARKERS", "Marker Cameras", "Cameras bound to timeline markers, in marker order, each over its shot"),
]


class KFW_OT_export_trajectory(bpy.types.Operator, ExportHelper):
    """Write the evaluated animation of cameras as a trajectory file (with the lens distortion and image paths an
    import kept on each camera)"""

    bl_idname = "keyframe_worlds.export_trajectory"
    bl_label = "Export Camera Trajectory"
    bl_options = {"REGISTER"}

    filename_ext = ".json"
    filter_glob: StringProperty(default="*.json", options={"HIDDEN"})
    format: EnumProperty(name="Format", items=FORMAT_ITEMS, default="keyframe-worlds")
    cameras: EnumProperty(name="Cameras", items=CAMERA_SOURCE_ITEMS, default="SCENE")
    frame_step: IntProperty(name="Frame Step", default=1, min=1)

    def execute(self, context):
        from .scene_cameras import export_trajectories

        warnings: list[str] = []
        try:
            path = self.filepath
            if self.format in ("colmap", "colmap-binary") and path.endswith(".json"):
                path = path[: -len(".json")]
            trajectories, written = export_trajectories(context.scene, self.cameras, path, self.format, step=self.frame_step,
                                                        selected=context.selected_objects, warnings=warnings)
        except KeyframeWorldsError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        for warning in warnings:
            self.report({"WARNING"}, warning)
        frames = sum(len(t) for t in trajectories)
        self.report({"INFO"}, f"Wrote {len(trajectories)} camera(s), {frames} frame(s) to {written[0]}")
        return {"FINISHED"}


class KFW_OT_import_trajectory(bpy.types.Operator, ImportHelper):
    """Create keyframed cameras from a trajectory file; each keeps its lens distortion and image paths"""

    bl_idname = "keyframe_worlds.import_trajectory"
    bl_label = "Import Camera Trajectory"
    bl_options = {"REGISTER", "UNDO"}

    filter_glob: StringProperty(default="*.json;*.txt;*.bin", options={"HIDDEN"})
    format: EnumProperty(name="Format", items=[("AUTO", "Detect", "Detect the format from the file")] + FORMAT_ITEMS, default="AUTO")
    points: BoolProperty(name="Points", default=False,
                         description="A COLMAP model's points3D as a point cloud object, in the cameras' world")
    clip_lens: BoolProperty(name="Lens on Active Clip", default=False,
                            description="Set the lens distortion on the scene's active movie clip's tracking camera "
                                        "(where Blender's tracking models can hold it)")

    def execute(self, context):
        from .scene_cameras import import_trajectory_file

        try:
            result = import_trajectory_file(context.scene, self.filepath, None if self.format == "AUTO" else self.format,
                                            points=self.points, clip_lens=self.clip_lens)
        except KeyframeWorldsError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        for warning in result.warnings:
            self.report({"WARNING"}, warning)
        points = f", {len(result.point_cloud.data.points)} points" if result.point_cloud is not None else ""
        self.report({"INFO"}, f"Created {len(result.cameras)} camera(s): {', '.join(o.name for o in result.cameras)}{points}")
        return {"FINISHED"}


classes = (KFW_OT_export_trajectory, KFW_OT_import_trajectory)


class KFW_OT_import_result(bpy.types.Operator):
    """Import a result bundle: video on the cameras, depth meshes and the point cloud, in one collection per job"""

    bl_idname = "keyframe_worlds.import_result"
    bl_label = "Import Result"
    bl_options = {"REGISTER", "UNDO"}

    directory: StringProperty(name="Bundle Folder", subtype="DIR_PATH")
    # The 4D outputs, none by default (shown in the file browser's side panel).
    point_maps: BoolProperty(name="Point Maps", default=False,
                             description="Each camera's per-frame world XYZ (EXR) as a hidden background image sequence")
    dynamic_masks: BoolProperty(name="Dynamic Masks", default=False,
                                description="Each camera's per-frame dynamic / inconsistency mask as a hidden background "
                                            "image sequence (white: the video contradicts the geometry)")
    consistency: BoolProperty(name="Consistency on Points", default=False,
                              description="The point cloud's material shows its consistency: points the video contradicts turn red")

    def invoke(self, context, event):
        last = context.scene.keyframe_worlds.last_job_dir if hasattr(context.scene, "keyframe_worlds") else ""
        if last and not self.directory:
            self.directory = str(Path(bpy.path.abspath(last)) / "bundle")
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        from .importers import ImportOptions, import_bundle

        try:
            options = ImportOptions(point_maps=self.point_maps, dynamic_masks=self.dynamic_masks, consistency=self.consistency)
            result = import_bundle(context.scene, bpy.path.abspath(self.directory), options)
        except KeyframeWorldsError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        for warning in result.warnings:
            self.report({"WARNING"}, warning)
        self.report({"INFO"}, f"Imported into collection {result.collection.name!r}")
        return {"FINISHED"}


class KFW_OT_open_folder(bpy.types.Operator):
    """Open the last job's folder in the system's file browser"""

    bl_idname = "keyframe_worlds.open_folder"
    bl_label = "Open Folder"

    def execute(self, context):
        props = context.scene.keyframe_worlds
        folder = bpy.path.abspath(props.last_job_dir or props.output_dir)
        if not folder or not Path(folder).is_dir():
            self.report({"ERROR"}, f"folder not found: {folder or '(no job yet)'}")
            return {"CANCELLED"}
        bpy.ops.wm.path_open(filepath=folder)
        return {"FINISHED"}


class KFW_OT_use_seed_object(bpy.types.Operator):
    """Use the active mesh or point cloud as the memory's seed: its points are the world the generator continues"""

    bl_idname = "keyframe_worlds.use_seed_object"
    bl_label = "Use Selected as Memory Seed"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        from .seed import SEED_OBJECT_TYPES

        obj = context.active_object
        if obj is None or obj.type not in SEED_OBJECT_TYPES:
            what = "nothing is active" if obj is None else f"{obj.name!r} is a {obj.type.lower()}"
            self.report({"ERROR"}, f"select a mesh or point cloud to seed the memory with ({what})")
            return {"CANCELLED"}
        context.scene.keyframe_worlds.seed_object = obj
        self.report({"INFO"}, f"The memory is seeded with {obj.name!r}")
        return {"FINISHED"}


classes = classes + (KFW_OT_import_result, KFW_OT_open_folder, KFW_OT_use_seed_object)


def _engine_python_and_models(context, model_dir: str):
    """The engine Python and the model folder: the operator's own ``model_dir``, else the preferences'."""
    from .jobs import engine_python
    from .preferences import preferences

    prefs = preferences(context)
    folder = model_dir or (prefs.model_dir if prefs is not None else "")
    return engine_python(prefs.engine_python if prefs is not None else None), (bpy.path.abspath(folder) if folder else "")


class KFW_OT_models_check(bpy.types.Operator):
    """List the models in the Model Folder and the Hugging Face cache, with sizes, and check each is complete and its
    keys fit the network (the engine's model list --keys, in the background)"""

    bl_idname = "keyframe_worlds.models_check"
    bl_label = "Check Models"

    model_dir: StringProperty(name="Model Folder", subtype="DIR_PATH", options={"SKIP_SAVE"},
                              description="Empty: the preferences' Model Folder")
    keys: BoolProperty(name="Key Check", default=True, options={"SKIP_SAVE"},
                       description="Also check every complete variant's keys against the network (headers only)")

    def execute(self, context):
        from . import model_manager

        try:
            python, folder = _engine_python_and_models(context, self.model_dir)
            model_manager.start_list(python, folder or None, keys=self.keys)
        except KeyframeWorldsError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        return {"FINISHED"}


class KFW_OT_models_download(bpy.types.Operator):
    """Download this model into the Model Folder (the engine's model download, in the background; it resumes if stopped)"""

    bl_idname = "keyframe_worlds.models_download"
    bl_label = "Download Model"

    model_name: StringProperty(name="Model", description="A model download name (worldstereo-memory-dmd ...) or a "
                                                  "Hugging Face repository id")
    model_dir: StringProperty(name="Model Folder", subtype="DIR_PATH", options={"SKIP_SAVE"},
                              description="Empty: the preferences' Model Folder")

    def execute(self, context):
        from . import model_manager

        if not self.model_name.strip():
            self.report({"ERROR"}, "no model named to download")
            return {"CANCELLED"}
        try:
            python, folder = _engine_python_and_models(context, self.model_dir)
            model_manager.start_download(python, [self.model_name.strip()], folder)
        except KeyframeWorldsError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        except OSError as exc:
            self.report({"ERROR"}, f"cannot create the model folder: {exc.strerror or exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"downloading {self.model_name} into {folder}")
        return {"FINISHED"}


class KFW_OT_models_cancel(bpy.types.Operator):
    """Stop the running model download (running it again resumes it)"""

    bl_idname = "keyframe_worlds.models_cancel"
    bl_label = "Stop Download"

    def execute(self, context):
        from . import model_manager

        if not model_manager.busy():
            self.report({"ERROR"}, "no model download is running")
            return {"CANCELLED"}
        model_manager.cancel()
        return {"FINISHED"}


classes = classes + (KFW_OT_models_check, KFW_OT_models_download, KFW_OT_models_cancel)


class KFW_OT_export_farm(bpy.types.Operator):
    """Write one self-contained job folder per shot (marker-bound camera, or each chosen camera) and an Open Job
    Description template that runs them on a render farm"""

    bl_idname = "keyframe_worlds.export_farm"
    bl_label = "Export for Farm"
    bl_options = {"REGISTER"}

    directory: StringProperty(name="Farm Folder", subtype="DIR_PATH")

    def invoke(self, context, event):
        if not self.directory:
            self.directory = str(Path(bpy.path.abspath(context.scene.keyframe_worlds.output_dir)) / "farm")
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def execute(self, context):
        from dataclasses import replace

        from .farm import export_farm
        from .jobs import worldstereo_options
        from .preferences import preferences

        props = context.scene.keyframe_worlds
        prefs = preferences(context)
        settings = props.to_settings(context.scene)
        if settings.generator == "worldstereo":  # the variant only: the farm machine has its own model folder
            settings = replace(settings, options=worldstereo_options(None, props.variant, prefs.offload if prefs else "none"))
        if prefs is not None:
            settings = replace(settings, point_budget=prefs.point_budget)
        try:
            export = export_farm(context.scene, settings, self.directory, selected=context.selected_objects)
        except KeyframeWorldsError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        for warning in export.warnings:
            self.report({"WARNING"}, warning)
        self.report({"INFO"}, f"Wrote {len(export.job_dirs)} job folder(s) and {export.template}")
        return {"FINISHED"}


classes = classes + (KFW_OT_export_farm,)
