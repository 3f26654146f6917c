"""Greedy decode on CPU: a SmolLM2-135M-shaped Llama, fp32 vs torchslim int8 / int4-g128 vs torchao, in one run.

The decoder is built from a ``transformers`` ``LlamaConfig`` with SmolLM2-135M's shape (hidden 576, 30 layers, 9
heads / 3 KV heads, FFN 1536, vocab 49152, tied embeddings) and random weights (no download), saved as a Hugging Face
directory and loaded the way a user does: ``ts.load_hf`` -> ``ts.quantize_`` (every Linear, ``lm_head`` included)
-> ``ts.save`` -> ``ts.load`` with the default runtime (``auto``) or ``compact``. Each variant prefills a 16-token
prompt and then decodes ``--tokens`` tokens one at a time with the KV cache; the figure is the median ms per decoded
token, and every variant is timed once per round with the rounds interleaved (``--rounds``, default 3), so that the
machine's slow spells hit every variant alike. torchao's weight-only and dynamic-int8 configs run on copies of the
fp32 model in the same process; a config that raises on CPU is listed with its error. ``derived MiB`` is what
torchslim's packed layers hold beside their stored bytes after the run (fp32 copies for layers decoded once, kernel
codes for the GEMV); ``stored MiB`` is the packed model's weights. Run alone on a quiet machine::

    python benchmarks/llm_cpu.py [--layers 30] [--tokens 32] [--rounds 3] [--threads 2]

Writes ``benchmarks/results/llm_cpu.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# benchmarks/transformers.py would shadow the transformers package when this script's folder is on sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torchslim as ts  # noqa: E402
from torchslim.quantize.runtime import runtime_report  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def build(directory: Path, layers: int) -> None:
    """A SmolLM2-135M-shaped Llama with random weights, saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=576, num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(directory)


@torch.inference_mode()
def decode(model, prompt: torch.Tensor, tokens: int) -> tuple[float, list[int], torch.Tensor]:
    """(median ms per decoded token, the greedy tokens, the first step's logits)."""
    out = model(input_ids=prompt, use_cache=True)
    past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    first = out.logits[0, -1].float().clone()
    times, generated = [], []
    for _ in range(tokens + 2):  # the first two steps are warm-up (first-use kernels, measurements)
        start = time.perf_counter()
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - start)
        generated.append(int(token))
    return statistics.median(times[2:]) * 1e3, generated, first


def torchslim_variant(directory: Path, work: Path, name: str, config, runtime: str):
    hf = ts.load_hf(directory)
    started = time.perf_counter()
    ts.quantize_(hf, config)
    path = ts.save(hf, work / f"{name}.slim")
    seconds = time.perf_counter() - started
    loaded = ts.load(path, runtime=runtime)
    return loaded, path.stat().st_size, seconds


