"""What a run has recorded so far, and its raw dump (OUT/results.json).

RESULTS holds one row per measured wrk run (see wrk.measure), RATIO_ROUNDS the interleaved
floor / hot / Redis-tier rounds, NOTES free text for the report and FAILURES the steps that failed
or were skipped. The lists are shared and only ever appended to.
"""

import json

from .config import OUT

RESULTS = []       # one dict per measured run
NOTES = []         # free-text notes for the report
FAILURES = []
RATIO_ROUNDS = []  # one dict per interleaved round (targets.target_ratio_rounds)


def save_raw():
    (OUT / "results.json").write_text(json.dumps({"results": RESULTS, "ratio_rounds": RATIO_ROUNDS,
                                                  "notes": NOTES, "failures": FAILURES}, indent=1))
