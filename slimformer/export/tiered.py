"""ONNX lowering of a frequency-tiered embedding table (compression/embedding_tiers.py), exact against torch.

    rank  = Cast<int64>(Gather(row_rank, ids))              token id -> its row in the ranked tier tables
    rows_i = tier i's kernel on Clip(rank - start_i, 0, n_i - 1)
    y     = Where(rank < end_0, rows_0, Where(rank < end_1, rows_1, ... rows_last))

Each tier runs onnxruntime's `com.microsoft.GatherBlockQuantized` where it takes the tier's width and group
(bits 2, 4 and 8 with a power-of-two block 16..256 dividing the group; ORT 1.32 runs bits=2 with the default zero
point 2, i.e. codes {-2, -1, 0, 1}, checked exactly in tests/export), else int8 codes Gather + Cast + Mul
(`kernels.gather_dequant`, e.g. int8 with one scale per row). Every path computes code * scale in fp32 and the
selection is a Where, so the output equals the torch table's rows bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper
from onnx import numpy_helper as nh

from slimformer.compression.embedding_tiers import TieredEmbedding, onnx_tier_block, pack_int2, rank_map_dtype
from slimformer.export import kernels as K


def _gbq(ids: str, y: str, p: str, codes: np.ndarray, scales: np.ndarray, bits: int, group: int | None,
         block: int) -> K.Lowered:
    """GatherBlockQuantized for 2/4/8-bit codes (rows of D codes, D a multiple of 8 / bits)."""
    v, d = codes.shape
    if bits == 2:
        data = pack_int2(torch.from_numpy(np.ascontiguousarray(codes))).numpy().reshape(v, d // 4)
    else:
        u = K._offset_codes(codes, bits, d)
        data = K._pack_rows(u) if bits == 4 else u
    inits = [nh.from_array(np.ascontiguousarray(data), f"{p}.qweight"),
             K.f32(f"{p}.scales", K.block_scales(scales, d, group, block))]
    node = helper.make_node("GatherBlockQuantized", [inits[0].name, ids, inits[1].name], [y], name=f"{p}/Gather",
                            domain=K.MS_DOMAIN, bits=bits, block_size=block, gather_axis=0, quantize_axis=1)
    return K.Lowered(f"GatherBlockQuantized(bits={bits},block={block})", inits, [node])


def _pq(ids: str, y: str, p: str, codes: np.ndarray, book: np.ndarray) -> K.Lowered:
    """A product-quantised tier (compression/pq.py): codes (n, M) uint8, codebook (M, K, d) fp16 ->
    Reshape(Cast<f32>(Gather(book (M*K, d), Cast<int64>(Gather(codes, ids)) + m*K)), ids.shape + [M*d])."""
    m, k, d = book.shape
    inits = [nh.from_array(np.ascontiguousarray(codes.astype(np.uint8)), f"{p}.codes"),
             nh.from_array(np.ascontiguousarray(book.astype(np.float16).reshape(m * k, d)), f"{p}.codebook"),
             K.i64(f"{p}.offsets", [j * k for j in range(m)]), K.i64(f"{p}.width", [m * d])]
    nodes = [helper.make_node("Gather", [inits[0].name, ids], [f"{p}/c8"], name=f"{p}/GatherCodes", axis=0),
             helper.make_node("Cast", [f"{p}/c8"], [f"{p}/c"], name=f"{p}/CastCodes", to=TensorProto.INT64),
             helper.make_node("Add", [f"{p}/c", inits[2].name], [f"{p}/idx"], name=f"{p}/AddOffsets"),
             helper.make_node("Gather", [inits[1].name, f"{p}/idx"], [f"{p}/v16"], name=f"{p}/GatherBook", axis=0),
             helper.make_node("Cast", [f"{p}/v16"], [f"{p}/v"], name=f"{p}/CastBook", to=TensorProto.FLOAT),
             helper.make_node("Shape", [ids], [f"{p}/ids_shape"], name=f"{p}/Shape"),
             helper.make_node("Concat", [f"{p}/ids_shape", inits[3].name], [f"{p}/shape"], name=f"{p}/Concat",
                              axis=0),
             helper.make_node("Reshape", [f"{p}/v", f"{p}/shape"], [y], name=f"{p}/Reshape")]
    return K.Lowered(f"pq(d={d})", inits, nodes)


def lower_tiered_embedding(ids: str, y: str, p: str, mod: TieredEmbedding) -> K.Lowered:
    """The nodes and initializers that replace `Gather(table, ids)` for a tiered table."""
    vocab, dim = mod.num_embeddings, mod.embedding_dim
    rank_np = mod.row_rank.to(rank_map_dtype(vocab)).numpy()
    inits = [nh.from_array(np.ascontiguousarray(rank_np), f"{p}.row_rank"),
             K.i64(f"{p}.unsqueeze_axes", [-1])]
    nodes = [helper.make_node("Gather", [inits[0].name, ids], [f"{p}/rank_raw"], name=f"{p}/GatherRank", axis=0),
             helper.make_node("Cast", [f"{p}/rank_raw"], [f"{p}/rank"], name=f"{p}/CastRank", to=TensorProto.INT64)]
    parts: list[tuple[str, int]] = []  # (rows output, end rank) of each non-empty tier
    start, kinds = 0, []
    for i, (n, tier) in enumerate(zip(mod.sizes, mod.spec.tiers, strict=True)):
        if n == 0:
            continue
        q = f"{p}.tier{i}"
        lo, hi = K.i64(f"{q}.start", [start]), K.i64(f"{q}.last", [n - 1])
        lo.dims[:] = []  # scalars
        hi.dims[:] = []
        zero = K.i64(f"{q}.zero", [0])
        zero.dims[:] = []
        inits += [lo, hi, zero]
        nodes += [helper.make_node("Sub", [f"{p}/rank", lo.name], [f"{q}/off"], name=f"{q}/Sub"),
                  helper.make_node("Clip", [f"{q}/off", zero.name, hi.name], [f"{q}/local"], name=f"{q}/Clip")]
        codes = mod.tier_codes[i].numpy()
        scales = mod.tier_scales[i].numpy()
        block = onnx_tier_block(dim, tier)
        if tier.name == "pq":
            low = _pq(f"{q}/local", f"{q}/rows", q, mod.tier_codes[i].numpy(), mod.tier_scales[i].numpy())
        elif block is None:
            low = K.gather_dequant(f"{q}/local", f"{q}/rows", q, codes, scales, tier.group_size)
        else:
            low = _gbq(f"{q}/local", f"{q}/rows", q, codes, scales, tier.bits, tier.group_size, block)
        inits += low.initializers
        nodes += low.nodes
        kinds.append(f"{tier.name}x{n}:{low.kernel}")
        start += n
        parts.append((f"{q}/rows", start))
    acc = parts[-1][0]
    for j in range(len(parts) - 2, -1, -1):
        rows, end = parts[j]
        q = f"{p}.sel{j}"
        e = K.i64(f"{q}.end", [end])
        e.dims[:] = []
        inits.append(e)
        out = y if j == 0 else f"{q}/y"
        nodes += [helper.make_node("Less", [f"{p}/rank", e.name], [f"{q}/c"], name=f"{q}/Less"),
                  helper.make_node("Unsqueeze", [f"{q}/c", f"{p}.unsqueeze_axes"], [f"{q}/cu"], name=f"{q}/Unsq"),
                  helper.make_node("Where", [f"{q}/cu", rows, acc], [out], name=f"{q}/Where")]
        acc = out
    if len(parts) == 1:
        nodes.append(helper.make_node("Identity", [acc], [y], name=f"{p}/Out"))
    return K.Lowered("tiered[" + ", ".join(kinds) + "]", inits, nodes)
