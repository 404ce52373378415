#!/usr/bin/env python3
"""Reads a run's JSON log (`--log-format json`) on stdin and prints its timeline: for each line,
seconds since the run started and since the line before, with the line's message and fields."""
import json
import sys
from datetime import datetime

first = last = None
for line in sys.stdin:
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    at = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00"))
    first = first or at
    gap = (at - (last or at)).total_seconds()
    last = at
    fields = dict(entry.get("fields", {}))
    message = fields.pop("message", "")
    rest = " ".join(f"{k}={v}" for k, v in fields.items())
    print(f"{(at - first).total_seconds():7.2f} s  +{gap:5.2f}  {message:32} {rest}")
