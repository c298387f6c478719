"""Reports computed from the decision log (lift of the learned policy over the holdout)."""
