"""The job settings the panel shows (stored on the scene) and the live state of a running job."""

from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from ..bridge.panorama import PROJECTIONS
from .choices import GENERATORS

CAMERA_ITEMS = [
    ("SCENE", "Scene Camera", "The scene's active camera"),
    ("SELECTED", "Selected", "Every selected camera"),
    ("ALL", "All Cameras", "Every camera in the scene"),
    ("MARKERS", "Markers", "Cameras bound to timeline markers, in marker order, each over its shot"),
]
REFERENCE_ITEMS = [
    ("RENDER", "Render", "Render the first frame from the scene (Cycles, CPU)"),
    ("FILE", "Image File", "An image you pick"),
]
PROJECTION_ITEMS = [
    ("perspective", "Perspective", "The image is the reference camera's own view"),
    ("equirectangular", "Panorama", "A 2:1 equirectangular panorama around the reference camera (its depth: distance along each ray)"),
]
assert tuple(i[0] for i in PROJECTION_ITEMS) == PROJECTIONS
DEPTH_ITEMS = [
    ("SCENE", "From Scene", "Render the blockout's z-depth with the exact camera: it becomes the world's first memory"),
    ("FILE", "File", "A depth file (.npy z-depth in metres, or .exr)"),
    ("NONE", "None", "No depth: the engine starts from a flat guess"),
]
GENERATOR_ITEMS = [
    ("preview", "Preview", "Geometric preview: the memory rendered along the cameras, holes filled; no weights, no GPU"),
    ("worldstereo", "WorldStereo", "Memory-conditioned video diffusion (needs the model weights and a GPU)"),
]
assert tuple(i[0] for i in GENERATOR_ITEMS) == GENERATORS


class KFW_JobProperties(bpy.types.PropertyGroup):
    cameras: EnumProperty(name="Cameras", items=CAMERA_ITEMS, default="SCENE")
    use_scene_range: BoolProperty(name="Scene Range", default=True, description="Use the scene's frame range")
    frame_start: IntProperty(name="Start", default=1)
    frame_end: IntProperty(name="End", default=250)
    frame_step: IntProperty(name="Step", default=1, min=1, description="Generate every Nth frame")
    reference: EnumProperty(name="Reference", items=REFERENCE_ITEMS, default="RENDER")
    reference_path: StringProperty(name="Image", subtype="FILE_PATH")
    reference_projection: EnumProperty(name="Projection", items=PROJECTION_ITEMS, default="perspective",
                                       description="What the picked image is (a rendered reference says so itself)")
    depth: EnumProperty(name="Depth", items=DEPTH_ITEMS, default="SCENE")
    depth_path: StringProperty(name="Depth File", subtype="FILE_PATH")
    prompt: StringProperty(name="Prompt", description="What the world looks like (used by WorldStereo)")
    generator: EnumProperty(name="Generator", items=GENERATOR_ITEMS, default="preview")
    variant: EnumProperty(name="Variant", default="worldstereo-memory-dmd", items=[
        ("worldstereo-memory-dmd", "Memory DMD (4 steps)", "Spatial-stereo memory, distilled to 4 steps: fastest"),
        ("worldstereo-memory", "Memory", "Spatial-stereo memory, full sampling"),
        ("worldstereo-camera", "Camera", "Camera and point-cloud control only"),
    ])
    seed: IntProperty(name="Seed", default=0, min=0)
    output_dir: StringProperty(name="Output", subtype="DIR_PATH", default="//keyframe_worlds/",
                               description="Job folders are made here (relative to the .blend)")
    job_name: StringProperty(name="Job Name", default="world")
    seed_object: PointerProperty(name="Memory Seed", type=bpy.types.Object,
                                 poll=lambda _self, obj: obj.type in ("MESH", "POINTCLOUD"),
                                 description="A mesh or point cloud (a scan, a previous result's points) whose points, in "
                                             "world space, are the world the generator continues")

    # Live state of the running (or last) job, written only by the main-thread timer.
    state: StringProperty(name="State", default="")  # pending, running, completed, failed, cancelled
    stage: StringProperty(name="Stage", default="")
    progress: FloatProperty(name="Progress", default=0.0, min=0.0, max=1.0, subtype="FACTOR")
    frames_done: IntProperty(default=0)
    frames_total: IntProperty(default=0)
    step: IntProperty(default=0)  # denoising step of the segment in flight; steps 0: not denoising
    steps: IntProperty(default=0)
    seconds_left: FloatProperty(default=-1.0)
    message: StringProperty(default="")
    last_job_dir: StringProperty(default="", subtype="DIR_PATH")

    def to_settings(self, scene: bpy.types.Scene):
        from .jobs import JobSettings

        start, end = (None, None) if self.use_scene_range else (self.frame_start, self.frame_end)
        return JobSettings(
            name=self.job_name, cameras=self.cameras, frame_start=start, frame_end=end, frame_step=self.frame_step,
            reference=self.reference, reference_path=self.reference_path, projection=self.reference_projection,
            depth=self.depth, depth_path=self.depth_path,
            prompt=self.prompt, generator=self.generator, seed=self.seed,
            seed_object=self.seed_object.name if self.seed_object is not None else "",
        )


def register_properties() -> None:
    bpy.types.Scene.keyframe_worlds = PointerProperty(type=KFW_JobProperties)


def unregister_properties() -> None:
    del bpy.types.Scene.keyframe_worlds


classes = (KFW_JobProperties,)
