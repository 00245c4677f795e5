"""The teacher-forcing harness of benchmarks/bench_sglang.py on the CPU: its SGLang custom logit processor, the
record files it writes and the statistics the table prints.

SGLang's sampler cannot run here (it needs a GPU engine), so the processor is called the way SGLang's
`apply_custom_logit_processor` calls it: the batch's logits and one custom-params dict per row, each carrying the
request under "__req__". The requests are fakes (SimpleNamespace with a `rid`), the only Req attribute it reads.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sglang.py"
VOCAB = 50


@pytest.fixture(scope="module")
def bench():
    """The benchmark as a module under a name no other process can import (so dill ships the processor by value,
    as it does from the benchmark's __main__ on the GPU machine)."""
    spec = importlib.util.spec_from_file_location("bench_sglang_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def request(tmp_path: Path, row: int, forced: list[int]) -> dict:
    """Custom params as SGLang hands them to the processor: the request's own plus "__req__" (a fake Req)."""
    return {"dir": str(tmp_path), "row": row, "forced": forced, "__req__": SimpleNamespace(rid=uuid.uuid4().hex)}


def test_forces_each_request_at_its_own_step_and_records_the_raw_logprob(bench, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(11)
    steps = 6
    forced = [torch.randint(0, VOCAB, (steps,), generator=gen).tolist() for _ in range(2)]
    reqs = [request(tmp_path, 0, forced[0]), request(tmp_path, 1, forced[1]), request(tmp_path, 2, [])]
    # batch composition changes as requests join, leave and are reordered; row 2 runs free (its own greedy token)
    schedule = [[0, 1], [0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 0, 1], [0, 2, 1], [2, 1], [2, 1], [2]]
    expected: dict[int, list[tuple[int, float]]] = {0: [], 1: [], 2: []}
    processor = bench.TeacherForcing()
    for rows in schedule:
        logits = torch.randn(len(rows), VOCAB, generator=gen) * 3
        raw = logits.clone()
        out = processor(logits, [reqs[r] for r in rows])
        oracle = torch.log_softmax(raw.double(), dim=-1)
        for i, r in enumerate(rows):
            step = len(expected[r]) if r == 2 or len(expected[r]) < steps else None
            if step is None:  # past the forced tokens: untouched, not recorded
                assert torch.equal(out[i], raw[i])
                continue
            token = forced[r][step] if r < 2 else int(raw[i].argmax())
            expected[r].append((token, float(oracle[i, token])))
            assert int(out[i].argmax()) == token and torch.isinf(out[i]).sum() == VOCAB - 1
    rec = bench.read_forced(str(tmp_path), 2, steps)
    for r in range(2):
        assert rec["tokens"][r] == forced[r]
        assert rec["logprobs"][r] == pytest.approx([lp for _, lp in expected[r]], abs=1e-5)
    free = bench.read_forced(str(tmp_path), 3, 1)  # row 2 recorded one line per step it ran
    assert free["tokens"][2] == [expected[2][0][0]]
    assert len(next(tmp_path.glob("2-*")).read_text().splitlines()) == len(expected[2]) == 8


def test_rows_without_params_are_left_alone(bench, tmp_path: Path) -> None:
    logits = torch.randn(2, VOCAB)
    raw = logits.clone()
    out = bench.TeacherForcing()(logits, [None, request(tmp_path, 0, [7])])
    assert torch.equal(out[0], raw[0]) and int(out[1].argmax()) == 7


def test_records_out_of_order_are_refused(bench, tmp_path: Path) -> None:
    (tmp_path / "0-abc").write_text("0 5 -1.0\n2 6 -2.0\n")
    with pytest.raises(RuntimeError, match="row 0"):
        bench.read_forced(str(tmp_path), 1, 2)


def test_processor_string_loads_in_a_process_without_the_benchmark(bench, tmp_path: Path) -> None:
    """What SGLang's scheduler does with the string (`_cache_from_str`: json, then dill.loads), then one call."""
    code = (
        "import json, sys, types, dill, torch\n"
        "cls = dill.loads(bytes.fromhex(json.loads(sys.stdin.read())['callable']))\n"
        "params = {'dir': sys.argv[1], 'row': 0, 'forced': [4], '__req__': types.SimpleNamespace(rid='r')}\n"
        "out = cls()(torch.zeros(1, 9), [params])\n"
        "print(int(out[0].argmax()))\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], input=bench.processor_string(),
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "4"
    assert bench.read_forced(str(tmp_path), 1, 1)["logprobs"][0] == pytest.approx([-torch.log(torch.tensor(9.0))])


def test_forced_delta_statistics(bench) -> None:
    base = {"logprobs": [[-1.0, -2.0, -0.5], [-3.0, -1.5, -0.75]]}
    other = {"logprobs": [[-1.0, -2.5, -0.25], [-3.0, -1.5, -1.75]]}
    got = bench.forced_delta(base, other, split=2)
    assert got["positions"] == 6
    assert got["mean"] == pytest.approx((0.5 + 0.25 + 1.0) / 6)
    assert got["p99"] == 1.0 and got["identical"] == pytest.approx(3 / 6)
    assert got["mean_early"] == pytest.approx(0.5 / 4) and got["mean_late"] == pytest.approx(1.25 / 2)


def test_forcing_prompts_span_short_and_long_contexts(bench) -> None:
    lengths = [len(p) for p in bench.forcing_prompts()]
    assert len(lengths) == 32 and min(lengths) == 16 and max(lengths) == 200 and len(set(lengths)) == 32
    assert bench.forcing_prompts() == bench.forcing_prompts()  # seeded: every mode gets the same prompts


def test_tables_from_worker_results(bench, capsys: pytest.CaptureFixture[str]) -> None:
    """The tables the GPU run prints, from results shaped like the workers' (a crash there would lose the run)."""
    gen = torch.Generator().manual_seed(5)

    def forced() -> dict:
        return {"tokens": [[1] * 64] * 2, "logprobs": (-torch.rand(2, 64, generator=gen)).tolist(),
                "output_mismatches": 0}

    recurrent = {"B1": {"decode_step_ms": 2.0}, "forced": forced()}
    recurrent["forced_again"] = {**recurrent["forced"]}
    kvbuffer = {"B1": {"decode_step_ms": 1.0}, "forced": forced()}
    runs = {"recurrent": recurrent, "replayssm": {"error": "rc 1"}, "kvbuffer": kvbuffer}
    bench.table(8, runs, [1], 16)
    out = capsys.readouterr().out
    want = bench.forced_delta(recurrent["forced"], kvbuffer["forced"], 16)
    assert f"| kvbuffer | 1.000 (0.50x) | {want['mean']:.2e} |" in out
    assert "| recurrent (forced again) | 2.000 (1.00x) | 0.00e+00 | 0.00e+00 | 1.000 |" in out
    assert "| replayssm | failed: rc 1 |" in out

    spec = {"recurrent": {"B1": {"ms_per_token": 1.0, "accept_length": 2.5}},
            "kvbuffer": {"B1": {"ms_per_token": 0.8, "accept_length": 2.5}, "plugin_buffer_bytes_per_layer": 2**20}}
    bench.spec_table(8, spec, [1])
    out = capsys.readouterr().out
    assert "| kvbuffer+NGRAM | 0.800 (2.50, 0.80x) | 6.00 MiB (KVBuffer buffer;" in out
    assert "| recurrent+NGRAM | 1.000 (2.50, 1.00x) | 48.0 MiB (intermediate_ssm" in out
