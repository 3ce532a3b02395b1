"""Entry point for multi-process runs: `jax.distributed.initialize()` when the environment says
this process is one of several (SLURM tasks, TPU slice workers, JAX_COORDINATOR_ADDRESS), then
the usual CLI with the same flags:

    python -m launch.run --config=configs/llama3_8b.py --workdir=/gcs/bucket/runs/llama3_8b

On one process it is exactly `python -m fips_jax.main`.
"""

from __future__ import annotations

from absl import app

from fips_jax import sharding


def main() -> None:
    # Before the CLI imports the pipeline: no device may be touched before initialisation.
    sharding.initialize_distributed()
    from fips_jax import main as cli  # pylint: disable=import-outside-toplevel

    app.run(cli.main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    main()
