"""The service at the scale of a large marketplace, each figure against its baseline in the same
run: `python -m bench.scale --help`."""
