"""Wall time of the default run's first group, for comparing two checkouts on one machine.

    python benchmarks/group_wall.py --tree=. --workdir=/tmp/g0_new
    git archive <rev> | tar -x -C /tmp/old && python benchmarks/group_wall.py --tree=/tmp/old --workdir=/tmp/g0_old

Runs `python -m fips_jax.main --config=configs/smollm2.py` in `--tree` until it logs "group 0
done", stops it there, and prints the group's seconds (groups/g00/stats.json) and its held-out
errors, so that a speed change can be checked for unchanged results too. Run the two checkouts
back to back on an otherwise idle machine: a shared CPU moves these times by up to 3x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default=".", help="checkout to run (its fips_jax package is imported)")
    ap.add_argument("--workdir", required=True, help="emptied first")
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fips_jax.main", "--config=configs/smollm2.py", f"--workdir={os.path.abspath(args.workdir)}"],
        cwd=args.tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu")))
    for line in proc.stdout:
        if "group 0" in line:
            print(line.rstrip(), flush=True)
        if "group 0 done in" in line:
            proc.kill()
            break
    proc.wait()
    stats = json.load(open(os.path.join(args.workdir, "groups", "g00", "stats.json")))
    print(json.dumps({"tree": os.path.abspath(args.tree), "wall_to_group0_s": round(time.time() - t0, 1),
                      "group0_s": round(stats["seconds"], 1),
                      "heldout_rel_error": {k: [round(x, 6) for x in v] for k, v in stats["heldout_rel_error"].items()}}))


if __name__ == "__main__":
    main()
