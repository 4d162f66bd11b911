"""Learned depth networks loaded from local Hugging Face folders: tiny real transformers models, CPU, fixed seeds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from keyframe_worlds.bridge.errors import KeyframeWorldsError  # noqa: E402
from keyframe_worlds.bridge.jobs import Progress  # noqa: E402
from keyframe_worlds.engine.world.depth import DepthEstimator  # noqa: E402
from keyframe_worlds.engine.io.checkpoint_files import CheckpointError, refuse_pickles  # noqa: E402
from keyframe_worlds.engine.world.render import RenderOutput  # noqa: E402
from keyframe_worlds.engine.world.learned_depth import (  # noqa: E402
    METRIC_DEPTH,
    RELATIVE_DEPTH,
    RELATIVE_DISPARITY,
    load_depth_estimator,
    resolve_device,
    resolve_dtype,
)

T, H, W = 3, 30, 50  # not multiples of the networks' patch sizes: the output must come back at this size


def _dinov2(image_size: int, patch_size: int = 14, layers: int = 4, out_indices=(1, 2, 3, 4)):
    return transformers.Dinov2Config(
        image_size=image_size, patch_size=patch_size, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, out_indices=list(out_indices) if out_indices else None, reshape_hidden_states=False,
        apply_layernorm=True,
    )


def _randomise(model, seed: int, std: float = 0.3):
    """Random weights large enough that the tiny network's output varies over the image (the
    default initialisation gives an almost constant, near-zero map after the final ReLU)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model.eval()


def _depth_anything(kind: str, seed: int):
    config = transformers.DepthAnythingConfig(
        backbone_config=_dinov2(28), reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
        head_hidden_size=4, patch_size=14, depth_estimation_type=kind, max_depth=20.0 if kind == "metric" else None,
    )
    processor = transformers.DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=True,
                                               ensure_multiple_of=14)
    return _randomise(transformers.DepthAnythingForDepthEstimation(config), seed), processor


def _prompt_depth_anything(seed: int):
    config = transformers.PromptDepthAnythingConfig(
        backbone_config=_dinov2(28), reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
        head_hidden_size=4, patch_size=14, depth_estimation_type="metric",
    )
    processor = transformers.PromptDepthAnythingImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=True,
                                                               ensure_multiple_of=14)
    return _randomise(transformers.PromptDepthAnythingForDepthEstimation(config), seed), processor


def _dpt(seed: int):
    config = transformers.DPTConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32, patch_size=8,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
        reassemble_factors=[4, 2, 1, 0.5],
    )
    processor = transformers.DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)
    return _randomise(transformers.DPTForDepthEstimation(config), seed, std=0.2), processor


def _glpn(seed: int):
    config = transformers.GLPNConfig(
        num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], hidden_sizes=[8, 8, 8, 8],
        patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], num_attention_heads=[1, 1, 1, 1], mlp_ratios=[2, 2, 2, 2],
        decoder_hidden_size=8, max_depth=10,
    )
    processor = transformers.GLPNImageProcessor(size_divisor=32)
    return _randomise(transformers.GLPNForDepthEstimation(config), seed), processor


def _depth_pro(seed: int):
    sub = dict(model_type="dinov2", image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=32)
    config = transformers.DepthProConfig(
        fusion_hidden_size=16, patch_size=32, intermediate_hook_ids=[1, 0], intermediate_feature_dims=[8, 8],
        scaled_images_ratios=[0.5, 1.0], scaled_images_overlap_ratios=[0.0, 0.25], scaled_images_feature_dims=[8, 8],
        merge_padding_value=1, use_fov_model=True, num_fov_head_layers=1,
        image_model_config=dict(sub), patch_model_config=dict(sub), fov_model_config=dict(sub),
    )
    model = _randomise(transformers.DepthProForDepthEstimation(config), seed, std=0.1)
    with torch.no_grad():
        # a positive canonical inverse depth and a physical field of view (about 50 degrees), so the
        # conversion to metres is not lost in the post-processing's clamps
        model.head.layers[4].weight.mul_(0.1)
        model.head.layers[4].bias.fill_(0.2)
        model.fov_model.head.layers[2].bias.fill_(50.0)
    return model


