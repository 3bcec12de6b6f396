#!/usr/bin/env python3
"""CPU cores used per process name, every INTERVAL seconds for TOTAL seconds, from /proc.

Usage: bench/cpu_by_process.py INTERVAL TOTAL  (run beside a benchmark; `fanfare worker`
processes are shown as fanfare-worker). Prints the top eight per window."""

import os, sys, time
tck = os.sysconf('SC_CLK_TCK')
def snap():
    out = {}
    for p in os.listdir('/proc'):
        if not p.isdigit(): continue
        try:
            s = open(f'/proc/{p}/stat').read()
            comm = s[s.index('(')+1:s.rindex(')')]
            f = s[s.rindex(')')+2:].split()
            cpu = (int(f[11]) + int(f[12])) / tck
            cmd = open(f'/proc/{p}/cmdline').read().split('\0')
            if 'worker' in cmd: comm = 'fanfare-worker'
            out[p] = (comm, cpu)
        except Exception: pass
    return out
interval = float(sys.argv[1]); total = float(sys.argv[2])
prev = snap(); t0 = time.time()
acc = {}
while time.time() - t0 < total:
    time.sleep(interval)
    cur = snap(); d = {}
    for p, (c, cpu) in cur.items():
        d[c] = d.get(c, 0) + cpu - prev.get(p, (c, 0))[1]
    prev = cur
    top = sorted(((v, k) for k, v in d.items() if v > 0.05), reverse=True)[:8]
    print(f"{time.time()-t0:6.0f}s " + "  ".join(f"{k}={v/interval:.2f}" for v, k in top), flush=True)
