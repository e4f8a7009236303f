"""Find Transformer blocks and the role of each linear layer from module structure and shapes.

No checkpoint-specific names: the block list is the longest ModuleList of same-type modules that hold
linear layers; inside a block, roles follow from shapes and registration order (the first three
hidden->attn projections are query, key, value, or one hidden->3*attn projection is a fused qkv; then
attn->hidden is the attention output; hidden->inter and inter->hidden are the FFN).
"""

from __future__ import annotations

from torch import nn

from slimformer.errors import ModelLoadError
from slimformer.models.base import LayerInfo, Unit

HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads")


def find_blocks(model: nn.Module) -> tuple[str, nn.Module]:
    """The Transformer block list: the longest ModuleList/Sequential of one type holding linear layers."""
    best: tuple[str, nn.Module] | None = None
    for path, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if sum(isinstance(m, nn.Linear) for m in mod[0].modules()) < 3:
            continue
        if best is None or len(mod) > len(best[1]):
            best = (path, mod)
    if best is None:
        raise ModelLoadError(
            f"{type(model).__name__}: no list of Transformer blocks with linear layers was found; "
            "slimformer supports BERT-style encoders and timm VisionTransformer models"
        )
    return best


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def describe_block(block: nn.Module, path: str, index: int, hidden: int) -> tuple[LayerInfo, list[Unit]]:
    """Roles of one block's linear layers and its head geometry."""
    linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    qkv: list[str] = []
    fused = False
    attn_out = ffn_in = ffn_out = None
    attn_dim = None
    inter = None
    for name, lin in linears:
        o, i = lin.out_features, lin.in_features
        if attn_out is None and not fused and len(qkv) < 3 and i == hidden and o == 3 * (o // 3) and \
                not qkv and o == 3 * hidden:
            qkv, fused, attn_dim = [name], True, o // 3
        elif attn_out is None and not fused and len(qkv) < 3 and i == hidden and (attn_dim in (None, o)) \
                and o <= hidden * 2 and ffn_in is None:
            qkv.append(name)
            attn_dim = o
        elif attn_out is None and (fused or len(qkv) == 3) and i == attn_dim and o == hidden:
            attn_out = name
        elif ffn_in is None and attn_out is not None and i == hidden and o != hidden:
            ffn_in, inter = name, o
        elif ffn_out is None and ffn_in is not None and i == inter and o == hidden:
            ffn_out = name
    if attn_out is None or ffn_in is None or ffn_out is None or not qkv:
        raise ModelLoadError(
            f"block {path}: could not identify query/key/value, attention output and FFN linear layers "
            f"from shapes (found {[n for n, _ in linears]})"
        )
    assert attn_dim is not None and inter is not None
    attn_mod_rel = _parent(qkv[0])
    attn_mod = block.get_submodule(attn_mod_rel) if attn_mod_rel else block
    heads_attr = next((a for a in HEAD_ATTRS if isinstance(getattr(attn_mod, a, None), int)), None)
    if heads_attr is None:
        raise ModelLoadError(f"block {path}: attention module {type(attn_mod).__name__} has no head count")
    num_heads = getattr(attn_mod, heads_attr)

    def full(rel: str) -> str:
        return f"{path}.{rel}" if rel else path

    def scope(rels: list[str]) -> tuple[str, ...]:
        parents = []
        for r in rels:
            p = _parent(r)
            target = full(p) if p else full(r)  # a linear directly in the block is shared alone
            if target not in parents:
                parents.append(target)
        return tuple(parents)

    roles = ["qkv"] if fused else ["query", "key", "value"]
    units = []
    for rel, role in [*zip(qkv, roles), (attn_out, "attn_out"), (ffn_in, "ffn_in"), (ffn_out, "ffn_out")]:
        lin = block.get_submodule(rel)
        units.append(Unit(full(rel), role, index, (lin.out_features, lin.in_features), lin.bias is not None))
    info = LayerInfo(
        index=index,
        path=path,
        attention_path=full(attn_mod_rel),
        heads_attr=heads_attr,
        num_heads=num_heads,
        head_dim=attn_dim // num_heads,
        intermediate=inter,
        qkv_units=tuple(full(r) for r in qkv),
        attn_out_unit=full(attn_out),
        ffn_in_unit=full(ffn_in),
        ffn_out_unit=full(ffn_out),
        attention_scope=scope([*qkv, attn_out]),
        ffn_scope=scope([ffn_in, ffn_out]),
    )
    return info, units


def describe_model(model: nn.Module, hidden: int) -> tuple[list[LayerInfo], list[Unit]]:
    path, blocks = find_blocks(model)
    layers, units = [], []
    for i, block in enumerate(blocks):
        info, us = describe_block(block, f"{path}.{i}", i, hidden)
        layers.append(info)
        units.extend(us)
    return layers, units
