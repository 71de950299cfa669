"""A small served labelling and human-evaluation app.

Two tasks: ``label`` (one image and its prompt at a time, good / bad / skip, exported in the
TIA2 label format) and ``compare`` (the blinded best-of-n side-by-side export, alignment and
quality each win / tie / lose, tallied per pair of rewards). Answers are kept in SQLite (WAL,
one commit per answer); the FastAPI app in :mod:`tn_ray.labeling.app` serves the pages.
"""
