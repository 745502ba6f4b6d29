"""The SimExit executor: early exit that really stops computing (METHOD.md, "SimExit")."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
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
class ExecutorStats:
    """What one `run` computed in the prompt pass, and how it was batched.

    block_calls: prompt block calls (the count a launch-bound GPU pays per call);
    row_layers: rows summed over those calls, i.e. the examples' exit layers summed (the count
    compute-bound hardware pays); token_layers: rows x padded length summed over the calls;
    calls_per_block: block calls per block index; cohorts: groups of examples admitted
    together (the batches, without refill); merges: cohorts that caught up with another;
    checks: confidence readouts (one per cohort and checked layer); continuations: calls of
    the SimLens continuation that answers exited examples (flushes)."""

    block_calls: int = 0
    row_layers: int = 0
    token_layers: int = 0
    calls_per_block: list[int] = field(default_factory=list)
    cohorts: int = 0
    merges: int = 0
    checks: int = 0
    continuations: int = 0

    def rows_per_call(self) -> float:
        return self.row_layers / self.block_calls if self.block_calls else float("nan")

    def as_dict(self) -> dict:
        return {"block_calls": self.block_calls, "row_layers": self.row_layers, "token_layers": self.token_layers,
                "rows_per_call": self.rows_per_call(), "cohorts": self.cohorts, "merges": self.merges,
                "checks": self.checks, "continuations": self.continuations}


@dataclass
class ExecutorResult:
    """What an executor run decided, per example (in the order given)."""

    example_index: list[int]
    exit_layer: list[int]
    decision: list[int]
    entropy: list[float]  # the confidence at the exit (NaN at L)
    stats: ExecutorStats | None = None

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({"example_index": self.example_index, "exit_layer": self.exit_layer,
                             "decision": self.decision, "entropy": self.entropy})


MAX_GRAPHED_PAIRS = 16


def _bucket(n: int) -> int:
    """The graphed continuation's size for `n` pairs: the next power of two (few captures)."""
    return 1 << max(0, n - 1).bit_length()


@dataclass(eq=False)  # compared by identity (list.remove), never by value
class _Cohort:
    """Rows of the prompt pass at the same layer: `resid` is `blocks.{layer}.hook_resid_pre`
    (right-padded to the longest of `lengths`); `slots` index the run's examples; `index` and
    `lengths_t` are their device copies (so no step synchronises to build them)."""

    layer: int
    resid: Tensor
    slots: list[int]
    lengths: list[int]
    index: Tensor
    lengths_t: Tensor

    def keep(self, keep: Tensor, kept: list[int]) -> None:
        self.slots = [self.slots[i] for i in kept]
        self.lengths = [self.lengths[i] for i in kept]
        if not kept:
            return
        self.resid = self.resid[keep.to(self.resid.device)][:, : max(self.lengths)]
        self.index = self.index[keep.to(self.index.device)]
        self.lengths_t = self.lengths_t[keep.to(self.lengths_t.device)]

    def absorb(self, other: "_Cohort") -> None:
        """Take `other`'s rows (same layer): both are right-padded to the longer length. The pad
        positions are zeros; with a causal mask no real position attends to them."""
        width = max(self.resid.shape[1], other.resid.shape[1])
        parts = [torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[1])) if r.shape[1] < width else r
                 for r in (self.resid, other.resid.to(self.resid.device))]
        self.resid = torch.cat(parts)
        self.slots += other.slots
        self.lengths += other.lengths
        self.index = torch.cat([self.index, other.index.to(self.index.device)])
        self.lengths_t = torch.cat([self.lengths_t, other.lengths_t.to(self.lengths_t.device)])


class _RunState:
    """One `run`: its examples (in the order given), candidates, answers and pending pairs."""

    def __init__(self, examples, n_layers: int, device):
        self.examples = examples
        self.cand, self.mask = pad_candidates([e.candidate_ids for e in examples], device)
        self.lengths = torch.tensor([len(e.tokens) for e in examples], device=device)
        self.exit_layer = [n_layers] * len(examples)
        self.decision = [0] * len(examples)
        self.entropy = [float("nan")] * len(examples)
        self.pending: list[tuple[list[int], list[int], Tensor, Tensor]] = []  # (slots, layers, s, a)
        self.n_pending = 0
        self.stats = ExecutorStats(calls_per_block=[0] * n_layers)