def _save(folder, model, processor):
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def _frames(seed: int = 0, height: int = H, width: int = W) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (T, 6, 10, 3), generator=generator, dtype=torch.uint8)
    # smooth-ish images (upsampled noise), so resizing inside the processor keeps their content
    smooth = torch.nn.functional.interpolate(base.permute(0, 3, 1, 2).float(), size=(height, width), mode="bilinear")
    return smooth.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _render(depth: torch.Tensor, visible: torch.Tensor) -> RenderOutput:
    index = torch.where(visible, torch.arange(visible.numel()).reshape(visible.shape), -1)
    rgb = torch.zeros(*depth.shape, 3, dtype=torch.uint8)
    return RenderOutput(rgb, torch.where(visible, depth, 0.0), visible, index)


def _by_hand(model, processor, rgb: torch.Tensor, **extra) -> torch.Tensor:
    """transformers' own pipeline on the in-memory model: processor, forward, post-processing."""
    inputs = processor(images=list(rgb.numpy()), return_tensors="pt", **extra)
    with torch.no_grad():
        outputs = model(**inputs)
    results = processor.post_process_depth_estimation(outputs, target_sizes=[(H, W)] * rgb.shape[0])
    return torch.stack([r["predicted_depth"] for r in results])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("depth_models")
    made = {}
    for name, (model, processor) in {
        "da_relative": _depth_anything("relative", seed=1),
        "da_relative_other": _depth_anything("relative", seed=2),
        "da_metric": _depth_anything("metric", seed=3),
        "prompt": _prompt_depth_anything(seed=4),
        "dpt": _dpt(seed=5),
        "glpn": _glpn(seed=6),
    }.items():
        made[name] = (_save(root / name, model, processor), model, processor)
    return made


def test_depth_anything_relative_is_disparity_at_the_frames_size_from_the_given_folder(folders):
    folder, model, processor = folders["da_relative"]
    estimator = load_depth_estimator(folder, batch_size=2)
    assert isinstance(estimator, DepthEstimator)
    assert estimator.info.kind == RELATIVE_DISPARITY and estimator.info.model_type == "depth_anything"
    assert estimator.info.device == "cpu" and estimator.info.dtype == "float32"
    rgb = _frames()
    prediction = estimator.predict(rgb)
    assert prediction.kind == RELATIVE_DISPARITY
    assert prediction.values.shape == (T, H, W) and prediction.values.dtype == torch.float32
    assert torch.isfinite(prediction.values).all()
    assert float(prediction.values.std()) > 0  # a map, not a constant
    # exactly what transformers' own pipeline gives with the model that was saved
    # (to float32 rounding: batches of other sizes take other kernels)
    tolerance = dict(rtol=1e-4, atol=1e-4 * float(prediction.values.abs().max()))
    torch.testing.assert_close(prediction.values, _by_hand(model, processor, rgb), **tolerance)
    # batching (2 + 1 frames) changes nothing
    one_by_one = load_depth_estimator(folder, batch_size=1).predict(rgb).values
    torch.testing.assert_close(prediction.values, one_by_one, **tolerance)
    # other weights in another folder: another output, so the folder's weights are what ran
    other = load_depth_estimator(folders["da_relative_other"][0]).predict(rgb).values
    assert (other - prediction.values).abs().max() > 1e-3 * prediction.values.abs().max()
    # relative depth is no metric DepthEstimate on its own
    with pytest.raises(KeyframeWorldsError, match="AlignedLearnedDepth"):
        estimator.estimate(rgb, None)


