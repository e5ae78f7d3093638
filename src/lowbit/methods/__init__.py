"""The recipe steps, one module each; importing the package registers them all
(``lowbit.methods.base.STEPS``)."""

from lowbit.methods import awq, gptq, hqq, rtn, smoothquant, w8a8  # noqa: F401