class SimExitExecutor:
    """Early exit that stops computing: the prompt runs block by block, examples whose
    confidence at a readout point falls below the threshold leave the batch, and their
    `[s]`/`[a]` pairs are continued by SimLens (`continue_slots`) for the answer.

    model: a HookedTransformer; linear_lens: a fitted `LinearLens` (needed by the
    `linear-simlens` policy or answer); threshold: a float or `{layer: tau}`; policy:
    linear-simlens (SimExit), logit or simlens; entropy: over the candidates or the vocabulary.
    Prompts are right-padded, so no attention mask is needed; rows that leave are cut out and
    their group is trimmed to its longest remaining prompt.

    Batching with refill (`run(encoded, batch_size)`): up to `batch_size` examples are in the
    prompt pass at once, and the slots of examples that exit are given to waiting examples,
    so the rows of a block call follow the *mean* exit layer, not the batch's maximum. Rows
    at the same layer form a *cohort* (one tensor, one block call per step). Waiting examples
    (length-sorted, longest first) enter as a new cohort at layer 0 once at least
    `refill_at x batch_size` slots are free (or all that remain fit, or nothing runs). The
    lowest cohort always advances first, and a cohort that reaches the layer of another merges
    with it, so a new cohort catches up with the older rows and then shares their block calls.
    Every row still runs exactly the blocks below its exit layer once (row-layers = the sum
    of the exit layers, as without refill); what refill changes is how many rows share a
    block call. Calling each block once per distinct layer present at every step would
    multiply the block calls, which is what a small model on a GPU is bound by (launches, not
    rows); cohorts that merge keep them near (sum of exit layers) / batch_size plus one
    catch-up per cohort. `refill_at` near 1 admits fewer, larger cohorts (fewer calls, emptier
    slots); near 0, more and smaller ones. `run(..., refill=False)` is the batching without
    refill: length-sorted batches, each running until its last example exits (`run_batch`).

    Exited pairs that SimLens answers wait and are continued together once `flush_pairs` are
    pending, and at the end (`continue_slots`: block k runs once over every pair that needs
    it), so their cost does not grow with the number of exit steps.

    cuda_graphs (default: on for a model on one CUDA device, consecutive positions): the
    SimLens continuation replays per-block CUDA graphs (`GraphedContinuation`, one set per
    power-of-two number of pairs up to MAX_GRAPHED_PAIRS, captured on first use; a set runs
    pairs that start at different layers in one pass from the lowest) instead of calling the
    blocks from Python. Hooks added to the model after capture are not seen by the graphs.
    """

    def __init__(self, model, linear_lens=None, threshold: float | dict = 0.0, policy: str = "linear-simlens",
                 answer_lens: str = "simlens", min_layer: int = 0, entropy: str = "candidates",
                 positions: str = "consecutive", pad_id: int = 0, cuda_graphs: bool | None = None,
                 refill_at: float = 0.5, flush_pairs: int = MAX_GRAPHED_PAIRS):
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
        if not 0 < refill_at <= 1:
            raise LensbenchError(f"refill_at is a fraction of the batch in (0, 1] (got {refill_at})")
        if int(flush_pairs) < 1:
            raise LensbenchError(f"flush_pairs must be at least 1 (got {flush_pairs})")
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
        self.refill_at = float(refill_at)
        self.flush_pairs = int(flush_pairs)
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

    def _continue_graphed(self, z: Tensor, layers: list[int]) -> Tensor | None:
        """Graphed continuation in chunks of at most MAX_GRAPHED_PAIRS pairs, each padded to a
        power of two with pairs that start at L (never run); None where graphs cannot run."""
        n_layers = self.model.cfg.n_layers
        out = []
        for start in range(0, len(layers), MAX_GRAPHED_PAIRS):
            chunk = [int(x) for x in layers[start : start + MAX_GRAPHED_PAIRS]]
            size = _bucket(len(chunk))
            runner = self._graphed(size)
            if runner is None:
                return None
            zc = z[start : start + len(chunk)]
            if size > len(chunk):
                zc = torch.cat([zc, zc.new_zeros(size - len(chunk), *zc.shape[1:])])
                chunk += [n_layers] * (size - len(chunk))
            out.append(runner.run(zc, chunk)[: min(len(layers) - start, MAX_GRAPHED_PAIRS)].to(z.dtype))
        return torch.cat(out)

    def _continue(self, s: Tensor, a: Tensor, layers: list[int], lengths: Tensor) -> Tensor:
        n_layers = self.model.cfg.n_layers
        z = torch.stack([s, a], dim=1)
        if self.cuda_graphs:
            out = self._continue_graphed(z, layers)
            if out is not None:
                return out
        starts = [ReadoutPoint(int(layer), "pre", n_layers) for layer in layers]
        position_ids = None
        if self.positions == "original":
            position_ids = torch.stack([torch.zeros_like(lengths), lengths - 1], 1).to(z.device)
        out, _ = continue_slots(self.model, z, starts, position_ids)
        return out

    def _confidence_input(self, layer: int, s: Tensor, h: Tensor, lengths: Tensor) -> Tensor:
        return self._policy.confidence(self, layer, s, h, lengths)

    # --- the prompt pass, cohort by cohort ---------------------------------------------------------

    def _admit(self, state: _RunState, slots: list[int]) -> _Cohort:
        """Embed waiting examples as a new cohort at layer 0."""
        device = self.model.cfg.device
        tokens, lengths_t = pad_right([state.examples[i].tokens for i in slots], self.pad_id, device)
        resid = self.model(tokens, stop_at_layer=0)
        state.stats.cohorts += 1
        return _Cohort(0, resid, list(slots), [len(state.examples[i].tokens) for i in slots],
                       torch.tensor(slots, device=device), lengths_t)

    def _check(self, state: _RunState, c: _Cohort) -> None:
        """The confidence of the cohort's rows at its layer; rows below the threshold exit."""
        layer, resid = c.layer, c.resid
        state.stats.checks += 1
        pick = torch.arange(len(c.slots), device=resid.device)
        h = resid[pick, (c.lengths_t - 1).to(resid.device)]
        s = resid[:, 0]
        cand, mask = state.cand[c.index], state.mask[c.index]
        x = self._confidence_input(layer, s, h, c.lengths_t)
        ent, dec = self._readout(x, cand, mask)
        leave = ent < self.tau[layer]
        leaving = torch.nonzero(leave).flatten()
        rows = leaving.tolist()  # the step's one synchronisation
        if not rows:
            return
        own = self._policy.confidence_lens == self.answer_lens  # the check already read the answer
        slots = [c.slots[r] for r in rows]
        at = leaving.to(cand.device)
        h_rows = h[leaving.to(h.device)]
        dec_rows = dec[leaving]
        if self.answer_lens == "simlens" and not own:
            state.pending.append((slots, [layer] * len(rows), s[leaving.to(s.device)], h_rows))
            state.n_pending += len(rows)
        elif self.answer_lens == "linear-simlens" and not own:
            _, dec_rows = self._readout(self.linear_lens.transform(h_rows, layer), cand[at], mask[at])
        elif self.answer_lens == "logit" and not own:
            _, dec_rows = self._readout(h_rows, cand[at], mask[at])
        entropies, decisions = torch.stack([ent[leaving].double(), dec_rows.to(ent.device).double()]).tolist()
        for slot, e, d in zip(slots, entropies, decisions):
            state.exit_layer[slot] = layer
            state.entropy[slot] = float(e)
            state.decision[slot] = int(d)
        left = set(rows)
        c.keep(~leave, [i for i in range(len(c.slots)) if i not in left])

    def _step(self, state: _RunState, c: _Cohort) -> None:
        """The check at the cohort's layer (where it has a threshold), then that layer's block."""
        layer = c.layer
        if self.tau[layer] > NO_EXIT:
            self._check(state, c)
            if not c.slots:
                return
        c.resid = self.model.blocks[layer](c.resid.to(block_device(self.model, layer)))
        stats = state.stats
        stats.block_calls += 1
        stats.row_layers += len(c.slots)
        stats.token_layers += len(c.slots) * c.resid.shape[1]
        stats.calls_per_block[layer] += 1
        c.layer += 1

    def _finish(self, state: _RunState, c: _Cohort) -> None:
        """Rows that reached L: the model's own output answers."""
        pick = torch.arange(len(c.slots), device=c.resid.device)
        h = c.resid[pick, (c.lengths_t - 1).to(c.resid.device)]
        _, dec = self._readout(h, state.cand[c.index], state.mask[c.index])
        for slot, d in zip(c.slots, dec.tolist()):
            state.decision[slot] = int(d)

    def _flush(self, state: _RunState) -> None:
        """Continue every pending pair with SimLens (one call) and read the answers out."""
        if not state.pending:
            return
        slots = [x for p in state.pending for x in p[0]]
        layers = [x for p in state.pending for x in p[1]]
        s = torch.cat([p[2] for p in state.pending])
        a = torch.cat([p[3] for p in state.pending])
        state.pending, state.n_pending = [], 0
        index = torch.tensor(slots, device=state.cand.device)
        out = self._continue(s, a, layers, state.lengths[index])
        _, dec = self._readout(out, state.cand[index], state.mask[index])
        for slot, d in zip(slots, dec.tolist()):
            state.decision[slot] = int(d)
        state.stats.continuations += 1

    @torch.inference_mode()
    def run(self, encoded, batch_size: int = 8, refill: bool = True) -> ExecutorResult:
        """All examples, at most `batch_size` in the prompt pass at once; with `refill` the
        slots of exited examples go to waiting ones (cohorts, above), without it the examples
        run in length-sorted batches, each until its last example exits. Results come in the
        order given."""
        examples = list(encoded)
        if int(batch_size) < 1:
            raise LensbenchError(f"batch_size must be at least 1 (got {batch_size})")
        batch_size = int(batch_size)
        model = self.model
        n_layers = model.cfg.n_layers
        if not examples:
            return ExecutorResult([], [], [], [], ExecutorStats(calls_per_block=[0] * n_layers))
        state = _RunState(examples, n_layers, model.cfg.device)
        order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].tokens), examples[i].index))
        waiting = 0  # next position in `order`
        need = max(1, math.ceil(self.refill_at * batch_size)) if refill else batch_size
        cohorts: list[_Cohort] = []
        while waiting < len(order) or cohorts:
            in_flight = sum(len(c.slots) for c in cohorts)
            free = batch_size - in_flight
            left = len(order) - waiting
            if left and (not cohorts or (refill and free >= min(need, left))):
                take = order[waiting : waiting + min(free, left)]
                waiting += len(take)
                new = self._admit(state, take)
                same = next((c for c in cohorts if c.layer == 0), None)
                if same is not None:
                    same.absorb(new)
                    state.stats.merges += 1
                else:
                    cohorts.append(new)
            c = min(cohorts, key=lambda x: x.layer)
            self._step(state, c)
            if not c.slots or c.layer == n_layers:
                if c.slots:
                    self._finish(state, c)
                cohorts.remove(c)
            else:
                same = next((o for o in cohorts if o is not c and o.layer == c.layer), None)
                if same is not None:  # caught up: one cohort (one block call per step) from here on
                    same.absorb(c)
                    cohorts.remove(c)
                    state.stats.merges += 1
            if state.n_pending >= self.flush_pairs:
                self._flush(state)
        self._flush(state)
        return ExecutorResult([e.index for e in examples], state.exit_layer, state.decision, state.entropy, state.stats)


    def run_batch(self, batch) -> ExecutorResult:
        """One batch of `EncodedExample`s (any lengths), right-padded, run until its last
        example exits (no refill: nothing is waiting)."""
        batch = list(batch)
        return self.run(batch, max(1, len(batch)), refill=False)


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
