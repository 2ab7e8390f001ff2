"""The method's math and stage one's per-shard computation (DESIGN §1): DDIM and flow walks, targets, losses, objectives, the row plan, recipes."""
