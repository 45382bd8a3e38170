"""Bulk segmentation job for `ray job submit --working-dir . -- python jobs/segment_archive.py
--model M --input SRC --output DST [--shard i/n] [key=value ...]`.

Only wires arguments to the library: the same code path as `brainseg segment`. Submitting the same
command again continues an unfinished output.
"""

import sys

from brainseg_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["segment", *sys.argv[1:]]))
