"""Model inputs built exactly as the original does (oscar-formats §2.6, §3): pure functions, numpy out, no Ray."""
