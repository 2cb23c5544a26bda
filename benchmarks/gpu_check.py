"""`make gpu-check`: every CUDA path of dsv3 run and measured once, in under 8 minutes on one GPU.

    a  tests   `pytest -m cuda tests/test_cuda.py`: FP8 scaled_mm blockwise GEMMs vs the emulation (forward, dgrad,
               wgrad), bf16-mixed training (eager and compiled blocks), absorbed bf16 decoding vs expanded, the grouped
               expert GEMM vs a per-expert loop
    b  fp8     FP8Linear (FP32 master weight, quantisation included) vs a BF16 nn.Linear, forward+backward, at the
               issue-5 shapes of benchmarks/fp8_linear.py, 8192 tokens, eager and torch.compile'd (target >= 1.3x)
    c  train   a recipes/small.yaml-shaped model (its model section and micro-batch, vocabulary 32768) trained on random
               tokens for a fixed number of steps: tokens/s and MFU, bf16-mixed and fp8-blockwise, eager and with
               compiled blocks (dsv3.train.compile.compile_blocks)
    d  decode  decode tokens/s after a 4K-token prefill in bf16, batch 1: dsv3 absorbed MLA vs transformers'
               DeepseekV3ForCausalLM on the same weights (benchmarks/decode.py's model: the 671B attention, 2 layers)

Each part runs in its own process with its own time budget (a 145 s, b 85 s, c 150 s, d 55 s): a failure or an
overrun is recorded and the next part runs; what a part measured before it was stopped is kept. Results go to
OUT/gpu-check.json (the machine, every figure, every error), OUT/gpu-check.md (the tables, also printed at the end) and
OUT/gpu-check.log (each part's own output); OUT is --out, else $OUT, else runs/gpu-check. Without a CUDA device it
prints one line and exits 0, measuring nothing.

MFU = counted training FLOPs / (step time x 989 TFLOP/s, the H100/H200 SXM dense BF16 peak; docs/design.md,
"Measuring"). FLOPs per token: 6 x the parameters each token multiplies (active experts only; the input embedding is
a lookup and not counted; the output head counted once for the main model and once per MTP depth) plus attention, 6
x seq_len x heads x (qk_head_dim + v_head_dim) per layer (PaLM's convention: the full, non-causal score matrix). The
fp8 rows use the same BF16 peak as denominator (FP8's is twice that).

It needs only torch, transformers, safetensors and yaml (what the lent GPU machine has, with its own python3 and torch
2.11): recipes are read with yaml (not dsv3.config, which needs pydantic), dsv3 packages whose __init__ imports
Lightning or datasets are loaded module by module, and every torch feature is detected, not assumed.

On a lent machine (the device tool, H200), from a session's checkout, one command, nothing to carry (the tree travels;
the script puts the repository on sys.path and uses the machine's python3):

    run(command="make gpu-check OUT=$OUT", timeout_s=540)

(or command="python3 benchmarks/gpu_check.py --out $OUT" if make is missing there). The run takes at most ~8 minutes;
the 9-minute limit leaves about 6 of a session's 15 for the machine's start and a rerun of only the parts that failed,
e.g. `python3 benchmarks/gpu_check.py --out $OUT --parts c d`. Its three files come back from $OUT.
`python3 benchmarks/gpu_check.py --cpu-dry-run` runs every part on the CPU at toy sizes, to check the script itself.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

# name, budget in seconds: with 5 s of grace each and ~10 s of machine info, at most 475 s in all
PARTS = {"a": ("tests", 145), "b": ("fp8", 85), "c": ("train", 150), "d": ("decode", 55)}
BF16_PEAK = 989e12  # H100/H200 SXM dense BF16 FLOP/s (datasheet; docs/design.md, "Measuring")
SIZES = {
    "cuda": dict(
        fp8_shapes=[(7168, 2048), (2048, 7168), (4096, 4096)],  # (in, out): benchmarks/fp8_linear.py's SHAPES (issue 5)
        fp8_tokens=8192, fp8_repeats=20,
        train_recipe="small.yaml", train_batch=None, train_seq=None,  # None: the recipe's micro-batch and length
        train_warmup=3, train_steps=8,  # per variant: 3 warm-up steps (the first compiles), 8 timed
        decode_recipe=None, decode_layers=2, decode_context=4096, decode_steps=20,  # None: the 671B attention
    ),
    # --cpu-dry-run: the script's own check on a machine without a GPU; every part on the CPU at toy sizes
    "cpu": dict(
        fp8_shapes=[(256, 128)], fp8_tokens=256, fp8_repeats=2,
        train_recipe="smoke.yaml", train_batch=2, train_seq=64, train_warmup=1, train_steps=2,
        decode_recipe="smoke.yaml", decode_layers=None, decode_context=64, decode_steps=2,
    ),
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ helpers


def submodule(name: str):
    """Import the dsv3 module `name`; when its package's __init__ needs a package this machine lacks (dsv3.fp8's
    imports Lightning, dsv3.train's datasets and pydantic), the package is registered bare so its modules still load."""
    package = name.rpartition(".")[0]
    try:
        importlib.import_module(package)
    except ImportError:
        bare = types.ModuleType(package)
        bare.__path__ = [str(REPO / package.replace(".", "/"))]
        sys.modules[package] = bare
    return importlib.import_module(name)


