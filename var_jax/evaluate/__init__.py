"""Evaluation: the project's classifier, classifier-based sample scores, Frechet distance, and
FID with the FID Inception-v3 network (user-supplied pytorch-fid weights; see fid.py)."""
