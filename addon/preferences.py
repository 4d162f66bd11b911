"""Add-on preferences: where the engine is, where the models are, which device, memory options."""

from __future__ import annotations

import bpy
from bpy.props import EnumProperty, IntProperty, StringProperty

# The extension's root package (bl_ext.<repo>.keyframe_worlds): preferences are keyed by it.
ADDON_PACKAGE = __package__.rpartition(".")[0]


class KFW_Preferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_PACKAGE

    engine_python: StringProperty(
        name="Engine Python", subtype="FILE_PATH",
        description="The Python of the engine's environment (with torch); Keyframe Worlds starts the engine with it")
    engine_url: StringProperty(
        name="Engine URL", description="Use an engine that is already running (e.g. http://127.0.0.1:8765) instead of starting one")
    engine_token_file: StringProperty(name="Token File", subtype="FILE_PATH",
                                      description="File holding the bearer token of the running engine")
    model_dir: StringProperty(name="Model Folder", subtype="DIR_PATH",
                              description="Folder with worldstereo-camera / -memory / -memory-dmd and the Wan2.1 I2V diffusers folder")
    device: EnumProperty(name="Device", items=[("auto", "Auto", "CUDA when present, else CPU"), ("cuda", "CUDA", ""), ("cpu", "CPU", "")],
                         default="auto")
    offload: EnumProperty(name="Offload", default="none", items=[
        ("none", "None", "Everything on the GPU: fastest, needs the most memory"),
        ("model", "Model", "Models moved to the GPU one at a time"),
        ("sequential", "Block by Block", "Transformer blocks streamed to the GPU: fits a 24 GB card"),
    ])
    # the engine's ATTENTION_BACKENDS (engine/models/names.py; the add-on does not import the engine)
    attention: EnumProperty(name="Attention", default="native", items=[
        ("native", "Native", "PyTorch's scaled-dot-product attention: works everywhere"),
        ("cudnn", "cuDNN", "SDPA's cuDNN kernel (CUDA GPU, bfloat16)"),
        ("flash", "Flash", "flash-attn package (CUDA GPU; install flash-attn in the engine's environment)"),
        ("sage", "Sage", "SageAttention package (CUDA GPU; install sageattention in the engine's environment)"),
    ])
    point_budget: IntProperty(name="Point Budget", default=2_000_000, min=10_000, description="Most points the world memory keeps")
    depth_model: StringProperty(
        name="Depth Model", subtype="DIR_PATH",
        description="A depth network's Hugging Face folder (Depth Anything V2, Depth Pro, Prompt Depth Anything ...): "
                    "gives the reference and every generated frame geometry of its own; empty: none")

    def draw(self, context):
        layout = self.layout
        col = layout.column()
        col.prop(self, "engine_python")
        col.prop(self, "engine_url")
        if self.engine_url:
            col.prop(self, "engine_token_file")
        col.separator()
        col.prop(self, "model_dir")
        row = col.row()
        row.prop(self, "device")
        row.prop(self, "offload")
        col.prop(self, "attention")
        col.prop(self, "point_budget")
        col.prop(self, "depth_model")


def preferences(context=None):
    """This add-on's preferences, or None when it is not installed as an extension (scripts, tests)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_PACKAGE)
    return addon.preferences if addon is not None else None


classes = (KFW_Preferences,)
