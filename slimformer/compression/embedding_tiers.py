"""Frequency-aware precision of a token-embedding table: rows get a precision tier by token frequency.

Rows are ranked by how often their token occurs in a reference corpus (the search's calibration/search text by
default, never held-out text; or a named corpus), ties and never-seen tokens by token id (for WordPiece/BPE
vocabularies roughly the tokenizer's own frequency order). Tiers take consecutive stretches of that ranking:
e.g. the 4,000 most frequent rows at int8, the next 8,000 at int4 g32, every other row at int2 g64. Each tier
stores its rows (in rank order) as symmetric integer codes with fp32 scales per group; `row_rank` (int16 when the
vocabulary fits, else int32) maps a token id to its rank, i.e. its row in the concatenated tier tables.

int2 codes take the four levels {-2, -1, 0, 1} x scale (the default zero point of onnxruntime's
GatherBlockQuantized for 2-bit data), the scale per group chosen by a small least-squares search.

Never-seen rows are *not* shared: mapping every row outside the top tiers to its nearest kept row (zero bytes
per row) measured held-out cosine 0.66-0.79 on all-MiniLM-L6-v2 (fortunes / python-docs; 10-14% of held-out
tokens are outside the 4,078 tokens seen in 600 search texts), while int2 g64 rows cost 120 bytes and keep the
token's identity. So the last tier always stores its rows (docs/RECIPES.md, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import base64
import hashlib
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor, nn

from slimformer.compression import ops
from slimformer.compression.pq import PQ_CENTROIDS, check_subdim, pq_bytes, pq_decode, pq_fit, zipf_weights
from slimformer.errors import PlanError
from slimformer.models.base import Batch, ModelAdapter

TIER_BITS: dict[str, int] = {"int8": 8, "int4": 4, "int2": 2, "pq": 8}  # pq: uint8 codebook indexes (pq.py)
TIERS_VERSION = 2  # version of the recipe's `embedding_tiers` section; 2 = the `pq` tier (written only with it)
_CLIP2 = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4)  # int2 scale = ratio * max|w| (levels -2..1)
# graph bytes of a tiered table in the ONNX export, beyond its initializers: (fixed, per tier), per character of
# the module path (Gather of the rank map, Cast, per tier: Sub, Clip, GatherBlockQuantized/Gather+Mul, Less, Where)
_ONNX_GRAPH = (600, 700, 40)


@dataclass(frozen=True)
class Tier:
    """One precision tier: `rows` rows of the ranking (None: every remaining row; the last tier only)."""

    name: str
    rows: int | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.name not in TIER_BITS:
            raise PlanError(f"unknown embedding tier {self.name!r}; tiers are {', '.join(TIER_BITS)}")
        if self.rows is not None and self.rows < 1:
            raise PlanError(f"tier {self.name}: rows must be >= 1 (got {self.rows}); use null for the rest")
        if self.name == "pq":  # group_size = the sub-vector width d
            check_subdim(self.group_size or 0, self.group_size)
        elif self.group_size is not None and (self.group_size < 2 or self.group_size % 2):
            raise PlanError(f"tier {self.name}: group_size must be an even number >= 2 or null "
                            f"(got {self.group_size})")
        if self.name == "int2" and self.group_size is None:
            raise PlanError("tier int2 needs a group_size (e.g. 64): one scale per row loses too much at 2 bits")

    @property
    def bits(self) -> int:
        return TIER_BITS[self.name]


@dataclass(frozen=True)
class TokenRanking:
    """Token ids ordered by frequency on a reference corpus: `frequent` = the ids seen there, most frequent first
    (ties by id); every other id follows in id order. `source` says where the counts came from (provenance)."""

    vocab: int
    frequent: tuple[int, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if self.frequent and (min(self.frequent) < 0 or max(self.frequent) >= self.vocab):
            raise PlanError(f"token ranking: ids must lie in 0..{self.vocab - 1}")
        if len(set(self.frequent)) != len(self.frequent):
            raise PlanError("token ranking: an id appears twice")

    @cached_property
    def order(self) -> Tensor:
        """All row ids in rank order (a permutation of 0..vocab-1)."""
        seen = torch.zeros(self.vocab, dtype=torch.bool)
        head = torch.tensor(self.frequent, dtype=torch.long)
        seen[head] = True
        return torch.cat([head, torch.nonzero(~seen).reshape(-1)])

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=12)
        h.update(np.asarray(self.frequent, dtype=np.int64).tobytes() + str(self.vocab).encode())
        return h.hexdigest()

    def __hash__(self) -> int:  # frozen dataclass hash of a long tuple is slow; equal rankings, equal prints
        return hash(self.fingerprint)

    # -- compact text form (recipes) -------------------------------------------------------------------
    def encode_ids(self) -> str:
        """`frequent` as base64 of zlib-compressed little-endian uint32 (a recipe line, not 30k numbers)."""
        raw = np.asarray(self.frequent, dtype="<u4").tobytes()
        return base64.b64encode(zlib.compress(raw, 9)).decode("ascii")

    @staticmethod
    def decode_ids(text: str) -> tuple[int, ...]:
        try:
            raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
        except (ValueError, zlib.error) as exc:
            raise PlanError(f"embedding_tiers.ranking.ids is not base64 zlib data ({exc})") from None
        if len(raw) % 4:
            raise PlanError("embedding_tiers.ranking.ids does not hold whole uint32 values")
        return tuple(int(i) for i in np.frombuffer(raw, dtype="<u4"))


def count_tokens(token_ids: Iterable[Sequence[int]], vocab: int) -> Tensor:
    """Occurrences of each id over tokenised texts (int64, length vocab)."""
    counts = torch.zeros(vocab, dtype=torch.long)
    for ids in token_ids:
        t = torch.as_tensor(list(ids), dtype=torch.long)
        if t.numel():
            counts += torch.bincount(t.clamp(0, vocab - 1), minlength=vocab)
    return counts


def ranking_from_counts(counts: Tensor, source: str = "") -> TokenRanking:
    """The ranking of `counts`: seen ids by count descending, ties by id (deterministic)."""
    c = counts.to(torch.long)
    seen = torch.nonzero(c > 0).reshape(-1)
    # stable sort by -count keeps ascending id order among equal counts
    order = seen[torch.sort(-c[seen], stable=True).indices]
    return TokenRanking(int(c.numel()), tuple(int(i) for i in order), source)


def parse_layout(text: str) -> tuple[Tier, ...]:
    """A tier layout as the search space writes it: `int8:4000,int4/32:8000,int2/64` = tier[/group][:rows],
    comma separated, the last without rows (the rest)."""
    tiers = []
    for part in text.split(","):
        head, _, rows = part.strip().partition(":")
        name, _, group = head.partition("/")
        try:
            tiers.append(Tier(name, int(rows) if rows else None, int(group) if group else None))
        except ValueError as exc:
            raise PlanError(f"tier layout {text!r}: {exc}") from None
    if tiers and tiers[-1].rows is not None:
        raise PlanError(f"tier layout {text!r}: the last tier takes the remaining rows; write it without ':ROWS'")
    return tuple(tiers)


def layout_text(tiers: Sequence[Tier]) -> str:
    """Inverse of `parse_layout`."""
    return ",".join(t.name + (f"/{t.group_size}" if t.group_size else "") + (f":{t.rows}" if t.rows else "")
                    for t in tiers)


def ranking_from_batches(batches: Iterable[Batch], vocab: int, source: str = "") -> TokenRanking:
    """The ranking of the real tokens (attention mask 1) of tokenised batches."""
    counts = torch.zeros(vocab, dtype=torch.long)
    for b in batches:
        ids = b.inputs.get("input_ids")
        if ids is None:
            continue
        mask = b.inputs.get("attention_mask")
        flat = ids.reshape(-1) if mask is None else ids[mask.bool()].reshape(-1)
        counts += torch.bincount(flat.to(torch.long).clamp(0, vocab - 1).cpu(), minlength=vocab)
    return ranking_from_counts(counts, source)


def reference_ranking(adapter: ModelAdapter, reference: str | None, batches: Sequence[Batch]) -> TokenRanking:
    """The ranking a search's tiers use: token counts on `batches` (the search's own search + calibration text;
    never held-out text) or, when `reference` names a text source, on that corpus."""
    tables = [u for u in adapter.units if u.kind == "embedding"]
    if not tables:
        raise PlanError(f"{adapter.model_id} has no embedding table to tier")
    vocab = tables[0].shape[0]
    if reference is None:
        return ranking_from_batches(batches, vocab, "search and calibration text")
    from slimformer.data import load_texts

    return ranking_from_batches(adapter.make_batches(load_texts(reference), 64), vocab, reference)


@dataclass(frozen=True)
class TierSpec:
    """The tiers of one table and the ranking they cut (what a UnitSpec's `tiers` holds)."""

    tiers: tuple[Tier, ...]
    ranking: TokenRanking

    def __post_init__(self) -> None:
        if not self.tiers:
            raise PlanError("embedding tiers: give at least one tier")
        if any(t.rows is None for t in self.tiers[:-1]):
            raise PlanError("embedding tiers: only the last tier may take the remaining rows (rows: null)")

    def sizes(self, vocab: int) -> list[int]:
        """Rows per tier for a table of `vocab` rows (tiers past the end get 0; the last takes the rest)."""
        if vocab != self.ranking.vocab:
            raise PlanError(f"embedding tiers: ranking has {self.ranking.vocab} ids, the table {vocab} rows")
        out, left = [], vocab
        for i, t in enumerate(self.tiers):
            n = left if (t.rows is None or i == len(self.tiers) - 1) else min(t.rows, left)
            out.append(n)
            left -= n
        return out

    def assignment(self, vocab: int) -> Tensor:
        """Tier index of every row (int64, length vocab): each row in exactly one tier."""
        tier_of_rank = torch.repeat_interleave(torch.arange(len(self.tiers)), torch.tensor(self.sizes(vocab)))
        out = torch.empty(vocab, dtype=torch.long)
        out[self.ranking.order] = tier_of_rank
        return out


# -- quantisation ----------------------------------------------------------------------------------------
def quantize_int2(w: Tensor, group_size: int) -> ops.QuantResult:
    """Codes in {-2, -1, 0, 1} per group of `group_size` along the row, scale = ratio * max|w| with the ratio
    (from a small grid) of least squared error per group."""
    out, n_in = w.shape
    n_groups = max(1, math.ceil(n_in / group_size))
    wg = ops._group_view(w.detach().to(torch.float32), group_size, n_groups)
    amax = wg.abs().amax(dim=-1)
    nonzero = amax > 0
    best_scale = torch.ones_like(amax)
    best_err = torch.full_like(amax, float("inf"))
    for ratio in _CLIP2:
        scale = torch.where(nonzero, amax * ratio, torch.ones_like(amax))
        deq = torch.round(wg / scale[..., None]).clamp_(-2, 1) * scale[..., None]
        err = (deq - wg).square_().sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    codes = torch.round(wg / best_scale[..., None]).clamp_(-2, 1)
    codes = codes.reshape(out, n_groups * group_size)[:, :n_in].to(torch.int8)
    return ops.QuantResult(codes=codes, scales=best_scale, bits=2, group_size=group_size)


def quantize_tier(w: Tensor, tier: Tier) -> ops.QuantResult:
    if tier.bits == 2:
        return quantize_int2(w, tier.group_size)  # type: ignore[arg-type]
    return ops.quantize(w, tier.bits, tier.group_size)


def pack_int2(codes: Tensor) -> Tensor:
    """Codes in [-2, 1], flattened -> uint8 with four per byte (code + 2, element 4k+j in bits 2j..2j+1): the
    row-major layout of GatherBlockQuantized(bits=2) when rows hold a multiple of four codes."""
    v = (codes.reshape(-1).to(torch.int16) + 2)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) > 3):
        raise PlanError("int2 codes must lie in [-2, 1]")
    pad = (-v.numel()) % 4
    if pad:
        v = torch.cat([v, v.new_full((pad,), 2)])
    q = v.reshape(-1, 4)
    return (q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)).to(torch.uint8)


