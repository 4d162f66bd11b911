"""The files of the result bundle, read back with independent readers: EXR (OpenEXR), MP4 (ffmpeg), PNG (Pillow)."""

import subprocess

import numpy as np
import pytest

from keyframe_worlds.bridge.errors import KeyframeWorldsError
from keyframe_worlds.engine.io.exr import read_depth_exr, read_exr, write_depth_exr, write_exr
from keyframe_worlds.engine.io.images import read_rgb, write_png
from keyframe_worlds.engine.io.video import Mp4Writer, ffmpeg_exe, read_mp4


def depth_map(h=37, w=53, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    return (1.0 + 0.05 * x + 0.02 * y + rng.normal(0, 1e-3, (h, w))).astype(np.float32)


@pytest.mark.parametrize("compression", ["zip", "none"])
def test_exr_we_write_reads_back_exactly_with_the_openexr_library(tmp_path, compression):
    import OpenEXR

    depth = depth_map()
    path = tmp_path / "d.exr"
    write_exr(path, {"Z": depth, "A": depth * 2}, compression=compression)
    with OpenEXR.File(str(path)) as f:
        channels = f.channels()
        assert set(channels) == {"Z", "A"}
        assert channels["Z"].pixels.dtype == np.float32
        np.testing.assert_array_equal(channels["Z"].pixels, depth)
        np.testing.assert_array_equal(channels["A"].pixels, depth * 2)
        want = {"zip": "ZIP_COMPRESSION", "none": "NO_COMPRESSION"}[compression]
        assert str(f.header()["compression"]).upper().endswith(want)
    np.testing.assert_array_equal(read_exr(path)["Z"], depth)


@pytest.mark.parametrize("compression", ["ZIP_COMPRESSION", "ZIPS_COMPRESSION", "RLE_COMPRESSION", "NO_COMPRESSION"])
def test_we_read_exr_written_by_the_openexr_library(tmp_path, compression):
    import OpenEXR

    depth = depth_map(seed=1)
    path = tmp_path / "o.exr"
    header = {"compression": getattr(OpenEXR, compression), "type": OpenEXR.scanlineimage}
    with OpenEXR.File(header, {"Z": depth, "R": depth.astype(np.float16)}) as f:
        f.write(str(path))
    np.testing.assert_array_equal(read_depth_exr(path), depth)
    np.testing.assert_array_equal(read_exr(path)["R"], depth.astype(np.float16).astype(np.float32))


def test_exr_errors_name_the_problem(tmp_path):
    import OpenEXR

    bad = tmp_path / "bad.exr"
    bad.write_bytes(b"definitely not")
    with pytest.raises(KeyframeWorldsError, match="not an OpenEXR"):
        read_exr(bad)
    piz = tmp_path / "piz.exr"
    with OpenEXR.File({"compression": OpenEXR.PIZ_COMPRESSION, "type": OpenEXR.scanlineimage}, {"Z": depth_map()}) as f:
        f.write(str(piz))
    with pytest.raises(KeyframeWorldsError, match="PIZ"):
        read_exr(piz)
    write_depth_exr(tmp_path / "ok.exr", depth_map())
    assert read_depth_exr(tmp_path / "ok.exr").shape == (37, 53)


def test_mp4_is_h264_with_every_frame_close_to_the_input(tmp_path):
    h, w = 48, 66
    y, x = np.mgrid[0:h, 0:w]
    frames = []
    for i in range(12):
        f = np.stack([128 + 100 * np.sin(x / 9 + i / 3), 128 + 100 * np.cos(y / 7), np.full(x.shape, 40.0 + 10 * i)], -1)
        frames.append(f.round().astype(np.uint8))
    path = tmp_path / "v.mp4"
    with Mp4Writer(path, w, h, fps=24.0) as video:
        for f in frames:
            video.write(f)
    decoded, meta = read_mp4(path)
    assert decoded.shape == (12, h, w, 3)
    assert meta["codec"] == "h264"
    assert meta["fps"] == pytest.approx(24.0)
    for got, want in zip(decoded, frames):
        mse = np.mean((got.astype(float) - want.astype(float)) ** 2)
        assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 35  # PSNR in dB
    probe = subprocess.run([ffmpeg_exe(), "-i", str(path)], capture_output=True, text=True)
    assert "h264" in probe.stderr and "yuv420p" in probe.stderr
    assert not list(tmp_path.glob(".*tmp*"))


def test_odd_sized_video_is_padded_and_a_failed_write_leaves_no_file(tmp_path):
    with Mp4Writer(tmp_path / "odd.mp4", 33, 21, fps=12) as video:
        for _ in range(3):
            video.write(np.full((21, 33, 3), 128, np.uint8))
    decoded, _ = read_mp4(tmp_path / "odd.mp4")
    assert decoded.shape == (3, 22, 34, 3)
    with pytest.raises(KeyframeWorldsError, match="video frame"):
        with Mp4Writer(tmp_path / "bad.mp4", 32, 20, fps=12) as video:
            video.write(np.zeros((10, 10, 3), np.uint8))
    assert not (tmp_path / "bad.mp4").exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_png_round_trip(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    write_png(tmp_path / "f.png", rgb)
    np.testing.assert_array_equal(read_rgb(tmp_path / "f.png"), rgb)
    with pytest.raises(KeyframeWorldsError, match="image not found"):
        read_rgb(tmp_path / "missing.png")
