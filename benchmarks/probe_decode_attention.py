"""Launch shapes of the paged decode attention kernel (RoPE + KV-cache write fused, what pure decode
steps run) against the copy bandwidth, on one GPU.

On the H100 serving runs, the cost model's price of a cached token read per step implies that
attention streams the KV cache at about 1.85 TB/s (0.28 µs per token of Llama-2-7B's 512 KiB of K and
V, serve_gpu_24gib_long_drain30_tokens_8d39b65.json), about 60 % of a device copy, and at a full
cache it is near half of a decode step. This times the kernel at Llama-2-7B's attention shape
(32 heads of 128, fp16, 16-token cache blocks scattered at random as after churn) per (batch,
context) over a grid of launch shapes: KV tokens per loop iteration (BN), warps, the loop's register
double buffer (prefetch: the next tile's K and V loaded before this tile's math) and, if asked,
Triton's pipeline depth (num_stages; "-" is Triton's default, which the sweep keeps by default:
Triton does not pipeline this loop, decode_attention_sass.py), the tile math on tensor cores
(--dot: the query padded to tl.dot's 16 rows, which Triton does pipeline) and split-KV (--splits: each
sequence's cache in S runs, one program each, merged by a second launch; flash-decoding). One
launch reads one layer's K and V, several times the L2, which is flushed before each of the
median's replays (CUDA graph, CUDA events). Every shape's output is checked against the default
shape's (relative error <= 1e-2) and the default's against the float32 reference on a few
sequences. Then the whole graphed Llama-2-7B decode step under each of --step-variants (the
engine's attention settings; the first is repeated last). Writes <out>/<stem>.{json,md}.

  python benchmarks/probe_decode_attention.py --out DIR --commit SHA [--shapes 1x2048,16x1024,256x1024]
      [--block-n 16,32,64,128] [--warps 2,4,8] [--stages 0] [--prefetch 0,1] [--splits 1,2,4,8] [--dot 0,1]
      [--step-variants base,prefetch,split2,prefetch+split2]
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_gpu_kernels import Timer, copy_bandwidth_gbs  # noqa: E402
from benchmarks.results_io import probe_command, probe_parser, probe_title, run_probe_parts  # noqa: E402
from services.engine.kernels.attention import (  # noqa: E402
    DECODE_BLOCK_N, DECODE_DOT, DECODE_PREFETCH, DECODE_STAGES, DECODE_WARPS, decode_splits, paged_decode_reference,
    paged_decode_rope_attention,
)
from services.engine.kernels.fused_ops import rope_tables  # noqa: E402

HEADS, HEAD_DIM, BLOCK_SIZE = 32, 128, 16     # Llama-2-7B attention (no GQA), the engine's cache blocks
MAX_REL_ERR = 1e-2
REF_ROWS = 4                                  # sequences checked against the float32 reference


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'BxC,...' -> [(batch, context tokens)]; each at least 1 x 2 ('': none, only the step timings)."""
    shapes = []
    for item in filter(None, text.split(",")):
        try:
            b, c = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes takes BATCHxCONTEXT items, got {item!r}") from None
        if b < 1 or c < 2:
            raise SystemExit(f"--shapes {item!r}: batch >= 1 and context >= 2 (one cached token and the new one)")
        shapes.append((b, c))
    return shapes


Shape = tuple[int, int, "int | None", bool, int, bool]   # (BN, warps, stages or None, prefetch, splits, dot)


def launch_shapes(block_ns: list[int], warps: list[int], stages: list[int], prefetch: list[int],
                  splits: list[int], dots: list[int] = (0,), default_splits: int = 1) -> list[Shape]:
    """(BN, warps, stages, prefetch, splits, dot) grid, the default first; stage 0 means Triton's
    default (None); the tensor-core form (dot) ignores the double buffer, so it goes without it;
    default_splits: what decode_splits gives at the shape's batch."""
    default = (DECODE_BLOCK_N, DECODE_WARPS, DECODE_STAGES, DECODE_PREFETCH, default_splits, DECODE_DOT)
    grid = [(bn, w, s or None, bool(pf), sp, bool(dot))
            for dot, pf, sp, bn, w, s in itertools.product(dots, prefetch, splits, block_ns, warps, stages)
            if not (dot and pf)]
    return [default] + [g for g in grid if g != default]