def read_recipe(path: Path) -> dict:
    """A recipe file with its `base:` chain merged section by section, as dsv3.config reads it (without pydantic)."""
    import yaml

    raw = yaml.safe_load(path.read_text()) or {}
    base = raw.pop("base", None)
    return raw if base is None else deep_merge(read_recipe(path.parent / base), raw)


def deep_merge(base: dict, overlay: dict) -> dict:
    merged = dict(base)
    for key, value in overlay.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def recipe_model_config(recipe: dict):
    """DSV3Config of a recipe's model section: `vocab_size: null` is the tokenizer's size, rope_theta plain RoPE."""
    from dsv3.model import DSV3Config

    fields = dict(recipe["model"])
    theta = fields.pop("rope_theta", 10000.0)
    fields["vocab_size"] = fields.get("vocab_size") or recipe["tokenizer"]["vocab_size"]
    return DSV3Config(**fields, rope_parameters={"rope_type": "default", "rope_theta": theta})


def train_flops_per_token(config, seq_len: int) -> float:
    """Forward+backward FLOPs per token (see the module docstring): 6 x multiplied parameters + attention."""
    from dsv3.model import count_parameters

    counts = count_parameters(config)
    depth = config.num_nextn_predict_layers
    idle_experts = config.n_routed_experts - config.num_experts_per_tok
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    embedding = config.vocab_size * config.hidden_size
    main = counts["active"] - embedding  # the head stays in, the embedding lookup does not
    mtp = counts["mtp"] - depth * idle_experts * expert + depth * embedding  # MTP blocks (MoE) + the shared head again
    layers = config.num_hidden_layers + depth
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    attention = 6 * layers * seq_len * config.num_attention_heads * (qk + config.v_head_dim)
    return 6 * (main + mtp) + attention


def machine(device: str) -> dict:
    """The GPU (or, in a CPU dry run, the CPU), the software, and the measured BF16 matmul rate."""
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError as error:
        info["transformers"] = f"missing ({error})"
    if device != "cuda":
        return info | {"gpu": f"none: CPU dry run ({platform.processor() or platform.machine()})", "capability": "-",
                       "gpu_memory_gib": 0, "multiprocessors": 0, "driver": None, "bf16_matmul_tflops_8192": None}  # fmt: skip
    props = torch.cuda.get_device_properties(0)
    info |= {
        "gpu": torch.cuda.get_device_name(0),
        "capability": "sm_{}{}".format(*torch.cuda.get_device_capability(0)),
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
    }
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)  # fmt: skip
        info["driver"] = smi.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    info["bf16_matmul_tflops_8192"] = round(2 * 8192**3 / matmul_ms(8192) / 1e9, 1)  # the ceiling, beside the 989
    torch.cuda.empty_cache()
    return info


