"""The service end to end on one GPU: `kvbuffer serve` with engine sglang (KVBuffer plugin off and on, and FP8) and
with engine native, each driven over gRPC by load_test.py: streaming at several concurrencies, unary, a cancel
storm and a SIGTERM drain. Prints one TTFT/TPOT table per engine and a summary; exit status 1 if any run failed
(the others still run).

The model is made here, no hub: a Qwen3-Next with Qwen3-Next-80B's Gated DeltaNet and attention shapes, fewer
layers (6 GDN + 2 attention) and experts, random weights (transformers' init) saved in bf16 by transformers, and a
byte-level BPE tokenizer trained with `tokenizers` on generated text. Random weights make the text meaningless;
ignore_eos keeps every request to its full length.

    python3 benchmarks/bench_service_sglang.py --out $OUT           # about 5 minutes on an H200
    python3 benchmarks/bench_service_sglang.py --runs native --clients 1 8   # a subset

Setup on the GPU machine: benchmarks/README.md ("The service with SGLang").
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = {
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "vocab_size": 8192,
    "hidden_size": 2048, "intermediate_size": 5120, "num_hidden_layers": 8, "full_attention_interval": 4,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
    "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "hidden_act": "silu",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "decoder_sparse_step": 1, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "num_experts_per_tok": 8, "num_experts": 32, "norm_topk_prob": True,
    "mlp_only_layers": [], "tie_word_embeddings": False, "attention_bias": False, "initializer_range": 0.02,
}
WORDS = ["state", "buffer", "chunk", "flush", "decode", "verify", "draft", "token", "layer", "head", "value", "key",
         "query", "gate", "delta", "net", "attention", "expert", "router", "model", "request", "stream", "server",
         "replica", "memory", "kernel", "tensor", "batch", "step", "cache", "prefix", "the", "a", "of", "to", "and",
         "in", "is", "that", "for", "on", "with", "as", "by", "at", "from", "it", "this", "be", "are", "was"]
# debug: SGLang then logs at info (a step quieter than serve), its start-up steps included
SGLANG = ["--engine", "sglang", "--sglang-mem-fraction-static", "0.6", "--log-level", "debug",
          "--sglang-extra-server-args", json.dumps({"attention_backend": "triton", "sampling_backend": "pytorch",
                                                    "grammar_backend": "none"})]
RUNS = {  # name -> flags of `kvbuffer serve` (beside the common ones)
    "sglang-recurrent": [*SGLANG, "--decode-mode", "recurrent"],
    "sglang-kvbuffer": [*SGLANG, "--decode-mode", "kvbuffer"],
    "sglang-kvbuffer-fp8": [*SGLANG, "--decode-mode", "kvbuffer", "--sglang-quantization", "fp8"],
    "native": ["--engine", "native", "--device", "cuda", "--memory-budget-bytes", str(8 * 2**30)],
}


def save_model(path: Path, seed: int, device: str = "cuda") -> None:
    """Random bf16 weights by transformers, a trained tokenizer; config.json keeps full_attention_interval, which
    SGLang 0.5.17 reads and transformers drops."""
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3NextConfig, Qwen3NextForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    text = [" ".join(rng.choices(WORDS, k=40)) + rng.choice(".!?") for _ in range(2000)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(text, trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(path)
    config = {k: v for k, v in MODEL.items() if k not in ("architectures", "model_type")}
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3NextForCausalLM(Qwen3NextConfig(**config, eos_token_id=0)).to(torch.bfloat16)
    model.save_pretrained(path)
    saved = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**saved, **MODEL, "eos_token_id": 0, "torch_dtype": "bfloat16"}))


def run(name: str, model: Path, args: argparse.Namespace) -> tuple[bool, str]:
    """One engine under load_test.py; (ok, its output). The server's log goes to NAME.log as it is written, so
    that a run killed from outside (a device call's time limit) leaves it too."""
    common = ["--model", str(model), "--max-running-requests", str(max(args.clients)), "--max-waiting-requests",
              str(max(args.clients)), "--max-context-length", "4096", "--cuda-graph-max-batch", str(max(args.clients)),
              "--startup-report-s", str(args.startup_timeout_s * 0.75)]  # stacks before load_test gives up
    test = [sys.executable, str(HERE / "load_test.py"), "--clients", *map(str, args.clients), "--unary-clients",
            str(args.unary_clients), "--duration", str(args.duration), "--prompt-chars", "96", "--max-new-tokens",
            str(args.max_new_tokens), "--cancel-storm", str(args.cancel_storm), "--drain", str(args.drain),
            "--startup-timeout-s", str(args.startup_timeout_s), "--", *common, *RUNS[name]]
    start = time.monotonic()
    log_path = (args.out or Path(tempfile.mkdtemp(prefix="bench-service-"))) / f"{name}.log"
    with log_path.open("w") as log_file:
        try:
            done = subprocess.run(test, stdout=subprocess.PIPE, stderr=log_file, text=True,
                                  timeout=args.run_timeout_s)
            ok, out = done.returncode == 0, done.stdout
        except subprocess.TimeoutExpired as timeout:  # load_test's own server is killed with it
            ok, out = False, _text(timeout.stdout)
            print(f"timed out after {args.run_timeout_s} s", file=log_file)
    head = f"## {name} ({'ok' if ok else 'FAILED'}, {time.monotonic() - start:.0f} s with start-up)"
    tail = "" if ok else "\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
    return ok, f"{head}\nflags: {' '.join(RUNS[name])}\n{out}{tail}"


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/kvbuffer-qwen3-next-random"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64], help="streaming concurrencies")
    parser.add_argument("--unary-clients", type=int, default=16, help="concurrency of the unary run")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of load per row")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--cancel-storm", type=int, default=64)
    parser.add_argument("--drain", type=int, default=8)
    parser.add_argument("--startup-timeout-s", type=float, default=240.0)
    parser.add_argument("--run-timeout-s", type=float, default=360.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for each run's server log and the tables (tables.md)")
    args = parser.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    save_model(args.model_dir, args.seed)
    print(f"model saved in {time.monotonic() - start:.0f} s: {args.model_dir}", flush=True)
    results = []
    for name in args.runs:
        ok, text = run(name, args.model_dir, args)
        print(text, flush=True)
        results.append((name, ok, text))
    summary = "\n".join(f"- {name}: {'ok' if ok else 'FAILED'}" for name, ok, _ in results)
    print(f"\n# summary ({time.monotonic() - start:.0f} s)\n{summary}")
    if args.out:
        (args.out / "tables.md").write_text("\n\n".join(text for _, _, text in results) + f"\n\n{summary}\n")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
