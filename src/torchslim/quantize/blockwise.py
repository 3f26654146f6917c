"""Block-by-block calibration for GPTQ: each transformer block runs only on its own cached inputs.

The standard sequential GPTQ loop. One pass of the float model over the calibration batches records the inputs
of the first block (and every block's other arguments: attention mask, position embeddings), stopping at the last
block. Then for each block in turn: the Hessians of its layers are collected by running that block alone on the
cached inputs (stage by stage, as :func:`~torchslim.quantize.hessian.collect_stage` groups them: q/k/v, then o,
then gate/up, then down; or all at once), the layers are quantized, and the block runs once more to make the next
block's inputs. Layers after the blocks (``lm_head``) get the last block's outputs by running the model with
every block replaced by a stand-in that returns them. So the cost is one model forward plus a few block forwards
per block, instead of a pass through all earlier (already quantized) layers for every stage.

:func:`find_blocks` returns None for models without one list of same-class blocks, and :func:`capture` returns
a reason when the blocks cannot be driven this way (a layer to quantize runs before the first block, blocks run
out of order, a block's input or output is not a tensor); GPTQ then uses its whole-model stages.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from typing import Any

from torch import Tensor, nn

from torchslim.quantize.hessian import Hessian, Stop, collect_all, collect_stage

__all__ = ["Capture", "capture", "find_blocks", "quantize_blocks", "quantize_after_blocks"]

StageQuantizer = Callable[[dict[nn.Module, Hessian]], None]


def find_blocks(model: nn.Module, modules: Collection[nn.Module]) -> tuple[str, nn.ModuleList] | None:
    """The model's list of blocks: the one outermost ``nn.ModuleList`` of >= 2 same-class blocks that each hold a
    layer of ``modules``.

    Args:
        model: any model.
        modules: the layers to quantize.

    Returns:
        ``(name, blocks)``, or None when there is no such list or more than one (encoder-decoder models).
    """
    wanted = set(modules)
    found = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(b) for b in m}) == 1
        and all(any(x in wanted for x in b.modules()) for b in m)
    ]
    outer = [(n, m) for n, m in found if not any(o != n and (not o or n.startswith(o + ".")) for o, _ in found)]
    return outer[0] if len(outer) == 1 else None


@dataclasses.dataclass
class Capture:
    """What the first pass recorded.

    Attributes:
        inputs: block 0's stream input (hidden states) for each batch.
        extra: per block, per batch: ``(args after the stream input, kwargs)``.
        keyword: the stream input is passed as ``hidden_states=`` rather than positionally.
        rest: per batch, the block output's items after the hidden states (None: blocks return a tensor).
    """

    inputs: list[Tensor]
    extra: list[list[tuple[tuple, dict]]]
    keyword: bool
    rest: list[tuple] | None


def capture(
    model: nn.Module, blocks: nn.ModuleList, runs: Sequence[Callable[[], Any]], outside: Collection[nn.Module]
) -> Capture | str:
    """Run the float model on every batch up to its last block, recording the blocks' inputs.

    Args:
        model: the model (nothing is changed).
        blocks: its block list.
        runs: one callable per calibration batch running the whole model.
        outside: layers to quantize that are not in a block.

    Returns:
        The :class:`Capture`, or the reason why the blocks cannot be run one by one.

    Raises:
        Exception: whatever the model raises on the calibration inputs.
    """
    last = len(blocks) - 1
    inputs: list[Tensor] = []
    extra: list[list[tuple[tuple, dict]]] = [[] for _ in blocks]
    rest: list[tuple] = []
    seen: dict[str, Any] = {"order": [], "keyword": None, "problem": None}

    def enter(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen["order"].append(index)
            keyword = not (args and isinstance(args[0], Tensor))
            if keyword and not isinstance(kwargs.get("hidden_states"), Tensor):
                seen["problem"] = f"block {index} gets no tensor as its first argument or as hidden_states"
                raise Stop
            if seen["keyword"] not in (None, keyword):
                seen["problem"] = "the blocks get their input once positionally, once as hidden_states"
                raise Stop
            seen["keyword"] = keyword
            kwargs = dict(kwargs)
            stream = kwargs.pop("hidden_states") if keyword else args[0]
            if index == 0:
                inputs.append(stream)
            extra[index].append((tuple(args if keyword else args[1:]), kwargs))
            if index == last:
                raise Stop

        return hook

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, Tensor):
            return
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            if len(rest) < len(inputs):
                rest.append(tuple(output[1:]))
            return
        seen["problem"] = f"block 0 returns a {type(output).__name__}: expected a tensor or a tuple starting with one"
        raise Stop

    def early(module: nn.Module, args: tuple) -> None:
        if not seen["order"]:
            seen["problem"] = f"a layer to quantize ({type(module).__name__}) runs before the first block"
            raise Stop

    handles = [block.register_forward_pre_hook(enter(i), with_kwargs=True) for i, block in enumerate(blocks)]
    handles.append(blocks[0].register_forward_hook(leave))
    handles += [module.register_forward_pre_hook(early) for module in outside]
    try:
        for run in runs:
            seen["order"] = []
            try:
                run()
            except Stop:
                pass
            if seen["problem"]:
                return seen["problem"]
            if seen["order"] != list(range(len(blocks))):
                return f"the blocks ran in the order {seen['order'][:8]}: expected each once, in list order"
    finally:
        for handle in handles:
            handle.remove()
    return Capture(inputs, extra, bool(seen["keyword"]), rest if rest else None)


def _call(block: nn.Module, x: Tensor, args: tuple, kwargs: dict, keyword: bool) -> Any:
    return block(*args, hidden_states=x, **kwargs) if keyword else block(x, *args, **kwargs)


def _stream(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output[0]


def quantize_blocks(
    blocks: nn.ModuleList,
    captured: Capture,
    remaining: Collection[nn.Module],
    quantize: StageQuantizer,
    *,
    true_sequential: bool = True,
    on_block: Callable[[int, int], Any] | None = None,
) -> list[Tensor]:
    """Quantize the layers of each block in turn on the block's cached inputs.

    Args:
        blocks: the block list.
        captured: from :func:`capture`.
        remaining: the layers still to quantize (``quantize`` removes the ones it quantizes; layers the inputs never
            reach stay).
        quantize: quantizes one stage (replacing its layers in the model).
        true_sequential: stage by stage inside a block (each stage on the outputs of the already quantized ones);
            False collects every layer of the block at once.
        on_block: called as ``on_block(index, layers)`` after each block (progress), with the number of its layers
            quantized.

    Returns:
        The last block's outputs (the stream input of what follows the blocks), one per batch.
    """
    xs, captured.inputs = captured.inputs, []  # each block's inputs are dropped once its outputs exist
    for index, (block, extra) in enumerate(zip(blocks, captured.extra, strict=True)):
        runs = [
            (lambda b=block, x=x, a=a, k=k: _call(b, x, a, k, captured.keyword))
            for x, (a, k) in zip(xs, extra, strict=True)
        ]
        inside = [m for m in block.modules() if m in remaining]
        count = len(inside)
        while inside:
            stage = collect_stage(runs, inside) if true_sequential else collect_all(runs, inside)
            if not stage:
                break
            quantize(stage)
            inside = [m for m in inside if m not in stage]
            if not true_sequential:
                break
        xs = [_stream(run()) for run in runs]
        if on_block is not None:
            on_block(index, count - len(inside))
    return xs


class _Replay(nn.Module):
    """Stands in for a block: returns the cached final output of the blocks for the current batch."""

    def __init__(self, original: nn.Module, outputs: list[Tensor], rest: list[tuple] | None, batch: list[int]):
        super().__init__()
        self.__dict__["_original"] = original  # not a submodule: its layers are not the model's while replaced
        self.__dict__["_outputs"], self.__dict__["_rest"], self.__dict__["_batch"] = outputs, rest, batch

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # attributes the parent model reads from its blocks (attention_type, ...)
            return getattr(self.__dict__["_original"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        index = self.__dict__["_batch"][0]
        x = self.__dict__["_outputs"][index]
        rest = self.__dict__["_rest"]
        return x if rest is None else (x, *rest[index])


def quantize_after_blocks(
    blocks: nn.ModuleList,
    captured: Capture,
    outputs: list[Tensor],
    runs: Sequence[Callable[[], Any]],
    remaining: Collection[nn.Module],
    quantize: StageQuantizer,
) -> None:
    """Quantize the layers after the blocks (``lm_head``) stage by stage, the blocks replaced by their outputs.

    Args:
        blocks: the block list (restored afterwards).
        captured: from :func:`capture`.
        outputs: :func:`quantize_blocks`' result.
        runs: one callable per batch running the whole model, in the order of ``outputs``.
        remaining: the layers still to quantize, none of them inside a block.
        quantize: quantizes one stage.
    """
    batch = [0]
    originals = list(blocks)
    for i, block in enumerate(originals):
        blocks[i] = _Replay(block, outputs, captured.rest, batch)

    def numbered(index: int, run: Callable[[], Any]) -> Callable[[], Any]:
        def go() -> Any:
            batch[0] = index
            return run()

        return go

    numbered_runs = [numbered(i, run) for i, run in enumerate(runs)]
    try:
        left = list(remaining)
        while left:
            stage = collect_stage(numbered_runs, left)
            if not stage:
                break
            quantize(stage)
            left = [m for m in left if m not in stage]
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
