# A/B check run once by the lead (2026-11-25, H100); kept for reproducibility.
"""A/B in one process: a mixed prefill+decode step with LoRA stacks as views of the slot store
(current lora.py) vs the same stacks cloned contiguous per module."""
import statistics, sys, time
from pathlib import Path
sys.path.insert(0, str(Path.cwd())); sys.path.insert(0, str(Path.cwd() / "benchmarks"))
import torch
from bench_e2e_gpu import decode_seqs, TARGET_MODULES, RANK
from services.common.adapters import LoraAdapter
from services.engine.config import EngineConfig
from services.engine.model_runner import ModelRunner
from services.engine.sequence import SamplingParams
from services.engine.sequence import Sequence

cfg = EngineConfig(model="random:llama-2-7b", device="cuda", quant_bits=4, cuda_graphs=True,
                   max_num_seqs=64, max_adapters=32, max_adapters_per_batch=10,
                   kv_cache_bytes=8 << 30, max_model_len=1024)
runner = ModelRunner.load(cfg)
dims = runner.shape.dims()
gen = torch.Generator().manual_seed(5)
w = {}
for layer in range(dims.num_layers):
    for m in TARGET_MODULES:
        i, o = dims.features(m)
        w[(layer, m)] = (torch.randn(RANK, i, generator=gen) * i ** -0.5, torch.randn(o, RANK, generator=gen) * 0.01)
for k in range(10):
    runner.add_adapter(LoraAdapter(name=f"L{k}", path=Path("/none"), rank=RANK, targets=TARGET_MODULES,
                                   weights=w, scaling={x: 2.0 for x in w}))
tasks = [f"L{k}" for k in range(10)]
dec, bm = decode_seqs(runner, 32, 200, tasks)
pre = []
for j in range(16):
    s = Sequence(f"p{j}", [(13 * j + t) % 30000 + 3 for t in range(60)], SamplingParams(), task=tasks[j % 10])
    bm.allocate(s); pre.append(s)
seqs = pre + dec

def timed(label, reps=15):
    for _ in range(3):
        runner.run(seqs)
    torch.cuda.synchronize()
    ws = []
    for _ in range(reps):
        t0 = time.perf_counter(); runner.run(seqs); torch.cuda.synchronize(); ws.append((time.perf_counter() - t0) * 1e3)
    print(f"{label}: mixed step median {statistics.median(ws):.2f} ms (min {min(ws):.2f})", flush=True)
    return statistics.median(ws)

lm = runner.lora
a = timed("store views")
orig_a, orig_bt = dict(lm._a), dict(lm._bt)
lm._a = {k: v.contiguous() for k, v in orig_a.items()}
lm._bt = {k: v.contiguous() for k, v in orig_bt.items()}
b = timed("contiguous stacks")
lm._a, lm._bt = orig_a, orig_bt
c = timed("store views again")
lm._segments = []
print(f"ratio views/contiguous {a / b:.3f}, {c / b:.3f}")
