"""``keyframe-worlds model check-pipeline``: our WorldStereo pipelines against every intermediate of the
upstream pipelines (../shared/fixtures/worldstereo/pipeline/: camera, memory, memory-dmd on wan_tiny).

Tolerances as the fixture suggests for a float32 CPU re-implementation: 1e-5 relative to each key's
largest reference magnitude; pictures (decoded video, float and uint8 frames) within one grey level.
The fixture is read-only: cases that are altered are copied into tmp_path first."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import VENV_BIN, WORLDSTEREO_FIXTURES
from keyframe_worlds.cli import main
from keyframe_worlds.engine.pipelines.check import (GREY_LEVELS, CaseError, compare_outputs, format_comparison,
                                                    read_case)
from keyframe_worlds.engine.pipelines.components import (clean_prompt, load_companions, vae_decode_keyframes,
                                                         vae_encode_keyframes)

PIPELINE = WORLDSTEREO_FIXTURES / "pipeline"
WAN = PIPELINE / "wan_tiny"
CASES = ("camera", "memory", "memory-dmd")
CLI = str(VENV_BIN / "keyframe-worlds")


def check(case_dir, out, *extra) -> list[str]:
    return ["model", "check-pipeline", str(case_dir), "--wan-dir", str(WAN), "--out", str(out), *map(str, extra)]


def picture_levels(key: str, tensor: torch.Tensor) -> float | None:
    """Grey levels per unit for picture keys (independent of the module's own rule)."""
    if tensor.dtype == torch.uint8:
        return 1.0
    return {"decoded_video": 127.5, "frames_float": 255.0}.get(key.split(".")[-1])


def copy_case(name: str, tmp_path):
    dest = tmp_path / name
    shutil.copytree(PIPELINE / name, dest)
    for path in dest.iterdir():
        path.chmod(0o644)  # the fixture's files are read-only
    dest.chmod(0o755)
    return dest


def edit_case(folder, **changes):
    path = folder / "case.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta), encoding="utf-8")


@pytest.mark.parametrize("case", CASES)
def test_every_reference_key_is_reproduced(case, tmp_path, capsys):
    out = tmp_path / "ours.safetensors"
    reference_path = PIPELINE / case / "outputs.safetensors"
    assert main(check(PIPELINE / case, out, "--compare", reference_path)) == 0
    printed = capsys.readouterr().out
    ours, reference = load_file(out), load_file(reference_path)
    assert set(ours) == set(reference)
    for key, expected in reference.items():
        diff = float((ours[key].double() - expected.double()).abs().max())
        levels = picture_levels(key, expected)
        if levels is not None:
            assert diff * levels <= 1.0, key
        else:
            assert diff <= 1e-5 * float(expected.double().abs().max()), key
        line = next(line for line in printed.splitlines() if line.split()[:1] == [key])
        assert line.split()[-1] == "ok" or line.endswith("ok grey levels"), line
    assert f"{len(reference)} of {len(reference)} keys within tolerance" in printed
    print(printed)


def test_the_decoder_reproduces_the_reference_frames_bit_for_bit():
    """Decoding the reference's own final latents gives its decoded video: what remains in the frames
    comes from the ~1e-6 differences of the latents, amplified by the decoder."""
    vae = load_companions(WAN).vae
    for case in CASES:
        reference = load_file(PIPELINE / case / "outputs.safetensors")
        inputs = load_file(PIPELINE / case / "inputs.safetensors")
        decoded = vae_decode_keyframes(vae, reference["final_latents"])
        assert float((decoded - reference["decoded_video"]).abs().max()) <= 1e-6, case
        encoded = vae_encode_keyframes(vae, inputs["render_video"])
        assert float((encoded - reference["render_latent"]).abs().max()) <= 1e-6, case


def test_a_perturbed_reference_fails_and_names_the_keys(tmp_path):
    """As a subprocess through the console script; two keys off, each beyond its own tolerance."""
    reference = load_file(PIPELINE / "memory" / "outputs.safetensors")
    gen = torch.Generator().manual_seed(0)
    latent = reference["render_latent"]
    reference["render_latent"] = latent + 1e-3 * latent.abs().max() * torch.randn(latent.shape, generator=gen)
    frames = reference["frames_uint8"].clone()
    dark = (frames < 250).nonzero()[0].tolist()
    frames[tuple(dark)] += 3
    reference["frames_uint8"] = frames
    perturbed = tmp_path / "perturbed.safetensors"
    save_file(reference, str(perturbed))
    result = subprocess.run([CLI, *check(PIPELINE / "memory", tmp_path / "ours.safetensors", "--compare", perturbed)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    mismatched = sorted(line.split()[0] for line in result.stdout.splitlines() if "MISMATCH" in line)
    assert mismatched == ["frames_uint8", "render_latent"]
    assert "differ from" in result.stderr and "frames_uint8, render_latent" in result.stderr
    assert f"{len(reference) - 2} of {len(reference)} keys within tolerance" in result.stdout
    assert (tmp_path / "ours.safetensors").is_file()  # written before the comparison


def _expect_error(argv, capsys, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keyframe-worlds: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_a_missing_case_folder_or_file_is_named(tmp_path, capsys):
    _expect_error(check(tmp_path / "nowhere", tmp_path / "o.safetensors"), capsys, "case folder not found",
                  "nowhere")
    case = copy_case("camera", tmp_path)
    (case / "inputs.safetensors").unlink()
    _expect_error(check(case, tmp_path / "o.safetensors"), capsys, "lacks inputs.safetensors")
    case = copy_case("memory", tmp_path)
    _expect_error(check(case, tmp_path / "o.safetensors", "--compare", tmp_path / "none.safetensors"), capsys,
                  "reference outputs file not found", "none.safetensors")
    _expect_error(["model", "check-pipeline", str(case), "--wan-dir", str(tmp_path / "no_wan"), "--out",
                   str(tmp_path / "o.safetensors")], capsys, "Wan2.1 image-to-video folder not found", "no_wan")
    (case / "inputs.safetensors").write_bytes(b"not a safetensors file")
    _expect_error(check(case, tmp_path / "o.safetensors"), capsys, "not a readable safetensors file")


@pytest.mark.parametrize("change,fragments", [
    ({"steps": "two"}, ["field 'steps'", "'two'"]),
    ({"latent_cond_mode": "half_vae"}, ["field 'latent_cond_mode'", "half_vae"]),
    ({"height": 60}, ["field 'height'", "multiple of 16"]),
    ({"model_type": "worldstereo-big"}, ["field 'model_type'", "worldstereo-big"]),
    ({"prompt": None}, ["lacks the field(s) prompt"]),
    ({"height": 48}, ["image_uint8 must be uint8 [48, 96, 3]", "case.json height"]),
    ({"latent_frames": 4}, ["extrinsics must be [4, 4, 4]"]),
    ({"ref_index": [0, 1, 2]}, ["ref_index [0, 1, 2] differs from the inputs' [0, 2, 3]"]),
    ({"model_type": "worldstereo-camera"}, ["reference_video, ref_index, camera_qt, camera_qt_ref",
                                           "takes no reference frames"]),
    ({"diag_keys": {"diag.half_vae.condition": "?"}}, ["unknown setting 'half_vae'"]),
    ({"diag_keys": {"diag.full_vae.latent": "?"}}, ["'diag.full_vae.latent' is not diag.<setting>.<key>"]),
])
def test_a_wrong_case_json_field_is_named(tmp_path, capsys, change, fragments):
    case = copy_case("memory", tmp_path)
    edit_case(case, **change)
    _expect_error(check(case, tmp_path / "o.safetensors"), capsys, *fragments)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_reference_lacking_keys_is_named(tmp_path, capsys):
    reference = load_file(PIPELINE / "memory-dmd" / "outputs.safetensors")
    del reference["condition"], reference["step3.latents_out"]
    partial = tmp_path / "partial.safetensors"
    save_file(reference, str(partial))
    _expect_error(check(PIPELINE / "memory-dmd", tmp_path / "o.safetensors", "--compare", partial), capsys,
                  "lacks 2 key(s) this run produces: condition, step3.latents_out")


@pytest.mark.parametrize("change,diag", [({"latent_cond_mode": "full_vae"}, "full_vae"),
                                         ({"guidance_scale": 1.0}, "guidance_1")])
def test_case_json_settings_drive_the_call(tmp_path, capsys, change, diag):
    """A case whose main call is one of the fixture's extra calls reproduces that call's reference keys."""
    case = copy_case("camera", tmp_path)
    edit_case(case, diag_keys=None, **change)
    out = tmp_path / "ours.safetensors"
    assert main(check(case, out)) == 0
    ours, reference = load_file(out), load_file(PIPELINE / "camera" / "outputs.safetensors")
    assert not any(key.startswith("diag.") for key in ours)
    assert ("negative_prompt_embeds" in ours) == (diag != "guidance_1")
    for key in [k for k in reference if k.startswith(f"diag.{diag}.")]:
        expected, got = reference[key], ours[key.split(".", 2)[2]]
        levels = picture_levels(key, expected)
        diff = float((got.double() - expected.double()).abs().max())
        assert diff * levels <= 1.0 if levels else diff <= 1e-5 * float(expected.double().abs().max()), key
    assert float((ours["final_latents"] - reference["final_latents"]).abs().max()) > 1e-2  # a different call


def test_a_smaller_case_with_other_keyframes_prompt_and_noise(tmp_path, capsys):
    """Nothing is tied to the fixture's sizes: the memory case at half size with 3 keyframes, a new prompt,
    new noise and the other condition mode runs and gives every output at the new shapes."""
    case = copy_case("memory", tmp_path)
    inputs = load_file(PIPELINE / "memory" / "inputs.safetensors")
    keep = [0, 2, 4]
    half = {
        "image_uint8": inputs["image_uint8"][::2, ::2],
        "render_video": inputs["render_video"][:, :, keep, ::2, ::2],
        "render_mask": inputs["render_mask"][:, :, keep, ::2, ::2],
        "camera_embedding": inputs["camera_embedding"][:, :, keep, ::2, ::2],
        "extrinsics": inputs["extrinsics"][keep],
        "intrinsics": inputs["intrinsics"][keep] * torch.tensor([[0.5], [0.5], [1.0]]),
        "noise_latents": torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(7)),
        "reference_video": inputs["reference_video"][:, :, :2, ::2, ::2],
        "ref_index": torch.tensor([0, 1]),
        "camera_qt": inputs["camera_qt"][:, keep],
        "camera_qt_ref": inputs["camera_qt_ref"][:, :2],
    }
    save_file({k: v.contiguous() for k, v in half.items()}, str(case / "inputs.safetensors"))
    prompt = "A  white chair &amp;amp; a red table"
    edit_case(case, height=32, width=48, latent_frames=3, ref_index=[0, 1], prompt=prompt,
              latent_cond_mode="full_vae", diag_keys={"diag.first_frame_only.condition": "other mode"})
    out = tmp_path / "ours.safetensors"
    assert main(check(case, out)) == 0
    ours = load_file(out)
    assert ours["condition"].shape == (1, 20, 3, 4, 6) and ours["reference_latent"].shape == (1, 36, 2, 4, 6)
    assert ours["frames_uint8"].shape == (3, 32, 48, 3) and ours["frames_float"].shape == (3, 3, 32, 48)
    assert sorted(k for k in ours if k.startswith("step")) == sorted(
        f"step{i}.{name}" for i in range(2) for name in ("latents_in", "timestep", "noise_pred_cond",
                                                         "noise_pred_uncond", "noise_pred", "latents_out"))
    assert torch.equal(ours["step0.latents_in"], half["noise_latents"])
    # the other condition mode differs after the first latent frame only
    other = ours["diag.first_frame_only.condition"]
    assert torch.equal(other[:, :, 0], ours["condition"][:, :, 0])
    assert float((other - ours["condition"]).abs().max()) > 1e-3
    tokens = load_companions(WAN).tokenizer([clean_prompt(prompt)], padding="max_length", max_length=512,
                                            return_tensors="pt")
    assert torch.equal(ours["text.input_ids"], tokens.input_ids)
    assert "memory (worldstereo-memory, 32x48, 3 keyframes" in capsys.readouterr().out


def test_compare_outputs_rows():
    ours = {"a": torch.ones(2, 3), "b": torch.zeros(4), "frames_uint8": torch.full((2, 2), 10, dtype=torch.uint8),
            "decoded_video": torch.zeros(1, 3)}
    reference = {"a": torch.ones(2, 3) * 1.001, "b": torch.zeros(5), "frames_uint8": ours["frames_uint8"] + 1,
                 "decoded_video": torch.full((1, 3), 2 / 127.5), "c": torch.ones(1)}
    rows = {r.key: r for r in compare_outputs(ours, reference)}
    assert [r for r in rows] == ["a", "b", "c", "decoded_video", "frames_uint8"]
    assert rows["a"].error == pytest.approx(0.001 / 1.001, rel=1e-3) and not rows["a"].ok  # float32 1.001
    assert not rows["b"].ok and "shape [4], reference [5]" in rows["b"].note
    assert not rows["c"].ok and rows["c"].note == "not produced by this run"
    assert rows["decoded_video"].unit == "grey levels" and rows["decoded_video"].error == pytest.approx(2.0)
    assert rows["frames_uint8"].ok and rows["frames_uint8"].error == 1.0
    assert GREY_LEVELS["frames_float"] == 255.0
    nan = compare_outputs({"a": torch.full((2, 3), float("nan"))}, {"a": torch.ones(2, 3)})
    assert not nan[0].ok
    assert len(format_comparison(list(rows.values()))) == 1 + len(rows)
    with pytest.raises(CaseError, match="lacks 1 key"):
        compare_outputs({"a": torch.ones(1), "z": torch.ones(1)}, {"a": torch.ones(1)})


def test_read_case_of_the_fixture():
    case = read_case(PIPELINE / "memory-dmd")
    assert (case.model_type, case.height, case.width, case.latent_frames, case.steps) == \
        ("worldstereo-memory-dmd", 64, 96, 5, 4)
    assert [(d.setting, d.latent_cond_mode, d.keys) for d in case.diag] == \
        [("full_vae", "full_vae", ("condition", "final_latents"))]
    camera = read_case(PIPELINE / "camera")
    assert {d.setting: d.guidance_scale for d in camera.diag} == {"full_vae": None, "guidance_1": 1.0}
