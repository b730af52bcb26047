"""Weight transfer to the replacement layers: pure tensor math, no torch.fx."""

from spd_rewrite.transfer.exact import (
    avg_pool_divisor_is_constant,
    avg_pool_weight_divisor,
    spd_avg_pool_weight,
    spd_conv_weight,
    spd_max_pool_init_weight,
)
from spd_rewrite.transfer.widen import (
    widen_batchnorm,
    widen_conv_input,
    widen_groupnorm,
    widen_linear_input,
)

__all__ = [
    "avg_pool_divisor_is_constant",
    "avg_pool_weight_divisor",
    "spd_avg_pool_weight",
    "spd_conv_weight",
    "spd_max_pool_init_weight",
    "widen_batchnorm",
    "widen_conv_input",
    "widen_groupnorm",
    "widen_linear_input",
]