def unpack_int2(packed: Tensor, numel: int) -> Tensor:
    p = packed.reshape(-1).to(torch.int16)
    v = torch.stack([(p >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(-1)[:numel]
    return (v - 2).to(torch.int8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    if bits == 2:
        return pack_int2(codes)
    return ops.pack_int4(codes) if bits == 4 else codes.reshape(-1).contiguous()


def unpack_codes(raw: Tensor, bits: int, shape: tuple[int, int]) -> Tensor:
    n = shape[0] * shape[1]
    if bits == 2:
        return unpack_int2(raw, n).reshape(shape)
    if bits == 4:
        return ops.unpack_int4(raw, n, shape)
    return raw.reshape(shape).to(torch.int8)


# -- bytes -----------------------------------------------------------------------------------------------
def rank_map_dtype(vocab: int) -> torch.dtype:
    return torch.int16 if vocab <= 32767 else torch.int32


def tier_matrix_bytes(rows: int, dim: int, tier: Tier) -> int:
    """Packed codes + fp32 scales of one tier (as `TieredEmbedding.pack` writes them)."""
    if rows == 0:
        return 0
    if tier.name == "pq":  # uint8 codes + fp16 codebook
        check_subdim(dim, tier.group_size)
        return pq_bytes(rows, dim, tier.group_size)  # type: ignore[arg-type]
    groups = 1 if tier.group_size is None else -(-dim // tier.group_size)
    return (rows * dim * tier.bits + 7) // 8 + 4 * rows * groups


def tiered_bytes(shape: tuple[int, int], spec: TierSpec) -> int:
    """Exact bytes of the packed tiered table: the rank map plus every tier's codes and scales."""
    vocab, dim = shape
    rank = vocab * torch.empty((), dtype=rank_map_dtype(vocab)).element_size()
    return rank + sum(tier_matrix_bytes(n, dim, t) for n, t in zip(spec.sizes(vocab), spec.tiers, strict=True))


def onnx_tier_block(dim: int, tier: Tier) -> int | None:
    """GatherBlockQuantized block of a tier (a power of two 16..256 dividing its group), None: Gather + Mul."""
    if tier.name == "pq" or (tier.bits == 8 and tier.group_size is None):
        return None
    g = tier.group_size if tier.group_size is not None and tier.group_size < dim else None
    if g is None:
        return None if tier.bits == 2 else _best_block(dim, tier.bits)
    b = g & -g
    ok = b >= 16 and not (tier.bits == 4 and dim % 2) and not (tier.bits == 2 and dim % 4)
    return min(b, 256) if ok else None


def _best_block(dim: int, bits: int) -> int:
    best, best_bytes, b = 16, None, 16
    while b <= 256:
        cost = -(-dim // b) * (b * bits // 8 + 4)
        if best_bytes is None or cost <= best_bytes:
            best, best_bytes = b, cost
        b *= 2
    return best


def onnx_tier_bytes(rows: int, dim: int, tier: Tier) -> int:
    """Initializer bytes of one tier in the ONNX export (export/tiered.py)."""
    if rows == 0:
        return 0
    if tier.name == "pq":  # codes, fp16 codebook, int64 sub-space offsets and the output width (export/tiered.py)
        return pq_bytes(rows, dim, tier.group_size) + 8 * (dim // tier.group_size) + 8  # type: ignore[operator]
    block = onnx_tier_block(dim, tier)
    groups = 1 if tier.group_size is None else -(-dim // tier.group_size)
    if block is None:  # int8 codes, Gather + Cast + Mul (+ the group index of grouped scales)
        return rows * dim + 4 * rows * groups + (8 * dim if groups > 1 else 0)
    nb = -(-dim // block)
    return rows * dim * tier.bits // 8 + 4 * rows * nb


def onnx_tiered_bytes(shape: tuple[int, int], spec: TierSpec, path: str) -> tuple[int, int]:
    """(initializer bytes, graph bytes bound) of a tiered table in the ONNX export."""
    vocab, dim = shape
    sizes = spec.sizes(vocab)
    rank = vocab * torch.empty((), dtype=rank_map_dtype(vocab)).element_size()
    inits = rank + sum(onnx_tier_bytes(n, dim, t) for n, t in zip(sizes, spec.tiers, strict=True)) + 16 * len(sizes)
    fixed, per_tier, per_char = _ONNX_GRAPH
    used = sum(1 for n in sizes if n)
    pq = sum(1 for n, t in zip(sizes, spec.tiers, strict=True) if n and t.name == "pq")
    return inits, fixed + (used + pq) * per_tier + per_char * (used + 2 * pq + 1) * (len(path) + 16)


# -- the module ------------------------------------------------------------------------------------------
class TieredEmbedding(nn.Embedding):
    """nn.Embedding whose rows are stored in precision tiers (`TierSpec`); `weight` is the effective table
    (every row dequantised from its tier), so torch runs it as is; `tier_codes` / `tier_scales` and `row_rank`
    are the deployable form that packing and the ONNX export read."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: TierSpec, padding_idx: int | None = None
                 ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.spec = spec
        self.tier_codes: list[Tensor] = []
        self.tier_scales: list[Tensor] = []
        self.register_buffer("row_rank", torch.empty(num_embeddings, dtype=torch.long))

    @property
    def sizes(self) -> list[int]:
        return self.spec.sizes(self.num_embeddings)

    def set_table(self, w: Tensor) -> None:
        """Quantise each tier's rows of `w` (vocab, dim) and store codes, scales and the effective table."""
        order = self.spec.ranking.order
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        self.row_rank = rank
        codes, scales, eff_ranked, start = [], [], [], 0
        for n, tier in zip(self.sizes, self.spec.tiers, strict=True):
            rows = w.detach()[order[start:start + n]].to(torch.float32)
            if tier.name == "pq":  # codes (n, M) uint8 in tier_codes, codebook (M, K, d) fp16 in tier_scales
                c, book = pq_fit(rows, tier.group_size, zipf_weights(start, n))  # type: ignore[arg-type]
                codes.append(c)
                scales.append(book)
                eff_ranked.append(pq_decode(c, book))
                start += n
                continue
            q = quantize_tier(rows, tier) if n else ops.QuantResult(
                torch.zeros(0, w.shape[1], dtype=torch.int8), torch.zeros(0, 1), tier.bits, tier.group_size)
            codes.append(q.codes)
            scales.append(q.scales)
            eff_ranked.append(ops.dequantize(q) if n else rows)
            start += n
        self.tier_codes, self.tier_scales = codes, scales
        self._set_effective(torch.cat(eff_ranked))

    def _set_effective(self, ranked: Tensor) -> None:
        with torch.no_grad():
            self.weight = nn.Parameter(ranked[self.row_rank].contiguous(), requires_grad=False)

    def stored_bytes(self) -> int:
        return tiered_bytes((self.num_embeddings, self.embedding_dim), self.spec)

    def pack(self, prefix: str) -> dict[str, Tensor]:
        """The deployable tensors: `{prefix}.row_rank` and `{prefix}.tierI.codes` / `.scales` per tier."""
        out = {f"{prefix}.row_rank": self.row_rank.to(rank_map_dtype(self.num_embeddings)).contiguous()}
        for i, (tier, c, s) in enumerate(zip(self.spec.tiers, self.tier_codes, self.tier_scales, strict=True)):
            if c.shape[0] == 0:
                continue
            if tier.name == "pq":  # uint8 codes as they are, fp16 codebook
                out[f"{prefix}.tier{i}.codes"] = c.to(torch.uint8).contiguous()
                out[f"{prefix}.tier{i}.codebook"] = s.to(torch.float16).contiguous()
                continue
            out[f"{prefix}.tier{i}.codes"] = pack_codes(c, tier.bits)
            out[f"{prefix}.tier{i}.scales"] = s.to(torch.float32).contiguous()
        return out

    def unpack(self, prefix: str, tensors: dict[str, Tensor]) -> None:
        """Inverse of `pack`."""
        self.row_rank = tensors[f"{prefix}.row_rank"].to(torch.long)
        codes, scales, eff = [], [], []
        for i, (n, tier) in enumerate(zip(self.sizes, self.spec.tiers, strict=True)):
            if n == 0:
                codes.append(torch.zeros(0, self.embedding_dim, dtype=torch.int8))
                scales.append(torch.zeros(0, 1))
                continue
            if tier.name == "pq":
                m = self.embedding_dim // tier.group_size  # type: ignore[operator]
                c = tensors[f"{prefix}.tier{i}.codes"].to(torch.uint8).reshape(n, m)
                book = tensors[f"{prefix}.tier{i}.codebook"].to(torch.float16).reshape(m, PQ_CENTROIDS, -1)
                codes.append(c)
                scales.append(book)
                eff.append(pq_decode(c, book))
                continue
            c = unpack_codes(tensors[f"{prefix}.tier{i}.codes"], tier.bits, (n, self.embedding_dim))
            s = tensors[f"{prefix}.tier{i}.scales"].to(torch.float32)
            codes.append(c)
            scales.append(s)
            eff.append(ops.dequantize(ops.QuantResult(c, s, tier.bits, tier.group_size)))
        self.tier_codes, self.tier_scales = codes, scales
        self._set_effective(torch.cat(eff))

    def extra_repr(self) -> str:
        tiers = ", ".join(f"{t.name}x{n}" for t, n in zip(self.spec.tiers, self.sizes, strict=True))
        return f"{super().extra_repr()}, tiers=[{tiers}]"
