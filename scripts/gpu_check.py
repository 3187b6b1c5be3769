"""One GPU check of LongAct's cluster path: the GRPO recipe, a tiny model, one GPU.

Run by ``scripts/gpu_check.sh`` (which installs what the machine lacks from wheels
brought along). Every run goes through ``longact-train recipe=grpo`` on CUDA:

1. a tiny Qwen3 model and needle-in-a-haystack data, written here (nothing downloaded);
2. ``on``: LongAct with what the GPU recipes use and CPU tests cannot show: FSDP2 (bf16
   compute), gradient checkpointing, parameter and optimizer offload, the async refresh
   (every 2 optimizer steps), the profile-first calibration pass under verl's fused
   kernels; the ``hf`` rollout; a checkpoint after every step. It is killed (SIGKILL,
   whole process group) once step 2's checkpoint is written, then resumed to step 4.
   Checked bit for bit:
   - at every step, step 1 included, the W_Q / W_K rows outside the mask in force at
     that step are unchanged (async keeps no update without a mask);
   - every saved optimizer state holds zero moments in the rows its saved masks freeze
     (the in-flight refresh is installed before verl writes the optimizer), and after
     the resume the frozen rows still do not move (LongAct's edits of offloaded state
     wait for verl's non-blocking copies);
   - mask versions: in force 1, 1, 2, 2 (calibration, then the refresh sent at step 2),
     saved 1, 2, 2, 3; the resumed run starts at step 3;
   - between steps LongAct holds no GPU memory (``longact/held_device_bytes``);
3. ``snapshot``: 2 steps with RMSprop, an optimizer outside AdamW/Adam/SGD (LongAct's
   snapshot path), parameter offload: frozen rows bit-identical, no GPU memory held
   between steps;
4. ``off``: LongAct off, the same 4 steps as ``on``, no checkpoints;
5. the actor-update time with LongAct on vs off (``timing_s/update_actor``, median over
   steps 2-4), and ``bench`` ``mask_apply`` on the device;
6. ``lora``: the ``on`` settings over a LoRA adapter (rank 8, all linear layers), 2 steps,
   the adapter synced to the rollout unmerged, an entropy bonus (the untrained model's
   rewards are all 0, so the policy gradient is too). Checked at each step from the adapter
   LongAct saves (gathered from the shards): q/k ``lora_B`` is exactly zero in every row
   whose channel no mask selected so far, some rows trained, and merged into the base
   with peft, W_Q/W_K differ from the base only in selected rows.

``--device cpu`` runs the same flow with the CPU recipe (``grpo_cpu``, 2 ranks), to
check the script without a GPU (``make gpu-rehearsal``). One JSON report goes to stdout
and to ``OUT/gpu_check.json``, written on failure too. SIGTERM (``timeout``) kills the
training run's process group before exiting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from longact.train.ckpt_read import (
    QK_SUFFIXES,
    hf_weights,
    lora_qk_rows,
    lora_weights,
    qk_optimizer_state,
    qk_slot,
    saved_masks,
    step_dir,
)
from longact.train.logs import parse_step_metrics

STEPS = 4
KILL_AFTER = 2
IN_FORCE = [1, 1, 2, 2]  # calibration's v1 at step 1; the refresh sent at step 2 from 3
SAVED = [1, 2, 2, 3]  # a checkpoint installs the refresh in flight before it is written


class CheckFailed(Exception):
    """A check of the report failed (the message says which)."""


def overrides(device: str, model: Path, data: dict[str, Path], ckpt: Path) -> list[str]:
    common = [
        f"actor_rollout_ref.model.path={model}",
        f"data.train_files={data['train']}",
        f"data.val_files={data['val']}",
        "data.max_prompt_length=320",
        "data.max_response_length=8",
        "data.train_batch_size=8",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload=true",
        f"trainer.default_local_dir={ckpt}",
        "trainer.logger=[console]",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.project_name=longact_gpu_check",
        "longact.ratio=0.3",
        "longact.refresh_interval=2",
        "longact.refresh_async=true",
        "longact.calibration.enable=true",
        f"longact.calibration.data={data['val']}",
        "longact.calibration.num_samples=8",
        "longact.calibration.batch_size=4",
    ]
    if device == "cpu":
        return ["recipe=grpo_cpu", *common, "trainer.n_gpus_per_node=2"]
    return [
        "recipe=grpo",
        *common,
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
        # no flash-attn on the check machine: sdpa on padded batches
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=false",
        "actor_rollout_ref.model.use_fused_kernels=true",
        "actor_rollout_ref.model.enable_gradient_checkpointing=true",
        "actor_rollout_ref.actor.use_torch_compile=false",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=false",
        "actor_rollout_ref.actor.fsdp_config.param_offload=true",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=8192",
        "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu=8192",
        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=8192",
        "actor_rollout_ref.rollout.name=hf",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.checkpoint_engine.backend=naive",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "reward.num_workers=1",
        "data.dataloader_num_workers=0",
    ]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)  # a fresh local cluster
    e.update(PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", WANDB_MODE="offline")
    e["LONGACT_CONSOLE"] = "full"  # verl's metric lines, read below
    if torch.cuda.is_available():
        e["LONGACT_HF_ROLLOUT_GPU"] = "1"  # the hf rollout generates on the GPU too
    e.setdefault("PYTHONWARNINGS", "ignore")
    return e


RUNNING: list[subprocess.Popen] = []  # killed by the SIGTERM handler


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _on_sigterm(signum, frame):
    for proc in RUNNING:
        _kill(proc)
    raise SystemExit(f"gpu_check: stopped by signal {signum}; its training runs were killed")


def train(args: list[str], log: Path, kill_after: int | None = None, ckpt: Path | None = None):
    """Run longact-train in a process group of its own; with ``kill_after``, SIGKILL the
    group once that step's checkpoint and metrics line are out. Returns the log text."""
    cmd = [shutil.which("longact-train") or "longact-train", *args]
    with open(log, "w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), start_new_session=True
        )
        RUNNING.append(proc)
        try:
            while proc.poll() is None:
                if kill_after is not None and _latest(ckpt) >= kill_after:
                    if f"step:{kill_after} - " in log.read_text(errors="replace"):
                        _kill(proc)
                        return log.read_text(errors="replace")
                time.sleep(0.5)
        finally:
            _kill(proc)
            RUNNING.remove(proc)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise CheckFailed(f"{' '.join(cmd[:2])} exited {proc.returncode}:\n{text[-6000:]}")
    return text