def shape_name(shape: Shape) -> str:
    bn, w, s, pf, sp, dot = shape
    return (f"BN {bn} / {w} warps / stages {s if s is not None else '-'}" + (" / prefetch" if pf else "")
            + (f" / {sp} splits" if sp > 1 else "") + (" / dot" if dot else ""))


# step variant word -> attention module setting
STEP_SETTINGS = {"prefetch": ("DECODE_PREFETCH", True), "dot": ("DECODE_DOT", True), "nodot": ("DECODE_DOT", False),
                 "fp8dot": ("DECODE_FP8_DOT", True), "fp8nodot": ("DECODE_FP8_DOT", False)}


# variant words that take a number -> the attention module constant they set (the fp8 ones matter
# only with kv8); longest prefix first, so 'fp8bn128' is not read as 'bn'
VARIANT_PREFIXES = {"fp8stages": "DECODE_FP8_STAGES", "fp8bn": "DECODE_FP8_BLOCK_N",
                    "split": "DECODE_SPLIT_PROGRAMS_PER_SM", "stages": "DECODE_STAGES", "warps": "DECODE_WARPS",
                    "bn": "DECODE_BLOCK_N"}


def parse_variant(text: str) -> dict:
    """'base' | words joined by '+': 'prefetch', 'dot' / 'nodot', 'splitN' (N programs per SM wanted:
    split-KV below that; split0: never), 'bnN', 'warpsN', 'stagesN', 'fp8bnN' / 'fp8stagesN' / 'fp8dot' /
    'fp8nodot' (over fp8 caches only) -> {attention module constant: value};
    'kv8': the step's KV caches in fp8 (e4m3), key KV8; 'vtm': its V caches token-major within blocks
    (attention.token_major_v), key VTM (neither a module constant)."""
    settings = {}
    for word in text.split("+"):
        if word == "base":
            continue
        if word in ("kv8", "vtm"):
            settings[word.upper()] = True
            continue
        if word in STEP_SETTINGS:
            name, value = STEP_SETTINGS[word]
        else:
            prefix = next((p for p in VARIANT_PREFIXES if word.startswith(p) and word[len(p):].isdigit()), None)
            if prefix is None:
                raise SystemExit(f"--step-variants: unknown setting {word!r} "
                                 "(base, prefetch, dot, nodot, fp8dot, fp8nodot, splitN, bnN, warpsN, stagesN, "
                                 "fp8bnN, fp8stagesN, kv8, vtm)")
            name = VARIANT_PREFIXES[prefix]
            value = int(word[len(prefix):])
        settings[name] = value
    return settings


