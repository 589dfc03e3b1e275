"""vlmlab: adapt black-box vision-language models on Ray.

Importing the package stays light on purpose: Ray, Serve and the model backends
load only when a submodule that needs them is imported (``vlmlab.oracle``
imports torch; ``vlmlab.distributed`` will import Ray).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
