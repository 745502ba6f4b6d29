"""The five ICL measurements of one batch of queries (docs/METHOD.md, "In-context learning").

One hooked forward pass each over the few-shot prompts (residuals at every point, and the
attention pattern from the last position), the uninformative-demonstration prompts and the
zero-shot queries; then, from those caches:

1. the readout of the last position at every point (logit lens, SimLens) for all three prompts;
2. global task-vector patching: the donors' mean last-position residual written at the zero-shot
   query's last position, continued to the output;
3. local task-vector patching: the few-shot prompt's residuals at the label positions (and, as
   an option, the separators) written into the uninformative prompt, continued to the output;
4. convergence: cosines between the local vectors of a prompt, with other prompts' (the donors'),
   with the prompt's last position and with the global vector; and their decoded labels;
5. attention from the last position to the label, separator, start, query and other positions.

Every patch goes through `lensbench.icl.patching`: the fast path, or with `fast=False` the
TransformerLens hook reference (one forward pass per point), which must give the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lensbench.continuation import continue_slots
from lensbench.icl.patching import (
    PatchPoint, collect_residuals, patched_final_residuals, patched_logits_hooked,
)
from lensbench.icl.tasks import ICLPrompt
from lensbench.readout import pad_right

LENSES = ("logit", "simlens")
DECIDE = ("candidates", "vocab")
ATTENTION_TARGETS = ("label", "separator", "start", "query", "other")


@dataclass
class Setup:
    """What every batch shares: the model, the points, the label tokens, the donors' vectors."""

    model: object
    points: list[PatchPoint]
    label_ids: Tensor  # (label,) token ids, in task.labels order
    pad_id: int
    donors: dict  # global, center, donor_unit, donor_unit_c: (point, d_model) each
    lenses: tuple[str, ...] = LENSES
    mode: str = "replace"
    with_separator: bool = False
    decide: str = "candidates"
    fast: bool = True
    max_tokens: int = 16384


# --- readout ----------------------------------------------------------------------------------


def read_labels(model, resid: Float[Tensor, "n d_model"], label_ids: Tensor, decide: str = "candidates", chunk: int = 256):
    """Decisions (index into the labels; -1 when `decide="vocab"` picks a token that is no
    label) and the log-softmax over the labels, for final-layer residuals."""
    decisions, logprobs = [], []
    ln = model.ln_final
    w = model.unembed.W_U
    b = model.unembed.b_U
    ids = label_ids.to(w.device)
    for i in range(0, resid.shape[0], chunk):
        normed = ln(resid[i : i + chunk].to(w.device)[:, None])[:, 0]
        cand = (normed @ w[:, ids] + b[ids]).float()
        lp = cand.log_softmax(-1)
        if decide == "vocab":
            top = (normed @ w + b).argmax(-1)
            match = top[:, None] == ids[None]
            dec = torch.where(match.any(-1), match.float().argmax(-1), torch.full_like(top, -1))
        else:
            dec = cand.argmax(-1)
        decisions.append(dec.cpu())
        logprobs.append(lp.cpu())
    return torch.cat(decisions), torch.cat(logprobs)


def _simlens_final(model, s: Float[Tensor, "n d"], a: Float[Tensor, "n d"], points: list[PatchPoint]) -> Float[Tensor, "n d"]:
    z = torch.stack([s, a], dim=1)
    final, _ = continue_slots(model, z, [p.readout for p in points])
    return final


def _readouts(setup: Setup, s, a) -> dict[str, tuple[Tensor, Tensor]]:
    """Per lens: (decision, label logprobs) of residuals `a` (point, row, d) with start `s`."""
    n_points, n_rows, d = a.shape
    out = {}
    for lens in setup.lenses:
        if lens == "logit":
            final = a.reshape(-1, d)
        else:
            flat_points = [p for p in setup.points for _ in range(n_rows)]
            final = _simlens_final(setup.model, s.reshape(-1, d), a.reshape(-1, d), flat_points)
        dec, lp = read_labels(setup.model, final, setup.label_ids, setup.decide)
        out[lens] = (dec.view(n_points, n_rows), lp.view(n_points, n_rows, -1))
    return out


# --- donors: the global vector and the references of the cosines ---------------------------------


