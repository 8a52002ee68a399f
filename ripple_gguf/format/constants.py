"""Every ``ripple.*`` metadata key and format constant, in one place.

The writer (:mod:`ripple_gguf.format.writer`) and the reader (:mod:`ripple_gguf.format.reader`)
take their names from here; the native reader (csrc/ripple_file.c) spells the same keys.
"""
from __future__ import annotations

TOOL_NAME = "ripple-gguf"
TOOL_VERSION = "0.2.0"  # pyproject.toml; 0.2: the self-check makes exact the default where sparse mode cannot read less

FORMAT_VERSION = 4  # 2: split down columns and their scale tables; 3: checksum table, metadata hash;
# 4: sketch predictors (ripple.predictor.kind)
READ_VERSIONS = (3, 4)  # what this reader accepts (3: low-rank predictors only)
ALIGNMENT = 4096  # every layer's bundle block starts on this boundary (direct I/O)

REGION_MAGIC = b"RIPPLE01"  # first 8 bytes of the ripple region header
FOOTER_MAGIC = b"RPLEND01"  # first 8 bytes of the 64-byte footer closing the region
HEADER_SIZE = ALIGNMENT
FOOTER_SIZE = 64
# The checksum table (docs/FORMAT.md section 2b): CRC32C of every bundle, and of every
# CHECKSUM_BLOCK bytes of the standard FFN tensors (exact mode and fallback reads take those).
CHECKSUM_BLOCK = 64 << 10

# Bundle layout: one record per FFN neuron, the three parts (FFN_KINDS) back to back.
NO_GATE = -1  # gate_type value of layers without ffn_gate

# How a bundle stores its down column (docs/FORMAT.md section 3):
#   column: column i of ffn_down as one row of ripple.layer.down_type (re-quantized unless the
#           types are float and equal)
#   split:  the quantized values of column i exactly as ffn_down holds them (down_type = the
#           tensor's type); the scales, shared by the 32 neurons of a block (or the 32 or 16 of a
#           k-quant sub-block), sit in a per-layer table the runtime keeps in memory
DOWN_LAYOUTS = ("column", "split")
DOWN_COLUMN, DOWN_SPLIT = 0, 1


