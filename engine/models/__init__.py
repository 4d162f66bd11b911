"""The WorldStereo networks, one file per network."""
