"""The Keyframe Worlds panel in the 3D View sidebar, and the progress mirrored in the status bar."""

from __future__ import annotations

import bpy

from ..bridge.jobs import ACTIVE_STATES, JobState, describe_progress


def progress_text(props) -> str:
    """``"generate, 12/96 frames, step 2/4, 0:41 left"``: stage, frames done, denoising step and time left."""
    return describe_progress(props.stage or props.state, props.frames_done, props.frames_total, props.step,
                             props.steps, props.seconds_left)


def draw_progress(layout, props) -> None:
    if hasattr(layout, "progress"):
        layout.progress(factor=props.progress, type="BAR", text=progress_text(props))
    else:  # Blender before 4.0 has no progress widget
        layout.label(text=f"{props.progress:.0%} {progress_text(props)}")


class KFW_PT_main(bpy.types.Panel):
    bl_idname = "KFW_PT_main"
    bl_label = "Keyframe Worlds"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Keyframe Worlds"

    def draw(self, context):
        layout = self.layout
        layout.use_property_split = True
        layout.use_property_decorate = False
        props = context.scene.keyframe_worlds
        running = props.state in ACTIVE_STATES

        col = layout.column(align=True)
        col.enabled = not running
        col.prop(props, "cameras")
        col.prop(props, "use_scene_range")
        if not props.use_scene_range:
            col.prop(props, "frame_start")
            col.prop(props, "frame_end")
        col.prop(props, "frame_step")
        col.separator()
        col.prop(props, "reference")
        if props.reference == "FILE":
            col.prop(props, "reference_path")
            col.prop(props, "reference_projection")
        col.prop(props, "depth")
        if props.depth == "FILE":
            col.prop(props, "depth_path")
        row = col.row(align=True)
        row.prop(props, "seed_object")
        row.operator("keyframe_worlds.use_seed_object", text="", icon="EYEDROPPER")
        col.separator()
        col.prop(props, "prompt")
        col.prop(props, "generator")
        if props.generator == "worldstereo":
            col.prop(props, "variant")
        col.prop(props, "seed")
        col.prop(props, "job_name")
        col.prop(props, "output_dir")

        row = layout.row(align=True)
        row.scale_y = 1.3
        if running:
            row.operator("keyframe_worlds.cancel", icon="CANCEL")
        else:
            row.operator("keyframe_worlds.generate", icon="PLAY")
        row = layout.row(align=True)
        row.operator("keyframe_worlds.import_result", icon="IMPORT")
        row.operator("keyframe_worlds.open_folder", icon="FILE_FOLDER")
        row = layout.row(align=True)
        row.enabled = not running
        row.operator("keyframe_worlds.export_farm", icon="NETWORK_DRIVE")
        if props.state:
            draw_progress(layout, props)
            if props.message:
                box = layout.box()
                box.label(text=props.message, icon="ERROR" if props.state == JobState.FAILED else "INFO")


class KFW_PT_trajectories(bpy.types.Panel):
    bl_idname = "KFW_PT_trajectories"
    bl_label = "Trajectory Files"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Keyframe Worlds"
    bl_parent_id = "KFW_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        col = self.layout.column(align=True)
        col.operator("keyframe_worlds.export_trajectory", icon="EXPORT")
        col.operator("keyframe_worlds.import_trajectory", icon="IMPORT")


def draw_status_bar(self, context):
    """Mirror a running job's progress in the status bar."""
    props = getattr(context.scene, "keyframe_worlds", None)
    if props is not None and props.state in ACTIVE_STATES:
        row = self.layout.row()
        row.label(text="Keyframe Worlds")
        draw_progress(row, props)


def register_status_bar() -> None:
    bpy.types.STATUSBAR_HT_header.append(draw_status_bar)


def unregister_status_bar() -> None:
    bpy.types.STATUSBAR_HT_header.remove(draw_status_bar)


classes = (KFW_PT_main, KFW_PT_trajectories)
