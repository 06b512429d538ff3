"""The simulator: Torpor's scheduling on virtual time, and the paper's policies beside it.

Scenarios (`scenario`), arrivals (`workload`), link physics (`physics`), the simulation
(`simulation`), its state and results (`state`), comparisons, sweeps and reports (`report`),
the paper's policies and baselines (`paper`, `paper_sim`). Imports `torpor.scheduling` (the
same policy code the server runs), never the device runtime or the data plane.
"""
