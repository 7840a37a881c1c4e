"""The one codec (its public surface): torch.Tensor, torch indices and Python values <->
paramhub.v1 messages, and the raw frames for bulk bytes.

The code lives in the shared kernel, one module per concept (paramhub.common.dtypes, buffers,
tensors, frames, state, index); this module gathers them under the names the SDK uses. The
server's core imports the protobuf-free kernel modules directly.
"""

from __future__ import annotations

from paramhub.common.buffers import (BIG_BUFFER_BYTES, _byte_view, _memory, buffer_address,
                                     byte_view, copy_into, empty, tensor_bytes, typed_view)
from paramhub.common.dtypes import (_DTYPES, _FROM_PROTO, MAX_RANK, check_shape,
                                    dtype_from_proto, dtype_to_proto)
from paramhub.common.frames import (RawChunk, data_frame, encode_chunk, iter_chunk_frames,
                                    iter_data_frames, parse_chunk, parse_data_frame,
                                    parse_inline, parse_wrapped_chunk)
from paramhub.common.index import index_from_proto, index_to_proto
from paramhub.common.state import (STATE_ALIGN, full_state_layout, pack_state, state_layout,
                                   unpack_state)
from paramhub.common.tensors import (DEFAULT_CHUNK_BYTES, TensorAssembler, assemble_tensors,
                                     iter_tensor_chunks, scalar_to_proto, tensor_from_parts,
                                     tensor_from_proto, tensor_to_proto, value_from_proto,
                                     value_to_proto)

__all__ = [
    "DEFAULT_CHUNK_BYTES", "BIG_BUFFER_BYTES", "MAX_RANK",
    "dtype_to_proto", "dtype_from_proto", "check_shape",
    "tensor_to_proto", "scalar_to_proto", "tensor_from_proto", "tensor_from_parts",
    "tensor_bytes", "iter_tensor_chunks", "TensorAssembler", "assemble_tensors",
    "encode_chunk", "iter_chunk_frames", "parse_chunk", "parse_inline", "parse_wrapped_chunk",
    "RawChunk", "data_frame", "parse_data_frame", "iter_data_frames",
    "STATE_ALIGN", "state_layout", "full_state_layout", "pack_state", "unpack_state",
    "byte_view", "typed_view", "empty", "buffer_address", "copy_into",
    "index_to_proto", "index_from_proto", "value_to_proto", "value_from_proto",
    "_DTYPES", "_FROM_PROTO", "_byte_view", "_memory",
]
