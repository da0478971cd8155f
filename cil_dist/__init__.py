"""cil-dist: distributed class-incremental semantic segmentation (Klingner et al., ITSC 2020)."""

__version__ = "0.1.0"