def test_depth_anything_metric_gives_metres_within_its_range(folders):
    folder, model, processor = folders["da_metric"]
    estimator = load_depth_estimator(folder)
    assert estimator.info.kind == METRIC_DEPTH
    rgb = _frames(1)
    prediction = estimator.predict(rgb)
    assert prediction.kind == METRIC_DEPTH and prediction.values.shape == (T, H, W)
    torch.testing.assert_close(prediction.values, _by_hand(model, processor, rgb), rtol=1e-4, atol=1e-5)
    # sigmoid x max_depth (the bicubic resampling back to the frame size may overshoot a little)
    assert 0.0 < float(prediction.values.median()) < 20.0
    estimate = estimator.estimate(rgb, None)
    assert estimate.depth_z_m.shape == (T, H, W) and bool((estimate.depth_z_m > 0).all())
    assert bool(((estimate.confidence >= 0) & (estimate.confidence <= 1)).all())


def test_prompt_depth_anything_is_prompted_by_the_memory_render(folders):
    folder, model, processor = folders["prompt"]
    estimator = load_depth_estimator(folder)
    assert estimator.info.uses_prompt and estimator.info.kind == METRIC_DEPTH
    rgb = _frames(2)
    generator = torch.Generator().manual_seed(7)
    depth = 1.0 + 4.0 * torch.rand(T, H, W, generator=generator)
    depth[:, 0, 0], depth[:, 0, 1] = 1.0, 5.0  # the same range in both prompts below
    visible = torch.ones(T, H, W, dtype=torch.bool)
    first = estimator.predict(rgb, _render(depth, visible))
    assert first.kind == METRIC_DEPTH and first.values.shape == (T, H, W)
    assert first.prompted.tolist() == [True] * T
    # the prompt in metres reaches the network: the same image with the prompt mirrored
    # left-right (same range, other layout) predicts another depth map
    mirrored = estimator.predict(rgb, _render(depth.flip(-1), visible))
    assert (mirrored.values - first.values).abs().max() > 1e-4
    # and is what transformers' own call with that prompt in metres gives
    by_hand = _by_hand(model, processor, rgb, prompt_depth=list(depth.numpy()), prompt_scale_to_meter=1.0)
    torch.testing.assert_close(first.values, by_hand, rtol=1e-4, atol=1e-5)
    # the prediction lives in the prompt's range (the network denormalises by its min and max)
    assert 0.5 < float(first.values.median()) < 6.0
    # a frame that sees nothing borrows a neighbour's prompt; no prompt at all: relative depth
    visible[1] = False
    borrowed = estimator.predict(rgb, _render(depth, visible))
    assert borrowed.prompted.tolist() == [True, False, True]
    unprompted = estimator.predict(rgb, None)
    assert unprompted.kind == RELATIVE_DEPTH and unprompted.prompted.tolist() == [False] * T


def test_dpt_and_glpn_load_the_same_way(folders):
    rgb = _frames(3)
    dpt = load_depth_estimator(folders["dpt"][0])
    assert dpt.info.kind == RELATIVE_DISPARITY and dpt.info.architecture == "DPTForDepthEstimation"
    values = dpt.predict(rgb).values
    assert values.shape == (T, H, W) and torch.isfinite(values).all()
    torch.testing.assert_close(values, _by_hand(*folders["dpt"][1:], rgb), rtol=1e-4, atol=1e-6)
    glpn = load_depth_estimator(folders["glpn"][0])
    assert glpn.info.kind == METRIC_DEPTH
    rgb = _frames(3, 70, 100)  # GLPN's processor rounds down to multiples of 32
    values = glpn.predict(rgb).values
    assert values.shape == (T, 70, 100) and torch.isfinite(values).all() and float(values.median()) > 0


def test_a_kind_can_be_given_and_a_wrong_one_is_refused(folders):
    folder = folders["dpt"][0]
    assert load_depth_estimator(folder, kind=METRIC_DEPTH).info.kind == METRIC_DEPTH
    with pytest.raises(KeyframeWorldsError, match="unknown depth kind"):
        load_depth_estimator(folder, kind="inverse")


