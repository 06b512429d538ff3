"""The device runtime: devices, their memory arenas, the host store, copies and runs.

`device_path.DeviceRuntime.run(...)` is what the data plane calls; behind it the placer asks
the scheduler where a request goes, staging queues decide when it may hold device memory,
the residency pool (`residency.DevicePool`) evicts and copies, the swapper moves weights on
copy streams and the executor runs on compute streams. Imports scheduling and the common
modules; never the data plane, a front end, the web stack, tritonclient or grpc.
"""
