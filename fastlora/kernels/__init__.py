"""Triton GPU kernels, importable only as ``fastlora.kernels``.

The kernel sources live in the top-level ``kernels/`` folder of the source tree (leaves that
import only torch and triton). That folder deliberately has no ``__init__.py``: a regular
package named ``kernels`` at the checkout root would shadow any installed top-level
``kernels`` (Hugging Face's, which transformers imports) for every script, test run, notebook
or Flower worker started from the root. Wheels copy the sources into this package; in a
source checkout or an editable install this package's search path is extended to the folder.
"""
import os as _os

_SOURCE_DIR = _os.path.join(
    _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))), "kernels")

# Only when the sources are not installed next to this file (wheel) and the folder beside the
# package is really ours (a source tree), never some other site-packages/kernels.
if (not _os.path.exists(_os.path.join(_os.path.dirname(__file__), "lora_linear.py"))
        and _os.path.exists(_os.path.join(_SOURCE_DIR, "lora_linear.py"))):
    __path__.append(_SOURCE_DIR)
