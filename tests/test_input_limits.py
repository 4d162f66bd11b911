"""Reference image and depth files against the spec's limits (16-8192 px) and their content: the real CLI
(``validate``, ``run``) and a real ``serve``. Files that declare huge sizes are refused from their header,
without decoding; truncated, header-only, mislabelled and wrongly shaped files are refused by content."""

from __future__ import annotations

import json
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import VENV_BIN
from keyframe_worlds.engine.testing.service import Engine, write_preview_job

CLI = str(VENV_BIN / "keyframe-worlds")
TIMEOUT = 30


def cli(*args):
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit greyscale PNG of side x side that is a few hundred KiB on disk (a decompression bomb)."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    z = zlib.compressobj(9)
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b""))
    return path


def huge_npy(path: Path, shape=(100000, 100000)) -> Path:
    """A .npy header that declares ``shape`` float32 and no data: 128 bytes."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return path


@pytest.fixture
def job(tmp_path):
    return write_preview_job(tmp_path / "job", frames=3)


def set_reference(spec: Path, **ref) -> Path:
    doc = json.loads(spec.read_text())
    doc["reference"].update(ref)
    doc["reference"] = {k: v for k, v in doc["reference"].items() if v is not None}
    spec.write_text(json.dumps(doc))
    return spec


def bad_files(folder: Path) -> dict[str, tuple[str, str, str]]:
    """name -> (reference key, file name, words the one problem line must hold)."""
    from PIL import Image

    ok = (folder / "ref.png").read_bytes()
    (folder / "truncated.png").write_bytes(ok[: len(ok) // 2])
    ihdr = struct.pack(">IIBBBBB", 64, 48, 8, 2, 0, 0, 0)
    (folder / "header_only.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b""))
    (folder / "text.exr").write_text("not an image\n")
    (folder / "text.tif").write_text("not an image\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "tiny.png")
    depth = np.load(folder / "ref_depth.npy")
    np.save(folder / "flat.npy", depth.ravel())
    np.save(folder / "cube.npy", np.stack([depth, depth], -1))
    np.save(folder / "complex.npy", depth.astype(np.complex64))
    np.save(folder / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    good = (folder / "ref_depth.npy").read_bytes()
    (folder / "truncated.npy").write_bytes(good[: len(good) - 100])
    np.save(folder / "other_size.npy", np.ones((24, 32), np.float32))
    return {
        "bomb png": ("image", bomb_png(folder / "bomb.png").name, "20000x20000 px; each side must be 16-8192 px"),
        "truncated png": ("image", "truncated.png", "truncated"),
        "header-only png": ("image", "header_only.png", "cannot read image"),
        "text exr": ("image", "text.exr", "not a readable OpenEXR image"),
        "text tif": ("image", "text.tif", "not a readable TIFF image"),
        "tiny png": ("image", "tiny.png", "8x8 px; each side must be 16-8192 px"),
        "huge npy": ("depth", huge_npy(folder / "huge.npy").name, "each side must be 16-8192 px"),
        "1-D npy": ("depth", "flat.npy", "must be a 2-D array"),
        "3-D npy": ("depth", "cube.npy", "must be a 2-D array"),
        "complex npy": ("depth", "complex.npy", "must hold real numbers"),
        "pickled npy": ("depth", "pickled.npy", "Python objects"),
        "truncated npy": ("depth", "truncated.npy", "is truncated"),
        "text exr depth": ("depth", "text.exr", "not an OpenEXR file"),
        "other size depth": ("depth", "other_size.npy", "give the depth at the image's size"),
    }


def test_validate_refuses_each_bad_reference_file_in_one_line(job):
    for name, (key, file, words) in bad_files(job.parent).items():
        set_reference(job, **{"image": "ref.png", "depth": "ref_depth.npy", key: file})
        out = cli("validate", job)
        assert out.returncode == 1, (name, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr, (name, out.stderr)
        problems = [line for line in out.stderr.splitlines() if line.startswith("  ")]
        assert len(problems) == 1, (name, out.stderr)
        assert problems[0].startswith(f"  reference.{key}: ") and words in problems[0] and file in problems[0], (name, problems)
    set_reference(job, image="ref.png", depth="ref_depth.npy")
    assert cli("validate", job).returncode == 0


@pytest.mark.parametrize("key,make", [("image", bomb_png), ("depth", huge_npy)], ids=["bomb png", "huge npy"])
def test_run_refuses_huge_files_without_a_traceback(job, tmp_path, key, make):
    file = make(job.parent / ("bomb.png" if key == "image" else "huge.npy"))
    set_reference(job, **{key: file.name})
    out = cli("run", job, "--out", tmp_path / "out", "--device", "cpu", "--quiet")
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and file.name in lines[0] and "16-8192 px" in lines[0], out.stderr


def test_run_refuses_content_the_header_check_lets_through(job, tmp_path):
    ok = (job.parent / "ref.png").read_bytes()
    (job.parent / "truncated.png").write_bytes(ok[: len(ok) // 2])
    set_reference(job, image="truncated.png")
    out = cli("run", job, "--out", tmp_path / "out", "--device", "cpu", "--quiet")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "truncated.png" in out.stderr, out.stderr
    assert "reference.image" in out.stderr and "truncated" in out.stderr


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_the_service_refuses_bad_files_with_4xx_and_little_memory(job, tmp_path):
    files = bad_files(job.parent)
    with Engine(tmp_path / "jobs", extra_args=("--device", "cpu", "--allow-path", str(tmp_path))) as eng:
        eng.start()
        headers = {"Authorization": f"Bearer {eng.token}"}
        # one valid submission first, so the server's own imports (Pillow) are counted before measuring
        set_reference(job, image="ref.png", depth="ref_depth.npy")
        doc = json.loads(job.read_text())
        doc["reference"] = {k: str(job.parent / v) for k, v in doc["reference"].items()}
        r = requests.post(f"{eng.url}/v1/jobs", json=doc, headers=headers, timeout=TIMEOUT)
        assert r.status_code == 201, r.text
        before = rss_bytes(eng.process.pid)
        for name, (key, file, words) in files.items():
            doc = json.loads(job.read_text())
            doc["reference"] = {"image": str(job.parent / "ref.png"), "depth": str(job.parent / "ref_depth.npy"),
                                key: str(job.parent / file)}
            r = requests.post(f"{eng.url}/v1/jobs", json=doc, headers=headers, timeout=TIMEOUT)
            assert r.status_code == 400, (name, r.status_code, r.text)
            problems = r.json()["problems"]
            assert [p["path"] for p in problems] == [f"reference.{key}"] and words in problems[0]["reason"], (name, problems)
            # the upload form as well
            upload = {"spec": (None, json.dumps({**doc, "reference": {k: Path(v).name for k, v in doc["reference"].items()}})),
                      "image": (Path(doc["reference"]["image"]).name, Path(doc["reference"]["image"]).read_bytes()),
                      "depth": (Path(doc["reference"]["depth"]).name, Path(doc["reference"]["depth"]).read_bytes())}
            r = requests.post(f"{eng.url}/v1/jobs", files=upload, headers=headers, timeout=TIMEOUT)
            assert r.status_code == 400, (name, r.status_code, r.text)
            assert [p["path"] for p in r.json()["problems"]] == [f"reference.{key}"], (name, r.text)
        grown = rss_bytes(eng.process.pid) - before
        assert grown < 100 * 1024 * 1024, f"the server grew by {grown / 2**20:.0f} MiB"
        listed = requests.get(f"{eng.url}/v1/jobs", headers=headers, timeout=TIMEOUT).json()["jobs"]
        assert len(listed) == 1
