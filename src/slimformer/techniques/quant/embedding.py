"""QuantizeEmbeddings: the token-embedding table (and the LM head) to int8.

The blocks' techniques never touch the embedding or the LM head; on SmolLM2 the tied fp32
table is 113 MB, which every decoded token reads as the head. This stage rounds it to
symmetric int8 with float16 scales (``granularity: row``, one scale per row, or ``group``,
one per ``group_size`` columns: 32 is GGUF Q8_0's block), :class:`QuantEmbedding`:

- a tied LM head (``model.get_output_embeddings()`` holding the embedding's own weight)
  becomes a :class:`QuantTiedHead` reading the same codes (stored once);
- an untied head becomes an 8-bit :class:`QuantLinear` in the same granularity;
- an encoder (no LM head) gets its word-embedding table quantised.

Built-in 4- and 8-bit recipes end with this stage; ``--set QuantizeEmbeddings.enabled=false``
opts out. The stage runs once, when the runner reaches the last block (after the recipe's
other stages have converted it), and records what it changed (``bytes_before``,
``bytes_after``, ``format``) under the module's name in the run's per-layer report (the
compress result and the saved ``slimformer.json`` ``layers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch.nn as nn

from slimformer.core.transform import BlockContext, Transform, register
from slimformer.errors import QuantConfigError, RecipeError
from slimformer.nn.quant_embedding import QuantEmbedding, QuantTiedHead, embedding_spec
from slimformer.nn.quant_linear import QuantLinear
from slimformer.nn.surgery import set_module


@register
@dataclass(frozen=True)
class QuantizeEmbeddings(Transform):
    """Arguments: ``bits`` (8: int8 tables only), ``granularity`` (``row``: one float16 scale
    per row; ``group``: one per ``group_size`` columns), ``group_size`` (group only; 32 =
    GGUF Q8_0), ``enabled`` (false: the stage does nothing, e.g. ``--set
    QuantizeEmbeddings.enabled=false`` on a built-in recipe)."""

    bits: int = 8
    granularity: Literal["row", "group"] = "row"
    group_size: int = 32
    enabled: bool = True
    keeps_block_outputs: ClassVar[bool] = True   # it changes no block (a GPTQ one-pass forward's outputs stay valid)

    def __post_init__(self):
        if self.bits != 8:
            raise RecipeError(f"QuantizeEmbeddings: bits must be 8 (int8 tables, GGUF Q8_0), got {self.bits!r}")
        if self.group_size < 1:
            raise RecipeError(f"QuantizeEmbeddings: group_size must be positive, got {self.group_size!r}")

    @property
    def table_group_size(self) -> int | None:
        return self.group_size if self.granularity == "group" else None

    def convert(self, block: nn.Module, ctx: BlockContext) -> None:
        if not self.enabled or ctx.index != len(ctx.adapter.get_blocks(ctx.model)) - 1:
            return
        facts, notes = quantize_embeddings(ctx.model, self.table_group_size)
        for name, values in facts.items():
            ctx.layer_report.setdefault(name, {}).update(values)
        ctx.fallbacks.extend(notes)


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def quantize_embeddings(model: nn.Module, group_size: int | None = None) -> tuple[dict[str, dict], list[str]]:
    """Quantise ``model``'s input embedding (and tied or untied LM head) in place.

    Returns ``({module name: facts}, [notes])``: what each changed module was and became,
    and ``"name: reason"`` for a part left as it was."""
    emb = model.get_input_embeddings()
    if emb is None:
        raise QuantConfigError(f"{type(model).__name__} has no input embedding to quantise")
    emb_name = _name_of(model, emb)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    facts: dict[str, dict] = {}
    notes: list[str] = []
    gran = "row" if group_size is None else f"g{group_size}"
    if isinstance(emb, QuantEmbedding):
        notes.append(f"{emb_name}: already an int8 table; left as it is")
        return facts, notes
    if not isinstance(emb, nn.Embedding):
        notes.append(f"{emb_name}: a {type(emb).__name__}, not an nn.Embedding; left as it is")
        return facts, notes
    try:
        embedding_spec(emb.embedding_dim, group_size)
    except QuantConfigError as exc:
        raise QuantConfigError(f"{emb_name}: {exc}") from None
    weight = emb.weight
    tied = head is not None and getattr(head, "weight", None) is weight
    head_name = _name_of(model, head) if head is not None else None
    table = QuantEmbedding.from_float(weight, group_size, emb.padding_idx)
    set_module(model, emb_name, table)
    facts[emb_name] = {"format": f"int8-{gran}", "bytes_before": weight.numel() * weight.element_size(),
                       "bytes_after": table.nbytes(), "tied_head": head_name if tied else None}
    if head is None:
        return facts, notes
    if tied:
        set_module(model, head_name, QuantTiedHead.tie(table, emb_name, getattr(head, "bias", None)))
        return facts, notes
    if not isinstance(head, nn.Linear):
        notes.append(f"{head_name}: the untied LM head is a {type(head).__name__}, not an nn.Linear; left as it is")
        return facts, notes
    spec = embedding_spec(head.in_features, group_size)
    qhead = QuantLinear.from_float(head.weight, head.bias, spec)
    set_module(model, head_name, qhead)
    after = sum(t.numel() * t.element_size() for t in (qhead.qweight, qhead.scale, qhead.zero, qhead.bias)
                if t is not None)
    facts[head_name] = {"format": f"int8-{gran}", "bytes_before": head.weight.numel() * head.weight.element_size(),
                        "bytes_after": after, "tied_head": None}
    return facts, notes
