"""The live probe: one typed prompt through every lens at once, in memory.

A `Prober` holds a loaded model and builds each set of lenses once (per `(lenses, ablations)`
key); `Prober.probe` tokenises the prompt as the runner does (`tasks.encode_examples`), runs
one `evaluate.evaluate_batch` call on a one-example batch and returns the rows a stored run
would hold for that prompt (`predictions_table`, `examples_table`), with nothing written to
disk. Every probe gets a fresh `RunContext` (the lenses' `prepare` runs again on it), so
nothing of one prompt reaches the next; the cached lens objects hold only what depends on the
model (fitted maps, single-token residuals).

`answer_attention` gives `[a]`'s attention over every prompt token in the full forward pass,
to set against SimLens's two-token continuation.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from lensbench.errors import LensbenchError
from lensbench.evaluate import evaluate_batch, examples_table, predictions_table, token_text
from lensbench.lenses import Lens, RunContext, SimLens, build_lenses
from lensbench.readout import readout_points
from lensbench.tasks import EncodedExample, Example, pad_token_id, start_token_id

# Lenses the probe can build for any model; the fitted ones need `linear_dirs`.
PROBE_LENSES = ("logit", "simlens", "linear-simlens", "tuned")


@dataclass
class ProbeResult:
    """One probe: the rows of `predictions.parquet` and `examples.parquet` a one-example run
    of the same prompt would store, plus the pinned tokens' full-vocabulary view."""

    predictions: pd.DataFrame
    example: pd.Series
    tokens: list[int]
    token_texts: list[str]
    attention: np.ndarray | None  # (point, block, head): [a] -> [s] in SimLens's continuation
    tracked: dict = field(default_factory=dict)  # token text -> {lens: {"layer", "prob", "rank"}}
    seconds: float = 0.0