def _latest(ckpt: Path | None) -> int:
    f = ckpt / "latest_checkpointed_iteration.txt" if ckpt else None
    return int(f.read_text().strip()) if f and f.is_file() else 0


def check_rows(model: Path, ckpt: Path, in_force: list[int], steps: int) -> None:
    """At every step the rows outside the mask in force that step are bit-identical and
    some inside moved. The mask of version v is read from a checkpoint that saved it."""
    by_version = {}
    for step in range(1, steps + 1):
        masks, _ = saved_masks(ckpt, step)
        by_version.setdefault(masks.version, masks)
    prev = _base_weights(model)
    for step, version in enumerate(in_force, start=1):
        if version not in by_version:
            raise CheckFailed(f"step {step}: mask v{version} is in no checkpoint")
        masks = by_version[version]
        cur = hf_weights(ckpt, step)
        seen = 0
        for name, w0 in prev.items():
            if not name.endswith(QK_SUFFIXES):
                continue
            seen += 1
            keep = masks[qk_slot(name)]
            if not torch.equal(w0[~keep], cur[name][~keep]):
                raise CheckFailed(f"step {step}: a frozen row of {name} moved (mask v{version})")
            if not (w0[keep] != cur[name][keep]).any():
                raise CheckFailed(f"step {step}: no trainable row of {name} moved")
        if seen != len(masks.keys()):
            raise CheckFailed(f"step {step}: {seen} W_Q/W_K weights for {len(masks.keys())} masks")
        prev = cur


def _base_weights(model: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model / "model.safetensors"))


def check_saved_moments(model: Path, ckpt: Path, steps: int, world: int) -> int:
    """Every checkpoint's optimizer state is zero in the rows its masks freeze. Returns
    how many (tensor, step) pairs were checked."""
    checked = 0
    for step in range(1, steps + 1):
        masks, _ = saved_masks(ckpt, step)
        for (name, key), value in qk_optimizer_state(ckpt, step, model, world).items():
            if key == "step":
                continue
            frozen = ~masks[qk_slot(name)]
            if value[frozen].count_nonzero():
                raise CheckFailed(
                    f"step {step}: {key} of {name} is nonzero in rows mask v{masks.version} "
                    "freezes (the optimizer was saved before the masks it is saved with)"
                )
            checked += 1
    if not checked:
        raise CheckFailed("no W_Q/W_K optimizer state found in the checkpoints")
    return checked


