"""Collect pytest node ids, run them in N parallel shards (one process each, contiguous
chunks so that shards share few kernel specialisations), honour a deadline, tally results
from the -v progress lines (so a killed shard still reports what it ran)."""
import json, os, re, subprocess, sys, time
out, nshards, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
paths = sys.argv[4:]
env = dict(os.environ)
kexpr = env.get("GPU_CHECK_PYTEST_K")
base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
t0 = time.time()
col = subprocess.run(base + ["--collect-only", "-q"] + (["-k", kexpr] if kexpr else []) + paths,
                     capture_output=True, text=True, env=env)
nodes = [l.strip() for l in col.stdout.splitlines() if "::" in l and not l.startswith(" ")]
print(f"collected {len(nodes)} tests (collect rc={col.returncode})", flush=True)
kd = subprocess.run(base + ["--collect-only", "-q", "-k", "device"] + paths, capture_output=True, text=True, env=env)
k_device = sum(1 for l in kd.stdout.splitlines() if "::" in l)
if col.returncode not in (0, 5):
    print(col.stdout[-3000:], col.stderr[-3000:])
n = max(1, min(nshards, len(nodes)))
chunks = [nodes[i * len(nodes) // n:(i + 1) * len(nodes) // n] for i in range(n)]
procs = []
for i, ch in enumerate(chunks):
    if not ch:
        continue
    log = open(os.path.join(out, f"pytest_shard{i}.log"), "w")
    p = subprocess.Popen(base + ["-v", "-rfE", "--tb=short", "-W", "ignore::UserWarning"] + ch,
                         stdout=log, stderr=subprocess.STDOUT, env=env)
    procs.append((i, p, log, len(ch)))
timed_out = []
for i, p, log, _ in procs:
    try:
        p.wait(timeout=max(1.0, limit - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        timed_out.append(i)
        p.kill()
        p.wait()
    log.close()
res = {"collected": len(nodes), "selected_by_-k_device": k_device, "passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfail": 0,
       "timed_out_shards": timed_out, "failures": []}
pat = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
for i, p, _, cnt in procs:
    txt = open(os.path.join(out, f"pytest_shard{i}.log"), errors="replace").read()
    for line in txt.splitlines():
        m = pat.match(line)
        if m:
            k = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
                 "XFAIL": "xfail", "XPASS": "passed"}[m.group(2)]
            res[k] += 1
    for line in txt.splitlines():   # -rfE short summary: "FAILED node - message"
        if line.startswith(("FAILED ", "ERROR ")) and "::" in line:
            res["failures"].append(line[:300])
res["not_run"] = res["collected"] - sum(res[k] for k in ("passed", "failed", "error", "skipped", "xfail"))
res["seconds"] = round(time.time() - t0, 1)
json.dump(res, open(os.path.join(out, "tests.json"), "w"), indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "failures"}))
for f in res["failures"][:40]:
    print(f)
sys.exit(0 if res["failed"] == res["error"] == 0 and not timed_out and res["collected"] else 1)
