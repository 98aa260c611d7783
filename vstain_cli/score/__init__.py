"""Scoring: metrics, image sets, feature extractors (StainNet, InceptionV3), the score pipeline, the report.

May import: everything below it (base, io, data, diffusion, nets, train, infer, uq)."""