class Prober:
    """A model ready to probe: readout points, `[s]`, and the lenses built once per key."""

    def __init__(self, model, model_name: str = "model", linear_dirs: list[str] | tuple[str, ...] = (),
                 topk: int = 5, entropy: str = "candidates", site: str = "pre", start_token: str | None = None,
                 threads: int | None = 1):
        self.model = model
        # A one-sentence probe is many small ops: on a CPU, one intra-op thread avoids the
        # threads' contention (20x slower on a busy 2-core machine); None keeps torch's setting.
        self.threads = threads
        self.model_name = model_name
        self.linear_dirs = list(linear_dirs)
        self.topk, self.entropy = topk, entropy
        self.points = readout_points(model, site)
        self.start_id = start_token_id(model.tokenizer, start_token)
        self.pad_id = pad_token_id(model.tokenizer, self.start_id)
        self._start_states: dict = {}  # the start token's cached keys and values, kept across probes (`StartKV`)
        self._lenses: dict[tuple, list[Lens]] = {}
        self._available: list[str] | None = None

    def available(self) -> list[str]:
        """The lens kinds this prober can build (the fitted ones only with their folders)."""
        if self._available is None:
            from lensbench.lenses.linear import load_linear_lenses

            kinds = {"logit", "simlens"}
            for kind in ("linear-simlens", "tuned"):
                try:
                    lenses = load_linear_lenses(self.linear_dirs, kind=kind)
                    for lens in lenses:
                        lens.check_model(self.model)
                    if lenses:
                        kinds.add(kind)
                except LensbenchError:
                    pass
            self._available = [k for k in PROBE_LENSES if k in kinds]
        return list(self._available)

    def lenses(self, names: tuple[str, ...], ablations: tuple[str, ...] = ()) -> list[Lens]:
        """The lens objects of a key, built (and checked against the model) once."""
        key = (tuple(names), tuple(ablations))
        if key not in self._lenses:
            lenses = build_lenses(list(names), ",".join(ablations), linear_dirs=self.linear_dirs)
            for lens in lenses:
                if isinstance(lens, SimLens) and any(src.kind == "swap" for _, src in lens.ablation.slots):
                    raise LensbenchError(f"'{lens.ablation.label}' swaps a slot with another example; "
                                         "a probe has one prompt, so there is none to swap with")
                lens.check_model(self.model)
            self._lenses[key] = lenses
        return self._lenses[key]

    def encode(self, prompt: str, candidates: list[str], gold: int | None, example_id: str = "probe",
               index: int = 0) -> tuple[Example, EncodedExample]:
        """The prompt as the runner encodes it (`[s]` prepended); a candidate that is not one
        token is an error that names its pieces."""
        tokenizer = self.model.tokenizer
        if not prompt:
            raise LensbenchError("the prompt is empty")
        if len(candidates) < 2:
            raise LensbenchError("give at least two candidates")
        ids = []
        for choice in candidates:
            pieces = tokenizer.encode(choice, add_special_tokens=False)
            if len(pieces) != 1:
                shown = " + ".join(repr(tokenizer.decode([p])) for p in pieces) or "nothing"
                hint = f"; try {tokenizer.decode([pieces[0]])!r}" if pieces else ""
                raise LensbenchError(f"candidate {choice!r} is {len(pieces)} tokens for {self.model_name} ({shown}); "
                                     f"each candidate must be a single token{hint}")
            ids.append(pieces[0])
        if len(set(ids)) != len(ids):
            raise LensbenchError("two candidates are the same token")
        tokens = tokenizer.encode(prompt, add_special_tokens=False)
        if not tokens or tokens[0] != self.start_id:
            tokens = [self.start_id, *tokens]
        if len(tokens) > self.model.cfg.n_ctx:
            raise LensbenchError(f"the prompt is {len(tokens)} tokens, longer than the model's context ({self.model.cfg.n_ctx})")
        example = Example(example_id, prompt, list(candidates), -1 if gold is None else int(gold))
        return example, EncodedExample(index, example_id, tokens, ids, example.gold)

    def probe(self, prompt: str, candidates: list[str], gold: int | None, lenses: list[str] | tuple[str, ...],
              ablations: list[str] | tuple[str, ...] = (), pinned: list[str] | tuple[str, ...] = (),
              example_id: str = "probe", index: int = 0) -> ProbeResult:
        """Every lens at every readout point on the prompt; gold None (or -1): no gold answer.
        pinned: token texts (each one token) whose absolute probability and rank per layer
        and lens are returned."""
        start = time.perf_counter()
        example, encoded = self.encode(prompt, candidates, gold, example_id, index)
        built = self.lenses(tuple(lenses), tuple(ablations))
        tokenizer = self.model.tokenizer
        pinned_ids = []
        for text in pinned:
            pieces = tokenizer.encode(text, add_special_tokens=False)
            if len(pieces) != 1:
                raise LensbenchError(f"the pinned token {text!r} is {len(pieces)} tokens for {self.model_name}; pin a single token")
            pinned_ids.append(pieces[0])
        ctx = RunContext(self.model, self.points, {index: encoded}, self.pad_id, batch_size=1, mean_examples=1,
                         start_states=self._start_states)
        for lens in built:  # on this probe's own context: nothing of an earlier prompt is used
            lens.prepare(ctx)
        with torch.inference_mode(), cpu_threads(self.model, self.threads):
            result = evaluate_batch(self.model, built, ctx, [encoded], self.topk, self.entropy, track_ids=pinned_ids)
        predictions = predictions_table(result.columns, tokenizer).to_pandas()
        example_row = examples_table({index: example}, [encoded], tokenizer).to_pandas().iloc[0]
        attention = None
        if result.attention_sum is not None:
            count = result.attention_count.clamp(min=1)[..., None]
            mean = result.attention_sum / count
            mean[result.attention_count == 0] = float("nan")
            attention = mean.float().numpy()
        tracked = {}
        layers = [p.layer for p in self.points]
        for k, text in enumerate(pinned):
            tracked[text] = {lens.name: {"layer": layers,
                                         "prob": np.exp(result.tracked_logprobs[i, :, 0, k]).tolist(),
                                         "rank": result.tracked_ranks[i, :, 0, k].tolist()}
                             for i, lens in enumerate(built)}
        texts = [token_text(tokenizer, t) for t in encoded.tokens]
        return ProbeResult(predictions, example_row, list(encoded.tokens), texts, attention, tracked,
                           time.perf_counter() - start)


@contextmanager
def _threads(n: int | None):
    """torch's intra-op thread count set to `n` for the block (restored after)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_threads(model, n: int | None):
    """`n` intra-op threads while `model` runs on a CPU (no change on other devices)."""
    return _threads(n if str(model.cfg.device) == "cpu" else None)


@torch.inference_mode()
def answer_attention(model, tokens: list[int], threads: int | None = 1) -> np.ndarray:
    """`[a]`'s (the last token's) attention over every prompt token in the full forward pass:
    `(block, head, position)`."""
    patterns = []

    def keep(pattern, hook):
        patterns.append(pattern[0, :, -1, :].float().cpu())

    hooks = [(f"blocks.{k}.attn.hook_pattern", keep) for k in range(model.cfg.n_layers)]
    ids = torch.tensor([tokens], dtype=torch.long, device=model.cfg.device)
    with cpu_threads(model, threads):
        model.run_with_hooks(ids, fwd_hooks=hooks, stop_at_layer=model.cfg.n_layers)
    return torch.stack(patterns).numpy()
