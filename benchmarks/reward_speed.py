"""Reward-model training: EvalHub (`models.reward`) vs TRL's `RewardTrainer` on the same work.

Peer: TRL 1.x `RewardTrainer` (trl/trainer/reward_trainer.py), which needs a Hugging Face
sequence-classification model. So both sides get the same small decoder built from a config,
no downloads: a 4-layer Llama (AFM with qk_norm=False is exactly Llama) with identical initial
weights, copied into `LlamaForSequenceClassification` for TRL and used as `models.afm.AFM`
behind `DecoderBackbone` for EvalHub. Same byte-level tokenizer (a `PreTrainedTokenizerFast`
with one token per byte, EOS appended to every response on both sides), same pairs, same
objective (hard Bradley-Terry, ties dropped: the loss TRL implements), same batch size,
learning rate (AdamW, constant, no clipping, no weight decay) and number of steps; the token
embedding is frozen on both sides (EvalHub freezes it; TRL is given a model with it frozen).

What differs is how a pair is run: TRL concatenates prompt+chosen and prompt+rejected and
pads them into a 2B-row batch, so each prompt is computed twice; EvalHub computes the prompt
once, runs the linear layers over real tokens only (no padding), does attention as prompt-causal
plus response-to-(prompt, itself) blocks instead of under a dense mask, and in the last block
computes only the keys/values beyond the two pooled tokens (`models.reward_backbones`): fp32
throughout, equal to separate passes up to rounding (tests/models/test_reward.py).
EvalHub's timed training also computes the held-out loss after every epoch. Held-out accuracy is
measured independently on each side's own model (HF forward for TRL, `evaluate_reward_model`
for EvalHub) on the same held-out prompts.

The task: a prompt of random words and responses of 6-14 words from a word list; the true
reward is (#Capitalised − #lowercase words) / √n, and a simulated rater labels pairs with noise
and graded levels (see tests/models/test_reward.py). Last line:
    speedup_vs_trl=X.X accuracy_delta=Y.YYY      (delta = EvalHub − TRL held-out accuracy)
Needs (benchmark only): trl>=1,<2 (pulls datasets).
"""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))  # run from anywhere

import argparse
import os
import random
import time

import torch

from models.afm import AFM, AFMConfig
from models.formats import hf_llama_config, hf_state_dict
from models.preferences import Preference
from models.reward import evaluate_reward_model, train_reward_model
from models.reward_backbones import DecoderBackbone

WORDS = [
    "river",
    "stone",
    "cloud",
    "amber",
    "tiger",
    "maple",
    "piano",
    "orbit",
    "lemon",
    "cedar",
    "frost",
    "ember",
    "violet",
    "harbor",
    "quartz",
    "meadow",
]
LEVELS = ((0.3, None), (0.6, "negligibly_better"), (1.0, "slightly_better"), (1.6, "better"))


def simulate(n: int, seed: int, prompt_words: int) -> list[Preference]:
    rng = random.Random(seed)

    def response() -> tuple[str, float]:
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        caps = [rng.random() < 0.5 for _ in words]
        text = " ".join(w.capitalize() if c else w for w, c in zip(words, caps, strict=True))
        return text, (2 * sum(caps) - len(caps)) / len(caps) ** 0.5

    out = []
    for i in range(n):
        prompt = f"Q{seed}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(prompt_words))
        (a, ra), (b, rb) = response(), response()
        gap = (ra - rb) / 2 + rng.gauss(0, 0.5)  # true gaps have unit variance
        a, b = (a, b) if gap > 0 else (b, a)
        level = next((lv for bound, lv in LEVELS if abs(gap) < bound), "significantly_better")
        out.append(Preference(prompt, a, b, level or rng.choice(["tie_both_good", "tie_both_bad"])))
    return [p for p in out if not p.tie]  # hard BT on both sides: ties dropped up front


