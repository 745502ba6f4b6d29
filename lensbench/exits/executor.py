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

from lensbench.continuation import GraphedContinuation, StartKV, continue_slots, cuda_graphs_possible
from lensbench.errors import LensbenchError
from lensbench.exits.policies import ANSWER_LENSES, NO_EXIT, POLICIES, executor_policies
from lensbench.exits.simulate import threshold_vector
from lensbench.lenses.linear import CONFIG_FILE, LinearLens
from lensbench.readout import ReadoutPoint, block_device, pad_candidates, pad_right, unembed
from lensbench.readout import entropy as readout_entropy
from lensbench.tasks import make_batches, shared_start_token


@dataclass
class ExecutorStats:
    """How one `run` batched the prompt pass.

    block_calls: prompt block calls (what a small model on a GPU pays for: launches and one
    synchronisation per check, whatever the rows); row_layers: rows summed over those calls,
    which is the examples' exit layers summed (every row runs each block below its exit once);
    token_layers: rows x padded length summed over the calls; calls_per_block: block calls per
    block index; admissions: groups of waiting examples embedded together (the batches,
    without refill); merges: rows that joined others waiting at the same layer; checks:
    confidence readouts (one per group of rows arriving at a checked layer); continuations:
    SimLens continuation calls (flushes); max_in_flight: the most examples in the prompt pass
    at once."""

    block_calls: int = 0
    row_layers: int = 0
    token_layers: int = 0
    calls_per_block: list[int] = field(default_factory=list)
    admissions: int = 0
    merges: int = 0
    checks: int = 0
    continuations: int = 0
    max_in_flight: int = 0

    def rows_per_call(self) -> float:
        return self.row_layers / self.block_calls if self.block_calls else float("nan")

    def as_dict(self) -> dict:
        return {"block_calls": self.block_calls, "row_layers": self.row_layers, "token_layers": self.token_layers,
                "rows_per_call": self.rows_per_call(), "admissions": self.admissions, "merges": self.merges,
                "checks": self.checks, "continuations": self.continuations, "max_in_flight": self.max_in_flight}


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
DEFAULT_POOL = 4


def _bucket(n: int) -> int:
    """The graphed continuation's size for `n` pairs: the next power of two (few captures)."""
    return 1 << max(0, n - 1).bit_length()


def next_step(waiting: dict[int, int], in_flight: int, left: int, batch_size: int, capacity: int,
              admit_at: int | None) -> int | None:
    """The refill schedule's next step: None to let waiting examples in at layer 0, else the
    layer whose rows make the next block call (at most `batch_size` of them).

    waiting: rows waiting per layer; in_flight: examples in the prompt pass; left: examples
    not yet in; capacity: the most examples in the pass; admit_at: the room (free places) that
    lets examples in while others run (or all that are left, if fewer), None: only into an
    empty pass. The executor uses capacity = pool x batch_size and admit_at = batch_size;
    without refill capacity = batch_size and admit_at = None (a batch enters when the last one
    is done). `benchmarks/exit_batching.py` replays it on exit layers alone."""
    full = [layer for layer, n in waiting.items() if n >= batch_size]
    refill = admit_at is not None and capacity - in_flight >= min(admit_at, left)
    if not full and left and (in_flight == 0 or refill):
        return None
    return min(full) if full else min(layer for layer, n in waiting.items() if n)


