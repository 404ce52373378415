#!/usr/bin/env python3
"""Runs a command; prints its wall time in seconds and its peak RSS in MiB as `secs mib`.

Peak RSS comes from getrusage(RUSAGE_CHILDREN), which the kernel keeps after the child exits.
The command's own output goes to stderr so the caller can capture the two numbers alone.
"""
import resource
import subprocess
import sys
import time

start = time.monotonic()
done = subprocess.run(sys.argv[1:], stdout=sys.stderr)
elapsed = time.monotonic() - start
if done.returncode != 0:
    sys.exit(f"measure.py: {sys.argv[1:]} exited {done.returncode}")
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"{elapsed:.2f} {peak_kib / 1024:.0f}")
