"""The one-row products of a decode step alone, as the engine runs them (20 calls captured in one CUDA graph, 10
replays): bf16 `F.linear` against `quantized_linear` int8 and int4 (the Triton kernels of kernels.py on a GPU) on the
four matrix shapes of a LLaMA-3.1-8B block, with the bandwidth reached on the bytes each reads and the tiling the
autotuner chose. Prints one line per shape; needs a GPU. Its output on the H200 is in results/quantized-decode-h200.md.

    PYTHONPATH=src python benchmarks/gemv_graphed.py
"""
import torch, time
from pudding import kernels
from pudding.quantize import quantize_weight, quantized_linear
torch.manual_seed(0)
def graphed(fn, reps=20):
    s=torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g=torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    g.replay(); torch.cuda.synchronize()
    t=time.perf_counter()
    for _ in range(10): g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter()-t)/10/reps
for (n,k) in [(4096,14336),(14336,4096),(1024,4096),(4096,4096)]:
    w=torch.randn(n,k,device="cuda",dtype=torch.bfloat16); x=torch.randn(1,1,k,device="cuda",dtype=torch.bfloat16)
    tb=graphed(lambda: torch.nn.functional.linear(x,w))
    line=f"{n}x{k}: bf16 {tb*1e6:.1f}us {n*k*2/tb/1e9:.0f}GB/s"
    for sch in ("int8","int4"):
        c,s=quantize_weight(w,sch)
        t=graphed(lambda: quantized_linear(x,c,s))
        by=c.numel()*c.element_size()+s.numel()*s.element_size()
        tuned = kernels._int8_tuned if sch=="int8" else kernels._int4_tuned
        line+=f" | {sch} {t*1e6:.1f}us {by/t/1e9:.0f}GB/s x{tb/t:.2f} best={tuned.best_config}"
    print(line, flush=True)