@torch.inference_mode()
def donor_vectors(model, points: list[PatchPoint], donors: list[ICLPrompt], pad_id: int, batch_size: int = 8) -> dict:
    """From N few-shot donor prompts, per point: `global` (mean last-position residual), `center`
    (mean residual over all positions but `[s]`), `donor_unit` / `donor_unit_c` (mean unit
    vector of the donors' label-position residuals, raw / centred: the mean cosine of any
    vector with the donors' local vectors is its unit vector dotted with these)."""
    finals, local, total, count = [], [], None, 0
    for i in range(0, len(donors), batch_size):
        chunk = donors[i : i + batch_size]
        tokens, lengths = pad_right([p.tokens for p in chunk], pad_id, "cpu")
        resid, _ = collect_residuals(model, tokens, points)  # (point, row, seq, d)
        resid = resid.float().cpu()
        rows = torch.arange(len(chunk))
        finals.append(resid[:, rows, lengths - 1])
        mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]) & (torch.arange(tokens.shape[1])[None] > 0)
        part = (resid * mask[None, :, :, None]).sum((1, 2))
        total = part if total is None else total + part
        count += int(mask.sum())
        positions = torch.tensor([p.label_positions for p in chunk])
        local.append(resid[:, rows[:, None], positions])  # (point, row, k, d)
    center = total / count
    local_all = torch.cat(local, 1).flatten(1, 2)  # (point, n, d)
    return {
        "global": torch.cat(finals, 1).mean(1),
        "center": center,
        "donor_unit": F.normalize(local_all, dim=-1).mean(1),
        "donor_unit_c": F.normalize(local_all - center[:, None], dim=-1).mean(1),
    }


# --- one batch ----------------------------------------------------------------------------------


def _patched_decisions(setup: Setup, resid, tokens, lengths, positions, vectors) -> tuple[Tensor, Tensor]:
    """(decision, label logprobs) per (point, row) after patching and running to the output."""
    n_points, n_rows = vectors.shape[:2]
    if setup.fast:
        final = patched_final_residuals(setup.model, resid, lengths, setup.points, positions, vectors, setup.mode,
                                        setup.max_tokens)
        dec, lp = read_labels(setup.model, final.reshape(n_points * n_rows, -1), setup.label_ids, setup.decide)
        return dec.view(n_points, n_rows), lp.view(n_points, n_rows, -1)
    decs, lps = [], []
    ids = setup.label_ids
    for i, point in enumerate(setup.points):
        logits = patched_logits_hooked(setup.model, tokens, lengths, point, positions, vectors[i], setup.mode).cpu()
        cand = logits[:, ids]
        if setup.decide == "vocab":
            top = logits.argmax(-1)
            match = top[:, None] == ids[None]
            dec = torch.where(match.any(-1), match.float().argmax(-1), torch.full_like(top, -1))
        else:
            dec = cand.argmax(-1)
        decs.append(dec)
        lps.append(cand.log_softmax(-1))
    return torch.stack(decs), torch.stack(lps)


def _cos_rows(x: Tensor, y: Tensor) -> Tensor:
    return F.cosine_similarity(x, y, dim=-1)


def convergence(local: Tensor, final: Tensor, donors: dict) -> dict[str, Tensor]:
    """Cosines per (point, row), raw and centred: `within` (mean over pairs of a prompt's local
    vectors), `across` (mean with the donors' local vectors), `to_final` (local vs the prompt's
    last position), `to_global` (local vs the global vector), `final_to_global`."""
    out = {}
    for suffix, c, unit in (("", None, donors["donor_unit"]), ("_c", donors["center"], donors["donor_unit_c"])):
        v, f, g = local, final, donors["global"]
        if c is not None:
            v, f, g = v - c[:, None, None], f - c[:, None], g - c
        u = F.normalize(v, dim=-1)  # (point, row, k, d)
        k = u.shape[2]
        s = u.sum(2)
        out["within" + suffix] = ((s * s).sum(-1) - k) / max(k * (k - 1), 1)
        out["across" + suffix] = (u * unit[:, None, None]).sum(-1).mean(-1)
        out["to_final" + suffix] = _cos_rows(v, f[:, :, None].expand_as(v)).mean(-1)
        out["to_global" + suffix] = _cos_rows(v, g[:, None, None].expand_as(v)).mean(-1)
        out["final_to_global" + suffix] = _cos_rows(f, g[:, None].expand_as(f))
    return out


