"""DeepSeek-V2/V3 multi-head latent attention (MLA): refused, with the reason.

MLA has no per-head W_Q/W_K whose rows are the key channels LongAct scores: keys are
``kv_b_proj(norm(kv_a_proj_with_mqa(x)))`` (a low-rank up-projection whose rows mix the
no-RoPE key part and V per head) concatenated with one RoPE key shared by all heads,
and queries come from ``q_b_proj`` over a low-rank ``q_a_proj``. Row masks on these
matrices would not be "the top-k channels of W_K", and the RoPE channels are decoupled
from the content channels, so rotate-half pairing is not defined over one head. Support
would need its own design (e.g. masking the up-projections' per-head rows over the
no-RoPE part and the shared RoPE key separately); until then ``get_adapter`` says so.
"""

from __future__ import annotations

from longact.core.arch.base import refuse

refuse(
    "multi-head latent attention (MLA) has no per-head W_Q/W_K rows: keys come from a "
    "low-rank kv_b_proj whose rows mix keys and values, plus one RoPE key shared by all "
    "heads, so LongAct's per-channel row masks are not defined there",
    "deepseek_v2",
    "deepseek_v3",
)
