"""The reference int4 MoE: routing, a batched expert forward, and how close is close enough.

The forward works on dequantized float weights (see :mod:`gptq2xpu.verify.unpack`) in the layout
the XPU kernel consumes: ``w13 [E, 2N, K]`` (rows ``0..N-1`` gate/w1, ``N..2N-1`` up/w3) and
``w2 [E, K, N]``; per token ``out = sum_k w_k * ((silu(x @ gate.T) * (x @ up.T)) @ down.T)``.

It batches experts instead of looping over them in Python: (token, slot) pairs are sorted by
expert, scattered into a zero-padded ``[A, C, K]`` batch (A = experts that received tokens, C =
the most tokens any of them received), multiplied with ``torch.bmm``, and gathered back with
``index_add_``. A per-expert Python loop costs ~90 ms per layer on an H100 against a ~25 ms
budget; this costs two batched GEMMs.

On a CPU the opposite holds: dequantizing the whole layer (2.4 GB of float32 per side at full
width) costs far more than the GEMMs, so :func:`moe_forward_streamed` computes the same block one
expert at a time from packed weights (:mod:`gptq2xpu.verify.experts`), each expert's routed
tokens and its coverage token in one GEMM pair, on worker threads.
"""

from __future__ import annotations

import torch

SCORINGS = ("softmax", "sigmoid")

# How close two outputs must be to pass, by compute dtype, when both sides are mathematically
# the SAME weights (source GPTQ dequantized vs the converted XPU bytes dequantized: same codes,
# same scales) run through this reference. ``rel`` is ||a - b|| / ||b||, ``cosine`` the cosine
# similarity of the flattened outputs.
#
# Rationale. Identical weights through identical code on one device give identical bits (rel 0);
# the bound must absorb legitimate execution noise only: another reduction order in the GEMMs
# (other tiling or batch composition, another device), scales held in the compute dtype on one
# side and in fp16 on the other, and the rounding chain of the block (dequantized weight,
# x @ w13, silu * up, @ w2: four roundings to the compute dtype before the fp32 weighted sum).
# Measured against a float64 forward of the same weights (random int4 experts, fp16 scales,
# K = 256..2048, top-2..8; tests/test_verify_math.py::test_tolerances_cover_dtype_noise):
#     float32  rel 3.6e-7 .. 4.4e-7    (u = 2^-24 = 6e-8:   ~7u)
#     float16  rel 6.4e-4 .. 6.6e-4    (u = 2^-11 = 4.9e-4: ~1.3u)
#     bfloat16 rel 5.3e-3 .. 5.5e-3    (u = 2^-8  = 3.9e-3: ~1.4u)
# and bf16 with bf16-rounded scales vs bf16 with fp16 scales: rel 5.8e-3 .. 6.2e-3.
# The streamed CPU forward (moe_forward_streamed, both sides: GPTQ input-major, XPU rows) sits in
# the same place (tests/test_verify_streamed.py::test_streamed_tolerances_cover_dtype_noise; K up
# to 2048, and a full-width Qwen3-30B-A3B layer in scripts/bench_reference.py --accuracy):
#     float32  rel 1.7e-7 .. 6.0e-7    (the whole-layer path on the same inputs: 2.5e-7 .. 6.0e-7)
#     float16  rel 5.7e-4 .. 8.2e-4
#     bfloat16 rel 5.0e-3 .. 6.1e-3
# Two valid implementations can each be that far from exact, so they may differ by up to twice
# that: the bounds are 4u for fp16 / bf16 and 1e-5 (~170u, GEMM noise at K ~ 10^4) for fp32,
# with ``cosine >= 1 - rel**2`` to match (cosine = 1 - rel**2 / 2 for small, random errors).
# Real layout bugs are far above them: one nibble-swapped expert out of 16..32 gives rel
# 0.22 .. 0.53; swapped nibbles everywhere, a transposed scale grid or gate/up swapped give ~1.
TOLERANCES = {
    "float32": {"rel": 1e-5, "cosine": 1 - 1e-10},
    "float16": {"rel": 2e-3, "cosine": 1 - 4e-6},
    "bfloat16": {"rel": 1.6e-2, "cosine": 1 - 2.56e-4},
}