class Keys:
    """Metadata keys of a ripple-packed GGUF (docs/FORMAT.md describes each)."""

    FORMAT_VERSION = "ripple.format_version"
    TOOL_VERSION = "ripple.tool_version"
    # sha256 of the GGUF header (every key/value record and tensor info) without this key's own
    # record; the last key of the file
    METADATA_SHA256 = "ripple.metadata.sha256"

    class Source:
        NAME = "ripple.source.name"
        SHA256 = "ripple.source.sha256"
        SIZE = "ripple.source.size"

    class Region:
        OFFSET = "ripple.region.offset"  # absolute file offset of the region header
        SIZE = "ripple.region.size"  # header + layers + footer, bytes
        SHA256 = "ripple.region.sha256"  # of the whole region, checked by `verify`
        ID = "ripple.region.id"  # also in the region header and footer
        FILE_SIZE = "ripple.file_size"  # size of the complete file
        ALIGNMENT = "ripple.alignment"

    class Checksum:
        OFFSET = "ripple.checksum.offset"  # of the checksum table, from the region start
        SIZE = "ripple.checksum.size"  # bytes
        BLOCK_SIZE = "ripple.checksum.block_size"  # bytes per checksum of the standard FFN tensors
        SHA256 = "ripple.checksum.sha256"  # of the table, checked at load

    class Layout:
        N_LAYERS = "ripple.n_layers"
        N_EMBD = "ripple.n_embd"
        LAYER_INDEX = "ripple.layer.index"  # block number N of blk.N.*
        N_FF = "ripple.layer.n_ff"
        OFFSET = "ripple.layer.offset"  # of the layer's first bundle, from the region start
        BUNDLE_SIZE = "ripple.layer.bundle_size"
        GATE_TYPE = "ripple.layer.gate_type"  # ggml type, NO_GATE when the FFN is ungated
        UP_TYPE = "ripple.layer.up_type"
        DOWN_TYPE = "ripple.layer.down_type"
        DOWN_LAYOUT = "ripple.layer.down_layout"  # DOWN_LAYOUTS index
        DOWN_TABLE_OFFSET = "ripple.layer.down_table_offset"  # u64[L] from the region start, 0 = none
        DOWN_TABLE_SIZE = "ripple.layer.down_table_size"  # u64[L] bytes, 0 = none

    class Placement:
        METHOD = "ripple.placement.method"
        # flat: layer l's slice [sum(n_ff[:l]), sum(n_ff[:l+1])) lists the neuron id at each position
        ORDER = "ripple.placement.order"

        QUALITY = "ripple.placement.quality"  # JSON: run lengths and reads on held-out text
        # u8, flat like ORDER, position order: how often each bundle is needed on held-out text
        # (selected by its layer's predictor, or truly active without predictors), 255 = every token;
        # the runtime's pinned cache keeps the most frequent
        FREQUENCY = "ripple.placement.frequency"

    class Sparsity:
        RULE = "ripple.sparsity.rule"  # SPARSITY_RULES
        THRESHOLD = "ripple.sparsity.threshold"  # f32[L], see SPARSITY_RULES
        ACTIVE_FRACTION = "ripple.sparsity.active_fraction"  # target the thresholds were calibrated to

    class Predictor:
        RANK = "ripple.predictor.rank"
        OFFSET = "ripple.predictor.offset"  # u64[L], from the region start
        SIZE = "ripple.predictor.size"  # u64[L] bytes of each layer's blob (predictor.to_bytes layout)
        RECALL_TARGET = "ripple.predictor.recall_target"
        METRICS = "ripple.predictor.metrics"  # JSON: recall, precision, over-prediction on held-out text
        KIND = "ripple.predictor.kind"  # PREDICTOR_KINDS (absent: lowrank)
        SKETCH_OUTLIERS = "ripple.predictor.sketch_outliers"  # u32: exact input channels per layer
        SKETCH_BUDGET = "ripple.predictor.sketch_budget"  # f32: mean selected fraction calibrated to

    class Calibration:
        TEXT = "ripple.calibration.text"  # names of the calibration texts
        TOKENS = "ripple.calibration.tokens"
        SEED = "ripple.calibration.seed"

    class Runtime:
        # DEFAULT_MODES: the mode the runtime uses for the file unless the user chose one
        # (configure(mode=) or RIPPLE_MODE); "exact" when the converter's self-check of sparse mode failed
        DEFAULT_MODE = "ripple.runtime.default_mode"
        DEFAULT_MODE_REASON = "ripple.runtime.default_mode_reason"  # why exact (absent for sparse)


DEFAULT_MODES = ("exact", "sparse")
# lowrank: a trained n_embd -> rank -> n_ff MLP (ripple_gguf.offline.predictor); sketch: a 2-bit copy of the
# layer's gate and up rows with outlier input channels exact (ripple_gguf.offline.sketch)
PREDICTOR_KINDS = ("lowrank", "sketch")


# What "active" means for neuron i of a layer, with h = post-activation (the ffn_down matmul's input):
#   nonzero   (ReLU family: h is exactly 0 most of the time)   h_i != 0
#   magnitude (anything else): |h_i| > threshold
# (CATS's |act(gate)| was measured and rejected: scripts/sparsity_curve.py, docs/BENCHMARKS.md)
SPARSITY_RULES = ("nonzero", "magnitude")
# gate activation of the gated-FFN architectures llama.cpp builds with LLM_FFN_SILU / LLM_FFN_GELU
# (used to measure the CATS rule)
ARCH_GLU_ACTIVATION = {
    **{a: "silu" for a in ("llama", "llama4", "mistral3", "qwen2", "qwen3", "phi3", "stablelm", "internlm2",
                           "minicpm", "minicpm3", "granite", "olmo", "olmo2", "deci", "exaone", "exaone4",
                           "smollm3", "ernie4_5", "hunyuan-dense", "cohere2", "command-r", "plamo", "orion",
                           "baichuan", "xverse", "chatglm", "glm4", "arcee", "seed_oss", "apertus")},
    **{a: "gelu" for a in ("gemma", "gemma2", "gemma3", "gemma3n")},
}


FFN_KINDS = ("gate", "up", "down")


def ffn_tensor_name(layer: int, kind: str) -> str:
    return f"blk.{layer}.ffn_{kind}.weight"
