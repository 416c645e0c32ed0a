"""Region features: the Arrow schema of DESIGN.md §3 and the Oscar 2054-d region vector."""
