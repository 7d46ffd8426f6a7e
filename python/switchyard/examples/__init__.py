"""Examples, run as `python -m switchyard.examples.NAME`."""
