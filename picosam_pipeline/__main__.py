"""``python -m picosam_pipeline``: the same command line as ``picosam-pipeline``."""

from picosam_pipeline.cli import main

if __name__ == "__main__":
    main()
