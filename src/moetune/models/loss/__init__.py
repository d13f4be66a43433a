"""The step objective and the LM loss: token-weighted over an optimizer step, computed from the final
hidden states a chunk at a time where that gives the same loss."""
