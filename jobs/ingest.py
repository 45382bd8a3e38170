"""Ingest job for `ray job submit --working-dir . -- python jobs/ingest.py SRC --out DST [key=value ...]`.

Only wires arguments to the library: the same code path as `brainseg ingest`.
"""

import sys

from brainseg_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
