"""`evaluate.read_out`: every lens read out through one stacked unembedding gives, bit for bit,
what reading each lens out on its own (the readout before lenses were stacked) gives, and a
shared output handed back again is not read out again."""

from __future__ import annotations

import pytest
import torch

from lensbench import evaluate
from lensbench.evaluate import read_out
from lensbench.lenses import LensOutput
from lensbench.readout import entropy, pad_candidates, unembed

FIELDS = ("decision", "entropy", "cand_lp", "top_p", "top_i", "tracked_lp", "tracked_rank")


def _outputs(model, n_points: int, b: int, seed: int) -> list[LensOutput]:
    """Three per-example outputs and one shared one (one row per point), random residuals."""
    generator = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model

    def resid(rows):
        return 3 * torch.randn(n_points, rows, d, generator=generator)

    return [LensOutput(resid(b)), LensOutput(resid(1), shared=True), LensOutput(resid(b)), LensOutput(resid(b))]


def _fresh(output: LensOutput) -> LensOutput:
    return LensOutput(output.resid, output.attention, output.shared)


def _reference(model, output: LensOutput, cand_ids, cand_mask, topk, tracked, values=evaluate.READOUT_VALUES):
    """One lens read out on its own, the way the readout worked per lens: its (point, row, vocab)
    logits in chunks of the points that fit `values` logits for the batch, expanded to it."""
    b = cand_ids.shape[0]
    chunk = max(1, int(values // (b * model.cfg.d_vocab_out)))
    parts = []
    for start in range(0, output.resid.shape[0], chunk):
        logits = unembed(model, output.resid[start : start + chunk])
        log_norm = torch.logsumexp(logits, -1, keepdim=True)
        top, top_i = logits.topk(topk, dim=-1)
        chosen = logits[..., tracked]
        rank = (logits[..., None, :] > chosen[..., None]).sum(-1) + 1
        logits, log_norm, top, top_i, chosen, rank = (t.expand(-1, b, -1) for t in (logits, log_norm, top, top_i, chosen, rank))
        cand = logits.gather(2, cand_ids[None].expand(logits.shape[0], -1, -1)).masked_fill(~cand_mask[None], -torch.inf)
        cand_lp = torch.log_softmax(cand, -1)
        parts.append({"decision": cand_lp.argmax(-1), "entropy": entropy(cand_lp), "cand_lp": cand_lp,
                      "top_p": (top - log_norm).exp(), "top_i": top_i, "tracked_lp": chosen - log_norm, "tracked_rank": rank})
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


@pytest.mark.parametrize("threads", [1, 2])
# (rows of logits, examples): one chunk; stacked chunks that cut across lenses (per lens,
# chunks of 3 + 2 points, and a shared output's chunks of 3 and 2 rows); a last per-lens chunk
# too small to stack (1 point of 6 rows): each lens on its own
@pytest.mark.parametrize("values,b,matmuls", [(evaluate.READOUT_VALUES, 6, 1 + 1), (24 * 49152, 8, 5 + 2),
                                             (24 * 49152, 6, 3 * 2 + 2)])
def test_stacked_readout_equals_each_lens_alone(tiny_rotary, monkeypatch, threads, values, b, matmuls):
    monkeypatch.setattr(evaluate, "READOUT_VALUES", values)
    calls = []
    real = evaluate.unembed
    monkeypatch.setattr(evaluate, "unembed", lambda model, resid: calls.append(resid.shape) or real(model, resid))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n_points = tiny_rotary.cfg.n_layers + 1
        outputs = _outputs(tiny_rotary, n_points, b, seed=0)
        cand_ids, cand_mask = pad_candidates([[5, 7], [11, 13, 17], [19, 23], [29, 31, 37, 41], [43, 47], [53, 59],
                                              [61, 67], [71, 73, 79]][:b])
        tracked = torch.tensor([5, 1000])
        together = read_out(tiny_rotary, outputs, cand_ids, cand_mask, 3, "candidates", tracked)
        assert len(calls) == matmuls  # stacked: one per chunk of rows, not one per lens and chunk
        for i, output in enumerate(outputs):
            alone = read_out(tiny_rotary, [_fresh(output)], cand_ids, cand_mask, 3, "candidates", tracked)
            plain = _reference(tiny_rotary, output, cand_ids, cand_mask, 3, tracked, values)
            for name in FIELDS:
                assert torch.equal(together[name][i], alone[name][0]), (i, name)
                assert torch.equal(together[name][i], plain[name]), (i, name)
    finally:
        torch.set_num_threads(before)


def test_vocabulary_entropy_is_the_full_softmax_entropy(tiny_rotary):
    outputs = _outputs(tiny_rotary, 5, 4, seed=1)
    cand_ids, cand_mask = pad_candidates([[5, 7]] * 4)
    read = read_out(tiny_rotary, outputs, cand_ids, cand_mask, 3, "vocab")
    for i, output in enumerate(outputs):
        logprobs = torch.log_softmax(unembed(tiny_rotary, output.resid), -1).expand(-1, 4, -1)
        assert torch.allclose(read["entropy"][i], entropy(logprobs), atol=1e-4)


def test_a_shared_output_handed_back_is_not_read_out_again(tiny_rotary, monkeypatch):
    outputs = _outputs(tiny_rotary, 5, 2, seed=2)
    shared = outputs[1]
    first = read_out(tiny_rotary, outputs, *pad_candidates([[5, 7], [11, 13]]), 3, "candidates", torch.tensor([9]))
    calls = []
    real = evaluate.unembed
    monkeypatch.setattr(evaluate, "unembed", lambda model, resid: calls.append(resid.shape) or real(model, resid))
    # the next batch: other candidates and tracked tokens, the same shared output object
    cand_ids, cand_mask = pad_candidates([[19, 23, 29], [31, 37], [41, 43]])
    others = _outputs(tiny_rotary, 5, 3, seed=3)
    again = read_out(tiny_rotary, [others[0], shared], cand_ids, cand_mask, 3, "candidates", torch.tensor([4, 8]))
    assert calls == [(5 * 3, tiny_rotary.cfg.d_model)]  # only the new per-example output
    plain = _reference(tiny_rotary, shared, cand_ids, cand_mask, 3, torch.tensor([4, 8]))
    for name in FIELDS:
        assert torch.equal(again[name][1], plain[name]), name
    assert torch.equal(first["top_i"][1, :, 0], again["top_i"][1, :, 0])
    # another top-k is another readout
    read_out(tiny_rotary, [shared], cand_ids, cand_mask, 4, "candidates")
    assert calls[-1] == (5, tiny_rotary.cfg.d_model)
