"""Train job for `ray job submit --working-dir . -- python jobs/train.py --config train.yaml [key=value ...]`.

Only wires arguments to the library: the same code path as `brainseg train`. Submitting the same
command again with the same `out` resumes from its latest checkpoint.
"""

import sys

from brainseg_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
