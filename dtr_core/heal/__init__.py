"""Healing: end-to-end distillation of a stitched hybrid into its teacher (after the greedy search).

Blockwise distillation trains each student alone on the teacher's own inputs; once several students are
in, their errors compound. Healing trains the hybrid as a whole to match the teacher's next-token
distribution (`config.py`: the budget; `training.py`: the loop).
"""
