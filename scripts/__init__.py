"""Command-line entry points that sit beside the package: run them as `python -m scripts.NAME`."""