@dataclass(eq=False)  # compared by identity, never by value
class _Rows:
    """Rows of the prompt pass at one layer: `resid` holds their residual stream there,
    right-padded to the longest of `lengths`, rows longest first; `slots` index the run's
    examples; `index` and `lengths_t` are device copies (so no step synchronises to build
    them)."""

    resid: Tensor
    slots: list[int]
    lengths: list[int]
    index: Tensor
    lengths_t: Tensor

    def __len__(self) -> int:
        return len(self.slots)

    def keep(self, keep: Tensor, kept: list[int]) -> None:
        """Keep the rows `kept` (`keep` is their mask), trimmed to the longest of them."""
        self.slots = [self.slots[i] for i in kept]
        self.lengths = [self.lengths[i] for i in kept]
        if not kept:
            return
        self.resid = self.resid[keep.to(self.resid.device)][:, : max(self.lengths)]
        self.index = self.index[keep.to(self.index.device)]
        self.lengths_t = self.lengths_t[keep.to(self.lengths_t.device)]

    def split(self, n: int) -> tuple["_Rows", "_Rows"]:
        """The first (longest) `n` rows and the rest, each trimmed to its longest prompt."""
        def part(a, b):
            lengths = self.lengths[a:b]
            return _Rows(self.resid[a:b, : max(lengths)], self.slots[a:b], lengths, self.index[a:b], self.lengths_t[a:b])
        return part(0, n), part(n, len(self))

    def absorb(self, other: "_Rows") -> None:
        """Take `other`'s rows (same layer), right-padded to the longer length and put in
        length order. The pad positions are zeros: with a causal mask no real position
        attends to them."""
        width = max(self.resid.shape[1], other.resid.shape[1])
        parts = [torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[1])) if r.shape[1] < width else r
                 for r in (self.resid, other.resid.to(self.resid.device))]
        self.resid = torch.cat(parts)
        self.slots = self.slots + other.slots
        self.lengths = self.lengths + other.lengths
        self.index = torch.cat([self.index, other.index.to(self.index.device)])
        self.lengths_t = torch.cat([self.lengths_t, other.lengths_t.to(self.lengths_t.device)])
        order = sorted(range(len(self)), key=lambda i: (-self.lengths[i], self.slots[i]))
        if order != list(range(len(self))):
            self.slots = [self.slots[i] for i in order]
            self.lengths = [self.lengths[i] for i in order]
            perm = torch.tensor(order)
            self.resid = self.resid[perm.to(self.resid.device)]
            self.index = self.index[perm.to(self.index.device)]
            self.lengths_t = self.lengths_t[perm.to(self.lengths_t.device)]


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
    confidence at a readout point falls below the threshold leave the prompt pass, and their
    `[s]`/`[a]` pairs are continued by SimLens (`continue_slots`) for the answer: `[a]` alone
    against the start token's cached keys and values (`StartKV`) when the examples share
    their start token and positions are consecutive.

    model: a HookedTransformer; linear_lens: a fitted `LinearLens` (needed by the
    `linear-simlens` policy or answer); threshold: a float or `{layer: tau}`; policy:
    linear-simlens (SimExit), logit or simlens; entropy: over the candidates or the vocabulary.
    Prompts are right-padded, so no attention mask is needed; rows that leave are cut out and
    the rest trimmed to their longest prompt.

    Batching with refill (`run(encoded, batch_size)`, the default). A block call runs at most
    `batch_size` rows (the memory of a call, as the full model's batch), and up to
    `pool x batch_size` examples are in the prompt pass at once (only their residual streams
    are kept between calls). Rows wait at their layer: the rows at one layer are one tensor,
    and rows arriving there (from the block below, or new examples embedded at layer 0) are
    checked, then merged into it. Each step runs one block call:

    1. the lowest layer where at least `batch_size` rows wait runs `batch_size` of them
       (a full call);
    2. else, if examples are waiting and the pool has room for a full call's worth, they
       enter at layer 0 (longest prompts first; as many as there is room for);
    3. else the lowest layer runs what it has, so its rows catch up with those above and
       merge with them.

    Why: every row runs each block below its exit layer once whatever the batching (the
    prompt pass's row-layers are the sum of the exit layers, also without refill, where exited
    rows are cut out), so what refill changes is how many rows share a block call. Without it
    a batch runs until its last example exits and its last calls carry a row or two; on a GPU
    a small model's block call costs about the same launches and synchronisation whatever its
    rows, so time follows the number of calls, `batches x the maximum exit layer`. Calling
    each block once per distinct layer at every step (continuous batching over layers) would
    multiply the calls; refilling a batch's freed slots with new examples at layer 0 that
    catch up with the older rows (cohorts, with `pool=1`) makes the catching-up calls half
    empty and, in simulations of spread exit layers, more calls than no refill. A pool larger
    than a call lets rows wait until a call is full: the calls approach
    `sum of exit layers / batch_size` (about 15-45 % fewer than without refill in those
    simulations, `pool=4`; docs/performance.md). `pool` trades memory for fuller calls.
    `run(..., refill=False)` is the batching without refill: length-sorted batches of
    `batch_size`, each run until its last example exits (`run_batch` runs one batch).

    Exited pairs that SimLens answers wait and are continued together once `flush_pairs` are
    pending, and at the end (`continue_slots`: block k runs once over every pair that needs
    it), so their cost does not grow with the number of exit steps.

    cuda_graphs (default: on for a model on one CUDA device, consecutive positions): the
    SimLens continuation replays per-block CUDA graphs (`GraphedContinuation`, one set per
    power-of-two number of pairs up to MAX_GRAPHED_PAIRS, captured on first use; one pass from
    the lowest start layer continues pairs that exited at different layers) instead of calling
    the blocks from Python. Hooks added to the model after capture are not seen by the graphs.
    """

    def __init__(self, model, linear_lens=None, threshold: float | dict = 0.0, policy: str = "linear-simlens",
                 answer_lens: str = "simlens", min_layer: int = 0, entropy: str = "candidates",
                 positions: str = "consecutive", pad_id: int = 0, cuda_graphs: bool | None = None,
                 pool: float = DEFAULT_POOL, flush_pairs: int = MAX_GRAPHED_PAIRS):
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
        if not (isinstance(pool, (int, float)) and math.isfinite(pool) and pool >= 1):
            raise LensbenchError(f"pool is a multiple of the batch size, at least 1 (got {pool})")
        if not (isinstance(flush_pairs, int) and flush_pairs >= 1):
            raise LensbenchError(f"flush_pairs must be a whole number of at least 1 (got {flush_pairs})")
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
        self.pool = float(pool)
        self.flush_pairs = flush_pairs
        self.tau = threshold_vector(threshold, n_layers, min_layer).tolist()
        on_cuda = cuda_graphs_possible(model)
        if cuda_graphs and not on_cuda:
            raise LensbenchError("cuda_graphs needs the model on one CUDA device")
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs)
        self._graphs: dict[tuple, object] = {}
        self._starts: dict[int, StartKV] = {}  # start token -> its cached keys and values
        self._start: StartKV | None = None  # the current run's (one start token, consecutive positions)

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
        key = (n, None if self._start is None else self._start.token_id)
        if key not in self._graphs:
            try:
                self._graphs[key] = GraphedContinuation(self.model, n, start=self._start)
            except Exception as exc:  # noqa: BLE001 - an uncapturable model runs eagerly, said once
                warnings.warn(f"SimExit: CUDA graphs unavailable ({type(exc).__name__}: {exc}); continuing eagerly")
                self.cuda_graphs = False
                return None
        return self._graphs[key]

    def _continue_graphed(self, z: Tensor, layers: list[int]) -> Tensor | None:
        """The graphed continuation in chunks of at most MAX_GRAPHED_PAIRS pairs, each padded to
        a power of two with pairs that start at L (never run); None where graphs cannot run."""
        n_layers = self.model.cfg.n_layers
        out = []
        for start in range(0, len(layers), MAX_GRAPHED_PAIRS):
            chunk = [int(x) for x in layers[start : start + MAX_GRAPHED_PAIRS]]
            n = len(chunk)
            runner = self._graphed(_bucket(n))
            if runner is None:
                return None
            zc = z[start : start + n]
            if runner.n > n:
                zc = torch.cat([zc, zc.new_zeros(runner.n - n, *zc.shape[1:])])
                chunk += [n_layers] * (runner.n - n)
            out.append(runner.run(zc, chunk)[:n].to(z.dtype))
        return torch.cat(out)

    def _continue(self, s: Tensor, a: Tensor, layers: list[int], lengths: Tensor) -> Tensor:
        n_layers = self.model.cfg.n_layers
        z = torch.stack([s, a], dim=1)
        if self.cuda_graphs and self.positions == "consecutive":
            out = self._continue_graphed(z, layers)
            if out is not None:
                return out
        starts = [ReadoutPoint(int(layer), "pre", n_layers) for layer in layers]
        position_ids = None
        if self.positions == "original":
            position_ids = torch.stack([torch.zeros_like(lengths), lengths - 1], 1).to(z.device)
        out, _ = continue_slots(self.model, z, starts, position_ids, start=self._start if position_ids is None else None)
        return out

    def _start_of(self, examples) -> StartKV | None:
        """The start token's cached keys and values when every example starts with the same
        token and positions are consecutive (`StartKV`: `[a]` alone runs the continuation)."""
        token = shared_start_token(examples)
        if self.positions != "consecutive" or token is None:
            return None
        return StartKV.of(self._starts, self.model, token)

    def _confidence_input(self, layer: int, s: Tensor, h: Tensor, lengths: Tensor) -> Tensor:
        return self._policy.confidence(self, layer, s, h, lengths)

    # --- the prompt pass ---------------------------------------------------------------------------

    def _admit(self, state: _RunState, slots: list[int]) -> _Rows:
        """Waiting examples, embedded: their rows at layer 0."""
        device = self.model.cfg.device
        tokens, lengths_t = pad_right([state.examples[i].tokens for i in slots], self.pad_id, device)
        state.stats.admissions += 1
        return _Rows(self.model(tokens, stop_at_layer=0), list(slots),
                     [len(state.examples[i].tokens) for i in slots], torch.tensor(slots, device=device), lengths_t)

    def _check(self, state: _RunState, rows: _Rows, layer: int) -> None:
        """The confidence of `rows` at `layer`; the rows below the threshold exit (their
        answers are read, or their pairs wait for SimLens) and are cut out of `rows`."""
        resid = rows.resid
        state.stats.checks += 1
        h = resid[torch.arange(len(rows), device=resid.device), (rows.lengths_t - 1).to(resid.device)]
        s = resid[:, 0]
        cand, mask = state.cand[rows.index], state.mask[rows.index]
        ent, dec = self._readout(self._confidence_input(layer, s, h, rows.lengths_t), cand, mask)
        leave = ent < self.tau[layer]
        leaving = torch.nonzero(leave).flatten()
        out = leaving.tolist()  # the check's one synchronisation
        if not out:
            return
        own = self._policy.confidence_lens == self.answer_lens  # the check already read the answer
        slots = [rows.slots[r] for r in out]
        at = leaving.to(cand.device)
        h_out = h[leaving.to(h.device)]
        dec_out = dec[leaving]
        if self.answer_lens == "simlens" and not own:
            state.pending.append((slots, [layer] * len(out), s[leaving.to(s.device)], h_out))
            state.n_pending += len(out)
        elif self.answer_lens == "linear-simlens" and not own:
            _, dec_out = self._readout(self.linear_lens.transform(h_out, layer), cand[at], mask[at])
        elif self.answer_lens == "logit" and not own:
            _, dec_out = self._readout(h_out, cand[at], mask[at])
        entropies, decisions = torch.stack([ent[leaving].double(), dec_out.to(ent.device).double()]).tolist()
        for slot, e, d in zip(slots, entropies, decisions):
            state.exit_layer[slot] = layer
            state.entropy[slot] = float(e)
            state.decision[slot] = int(d)
        gone = set(out)
        rows.keep(~leave, [i for i in range(len(rows)) if i not in gone])

    def _arrive(self, state: _RunState, waiting: dict[int, _Rows], rows: _Rows, layer: int) -> int:
        """`rows` reach `layer` (< L): checked there, the rest wait with the rows already there.
        Returns how many exited."""
        before = len(rows)
        if self.tau[layer] > NO_EXIT:
            self._check(state, rows, layer)
        if len(rows):
            if layer in waiting:
                waiting[layer].absorb(rows)
                state.stats.merges += 1
            else:
                waiting[layer] = rows
        return before - len(rows)

    def _finish(self, state: _RunState, rows: _Rows) -> None:
        """Rows that reached L: the model's own output answers."""
        h = rows.resid[torch.arange(len(rows), device=rows.resid.device), (rows.lengths_t - 1).to(rows.resid.device)]
        _, dec = self._readout(h, state.cand[rows.index], state.mask[rows.index])
        for slot, d in zip(rows.slots, dec.tolist()):
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
        """Every example of `encoded`, block calls of at most `batch_size` rows; with `refill`
        up to `pool x batch_size` examples in the prompt pass, rows waiting at their layer for
        full calls (class docstring); without it, length-sorted batches, each until its last
        example exits. Results come in the order given, with the run's `ExecutorStats`."""
        examples = list(encoded)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise LensbenchError(f"batch_size must be a whole number of at least 1 (got {batch_size})")
        model = self.model
        n_layers = model.cfg.n_layers
        state = _RunState(examples, n_layers, model.cfg.device) if examples else None
        if state is None:
            return ExecutorResult([], [], [], [], ExecutorStats(calls_per_block=[0] * n_layers))
        stats = state.stats
        self._start = self._start_of(examples)
        order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].tokens), examples[i].index))
        next_up = 0  # the next position of `order` to enter
        # at batch size 1 every call is full: a pool would only hold memory
        capacity = max(batch_size, int(self.pool * batch_size)) if refill and batch_size > 1 else batch_size
        waiting: dict[int, _Rows] = {}  # layer -> the rows waiting there (checked at that layer)
        in_flight = 0
        while next_up < len(order) or waiting:
            left = len(order) - next_up
            layer = next_step({k: len(rows) for k, rows in waiting.items()}, in_flight, left, batch_size, capacity,
                              batch_size if refill else None)
            if layer is None:
                slots = order[next_up : next_up + min(capacity - in_flight, left)]
                next_up += len(slots)
                in_flight += len(slots)
                stats.max_in_flight = max(stats.max_in_flight, in_flight)
                in_flight -= self._arrive(state, waiting, self._admit(state, slots), 0)
            else:
                rows = waiting.pop(layer)
                if len(rows) > batch_size:
                    rows, waiting[layer] = rows.split(batch_size)
                rows.resid = model.blocks[layer](rows.resid.to(block_device(model, layer)))
                stats.block_calls += 1
                stats.row_layers += len(rows)
                stats.token_layers += len(rows) * rows.resid.shape[1]
                stats.calls_per_block[layer] += 1
                if layer + 1 == n_layers:
                    self._finish(state, rows)
                    in_flight -= len(rows)
                else:
                    in_flight -= self._arrive(state, waiting, rows, layer + 1)
            if state.n_pending >= self.flush_pairs:
                self._flush(state)
        self._flush(state)
        return ExecutorResult([e.index for e in examples], state.exit_layer, state.decision, state.entropy, stats)

    def run_batch(self, batch) -> ExecutorResult:
        """One batch of `EncodedExample`s (any lengths), right-padded, run until its last
        example exits (no refill: nothing else is waiting)."""
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
