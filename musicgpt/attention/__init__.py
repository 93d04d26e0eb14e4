"""Music-Transformer relative attention: the kernels, the choice between them, and KV caches.

- `eager`: the skew + SDPA reference (CPU, decoding, attention weights for plots);
- `flex`: the FlexAttention kernel (long sequences on a GPU);
- `triton_kernel`: the fused Triton kernel (opt-in; imports Triton only when used);
- `plan`: `AttentionPlan`, one named choice of kernel per call, and `choose_kernel`;
- `cache`: the growing `KVCache` and fixed-shape `RingKVCache` behind `KeyValueCache`.

`musicgpt.model` builds plans and calls them; nothing here imports the model.
"""

from musicgpt.attention.cache import KeyValueCache, KVCache, RingKVCache
from musicgpt.attention.eager import attend, relative_logits
from musicgpt.attention.plan import IMPLS, AttentionPlan, choose_kernel

__all__ = ["IMPLS", "AttentionPlan", "KVCache", "KeyValueCache", "RingKVCache", "attend",
           "choose_kernel", "relative_logits"]
