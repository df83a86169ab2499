"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The real GLUE copy: $MINISNIP_GLUE_DIR, else <repo>/../shared/data/glue; skip when absent."""
    env = os.environ.get("MINISNIP_GLUE_DIR")
    path = Path(env) if env else REPO.parent / "shared" / "data" / "glue"
    if not path.is_dir():
        pytest.skip(f"GLUE data not found at {path} (set MINISNIP_GLUE_DIR)")
    return path


@pytest.fixture(scope="session")
def glue_fixtures_dir() -> Path:
    """Hand-made GLUE-format files with invented rows, all nine tasks (data/fixtures/glue)."""
    return REPO / "data" / "fixtures" / "glue"


# --- core encoder: shared by test_model, test_checkpoint, test_tokenizer, test_surgery -----------------------
@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The offline default checkpoint (all-MiniLM-L6-v2); skip when its package is not installed."""
    import minisnip

    try:
        return minisnip.default_model_path()
    except ImportError as e:
        pytest.skip(str(e))


TINY_SIZES = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64)


def randomize_(model, seed: int = 0, scale: float = 0.1):
    """Give every parameter random values in place (LayerNorms near 1, biases non-zero): a mix-up of names,
    of Q/K/V order or of gamma/beta then changes the outputs instead of hiding behind BERT's init."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g) * scale
            is_norm_weight = p.dim() == 1 and ("LayerNorm.weight" in name or "norm.weight" in name)
            p.copy_(1.0 + noise if is_norm_weight else noise)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_config():
    """Factory: a small random-model minisnip.BertConfig (2 layers, hidden 64, 4 heads); kwargs override."""
    import minisnip

    def make(**overrides) -> minisnip.BertConfig:
        return minisnip.BertConfig(**{**TINY_SIZES, **overrides})
    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    """Factory: a minisnip model (BertModel by default) on `tiny_config(**overrides)` with random weights, eval."""
    import minisnip

    def make(cls=minisnip.BertModel, seed: int = 0, **overrides):
        return randomize_(cls(tiny_config(**overrides)), seed)
    return make


@pytest.fixture(scope="session")
def hf_tiny_model():
    """Factory: a random small `transformers` BERT (class by name), seeded, with random LayerNorms and biases."""
    transformers = pytest.importorskip("transformers")

    def make(cls_name: str = "BertModel", seed: int = 0, **overrides):
        config = transformers.BertConfig(**{**TINY_SIZES, **overrides})
        return randomize_(getattr(transformers, cls_name)(config), seed)
    return make


@pytest.fixture(autouse=True)
def _restore_process_settings():
    """Benchmarks' `main()` set process-wide state (torch threads, log levels) as command-line programs do;
    tests that call them in-process must not leak it into the tests that follow."""
    import logging

    import torch

    threads, level = torch.get_num_threads(), logging.getLogger("minisnip").level
    yield
    torch.set_num_threads(threads)
    logging.getLogger("minisnip").setLevel(level)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: they run fastest so, and are not slowed by
    threads fighting other processes for the cores on a busy machine (`pytestmark = usefixtures(...)`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, minilm_path) -> Path:
    """A small random BERT checkpoint folder (2 layers, hidden 32, 4 heads of 8, FFN 64) with MiniLM's vocabulary
    and tokenizer: fast enough to fine-tune and prune in tests on the GLUE fixtures."""
    import torch

    import minisnip

    torch.manual_seed(0)
    config = minisnip.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    minisnip.BertModel(config).save_pretrained(folder)
    minisnip.load_tokenizer(minilm_path).save(folder)
    return folder


@pytest.fixture(scope="session")
def bench_script():
    """Factory: import a script of bench/ by name (they are scripts, not a package) to call its main()."""
    import importlib.util
    import sys

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    return load
