"""lowbit: post-training quantization of causal language models.

    import lowbit
    result = lowbit.quantize(model, [lowbit.AWQ(), lowbit.GPTQ(scheme="w4g64")], calib)
    lowbit.save("out/q", model, tokenizer, result)
"""

from lowbit.api import plan, quantize, save
from lowbit.errors import LowbitError
from lowbit.methods.awq import AWQ
from lowbit.methods.gptq import GPTQ
from lowbit.methods.hqq import HQQ
from lowbit.methods.rtn import RTN
from lowbit.methods.smoothquant import SmoothQuant
from lowbit.methods.w8a8 import W8A8, LLMInt8
from lowbit.recipe import Recipe, load_recipe, shorthand

__all__ = [
    "AWQ", "GPTQ", "HQQ", "LLMInt8", "LowbitError", "RTN", "Recipe", "SmoothQuant", "W8A8",
    "load_recipe", "plan", "quantize", "save", "shorthand",
]
