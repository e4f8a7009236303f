"""Decoder language models of `transformers` (GPT-2; Llama / Qwen2 / Mistral-style) as one model family.

What the adapter normalises when it wraps a model, so the rest of slimformer sees plain linear units:
- GPT-2's `Conv1D` layers (weight stored (in, out)) become `nn.Linear` (weight (out, in)), same numbers;
  the fused `c_attn` is one `qkv` unit laid out [3, heads, head_dim] like timm's.
- Llama-style blocks: q/k/v/o projections (grouped-query attention: k and v have `num_key_value_heads`
  heads), a SwiGLU MLP gate/up/down (roles `ffn_gate`, `ffn_in`, `ffn_out`), RMSNorm and RoPE (no
  parameters to compress besides the norms' fp32 vectors).
- Roles are found from module structure (shapes and registration order, `gate` in a name breaking the tie
  between the two hidden->intermediate projections), not from checkpoint names.
- Tied input/output embeddings (GPT-2, small Qwen2): the LM head is replaced by `TiedLMHead`, which has no
  parameters and multiplies by whatever module sits at the embedding's path at call time, so the table is
  one unit (role `embedding`), stored once, and the head computes with the table's compressed weights (its
  bits, rank and sparsity). An untied head is its own unit (role `lm_head`).
- Head pruning under grouped-query attention removes whole KV groups: `heads_kept` counts query heads and
  must be a multiple of heads / kv_heads; the kept groups are those whose query heads score highest together.

Quality is fidelity to the teacher's next-token distribution at every real position with a next token:
mean KL(teacher || student), top-1 agreement, and the perplexity ratio on the actual next tokens
(`perplexity` = teacher ppl / student ppl, higher is better, 1.0 = the teacher; `ppl_ratio` = its inverse,
student / teacher, is reported alongside). Texts are chunked into rows of at most `max_length` tokens.
The default search objective is `neg_kl`: KL(teacher || student) is the expected rise in next-token loss under
the teacher's own distribution, so it grades every position by the whole distribution, where the perplexity
ratio sees one sampled token per position; near-lossless plans (8-bit) differ by less than the ratio's
sampling noise but still by measurable KL (docs/BENCHMARKS.md, Decoder LM). Perplexity stays selectable.

The deployed ONNX graph is the full-sequence forward (input_ids, attention_mask -> logits, no KV cache):
what scoring and prefill need. KV-cache decoding and the onnxruntime-genai format are not produced.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

import slimformer.models.metrics as M
from slimformer.errors import ModelLoadError
from slimformer.models.base import Batch, LayerInfo, Unit
from slimformer.models.discover import describe_block, find_blocks
from slimformer.models.modalities import TextFamily
from slimformer.models.registry import register_family

DECODER_TYPES = ("gpt2", "llama", "qwen2", "mistral", "qwen3", "phi3", "gemma", "olmo", "granite")
LM_INPUTS = ("input_ids", "attention_mask")
DEFAULT_MAX_LENGTH = 128


class TiedLMHead(nn.Module):
    """The output projection of a model whose LM head shares the input embedding table: logits = h · Eᵀ with
    E the effective weight of the module at `embedding_path` *now* (compressed or not), so the table is one
    tensor in the model and in every saved or exported form."""

    def __init__(self, root: nn.Module, embedding_path: str) -> None:
        super().__init__()
        self.embedding_path = embedding_path
        object.__setattr__(self, "_root", root)  # not a submodule (no cycle); deepcopy maps it to the copy

    def forward(self, hidden: Tensor) -> Tensor:
        # einsum with the table as stored, (vocab, dim): the ONNX graph then reads the embedding's own
        # initializer (one copy) where `F.linear` would constant-fold a transposed second copy
        emb = self._root.get_submodule(self.embedding_path)
        table = getattr(emb, "table", None)
        if table is not None:  # FactorizedEmbedding: E = table · projᵀ, so h · Eᵀ = (h · proj) · tableᵀ
            return torch.einsum("...d,vd->...v", hidden @ emb.proj.weight, table.weight)
        return torch.einsum("...d,vd->...v", hidden, emb.weight)


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers `Conv1D` (GPT-2) by the equal `nn.Linear`; returns how many."""
    from transformers.pytorch_utils import Conv1D

    found = [(p, m) for p, m in model.named_modules() if isinstance(m, Conv1D)]
    for path, conv in found:
        w = conv.weight.detach()  # (in, out)
        lin = nn.Linear(w.shape[0], w.shape[1], bias=conv.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(w.t())
            if conv.bias is not None:
                lin.bias.copy_(conv.bias.detach())
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, lin.to(w.device))
    return len(found)


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise ModelLoadError(f"{type(model).__name__}: the embedding / LM head is not a submodule of the model")


