"""The dual encoder's gallery side: embedding (embedder.py), the on-disk index and exact search (store.py), and
the `index` job that builds it on Ray Data actors (card.py, job.py). Importing this package starts nothing."""