def check_lora(model: Path, ckpt: Path, steps: int) -> int:
    """Per step of a LoRA run: q/k lora_B zero in rows no saved mask so far selected, not
    zero everywhere, and the merged W_Q/W_K equal to the base outside selected rows.
    Returns how many lora_B tensors were checked."""
    from transformers import AutoConfig

    from longact.core.arch import get_adapter, param_mask
    from longact.core.lora import ADAPTER_DIR, load_with_adapter

    config = AutoConfig.from_pretrained(model)
    adapter = get_adapter(config)
    layout = adapter.layout(config)
    base = _base_weights(model)
    ever, checked = None, 0
    for step in range(1, steps + 1):
        masks, _ = saved_masks(ckpt, step)
        ever = {k: masks[k] if ever is None else ever[k] | masks[k] for k in layout}
        weights = lora_weights(ckpt, step)
        qk = lora_qk_rows(weights, config)
        covered = {key for rows in qk.values() for key, _ in rows}
        if covered != set(layout.keys()):
            raise CheckFailed(f"step {step}: the adapter's q/k lora_B cover {sorted(covered)}")
        for name, rows in qk.items():
            b = weights[name]
            never = ~param_mask(rows, ever, b.shape[0])
            if b[never].count_nonzero():
                raise CheckFailed(f"step {step}: {name} is non-zero in a row never selected")
            if not b.count_nonzero():
                raise CheckFailed(f"step {step}: {name} did not train")
            checked += 1
        merged = load_with_adapter(step_dir(ckpt, step) / ADAPTER_DIR, model, merge=True)
        merged = merged.state_dict()
        for key in layout:
            name = adapter.param_name(*key)
            rows = dict(adapter.param_rows(adapter.match_param(name), layout, base[name].shape[0]))
            changed = (merged[name][rows[key]].float() != base[name][rows[key]].float()).any(1)
            if changed[~ever[key]].any():
                raise CheckFailed(f"step {step}: merged {name} changed in a row never selected")
    return checked


def series(metrics: dict, key: str, steps) -> list[float]:
    missing = [s for s in steps if key not in metrics.get(s, {})]
    if missing:
        raise CheckFailed(f"{key} missing at steps {missing}")
    return [metrics[s][key] for s in steps]


def bench_mask_apply(device: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.run", "--only", "mask_apply", "--out", str(out)]
    cmd += ["--device", device, "--budget-s", "90"] + (["--quick"] if device == "cpu" else [])
    root = Path(__file__).resolve().parents[1]  # bench/ is the checkout's, not installed
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=root)
    if proc.returncode != 0:
        raise CheckFailed(f"bench mask_apply exited {proc.returncode}: {proc.stderr[-2000:]}")
    figures = json.loads((out / "results.json").read_text())["figures"]
    fig = next((f for f in figures if f["name"] == "mask_apply"), None)
    if fig is None or not fig.get("rows"):
        raise CheckFailed(f"bench mask_apply wrote no rows ({out / 'results.json'})")
    return {row[0]: row[1:] for row in fig["rows"]}  # part -> measured, scaled, vs AdamW


