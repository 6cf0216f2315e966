"""Evaluation: the project's classifier, classifier-based sample scores, Frechet distance, FID
(Inception features not available; see fid.py)."""
