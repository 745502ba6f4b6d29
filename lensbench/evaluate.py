"""One batch of examples through every lens at every readout point, and its stored tables.

`evaluate_batch` runs one hooked forward pass over the batch to gather the slot residuals,
hands them to each lens (`Lens.final_residuals`), and reads every lens out through the same
unembedding; `evaluate_with_backoff` splits a batch that runs out of memory. The columns it
returns are those of `predictions.parquet` (docs/format.md).
"""

from __future__ import annotations

import json
import sys
import weakref
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from lensbench.lenses import Lens, LensBatch, LensOutput, RunContext
from lensbench.readout import check_extra_positions, collect_slots, pad_candidates, pad_right, unembed
from lensbench.readout import entropy as readout_entropy
from lensbench.tasks import EncodedExample, Example


@dataclass
class BatchResult:
    """Columns for one batch of predictions, plus attention sums for the role analyses."""

    columns: dict[str, list]
    attention_sum: torch.Tensor | None = None  # (point, block, head)
    attention_count: torch.Tensor | None = None  # (point, block)
    attention_lens: str | None = None  # the lens whose output had the attention
    # With `track_ids`: each tracked token's full-vocabulary log-probability and rank (1 = top-1),
    # arrays of shape (lens, point, example, tracked token).
    tracked_logprobs: np.ndarray | None = None
    tracked_ranks: np.ndarray | None = None


@torch.inference_mode()
def evaluate_batch(
    model,
    lenses: list[Lens],
    ctx: RunContext,
    batch: list[EncodedExample],
    topk: int = 5,
    entropy: str = "candidates",
    track_ids: list[int] | tuple[int, ...] = (),
) -> BatchResult:
    """Run every lens at every readout point on one batch of examples.

    track_ids: token ids whose full-vocabulary log-probability and rank are also returned
    (`BatchResult.tracked_logprobs`, `tracked_ranks`; the live probe's pinned tokens).

    Everything up to the decisions stays on the model's device; the results cross to the host
    once, at the end (no synchronisation per lens, point or row), and the columns are built
    from whole arrays rather than row by row.
    """
    points = ctx.points
    indices = [e.index for e in batch]
    aux = []
    for lens in lenses:
        for donor in lens.donors(indices):
            if donor not in indices and donor not in aux:
                aux.append(donor)
    rows = batch + [ctx.examples[i] for i in aux]
    extra = tuple(sorted({p for lens in lenses for p in lens.extra_positions()}))
    if extra:
        check_extra_positions([len(e.tokens) for e in rows], list(extra), [e.id for e in rows])
    device = model.cfg.device
    tokens, lengths = pad_right([e.tokens for e in rows], ctx.pad_id, device)
    slots = collect_slots(model, tokens, lengths, points, extra)
    lens_batch = LensBatch(model, slots, len(batch), torch.tensor(indices + aux), lenses=tuple(lenses))

    b = len(batch)
    final_logits = unembed(model, slots.a[-1, :b])  # float32, on the unembedding's device
    out_device = final_logits.device
    cand_ids, cand_mask = pad_candidates([e.candidate_ids for e in batch], out_device)
    final_decision = final_logits.gather(1, cand_ids).masked_fill(~cand_mask, -torch.inf).argmax(-1)

    attention_sum = attention_count = attention_lens = None
    outputs = []
    for lens in lenses:
        output = lens.final_residuals(lens_batch)
        if output.attention is not None:
            attention_lens = attention_lens or lens.name
            att = output.attention.float()
            valid = ~torch.isnan(att)
            sums = torch.where(valid, att, torch.zeros_like(att)).sum(1)
            counts = valid[..., 0].sum(1).float()
            attention_sum = sums if attention_sum is None else attention_sum + sums
            attention_count = counts if attention_count is None else attention_count + counts
        outputs.append(output)
    tracked = torch.tensor(list(track_ids), dtype=torch.long, device=out_device) if len(track_ids) else None
    read = read_out(model, outputs, cand_ids, cand_mask, topk, entropy, tracked)
    # The one transfer to the host: (lens, point, b, ...) arrays.
    decision, ent, cand_lp, top_p, top_i = (read[name].cpu().numpy() for name in ("decision", "entropy", "cand_lp",
                                                                                   "top_p", "top_i"))
    final_np = final_decision.cpu().numpy()
    if attention_sum is not None:
        attention_sum, attention_count = attention_sum.cpu(), attention_count.cpu()
    tracked_lp = tracked_rank = None
    if tracked is not None:
        tracked_lp, tracked_rank = read["tracked_lp"].cpu().numpy(), read["tracked_rank"].cpu().numpy()
    return BatchResult(
        _batch_columns(model.tokenizer, lenses, points, batch, decision, ent, cand_lp, top_p, top_i, final_np),
        attention_sum, attention_count, attention_lens, tracked_lp, tracked_rank,
    )


