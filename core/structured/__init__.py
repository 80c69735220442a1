"""Structured pruning: whole attention units (heads, or KV groups under GQA) and MLP channels.

- `units`: what a unit is in each family, which rows/columns of which matrix belong to it, and
  how many parameters it holds (the budget is counted in parameters, not units).
- `plan`: a structured decision (kept units per block, refitted weights, compensation biases)
  and its conversion to ordinary masks, so apply/restore/evaluate/export work unchanged.
"""