# How close the real kernel (vllm_xpu_kernels XpuFusedMoe, int4) must be to the reference.
# These are the element-wise ``torch.testing.assert_close(output, ref_out, rtol, atol)`` bounds
# of vllm-project/vllm-xpu-kernels tests/fused_moe/test_fused_moe.py, test_fused_moe_int4:
#     if dtype == torch.float16: rtol = 2e-2; atol = 2e-2
#     else:                      rtol = 2e-1; atol = 2e-1     (bf16, the only dtype it runs)
# The upstream test draws activations as randn/16 and scales as 2^-5, so its outputs are O(0.1);
# atol is absolute and must be read against that scale (see ``within_kernel_tolerance``).
KERNEL_TOLERANCES = {
    "float16": {"rtol": 2e-2, "atol": 2e-2},
    "bfloat16": {"rtol": 2e-1, "atol": 2e-1},
}


def route(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token: returns ``(topk_weights float32 [T, k], topk_ids int64 [T, k])``.

    ``logits = x @ router_weight.T`` in float32; scores are ``softmax`` or ``sigmoid`` of them.
    ``correction_bias`` (DeepSeek-V3 / GLM ``e_score_correction_bias``, ``[E]``) is added to the
    scores for *selection only*: the weights are the un-biased scores of the chosen experts. With
    ``renormalize`` the k weights of a token are divided by their sum. Finally they are multiplied
    by ``routed_scaling_factor``. (Group-limited selection, DeepSeek's ``n_group``/``topk_group``,
    is not modelled: with ``n_group = 1`` it is the same thing.)
    """
    if scoring not in SCORINGS:
        raise ValueError(f"unknown router scoring {scoring!r}; expected one of {SCORINGS}")
    num_experts = router_weight.shape[0]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in 1..{num_experts}")
    logits = x.to(torch.float32) @ router_weight.to(device=x.device, dtype=torch.float32).T
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()
    if correction_bias is None:
        selection = scores
    else:
        selection = scores + correction_bias.to(device=scores.device, dtype=torch.float32)
    topk_ids = selection.topk(top_k, dim=-1).indices
    topk_weights = scores.gather(-1, topk_ids)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True).clamp_min(
            torch.finfo(torch.float32).tiny
        )
    if routed_scaling_factor != 1.0:
        topk_weights = topk_weights * routed_scaling_factor
    return topk_weights.to(torch.float32), topk_ids.to(torch.int64)


def moe_forward(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    b13: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MoE block on dequantized weights; returns float32 ``[T, K]``.

    - ``x`` ``[T, K]``; ``w13`` ``[E, 2N, K]`` (gate rows first, then up); ``w2`` ``[E, K, N]``;
    - ``topk_weights`` ``[T, k]``, ``topk_ids`` ``[T, k]`` (int, 0..E-1);
    - ``b13`` ``[E, 2N]`` and ``b2`` ``[E, K]``: optional biases, added after each GEMM.

    The GEMMs and the activation run in ``w13.dtype`` (x and the biases are cast to it); each
    expert output is weighted and summed in float32. Experts are batched (no Python loop over
    them): only experts that received a token take part, padded to the largest token count.
    """
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"expected x [T, K], w13 [E, 2N, K], w2 [E, K, N]; got {tuple(x.shape)}, "
            f"{tuple(w13.shape)}, {tuple(w2.shape)}"
        )
    tokens, hidden = x.shape
    num_experts, two_n, k13 = w13.shape
    inter = two_n // 2
    if two_n % 2 or k13 != hidden or tuple(w2.shape) != (num_experts, hidden, inter):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}; "
            f"expected w13 [E, 2N, {hidden}] and w2 [E, {hidden}, N]"
        )
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != tokens:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [{tokens}, k]"
        )
    dtype, device = w13.dtype, w13.device
    out = torch.zeros(tokens, hidden, dtype=torch.float32, device=device)
    top_k = topk_ids.shape[1]
    if tokens == 0 or top_k == 0:
        return out

    flat_ids = topk_ids.reshape(-1).to(device=device, dtype=torch.int64)
    if int(flat_ids.min()) < 0 or int(flat_ids.max()) >= num_experts:
        raise ValueError(f"topk_ids must lie in [0, {num_experts})")
    flat_w = topk_weights.reshape(-1).to(device=device, dtype=torch.float32)

    # Sort the (token, slot) pairs by expert; each expert's pairs become one row block.
    order = torch.argsort(flat_ids, stable=True)
    sorted_ids = flat_ids[order]
    token_of = order // top_k  # the token each sorted pair came from
    active, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    n_active = active.numel()
    capacity = int(counts.max())
    slot = torch.repeat_interleave(torch.arange(n_active, device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(sorted_ids.numel(), device=device) - starts[slot]

    batch = torch.zeros(n_active, capacity, hidden, dtype=dtype, device=device)
    batch[slot, pos] = x.to(device=device, dtype=dtype)[token_of]

    all_used = n_active == num_experts
    w13_a = w13 if all_used else w13.index_select(0, active)
    w2_a = w2 if all_used else w2.index_select(0, active)

    h = torch.bmm(batch, w13_a.transpose(1, 2))  # [A, C, 2N]
    if b13 is not None:
        h = h + b13.to(device=device, dtype=dtype).index_select(0, active).unsqueeze(1)
    act = torch.nn.functional.silu(h[..., :inter]) * h[..., inter:]
    y = torch.bmm(act, w2_a.transpose(1, 2))  # [A, C, K]
    if b2 is not None:
        y = y + b2.to(device=device, dtype=dtype).index_select(0, active).unsqueeze(1)

    contrib = y[slot, pos].to(torch.float32) * flat_w[order].unsqueeze(1)
    out.index_add_(0, token_of, contrib)
    return out


#: Default cap on :func:`moe_forward_streamed`'s worker threads: each holds one expert's float
#: weights (about 25 MB for a full-width Qwen3-30B-A3B expert), so 32 bound them to ~0.8 GB.
MAX_WORKERS = 32


class Expert:
    """One expert's two projections, as :func:`moe_forward_streamed` runs them:
    ``gate_up(x [M, K]) -> (gate, up)`` (``[M, N]`` each) and ``down(a [M, N]) -> [M, K]``, in
    the experts' compute dtype (``x @ W.T`` for the weights of ``w13`` and ``w2``)."""

    __slots__ = ("gate_up", "down")

    def __init__(self, gate_up, down):
        self.gate_up = gate_up
        self.down = down


def moe_forward_streamed(
    x: torch.Tensor,
    experts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    every: torch.Tensor | None = None,
    workers: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The block of :func:`moe_forward`, one expert at a time; and, with ``every``, each expert on its own.

    ``experts`` gives one expert's projections at a time (``experts(e)``, see
    :mod:`gptq2xpu.verify.experts`; it has ``num_experts``, ``hidden``, ``inter`` and ``dtype``),
    so only one expert's float weights exist at once (per worker). Expert e runs one GEMM pair
    over the rows routed to it, plus row ``every[e]`` when ``every`` (``[E, K]``) is given.
    Returns float32 ``(out [T, K], every_out [E, K] or None)``: ``out`` as :func:`moe_forward`
    computes it (each expert output weighted and summed in float32, experts in ascending order,
    as ``moe_forward``'s sorted ``index_add_`` sums them); ``every_out[e]`` is expert e's output
    for ``every[e]`` with weight 1, i.e. ``moe_forward(every, w13, w2, ones(E, 1), arange(E)[:, None])``.

    The arithmetic is that of ``moe_forward`` (GEMMs and activation in ``experts.dtype``), but
    each expert's GEMM has its own row count instead of the padded batch, so the float sums may
    round differently: execution noise, well inside :data:`TOLERANCES`.

    ``workers`` (default: ``torch.get_num_threads()`` on a CPU, at most :data:`MAX_WORKERS`, else
    1): experts run on that many threads, each single-threaded inside (one expert's ops are too
    small to share well, and a thread another process preempts then stalls only its own expert,
    not every op of all of them). Each worker holds its own expert buffers (about 25 MB at full
    width). Results are summed in expert order on the calling thread, so they do not depend on
    ``workers``.
    """
    num_experts, hidden, dtype = experts.num_experts, experts.hidden, experts.dtype
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ValueError(f"expected x [T, {hidden}], got {tuple(x.shape)}")
    tokens = x.shape[0]
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != tokens:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [{tokens}, k]"
        )
    if every is not None and tuple(every.shape) != (num_experts, hidden):
        raise ValueError(f"every must be [{num_experts}, {hidden}], got {tuple(every.shape)}")
    top_k = topk_ids.shape[1]
    device = x.device
    out = torch.zeros(tokens, hidden, dtype=torch.float32, device=device)
    every_out = None if every is None else torch.zeros(num_experts, hidden, dtype=torch.float32, device=device)
    flat_ids = topk_ids.reshape(-1).to(device=device, dtype=torch.int64)
    if flat_ids.numel() and (int(flat_ids.min()) < 0 or int(flat_ids.max()) >= num_experts):
        raise ValueError(f"topk_ids must lie in [0, {num_experts})")
    flat_w = topk_weights.reshape(-1).to(device=device, dtype=torch.float32)

    # (token, slot) pairs sorted by expert, as moe_forward sorts them; each expert's rows
    order = torch.argsort(flat_ids, stable=True)
    token_of = order // max(top_k, 1)
    weight_of = flat_w[order]
    xd = x.to(dtype)
    ed = None if every is None else every.to(device=device, dtype=dtype)
    jobs = []  # (expert, its tokens, their weights)
    start = 0
    for e, count in enumerate(torch.bincount(flat_ids, minlength=num_experts).tolist()):
        if count or ed is not None:
            jobs.append((e, token_of[start : start + count], weight_of[start : start + count]))
        start += count

    def run(job) -> torch.Tensor:
        e, toks, _ = job
        rows = xd.index_select(0, toks)
        if ed is not None:
            rows = torch.cat([rows, ed[e : e + 1]])
        expert = experts(e)
        gate, up = expert.gate_up(rows)
        return expert.down(torch.nn.functional.silu(gate) * up)  # [count (+1), K]

    def accumulate(job, y: torch.Tensor) -> None:
        e, toks, w = job
        count = toks.numel()
        if count:
            out.index_add_(0, toks, y[:count].to(torch.float32) * w.unsqueeze(1))
        if every_out is not None:
            every_out[e] = y[count].to(torch.float32)

    if workers is None:
        workers = min(torch.get_num_threads(), MAX_WORKERS) if device.type == "cpu" else 1
    workers = min(int(workers), len(jobs))
    if workers <= 1:
        for job in jobs:
            accumulate(job, run(job))
        return out, every_out

    from concurrent.futures import ThreadPoolExecutor

    # Every thread single-threaded meanwhile, the calling one too: its (small) summing ops would
    # otherwise start parallel regions whose idle OpenMP threads spin, competing with the workers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="gptq2xpu-expert",
                                initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for job, y in zip(jobs, pool.map(run, jobs)):  # in expert order
                accumulate(job, y)
    finally:
        torch.set_num_threads(threads)
    return out, every_out


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How far ``a`` is from ``b`` (the reference), computed in float64 on the CPU.

    Returns ``{"max_abs": max |a-b|, "rel": ||a-b|| / max(||b||, tiny), "cosine": <a,b>/(|a||b|)}``
    as python floats. The cosine of two all-zero tensors is 1.0, of a zero and a non-zero one 0.0.
    A NaN anywhere yields NaN stats, which fail every tolerance check.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {tuple(a.shape)} and {tuple(b.shape)}")
    a64 = a.detach().to(device="cpu", dtype=torch.float64).flatten()
    b64 = b.detach().to(device="cpu", dtype=torch.float64).flatten()
    diff = a64 - b64
    na, nb = float(a64.norm()), float(b64.norm())
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    rel = float(diff.norm()) / max(nb, torch.finfo(torch.float64).tiny)
    if na == 0.0 and nb == 0.0:
        cosine = 1.0
    elif na == 0.0 or nb == 0.0:
        cosine = 0.0
    else:
        cosine = float(a64 @ b64) / (na * nb)
    return {"max_abs": max_abs, "rel": rel, "cosine": cosine}


def within_tolerance(stats: dict[str, float], dtype: torch.dtype | str) -> bool:
    """Whether :func:`compare` stats pass :data:`TOLERANCES` for the compute ``dtype``."""
    tol = _lookup(TOLERANCES, dtype)
    return stats["rel"] <= tol["rel"] and stats["cosine"] >= tol["cosine"]


def within_kernel_tolerance(output: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype | str) -> bool:
    """Element-wise ``|out - ref| <= atol + rtol * |ref|`` with :data:`KERNEL_TOLERANCES` (fp16/bf16)."""
    tol = _lookup(KERNEL_TOLERANCES, dtype)
    out = output.detach().to(device="cpu", dtype=torch.float64)
    ref = reference.detach().to(device="cpu", dtype=torch.float64)
    return bool(torch.all((out - ref).abs() <= tol["atol"] + tol["rtol"] * ref.abs()))


def _lookup(table: dict[str, dict[str, float]], dtype: torch.dtype | str) -> dict[str, float]:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in table:
        raise ValueError(f"no tolerance for compute dtype {name!r}; known: {sorted(table)}")
    return table[name]
