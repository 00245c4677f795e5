"""SGLang 0.5.17 end to end on one GPU, three GDN decode modes in one run: SGLang's default recurrent decode
(overlap scheduler on), SGLang's ReplaySSM (which needs the overlap scheduler off and the no_buffer radix strategy)
and the KVBuffer plugin (overlap on). Prints a table and writes bench_sglang.json into --out.

    # on the GPU machine (the repo root; .sglang from shared/anchors/get_sglang_runtime.sh .sglang):
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .sglang/*.whl
    PYTHONPATH=/tmp/site CUDA_HOME=/usr/local/cuda python3 benchmarks/bench_sglang.py --quick --out $OUT

Steps: (1) the smoke test: tests/test_sglang_plugin.py on the GPU (the plugin's kernels inside SGLang's real GDN
backend against SGLang's recurrent kernels, decode across flushes and verify + commit), its verdict recorded;
(2) a random-weight Qwen3-Next saved by transformers (6 GDN + 2 attention layers, the real model's 3:1 ratio;
--layers adds depths); (3) one engine per mode, in its own process (SGLang's plugin loader runs once per process),
timing decode steps at each batch size with CUDA graphs ((generate 1 + S tokens - generate 1) / S), then greedy
decoding of fixed prompts with log-probabilities; with --profile, the GDN kernels' share of a profiled step.
Accuracy: random weights give near-tied logits, so greedy tokens of any two decode paths part after a few tokens;
up to that point both decode the same history, so the log-probability each mode gives to the recurrent mode's
tokens there is teacher-forced. Reported: tokens until the first difference and the mean |delta log-probability|
over the shared prefix (KVBuffer must stay closer to recurrent than ReplaySSM).
The plugin is installed for the KVBuffer mode only, as an import shim (kvbuffer -> this checkout, with its entry
point), so the two SGLang modes run SGLang untouched.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("recurrent", "replayssm", "kvbuffer")
CFG = {
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "torch_dtype": "bfloat16",
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5120, "num_hidden_layers": 8,
    "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "hidden_act": "silu",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000000, "partial_rotary_factor": 0.25,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "decoder_sparse_step": 1,
    "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts_per_tok": 10,
    "num_experts": 32, "norm_topk_prob": True, "mlp_only_layers": [], "full_attention_interval": 4,
    "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
}
GDN_KERNELS = ("causal_conv1d_update", "fused_recurrent_gated_delta_rule", "replayssm", "_decode_apply_kernel",
               "_decode_scores_kernel", "_fold_kernel", "fused_sigmoid_gating")


def save_weights(layers: int) -> str:
    """A random, properly initialised Qwen3-Next with `layers` layers (3 GDN : 1 attention), saved once."""
    path = f"/tmp/qwen3next-rand-{layers}"
    if not glob.glob(f"{path}/*.safetensors"):
        import torch
        from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

        torch.manual_seed(0)
        cfg = {k: v for k, v in CFG.items() if k not in ("architectures", "model_type", "torch_dtype")}
        with torch.device("cuda"):
            model = Qwen3NextForCausalLM(Qwen3NextConfig(**{**cfg, "num_hidden_layers": layers})).to(torch.bfloat16)
        model.save_pretrained(path)
        del model
    config = Path(f"{path}/config.json")  # SGLang 0.5.17 reads full_attention_interval, which transformers drops
    config.write_text(json.dumps({**json.loads(config.read_text()), **CFG, "num_hidden_layers": layers}))
    return path


def plugin_shim() -> str:
    """A site folder where `import kvbuffer` resolves to this checkout and SGLang finds the plugin's entry point
    (the GPU machine needs no build or install)."""
    site = Path(tempfile.mkdtemp(prefix="kvb_site_"))
    pkg = site / "kvbuffer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "kernels").symlink_to(REPO / "kernels")
    (pkg / "service").symlink_to(REPO / "service")
    info = site / "kvbuffer-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvbuffer\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[sglang.srt.plugins]\nkvbuffer = kvbuffer.service.sglang.plugin:register\n")
    return str(site)


def smoke(shim: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([shim, str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                              str(REPO / "tests" / "test_sglang_plugin.py")], env=env, cwd="/tmp",
                             capture_output=True, text=True, timeout=420)
        tail = (run.stdout + run.stderr).strip().splitlines()[-15:]
        verdict = "PASS" if run.returncode == 0 else f"FAIL (rc {run.returncode})"
    except subprocess.TimeoutExpired:
        tail, verdict = [], "FAIL (timeout)"
    print(f"[smoke] plugin vs SGLang recurrent inside SGLang's GDN backend on the GPU: {verdict} "
          f"({time.time() - t0:.0f}s)", flush=True)
    if verdict != "PASS":
        print("\n".join(tail), flush=True)
    return {"verdict": verdict, "tail": tail}


def engine_kwargs(mode: str, model: str, args: argparse.Namespace) -> dict:
    kw = dict(model_path=model, skip_tokenizer_init=True, tp_size=1, attention_backend="triton",
              sampling_backend="pytorch", grammar_backend="none", mem_fraction_static=0.6, context_length=4096,
              max_running_requests=max(args.batches), cuda_graph_max_bs_decode=max(args.batches),
              log_level="warning", random_seed=0)
    if mode == "replayssm":
        kw.update(enable_linear_replayssm=True, mamba_radix_cache_strategy="no_buffer", disable_overlap_schedule=True)
    if mode == "kvbuffer" and not args.radix:
        kw.update(disable_radix_cache=True)  # --radix: SGLang's default radix cache (the plugin needs extra_buffer)
    return kw


def profile_share(eng, prompts: list, steps: int, out_dir: str) -> dict:
    """The GDN kernels' share of GPU kernel time over a few profiled decode steps (SGLang's profiler traces)."""
    eng.start_profile(output_dir=out_dir, num_steps=steps, activities=["GPU"])
    eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 3 * steps, "temperature": 0.0,
                                                     "ignore_eos": True})
    time.sleep(2)
    gdn = total = 0.0
    for trace in glob.glob(f"{out_dir}/**/*.json*", recursive=True):
        opener = gzip.open if trace.endswith(".gz") else open
        with opener(trace, "rt") as f:
            events = json.load(f).get("traceEvents", [])
        for ev in events:
            if ev.get("cat") == "kernel":
                total += ev.get("dur", 0.0)
                gdn += ev.get("dur", 0.0) if any(k in ev.get("name", "") for k in GDN_KERNELS) else 0.0
    if total == 0:
        raise RuntimeError(f"no kernel events in the traces under {out_dir}")
    return {"gdn_share": gdn / total, "gdn_us": gdn, "kernel_us": total}


def worker(args: argparse.Namespace) -> None:
    """One mode's engine: decode step times, greedy tokens with log-probabilities, optionally the GDN share."""
    import sglang as sgl

    eng = sgl.Engine(**engine_kwargs(args.worker, args.model, args))
    res: dict = {"mode": args.worker, "model": args.model, "steps": args.steps}
    try:
        rng = random.Random(1)
        for B in args.batches:
            prompts = [[rng.randrange(1000, 100000) for _ in range(32)] for _ in range(B)]

            def sp(n: int) -> dict:
                return {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}

            eng.generate(input_ids=prompts, sampling_params=sp(8))  # graphs, JIT, autotune
            t = time.perf_counter()
            eng.generate(input_ids=prompts, sampling_params=sp(1))
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            eng.generate(input_ids=prompts, sampling_params=sp(args.steps + 1))
            t2 = time.perf_counter() - t
            res[f"B{B}"] = {"decode_step_ms": (t2 - t1) / args.steps * 1e3}
            print(f"[{args.worker}] B={B} decode step {res[f'B{B}']['decode_step_ms']:.3f} ms", flush=True)
        rng = random.Random(7)
        prompts = [[rng.randrange(1000, 100000) for _ in range(48)] for _ in range(8)]
        outs = eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": args.accuracy_tokens,
                                                               "temperature": 0.0, "ignore_eos": True},
                            return_logprob=True)
        res["greedy"] = [{"ids": o["output_ids"],
                          "logprobs": [lp[0] for lp in o["meta_info"]["output_token_logprobs"]]} for o in outs]
        if args.profile:
            try:
                res["profile"] = profile_share(eng, [p[:32] for p in prompts * 8], 5,
                                               tempfile.mkdtemp(prefix=f"prof_{args.worker}_"))
            except Exception as e:  # the table says why instead of a number
                res["profile"] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        eng.shutdown()
    Path(args.result).write_text(json.dumps(res))