def attention_flow(pattern: Tensor, prompts: list[ICLPrompt]) -> tuple[Tensor, Tensor, Tensor]:
    """Attention of the last position, summed over each target's positions: mean and max over
    heads (block, row, target), and the positions per target (row, target)."""
    n_blocks, n_rows, n_heads, seq = pattern.shape
    masks = torch.zeros(n_rows, len(ATTENTION_TARGETS), seq)
    for r, p in enumerate(prompts):
        last = p.length - 1
        masks[r, 1, p.sep_positions] = 1
        masks[r, 0, p.label_positions] = 1
        masks[r, 2, 0] = 1
        first_query = p.length - (len(p.zero_tokens) - 1)  # the query's own tokens (as many as zero-shot has)
        masks[r, 3, first_query : last + 1] = 1
        masks[r, 3] *= 1 - masks[r, :3].sum(0).clamp(max=1)
        masks[r, 4, : last + 1] = 1 - masks[r, :4].sum(0).clamp(max=1)[: last + 1]
    summed = torch.einsum("brhs,rts->brht", pattern.float().cpu(), masks)
    return summed.mean(2), summed.amax(2), masks.sum(-1)


@torch.inference_mode()
def measure_batch(setup: Setup, prompts: list[ICLPrompt]) -> dict:
    """Everything measured on one batch, as plain tensors (the runner writes the tables)."""
    model = setup.model
    points = setup.points
    rows = torch.arange(len(prompts))
    shot_tokens, lengths = pad_right([p.tokens for p in prompts], setup.pad_id, "cpu")
    base_tokens, _ = pad_right([p.baseline_tokens for p in prompts], setup.pad_id, "cpu")
    zero_tokens, zero_lengths = pad_right([p.zero_tokens for p in prompts], setup.pad_id, "cpu")
    last = lengths - 1

    shot, pattern = collect_residuals(model, shot_tokens, points, pattern_rows=last)
    base, _ = collect_residuals(model, base_tokens, points)
    zero, _ = collect_residuals(model, zero_tokens, points)

    result: dict = {"readout": {}}
    for name, resid, ends in (("few-shot", shot, last), ("baseline", base, last), ("zero-shot", zero, zero_lengths - 1)):
        result["readout"][name] = _readouts(setup, resid[:, :, 0], resid[:, rows, ends])

    # 2. global patching into the zero-shot query's last position
    n_points = len(points)
    g = setup.donors["global"].to(zero.dtype)
    vectors = g[:, None, None].expand(n_points, len(prompts), 1, g.shape[-1])
    result["global"] = _patched_decisions(setup, zero, zero_tokens, zero_lengths, (zero_lengths - 1)[:, None], vectors)

    # 3. local patching into the uninformative prompt at the label positions (and separators)
    label_pos = torch.tensor([p.label_positions for p in prompts])
    local = shot[:, rows[:, None], label_pos]  # (point, row, k, d)
    result["local"] = _patched_decisions(setup, base, base_tokens, lengths, label_pos, local)
    if setup.with_separator:
        both = torch.cat([label_pos, label_pos - 1], 1)
        result["local+sep"] = _patched_decisions(setup, base, base_tokens, lengths, both, shot[:, rows[:, None], both])

    # 4. convergence and the labels the local vectors decode to
    final = shot[:, rows, last]
    donors = {k: v.to(shot.dtype) for k, v in setup.donors.items()}
    result["convergence"] = convergence(local.float(), final.float(), {k: v.float() for k, v in donors.items()})
    n_demos = label_pos.shape[1]
    start = shot[:, :, 0][:, :, None].expand(-1, -1, n_demos, -1)
    decoded = _readouts(setup, start.reshape(n_points, -1, start.shape[-1]), local.reshape(n_points, -1, local.shape[-1]))
    result["decode"] = {lens: dec.view(n_points, len(prompts), n_demos) for lens, (dec, _) in decoded.items()}

    # 5. attention from the last position
    result["attention"] = attention_flow(pattern, prompts)
    return result
