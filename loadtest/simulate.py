"""Compare scheduling policies in the discrete-event simulator on one scenario.

    python loadtest/simulate.py --scenario loadtest/scenarios/h100x4.json [--json out.json]
    torpor simulate --scenario loadtest/scenarios/h100x4.json        (the same)

Runs Torpor's policy, LRU swap-only and static placement on the same arrivals (see
torpor/sim/simulation.py and torpor/sim/scenarios/README.md), prints a table and writes JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torpor.cli import main

if __name__ == "__main__":
    main(["simulate", *sys.argv[1:]])