def accuracy(base: list, other: list) -> dict:
    """Tokens until the first difference and mean |delta logprob| over the shared prefix (teacher-forced there)."""
    firsts, deltas = [], []
    for b, o in zip(base, other, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(b["ids"], o["ids"], strict=False)) if x != y), len(b["ids"]))
        firsts.append(n)
        # position n's log-probability still scores the same history (the tokens before n agree)
        deltas += [abs(x - y) for x, y in zip(b["logprobs"][:n + 1], o["logprobs"][:n + 1], strict=False)]
    return {"first_difference_mean": sum(firsts) / len(firsts), "first_difference_min": min(firsts),
            "mean_abs_dlogprob": sum(deltas) / max(len(deltas), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="one depth (8 layers), 64 steps per batch, no profile")
    ap.add_argument("--layers", type=int, nargs="+", default=[8])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--accuracy-tokens", type=int, default=64)
    ap.add_argument("--buffer-size", type=int, default=24)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--profile", action="store_true", help="GDN share of the step from SGLang's profiler")
    ap.add_argument("--skip-smoke", action="store_true")
    ap.add_argument("--radix", action="store_true", help="KVBuffer mode keeps SGLang's default radix cache")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.layers, args.steps, args.accuracy_tokens, args.profile = [8], 64, 48, False
    os.makedirs(args.out, exist_ok=True)
    shim = plugin_shim()
    report: dict = {"smoke": None if args.skip_smoke else smoke(shim), "runs": {}}
    for layers in args.layers:
        model = save_weights(layers)
        runs = {}
        for mode in MODES:
            result = os.path.join(args.out, f"sglang_{mode}_{layers}.json")
            env = dict(os.environ)
            if mode == "kvbuffer":
                env.update(SGLANG_PLUGINS="kvbuffer", KVBUFFER_SGLANG_DECODE_MODE="kvbuffer",
                           KVBUFFER_SGLANG_BUFFER_SIZE=str(args.buffer_size),
                           KVBUFFER_SGLANG_CHUNK_SIZE=str(args.chunk_size),
                           PYTHONPATH=os.pathsep.join([shim, env.get("PYTHONPATH", "")]))
            cmd = [sys.executable, __file__, "--worker", mode, "--model", model, "--result", result,
                   "--steps", str(args.steps), "--accuracy-tokens", str(args.accuracy_tokens),
                   "--batches", *map(str, args.batches)] + (["--profile"] if args.profile else []) + (
                       ["--radix"] if args.radix else [])
            t0 = time.time()
            rc = subprocess.run(cmd, env=env, timeout=900).returncode
            print(f"[{mode}] layers={layers} done in {time.time() - t0:.0f}s (rc {rc})", flush=True)
            ok = rc == 0 and os.path.exists(result)
            runs[mode] = json.loads(Path(result).read_text()) if ok else {"error": f"rc {rc}"}
        report["runs"][layers] = runs
        table(layers, runs, args.batches)
    Path(args.out, "bench_sglang.json").write_text(json.dumps(report, indent=1))


def table(layers: int, runs: dict, batches: list) -> None:
    base = runs.get("recurrent", {})
    print(f"\nQwen3-Next random weights, {layers} layers ({layers * 3 // 4} GDN), H200, CUDA graphs: "
          "decode step ms (ratio to SGLang recurrent)")
    print("| mode | " + " | ".join(f"B={b}" for b in batches) + " | first diff (tokens) | mean abs dlogprob | "
          "GDN share |")
    print("| --- " * (len(batches) + 4) + "|")
    for mode, run in runs.items():
        if "error" in run:
            print(f"| {mode} | failed: {run['error']} |")
            continue
        cells = []
        for b in batches:
            ms = run[f"B{b}"]["decode_step_ms"]
            ref = base.get(f"B{b}", {}).get("decode_step_ms")
            cells.append(f"{ms:.3f} ({ms / ref:.2f}x)" if ref else f"{ms:.3f}")
        acc = accuracy(base["greedy"], run["greedy"]) if "greedy" in base and mode != "recurrent" else None
        run["accuracy_vs_recurrent"] = acc
        prof = run.get("profile", {})
        share = f"{prof['gdn_share']:.2f}" if "gdn_share" in prof else prof.get("error", "-")
        acc_cells = (f"{acc['first_difference_mean']:.1f} (min {acc['first_difference_min']}) | "
                     f"{acc['mean_abs_dlogprob']:.2e}") if acc else "- | -"
        print(f"| {mode} | " + " | ".join(cells) + f" | {acc_cells} | {share} |", flush=True)


if __name__ == "__main__":
    main()
