import os, time, sys
done=set(); t_end=time.time()+float(sys.argv[1])
while time.time()<t_end:
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid in done: continue
        try:
            cmd=open(f"/proc/{pid}/cmdline","rb").read().replace(b"\0",b" ").decode()
        except OSError: continue
        if "serve" in cmd and "torpor" in cmd and "device-memory-bytes" in cmd:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try: os.setpriority(os.PRIO_PROCESS, int(tid), -5)
                except OSError as e: print("fail", e)
            done.add(pid); print("reniced", pid, flush=True)
    time.sleep(0.2)