class Inputs:
    """One layer's decode inputs: qkv of one new token per sequence, a scattered paged cache of
    `context - 1` tokens each, its block tables, slots and RoPE tables."""

    def __init__(self, batch: int, context: int, seed: int = 0, device: str = "cuda",
                 kv_dtype: torch.dtype = torch.float16) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        blocks_per_seq = -(-context // BLOCK_SIZE)
        num_blocks = batch * blocks_per_seq
        self.kc = torch.randn(num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM, device=device, generator=gen).to(kv_dtype)
        self.vc = torch.randn(num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM, device=device, generator=gen).to(kv_dtype)
        perm = torch.randperm(num_blocks, device=device, generator=gen)
        self.tables = perm.reshape(batch, blocks_per_seq).int()
        self.lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        self.positions = (self.lens - 1).long()
        pos = context - 1
        self.slots = self.tables[:, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
        self.qkv = torch.randn(batch, 3 * HEADS * HEAD_DIM, device=device, generator=gen).half()
        self.cos, self.sin = rope_tables(context, HEAD_DIM, 10000.0, torch.device(device))
        self.batch, self.context = batch, context
        # K and V of the cached tokens, read once per launch (the new token comes from registers)
        self.kv_bytes = 2 * batch * (context - 1) * HEADS * HEAD_DIM * self.kc.element_size()

    def run(self, shape: Shape) -> torch.Tensor:
        bn, w, s, pf, sp, dot = shape
        return paged_decode_rope_attention(self.qkv, self.positions, self.cos, self.sin, self.kc, self.vc, self.slots,
                                           self.tables, self.lens, HEADS, max_context=self.context,
                                           block_n=bn, num_warps=w, num_stages=s, prefetch=pf, splits=sp, dot=dot)

    def reference_error(self, out: torch.Tensor) -> float:
        """Relative error of out's first REF_ROWS sequences against the float32 reference (the run
        has written the new token into the cache, so attending over all `context` tokens with the
        rotated query is the reference; the query is rotated as the kernel does)."""
        from services.engine.kernels.fused_ops import rope_reference
        rows = min(REF_ROWS, self.batch)
        q = self.qkv[:rows].view(rows, 3 * HEADS, HEAD_DIM)[:, :HEADS]
        q = rope_reference(q, self.positions[:rows], self.cos, self.sin).half()
        kc, vc, tables = self.kc, self.vc, self.tables[:rows]
        if kc.element_size() == 1:   # fp8: those rows' blocks widened (byte-wise gather: no fp8 indexing)
            used = tables.flatten().long()
            kc, vc = (c.view(torch.uint8)[used].view(c.dtype).float() for c in (kc, vc))
            tables = torch.arange(used.numel(), device=used.device, dtype=torch.int32).view(rows, -1)
        ref = paged_decode_reference(q, kc, vc, tables, self.lens[:rows])
        return float((out[:rows].float() - ref).norm() / ref.norm())


def shape_rows(batch: int, context: int, shapes, timer: Timer, copy_gbs: float,
               kv_dtype: torch.dtype = torch.float16) -> list[dict]:
    inp = Inputs(batch, context, kv_dtype=kv_dtype)
    base = inp.run(shapes[0]).float()
    ref_err = inp.reference_error(base.half())
    rows = []
    for shape in shapes:
        row = {"part": "sweep", "batch": batch, "context": context, "block_n": shape[0], "num_warps": shape[1],
               "num_stages": shape[2], "prefetch": shape[3], "splits": shape[4], "dot": shape[5],
               "kv_bytes": inp.kv_bytes, "copy_gbs": copy_gbs, "kv_dtype": str(kv_dtype).removeprefix("torch.")}
        try:
            out = inp.run(shape).float()
            row["rel_err_vs_default"] = float((out - base).norm() / base.norm())
            if not row["rel_err_vs_default"] <= MAX_REL_ERR:
                row["error"] = f"output off the default shape's by {row['rel_err_vs_default']:.2e}"
            else:
                row["ms"] = timer.median_ms(lambda s=shape: inp.run(s))
                row["gbs"] = inp.kv_bytes / (row["ms"] * 1e-3) / 1e9
        except Exception as exc:  # noqa: BLE001 -- a shape the compiler rejects is reported, the sweep goes on
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            torch.cuda.synchronize()
        if shape == shapes[0]:
            row["rel_err_vs_reference"] = ref_err
        rows.append(row)
        print(f"B={batch:3d} ctx={context:5d} {shape_name(shape):32s} "
              + (f"{row['ms']:.3f} ms {row['gbs']:.0f} GB/s ({row['gbs'] / copy_gbs:.2f}x copy)" if "ms" in row
                 else row["error"]), flush=True)
    return rows


def step_rows(batches: list[int], context: int, variants: list[str], timer: Timer, copy_gbs: float):
    """Per batch size, the graphed decode step of random-weight Llama-2-7B (W4Decoder, 4-bit, fused
    RoPE + attention, tiled layout) under each attention variant (parse_variant), the first again last."""
    from benchmarks.bench_gpu_kernels import DECODE_BLOCK, decode_floor, decode_inputs, decode_model
    from services.engine.kernels import attention
    model = decode_model(False, context, max(batches), 4)
    model.fused_decode_attention = True
    runs = variants + variants[:1]
    caches16 = (model.k_caches, model.v_caches)
    copies: dict[tuple[bool, bool], tuple] = {(False, False): caches16}   # (kv8, vtm) -> (k caches, v caches)
    kinds = {("kv8" in words, "vtm" in words) for words in (set(v.split("+")) for v in variants)}
    elems = sum(c.numel() for c in model.k_caches)        # per K (or V) cache set
    need = 2 * elems if any(kv8 for kv8, _ in kinds) else 0               # fp8 copies of K and V
    need += sum(elems * (1 if kv8 else 2) for kv8, vtm in kinds if vtm)   # token-major copies of V
    if need and torch.cuda.is_available():
        free = torch.cuda.mem_get_info()[0]
        if need > free * 0.9:
            raise SystemExit(f"--step-variants kv8 / vtm: the cache copies for batch {max(batches)} at context "
                             f"{context} need {need / 2**30:.1f} GiB beside the fp16 ones, {free / 2**30:.1f} GiB is "
                             "free; lower --step-batches or --step-context")
    for bsz in batches:
        inputs = decode_inputs(bsz, context, DECODE_BLOCK, model.shape.vocab, None)
        floor_ms, weight_bytes, kv_bytes = decode_floor(model, bsz, context, copy_gbs)
        row = {"part": "step", "batch": bsz, "context": context, "variants": runs, "ms": [], "floor_ms": floor_ms}
        for variant in runs:
            settings = parse_variant(variant)
            kv8, vtm = settings.pop("KV8", False), settings.pop("VTM", False)
            if kv8:   # fp8 copies, made once; the floor reads half the KV bytes
                if (True, False) not in copies:
                    copies[True, False] = tuple([c.to(torch.float8_e4m3fn) for c in cs] for cs in caches16)
                row["floor_kv8_ms"] = (weight_bytes + kv_bytes / 2) / (copy_gbs * 1e9) * 1e3
            if vtm and (kv8, True) not in copies:   # V token-major within blocks, made once per dtype
                k_set, v_set = copies[kv8, False]
                copies[kv8, True] = (k_set, [attention.token_major_v(v) for v in v_set])
            saved = {name: getattr(attention, name) for name in settings}
            try:
                for name, value in settings.items():
                    setattr(attention, name, value)
                model.k_caches, model.v_caches = copies[kv8, vtm]
                row["ms"].append(timer.median_ms(lambda: model.decode(**inputs)))
            finally:
                for name, value in saved.items():
                    setattr(attention, name, value)
                model.k_caches, model.v_caches = caches16
        print(f"step B={bsz:3d} ctx={context}: " + ", ".join(f"{v} {ms:.3f} ms" for v, ms in zip(runs, row["ms"]))
              + f", floor {row['floor_ms']:.3f} ms"
              + (f" (fp8 KV {row['floor_kv8_ms']:.3f} ms)" if "floor_kv8_ms" in row else ""), flush=True)
        yield [row]


def _shape_cells(row: dict) -> str:
    stages = row["num_stages"] if row["num_stages"] is not None else "-"
    return (f"{row['block_n']} | {row['num_warps']} | {stages} | {'on' if row.get('prefetch') else 'off'} "
            f"| {row.get('splits', 1)} | {'on' if row.get('dot') else 'off'}")


KV_DTYPES = {"fp16": torch.float16, "fp8": torch.float8_e4m3fn}


def write_markdown(res: dict, path: Path) -> None:
    lines = [probe_title("Paged decode attention (RoPE + cache write fused): launch shapes", res) + "\n",
             probe_command(res) + f" Llama-2-7B attention ({HEADS} heads of {HEAD_DIM}, fp16), {BLOCK_SIZE}-token "
             "cache blocks at random places; one launch per timing (one layer), L2 flushed before each of "
             f"{res['reps']} graph replays, median. GB/s counts the cached K and V read once; device copy "
             f"{res.get('copy_gbs', 0):.0f} GB/s (read + write). The first row of each table is the engine's "
             "default launch shape.\n"]
    sweep = [r for r in res["rows"] if r.get("part", "sweep") == "sweep"]
    keys = sorted({(r["batch"], r["context"]) for r in sweep})
    for batch, context in keys:
        rows = [r for r in sweep if (r["batch"], r["context"]) == (batch, context)]
        default = next((r for r in rows if "rel_err_vs_reference" in r), rows[0])
        kv = rows[0].get("kv_dtype", "float16")
        lines += [f"## batch {batch}, context {context}" + (f", {kv} cache" if kv != "float16" else "") + "\n",
                  f"Default shape's error against the float32 reference: {default.get('rel_err_vs_reference', float('nan')):.1e}.\n",
                  "| BN | warps | stages | prefetch | splits | dot | ms | GB/s | × copy | × default |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        timed = sorted((r for r in rows if "ms" in r), key=lambda r: (r is not default, r["ms"]))
        for r in timed:
            speed = default["ms"] / r["ms"] if "ms" in default else float("nan")
            lines.append(f"| {_shape_cells(r)} | {r['ms']:.3f} | {r['gbs']:.0f} | {r['gbs'] / r['copy_gbs']:.2f} "
                         f"| {speed:.2f} |")
        for r in (r for r in rows if "error" in r):
            lines.append(f"| {_shape_cells(r)} | – | – | – | {r['error']} |")
        lines.append("")
    steps = [r for r in res["rows"] if r.get("part") == "step"]
    if steps:
        runs = steps[0]["variants"]
        first = runs[0]
        lines += ["## The whole decode step\n",
                  "Graphed step of random-weight Llama-2-7B (4-bit g128, tiled layout, fused RoPE + attention, L2 "
                  f"flushed before each replay) under each attention variant, {first} timed first and last "
                  "(× first: the faster of those two over the variant's time); floor: weights + KV bytes over the "
                  "copy bandwidth. Variants: prefetch = the register double buffer; dot = the tile math on tensor "
                  "cores; splitN = split-KV wherever a batch has fewer than N (sequence, head) programs per SM; "
                  "kv8 = the KV caches in fp8 (e4m3); best ÷ floor counts fp16 KV bytes (fp8 floor: last column).\n",
                  "| batch | context | " + " | ".join(f"{v} ms" for v in runs) + " | "
                  + " | ".join(f"{v} × {first}" for v in runs[1:-1]) + " | best ÷ floor | floor ms | fp8-KV floor ms |",
                  "|---|---|" + "---|" * (2 * len(runs) + 1)]
        for r in steps:
            base = min(r["ms"][0], r["ms"][-1])
            floor8 = f"{r['floor_kv8_ms']:.3f}" if "floor_kv8_ms" in r else "–"
            lines.append(f"| {r['batch']} | {r['context']} | " + " | ".join(f"{ms:.3f}" for ms in r["ms"]) + " | "
                         + " | ".join(f"{base / ms:.2f}" for ms in r["ms"][1:-1])
                         + f" | {min(r['ms']) / r['floor_ms']:.2f} | {r['floor_ms']:.3f} | {floor8} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = probe_parser(__doc__, reps=20, ms="1")
    ap.add_argument("--shapes", default="1x256,16x256,1x2048,16x1024,64x1024,256x512,256x1024",
                    help="BATCHxCONTEXT, comma-separated")
    ap.add_argument("--block-n", default="16,32,64,128")
    ap.add_argument("--warps", default="2,4,8")
    # Triton does not pipeline this loop: its sm_90 SASS is the same at every depth (decode_attention_sass_t36.md)
    ap.add_argument("--stages", default="0", help="Triton pipeline depths (0: Triton's default)")
    ap.add_argument("--prefetch", default="0,1", help="the KV loop's register double buffer off / on")
    ap.add_argument("--splits", default="1", help="split-KV runs per sequence (1: unsplit)")
    ap.add_argument("--dot", default="0", help="the tile math on CUDA cores (0) / tensor cores (1)")
    ap.add_argument("--kv-dtype", default="fp16", choices=sorted(KV_DTYPES),
                    help="the swept launches' cache element type (fp8: e4m3, GB/s counts its one byte)")
    ap.add_argument("--step-batches", default="1,16,64",
                    help="also the graphed 7B decode step at these batch sizes (empty: skip)")
    ap.add_argument("--step-variants", default="base,nodot+split0",
                    help="attention settings the step is timed under, comma-separated (parse_variant); the first "
                         "is timed again last")
    ap.add_argument("--step-context", type=int, default=256)
    ap.add_argument("--stem", default="decode_attention")
    args = ap.parse_args()
    ints = lambda text: [int(v) for v in text.split(",") if v]   # noqa: E731
    step_batches = ints(args.step_batches)
    variants = [v for v in args.step_variants.split(",") if v]
    for variant in variants:
        parse_variant(variant)      # a typo fails before any GPU work
    if any(v < 1 for v in ints(args.splits)):
        raise SystemExit("--splits: each at least 1")
    timer = Timer(args.reps)
    copy_gbs = copy_bandwidth_gbs(timer)

    def parts():
        for batch, context in parse_shapes(args.shapes):
            shapes = launch_shapes(ints(args.block_n), ints(args.warps), ints(args.stages), ints(args.prefetch),
                                   ints(args.splits), ints(args.dot), decode_splits(batch, HEADS, torch.device("cuda")))
            yield shape_rows(batch, context, shapes, timer, copy_gbs, KV_DTYPES[args.kv_dtype])
            torch.cuda.empty_cache()    # the shape's caches (GiBs) went with shape_rows' frame
        if step_batches:
            yield from step_rows(step_batches, args.step_context, variants, timer, copy_gbs)

    run_probe_parts("probe_decode_attention.py", args.stem, args, parts(), write_markdown, copy_gbs=copy_gbs)


if __name__ == "__main__":
    main()
