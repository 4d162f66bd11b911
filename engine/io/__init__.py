"""File formats the engine writes and reads: OpenEXR depth, MP4 video, PNG frames (PLY lives in bridge/ply.py)."""
