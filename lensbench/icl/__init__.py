"""In-context learning: global and local task vectors at the label words (docs/METHOD.md,
"In-context learning").

- `tasks`: ICL tasks (items, template, built-ins in `lensbench/data/icl/`) and their prompts;
- `patching`: TransformerLens hook functions that write residuals at chosen positions and a
  layer, and the batched fast path that agrees with them;
- `measure`: the five measurements of one batch of queries;
- `runner`: the run folder (`lensbench icl`); `summary`: its tables and summary.json;
- `plotting`: the figures the app and `analyses/icl.py` share.
"""
