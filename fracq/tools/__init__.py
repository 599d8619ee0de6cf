"""Command-line tools run with ``python -m fracq.tools.<name>``.

``import_weights``: torchvision weights (``.pth`` or ``.npz``) into a
checkpoint that ``launch.py --config.init_from=<workdir>`` starts from.
"""

__all__ = ['import_weights']
