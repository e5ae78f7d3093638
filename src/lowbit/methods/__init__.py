"""The recipe steps, one module each. Importing the package imports every module in it, which
registers their steps (``lowbit.methods.base.STEPS``): a new method is a new module here."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
