"""mmstore_rollout: the multi-turn visual RL loop that proves the parts agree (make smoke)."""
