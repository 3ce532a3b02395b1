"""The TPU-pod and SLURM launchers, through --dry-run (nothing is run or submitted)."""

import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(script, *args):
    return subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def test_tpu_pod_dry_run_runs_the_config_on_every_worker():
    proc = _launch("tpu_pod.sh", "--tpu", "fips-v5e-8", "--zone", "us-west4-a", "--project", "proj",
                   "--config", "configs/llama3_8b.py", "--workdir", "gs://bucket/runs/llama3_8b/",
                   "--dry-run", "--", "--config.fips.budget=0.4")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (f"+ git -C {ROOT} archive --format=tar.gz HEAD | "
                        "gcloud storage cp - gs://bucket/runs/llama3_8b/_launch/code.tar.gz")
    # The printed ssh line is valid shell; its --command is what every worker runs.
    argv = shlex.split(lines[1][2:])
    assert argv[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "fips-v5e-8", "--zone=us-west4-a",
                        "--project=proj", "--worker=all"]
    remote = argv[9].removeprefix("--command=")
    assert "gcloud storage cat gs://bucket/runs/llama3_8b/_launch/code.tar.gz | tar xz" in remote
    assert 'gcsfuse --implicit-dirs bucket "$HOME/gcs/bucket"' in remote
    assert ("FIPS_DISTRIBUTED=1 ~/fips_run/venv/bin/python -m launch.run --config=configs/llama3_8b.py "
            '--workdir="$HOME/gcs/bucket/runs/llama3_8b" --config.fips.budget=0.4') in remote
    subprocess.run(["bash", "-n", "-c", remote], check=True)  # parses


def test_tpu_pod_env_tarball_replaces_pip_install():
    proc = _launch("tpu_pod.sh", "--tpu", "t", "--zone", "z", "--config", "configs/gemma2_9b.py",
                   "--workdir", "gs://b/w", "--env", "gs://b/envs/venv.tar.gz", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "gcloud storage cat gs://b/envs/venv.tar.gz | tar xz -C ~/fips_run" in proc.stdout
    assert "pip install" not in proc.stdout and "--project" not in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--tpu", "t", "--zone", "z", "--config", "configs/nope.py", "--workdir", "gs://b/w"],
     "config configs/nope.py not found"),
    (["--tpu", "t", "--zone", "z", "--config", "configs/llama3_8b.py", "--workdir", "/local/w"], "must be a GCS path"),
    (["--tpu", "t", "--zone", "z", "--config", "configs/llama3_8b.py", "--workdir", "gs://b/w", "--", "budget=1"],
     "only --config.KEY=VALUE"),
    (["--tpu", "t"], "Run one fips_jax config"),
])
def test_tpu_pod_bad_arguments(args, message):
    proc = _launch("tpu_pod.sh", *args, "--dry-run")
    assert proc.returncode == 2 and message in proc.stderr


def test_slurm_dry_run_prints_the_batch_script():
    proc = _launch("slurm.sh", "--config", "configs/llama3_8b.py", "--workdir", "/shared/runs/l8b", "--nodes", "2",
                   "--gpus-per-node", "4", "--partition", "gpu", "--venv", "/shared/venv", "--dry-run",
                   "--", "--config.local.epochs=20")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --output=/shared/runs/l8b/_launch/slurm-%j.out",
                 f"cd {ROOT}", "source /shared/venv/bin/activate", "export JAX_LOCAL_DEVICE_IDS=0,1,2,3",
                 "srun --ntasks-per-node=1 --kill-on-bad-exit=1 python -m launch.run --config=configs/llama3_8b.py "
                 "--workdir=/shared/runs/l8b --config.local.epochs=20",
                 "+ sbatch /shared/runs/l8b/_launch/fips-llama3_8b.sbatch"):
        assert line in out.splitlines(), line
    assert "--account" not in out
    script = out.split("\n", 1)[1].rsplit("\n+ sbatch", 1)[0]
    subprocess.run(["bash", "-n", "-c", script], check=True)
    assert not os.path.exists("/shared/runs/l8b")  # a dry run writes nothing


def test_slurm_bad_arguments():
    proc = _launch("slurm.sh", "--config", "configs/llama3_8b.py", "--workdir", "rel/dir", "--dry-run")
    assert proc.returncode == 2 and "absolute path" in proc.stderr
    proc = _launch("slurm.sh", "--config", "configs/llama3_8b.py", "--workdir", "/w", "--nodes", "0", "--dry-run")
    assert proc.returncode == 2 and "positive integers" in proc.stderr


def test_run_module_is_the_cli_on_one_process(tmp_path):
    # The CLI's own flag parsing: a bad override fails before any stage runs.
    proc = subprocess.run(["python", "-m", "launch.run", "--config=configs/tiny_llama.py", f"--workdir={tmp_path}",
                           "--config.nope=1"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2 and "invalid config override --config.nope=1" in proc.stderr
    assert "jax.distributed" not in proc.stdout  # one process: no initialisation