def test_depth_pro_reports_a_field_of_view_and_uses_the_cameras_focal(tmp_path):
    model = _depth_pro(seed=8)
    processor = transformers.DepthProImageProcessor(size={"height": 64, "width": 64})
    estimator = load_depth_estimator(_save(tmp_path / "depth_pro", model, processor))
    assert estimator.info.kind == METRIC_DEPTH
    rgb = _frames(4)
    own = estimator.predict(rgb)
    assert own.kind == METRIC_DEPTH and own.values.shape == (T, H, W) and bool((own.values > 0).all())
    assert own.field_of_view_deg.shape == (T,) and torch.isfinite(own.field_of_view_deg).all()
    # without a camera, the focal comes from the predicted field of view
    expected = 0.5 * W / torch.tan(0.5 * torch.deg2rad(own.field_of_view_deg))
    torch.testing.assert_close(own.focal_length_px, expected, rtol=1e-4, atol=1e-4)
    fx = torch.tensor([30.0, 40.0, 60.0])
    intrinsics = torch.stack([fx, fx, torch.full((T,), W / 2), torch.full((T,), H / 2)], 1)
    known = estimator.predict(rgb, intrinsics=intrinsics)
    torch.testing.assert_close(known.focal_length_px, fx, rtol=1e-4, atol=1e-4)
    # metric depth is proportional to the focal length it was computed with
    ratio = (known.values / own.values).flatten(1).median(dim=1).values
    torch.testing.assert_close(ratio, fx / own.focal_length_px, rtol=2e-3, atol=0)


