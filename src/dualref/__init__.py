"""dualref: unsupervised domain adaptive person re-identification (Dual-Refinement)."""

__version__ = "0.1.0"
