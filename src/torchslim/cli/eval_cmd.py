"""``torchslim eval``: measure a .slim file on image data, or a language model on text (fidelity, perplexity)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from torchslim.cli.common import console, load_data_for, parse_int_list, print_json, table
from torchslim.errors import ConfigError


def eval_(
    path: Path = typer.Argument(..., help="A .slim file written by torchslim, or hf:DIR (with --text)."),
    data: str = typer.Option("digits", "--data", "-d", help="Data spec: digits, mnist:DIR, npz:FILE, imagefolder:DIR."),
    batch_sizes: str = typer.Option("1,32", "--batch-sizes", help="Batch sizes to time, comma-separated."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Time the model (adds a few seconds)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Intra-op threads for timing."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="Allow a model factory outside torchslim."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    text: Path | None = typer.Option(
        None, "--text", help="Language models (hf:DIR): fidelity to the original on this file, one text per line."
    ),
    ppl: bool = typer.Option(False, "--perplexity", help="With --text: perplexity on the file's lines, joined by "
                             "newlines (a causal language model), instead of fidelity."),
    seq_len: int = typer.Option(512, "--seq-len", help="--perplexity: tokens per window."),
    stride: int | None = typer.Option(None, "--stride", help="--perplexity: window step (default: seq-len / 2)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="--perplexity: only the first N tokens."),
) -> None:
    """Measure a model: accuracy, bytes, MACs, latency on image data; fidelity or perplexity on text."""
    sizes = parse_int_list("--batch-sizes", batch_sizes)
    if ppl and text is None:
        raise ConfigError("--perplexity needs --text FILE: expected the text to score, one paragraph per line")
    if text is not None:
        _eval_text(str(path), text, trust_factory, json_output, ppl, seq_len, stride, max_tokens)
        return
    from torchslim.artifact import load
    from torchslim.measure import format_measurement, measure

    model = load(path, trust_factory=trust_factory)
    splits = load_data_for(data, model)
    result = measure(model, splits, artifact_path=path, batch_sizes=sizes, latency=latency, num_threads=threads)
    if json_output:
        print_json({"file": str(path), "data": data, **result.to_dict()})
        return
    rows = [[name, value] for name, value in format_measurement(result)]
    console().print(table(f"{path} on {data}", ["metric", "value"], rows))


def _eval_text(source: str, text: Path, trust_factory: bool, json_output: bool, ppl: bool, seq_len: int,
               stride: int | None, max_tokens: int | None) -> None:
    """``eval --text``: a .slim file (or hf:DIR) made from a Hugging Face model, on text (no labels)."""
    from torchslim.hf import load_hf, perplexity, read_texts, reference_model, text_fidelity
    from torchslim.hf.perplexity import token_stream

    texts = read_texts(text)  # checked before any model is loaded
    if source.startswith("hf:"):
        model, size = load_hf(source), None
    else:
        from torchslim.artifact import load

        model, size = load(source, trust_factory=trust_factory), os.path.getsize(source)
    if ppl:
        holder = model if getattr(model, "tokenizer", None) is not None else reference_model(model)
        ids = token_stream(holder, texts, separator="\n")
        measured = perplexity(model, ids, seq_len=seq_len, stride=stride, max_tokens=max_tokens).to_dict()
        title = f"{source}: perplexity on {text}"
    else:
        measured = text_fidelity(model, reference_model(model), texts)
        title = f"{source}: fidelity to the original on {text}"
    result = {"file": source, "text": str(text), "bytes": size, **measured}
    if json_output:
        print_json(result)
        return
    rows = [[key, "n/a" if value is None else value] for key, value in result.items() if key not in ("file", "text")]
    console().print(table(title, ["metric", "value"], rows))
