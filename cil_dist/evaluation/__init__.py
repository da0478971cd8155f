"""Evaluation: per-task-set metrics, scoring a checkpoint on a split (evaluate), segmenting one
image (infer), colouring predictions (visualize) and plotting validation curves (curves)."""
