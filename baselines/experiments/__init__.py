"""Studies run on top of ``envs``, ``agents`` and ``baselines``: the benchmark, the demo, the speed bench and the
export CLI.

This is the top layer: it imports the three packages below it, and nothing in ``envs``, ``agents`` or
``baselines`` imports it (``import baselines`` does not load this subpackage, so it does not pull in ``agents``).
"""
