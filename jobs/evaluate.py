"""Evaluate job for `ray job submit --working-dir . -- python jobs/evaluate.py --model M [--model M2]
--data D --out R [--split-file F --split val]`.

Only wires arguments to the library: the same code path as `brainseg evaluate`.
"""

import sys

from brainseg_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
