"""ml_collections configs: ``get_config()`` files that tools load with ``--config=configs/X.py``.

A variant imports the config it changes (``from configs import agw_market1501``) and overrides
fields; the package is installed with the project (``pip install -e .``).
"""
