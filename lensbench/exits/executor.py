"""The SimExit executor: early exit that really stops computing (METHOD.md, "SimExit")."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from lensbench.continuation import GraphedContinuation, continue_slots, cuda_graphs_possible
from lensbench.errors import LensbenchError
from lensbench.exits.policies import ANSWER_LENSES, NO_EXIT, POLICIES, executor_policies
from lensbench.exits.simulate import threshold_vector
from lensbench.lenses.linear import CONFIG_FILE, LinearLens
from lensbench.readout import ReadoutPoint, block_device, pad_candidates, pad_right, unembed
from lensbench.readout import entropy as readout_entropy
from lensbench.tasks import make_batches


@dataclass
class ExecutorResult:
    """What an executor run decided, per example (in the order given)."""

    example_index: list[int]
    exit_layer: list[int]
    decision: list[int]
    entropy: list[float]  # the confidence at the exit (NaN at L)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"example_index": self.example_index, "exit_layer": self.exit_layer,
                             "decision": self.decision, "entropy": self.entropy})


MAX_GRAPHED_PAIRS = 16


class SimExitExecutor:
    """Early exit that stops computing: the prompt runs block by block, examples whose
    confidence at a readout point falls below the threshold leave the batch, and their
    `[s]`/`[a]` pairs are continued by SimLens (`continue_slots`) for the answer.

    model: a HookedTransformer; linear_lens: a fitted `LinearLens` (needed by the
    `linear-simlens` policy or answer); threshold: a float or `{layer: tau}`; policy:
    linear-simlens (SimExit), logit or simlens; entropy: over the candidates or the vocabulary.
    Prompts are right-padded, so no attention mask is needed; rows that leave are cut out and
    the batch is trimmed to the longest remaining prompt.

    cuda_graphs (default: on for a model on one CUDA device, consecutive positions): the
    SimLens continuation of leaving pairs replays per-block CUDA graphs
    (`GraphedContinuation`, captured once per group size up to MAX_GRAPHED_PAIRS) instead of
    calling the blocks from Python. Hooks added to the model after capture are not seen by the
    graphs.
    """

    def __init__(self, model, linear_lens=None, threshold: float | dict = 0.0, policy: str = "linear-simlens",
                 answer_lens: str = "simlens", min_layer: int = 0, entropy: str = "candidates",
                 positions: str = "consecutive", pad_id: int = 0, cuda_graphs: bool | None = None):
        if policy not in POLICIES or POLICIES[policy].confidence is None:
            raise LensbenchError(f"the executor runs the policies {', '.join(executor_policies())} (got '{policy}')")
        if answer_lens not in ANSWER_LENSES:
            raise LensbenchError(f"unknown answer lens '{answer_lens}' (expected one of {', '.join(ANSWER_LENSES)})")
        if (POLICIES[policy].needs_linear or answer_lens == "linear-simlens") and linear_lens is None:
            raise LensbenchError("the linear-simlens policy needs a fitted Linear SimLens (--linear DIR)")
        if entropy not in ("candidates", "vocab"):
            raise LensbenchError(f"entropy must be candidates or vocab (got '{entropy}')")
        n_layers = model.cfg.n_layers
        if not 0 <= min_layer <= n_layers:
            raise LensbenchError(f"min_layer must be in 0..{n_layers} (got {min_layer})")
        if linear_lens is not None:
            linear_lens.check_model(model, None)
            if linear_lens.config.site != "pre":
                raise LensbenchError("the executor exits at hook_resid_pre points; this linear lens was fitted at 'mid'")
        self.model = model
        self.linear_lens = linear_lens
        self.policy = policy
        self._policy = POLICIES[policy]
        self.answer_lens = answer_lens
        self.min_layer = min_layer
        self.entropy_mode = entropy
        self.positions = positions
        self.pad_id = pad_id
        self.tau = threshold_vector(threshold, n_layers, min_layer).tolist()
        on_cuda = cuda_graphs_possible(model)
        if cuda_graphs and not on_cuda:
            raise LensbenchError("cuda_graphs needs the model on one CUDA device")
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        self._graphs: dict[int, object] = {}

    # readouts at the answer position; candidates only unless the vocabulary entropy is asked for
    def _readout(self, x: Float[Tensor, "n d_model"], cand: Int[Tensor, "n cand"], mask) -> tuple[Tensor, Tensor]:
        model = self.model
        if self.entropy_mode == "vocab":
            logits = unembed(model, x)
            cand_logits = logits.gather(1, cand.to(logits.device))
        else:  # only the candidates' columns of W_U: the cheap readout the cost model counts
            normed = model.ln_final(x.to(model.W_U.device)[:, None, :])[:, 0]
            cand = cand.to(normed.device)
            cand_logits = (torch.einsum("nd,ncd->nc", normed, model.W_U.T[cand]) + model.b_U[cand]).float()
        cand_logits = cand_logits.masked_fill(~mask.to(cand_logits.device), -torch.inf)
        cand_logprobs = torch.log_softmax(cand_logits, -1)
        source = cand_logprobs if self.entropy_mode == "candidates" else torch.log_softmax(logits, -1)
        return readout_entropy(source), cand_logprobs.argmax(-1)

    def _graphed(self, n: int):
        """The CUDA-graphed continuation for `n` pairs, or None where graphs are off, fail or
        would cost more to capture than they save (more than MAX_GRAPHED_PAIRS pairs)."""
        if not self.cuda_graphs or self.positions != "consecutive" or n > MAX_GRAPHED_PAIRS:
            return None
        if n not in self._graphs:
            try:
                self._graphs[n] = GraphedContinuation(self.model, n)
            except Exception as exc:  # noqa: BLE001 - an uncapturable model runs eagerly, said once
                warnings.warn(f"SimExit: CUDA graphs unavailable ({type(exc).__name__}: {exc}); continuing eagerly")
                self.cuda_graphs = False
                return None
        return self._graphs[n]

    def _continue(self, s: Tensor, a: Tensor, layers: list[int], lengths: Tensor) -> Tensor:
        n_layers = self.model.cfg.n_layers
        z = torch.stack([s, a], dim=1)
        if self.cuda_graphs:
            groups: dict[int, list[int]] = {}
            for row, layer in enumerate(layers):
                groups.setdefault(int(layer), []).append(row)
            runners = {layer: self._graphed(len(rows)) for layer, rows in groups.items()}
            if all(r is not None for r in runners.values()):
                out = torch.empty(len(layers), z.shape[-1], dtype=z.dtype, device=z.device)
                for layer, rows in groups.items():
                    index = torch.tensor(rows, device=z.device)
                    out[index] = runners[layer].run(z[index], layer).to(z.dtype)
                return out
        starts = [ReadoutPoint(int(layer), "pre", n_layers) for layer in layers]
        position_ids = None
        if self.positions == "original":
            position_ids = torch.stack([torch.zeros_like(lengths), lengths - 1], 1).to(z.device)
        out, _ = continue_slots(self.model, z, starts, position_ids)
        return out

    def _confidence_input(self, layer: int, s: Tensor, h: Tensor, lengths: Tensor) -> Tensor:
        return self._policy.confidence(self, layer, s, h, lengths)

    @torch.inference_mode()
    def run_batch(self, batch) -> ExecutorResult:
        """One batch of `EncodedExample`s (any lengths), right-padded."""
        model = self.model
        n_layers = model.cfg.n_layers
        device = model.cfg.device
        tokens, lengths = pad_right([e.tokens for e in batch], self.pad_id, device)
        cand, mask = pad_candidates([e.candidate_ids for e in batch], device)
        exit_layer = [n_layers] * len(batch)
        decision = [0] * len(batch)
        entropy = [float("nan")] * len(batch)
        pending: list[tuple[int, int, Tensor, Tensor]] = []  # (row, layer, s, a) awaiting SimLens

        resid = model(tokens, stop_at_layer=0)
        rows = torch.arange(len(batch), device=device)
        active_lengths = lengths
        for layer in range(n_layers):
            tau = self.tau[layer]
            if tau > NO_EXIT:
                pick = torch.arange(len(rows), device=resid.device)
                h = resid[pick, (active_lengths - 1).to(resid.device)]
                s = resid[:, 0]
                x = self._confidence_input(layer, s, h, active_lengths)
                ent, dec = self._readout(x, cand[rows], mask[rows])
                leave = ent < tau
                if bool(leave.any()):
                    leave_rows = torch.nonzero(leave).flatten()
                    own = self._policy.confidence_lens == self.answer_lens  # the check already read the answer
                    if self.answer_lens == "simlens" and not own:
                        for r in leave_rows.tolist():
                            pending.append((int(rows[r]), layer, s[r], h[r]))
                    elif self.answer_lens == "linear-simlens" and not own:
                        _, dec = self._readout(self.linear_lens.transform(h, layer), cand[rows], mask[rows])
                    elif self.answer_lens == "logit" and not own:
                        _, dec = self._readout(h, cand[rows], mask[rows])
                    for r in leave_rows.tolist():
                        original = int(rows[r])
                        exit_layer[original] = layer
                        entropy[original] = float(ent[r])
                        decision[original] = int(dec[r])
                    keep = ~leave.to(resid.device)
                    resid = resid[keep]
                    rows = rows[keep.to(rows.device)]
                    active_lengths = active_lengths[keep.to(active_lengths.device)]
                    if not rows.numel():
                        break
                    resid = resid[:, : int(active_lengths.max())]
            resid = model.blocks[layer](resid.to(block_device(model, layer)))
        if rows.numel():
            pick = torch.arange(len(rows), device=resid.device)
            h = resid[pick, (active_lengths - 1).to(resid.device)]
            _, dec = self._readout(h, cand[rows], mask[rows])
            for r, original in enumerate(rows.tolist()):
                decision[original] = int(dec[r])
        if pending:
            originals = [p[0] for p in pending]
            out = self._continue(torch.stack([p[2] for p in pending]), torch.stack([p[3] for p in pending]),
                                 [p[1] for p in pending], lengths[originals])
            index = torch.tensor(originals, device=device)
            _, dec = self._readout(out, cand[index], mask[index])
            for r, original in enumerate(originals):
                decision[original] = int(dec[r])
        return ExecutorResult([e.index for e in batch], exit_layer, decision, entropy)

    def run(self, encoded, batch_size: int = 8) -> ExecutorResult:
        """All examples, in length-sorted batches (as the runner forms them)."""
        parts = [self.run_batch(batch) for batch in make_batches(list(encoded), batch_size)]
        result = ExecutorResult([], [], [], [])
        for part in parts:
            result.example_index += part.example_index
            result.exit_layer += part.exit_layer
            result.decision += part.decision
            result.entropy += part.entropy
        return result


@torch.inference_mode()
def run_full_model(model, encoded, batch_size: int = 8, pad_id: int = 0) -> list[int]:
    """The baseline: the full forward pass, read out at the answer position only."""
    decisions = []
    n_layers = model.cfg.n_layers
    for batch in make_batches(list(encoded), batch_size):
        tokens, lengths = pad_right([e.tokens for e in batch], pad_id, model.cfg.device)
        resid = model(tokens, stop_at_layer=n_layers)
        h = resid[torch.arange(len(batch), device=resid.device), (lengths - 1).to(resid.device)]
        logits = unembed(model, h)
        for row, e in enumerate(batch):
            decisions.append(int(logits[row, e.candidate_ids].argmax()))
    return decisions


def linear_simlens_folder(run) -> str | None:
    """The first Linear SimLens folder among a stored run's `--linear` folders (None if none)."""
    for folder in (run.manifest.get("config", {}).get("linear") or []) if run is not None else []:
        try:
            if json.loads((Path(folder) / CONFIG_FILE).read_text()).get("kind") == "linear-simlens":
                return folder
        except (OSError, ValueError, AttributeError):
            continue
    return None


def executor_for(model, run, policy, threshold, answer_lens, min_layer, linear_dir, pad_id, cuda_graphs=None):
    """The executor for a stored run's options (its Linear SimLens unless `linear_dir`)."""
    linear = None
    if POLICIES[policy].needs_linear or answer_lens == "linear-simlens":
        folder = linear_dir or linear_simlens_folder(run)
        if folder is None:
            raise LensbenchError("the linear-simlens policy needs --linear DIR")
        linear = LinearLens.load(folder)
    entropy = run.manifest.get("config", {}).get("entropy", "candidates") if run is not None else "candidates"
    positions = run.manifest.get("config", {}).get("positions", "consecutive") if run is not None else "consecutive"
    return SimExitExecutor(model, linear, threshold, policy, answer_lens, min_layer, entropy, positions, pad_id,
                           cuda_graphs)
