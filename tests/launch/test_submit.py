"""``longact submit`` against a real Ray cluster on loopback (slow).

One cluster (a head with no GPU, a worker node with 2 logical GPUs and 16 CPUs, 127.0.0.1
only, token authentication) takes:

- a probe whose entrypoint imports ``longact.workers`` and prints where ``longact``
  came from: the staged working_dir, not the editable checkout (package_dir mapping);
- a 2-step GRPO run of the CPU recipe on a tiny model with LongAct on (its default),
  waited for (SUCCEEDED, exit 0), writing its checkpoint, LongAct's state included,
  where ``trainer.default_local_dir`` says;
- a submission with a wrong auth token: refused with exit code 2;
- a run with a model path that does not exist: the driver leaves it to the workers (one
  line), the run FAILED, and ``--wait`` exits 1;
- ``longact-train`` started on the head with no ``recipe=`` and no ``RAY_ADDRESS``,
  joining the cluster as a plain ``ray.init()`` does: it counts the cluster's GPUs, not
  the head's, so it picks the GPU recipe and does not refuse its vLLM rollout.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

LONGACT = str(Path(sys.executable).parent / "longact")
REPO = Path(__file__).resolve().parents[2]


def submit(address: str, env: dict, args: list[str], timeout: int = 660):
    cmd = [LONGACT, "submit", "--address", address, "--wait", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    return proc, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_submit_grpo_cpu_to_existing_cluster(ray_cluster, submit_env, tiny_run):
    # 1. the job imports the shipped package (installed layout), not the checkout
    probe = (
        "import longact, longact.workers, longact.recipes; "
        "print('LONGACT_FROM', longact.__file__); print('WORKERS_FROM', longact.workers.__file__)"
    )
    proc, _ = submit(
        ray_cluster,
        submit_env,
        ["--timeout", "120", "--train-cmd", f"python -c {probe!r}", "--", "recipe=grpo_cpu"],
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    lines = {k: v for k, _, v in (ln.partition(" ") for ln in out.splitlines()) if v}
    for key in ("LONGACT_FROM", "WORKERS_FROM"):
        assert key in lines, out[-4000:]
        assert not lines[key].startswith(str(REPO)), f"{key} {lines[key]} is the checkout"
    assert "/longact/workers/__init__.py" in lines["WORKERS_FROM"]

    # 2. a 2-step training run through verl's trainer on the existing cluster
    run = tiny_run
    overrides = [
        "recipe=grpo_cpu",
        f"data.train_files={run['data']}",
        f"data.val_files={run['data']}",
        "data.max_prompt_length=64",
        f"actor_rollout_ref.model.path={run['model']}",
        f"reward.custom_reward_function.path={run['reward']}",
        "reward.custom_reward_function.name=compute_score",
        "trainer.total_training_steps=2",
        "trainer.save_freq=2",
        f"trainer.default_local_dir={run['ckpt']}",
        "trainer.logger=[console]",
    ]
    # PYTHONHASHSEED is also forwarded by verl's own ray.init: checks the merge is allowed
    proc, elapsed = submit(
        ray_cluster,
        submit_env,
        ["--timeout", "600", "--env", "PYTHONHASHSEED=0", "--", *overrides],
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert "submitted job " in out
    assert "SUCCEEDED" in out
    # the driver runs on the head (no GPU) and validated the run against the cluster
    assert "cluster 127.0.0.1:" in out and "declares 2 GPUs; the run asks for 2" in out
    # longact-train's compact console in the job's log: a line per step, LongAct's mask
    # version in it (LongAct's metrics reached verl's trainer)
    assert re.search(r"^step 2/2 .*mask v\d", out, flags=re.M), out[-8000:]
    assert (run["ckpt"] / "global_step_2").is_dir(), sorted(run["ckpt"].glob("*"))
    # LongAct (on by default) engaged in the cluster's workers: its section reached them
    # through the job's runtime_env, not through the submitting shell's environment
    for rank in (0, 1):  # every rank writes its own state beside its own shard
        actor = run["ckpt"] / "global_step_2" / "actor"
        assert (actor / f"longact_state_rank{rank}.pt").is_file()
    print(f"2-step GRPO job took {elapsed:.0f}s")

    # 3. a wrong auth token: refused before anything is staged or uploaded
    proc, _ = submit(
        ray_cluster, {**submit_env, "RAY_AUTH_TOKEN": "0" * 64}, ["--", *overrides], timeout=60
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refused this machine's auth token" in proc.stderr

    # 4. a failing run: FAILED, exit code 1
    bad = [o for o in overrides if not o.startswith("actor_rollout_ref.model.path=")]
    proc, _ = submit(
        ray_cluster,
        submit_env,
        ["--timeout", "120", "--", *bad, "actor_rollout_ref.model.path=/nonexistent/model"],
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    assert "FAILED" in out
    # on a cluster the driver cannot tell a worker-only path from a wrong one: it says
    # so in one line, and the run then fails on that path where verl loads the model
    notice = "/nonexistent/model: not on the driver's node, left for the workers"
    assert notice in out
    assert "/nonexistent/model" in out.replace(notice, ""), out[-4000:]

    # 5. a driver on the GPU-less head, no recipe= and no RAY_ADDRESS: it finds the cluster
    # as a plain ray.init() would (the file `ray start` left in Ray's temp folder, here
    # reached through RAY_TMPDIR) and follows the cluster's GPUs. Model path missing on
    # purpose: the run stops at the model check, after the platform checks it is about.
    tmp = Path(ray_cluster.temp_dir + "-driver")
    tmp.mkdir()
    (tmp / "ray").symlink_to(ray_cluster.temp_dir)
    env = {k: v for k, v in submit_env.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmp), CUDA_VISIBLE_DEVICES="")
    train = [str(Path(sys.executable).parent / "longact-train"), "trainer.n_gpus_per_node=2"]
    train.append("actor_rollout_ref.model.path=no-such-model-dir")
    try:
        proc = subprocess.run(train, capture_output=True, text=True, env=env, timeout=180, cwd=tmp)
    finally:
        shutil.rmtree(tmp)  # the link only, not the cluster's folder
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert f"the Ray cluster at {ray_cluster.gcs} has 2 GPUs, so recipe=grpo" in err, err
    assert f"cluster {ray_cluster.gcs} declares 2 GPUs; the run asks for 2" in err, err
    assert "needs a GPU" not in err and "no-such-model-dir" in err, err
