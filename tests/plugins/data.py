"""Image-folder fixtures built from real handwritten digits (filled in by the fixtures work)."""
