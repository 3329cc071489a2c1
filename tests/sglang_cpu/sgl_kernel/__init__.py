"""A stand-in for `sgl_kernel`, so that sglang's real engine runs on a CPU in the tests. NOT the real package.

sglang's CPU path imports `sgl_kernel` at module level, and no CPU build of it is on PyPI (CUDA wheels only, no
sdist). What a plain decoder-only run calls is implemented here in pure torch (each op is checked against a
reference in tests/test_sglang_engine.py); every other name sglang imports is a placeholder that raises when
called, so nothing silently does the wrong thing. On a GPU the real sgl-kernel wheel is installed and this folder
is not on the path (tests/sglang_cpu is put there only by the CPU harness, tests/sglang_harness.py).
"""

from __future__ import annotations

import torch

STAND_IN = True  # the harness checks it imported this module, not a real sgl_kernel


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor, out_cache_loc: torch.Tensor,
                                 pool_len: int) -> None:
    """Row `req_pool_indices[i]` of `req_to_token`, columns `start_offset[i]:end_offset[i]`, takes the next
    `end - start` entries of `out_cache_loc` (requests in order), as sglang's triton `assign_req_to_token_pool`."""
    assert req_to_token.shape[1] == pool_len, (req_to_token.shape, pool_len)
    lengths = (end_offset - start_offset).tolist()
    offset = 0
    for row, start, n in zip(req_pool_indices.tolist(), start_offset.tolist(), lengths, strict=True):
        req_to_token[row, start:start + n] = out_cache_loc[offset:offset + n].to(req_to_token.dtype)
        offset += n


def _placeholder(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name}: not in the CPU stand-in (tests/sglang_cpu/sgl_kernel); "
                                  "this path needs the real sgl-kernel on a GPU")

    op.__name__ = name
    return op


# imported at module level by sglang 0.5.23's CPU path, never called by a plain decoder-only run
PLACEHOLDERS = ("copy_all_layer_kv_cache_cpu", "build_tree_kernel_efficient_cpu", "verify_tree_greedy_cpu", "assign_draft_cache_locs_contiguous_cpu", "assign_extend_cache_locs_cpu", "fill_accept_out_cache_loc_cpu", "fill_bonus_tokens_cpu",)
for _name in PLACEHOLDERS:
    globals()[_name] = _placeholder(_name)
