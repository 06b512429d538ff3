import os, time, sys, json
hz = os.sysconf("SC_CLK_TCK")
def procs():
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit(): continue
        try:
            cmd = open(f"/proc/{pid}/cmdline","rb").read().replace(b"\0",b" ").decode()
            if "serve" in cmd and "torpor" in cmd and "device-memory-bytes" in cmd:
                st = open(f"/proc/{pid}/stat").read().rsplit(")",1)[1].split()
                mem = cmd.split("--device-memory-bytes")[1].split()[0]
                out[pid] = (mem, (int(st[11]) + int(st[12])) / hz)
        except OSError: pass
    return out
rows = []; prev = {}
t_end = time.time() + float(sys.argv[1])
while time.time() < t_end:
    now = procs(); t = time.time()
    for pid, (mem, cpu) in now.items():
        if pid in prev:
            rows.append((t, mem, cpu - prev[pid][1]))
    prev = now
    time.sleep(1.0)
by = {}
for t, mem, d in rows:
    by.setdefault(mem, []).append(d)
for mem, ds in by.items():
    ds = ds[3:-2]  # drop start and stop
    print(mem, "server CPU cores, median per second:", sorted(ds)[len(ds)//2] if ds else None, "n", len(ds))
