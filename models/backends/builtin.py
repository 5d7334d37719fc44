"""Backend over an EvalHub checkpoint, run by our own engine (models/generate.py)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from models.backends.base import GenerationArgs, TokenBackend
from models.checkpoint import default_device, load_checkpoint, read_config
from models.draft import Int4Draft
from models.generate import Draft, generate
from models.lora import load_adapter
from models.prefix import PrefixScorer
from models.tokenizer import load_tokenizer


class BuiltinBackend(TokenBackend):
    """``location`` is a checkpoint directory written by ``models.checkpoint.import_checkpoint``.

    batch_size: prompts (or scored pairs) per forward pass. Prompts are sorted by length first
        so a batch pads little; results come back in input order.
    num_threads: torch intra-op threads; None leaves torch's setting alone.
    prepack: keep a copy of the weights packed for oneDNN's matmuls (``AFM.prepack``), 2-3x
        faster than torch's default CPU matmuls for decoding on AMD EPYC, for the weights'
        memory again, if that copy fits in ``prepack_bytes`` (2 GiB: SmolLM2-135M's 0.5 GB
        does, a 1B model's 4 GB does not).
    draft: "int4" (the default) makes greedy generation speculative (``models.generate.Draft``
        over ``models.draft.Int4Draft``, CPU only) for batches of up to 6 prompts: the same
        tokens, ~2x faster one prompt at a time on a 2-core CPU and 1.3x for 4, for ~1/5 more
        weight memory (benchmarks/generate_speed.py); 8 prompts keep the CPU busy without it
        and decode plainly. None switches it off. Sampling never uses it.
    device: where the model runs; None: CUDA when available, else the CPU. Weights stay fp32.
        prepack and the int4 draft are CPU speed paths and are skipped on other devices.
    adapter: a LoRA adapter directory in PEFT's layout (``models.lora.save_adapter``) put on
        the checkpoint's projections, kept separate from them (a palettized base stays
        palettized); the draft and the packed copies are made from the adapted projections.
    """

    def __init__(
        self,
        location: str | os.PathLike,
        *,
        batch_size: int = 8,
        num_threads: int | None = None,
        prepack: bool = True,
        prepack_bytes: int = 2 * 2**30,
        draft: str | None = "int4",
        device: str | torch.device | None = None,
        adapter: str | os.PathLike | None = None,
    ):
        if draft not in (None, "int4"):
            raise ValueError(f"unknown draft {draft!r}; known: 'int4' or None")
        self.path = Path(location)
        self.batch_size = batch_size
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        _, self.meta = read_config(self.path)
        self.device = torch.device(device) if device is not None else default_device()
        self.model = load_checkpoint(self.path, device=self.device)
        if adapter is not None:
            # before the draft and the packs: they copy the adapted projections
            load_adapter(self.model, adapter)
            self.model.to(self.device)
        cpu = self.device.type == "cpu"
        self.draft = Draft(Int4Draft(self.model)) if draft and cpu else None
        size = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if prepack and cpu and size <= prepack_bytes:
            self.model.prepack(batch_size)
        self.tokenizer = load_tokenizer(self.path)
        # Shared few-shot prefixes (MMLU's per-subject exemplars) are computed once.
        self.scorer = PrefixScorer(self.model, batch_size=batch_size)

    def _generate_ids(self, prompts, args: GenerationArgs, should_stop):
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[list[int]] = [[] for _ in prompts]
        stop_ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]

            def row_stop(row: int, new_ids: list[int], idx=idx) -> bool:
                return should_stop is not None and should_stop(idx[row], new_ids)

            outs = generate(
                self.model,
                [prompts[i] for i in idx],
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                stop_token_ids=stop_ids,
                should_stop=row_stop if should_stop is not None else None,
                pad_id=self.tokenizer.pad_token_id or 0,
                seed=args.seed,
                draft=self.draft,
            )
            for i, out in zip(idx, outs, strict=True):
                results[i] = out
        return results

    def _loglikelihood_ids(self, pairs):
        return self.scorer.loglikelihood(pairs)

    def info(self) -> dict:
        return {
            "kind": "builtin",
            "location": str(self.path),
            "device": str(self.device),
            "config": self.meta["model"],
            "provenance": self.meta.get("provenance", {}),
            "parameters": self.model.num_params(),
            "chat_template": getattr(self.tokenizer, "chat_template", None),
        }