def torchao_configs():
    try:
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
        )
    except ImportError as exc:
        return {}, f"torchao not installed ({exc}); pip install torchao"
    import torchao

    return {
        "torchao Int8WeightOnlyConfig": Int8WeightOnlyConfig(),
        "torchao Int4WeightOnlyConfig(group_size=128)": Int4WeightOnlyConfig(group_size=128),
        "torchao Int8DynamicActivationInt8WeightConfig": Int8DynamicActivationInt8WeightConfig(),
    }, f"torchao {torchao.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (every variant once per round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompt = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    rows, models = [], []
    with tempfile.TemporaryDirectory() as tmp:
        directory, work = Path(tmp) / "smollm2-shape", Path(tmp)
        build(directory, args.layers)
        fp32 = ts.load_hf(directory)
        fp32_bytes = sum(p.numel() * p.element_size() for p in fp32.parameters())
        rows.append({"variant": "fp32 eager (transformers)", "stored_mib": fp32_bytes / 2**20})
        models.append(fp32.model)
        packed = {}
        for label, config in (("int8 channel", ts.IntQuant(bits=8, granularity="channel", symmetric=True)),
                              ("int4 g128", ts.IntQuant(bits=4, granularity="group", group_size=128))):
            for runtime in ("auto", "compact"):
                loaded, size, _ = torchslim_variant(directory, work, label.replace(" ", "-"), config, runtime)
                rows.append({"variant": f"torchslim {label} (ts.load runtime={runtime!r})", "file_mib": size / 2**20})
                models.append(loaded.model)
                packed[len(rows) - 1] = loaded
        configs, ao_version = torchao_configs()
        for name, config in configs.items():
            from torchao.quantization import quantize_ as ao_quantize_

            model = copy.deepcopy(fp32.model)
            try:
                ao_quantize_(model, config)
                decode(model, prompt, 1)  # a config that fails only when run
            except Exception as exc:  # noqa: BLE001 - a config without a CPU path: say so
                text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                rows.append({"variant": name, "note": f"no CPU path: {text}"})
                continue
            rows.append({"variant": name})
            models.append(model)
        timed = [r for r in rows if "no CPU path" not in r.get("note", "")]
        per_round: list[list[float]] = [[] for _ in timed]
        results = [None] * len(timed)
        for _ in range(args.rounds):  # interleaved: a slow spell of the machine hits every variant alike
            for index, model in enumerate(models):
                ms, tokens, logits = decode(model, prompt, args.tokens)
                per_round[index].append(ms)
                results[index] = (tokens, logits)
        base_tokens, base_logits = results[0]
        for index, row in enumerate(timed):
            tokens, logits = results[index]
            ratios = [base / ms for base, ms in zip(per_round[0], per_round[index], strict=True)]
            row.update(ms_per_token=statistics.median(per_round[index]), speedup=statistics.median(ratios),
                       cosine=float(torch.nn.functional.cosine_similarity(logits, base_logits, dim=0)),
                       same_tokens=sum(a == b for a, b in zip(tokens, base_tokens, strict=True)) / len(tokens))
        for index, loaded in packed.items():
            report = runtime_report(loaded)
            paths: dict[str, int] = {}
            for entry in report:
                key = entry["paths"].get("1 row", "-")
                paths[key] = paths.get(key, 0) + 1
            rows[index]["derived_mib"] = sum(r["derived_bytes"] for r in report) / 2**20
            rows[index]["stored_mib"] = sum(r["stored_bytes"] for r in report) / 2**20
            rows[index]["note"] = "decode paths: " + ", ".join(f"{k} x{v}" for k, v in sorted(paths.items()))
    write(args, rows, ao_version)


def write(args, rows, ao_version: str) -> None:
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads"
    lines = [
        "# LLM decode on CPU (SmolLM2-135M shape, random weights)",
        "",
        f"`python benchmarks/llm_cpu.py --layers {args.layers} --tokens {args.tokens} --rounds {args.rounds} "
        f"--threads {args.threads}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, one run; {machine}; "
        f"{ao_version}. Every variant decodes once per round, rounds interleaved (fp32, then each variant); ms/token: "
        "median over rounds of the median ms per decoded token at batch 1 after a 16-token prompt; speedup: median "
        "over rounds of fp32's ms / the variant's ms in the same round; cosine of the first "
        "step's logits and the share of greedy tokens equal to fp32's (random weights make near-ties, so tokens "
        "diverge easily).",
        "",
        "| variant | ms/token | speedup | logits cosine | same tokens | file MiB | stored MiB | derived MiB | note |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    def num(r, key, fmt):
        return "-" if r.get(key) is None else format(r[key], fmt)

    for r in rows:
        lines.append(f"| {r['variant']} | {num(r, 'ms_per_token', '.1f')} | "
                     f"{'-' if r.get('speedup') is None else format(r['speedup'], '.2f') + 'x'} | "
                     f"{num(r, 'cosine', '.4f')} | {num(r, 'same_tokens', '.0%')} | {num(r, 'file_mib', '.1f')} | "
                     f"{num(r, 'stored_mib', '.1f')} | {num(r, 'derived_mib', '.1f')} | {r.get('note', '')} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
