"""Focus: LensNet scores, the allocator that turns them into legal actions, counterfactual deltas, policies and the runtime engine."""
