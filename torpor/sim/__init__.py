"""The simulator: Torpor's scheduling on virtual time, and the paper's policies beside it.

Scenarios (`scenario`; the bundled ones in `scenarios/`), arrivals (`workload`), link physics
(`physics`), the simulated node (`simulation`), a run's event loop (`replay`) and the server's
admission on it (`staged`), their state and results (`state`), comparisons, sweeps, reports
and the `torpor simulate` command line (`report`), the paper's policies (`paper`) and its
system and baselines on virtual time (`paper_sim`, `paper_swap`). Imports `torpor.scheduling`
(the same policy code the server runs), never the device runtime or the data plane.
"""
