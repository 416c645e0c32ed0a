"""Region features: the Arrow schema of docs/data-contracts.md and the Oscar 2054-d region vector."""
