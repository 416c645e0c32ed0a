"""Model inputs built exactly as the original does (docs/oscar-formats.md §2.6, §3): pure functions, numpy out, no Ray."""