# A chunk of the readout makes at most this many float32 logits (rows x vocabulary).
READOUT_VALUES = 3e7
# Lenses are stacked into one matmul when each of their per-lens chunks had at least this many
# rows: a row's logits then do not depend on the other rows of the matmul (BLAS computes a
# product of a few rows, like a matrix-vector one, on another path: with MKL on 1-8 threads
# rows agree from 12 rows up; tests/unit/test_readout.py checks the equality).
FUSE_MIN_ROWS = 16


def read_out(model, outputs: list[LensOutput], cand_ids: Tensor, cand_mask: Tensor, topk: int = 5,
             entropy: str = "candidates", tracked: Tensor | None = None) -> dict[str, Tensor]:
    """Every lens output through the shared readout `W_U · LN_final(·)`, in float32.

    Returns `(lens, point, example, ...)` tensors: `decision`, `entropy`, `cand_lp` (candidate
    log-probabilities, -inf past an example's candidates), `top_p`, `top_i` and, with
    `tracked` token ids, `tracked_lp` (their vocabulary log-probabilities) and `tracked_rank`
    (1 = top-1).

    The rows of all lenses are stacked and read out together: one unembedding matmul,
    log-normaliser and top-k per chunk of at most `READOUT_VALUES` logits for every lens, not
    one per lens (so `W_U` is read once, not once per lens, and a GPU runs a few kernels
    instead of a few per lens); the candidate softmax, entropies and decisions are then one
    set of operations over all (lens, point, example) rows. A row's results are those of
    reading its lens out alone.

    A shared output (`LensOutput.shared`: one row per point for the whole batch) is read out
    on its own, in the chunks of points the per-lens readout gave it, and its logits are kept
    in `output.readout`: when a lens hands back the same `LensOutput` again (SimLens's memo of
    the start token's states, from batch to batch and probe to probe) only the candidates and
    tracked tokens are gathered from them.
    """
    n_lens = len(outputs)
    n_points = outputs[0].resid.shape[0]
    b, n_cand = cand_ids.shape
    key = (topk, entropy)
    device = cand_ids.device

    def quantities(logits: Tensor) -> dict[str, Tensor]:
        """What a row of logits gives whatever the batch: the log-normaliser, the top-k and the
        vocabulary entropy (two passes over the vocabulary, log-normaliser and top-k, rather
        than a materialised log-softmax: the readout is memory-bound)."""
        log_norm = torch.logsumexp(logits, -1, keepdim=True)
        top_logits, top_i = logits.topk(topk, dim=-1)
        rows = {"log_norm": log_norm, "top_p": (top_logits - log_norm).exp(), "top_i": top_i}
        if entropy == "vocab":
            rows["vocab_entropy"] = readout_entropy(logits - log_norm)
        return rows

    def tracked_of(logits: Tensor, log_norm: Tensor) -> dict[str, Tensor]:
        if tracked is None:
            return {}
        chosen = logits[:, tracked]  # (rows, tracked)
        # a count per tracked token (int32 sums: 5x faster than int64 ones over a big bool tensor)
        above = [(logits > chosen[:, k : k + 1]).sum(-1, dtype=torch.int32) for k in range(chosen.shape[1])]
        return {"tracked_lp": chosen - log_norm, "tracked_rank": torch.stack(above, -1).long() + 1}

    parts: dict[str, list[Tensor]] = {}  # per source row (a shared output: one per point)
    first_row = [0] * n_lens
    cands: list[Tensor | None] = [None] * n_lens  # per output row: (point * b, n_cand) candidate logits

    def add(rows: dict[str, Tensor]) -> None:
        for name, value in rows.items():
            parts.setdefault(name, []).append(value)

    def n_rows() -> int:
        return sum(len(t) for t in parts.get("log_norm", []))

    # The per-lens readout's chunks: as many points as fit `READOUT_VALUES` logits for the batch.
    # A lens read out on its own (a shared output; a lens too small to stack) keeps them, so its
    # values are those it always had at every batch size: BLAS may compute a chunk of a few rows
    # (a shared output's last point alone is a matrix-vector product) on another path.
    chunk_points = min(n_points, max(1, int(READOUT_VALUES // (b * model.cfg.d_vocab_out))))
    for i, output in enumerate(outputs):
        if not output.shared:
            continue
        memo = output.readout
        if memo.get("key") != (*key, chunk_points):
            chunks = []
            for start in range(0, n_points, chunk_points):
                logits = unembed(model, output.resid[start : start + chunk_points, 0])
                chunks.append((logits, quantities(logits)))
            memo.clear()
            memo.update(key=(*key, chunk_points), logits=torch.cat([c[0] for c in chunks]),
                        rows={name: torch.cat([c[1][name] for c in chunks]) for name in chunks[0][1]})
        first_row[i] = n_rows()
        add({**memo["rows"], **tracked_of(memo["logits"], memo["rows"]["log_norm"])})
        cands[i] = memo["logits"][:, cand_ids.reshape(-1)].reshape(n_points * b, n_cand)

    own = [i for i, output in enumerate(outputs) if not output.shared]
    # Stacked when every per-lens chunk had enough rows to be computed as any row of a bigger
    # matmul; otherwise each lens on its own, in its per-lens chunks.
    last_points = n_points - (n_points - 1) // chunk_points * chunk_points
    fused = min(chunk_points, last_points) * b >= FUSE_MIN_ROWS
    examples = torch.arange(b, device=device)
    for group in ([own] if fused and own else [[i] for i in own]):
        stack = torch.cat([outputs[i].resid.reshape(-1, outputs[i].resid.shape[-1]) for i in group])
        row_cands = cand_ids[examples.repeat(n_points * len(group))]  # (rows, n_cand): each row's example's
        for k, i in enumerate(group):
            first_row[i] = n_rows() + k * n_points * b
        if fused:
            most = max(1, int(READOUT_VALUES // model.cfg.d_vocab_out))
            n_chunks = -(-len(stack) // most)
            size = -(-len(stack) // n_chunks)  # balanced chunks: none of a few leftover rows
        else:
            size = chunk_points * b
        group_cands = []
        for start in range(0, len(stack), size):
            logits = unembed(model, stack[start : start + size])
            rows = quantities(logits)
            add({**rows, **tracked_of(logits, rows["log_norm"])})
            group_cands.append(logits.gather(1, row_cands[start : start + size]))
            del logits
        for i, values in zip(group, torch.cat(group_cands).split(n_points * b)):
            cands[i] = values
    rows = {name: torch.cat(values) for name, values in parts.items()}

    # The source row of each (lens, point, example): a shared output has one per point.
    points = torch.arange(n_points, device=device)[:, None]
    source = torch.cat([(first_row[i] + (points + 0 * examples if o.shared else points * b + examples)).reshape(-1)
                        for i, o in enumerate(outputs)])
    example = examples.repeat(n_lens * n_points)
    cand_lp = torch.log_softmax(torch.cat(cands).masked_fill(~cand_mask[example], -torch.inf), -1)
    ent = readout_entropy(cand_lp) if entropy == "candidates" else rows["vocab_entropy"][source]
    shape = (n_lens, n_points, b)
    out = {"decision": cand_lp.argmax(-1).view(shape), "entropy": ent.view(shape), "cand_lp": cand_lp.view(*shape, -1),
           "top_p": rows["top_p"][source].view(*shape, -1), "top_i": rows["top_i"][source].view(*shape, -1)}
    if tracked is not None:
        out["tracked_lp"] = rows["tracked_lp"][source].view(*shape, -1)
        out["tracked_rank"] = rows["tracked_rank"][source].view(*shape, -1)
    return out


def _batch_columns(tokenizer, lenses, points, batch, decision, ent, cand_lp, top_p, top_i, final_decision) -> dict[str, list]:
    """The prediction columns, one entry per (lens, point, example) in that nesting order."""
    n_lens, n_points, b = decision.shape
    n_rows = n_lens * n_points * b
    row_of = np.tile(np.arange(b), n_lens * n_points)
    indices = [e.index for e in batch]
    gold = np.array([e.gold for e in batch])
    cand_tokens = [[token_text(tokenizer, c) for c in e.candidate_ids] for e in batch]
    donors = []
    for lens in lenses:
        donors.extend(lens.donor_column(indices) * n_points)
    flat_decision = decision.reshape(-1)
    n_cands = [len(e.candidate_ids) for e in batch]
    cand_rows = cand_lp.reshape(n_rows, -1).tolist()
    if min(n_cands) != cand_lp.shape[-1]:
        cand_rows = [values[: n_cands[r]] for values, r in zip(cand_rows, row_of.tolist())]
    layers = [p.layer for p in points]
    sites = ["final" if p.is_final else p.site for p in points]
    return {
        "example_index": [indices[r] for r in row_of.tolist()],
        "example_id": [batch[r].id for r in row_of.tolist()],
        "lens": [lens.name for lens in lenses for _ in range(n_points * b)],
        "layer": np.repeat(layers, b).tolist() * n_lens,
        "site": [site for site in sites for _ in range(b)] * n_lens,
        "decision": flat_decision.tolist(),
        "decision_token": [cand_tokens[r][d] for r, d in zip(row_of.tolist(), flat_decision.tolist())],
        "gold": gold[row_of].tolist(),
        "correct": (flat_decision == gold[row_of]).tolist(),
        "final_decision": final_decision[row_of].tolist(),
        "agrees_final": (flat_decision == final_decision[row_of]).tolist(),
        "entropy": ent.reshape(-1).tolist(),
        "candidate_logprobs": cand_rows,
        "topk_ids": top_i.reshape(n_rows, -1).tolist(),
        "topk_probs": top_p.reshape(n_rows, -1).tolist(),
        "donor_index": donors,
    }


_TOKEN_TEXTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def token_text(tokenizer, token_id: int) -> str:
    """`tokenizer.decode([token_id])`, remembered per tokenizer (a decode costs tens of
    microseconds; a probe or a batch decodes hundreds of top-k tokens, most seen before)."""
    try:
        texts = _TOKEN_TEXTS.setdefault(tokenizer, {})
    except TypeError:  # not weakly referenceable
        return tokenizer.decode([token_id])
    token_id = int(token_id)
    text = texts.get(token_id)
    if text is None:
        text = texts[token_id] = tokenizer.decode([token_id])
    return text


def _decode_each(tokenizer, ids: list[list[int]]) -> list[list[str]]:
    """`[[decode([i]) for i in row] for row in ids]`, decoding each distinct id once."""
    if not ids or len({len(row) for row in ids}) != 1 or not ids[0]:  # empty or ragged
        return [[token_text(tokenizer, i) for i in row] for row in ids]
    unique, inverse = np.unique(np.asarray(ids, dtype=np.int64).reshape(-1), return_inverse=True)
    text = np.array([token_text(tokenizer, i) for i in unique] + [None], dtype=object)[:-1]
    return text[inverse].reshape(len(ids), -1).tolist()


def predictions_table(columns: dict[str, list], tokenizer) -> pa.Table:
    top_tokens = _decode_each(tokenizer, columns["topk_ids"])
    return pa.table({
        "example_index": pa.array(columns["example_index"], pa.int32()),
        "example_id": pa.array(columns["example_id"], pa.string()),
        "lens": pa.array(columns["lens"], pa.string()),
        "layer": pa.array(columns["layer"], pa.int16()),
        "site": pa.array(columns["site"], pa.string()),
        "decision": pa.array(columns["decision"], pa.int16()),
        "decision_token": pa.array(columns["decision_token"], pa.string()),
        "gold": pa.array(columns["gold"], pa.int16()),
        "correct": pa.array(columns["correct"], pa.bool_()),
        "final_decision": pa.array(columns["final_decision"], pa.int16()),
        "agrees_final": pa.array(columns["agrees_final"], pa.bool_()),
        "entropy": pa.array(columns["entropy"], pa.float32()),
        "candidate_logprobs": pa.array(columns["candidate_logprobs"], pa.list_(pa.float32())),
        "topk_ids": pa.array(columns["topk_ids"], pa.list_(pa.int32())),
        "topk_tokens": pa.array(top_tokens, pa.list_(pa.string())),
        "topk_probs": pa.array(columns["topk_probs"], pa.list_(pa.float32())),
        "donor_index": pa.array(columns["donor_index"], pa.int32()),
    })


def examples_table(examples: list[Example], encoded: list[EncodedExample], tokenizer) -> pa.Table:
    by_index = {e.index: e for e in encoded}
    rows = [(i, examples[i], by_index[i]) for i in sorted(by_index)]
    return pa.table({
        "example_index": pa.array([i for i, _, _ in rows], pa.int32()),
        "example_id": [e.id for _, e, _ in rows],
        "prompt": [e.prompt for _, e, _ in rows],
        "choices": pa.array([e.choices for _, e, _ in rows], pa.list_(pa.string())),
        "gold": pa.array([e.gold for _, e, _ in rows], pa.int16()),
        "n_tokens": pa.array([len(enc.tokens) for _, _, enc in rows], pa.int32()),
        "start_token": [token_text(tokenizer, enc.tokens[0]) for _, _, enc in rows],
        "answer_token": [token_text(tokenizer, enc.tokens[-1]) for _, _, enc in rows],
        "metadata": [json.dumps(e.metadata, default=str) for _, e, _ in rows],
    })


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error, which a smaller batch may avoid."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


class BatchSizer:
    """The largest sub-batch believed to fit, learnt from out-of-memory errors.

    It starts at the plan's batch size. An out-of-memory error on `rows` prompts padded to
    `length` tokens halves the token budget to `rows * length / 2`; a later sub-batch gets as
    many rows as the budget allows at its own padded length, so the size grows back as the
    (length-sorted) prompts get shorter, never beyond the plan's batch size.
    """

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.token_budget: int | None = None
        self.backoffs = 0

    def rows_for(self, length: int) -> int:
        if self.token_budget is None:
            return self.max_rows
        return max(1, min(self.max_rows, self.token_budget // max(1, length)))

    def shrink(self, rows: int, length: int) -> None:
        self.token_budget = max(1, rows * length // 2)
        self.backoffs += 1


def merge_results(results: list[BatchResult]) -> BatchResult:
    """One BatchResult from those of consecutive sub-batches (rows concatenated, sums added)."""
    if len(results) == 1:
        return results[0]
    columns = {k: [v for r in results for v in r.columns[k]] for k in results[0].columns}
    sums = [r.attention_sum for r in results if r.attention_sum is not None]
    counts = [r.attention_count for r in results if r.attention_count is not None]
    lens = next((r.attention_lens for r in results if r.attention_lens is not None), None)
    return BatchResult(columns, sum(sums) if sums else None, sum(counts) if counts else None, lens)


def evaluate_with_backoff(
    model, lenses: list[Lens], ctx: RunContext, batch: list[EncodedExample], sizer: BatchSizer,
    topk: int = 5, entropy: str = "candidates",
) -> BatchResult:
    """`evaluate_batch` on `batch`, split into smaller sub-batches while they run out of memory.

    Every example is evaluated exactly once: a sub-batch that fails is retried whole, smaller,
    and only finished sub-batches are kept. A single example that does not fit is an error.
    """
    results = []
    done = 0
    while done < len(batch):
        length = max(len(e.tokens) for e in batch[done:])
        rows = min(sizer.rows_for(length), len(batch) - done)
        sub = batch[done : done + rows]
        try:
            results.append(evaluate_batch(model, lenses, ctx, sub, topk, entropy))
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_out_of_memory(exc) or rows == 1:
                raise
            failed_length = max(len(e.tokens) for e in sub)
        else:
            done += rows
            continue
        # Outside the except block, so the failed attempt's tensors are already released.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        sizer.shrink(rows, failed_length)
        print(f"lensbench: out of memory at {rows} x {failed_length} tokens; "
              f"retrying with {sizer.rows_for(failed_length)} example(s) per batch", file=sys.stderr)
    return merge_results(results)