def _describe_decoder_block(block: nn.Module, path: str, index: int, hidden: int, heads: int, kv_heads: int,
                            head_dim: int) -> tuple[LayerInfo, list[Unit]]:
    """Roles of a Llama-style block: q (hidden -> heads·hd), k, v (hidden -> kv_heads·hd), o (heads·hd ->
    hidden), then gate and up (hidden -> inter; `gate` in the name, else registration order) and down."""
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    lin = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    roles: dict[str, str] = {}
    attn = [n for n, m in lin if m.in_features == hidden and m.out_features in (q_out, kv_out)][:3]
    o = next((n for n, m in lin if n not in attn and m.in_features == q_out and m.out_features == hidden), None)
    rest = [(n, m) for n, m in lin if n not in attn and n != o]
    up_like = [n for n, m in rest if m.in_features == hidden and m.out_features != hidden]
    inter = block.get_submodule(up_like[0]).out_features if up_like else None
    down = next((n for n, m in rest if m.in_features == inter and m.out_features == hidden), None)
    if len(attn) != 3 or o is None or down is None or len(up_like) not in (1, 2) or \
            [block.get_submodule(n).out_features for n in attn] != [q_out, kv_out, kv_out]:
        raise ModelLoadError(f"block {path}: could not identify q/k/v/o, gate/up/down linear layers from shapes "
                             f"(found {[n for n, _ in lin]}; {heads} heads, {kv_heads} kv heads of {head_dim})")
    roles.update(zip(attn, ("query", "key", "value"), strict=True))
    roles[o] = "attn_out"
    gate = None
    if len(up_like) == 2:
        gate = next((n for n in up_like if "gate" in n.rsplit(".", 1)[-1]), up_like[0])
        roles[gate] = "ffn_gate"
    up = next(n for n in up_like if n != gate)
    roles[up] = "ffn_in"
    roles[down] = "ffn_out"

    def full(rel: str) -> str:
        return f"{path}.{rel}"

    def parent(rel: str) -> str:
        return full(rel.rsplit(".", 1)[0]) if "." in rel else full(rel)

    units = []
    for name, mod in lin:
        if name in roles:
            units.append(Unit(full(name), roles[name], index, (mod.out_features, mod.in_features),
                              mod.bias is not None))
    attn_rel = attn[0].rsplit(".", 1)[0] if "." in attn[0] else ""
    attn_mod = block.get_submodule(attn_rel) if attn_rel else block
    if not isinstance(getattr(attn_mod, "num_heads", None), int):
        attn_mod.num_heads = heads  # Llama-style attention reshapes by head_dim; the count is bookkeeping
    info = LayerInfo(
        index=index, path=path, attention_path=full(attn_rel) if attn_rel else path, heads_attr="num_heads",
        num_heads=heads, head_dim=head_dim, intermediate=int(inter or 0),
        qkv_units=tuple(full(n) for n in attn), attn_out_unit=full(o), ffn_in_unit=full(up), ffn_out_unit=full(down),
        attention_scope=tuple(dict.fromkeys(parent(n) for n in (*attn, o))),
        ffn_scope=tuple(dict.fromkeys(parent(n) for n in up_like + [down])),
        kv_heads=kv_heads, ffn_gate_unit=None if gate is None else full(gate),
    )
    return info, units


