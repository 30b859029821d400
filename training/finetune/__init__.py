"""Downstream use of ReFound (paper 4.3, 5, A.2.2-A.2.3): tasks, fine-tuning, feature-based
prediction, metrics, and the evaluation protocol."""
