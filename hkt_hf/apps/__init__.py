"""The applications of the method: built-in models, task data helpers, metrics, the command line and the demo.

They use the method (`hkt_hf`'s top-level modules) and the method never imports them (`tests/test_layout.py`).
"""
