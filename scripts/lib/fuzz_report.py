"""Reads one Schemathesis run's reports for scripts/fuzz (Python standard library only).

    fuzz_report.py counts JUNIT     prints "PASSED FAILED": operations without and with a
                                    failure or error
    fuzz_report.py statuses NDJSON  prints, per operation, how often each status answered
                                    (405s come from the coverage phase's unexpected methods)
"""

import collections
import json
import sys
import xml.etree.ElementTree as ET


def counts(path):
    try:
        cases = list(ET.parse(path).getroot().iter("testcase"))
    except (OSError, ET.ParseError):
        cases = []
    failed = sum(1 for c in cases if c.find("failure") is not None or c.find("error") is not None)
    print(len(cases) - failed, failed)


def statuses(path):
    seen = collections.defaultdict(collections.Counter)
    try:
        lines = open(path, encoding="utf-8").readlines()
    except OSError:
        return
    for line in lines:
        event = json.loads(line).get("ScenarioFinished")
        recorder = (event or {}).get("recorder") or {}
        for interaction in (recorder.get("interactions") or {}).values():
            response = interaction.get("response") or {}
            seen[recorder.get("label", "?")][response.get("status_code", "none")] += 1
    for label in sorted(seen):
        tally = " ".join(f"{status}x{n}" for status, n in sorted(seen[label].items(), key=str))
        print(f"    {label:<56} {tally}")


if __name__ == "__main__":
    {"counts": counts, "statuses": statuses}[sys.argv[1]](sys.argv[2])
