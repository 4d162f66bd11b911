"""Add-on preferences: where the engine is, where the models are (and which are there), which device, memory options."""

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
        draw_models(layout.box())


#: What each model list state word looks like in the preferences.
MODEL_STATE_ICONS = {"complete": "CHECKMARK", "incomplete": "ERROR", "not present": "IMPORT"}


def model_state_word(model: dict) -> str:
    """``complete``, ``incomplete`` or ``not present``: the words ``model list`` prints."""
    return "complete" if model.get("complete") else ("incomplete" if model.get("copies") else "not present")


def draw_models(layout) -> None:
    """The engine's ``model list``: every model with where its copies are, their size and whether each is complete;
    Check (the list again, with the key check) and Download (the engine's ``model download`` in the background)."""
    from . import model_manager

    state = model_manager.state
    header = layout.row()
    header.label(text="Models", icon="FILE_VOLUME")
    busy = model_manager.busy()
    sub = header.row()
    sub.enabled = not busy
    sub.operator("keyframe_worlds.models_check", text="Check", icon="FILE_REFRESH")
    if busy and state.task == "download":
        row = layout.row()
        progress = state.progress
        text = f"{progress.name}: {progress.text}" if progress.text else state.message
        if hasattr(row, "progress"):  # Blender 4.0+
            row.progress(factor=progress.fraction, type="BAR", text=text)
        else:
            row.label(text=f"{text} ({progress.fraction:.0%})")
        row.operator("keyframe_worlds.models_cancel", text="", icon="CANCEL")
    elif busy:
        layout.label(text=state.message, icon="SORTTIME")
    elif state.message:
        layout.label(text=state.message, icon="ERROR" if state.error else "INFO")
    if state.listed_at is None:
        if not busy:
            layout.label(text="Check to list the models in the Model Folder and the Hugging Face cache")
        return
    for model in state.models:
        word = model_state_word(model)
        row = layout.row()
        row.label(text=model["name"], icon=MODEL_STATE_ICONS[word])
        row.label(text=word)
        if word != "complete" and model.get("kind") in ("variant", "backbone"):
            sub = row.row()
            sub.enabled = not busy
            op = sub.operator("keyframe_worlds.models_download", text="Download", icon="IMPORT")
            op.model_name = model["name"]
        for copy in model.get("copies", []):
            line = layout.row()
            line.separator(factor=2.0)
            verdict = "complete" if copy.get("complete") else "incomplete: " + "; ".join(copy.get("problems", [])[:2])
            keys = copy.get("keys")
            if keys is not None:
                verdict += ", keys ok" if keys == "ok" else ", keys: " + keys.splitlines()[0]
            line.label(text=f"{copy['source']}, {copy.get('size', '')}: {verdict}")
            line.label(text=copy["path"])
    for warning in state.warnings:
        layout.label(text=warning, icon="ERROR")


def preferences(context=None):
    """This add-on's preferences, or None when it is not installed as an extension (scripts, tests)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ADDON_PACKAGE)
    return addon.preferences if addon is not None else None


classes = (KFW_Preferences,)
