"""SLURM/local stage chains with submitit (see the chains issue)."""
