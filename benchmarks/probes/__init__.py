"""Probes: measurements that explain the benchmarks but are not benchmarks themselves (no stock
side, no recipe ratio). contention: a GEMM beside an all-to-all; determinism: which kernels repeat
bit for bit; timeline (+ timeline_summary): GPU timelines, host time per stage, cProfile of a MoE
layer recipe; compat (+ compat_report): training-loop compatibility of --use-fluid-moe."""
