"""The add-on's attention preference: the engine's vocabulary, and it reaches the job's options (real bpy)."""

from __future__ import annotations


def test_the_attention_preference_offers_the_engines_backends_and_travels_with_the_job(blank_blend, tmp_path):
    bpy = blank_blend
    import keyframe_worlds
    from keyframe_worlds.addon.jobs import worldstereo_options
    from keyframe_worlds.addon.preferences import KFW_Preferences
    from keyframe_worlds.engine.generators.options import check_options
    from keyframe_worlds.engine.models.names import ATTENTION_BACKENDS, DEFAULT_ATTENTION_BACKEND

    keyframe_worlds.register()
    try:
        prop = KFW_Preferences.bl_rna.properties["attention"]
        assert tuple(item.identifier for item in prop.enum_items) == ATTENTION_BACKENDS
        assert prop.default == DEFAULT_ATTENTION_BACKEND
    finally:
        keyframe_worlds.unregister()
    (tmp_path / "worldstereo-memory").mkdir()
    (tmp_path / "worldstereo-memory" / "config.json").write_text("{}")
    for backend in ATTENTION_BACKENDS:
        options = worldstereo_options(str(tmp_path), "worldstereo-memory", "model", backend)
        assert options["attention"] == backend and options["offload"] == "model"
        assert check_options("worldstereo", options) == []  # what the add-on sends, the engine accepts
    assert "attention" not in worldstereo_options(str(tmp_path), "worldstereo-memory")  # the engine's default
