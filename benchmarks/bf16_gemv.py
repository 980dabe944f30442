"""Can a hand-written kernel bring decode's bf16 products nearer the read bandwidth? One activation row times each
matrix of a LLaMA-3.1-8B decode step (and the LM head): cuBLAS (`F.linear`), inductor's fused reduction (what the
engine's compiled step runs) and a Triton GEMV autotuned over 15 tilings; the down projection fused with its input's
SiLU-and-product and the residual add, as in the engine. Timed as 20 calls in one CUDA graph, weights cycled over four
copies so none is served from L2. Needs a GPU; writes gemv.json under $OUT (or /tmp).

    PYTHONPATH=src python benchmarks/bf16_gemv.py

Output on the H200 (2026-12-04, commit 9329c92, which timed 200 graphed calls with the host clock rather than
`seconds_per_call`'s median): results/decode-kernels-h200.md, last section.""" 
import json, os
import torch, triton, triton.language as tl
from pudding.bench.timing import seconds_per_call

torch._inductor.config.coordinate_descent_tuning = True

@triton.jit
def gemv_kernel(x_ptr, w_ptr, r_ptr, out_ptr, N: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                ACT: tl.constexpr, RES: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        if ACT:
            g = tl.load(x_ptr + cols).to(tl.float32)
            u = tl.load(x_ptr + K + cols).to(tl.float32)
            x = (g * tl.sigmoid(g)).to(tl.bfloat16).to(tl.float32) * u
            x = x.to(tl.bfloat16).to(tl.float32)
        else:
            x = tl.load(x_ptr + cols).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    total = tl.sum(acc, axis=1)
    if RES:
        total = total.to(tl.bfloat16).to(tl.float32) + tl.load(r_ptr + rows).to(tl.float32)
    tl.store(out_ptr + rows, total.to(tl.bfloat16))

configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
           for n, k, w, s in [(1, 2048, 4, 1), (2, 1024, 4, 1), (2, 2048, 8, 1), (4, 512, 4, 1), (4, 1024, 4, 1), (4, 1024, 8, 1),
                              (8, 512, 4, 1), (8, 512, 8, 1), (8, 1024, 8, 1), (16, 256, 4, 1), (16, 512, 8, 1),
                              (2, 1024, 4, 3), (4, 512, 4, 3), (8, 256, 4, 3), (4, 1024, 8, 2)]]
tuned = triton.autotune(configs, key=["N", "K", "ACT", "RES"])(gemv_kernel)

def triton_gemv(x, w, r=None, act=False):
    n, k = w.shape
    out = torch.empty(n, dtype=torch.bfloat16, device=w.device)
    tuned[lambda m: (triton.cdiv(n, m["BLOCK_N"]),)](x, w, r if r is not None else out, out, n, k, ACT=act, RES=r is not None)
    return out

shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336), "head": (128256, 4096)}
out = {}
for name, (n, k) in shapes.items():
    # a fresh weight per call would not fit the cache anyway (>= 33 MB vs 50 MB L2): use 4 copies round-robin
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(4)]
    x = torch.randn(k * (2 if name == "down" else 1), device="cuda", dtype=torch.bfloat16)
    r = torch.randn(n, device="cuda", dtype=torch.bfloat16)

    def us(call):  # microseconds per call of call(weight), the four copies in turn
        return seconds_per_call(lambda i: call(ws[i % 4]), "cuda") * 1e6

    nbytes = n * k * 2
    res = {}
    res["cublas"] = us(lambda w: torch.nn.functional.linear(x[:k].view(1, k), w))
    if name == "down":
        f = torch.compile(lambda a, w, r: r + torch.nn.functional.linear(torch.nn.functional.silu(a[:, :k]) * a[:, k:], w), fullgraph=True, dynamic=False)
        res["inductor"] = us(lambda w: f(x.view(1, -1), w, r))
        res["triton"] = us(lambda w: triton_gemv(x, w, r, act=True))
        ref = r.float() + (torch.nn.functional.silu(x[:k]) * x[k:]).float() @ ws[0].float().t()
        res["max_err"] = (triton_gemv(x, ws[0], r, act=True).float() - ref).abs().max().item()
    else:
        f = torch.compile(lambda a, w: torch.nn.functional.linear(a, w), fullgraph=True, dynamic=False)
        res["inductor"] = us(lambda w: f(x.view(1, k), w))
        res["triton"] = us(lambda w: triton_gemv(x, w))
        ref = x.float() @ ws[0].float().t()
        res["max_err"] = (triton_gemv(x, ws[0]).float() - ref).abs().max().item()
    res["best_config"] = str(tuned.best_config)
    for key in ("cublas", "inductor", "triton"):
        res[key + "_tb_s"] = nbytes / res[key] / 1e6
    out[name] = res
    print(name, json.dumps(res), flush=True)
os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "gemv.json"), "w"), indent=1)