def matmul_ms(n: int) -> float:
    """Mean milliseconds of an n x n x n bf16 matmul on random data (docs/design.md, "Measuring": the ceiling, not
    zeros)."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    return mean_ms(lambda: a @ b, 10, "cuda")


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def mean_ms(fn, repeats: int, device: str) -> float:
    """Mean milliseconds of fn() over `repeats` calls: CUDA events on a GPU, the wall clock on a CPU."""
    import torch

    if device != "cuda":
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - started) / repeats * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


class Part:
    """What one part reports: rows (dicts) and errors, appended as JSON lines to `path` as soon as they exist, so the
    parent keeps them if the part is stopped at its budget."""

    def __init__(self, path: Path, deadline: float, device: str):
        self.path, self.deadline, self.device, self.sizes = path, deadline, device, SIZES[device]

    def left(self) -> float:
        return self.deadline - time.time()

    def row(self, **row) -> None:
        self._write({"row": row})
        print("row:", json.dumps(row), flush=True)

    def error(self, what: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        self._write({"error": {"what": what, "error": text}})
        print(f"error: {what}: {text}", flush=True)

    def _write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------- a: CUDA tests


def part_tests(part: Part) -> None:
    try:
        import pytest
    except ImportError as error:
        part.error("pytest", f"pytest is not importable ({error}): the CUDA tests were not run")
        return

    class Recorder:
        """One row per test as soon as it ends (kept if the part is stopped at its budget)."""

        def pytest_runtest_logreport(self, report):
            if report.when != "call" and report.passed:
                return
            message = ""
            if report.skipped and isinstance(report.longrepr, tuple):
                message = report.longrepr[2].removeprefix("Skipped: ")
            elif report.failed:
                crash = getattr(report.longrepr, "reprcrash", None)
                message = crash.message if crash is not None else str(report.longrepr)
            message = (message.strip().splitlines() or [""])[0][:200].replace("|", "/")
            outcome = report.outcome if report.when == "call" or report.skipped else f"{report.outcome} ({report.when})"
            part.row(test=report.nodeid.split("::", 1)[-1], outcome=outcome, seconds=round(report.duration, 2), message=message)

    code = pytest.main(["-m", "cuda", str(REPO / "tests" / "test_cuda.py"), "-p", "no:cacheprovider", "-q", "-rA",
                        "--rootdir", str(REPO)], plugins=[Recorder()])  # fmt: skip
    if code not in (0, 1, 5):  # 1: some test failed (rows say which); 5: none collected
        part.error("pytest", f"pytest exited with {int(code)}")


# ------------------------------------------------------------------------------------------ b: FP8 linear


def part_fp8(part: Part) -> None:
    import torch
    from torch import nn

    device, sizes = part.device, part.sizes
    linear = submodule("dsv3.fp8.linear")
    backend = linear.resolve_backend("auto", device)
    if backend != "scaled_mm":
        part.error("backend", f"scaled_mm blockwise does not run here (needs sm_90, CUDA >= 12.9): timing the {backend} "
                              "backend instead")  # fmt: skip

    def step(layer, x, dy):
        layer(x).backward(dy)
        layer.weight.grad = None
        x.grad = None

    torch.manual_seed(0)
    tokens, cases = sizes["fp8_tokens"], []
    for d_in, d_out in sizes["fp8_shapes"]:
        bf16 = nn.Linear(d_in, d_out, bias=False, device=device, dtype=torch.bfloat16)
        fp8 = linear.FP8Linear(d_in, d_out, bias=False, device=device, backend=backend)  # FP32 master weight
        x = torch.randn(tokens, d_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(tokens, d_out, device=device, dtype=torch.bfloat16)
        cases.append((d_in, d_out, bf16, fp8, x, dy))
    for mode in ("eager", "compiled"):
        for d_in, d_out, bf16, fp8, x, dy in cases:
            if mode == "compiled" and part.left() < 25:
                part.error(f"compiled {d_in}x{d_out}", "not measured: the part's time budget ran out")
                continue
            row = dict(mode=mode, tokens=tokens, d_in=d_in, d_out=d_out, backend=backend)
            tflop = 6 * tokens * d_in * d_out / 1e12
            for name, layer in (("bf16", bf16), ("fp8", fp8)):
                try:
                    run = torch.compile(layer) if mode == "compiled" else layer
                    started = time.time()
                    for _ in range(3):
                        step(run, x, dy)
                    synchronize(device)
                    row[f"{name}_warmup_s"] = round(time.time() - started, 2)
                    ms = mean_ms(lambda run=run, x=x, dy=dy: step(run, x, dy), sizes["fp8_repeats"], device)
                    row[f"{name}_ms"], row[f"{name}_tflops"] = round(ms, 3), round(tflop / ms * 1e3, 1)
                except Exception as error:  # noqa: BLE001 - recorded, the next measurement runs
                    part.error(f"{mode} {name} {d_in}x{d_out}", error)
            if "bf16_ms" in row and "fp8_ms" in row:
                row["fp8_speedup"] = round(row["bf16_ms"] / row["fp8_ms"], 2)
            part.row(**row)


# --------------------------------------------------------------------------------- c: small.yaml training


def part_train(part: Part) -> None:
    import torch
    from torch._dynamo.utils import counters

    from dsv3.model import DSV3ForCausalLM

    device, sizes = part.device, part.sizes
    recipe = read_recipe(REPO / "recipes" / sizes["train_recipe"])
    config = recipe_model_config(recipe)
    batch = sizes["train_batch"] or recipe["pretrain"]["micro_batch_size"]
    seq_len = sizes["train_seq"] or recipe["data"]["seq_len"]
    warmup, steps = sizes["train_warmup"], sizes["train_steps"]
    flops_step = train_flops_per_token(config, seq_len) * batch * seq_len
    convert = submodule("dsv3.fp8.convert")
    compile_blocks = submodule("dsv3.train.compile").compile_blocks
    fp8_backend = submodule("dsv3.fp8.linear").resolve_backend("auto", device)
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device, generator=generator)
    variants = (("bf16-mixed", False), ("fp8-blockwise", False), ("bf16-mixed", True), ("fp8-blockwise", True))
    for precision, compiled in variants:
        name = f"{precision} {'compiled' if compiled else 'eager'}"
        if part.left() < 20:
            part.error(name, "not measured: the part's time budget ran out")
            continue
        model = optimizer = out = loss = None
        try:
            torch.manual_seed(0)
            model = DSV3ForCausalLM(config).to(device).train()  # FP32 master weights
            if precision == "fp8-blockwise":
                convert.convert_to_fp8(model, fp8_backend)
            if compiled:
                compile_blocks(model)
            try:
                optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
            except (TypeError, RuntimeError):
                optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-3, betas=(0.9, 0.95), weight_decay=0.1)
            breaks = sum(counters["graph_break"].values())
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times, losses = [], []
            for step in range(warmup + steps):
                synchronize(device)
                started = time.perf_counter()
                with torch.autocast(device, dtype=torch.bfloat16):
                    out = model(input_ids=ids, labels=ids)
                    loss = out.loss + 0.3 * out.mtp_losses.mean() + out.balance_loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())  # synchronises
                times.append(time.perf_counter() - started)
                if part.left() < 5 and step >= warmup:
                    break
            timed = times[warmup:] or times[-1:]
            median = statistics.median(timed)
            part.row(
                variant=name, fp8_backend=fp8_backend if precision == "fp8-blockwise" else None,
                batch=batch, seq_len=seq_len, first_step_s=round(times[0], 2), steps_timed=len(timed),
                step_ms_median=round(median * 1e3, 1), step_ms_best=round(min(timed) * 1e3, 1),
                tokens_per_s=round(batch * seq_len / median), tflops=round(flops_step / median / 1e12, 1),
                mfu_pct=round(100 * flops_step / median / BF16_PEAK, 1),
                peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None,
                loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4), finite=all(map(math.isfinite, losses)),
                graph_breaks=sum(counters["graph_break"].values()) - breaks if compiled else None,
            )  # fmt: skip
        except Exception as error:  # noqa: BLE001 - recorded, the next variant runs
            part.error(name, error)
        finally:
            del model, optimizer, out, loss
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
            torch._dynamo.reset()


# -------------------------------------------------------------------------------------------- d: decode


def part_decode(part: Part) -> None:
    import torch
    from decode import clone_cache
    from kv_cache import config_671b_attention
    from transformers import AutoModelForCausalLM
    from transformers.cache_utils import DynamicCache

    from dsv3.infer.absorbed import absorb_attention
    from dsv3.model import DSV3ForCausalLM
    from dsv3.model.hf import export_hf
    from dsv3.model.model import CACHE_FIELD

    device, sizes = part.device, part.sizes
    context, steps = sizes["decode_context"], sizes["decode_steps"]
    if sizes["decode_recipe"]:
        config = recipe_model_config(read_recipe(REPO / "recipes" / sizes["decode_recipe"]))
    else:
        config = config_671b_attention(sizes["decode_layers"])
    config.max_position_embeddings = context + steps + 16
    torch.manual_seed(0)
    ours = DSV3ForCausalLM(config).to(torch.bfloat16).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(Path(tmp) / "ckpt")
        export_hf(Path(tmp) / "ckpt", Path(tmp) / "hf", with_tokenizer=False)
        theirs = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.bfloat16).to(device).eval()
    ours = absorb_attention(ours.to(device))
    models = {"dsv3 absorbed": ours, "transformers DeepseekV3": theirs}
    with torch.no_grad():
        prompt = torch.randint(0, config.vocab_size, (1, context), device=device)
        cache = DynamicCache(config=config)
        for chunk in prompt.split(512, dim=1):  # chunked prefill, as benchmarks/decode.py
            out = ours(chunk, use_cache=True, **{CACHE_FIELD: cache})
        caches = {name: clone_cache(cache) for name in models}
        tokens = {name: out.logits[:, -1:].argmax(-1) for name in models}
        times = {name: [] for name in models}
        for step in range(3 + steps):  # 3 warm-up steps, interleaved
            for name, model in models.items():
                synchronize(device)
                started = time.perf_counter()
                logits = model(tokens[name], use_cache=True, **{CACHE_FIELD: caches[name]}).logits
                tokens[name] = logits[:, -1:].argmax(-1)
                synchronize(device)
                if step >= 3:
                    times[name].append(time.perf_counter() - started)
    ref = statistics.median(times["dsv3 absorbed"])
    for name, samples in times.items():
        median = statistics.median(samples)
        part.row(model=name, context=context, batch=1, dtype="bfloat16", layers=config.num_hidden_layers,
                 steps=len(samples), ms_median=round(median * 1e3, 3), ms_best=round(min(samples) * 1e3, 3),
                 tokens_per_s=round(1 / median, 1), absorbed_speedup=round(median / ref, 2))  # fmt: skip


RUNNERS = {"a": part_tests, "b": part_fp8, "c": part_train, "d": part_decode}


# ------------------------------------------------------------------------------------------------ report


def run_part(key: str, out: Path, log, device: str) -> dict:
    """Run one part in its own process group with its budget; its rows and errors, status and seconds."""
    name, budget = PARTS[key]
    results = out / f".{name}.jsonl"
    results.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--part", key, "--results", str(results), "--deadline", str(time.time() + budget)]
    command += ["--cpu-dry-run"] if device == "cpu" else []
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), "PYTHONUNBUFFERED": "1"}
    log.write(f"\n===== part {key} ({name}), budget {budget} s =====\n")
    log.flush()
    started = time.time()
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = process.wait(timeout=budget + 5)
        status = "ok" if code == 0 else f"exit code {code}"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        status = f"stopped at its budget ({budget} s)"
    else:
        try:  # the part's own subprocesses (compile workers) go with it
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    results.unlink(missing_ok=True)
    return {
        "name": name, "status": status, "seconds": round(time.time() - started, 1), "budget_s": budget,
        "rows": [r["row"] for r in records if "row" in r], "errors": [r["error"] for r in records if "error" in r],
    }  # fmt: skip


def table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |")
    return lines


COLUMNS = {
    "tests": ["test", "outcome", "seconds", "message"],
    "fp8": ["mode", "tokens", "d_in", "d_out", "backend", "bf16_ms", "fp8_ms", "fp8_speedup", "bf16_tflops", "fp8_tflops",
            "fp8_warmup_s"],
    "train": ["variant", "fp8_backend", "first_step_s", "steps_timed", "step_ms_median", "tokens_per_s", "tflops", "mfu_pct",
              "peak_memory_gib", "loss_first", "loss_last", "graph_breaks"],
    "decode": ["model", "context", "ms_median", "ms_best", "tokens_per_s", "absorbed_speedup"],
}  # fmt: skip
TITLES = {
    "tests": "a. CUDA tests (pytest -m cuda)",
    "fp8": "b. FP8 linear vs BF16 linear, forward+backward (target >= 1.3x)",
    "train": "c. small.yaml-shaped model, training step on random tokens (MFU vs 989 TFLOP/s BF16)",
    "decode": "d. decode after a 4K prefill, bf16, batch 1",
}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# gpu-check, {report['date']}",
        "",
        f"{m['gpu']} ({m['capability']}, {m['gpu_memory_gib']} GiB, {m['multiprocessors']} SMs, driver {m.get('driver')}); "
        f"torch {m['torch']} (CUDA {m['cuda']}), transformers {m['transformers']}, Python {m['python']}, {m['cpus']} CPUs; "
        f"bf16 8192^3 matmul measured at {m['bf16_matmul_tflops_8192']} TFLOP/s. Total {report['seconds']} s.",
    ]
    for part in report["parts"].values():
        lines += ["", f"## {TITLES[part['name']]}: {part['status']}, {part['seconds']} s of {part['budget_s']}", ""]
        lines += table(part["rows"], COLUMNS[part["name"]]) if part["rows"] else ["(no figures)"]
        lines += [f"- error in {e['what']}: {e['error']}" for e in part["errors"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "runs" / "gpu-check"),
                        help="output folder (default: $OUT, else runs/gpu-check)")  # fmt: skip
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="which parts (default all)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="check this script without a GPU: every part on the CPU at toy sizes (figures meaningless)")  # fmt: skip
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # one part, in the child process
    parser.add_argument("--results", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()

    try:
        import torch
    except ImportError as error:
        print(f"gpu-check: torch is not importable ({error}): nothing measured")
        return 0
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print(f"gpu-check: no CUDA device (torch {torch.__version__}): nothing measured")
        return 0
    device = "cpu" if args.cpu_dry_run else "cuda"

    if args.part:  # the child: run one part, report through the results file
        part = Part(Path(args.results), args.deadline, device)
        try:
            RUNNERS[args.part](part)
        except Exception as error:  # noqa: BLE001 - the whole part failed; the parent records it
            import traceback

            traceback.print_exc()
            part.error(PARTS[args.part][0], error)
            return 1
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device, "machine": machine(device), "parts": {}}
    with (out / "gpu-check.log").open("w") as log:
        for key in args.parts:
            report["parts"][key] = run_part(key, out, log, device)
            print(f"gpu-check: part {key} ({PARTS[key][0]}): {report['parts'][key]['status']}, "
                  f"{report['parts'][key]['seconds']} s", flush=True)  # fmt: skip
    report["seconds"] = round(time.time() - started, 1)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out / "gpu-check.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
