"""The Keyframe Worlds panel in the 3D View sidebar."""

from __future__ import annotations

import bpy


class KFW_PT_main(bpy.types.Panel):
    bl_idname = "KFW_PT_main"
    bl_label = "Keyframe Worlds"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Keyframe Worlds"

    def draw(self, context):
        layout = self.layout
        scene = context.scene
        col = layout.column(align=True)
        col.label(text=f"Camera: {scene.camera.name if scene.camera else 'none'}")
        col.label(text=f"Frames {scene.frame_start}-{scene.frame_end}")
        col = layout.column(align=True)
        col.operator("keyframe_worlds.export_trajectory", icon="EXPORT")
        col.operator("keyframe_worlds.import_trajectory", icon="IMPORT")


classes = (KFW_PT_main,)
