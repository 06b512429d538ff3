"""The data plane: one request from the front end to its answer.

Resolve the model, validate the request against its config (`request_rules`), run it (inline,
on threads, or through the device runtime's `run(...)`), build the response, keep statistics.
The front ends (`torpor.api`) call the `Engine`'s methods and never read its fields. Imports the
registry, the device runtime and scheduling below it; never a front end, the web stack or grpc.
"""
