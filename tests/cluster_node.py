"""`torpor serve` with the forward-once flags (--peers, --peer-poll-interval, --forward-timeout-secs,
--node-name), for the tests and loadtest/forward_bench.py until torpor/cli.py takes them itself
(docs/cluster.md says which lines):

    python -m tests.cluster_node serve --model-repository R --devices cpu --peers http://127.0.0.3:8000

The flags are parsed here and everything else is `torpor serve`'s own; the forwarder starts once
the listeners are up (`torpor.api.forward.start_forwarder`) and stops when serve returns."""

from __future__ import annotations

import argparse
import sys

from torpor.api.forward import add_cluster_arguments, start_forwarder

from torpor import cli


def main(argv: list[str]) -> None:
    mine = argparse.ArgumentParser(prog="torpor serve", add_help=False)
    add_cluster_arguments(mine)
    cluster, rest = mine.parse_known_args(argv)
    started = []
    start_front_ends, serve = cli.start_front_ends, cli.serve

    async def with_forwarder(engine, args, servers, tasks) -> None:
        await start_front_ends(engine, args, servers, tasks)
        for key in ("http_address", "http_port"):
            setattr(cluster, key, getattr(args, key))
        forwarder = await start_forwarder(engine, cluster)
        if forwarder is not None:
            started.append(forwarder)

    async def serve_then_stop(args) -> int:
        try:
            return await serve(args)
        finally:
            for forwarder in started:
                await forwarder.stop()

    cli.start_front_ends, cli.serve = with_forwarder, serve_then_stop
    cli.main(rest)


if __name__ == "__main__":
    main(sys.argv[1:])
