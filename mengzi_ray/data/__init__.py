"""Model inputs built exactly as the original does (microsoft/Oscar `oscar/datasets/oscar_tsv.py`,
`oscar/run_captioning.py`, `oscar/run_retrieval.py`): pure functions, numpy out, no Ray."""