def test_depth_pro_without_torchvision_is_one_clear_line(tmp_path):
    """Where torchvision is missing (an engine environment set up by hand), loading Depth Pro says so in one line.
    The engine's own environment has torchvision, so a fresh interpreter hides it before transformers looks."""
    folder = tmp_path / "depth_pro"
    _depth_pro(seed=8).save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "DepthProImageProcessor", "size": {"height": 64, "width": 64}}))
    script = (
        "import sys\n"
        "sys.modules['torchvision'] = None  # import torchvision now fails; find_spec says it is absent\n"
        "from keyframe_worlds.engine.io.checkpoint_files import CheckpointError\n"
        "from keyframe_worlds.engine.world.learned_depth import load_depth_estimator\n"
        "try:\n"
        f"    load_depth_estimator({str(folder)!r})\n"
        "except CheckpointError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, (done.stdout, done.stderr)
    message = done.stdout.strip()
    assert "needs torchvision" in message and "\n" not in message, message


def test_a_depthless_reference_lifted_by_depth_pro_reports_its_focal_beside_the_cameras(tmp_path):
    from keyframe_worlds.bridge.spec import load_job
    from keyframe_worlds.engine.run.runner import run_job
    from keyframe_worlds.engine.testing.service import write_preview_job

    folder = _save(tmp_path / "depth_pro", _depth_pro(seed=8), transformers.DepthProImageProcessor(size={"height": 64, "width": 64}))
    spec_path = write_preview_job(tmp_path / "job", frames=4, segment_length=4, width=64, height=48, with_depth=False)
    doc = json.loads(spec_path.read_text())
    doc["geometry"] = {"depth_model": str(folder)}
    spec_path.write_text(json.dumps(doc))

    class Lines(Progress):
        def __init__(self):
            super().__init__()
            self.lines, self.warnings = [], []

        def log(self, message):
            self.lines.append(message)

        def warn(self, message):
            self.warnings.append(message)

    progress = Lines()
    manifest = run_job(load_job(spec_path), tmp_path / "job" / "out", progress=progress)
    assert progress.warnings == [] and manifest.warnings == ()  # not a flat board
    focal = [line for line in progress.lines if line.startswith("reference focal: the depth network estimates")]
    assert len(focal) == 1 and "the camera has" in focal[0], progress.lines


# -- refusals ----------------------------------------------------------------------------------


def test_a_pickle_only_folder_is_refused_with_the_checkpoint_loaders_message(folders, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    source = folders["da_relative"][0]
    for name in ("config.json", "preprocessor_config.json"):
        (folder / name).write_text((source / name).read_text())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not opened")  # never unpickled, so any bytes do
    with pytest.raises(CheckpointError) as err:
        load_depth_estimator(folder)
    with pytest.raises(CheckpointError) as same:
        refuse_pickles(folder, "depth model folder")
    assert str(err.value) == str(same.value) and "pytorch_model.bin" in str(err.value)


def test_missing_folder_non_depth_model_and_unreadable_configs_are_one_line_each(folders, tmp_path):
    cases = {}
    cases["missing"] = (tmp_path / "nowhere", "not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["no config"] = (empty, "no config.json")
    bert = tmp_path / "bert"
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8) \
        .save_pretrained(bert)
    cases["not depth"] = (bert, "'bert' model, not a depth estimator")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    cases["bad json"] = (broken, "not readable JSON")
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    config = json.loads((folders["da_relative"][0] / "config.json").read_text())
    config["depth_estimation_type"] = "sideways"
    (bogus / "config.json").write_text(json.dumps(config))
    cases["config transformers refuses"] = (bogus, "cannot load the config")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((folders["da_relative"][0] / "config.json").read_text())
    cases["no weights"] = (weightless, "no weights")
    no_processor = tmp_path / "no_processor"
    folders["da_relative"][1].save_pretrained(no_processor, safe_serialization=True)
    cases["no processor"] = (no_processor, "no preprocessor_config.json")
    for label, (folder, message) in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_depth_estimator(folder)
        assert message in str(err.value), label
        assert "\n" not in str(err.value), label


def test_weights_that_do_not_cover_the_network_are_refused(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    folders["da_relative"][1].save_pretrained(folder, safe_serialization=True)
    folders["da_relative"][2].save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    dropped = sorted(k for k in weights if k.startswith("head."))[0]
    del weights[dropped]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="1 missing") as err:
        load_depth_estimator(folder)
    assert dropped in str(err.value)


# -- device and dtype --------------------------------------------------------------------------


def test_auto_device_and_dtype_and_a_half_precision_load(folders):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(KeyframeWorldsError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    estimator = load_depth_estimator(folders["da_relative"][0], device="cpu", dtype="bfloat16")
    assert estimator.info.dtype == "bfloat16"
    assert {p.dtype for p in estimator.model.parameters()} == {torch.bfloat16}
    rgb = _frames()
    half = estimator.predict(rgb).values
    full = load_depth_estimator(folders["da_relative"][0], device="cpu").predict(rgb).values
    assert half.dtype == torch.float32
    # bfloat16 keeps ~3 significant digits
    assert float((half - full).abs().max()) < 0.05 * float(full.abs().max())


def test_frames_must_be_uint8_t_h_w_3(folders):
    estimator = load_depth_estimator(folders["da_relative"][0])
    with pytest.raises(KeyframeWorldsError, match=r"\(T, H, W, 3\) uint8"):
        estimator.predict(torch.zeros(H, W, 3, dtype=torch.uint8))
    with pytest.raises(KeyframeWorldsError, match="intrinsics"):
        estimator.predict(_frames(), intrinsics=torch.ones(2, 4))


def test_a_loaded_network_aligned_to_a_memory_render_gives_a_valid_depth_estimate(folders):
    from keyframe_worlds.engine.world.depth_alignment import AlignedLearnedDepth

    rgb = _frames(5)
    generator = torch.Generator().manual_seed(11)
    depth = 2.0 + 3.0 * torch.rand(T, H, W, generator=generator)
    visible = torch.zeros(T, H, W, dtype=torch.bool)
    visible[:, :, : W // 2] = True  # the right half is a disocclusion
    for name in ("da_relative", "da_metric", "prompt"):
        aligned = AlignedLearnedDepth(load_depth_estimator(folders[name][0]))
        estimate = aligned.estimate(rgb, _render(depth, visible))
        assert estimate.depth_z_m.shape == (T, H, W) and estimate.confidence.shape == (T, H, W), name
        assert bool((estimate.depth_z_m > 0).all()) and bool(torch.isfinite(estimate.depth_z_m).all()), name
        assert bool(((estimate.confidence >= 0) & (estimate.confidence <= 1)).all()), name
        assert len(aligned.last_fits) == T and all(f.support == H * W // 2 for f in aligned.last_fits), name
