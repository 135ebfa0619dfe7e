"""The CPU kernels' register tiles, one set per vector instruction set, each measured on its machine (``attngraph
tune-tiles`` measures them on this CPU instead: ``tile_tuning.py``); and the width of the column panels weights are
packed in (``PANEL_WIDTH``: the packing pass and the projection kernel read this one constant)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

#: Columns per panel of a packed weight (``ops.pack_panels``) and of the per-call packed panel: two
#: AVX2 registers of float32.
PANEL_WIDTH = 16

# Register tile of the matmul that packs its weights per call: TILE_M rows x TILE_N columns of
# accumulators.  4 x 16 float32 is 8 AVX2 registers of accumulators, leaving room for the B row and
# the broadcast A value; measured against 6 x 16 and 8 x 16, no faster (6) or slower (8: spills).
# TILE_N is the panel width.
TILE_M, TILE_N = 4, PANEL_WIDTH

#: K values one lane of the bfloat16 dot-product instruction multiplies and adds (pairs), kept together in the
#: packed panels it reads (``ops.pack_panels(interleave=)``, ``dot.py``)
BF16_GROUP = 2


@dataclass(frozen=True)
class CpuTiles:
    """Register tiles for one vector instruction set, as (rows, columns) of float32 accumulators.

    ``dense``: the projection over packed weights; ``few_rows``: the same at 1-8 rows (a decode step,
    where a tall tile's clamped extra rows are wasted work: ``targets.FEW_ROWS``); ``one_row``: at
    exactly one row, where measured faster (``targets.ONE_ROW``); ``attention``: query rows per block
    and keys per chunk of the fused attention (``cpu_attention.py``).
    """
    isa: str
    dense: tuple
    few_rows: tuple
    attention: tuple
    one_row: tuple | None = None
    #: the weight gradient x^T g (``kernels.weight_grad``)
    weight_grad: tuple = (6, 16)
    #: the projection prefetches the next column tile's weights as it goes (``dense``, ``prefetch``)
    prefetch: bool = False
    #: the bfloat16 projection on the CPU's bfloat16 dot products (``dot.py``), where it has them: its tiles
    #: (rows, columns) for the main form, a few rows and one row
    bf16_dot: tuple | None = None
    #: the int8 projection on the CPU's integer dot products (``dot.dense_int8``): its tiles (rows, columns) for the
    #: main form, a few rows and one row (None: the few rows' form serves it), and the instruction
    #: (``dot.INT8_INSTRUCTIONS``): AVX512_VNNI's ``vpdpbusd`` where the CPU has it, else ``vpmaddwd``
    int8_dot: tuple | None = None
    int8_instruction: str = "vpmaddwd"
    #: the bfloat16 projection on AMX tiles (``amx.py``): compiled, not yet run on a CPU with AMX, so only where the
    #: CPU has AMX-BF16 and the user asked for it (``AMX_OPT_IN``)
    amx: bool = False


# AVX2 (16 ymm registers), 1 thread, transformer-base shapes, 1024 rows: 6 x 16 over packed panels ran
# at 81-89 GFLOP/s against 79-81 for 4 x 16 and 77-79 for 2 x 32; at 1-2 rows 2 x 32 was 20-35% faster.
# Attention (AVX2 code on an AVX-512 Xeon, 2 threads, S 128-512, head dim 32 and 64): 6 x 16 0-17% faster
# than 4 x 16 and 5 x 16; 7 x 16 and 8 x 16 (14 and 16 accumulators: spills) 20-35% slower.
# Prefetching the next column tile's weights (``dense``): with weights cold from memory at 128 rows 12-18%
# faster (81-84% of the AVX2 peak -> 95-97%), warm the same.
# The weight gradient (512 positions; K x N of 256 x 1024, 1024 x 256, 512 x 512, 256 x 768; 2 threads, Zen 4):
# AVX2 6 x 16 at 99-109 GFLOP/s (85-93% of the AVX2 peak), 4 x 16, 8 x 16 and 3 x 32 83-102; AVX-512 4 x 64
# at 207-214 (88-91%), 16 x 16 183-214, 8 x 32 189-202, 12 x 16 and 6 x 32 171-200.
# int8 on vpmaddwd (2 cores of a Zen 3, 2 threads; K x N of 512 x 2048, 2048 x 512, 768 x 768, 512 x 37000): at 128
# rows 6 x 16 (12 ymm accumulators) 1.3-1.9x faster than the float32 kernel, 4 x 16 and 2 x 32 within noise of it,
# 3 x 32, 1 x 32 and 1 x 64 up to 1.3x slower; at 8 rows 2 x 32 (and 4 x 16) 1.1-1.7x faster than 6 x 16; at one row
# 1 x 64 fastest (the 512 x 37000 output projection in 0.31 ms, 62 GB/s, against 0.48 for 2 x 32 and 2.1 for the
# float32 few-rows kernel).
AVX2 = CpuTiles("avx2", dense=(6, 16), few_rows=(2, 32), attention=(6, 16), prefetch=True, weight_grad=(6, 16),
                int8_dot=((6, 16), (2, 32), (1, 64)))
# AVX-512 (32 zmm registers of 16 lanes), 2 threads on a Xeon (Emerald Rapids): 4 x 64 ran at 305-335
# GFLOP/s on the transformer-base and BERT-size projections against 190-200 for the AVX2 tile (whose 6
# zmm accumulators cannot hide the FMA latency); 6 x 64 within 3% of it, 6 x 32 and 8 x 32 8-15%
# slower.  At 8 rows 2 x 64 is 1.5x the AVX2 few-rows tile, at 1-2 rows equal; at one row 1 x 64 reads
# the 512 x 37000 output projection of a decode step 20% faster (1.9 against 2.4 ms) but is 1.4x slower
# at 8 rows.  Attention: 8 query rows x 32 keys 1.3-1.9x faster than 4 x 16 (S 128-512, head dim 32, 64).
# No prefetch: its 1 KB register tile lives in memory that LLVM must assume the prefetch may read, so the
# accumulators are stored at every prefetch (10-15% slower warm, no gain cold).
# On 2 cores of a Zen 4 (``attngraph tune-tiles``, best of 7 rounds): these tiles again within 3%, but the attention,
# where 8 x 16 ran at 182 GFLOP/s against 176 for 8 x 32 (S 128 and 512, head dim 64).
AVX512 = CpuTiles("avx512", dense=(4, 64), few_rows=(2, 64), attention=(8, 32), one_row=(1, 64), weight_grad=(4, 64),
                  int8_dot=((4, 64), (2, 64), (1, 64)))


# AVX512_BF16 (``vdpbf16ps``, 32 multiply-adds per instruction), 2 cores of a Zen 4: 4 x 64 (16 zmm accumulators)
# ran the BERT-size projection (128 x 768 x 768) at 230 GFLOP/s on one thread, the float32 kernel's 114, PyTorch's
# bfloat16 (oneDNN) 187; at 1 row 1 x 64 was fastest, at 2, 5 and 6 rows 2 x 64.
# AVX512_VNNI (``vpdpbusd``, 64 byte multiply-adds per instruction): the bfloat16 kernel's loop nest and tile, 4 x 64
# int32 accumulators (a CPU with AVX512_BF16 has VNNI too).
AVX512_VNNI = dataclasses.replace(AVX512, int8_instruction="vpdpbusd")
AVX512_BF16 = dataclasses.replace(AVX512_VNNI, bf16_dot=((4, 64), (2, 64), (1, 64)))
# A CPU without AVX2 (llvm:x86-64, x86-64-v2): the AVX2 tiles for the float32 kernels, which LLVM compiles for its
# vectors, but no integer dot products (vpmaddwd on 256 bits is AVX2's).
PRE_AVX2 = dataclasses.replace(AVX2, int8_dot=None)


#: The environment variable that turns the AMX kernels on (``1``) where the CPU has AMX-BF16
AMX_OPT_IN = "ATTNGRAPH_AMX"


def cpu_tiles(target) -> CpuTiles:
    """The register tiles for ``target``'s CPU: AVX-512's where it has ``avx512f`` (the int8 products on
    ``vpdpbusd`` where it has ``avx512vnni``, else on ``vpmaddwd``; the bfloat16 ones' where it has ``avx512bf16``,
    and AMX's where it has ``amx-bf16`` and ``ATTNGRAPH_AMX=1`` asks), else AVX2's (without AVX2: no int8 kernel)."""
    import os

    from tvm.target import codegen
    if target is None or not codegen.target_has_features("avx512f", target):
        return AVX2 if target is None or codegen.target_has_features("avx2", target) else PRE_AVX2
    if not codegen.target_has_features("avx512bf16", target):
        return AVX512_VNNI if codegen.target_has_features("avx512vnni", target) else AVX512
    amx = os.environ.get(AMX_OPT_IN) == "1" and codegen.target_has_features("amx-bf16", target)
    return dataclasses.replace(AVX512_BF16, amx=True) if amx else AVX512_BF16