def byte_tokenizer():
    """One token per byte (ids 2..257), <pad>=0, </s>=1: no merges, so tokenising prompt and
    response together or apart gives the same ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {"<pad>": 0, "</s>": 1, **{ch: i + 2 for i, ch in enumerate(sorted(alphabet))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>")


def make_models(cfg: AFMConfig, seed: int):
    """(AFM, LlamaForSequenceClassification) with the same decoder weights."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    afm = AFM(cfg).init_weights(seed=seed)
    hf = LlamaForSequenceClassification(
        LlamaConfig(
            **{
                k: v
                for k, v in hf_llama_config(cfg).items()
                if k not in ("model_type", "architectures")
            },
            num_labels=1,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
        )
    )
    out = hf_state_dict(afm.state_dict(), cfg)
    missing, unexpected = hf.load_state_dict(out, strict=False)
    assert set(missing) <= {"score.weight"} and not unexpected, (missing, unexpected)
    hf.model.embed_tokens.requires_grad_(False)  # frozen on both sides
    return afm, hf


def run_evalhub(afm, tok, train, held, args):
    backbone = DecoderBackbone(afm, tok, trainable_layers=afm.cfg.n_layers)
    model, report = train_reward_model(
        train,
        held,
        backbone,
        loss="hard",
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch,
        seed=args.seed,
    )
    return evaluate_reward_model(model, held)["accuracy"], report.seconds, report.steps, model


def run_trl(hf, tok, train, held, args, head_weight):
    import datasets
    from trl import RewardConfig, RewardTrainer

    with torch.no_grad():
        hf.score.weight.copy_(head_weight)  # EvalHub's initial head (its bias cancels in BT)
    data = datasets.Dataset.from_list(
        [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in train]
    )
    steps = args.epochs * (len(train) // args.batch)
    config = RewardConfig(
        output_dir=os.path.join(args.tmp, "trl"),
        max_steps=steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        seed=args.seed,
        bf16=False,
        fp16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10**6,
        dataloader_num_workers=0,
        max_length=None,
        disable_tqdm=True,
    )
    trainer = RewardTrainer(model=hf, args=config, train_dataset=data, processing_class=tok)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return hf_accuracy(hf.eval(), tok, held), seconds, steps


@torch.no_grad()
def hf_accuracy(hf, tok, prefs) -> float:
    wins = 0
    for i in range(0, len(prefs), 32):
        batch = prefs[i : i + 32]
        texts = [p.prompt + r + tok.eos_token for p in batch for r in (p.chosen, p.rejected)]
        enc = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        r = hf(**enc).logits.view(-1, 2)  # (B, 2): chosen, rejected
        wins += int((r[:, 0] > r[:, 1]).sum())
    return wins / len(prefs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=640, help="training pairs before ties")
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tmp", default="/tmp/evalhub-reward-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train = simulate(args.pairs, args.seed, args.prompt_words)
    train = train[: len(train) // args.batch * args.batch]  # whole batches: equal step counts
    held = simulate(args.held_out, args.seed + 1, args.prompt_words)
    cfg = AFMConfig(
        vocab_size=258,
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=256,
        qk_norm=False,
        max_seq_len=1024,
    )
    tok = byte_tokenizer()
    afm, hf = make_models(cfg, args.seed)
    print(
        f"{len(train)} training pairs, {len(held)} held-out (ties dropped), "
        f"decoder {sum(p.numel() for p in afm.parameters()):,} params, "
        f"{args.epochs} epochs x batch {args.batch}, {args.threads} thread(s)"
    )
    ours_acc, ours_s, ours_steps, model = run_evalhub(afm, tok, train, held, args)
    head0 = make_models(cfg, args.seed)[0]  # same seed: recover the untrained head
    init_head = type(model)(DecoderBackbone(head0, tok, cfg.n_layers), seed=args.seed).head.weight
    trl_acc, trl_s, trl_steps = run_trl(hf, tok, train, held, args, init_head.detach())
    assert ours_steps == trl_steps, (ours_steps, trl_steps)
    pairs = ours_steps * args.batch
    print(
        f"evalhub: {ours_s:.1f} s, {pairs / ours_s:.1f} pairs/s, held-out accuracy {ours_acc:.3f}"
    )
    print(f"trl:     {trl_s:.1f} s, {pairs / trl_s:.1f} pairs/s, held-out accuracy {trl_acc:.3f}")
    print(f"speedup_vs_trl={trl_s / ours_s:.1f} accuracy_delta={ours_acc - trl_acc:.3f}")


if __name__ == "__main__":
    main()
