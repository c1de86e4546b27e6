"""segmentctl: publish segmentation commands from a terminal or a script, and follow their outcomes."""
