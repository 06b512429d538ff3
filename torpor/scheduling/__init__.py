"""Scheduling policy, pure and shared by the server and the simulator.

The cost model (`costmodel`), the placement policies (`scheduler`), eviction orders
(`eviction`), queue admission (`admission`: where a request queues, when it may take
device memory, when it is shed) and cluster routing (`routing`: which node a request goes
to). Plain data in, decisions out: no asyncio, no clock, no torch,
so `torpor.runtime` and `torpor.sim` run exactly the same lines.
"""