def describe_decoder(model: nn.Module, config: Any) -> tuple[list[LayerInfo], list[Unit]]:
    """Layers and units of every block (GPT-2's fused block by `discover.describe_block`)."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    path, blocks = find_blocks(model)
    layers, units = [], []
    for i, block in enumerate(blocks):
        first = next(m for m in block.modules() if isinstance(m, nn.Linear))
        if first.out_features == 3 * hidden and first.in_features == hidden and kv_heads == heads:
            info, us = describe_block(block, f"{path}.{i}", i, hidden)
        else:
            info, us = _describe_decoder_block(block, f"{path}.{i}", i, hidden, heads, kv_heads, head_dim)
        layers.append(info)
        units.extend(us)
    return layers, units


@register_family("causal_lm")
class CausalLMAdapter(TextFamily):
    """A `transformers` causal LM (…ForCausalLM / GPT2LMHeadModel); quality on next-token distributions."""

    kind = "causal_lm"
    output_names: ClassVar[tuple[str, ...]] = ("logits",)

    def __init__(self, model: nn.Module, model_id: str, tokenizer: Any = None, max_length: int = DEFAULT_MAX_LENGTH,
                 source_dir: Path | None = None) -> None:
        super().__init__(model, model_id, source_dir)
        conv1d_to_linear(model)
        self.tokenizer = tokenizer
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.max_length = int(max_length)
        config = model.config
        emb = model.get_input_embeddings()
        self.embedding_path = _module_path(model, emb)
        head = model.get_output_embeddings()
        self.tied = head is not None and getattr(head, "weight", None) is emb.weight
        self.output_shares_embedding = self.tied
        self.layers, units = describe_decoder(model, config)
        self.units = [Unit(self.embedding_path, "embedding", None, tuple(emb.weight.shape), False), *units]
        if self.tied:
            head_path = _module_path(model, head)
            parent, _, name = head_path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, TiedLMHead(model, self.embedding_path))
        elif isinstance(head, nn.Linear):
            self.units.append(Unit(_module_path(model, head), "lm_head", None, tuple(head.weight.shape),
                                   head.bias is not None))

    # -- data --------------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        pid = None if self.tokenizer is None else self.tokenizer.pad_token_id
        return int(pid) if pid is not None else 0

    def chunks(self, samples: Sequence[Any]) -> list[list[int]]:
        """Each text's token ids cut into rows of at most `max_length` (rows of one token dropped: no target)."""
        if self.tokenizer is None:
            raise ModelLoadError(f"{self.model_id}: no tokenizer files; text data cannot be encoded")
        ids = self.tokenizer([str(s) for s in samples], truncation=False)["input_ids"]
        rows = []
        for seq in ids:
            for i in range(0, len(seq), self.max_length):
                piece = list(seq[i:i + self.max_length])
                if len(piece) >= 2:
                    rows.append(piece)
        return rows

    def make_batches(self, samples: Sequence[Any], batch_size: int, labels: Sequence[int] | None = None
                     ) -> list[Batch]:
        """Right-padded rows of token ids; `labels` are the next-token ids of every position that has one,
        flattened in the order `output` returns positions."""
        rows = self.chunks(samples)
        batches = []
        for i in range(0, len(rows), batch_size):
            part = rows[i:i + batch_size]
            width = max(len(r) for r in part)
            ids = torch.full((len(part), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(part), width), dtype=torch.long)
            for j, r in enumerate(part):
                ids[j, :len(r)] = torch.tensor(r)
                mask[j, :len(r)] = 1
            targets = ids[:, 1:][mask[:, 1:].bool()]
            batches.append(Batch({"input_ids": ids, "attention_mask": mask}, targets))
        return batches

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        """(batch, sequence, vocab) logits of the full-sequence forward (no KV cache)."""
        out = model(input_ids=batch.inputs["input_ids"], attention_mask=batch.inputs["attention_mask"],
                    use_cache=False)
        return out.logits

    def output(self, model: nn.Module, batch: Batch) -> Tensor:
        """Logits at every real position that has a next token, (positions, vocab): what fidelity compares."""
        mask = batch.inputs["attention_mask"][:, 1:].bool()
        return self.logits(model, batch)[:, :-1][mask]

    # -- quality -------------------------------------------------------------------------------------
    def metric_names(self, has_labels: bool) -> tuple[str, ...]:
        return M.CAUSAL_LM_METRICS if has_labels else M.CAUSAL_LM_METRICS[1:]

    @property
    def default_quality_metric(self) -> str:
        """-KL(teacher || student) per position: ranks plans where the perplexity ratio is within noise."""
        return "neg_kl"

    def fidelity_metrics(self, teacher: Tensor, student: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        return M.causal_lm_metrics(teacher, student, labels)

    # -- deployed outputs ----------------------------------------------------------------------------
    def export_outputs(self, model: nn.Module, batch: Batch) -> tuple[Tensor, ...]:
        return (self.logits(model, batch),)

    def dynamic_axes(self, batch: Batch) -> dict[str, dict[int, str]]:
        axes = super().dynamic_axes(batch)
        axes["logits"] = {0: "batch", 1: "sequence"}
        return axes

    def export_metadata(self) -> dict[str, str]:
        return {"kind": "causal_lm", "max_length": str(self.max_length), "kv_cache": "none"}

    def fixed_length_feed(self, samples: Sequence[Any], batch: int, seq: int) -> dict[str, np.ndarray]:
        feed = super().fixed_length_feed(samples, batch, seq)
        return {k: v for k, v in feed.items() if k in LM_INPUTS}

    def trace_batch(self) -> Batch:
        b = super().trace_batch()
        return Batch({k: v for k, v in b.inputs.items() if k in LM_INPUTS}, b.labels)

    # -- discovery -----------------------------------------------------------------------------------
    @classmethod
    def detect(cls, local_dir: Path, config: Mapping[str, Any]) -> bool:
        """A transformers config whose architecture is a causal LM, or a known decoder model_type."""
        archs = config.get("architectures") or []
        if archs:
            return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
        return config.get("model_type") in DECODER_TYPES

    @classmethod
    def from_dir(cls, local_dir: Path, model_id: str, max_length: int | None = None) -> CausalLMAdapter:
        return load_causal_lm_dir(local_dir, model_id, max_length)

    # -- persistence -------------------------------------------------------------------------------
    def save_base(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.config.save_pretrained(out_dir)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out_dir)
        meta = {"family": self.family, "max_length": self.max_length, "model_id": self.model_id, "kind": self.kind}
        (out_dir / "slimformer_model.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def skeleton(cls, out_dir: Path) -> CausalLMAdapter:
        from transformers import AutoConfig, AutoModelForCausalLM

        meta = json.loads((out_dir / "slimformer_model.json").read_text())
        config = AutoConfig.from_pretrained(out_dir)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        return cls(model, meta["model_id"], _tokenizer(out_dir), int(meta["max_length"]), out_dir)


def _tokenizer(model_dir: Path) -> Any:
    from slimformer.models.hf import TOKENIZER_FILES

    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_causal_lm_dir(model_dir: Path, model_id: str | None = None, max_length: int | None = None
                       ) -> CausalLMAdapter:
    """Load a local `transformers` causal-LM directory (eager attention: traceable, the same on every CPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    length = max_length or min(DEFAULT_MAX_LENGTH, int(positions or DEFAULT_MAX_LENGTH))
    return CausalLMAdapter(model, model_id or str(model_dir), _tokenizer(model_dir), length, model_dir)
