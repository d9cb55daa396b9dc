"""Structured pruning: channel dependency groups from the torch.fx graph, the surgery that cuts
channels out, and the channel plan that scores and selects them. Imports errors, runtime,
contract and formats."""
