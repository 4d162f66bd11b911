"""Depth for the world's geometry: learned depth estimators and their alignment to the point memory."""
