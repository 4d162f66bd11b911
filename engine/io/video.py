"""MP4 (H.264) video through the ffmpeg binary that the ``imageio-ffmpeg`` wheel ships.

Frames are piped to ffmpeg as raw RGB; ffmpeg encodes in its own process, so
encoding overlaps with the engine's work. The file appears under its final
name only when it is complete (temporary name, then rename).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np

from ...bridge.errors import KeyframeWorldsError


def ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg
    except ImportError:
        raise KeyframeWorldsError("writing MP4 needs the imageio-ffmpeg package (pip install imageio-ffmpeg)") from None
    return imageio_ffmpeg.get_ffmpeg_exe()


class Mp4Writer:
    """Write (H, W, 3) uint8 RGB frames to an H.264 MP4 (yuv420p, so it plays everywhere).

    Odd sizes are padded by one pixel on the right/bottom, as yuv420p needs even sizes.
    Use as a context manager; :meth:`close` finishes the file, :meth:`abort` discards it.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: float, crf: int = 18, preset: str = "veryfast",
                 comment: str | None = None):
        self.path = Path(path)
        self.width, self.height = int(width), int(height)
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp-{os.getpid()}{self.path.suffix}")
        self.frames = 0
        command = [
            ffmpeg_exe(), "-y", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}", "-r", f"{fps:.6g}", "-i", "-",
            "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2",
            "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
            "-movflags", "+faststart",
        ]
        if comment:
            command += ["-metadata", f"comment={comment}"]
        command += ["-f", "mp4", str(self.tmp)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE)

    def write(self, frame: np.ndarray) -> None:
        frame = np.asarray(frame)
        if frame.shape != (self.height, self.width, 3) or frame.dtype != np.uint8:
            raise KeyframeWorldsError(f"video frame must be ({self.height}, {self.width}, 3) uint8, got {frame.shape} {frame.dtype}")
        try:
            self._proc.stdin.write(np.ascontiguousarray(frame).tobytes())
        except BrokenPipeError:
            raise KeyframeWorldsError(f"ffmpeg stopped while writing {self.path}: {self._stderr()}") from None
        self.frames += 1

    def _stderr(self) -> str:
        try:
            return self._proc.stderr.read().decode(errors="replace").strip()[-2000:]
        except Exception:
            return ""

    def close(self) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            self._proc.stdin.close()
        code = self._proc.wait()
        if code != 0:
            message = self._stderr()
            self.tmp.unlink(missing_ok=True)
            raise KeyframeWorldsError(f"ffmpeg failed writing {self.path} (exit {code}): {message}")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            self._proc.stdin.close()
        self._proc.kill()
        self._proc.wait()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_mp4(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Decode an MP4 to (N, H, W, 3) uint8 RGB and ffmpeg's metadata (codec, size, fps)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(height, width, 3) for f in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8), meta