def run_checks(a: argparse.Namespace, out: Path, report: dict) -> None:
    from longact.data.tasks import make_dataset, write_parquet
    from longact.models.tiny import write_tiny_model

    world = 2 if a.device == "cpu" else 1
    model = write_tiny_model(out / "model", size="xs", seed=0)
    rows = make_dataset("niah_single", model, length=256, n=72, seed=0)
    data = {
        "train": write_parquet(rows[:64], out / "train.parquet"),
        "val": write_parquet(rows[64:], out / "val.parquet"),
    }
    times = report["seconds"]

    # 2. on: async + offload + calibration under fused kernels, killed and resumed
    t = time.time()
    ckpt = out / "ckpt_on"
    on_args = [
        *overrides(a.device, model, data, ckpt),
        f"trainer.total_training_steps={STEPS}",
        "trainer.save_freq=1",
        "trainer.resume_mode=auto",
    ]
    first = train(on_args, out / "on_first.log", kill_after=KILL_AFTER, ckpt=ckpt)
    resumed = train(on_args, out / "on_resume.log")
    on = {**parse_step_metrics(first), **parse_step_metrics(resumed)}
    report["resumed_steps"] = sorted(parse_step_metrics(resumed))
    in_force = [int(v) for v in series(on, "actor/longact/mask_version", range(1, STEPS + 1))]
    report["mask_versions_in_force"] = in_force
    report["mask_versions_saved"] = [saved_masks(ckpt, s)[0].version for s in range(1, 5)]
    report["held_device_bytes_on"] = series(on, "actor/longact/held_device_bytes", range(2, 5))
    check_rows(model, ckpt, in_force, STEPS)
    report["frozen_rows_bit_identical"] = True
    report["optimizer_states_checked"] = check_saved_moments(model, ckpt, STEPS, world)
    times["on"] = time.time() - t

    # 3. snapshot path: RMSprop, 2 steps
    t = time.time()
    snap = out / "ckpt_snapshot"
    snap_log = train(
        [
            *overrides(a.device, model, data, snap),
            "actor_rollout_ref.actor.optim.optimizer=RMSprop",
            "trainer.total_training_steps=2",
            "trainer.save_freq=1",
        ],
        out / "snapshot.log",
    )
    sm = parse_step_metrics(snap_log)
    report["snapshot_path"] = series(sm, "actor/longact/exact_path_snapshot", (1, 2))
    snap_force = [int(v) for v in series(sm, "actor/longact/mask_version", (1, 2))]
    check_rows(model, snap, snap_force, 2)
    report["held_device_bytes_snapshot"] = series(sm, "actor/longact/held_device_bytes", (2,))
    times["snapshot"] = time.time() - t

    # 4. off
    t = time.time()
    off_log = train(
        [
            *overrides(a.device, model, data, out / "ckpt_off"),
            f"trainer.total_training_steps={STEPS}",
            "trainer.save_freq=-1",
            "longact.enable=false",
        ],
        out / "off.log",
    )
    off = parse_step_metrics(off_log)
    times["off"] = time.time() - t

    # 5. timing and bench
    on_s = statistics.median(series(on, "timing_s/update_actor", range(2, STEPS + 1)))
    off_s = statistics.median(series(off, "timing_s/update_actor", range(2, STEPS + 1)))
    report.update(update_actor_s_on=on_s, update_actor_s_off=off_s)
    report["update_actor_ratio_on_off"] = on_s / off_s
    t = time.time()
    report["bench_mask_apply"] = bench_mask_apply(a.device, out / "bench")
    times["bench"] = time.time() - t

    problems = report["problems"]
    if in_force != IN_FORCE:
        problems.append(f"mask versions in force {in_force}, expected {IN_FORCE}")
    if report["mask_versions_saved"] != SAVED:
        problems.append(f"saved mask versions {report['mask_versions_saved']}, expected {SAVED}")
    if report["resumed_steps"] != list(range(KILL_AFTER + 1, STEPS + 1)):
        problems.append(f"the resumed run logged steps {report['resumed_steps']}")
    if report["snapshot_path"] != [1.0, 1.0]:
        problems.append(f"RMSprop did not take the snapshot path: {report['snapshot_path']}")
    held = report["held_device_bytes_on"] + report["held_device_bytes_snapshot"]
    if any(held):
        problems.append(f"LongAct held GPU memory between steps: {held} bytes")

    # 6. LoRA (last: a failure here leaves every figure above in the report)
    t = time.time()
    lora_ckpt = out / "ckpt_lora"
    lora_args = [o for o in overrides(a.device, model, data, lora_ckpt) if "save_contents" not in o]
    lora_log = train(
        [
            *lora_args,
            "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra]",
            "actor_rollout_ref.model.lora_rank=8",
            "actor_rollout_ref.model.lora_alpha=16",
            "actor_rollout_ref.model.target_modules=all-linear",
            # an untrained model scores 0 everywhere: no policy gradient, and lora_B starts
            # at 0, so weight decay moves nothing; the entropy bonus gives every row a gradient
            "actor_rollout_ref.actor.entropy_coeff=0.01",
            "trainer.total_training_steps=2",
            "trainer.save_freq=1",
        ],
        out / "lora.log",
    )
    lm = parse_step_metrics(lora_log)
    report["lora_mask_versions"] = series(lm, "actor/longact/mask_version", (1, 2))
    report["lora_rollout_probs_diff_max"] = series(lm, "training/rollout_probs_diff_max", (1, 2))
    report["lora_b_tensors_checked"] = check_lora(model, lora_ckpt, 2)
    times["lora"] = time.time() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--install-s", type=float, default=0.0, help="gpu_check.sh's install time")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole check's budget")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check: no CUDA device is visible (use --device cpu to check the script)"
        )
    signal.signal(signal.SIGTERM, _on_sigterm)
    t0 = time.time()
    out = a.out.resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    report = {
        "device": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "seconds": {"install": a.install_s},
        "budget_s": a.budget_s,
        "problems": [],
    }
    try:
        run_checks(a, out, report)
    except CheckFailed as e:
        report["problems"].append(str(e))
    except BaseException as e:  # a signal or a crash: the report still says where it stood
        report["problems"].append(f"{type(e).__name__}: {e}")
        raise
    finally:
        report["seconds"]["check"] = time.time() - t0
        report["wall_s"] = a.install_s + report["seconds"]["check"]
        report["ok"] = not report["problems"]
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
    if report["problems"]:
        print("gpu_check: FAILED: " + "; ".join(p.splitlines()[0] for p in report["problems"]))
        return 1
    print(f"gpu_check: OK in {report['wall_s']:.0f} s (install included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
