"""python -m fips_jax.main --config=configs/smollm2.py --workdir=/tmp/fips [--config.fips.budget=0.4]"""

from __future__ import annotations

import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Stages, checkpoints and outputs; rerun with the same "
                               "workdir to resume.")
flags.mark_flags_as_required(["config", "workdir"])

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", flush=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from fips_jax import pipeline  # pylint: disable=import-outside-toplevel  (keep --help fast)

    logging.set_verbosity(logging.WARNING)  # progress goes to stdout; library INFO chatter does not

    try:
        metrics = pipeline.run(_CONFIG.value.to_dict(), _WORKDIR.value, log=log)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    log(f"wrote {_WORKDIR.value}/metrics.json, report.md, per_block.png and compressed/ "
        f"({metrics['timings_s']['total_this_process']:.0f}s)")


def parse_flags(argv):
    """absl parsing, with bad config overrides (unknown key, wrong type) as one-line errors."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections reports an unknown key as AttributeError("'key'\nDid you mean ...").
        detail = str(e.args[0] if e.args else e).encode().decode("unicode_escape")
        detail = " ".join(detail.replace("'", "").split())
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        print(f"error: invalid config override {' '.join(bad)}: {detail}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
