"""qpu-gateway's benchmark suite (issue 6): programs that print a table and write bench/results/.

Benchmarks are not tests: nothing here asserts on time. Every figure is compared with a baseline
measured in the same run on the same machine, so a ratio holds on a noisy shared machine.
Run `python -m bench --help`.
"""
