"""Linear solves in a form ONNX expresses: Gauss-Jordan elimination with partial pivoting, unrolled over A's size.

ONNX has no solve or inverse in its standard opset (onnxruntime's `com.microsoft::Inverse` is a contrib op other
runtimes lack), and torch.onnx has no lowering for `aten._linalg_solve_ex`. OFT's exact Cayley transform and BOFT's
solve `X (I + Q) = I - Q` on small blocks (the block size, typically 2-32), so an elimination unrolled over the
block size is a few dozen plain ops: the same direct method LAPACK uses (row pivoting included), exact up to float
rounding, with no truncated series. Only the export sees it: eager graphs keep the one batched LAPACK call.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

aten = torch.ops.aten


def solve_by_elimination(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """X with A X = B for A [*, n, n], B [*, n, k]: Gauss-Jordan on [A | B] with partial pivoting, n unrolled."""
    n = a.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    m = torch.cat([a.expand(*batch, n, n), b.expand(*batch, n, b.shape[-1])], -1)
    eye = torch.ones_like(a[..., 0, :]).diag_embed().expand(*batch, n, n)  # follows a's device and dtype
    rows = eye.sum(-1).cumsum(-1) - 1  # 0, 1, ..., n-1: built from a tensor, not a device-bound arange
    for i in range(n):
        # the pivot: the largest |entry| of column i at or below row i, swapped into row i
        below = m[..., :, i].abs() * (rows >= i)
        chosen = (rows == below.argmax(-1, keepdim=True)).to(m.dtype)  # one-hot over rows
        swap = (eye[..., :, i] - chosen).unsqueeze(-1)
        pivot_row = (chosen.unsqueeze(-2) @ m)  # [*, 1, n + k]
        m = m + swap * (pivot_row - m[..., i:i + 1, :])
        pivot_row = m[..., i:i + 1, :] / m[..., i:i + 1, i:i + 1]
        # row i becomes the normalized pivot row; every other row loses its column-i multiple of it
        m = m - (m[..., :, i:i + 1] - eye[..., :, i:i + 1]) * pivot_row
    return m[..., n:]


def solve_ex(a, b, left: bool = True, check_errors: bool = False):
    """aten._linalg_solve_ex(A, B, left) by solve_by_elimination; the LU, pivots and info outputs are zeros (no
    caller of an exported graph reads them: peftc strips the argument checks that would)."""
    vector = b.dim() == 1 or (b.dim() == a.dim() - 1 and b.shape == a.shape[:-1])
    rhs = b.unsqueeze(-1) if vector else b
    x = solve_by_elimination(a, rhs) if left else solve_by_elimination(a.mT, rhs.mT).mT
    x = x.squeeze(-1) if vector else x
    info = torch.zeros_like(a[..., 0, 0], dtype=torch.int32)
    return x, torch.zeros_like(a), torch.zeros_like(a[..., 0], dtype=torch.int32), info


def exportable_solves(gm: GraphModule) -> GraphModule:
    """gm with every `_linalg_solve_ex` computed by solve_ex (a copy; gm itself is untouched), or gm when it has
    none. torch.onnx traces through solve_ex into plain ops."""
    if not any(n.op == "call_function" and n.target is aten._linalg_solve_ex.default for n in gm.graph.nodes):
        return gm
    graph = torch.fx.Graph()
    graph._codegen = gm.graph._codegen  # the pytree calling convention, shared (deep-copying it warns)
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    for node in copy.graph.nodes:
        if node.op == "call_function" and node.target is aten._linalg_solve_ex.default:
            node.target = solve_ex
    copy.recompile()
    return copy
